// The run dashboard (`muse dashboard RUN_DIR ...`): metrics.jsonl curves per stage with every run
// overlaid, throughput and MFU, `muse eval` results with a per-sample viewer, and the speedrun's
// report.md shown as text (headings, tables and code kept apart; nothing is parsed as HTML).
"use strict";

(() => {
  const {el, $, api, showError, fmt, COLORS, lineChart, legend, table} = Muse;
  const PREFERRED = ["loss", "val_bpb", "val_loss", "tokens_per_s", "mfu", "lr"];
  let runs = [];

  function metricNames() {
    const names = new Set();
    for (const r of runs) for (const rows of Object.values(r.stages)) for (const row of rows) for (const k of Object.keys(row)) if (k !== "step") names.add(k);
    return [...PREFERRED.filter((n) => names.has(n)), ...[...names].filter((n) => !PREFERRED.includes(n)).sort()];
  }

  function drawCharts() {
    const metric = $("#metric").value;
    const stages = [...new Set(runs.flatMap((r) => Object.keys(r.stages)))];
    $("#charts").replaceChildren(...stages.map((stage) => {
      const series = runs.map((r, i) => ({name: r.name, color: COLORS[i % COLORS.length],
        points: (r.stages[stage] || []).filter((row) => row[metric] !== undefined).map((row) => [row.step, row[metric]])}))
        .filter((s) => s.points.length);
      if (!series.length) return null;
      return el("div", {class: "stage-chart", "data-stage": stage},
        el("h3", {text: `${stage}: ${metric}`}), lineChart(series, {title: metric}),
        legend(series.map((s) => [s.name, s.color])));
    }).filter(Boolean));
  }

  function median(xs) {
    if (!xs.length) return null;
    const s = [...xs].sort((a, b) => a - b);
    return s[Math.floor(s.length / 2)];
  }

  function drawSpeed() {
    const rows = [];
    for (const r of runs) for (const [stage, data] of Object.entries(r.stages)) {
      const col = (k) => data.map((row) => row[k]).filter((v) => v !== undefined);
      const last = (k) => { const c = col(k); return c.length ? c[c.length - 1] : null; };
      rows.push([r.name, stage, fmt.int(last("step")), fmt.num(last("loss"), 4), fmt.num(col("val_bpb").length ? Math.min(...col("val_bpb")) : null, 4),
                 fmt.int(median(col("tokens_per_s"))), col("mfu").length ? fmt.pct(median(col("mfu"))) : "\u2013"]);
    }
    $("#speed").replaceChildren(table(["run", "stage", "last step", "last loss", "best val bpb", "median tokens/s", "median MFU"], rows));
  }

  function drawEval() {
    const parts = [];
    for (const r of runs) {
      if (!r.eval) continue;
      const ev = r.eval, models = Object.keys(ev.models || {});
      const rows = [];
      for (const [task, info] of Object.entries(ev.tasks || {})) {
        const m = info.primary;
        rows.push([task, m, ...models.map((name) => {
          const res = (ev.results[task] || {})[name];
          if (!res) return "\u2013";
          if (res.status !== "ok") return res.status;
          const v = (res.metrics || {})[m];
          return v && v.value !== null ? v.value.toFixed(3) + (v.stderr !== null && v.stderr !== undefined ? " \u00b1 " + v.stderr.toFixed(3) : "") : "\u2013";
        }), info.chance ?? "\u2013"]);
      }
      parts.push(el("h3", {text: r.name}), table(["task", "metric", ...models, "chance"], rows));
    }
    $("#eval").replaceChildren(...(parts.length ? parts : [el("p", {class: "muted", text: "No eval/results.json in these runs (run `muse eval`)."})]));
    const withSamples = runs.filter((r) => Object.keys(r.samples || {}).length);
    $("#s-run").replaceChildren(...withSamples.map((r) => el("option", {value: runs.indexOf(r), text: r.name})));
    fillSampleModels();
  }

  function fillSampleModels() {
    const r = runs[Number($("#s-run").value)];
    const samples = (r && r.samples) || {};
    $("#s-model").replaceChildren(...Object.keys(samples).map((m) => el("option", {value: m, text: m})));
    fillSampleTasks();
  }

  function fillSampleTasks() {
    const r = runs[Number($("#s-run").value)];
    const tasks = (r && r.samples[$("#s-model").value]) || {};
    $("#s-task").replaceChildren(...Object.keys(tasks).map((t) => el("option", {value: t, text: t})));
    drawSamples();
  }

  function drawSamples() {
    const r = runs[Number($("#s-run").value)];
    const recs = (r && (r.samples[$("#s-model").value] || {})[$("#s-task").value]) || [];
    $("#samples").replaceChildren(...recs.map((rec) => el("pre", {class: "mono sample", text: JSON.stringify(rec, null, 2)})));
  }

  // Markdown as text blocks: headings, code fences, tables and paragraphs; links and images stay text.
  function markdown(text) {
    const out = [];
    const lines = text.split("\n");
    for (let i = 0; i < lines.length; i++) {
      const line = lines[i];
      if (line.startsWith("```")) {
        const code = [];
        for (i++; i < lines.length && !lines[i].startsWith("```"); i++) code.push(lines[i]);
        out.push(el("pre", {class: "mono", text: code.join("\n")}));
      } else if (/^#{1,6} /.test(line)) {
        const level = Math.min(4, line.indexOf(" ") + 1);
        out.push(el("h" + level, {text: line.replace(/^#+ /, "")}));
      } else if (line.startsWith("|")) {
        const rows = [];
        for (; i < lines.length && lines[i].startsWith("|"); i++)
          if (!/^\|[\s:|-]+\|?\s*$/.test(lines[i])) rows.push(lines[i].replace(/^\||\|\s*$/g, "").split("|").map((c) => c.trim()));
        i--;
        if (rows.length) out.push(table(rows[0], rows.slice(1)));
      } else if (line.trim()) {
        out.push(el("p", {text: line}));
      }
    }
    return out;
  }

  function drawReports() {
    const parts = runs.filter((r) => r.report).flatMap((r) => [el("h3", {text: r.name}), ...markdown(r.report)]);
    $("#report").replaceChildren(...(parts.length ? parts : [el("p", {class: "muted", text: "No report.md in these runs (`muse speedrun` writes one)."})]));
  }

  // `muse dashboard` serves /ui/api/runs; under `muse serve`, the operator page links here with #served
  // and the served models' runs come from /admin/runs with the admin key of this tab.
  async function load() {
    const served = location.hash === "#served";
    try {
      ({data: runs} = served ? await api("/admin/runs", {key: Muse.keys.get("admin")}) : await api("/ui/api/runs"));
    } catch (e) { showError($("#error"), e); return; }
    const broken = runs.filter((r) => r.error);
    if (broken.length) showError($("#error"), new Error(broken.map((r) => `${r.name}: ${r.error}`).join("\n")));
    const names = metricNames();
    $("#metric").replaceChildren(...names.map((n) => el("option", {value: n, text: n})));
    $("#runs").textContent = runs.map((r) => r.name + (r.skipped_lines ? ` (${r.skipped_lines} unreadable lines skipped)` : "")).join(", ");
    drawCharts();
    drawSpeed();
    drawEval();
    drawReports();
    document.body.dataset.loaded = "1";
  }

  $("#metric").addEventListener("change", drawCharts);
  $("#s-run").addEventListener("change", fillSampleModels);
  $("#s-model").addEventListener("change", fillSampleTasks);
  $("#s-task").addEventListener("change", drawSamples);
  load();
})();
