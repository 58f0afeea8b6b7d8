"""Screenshots of every web page at desktop (1280 px) and phone (390 px) widths, for docs/web.md and the
README: `make screenshots` (writes docs/img/web-<page>-<desktop|phone>.png; the tests never do).

Everything is made up and temporary: a random model served by the real app (bench/web_ttft.py's
`build_server`), a few partners' keys and requests in a throw-away database, and two synthetic run
directories for the dashboard. Drives the system's Chromium through Playwright.

  python bench/web_screenshots.py --out docs/img
"""

from __future__ import annotations

import argparse
import json
import math
import random
import shutil
import tempfile
import threading
import time
from pathlib import Path

import httpx
import uvicorn

from web_ttft import build_server

VIEWPORTS = {"desktop": {"width": 1280, "height": 900}, "phone": {"width": 390, "height": 844}}
ADMIN = "a" * 32   # build_server's admin key


def synthetic_run(root: Path, name: str, scale: float, seed: int) -> Path:
    rng = random.Random(seed)
    run = root / name
    (run / "base").mkdir(parents=True)
    rows = []
    for s in range(0, 400, 2):
        rows.append({"step": s, "loss": 2.2 + scale * 6 * math.exp(-s / 60) + rng.gauss(0, 0.04), "lr": 6e-4,
                     "tokens_per_s": 41_000 + rng.gauss(0, 800), "mfu": 0.38 + rng.gauss(0, 0.01)})
        if s % 40 == 0:
            rows.append({"step": s, "val_bpb": 1.0 + scale * 2.2 * math.exp(-s / 70)})
    (run / "base" / "metrics.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    (run / "sft").mkdir()
    (run / "sft" / "metrics.jsonl").write_text("\n".join(
        json.dumps({"step": s, "loss": 1.6 * scale + 0.9 * math.exp(-s / 15) + rng.gauss(0, 0.03)}) for s in range(60)))
    (run / "eval" / "samples" / name).mkdir(parents=True)
    results = {"schema_version": 1, "models": {name: {"kind": "muse"}},
               "tasks": {"arithmetic": {"primary": "accuracy", "chance": 0.0},
                         "tinystories-bpb": {"primary": "bpb", "chance": None}},
               "results": {"arithmetic": {name: {"status": "ok", "metrics": {"accuracy": {"value": 0.62 / scale, "stderr": 0.03}}}},
                           "tinystories-bpb": {name: {"status": "ok", "metrics": {"bpb": {"value": 1.1 * scale, "stderr": 0.01}}}}}}
    (run / "eval" / "results.json").write_text(json.dumps(results))
    (run / "eval" / "samples" / name / "arithmetic.jsonl").write_text("\n".join(
        json.dumps({"id": i, "prompt": f"{i} + {i + 3} =", "output": f" {2 * i + 3}", "score": 1.0}) for i in range(5)))
    (run / "report.md").write_text(f"# Speedrun {name}\n\nTrained on the embedded corpus.\n\n"
                                   "| stage | steps | final loss |\n|---|---:|---:|\n"
                                   f"| base | 400 | {2.2 + scale * 0.01:.2f} |\n| sft | 60 | {1.6 * scale:.2f} |\n")
    return run


def start(app) -> tuple[uvicorn.Server, threading.Thread, str]:
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=0, log_level="warning", access_log=False))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    while not server.started:
        time.sleep(0.01)
    return server, thread, f"http://127.0.0.1:{server.servers[0].sockets[0].getsockname()[1]}"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default="docs/img")
    ap.add_argument("--chromium", default=shutil.which("chromium") or "/usr/bin/chromium")
    args = ap.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)

    from playwright.sync_api import sync_playwright

    from muse.server.rundata import read_runs
    from muse.server.ui import dashboard_app

    tmp = Path(tempfile.mkdtemp(prefix="web_shots_"))
    server, thread, store, url, key = build_server(2, 128, tmp / "serve.sqlite3")
    dash, dash_thread, dash_url = start(dashboard_app(read_runs([synthetic_run(tmp, "d12", 1.0, 0),
                                                                 synthetic_run(tmp, "d16", 0.9, 1)])))
    try:
        store.update_key(store.authenticate(key).key_id, rpm=60, tpm=20_000, token_quota=50_000, period="day")
        others = [store.create_key(p, rpm=120)[0] for p in ("globex", "initech")]
        with httpx.Client(timeout=60) as client:
            for i, k in enumerate([key] * 6 + others * 3):
                client.post(url + "/v1/chat/completions", headers={"Authorization": f"Bearer {k}"},
                            json={"model": "bench", "messages": [{"role": "user", "content": f"hello {i}"}],
                                  "max_tokens": 8 + 4 * i, "seed": i})
        store.flush()
        with sync_playwright() as pw:
            browser = pw.chromium.launch(executable_path=args.chromium, args=["--no-sandbox", "--disable-gpu"])
            for vp_name, vp in VIEWPORTS.items():
                page = browser.new_context(viewport=vp).new_page()
                page.goto(url + "/ui/")
                page.fill("#key", key)
                page.click("#key-save")
                page.wait_for_selector("#model option", state="attached")
                page.fill("#system", "You are a terse bard.")
                page.fill("#max_tokens", "24")
                page.fill("#seed", "3")
                page.fill("#prompt", "Sing of the river and the crown.")
                page.click("#send")
                page.wait_for_selector("#status[data-done]", state="attached")
                page.hover("#output .tok >> nth=2")
                page.screenshot(path=str(out / f"web-playground-{vp_name}.png"), full_page=True)
                page.goto(url + "/ui/partner.html")
                page.wait_for_selector("body[data-loaded]")
                page.screenshot(path=str(out / f"web-partner-{vp_name}.png"), full_page=True)
                page.goto(url + "/ui/operator.html")
                page.fill("#key", ADMIN)
                page.click("#key-save")
                page.wait_for_selector("#engine table")
                page.wait_for_timeout(3500)           # one refresh, so tokens/s has two samples
                page.screenshot(path=str(out / f"web-operator-{vp_name}.png"), full_page=True)
                page.goto(dash_url + "/ui/")
                page.wait_for_selector("body[data-loaded]")
                page.screenshot(path=str(out / f"web-dashboard-{vp_name}.png"), full_page=True)
                page.context.close()
            browser.close()
    finally:
        for s, t in ((server, thread), (dash, dash_thread)):
            s.should_exit = True
            t.join(10)
        store.close()
        shutil.rmtree(tmp, ignore_errors=True)
    print("\n".join(sorted(str(p) for p in out.glob("web-*.png"))))


if __name__ == "__main__":
    main()
