"""What the playground adds to the API's time to first token (goal: <= 50 ms, issue 16).

One process: a random llama (--depth/--width, a BPE tokenizer trained on made-up words) served by the
real app (`create_app`, uvicorn in a thread on loopback), and the system's headless Chromium (driven
by Playwright) on /ui/. Each round sends the same chat request twice, one after the other:

  api         httpx streams POST /v1/chat/completions itself: TTFT = request sent -> first SSE chunk
              with content (the client's view of the API, as bench/serve_load.py measures it);
  playground  the page sends it (Send clicked; its body is captured once and reused for `api`, so
              both ask for exactly the same thing: logprobs, top 5, seed, stream_options): TTFT =
              the click handler starting -> the first token appended to the page (performance.now()
              in the page: building the body, fetch, reading the stream, parsing SSE and JSON, DOM).

Rounds alternate which goes first; --warmup rounds are dropped. Reported: median and p90 of each, and
the median of the per-round difference (playground - api), which is what the page adds.

  python bench/web_ttft.py                   # 40 rounds, depth 4, width 256
  python bench/web_ttft.py --rounds 100 --depth 8 --width 512
"""

from __future__ import annotations

import argparse
import json
import random
import shutil
import statistics
import tempfile
import threading
import time
from pathlib import Path

import httpx
import torch
import uvicorn


def build_server(depth: int, width: int, db: Path):
    from muse.infer.engine import Engine, EngineConfig
    from muse.model import ModelConfig, build_model
    from muse.server.app import ServedModel, ServerConfig, create_app
    from muse.server.store import Store
    from muse.tokenizer import train_bpe

    rng = random.Random(0)
    words = "the king queen lord lady love night day sword crown heart river stone".split()
    tok = train_bpe([" ".join(rng.choice(words) for _ in range(60)) for _ in range(40)], vocab_size=320)
    torch.manual_seed(0)
    model = build_model(ModelConfig(vocab_size=tok.vocab_size, n_layer=depth, d_model=width, n_head=width // 64,
                                    n_kv_head=max(1, width // 128), max_seq_len=512)).eval()
    engine = Engine(model, EngineConfig(block_size=16, num_blocks=256, max_num_seqs=8), tokenizer=tok)
    store = Store(db)
    key, _ = store.create_key("bench")
    app = create_app([ServedModel.from_engine("bench", engine)], store, ServerConfig(admin_key="a" * 32))
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=0, log_level="warning", access_log=False))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    while not server.started:
        time.sleep(0.01)
    url = f"http://127.0.0.1:{server.servers[0].sockets[0].getsockname()[1]}"
    return server, thread, store, url, key


def api_ttft(client: httpx.Client, url: str, key: str, body: dict) -> float:
    t0 = time.perf_counter()
    first = None
    with client.stream("POST", url + "/v1/chat/completions", json=body,
                       headers={"Authorization": f"Bearer {key}"}) as resp:
        resp.raise_for_status()
        for line in resp.iter_lines():
            if first is None and line.startswith("data: {"):
                chunk = json.loads(line[6:])
                if chunk.get("choices") and chunk["choices"][0]["delta"].get("content"):
                    first = time.perf_counter() - t0
    assert first is not None, "the stream had no content"
    return first * 1000


def page_ttft(page) -> float:
    page.click("#clear")
    page.evaluate("delete document.querySelector('#status').dataset.done; "
                  "delete document.querySelector('#status').dataset.ttftMs")
    page.fill("#prompt", "Speak, friend, and enter.")
    page.click("#send")
    page.wait_for_selector("#status[data-done]", state="attached")
    value = page.get_attribute("#status", "data-ttft-ms")
    assert value is not None, page.inner_text("#error")
    return float(value)


def pct(xs, q):
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(q * len(xs)))]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rounds", type=int, default=40)
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--depth", type=int, default=4)
    ap.add_argument("--width", type=int, default=256)
    ap.add_argument("--max-tokens", type=int, default=16)
    ap.add_argument("--threads", type=int, default=1, help="torch threads (the machine is shared)")
    ap.add_argument("--chromium", default=shutil.which("chromium") or "/usr/bin/chromium")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    from playwright.sync_api import sync_playwright

    tmp = Path(tempfile.mkdtemp(prefix="web_ttft_"))
    server, thread, store, url, key = build_server(args.depth, args.width, tmp / "serve.sqlite3")
    bodies: list[dict] = []
    try:
        with sync_playwright() as pw:
            browser = pw.chromium.launch(executable_path=args.chromium, args=["--no-sandbox", "--disable-gpu"])
            page = browser.new_page()
            page.on("request", lambda r: r.url.endswith("/v1/chat/completions") and bodies.append(json.loads(r.post_data)))
            page.goto(url + "/ui/")
            page.fill("#key", key)
            page.click("#key-save")
            page.wait_for_selector("#model option", state="attached")
            page.fill("#max_tokens", str(args.max_tokens))
            page.fill("#seed", "1")
            page_ttft(page)                   # captures the page's exact request body
            body = bodies[0]
            api, web = [], []
            with httpx.Client(timeout=60) as client:
                for i in range(args.warmup + args.rounds):
                    pair = (api_ttft(client, url, key, body), page_ttft(page)) if i % 2 == 0 else \
                           tuple(reversed((page_ttft(page), api_ttft(client, url, key, body))))
                    if i >= args.warmup:
                        api.append(pair[0])
                        web.append(pair[1])
            browser.close()
    finally:
        server.should_exit = True
        thread.join(10)
        store.close()
        shutil.rmtree(tmp, ignore_errors=True)

    diff = [w - a for a, w in zip(api, web)]
    print(f"model: depth {args.depth}, width {args.width}; {args.rounds} rounds (+{args.warmup} warm-up), "
          f"max_tokens {args.max_tokens}, request body {json.dumps(body)[:160]}...")
    print("| | median ms | p90 ms |\n|---|---:|---:|")
    print(f"| API TTFT (httpx, streamed) | {statistics.median(api):.1f} | {pct(api, 0.9):.1f} |")
    print(f"| playground TTFT (click -> first token in the page) | {statistics.median(web):.1f} | {pct(web, 0.9):.1f} |")
    print(f"| playground - API, per round | {statistics.median(diff):.1f} | {pct(diff, 0.9):.1f} |")
    verdict = "meets" if statistics.median(diff) <= 50 else "MISSES"
    print(f"goal <= 50 ms added: {verdict} (median {statistics.median(diff):.1f} ms)")


if __name__ == "__main__":
    main()
