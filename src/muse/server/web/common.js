// Muse web pages: what every page shares. DOM building with textContent only (never innerHTML: model
// output and every user string stay text), the key in sessionStorage, fetch with a bearer token, the
// API's errors shown as the API says them, and small SVG charts.
"use strict";

const Muse = (() => {
  const SVG = "http://www.w3.org/2000/svg";

  // el("td", {class: "x", text: value}, child...): attributes are ours, text goes through textContent
  function el(tag, attrs = {}, ...children) {
    const e = document.createElement(tag);
    setAttrs(e, attrs);
    for (const c of children) if (c !== null && c !== undefined) e.append(c instanceof Node ? c : String(c));
    return e;
  }

  function svg(tag, attrs = {}, ...children) {
    const e = document.createElementNS(SVG, tag);
    setAttrs(e, attrs);
    for (const c of children) if (c !== null && c !== undefined) e.append(c instanceof Node ? c : String(c));
    return e;
  }

  function setAttrs(e, attrs) {
    for (const [k, v] of Object.entries(attrs)) {
      if (v === null || v === undefined || v === false) continue;
      if (k === "text") e.textContent = String(v);
      else if (k.startsWith("on")) e.addEventListener(k.slice(2), v);
      else e.setAttribute(k, v === true ? "" : String(v));
    }
  }

  const $ = (sel, root = document) => root.querySelector(sel);

  // Keys live in this tab only (sessionStorage): closing the tab forgets them; never a cookie or a URL.
  const keys = {
    get: (name) => sessionStorage.getItem("muse." + name) || "",
    set: (name, value) => value ? sessionStorage.setItem("muse." + name, value)
                                : sessionStorage.removeItem("muse." + name),
  };

  class ApiFailure extends Error {
    constructor(status, error, headers) {
      super(error.message || "HTTP " + status);
      this.status = status;
      this.error = error;
      this.retryAfter = headers ? headers.get("retry-after") : null;
      this.requestId = headers ? headers.get("x-request-id") : null;
    }
  }

  async function failure(resp) {
    let error = {message: "HTTP " + resp.status + " " + (resp.statusText || "")};
    try {
      const body = await resp.json();
      if (body && body.error && typeof body.error === "object") error = body.error;
    } catch (_) { /* not JSON: keep the status line */ }
    return new ApiFailure(resp.status, error, resp.headers);
  }

  function request(path, {key, method = "GET", body, signal} = {}) {
    const headers = {};
    if (key) headers["Authorization"] = "Bearer " + key;
    if (body !== undefined) headers["Content-Type"] = "application/json";
    return fetch(path, {method, headers, signal, credentials: "omit", cache: "no-store",
                        body: body === undefined ? undefined : JSON.stringify(body)})
      .catch((e) => {
        if (e.name === "AbortError") throw e;
        throw new ApiFailure(0, {message: "The server could not be reached (" + e.message + ")."}, null);
      });
  }

  async function api(path, opts = {}) {
    const resp = await request(path, opts);
    if (!resp.ok) throw await failure(resp);
    return resp.json();
  }

  // An error box with the API's own words: status, type/code, message, and when to retry.
  function showError(box, e) {
    box.replaceChildren();
    if (!e) { box.classList.add("hidden"); return; }
    box.classList.remove("hidden");
    if (!(e instanceof ApiFailure)) { box.append(el("div", {text: String(e && e.message || e)})); return; }
    const err = e.error || {};
    const where = e.status > 0 ? "HTTP " + e.status : e.status < 0 ? "Error during the stream" : "Network error";
    const head = [where, err.type, err.code].filter(Boolean).join(" \u00b7 ");
    box.append(el("strong", {class: "err-head", text: head}), el("div", {class: "err-message", text: err.message || ""}));
    if (err.param) box.append(el("div", {class: "muted", text: "param: " + err.param}));
    if (e.retryAfter) box.append(el("div", {class: "err-retry", text: "Retry after " + e.retryAfter + " s."}));
    if (e.requestId) box.append(el("div", {class: "muted", text: "request id: " + e.requestId}));
  }

  // A key field + Save/Forget buttons, bound to sessionStorage slot `name`.
  function keyField(input, saveBtn, forgetBtn, name, onChange) {
    input.value = keys.get(name);
    const save = () => { keys.set(name, input.value.trim()); onChange && onChange(); };
    saveBtn.addEventListener("click", save);
    input.addEventListener("keydown", (ev) => { if (ev.key === "Enter") save(); });
    forgetBtn.addEventListener("click", () => { input.value = ""; keys.set(name, ""); onChange && onChange(); });
  }

  const fmt = {
    int: (n) => n === null || n === undefined ? "\u2013" : Math.round(Number(n)).toLocaleString("en-US"),
    num: (n, d = 3) => n === null || n === undefined ? "\u2013" : Number(n).toPrecision(d),
    pct: (x) => x === null || x === undefined ? "\u2013" : (100 * x).toFixed(1) + "%",
    limit: (n) => n === null || n === undefined ? "unlimited" : Number(n).toLocaleString("en-US"),
  };

  const COLORS = ["#2f5bd3", "#d3542f", "#1b7a3a", "#8a3fc2", "#c29a1b", "#1b8a9a", "#9a1b5b", "#555"];

  function legend(items) {
    return el("div", {class: "legend"}, ...items.map(([name, color]) => {
      const s = el("span", {text: name});
      s.style.setProperty("--swatch", color);
      return s;
    }));
  }

  function ticks(lo, hi, n = 4) {
    if (!(hi > lo)) return [lo];
    const step = Math.pow(10, Math.floor(Math.log10((hi - lo) / n)));
    const mult = [1, 2, 5, 10].find((m) => (hi - lo) / (step * m) <= n) || 10;
    const s = step * mult, out = [];
    for (let v = Math.ceil(lo / s) * s; v <= hi + 1e-12; v += s) out.push(+v.toPrecision(6));
    return out;
  }

  // series: [{name, color, points: [[x, y], ...]}] -> an SVG line chart with axes (width scales to its box)
  function lineChart(series, {title = "", xLabel = "step", w = 640, h = 260} = {}) {
    const pad = {l: 56, r: 12, t: 18, b: 32};
    const pts = series.flatMap((s) => s.points);
    const root = svg("svg", {class: "chart", viewBox: `0 0 ${w} ${h}`, role: "img", "aria-label": title || "chart"});
    if (!pts.length) { root.append(svg("text", {x: w / 2, y: h / 2, "text-anchor": "middle", text: "no data"})); return root; }
    let [x0, x1] = [Math.min(...pts.map((p) => p[0])), Math.max(...pts.map((p) => p[0]))];
    let [y0, y1] = [Math.min(...pts.map((p) => p[1])), Math.max(...pts.map((p) => p[1]))];
    if (x1 === x0) x1 = x0 + 1;
    if (y1 === y0) { y0 -= Math.abs(y0) * 0.05 || 1; y1 += Math.abs(y1) * 0.05 || 1; }
    const X = (x) => pad.l + (x - x0) / (x1 - x0) * (w - pad.l - pad.r);
    const Y = (y) => h - pad.b - (y - y0) / (y1 - y0) * (h - pad.t - pad.b);
    for (const t of ticks(y0, y1)) {
      root.append(svg("line", {x1: pad.l, x2: w - pad.r, y1: Y(t), y2: Y(t), stroke: "#e4e7ee"}),
                  svg("text", {x: pad.l - 4, y: Y(t) + 4, "text-anchor": "end", text: String(t)}));
    }
    for (const t of ticks(x0, x1, 5)) root.append(svg("text", {x: X(t), y: h - pad.b + 14, "text-anchor": "middle", text: String(t)}));
    root.append(svg("text", {x: w - pad.r, y: h - 4, "text-anchor": "end", text: xLabel}));
    if (title) root.append(svg("text", {x: pad.l, y: 12, text: title}));
    for (const s of series) {
      if (!s.points.length) continue;
      const d = s.points.map((p, i) => (i ? "L" : "M") + X(p[0]).toFixed(1) + " " + Y(p[1]).toFixed(1)).join(" ");
      const path = svg("path", {d, fill: "none", stroke: s.color, "stroke-width": 1.8, class: "series"});
      path.append(svg("title", {text: s.name}));
      root.append(path);
    }
    return root;
  }

  // bars: [{label, parts: [value, ...]}], parts stacked in `colors` order
  function barChart(bars, colors, {title = "", w = 640, h = 220} = {}) {
    const pad = {l: 56, r: 8, t: 18, b: 34};
    const root = svg("svg", {class: "chart", viewBox: `0 0 ${w} ${h}`, role: "img", "aria-label": title || "chart"});
    if (!bars.length) { root.append(svg("text", {x: w / 2, y: h / 2, "text-anchor": "middle", text: "no usage yet"})); return root; }
    const top = Math.max(1, ...bars.map((b) => b.parts.reduce((a, v) => a + v, 0)));
    const bw = (w - pad.l - pad.r) / bars.length;
    const Y = (v) => (h - pad.t - pad.b) * v / top;
    for (const t of ticks(0, top)) {
      const y = h - pad.b - Y(t);
      root.append(svg("line", {x1: pad.l, x2: w - pad.r, y1: y, y2: y, stroke: "#e4e7ee"}),
                  svg("text", {x: pad.l - 4, y: y + 4, "text-anchor": "end", text: String(t)}));
    }
    bars.forEach((b, i) => {
      let base = h - pad.b;
      b.parts.forEach((v, j) => {
        const hh = Y(v);
        const r = svg("rect", {x: pad.l + i * bw + bw * 0.15, y: base - hh, width: Math.max(1, bw * 0.7), height: hh,
                               fill: colors[j], class: "bar"});
        r.append(svg("title", {text: `${b.label}: ${v}`}));
        root.append(r);
        base -= hh;
      });
      if (bars.length <= 12 || i % Math.ceil(bars.length / 12) === 0)
        root.append(svg("text", {x: pad.l + (i + 0.5) * bw, y: h - pad.b + 14, "text-anchor": "middle", text: b.label}));
    });
    if (title) root.append(svg("text", {x: pad.l, y: 12, text: title}));
    return root;
  }

  function table(headers, rows) {
    return el("div", {class: "table-wrap"},
      el("table", {}, el("thead", {}, el("tr", {}, ...headers.map((h) => el("th", {scope: "col", text: h})))),
         el("tbody", {}, ...rows.map((r) => el("tr", {}, ...r.map((c) => el("td", {}, c instanceof Node ? c : String(c ?? "\u2013"))))))));
  }

  return {el, svg, $, keys, api, request, failure, ApiFailure, showError, keyField, fmt, COLORS, legend,
          lineChart, barChart, table};
})();
