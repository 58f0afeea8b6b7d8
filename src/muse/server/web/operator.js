// The operator's page (admin key): keys (list, create - the key shown once -, revoke, rotate, set
// limits and quotas), live engine state from /admin/engine, and usage per partner from /admin/usage.
"use strict";

(() => {
  const {el, $, keys, api, showError, keyField, fmt, table} = Muse;
  let editing = null;      // key_id whose limits the form edits, or null (the form creates)
  let last = null;         // previous /admin/engine answer (tokens/s is a difference of counters)
  let timer = null;

  const key = () => keys.get("admin");
  const call = (path, opts = {}) => api(path, {key: key(), ...opts});

  function fail(e) { showError($("#error"), e); }

  function showNewKey(text, data, what) {
    const box = $("#new-key");
    box.replaceChildren(
      el("div", {text: `${what} key ${data.key_id} for ${data.partner}. Copy it now: it is shown only once.`}),
      el("pre", {id: "new-key-text", class: "mono", text}),
      el("button", {type: "button", class: "secondary", text: "Hide", onclick: () => { box.replaceChildren(); box.classList.add("hidden"); }}));
    box.classList.remove("hidden");
  }

  function limits(k) {
    const q = k.token_quota ? `${fmt.int(k.token_quota)} / ${k.period}` : "none";
    return `rpm ${fmt.limit(k.rpm)} \u00b7 tpm ${fmt.limit(k.tpm)} \u00b7 quota ${q}`;
  }

  function actions(k) {
    if (k.status !== "active") return el("span", {class: "muted", text: k.status});
    const revoke = el("button", {type: "button", class: "danger", text: "Revoke"});
    revoke.addEventListener("click", async () => {
      if (revoke.dataset.armed !== "1") { revoke.dataset.armed = "1"; revoke.textContent = "Confirm revoke"; return; }
      try { await call(`/admin/keys/${encodeURIComponent(k.key_id)}/revoke`, {method: "POST"}); fail(null); loadKeys(); }
      catch (e) { fail(e); }
    });
    const rotate = el("button", {type: "button", class: "secondary", text: "Rotate"});
    rotate.addEventListener("click", async () => {
      try {
        const r = await call(`/admin/keys/${encodeURIComponent(k.key_id)}/rotate`, {method: "POST"});
        showNewKey(r.key, r.data, "Rotated: new");
        fail(null);
        loadKeys();
      } catch (e) { fail(e); }
    });
    const edit = el("button", {type: "button", class: "secondary", text: "Limits"});
    edit.addEventListener("click", () => startEdit(k));
    return el("div", {class: "row"}, edit, rotate, revoke);
  }

  async function loadKeys() {
    const all = $("#show-all").checked ? "?all=true" : "";
    const {data} = await call("/admin/keys" + all);
    const now = Date.now() / 1000;
    $("#keys").replaceChildren(table(["key id", "partner", "models", "limits", "expires", "created", ""],
      data.map((k) => {
        k.status = k.revoked_at ? "revoked" : (k.expires_at && Date.parse(k.expires_at) / 1000 <= now ? "expired" : "active");
        return [el("span", {class: "mono key-id", text: k.key_id}), k.partner, k.models ? k.models.join(", ") : "all",
                limits(k), k.expires_at || "never", k.created_at, actions(k)];
      })));
    $("#keys").dataset.count = String(data.length);
  }

  function formValues(partial) {
    const v = (id) => $("#" + id).value.trim();
    const n = (id) => v(id) === "" ? null : Number(v(id));
    const out = {models: v("f-models") ? v("f-models").split(",").map((s) => s.trim()).filter(Boolean) : null,
                 rpm: n("f-rpm"), tpm: n("f-tpm"), token_quota: n("f-quota"), period: v("f-period") || null,
                 expires_at: v("f-expires") || null};
    if (!partial) out.partner = v("f-partner");
    return out;
  }

  function startEdit(k) {
    editing = k.key_id;
    $("#f-partner").value = k.partner;
    $("#f-partner").disabled = true;
    $("#f-models").value = k.models ? k.models.join(", ") : "";
    $("#f-rpm").value = k.rpm ?? "";
    $("#f-tpm").value = k.tpm ?? "";
    $("#f-quota").value = k.token_quota ?? "";
    $("#f-period").value = k.period || "";
    $("#f-expires").value = k.expires_at || "";
    $("#f-editing").textContent = "editing " + k.key_id;
    for (const [id, show] of [["f-create", false], ["f-update", true], ["f-cancel", true]]) $("#" + id).classList.toggle("hidden", !show);
    $("#f-rpm").focus();
  }

  function stopEdit() {
    editing = null;
    $("#f-partner").disabled = false;
    $("#f-editing").textContent = "";
    for (const [id, show] of [["f-create", true], ["f-update", false], ["f-cancel", false]]) $("#" + id).classList.toggle("hidden", !show);
  }

  async function create() {
    try {
      const r = await call("/admin/keys", {method: "POST", body: formValues(false)});
      showNewKey(r.key, r.data, "Created");
      fail(null);
      loadKeys();
    } catch (e) { fail(e); }
  }

  async function update() {
    try {
      await call(`/admin/keys/${encodeURIComponent(editing)}`, {method: "PATCH", body: formValues(true)});
      fail(null);
      stopEdit();
      loadKeys();
    } catch (e) { fail(e); }
  }

  async function loadEngine() {
    const now = await call("/admin/engine");
    const rows = Object.entries(now.models).map(([name, s]) => {
      const prev = last && last.models[name];
      const dt = last ? now.time - last.time : 0;
      const tps = prev && dt > 0 ? (s.num_generation_tokens - prev.num_generation_tokens) / dt : null;
      const used = s.num_blocks - s.num_free_blocks;
      return [name, tps === null ? "\u2013" : tps.toFixed(1), s.num_running, s.num_waiting + now.admission_waiting,
              `${used} / ${s.num_blocks} (${fmt.pct(s.kv_usage)})`, fmt.pct(s.prefix_cache_hit_rate),
              fmt.int(s.num_generation_tokens), s.restarts];
    });
    last = now;
    const parts = [
      el("div", {class: "muted", text: now.healthy ? "healthy" : "unhealthy: an engine is restarting or stopped"}),
      table(["model", "tokens/s", "running", "waiting", "KV blocks in use", "prefix-cache hits", "tokens generated", "restarts"], rows)];
    // several replicas on one PostgreSQL database: each one's state as of its last heartbeat
    if (now.replicas && now.replicas.length) {
      parts.push(el("div", {class: "muted", text: `replicas (this page is served by ${now.replica})`}),
        table(["replica", "host", "pid", "lease", "heartbeat", "running", "waiting", "healthy"],
          now.replicas.map((r) => {
            const st = r.state || {};
            return [r.name, r.host, r.pid, r.alive ? "live" : "expired", `${Math.max(0, now.time - r.heartbeat_at).toFixed(0)} s ago`,
                    st.admission_running ?? "\u2013", st.admission_waiting ?? "\u2013",
                    st.healthy === undefined ? "\u2013" : (st.healthy ? "yes" : "no")];
          })));
    }
    $("#engine").replaceChildren(...parts);
  }

  async function loadUsage() {
    const {data} = await call("/admin/usage");
    const per = new Map();
    for (const g of data) {
      const p = per.get(g.partner) || {requests: 0, prompt: 0, completion: 0, keys: new Set(), models: new Set()};
      p.requests += g.requests; p.prompt += g.prompt_tokens; p.completion += g.completion_tokens;
      p.keys.add(g.key_id); p.models.add(g.model);
      per.set(g.partner, p);
    }
    $("#usage").replaceChildren(table(["partner", "keys", "models", "requests", "prompt tokens", "completion tokens"],
      [...per].map(([name, p]) => [name, p.keys.size, [...p.models].join(", "), fmt.int(p.requests), fmt.int(p.prompt), fmt.int(p.completion)])));
  }

  async function loadAll() {
    clearInterval(timer);
    $("#admin").classList.add("hidden");
    if (!key()) { fail(new Error("Enter the operator's admin key.")); return; }
    try {
      await loadKeys();                      // the admin check: a partner key stops here with a 403
      $("#admin").classList.remove("hidden");
      fail(null);
      await Promise.all([loadEngine(), loadUsage()]);
      timer = setInterval(() => loadEngine().catch(fail), 3000);
    } catch (e) { fail(e); }
  }

  keyField($("#key"), $("#key-save"), $("#key-forget"), "admin", loadAll);
  $("#f-create").addEventListener("click", create);
  $("#f-update").addEventListener("click", update);
  $("#f-cancel").addEventListener("click", stopEdit);
  $("#show-all").addEventListener("change", () => loadKeys().catch(fail));
  loadAll();
})();
