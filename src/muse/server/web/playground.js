// The playground: chat (multi-turn, system prompt) and completion modes over /v1/chat/completions and
// /v1/completions, streamed (SSE over fetch), with the sampling knobs, a per-token logprob view and
// the request as curl and Python. Every piece of model output is appended as text.
"use strict";

(() => {
  const {el, $, keys, request, failure, showError, keyField} = Muse;
  const history = [];          // [{role, content}] of the chat so far
  let controller = null;       // AbortController of the request in flight

  const ui = {
    key: $("#key"), model: $("#model"), mode: $("#mode"), system: $("#system"), prompt: $("#prompt"),
    raw: $("#raw-prompt"), messages: $("#messages"), output: $("#output"), tokinfo: $("#tokinfo"),
    status: $("#status"), error: $("#error"), send: $("#send"), stop: $("#stop"),
  };

  function num(id) {
    const v = $("#" + id).value.trim();
    return v === "" ? undefined : Number(v);
  }

  function body() {
    const chat = ui.mode.value === "chat";
    const b = {model: ui.model.value || undefined};
    if (chat) {
      const msgs = [];
      if (ui.system.value.trim()) msgs.push({role: "system", content: ui.system.value});
      msgs.push(...history);
      const next = ui.prompt.value;
      if (next) msgs.push({role: "user", content: next});
      b.messages = msgs;
    } else {
      b.prompt = ui.raw.value;
    }
    for (const k of ["temperature", "top_p", "max_tokens", "seed"]) if (num(k) !== undefined) b[k] = num(k);
    const stops = $("#stop-seqs").value.split("\n").filter((s) => s.length);
    if (stops.length) b.stop = stops;
    if ($("#logprobs").checked) {
      const top = num("top_logprobs") || 0;
      if (chat) { b.logprobs = true; if (top) b.top_logprobs = top; } else b.logprobs = top;
    }
    b.stream = true;
    b.stream_options = {include_usage: true};
    return b;
  }

  const endpoint = () => ui.mode.value === "chat" ? "/v1/chat/completions" : "/v1/completions";

  // ---- snippets: the key is never in them ($MUSE_API_KEY) --------------------------------------------
  function pyValue(v, indent) {
    const pad = " ".repeat(indent);
    if (v === null || v === undefined) return "None";
    if (v === true) return "True";
    if (v === false) return "False";
    if (typeof v === "number" || typeof v === "string") return JSON.stringify(v);
    if (Array.isArray(v)) return "[" + v.map((x) => pyValue(x, indent)).join(", ") + "]";
    const items = Object.entries(v).map(([k, x]) => `${pad}    ${JSON.stringify(k)}: ${pyValue(x, indent + 4)}`);
    return "{\n" + items.join(",\n") + "\n" + pad + "}";
  }

  function snippets() {
    const b = body();
    const url = location.origin + endpoint();
    const json = JSON.stringify(b, null, 2).replaceAll("'", "'\\''");
    $("#curl").textContent = `curl -N ${url} \\\n  -H "Authorization: Bearer $MUSE_API_KEY" \\\n` +
      `  -H "Content-Type: application/json" \\\n  -d '${json}'`;
    const {stream, stream_options, ...args} = b;
    const call = ui.mode.value === "chat" ? "client.chat.completions.create" : "client.completions.create";
    const kw = Object.entries({...args, stream}).map(([k, v]) => `    ${k}=${pyValue(v, 4)},`).join("\n");
    const piece = ui.mode.value === "chat" ? "chunk.choices[0].delta.content or \"\"" : "chunk.choices[0].text";
    $("#python").textContent = `import os\nfrom openai import OpenAI\n\n` +
      `client = OpenAI(base_url=${JSON.stringify(location.origin + "/v1")}, api_key=os.environ["MUSE_API_KEY"])\n` +
      `stream = ${call}(\n${kw}\n)\nfor chunk in stream:\n    if chunk.choices:\n        print(${piece}, end="", flush=True)\n`;
  }

  // ---- rendering ------------------------------------------------------------------------------------
  function renderMessages() {
    ui.messages.replaceChildren(...history.map((m) =>
      el("div", {class: "msg " + m.role}, el("span", {class: "role", text: m.role}), m.content)));
  }

  function probColor(lp) {
    const p = Math.exp(lp);
    return `hsl(${Math.round(120 * p)}, 75%, ${Math.round(88 - 10 * p)}%)`;
  }

  // [{token, logprob, top: [[token, logprob], ...]}] of one chunk -> a tooltip and the side panel text
  function describe(entries) {
    return entries.map((e) => {
      const alts = e.top.map(([t, lp]) => `${JSON.stringify(t)} ${(100 * Math.exp(lp)).toFixed(1)}%`).join(", ");
      return `${JSON.stringify(e.token)}: p=${(100 * Math.exp(e.logprob)).toFixed(1)}% (logprob ${e.logprob.toFixed(3)})` +
             (alts ? `\ntop: ${alts}` : "");
    }).join("\n");
  }

  function appendPiece(text, entries) {
    if (!text) return;
    if (!entries.length) { ui.output.append(text); return; }
    const span = el("span", {class: "tok", tabindex: "0", title: describe(entries)}, text);
    span.style.backgroundColor = probColor(Math.min(...entries.map((e) => e.logprob)));
    ui.output.append(span);
  }

  function showTokInfo(ev) {
    const t = ev.target.closest && ev.target.closest(".tok");
    if (t) ui.tokinfo.textContent = t.getAttribute("title");
  }

  function chatEntries(lp) {
    if (!lp || !Array.isArray(lp.content)) return [];
    return lp.content.map((c) => ({token: c.token, logprob: c.logprob,
                                   top: (c.top_logprobs || []).map((a) => [a.token, a.logprob])}));
  }

  function completionEntries(lp) {
    if (!lp || !Array.isArray(lp.tokens)) return [];
    return lp.tokens.map((t, i) => ({token: t, logprob: lp.token_logprobs[i] ?? 0,
                                     top: Object.entries((lp.top_logprobs || [])[i] || {})}));
  }

  // ---- sending --------------------------------------------------------------------------------------
  async function* events(resp) {
    const reader = resp.body.getReader();
    const dec = new TextDecoder();
    let buf = "", reads = 0;
    for (;;) {
      const {value, done} = await reader.read();
      if (done) break;
      ui.output.dataset.reads = String(++reads);   // network reads so far: tests check tokens stream
      buf += dec.decode(value, {stream: true});
      let i;
      while ((i = buf.indexOf("\n\n")) >= 0) {
        const block = buf.slice(0, i);
        buf = buf.slice(i + 2);
        const data = block.split("\n").filter((l) => l.startsWith("data:")).map((l) => l.slice(5).trimStart()).join("\n");
        if (data === "[DONE]") return;
        if (data) yield JSON.parse(data);
      }
    }
  }

  async function send() {
    const key = keys.get("key");
    const chat = ui.mode.value === "chat";
    if (chat && !ui.prompt.value.trim()) { ui.prompt.focus(); return; }
    const b = body();
    showError(ui.error, null);
    ui.output.replaceChildren();
    delete ui.output.dataset.reads;
    delete ui.output.dataset.pieces;
    ui.status.textContent = "waiting for the first token\u2026";
    ui.send.disabled = true;
    ui.stop.disabled = false;
    controller = new AbortController();
    const t0 = performance.now();
    let first = null, pieces = 0, usage = null, text = "";
    if (chat) { history.push({role: "user", content: ui.prompt.value}); ui.prompt.value = ""; renderMessages(); }
    try {
      const resp = await request(endpoint(), {key, method: "POST", body: b, signal: controller.signal});
      if (!resp.ok) throw await failure(resp);
      for await (const ev of events(resp)) {
        if (ev.error) throw new Muse.ApiFailure(-1, ev.error, null);  // an error event ends the stream
        if (ev.usage) usage = ev.usage;
        const c = ev.choices && ev.choices[0];
        if (!c) continue;
        const piece = chat ? (c.delta && c.delta.content) || "" : c.text || "";
        if (!piece) continue;
        if (first === null) {
          first = performance.now() - t0;
          ui.status.dataset.ttftMs = first.toFixed(1);
        }
        pieces += 1;
        text += piece;
        appendPiece(piece, chat ? chatEntries(c.logprobs) : completionEntries(c.logprobs));
        ui.output.dataset.pieces = String(pieces);
      }
      if (chat) { history.push({role: "assistant", content: text}); renderMessages(); }
      const secs = (performance.now() - t0) / 1000;
      ui.status.textContent = `${usage ? usage.completion_tokens : pieces} tokens` +
        (first !== null ? ` \u00b7 first token after ${first.toFixed(0)} ms` : "") + ` \u00b7 ${secs.toFixed(2)} s` +
        (usage ? ` \u00b7 prompt ${usage.prompt_tokens} tokens` : "");
    } catch (e) {
      if (chat && !text) { const last = history.pop(); ui.prompt.value = last ? last.content : ""; renderMessages(); }
      if (e.name === "AbortError") ui.status.textContent = "stopped";
      else { ui.status.textContent = ""; showError(ui.error, e); }
    } finally {
      ui.status.dataset.done = "1";
      ui.send.disabled = false;
      ui.stop.disabled = true;
      controller = null;
      snippets();
    }
  }

  async function loadModels() {
    const key = keys.get("key");
    ui.model.replaceChildren();
    if (!key) { ui.status.textContent = "Enter a partner key to start."; return; }
    try {
      const {data} = await Muse.api("/v1/models", {key});
      ui.model.replaceChildren(...data.map((m) => el("option", {value: m.id, text: m.id})));
      showError(ui.error, null);
      ui.status.textContent = "";
      ui.status.dataset.ready = "1";
    } catch (e) {
      showError(ui.error, e);
    }
    snippets();
  }

  function setMode() {
    const chat = ui.mode.value === "chat";
    $("#chat-box").classList.toggle("hidden", !chat);
    $("#completion-box").classList.toggle("hidden", chat);
    snippets();
  }

  function copy(id) {
    const text = $("#" + id).textContent;
    if (navigator.clipboard) navigator.clipboard.writeText(text).catch(() => { ui.status.textContent = "copy failed: select the text instead"; });
  }

  keyField(ui.key, $("#key-save"), $("#key-forget"), "key", loadModels);
  ui.send.addEventListener("click", send);
  ui.stop.addEventListener("click", () => controller && controller.abort());
  $("#clear").addEventListener("click", () => { history.length = 0; renderMessages(); ui.output.replaceChildren(); snippets(); });
  ui.mode.addEventListener("change", setMode);
  for (const t of [ui.prompt, ui.raw]) t.addEventListener("keydown", (ev) => {
    if (ev.key === "Enter" && (ev.ctrlKey || ev.metaKey)) { ev.preventDefault(); send(); }
  });
  document.querySelector("main").addEventListener("input", snippets);
  document.querySelector("main").addEventListener("change", snippets);
  ui.output.addEventListener("mouseover", showTokInfo);
  ui.output.addEventListener("focusin", showTokInfo);
  $("#copy-curl").addEventListener("click", () => copy("curl"));
  $("#copy-python").addEventListener("click", () => copy("python"));
  setMode();
  loadModels();
})();
