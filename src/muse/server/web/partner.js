// A partner's own usage (GET /v1/usage): quota used and left, rate limits, tokens by day (prompt vs
// completion) and by model, and the last requests with their status.
"use strict";

(() => {
  const {el, $, keys, api, showError, keyField, fmt, barChart, legend, table} = Muse;
  const PROMPT = "#2f5bd3", COMPLETION = "#d3542f";

  function stat(label, value, id) {
    return el("div", {class: "stat", id}, el("span", {class: "muted", text: label}), el("b", {text: value}));
  }

  function render(u) {
    const q = u.quota;
    const totals = u.by_model.reduce((a, m) => [a[0] + m.requests, a[1] + m.prompt_tokens, a[2] + m.completion_tokens], [0, 0, 0]);
    $("#stats").replaceChildren(
      stat("partner", u.partner),
      stat("requests (since " + u.since.slice(0, 10) + ")", fmt.int(totals[0]), "stat-requests"),
      stat("prompt tokens", fmt.int(totals[1]), "stat-prompt"),
      stat("completion tokens", fmt.int(totals[2]), "stat-completion"),
      stat("quota used" + (q ? " this " + q.period : ""), q ? fmt.int(q.used) + " / " + fmt.int(q.token_quota) : "no quota", "stat-quota"),
      stat("quota left", q ? fmt.int(q.left) : "\u2013", "stat-left"),
      stat("quota resets", q ? q.resets_at : "\u2013"),
      stat("requests / min", fmt.limit(u.limits.rpm), "stat-rpm"),
      stat("tokens / min", fmt.limit(u.limits.tpm), "stat-tpm"),
      stat("models", u.limits.models ? u.limits.models.join(", ") : "all served"),
      stat("key expires", u.limits.expires_at || "never"));
    const days = new Map();                 // every UTC day of the window, idle ones at zero
    for (let t = Date.parse(u.since); t <= Date.now(); t += 86400000) days.set(new Date(t).toISOString().slice(0, 10), [0, 0]);
    for (const d of u.by_day) {
      const v = days.get(d.day) || [0, 0];
      days.set(d.day, [v[0] + d.prompt_tokens, v[1] + d.completion_tokens]);
    }
    $("#by-day").replaceChildren(
      barChart([...days].map(([day, parts]) => ({label: day.slice(5), parts})), [PROMPT, COMPLETION], {title: "tokens per UTC day"}),
      legend([["prompt tokens", PROMPT], ["completion tokens", COMPLETION]]));
    const total = Math.max(1, totals[1] + totals[2]);
    $("#by-model").replaceChildren(table(["model", "requests", "prompt tokens", "completion tokens", "share"],
      u.by_model.map((m) => [m.model, fmt.int(m.requests), fmt.int(m.prompt_tokens), fmt.int(m.completion_tokens),
                             fmt.pct((m.prompt_tokens + m.completion_tokens) / total)])));
    $("#recent").replaceChildren(table(["time (UTC)", "model", "endpoint", "status", "HTTP", "prompt", "completion", "latency s"],
      u.recent.map((r) => [r.created_at, r.model, r.endpoint, r.status, r.http_status, r.prompt_tokens,
                           r.completion_tokens, r.latency_s])));
    document.body.dataset.loaded = String(Date.now());
  }

  async function load() {
    const key = keys.get("key");
    if (!key) { showError($("#error"), new Error("Enter your partner key to see its usage.")); return; }
    try {
      render(await api("/v1/usage", {key}));
      showError($("#error"), null);
    } catch (e) {
      showError($("#error"), e);
    }
  }

  keyField($("#key"), $("#key-save"), $("#key-forget"), "key", load);
  $("#refresh").addEventListener("click", load);
  load();
})();
