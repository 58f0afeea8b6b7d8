"""Attention of one engine step, per backend: the step's KV-cache object built from its spans (the plan),
then `attend` for every layer, on random queries over a random pool. No model, no sampling.

Shapes (defaults): 4 layers, 4 heads of 64 (k/v heads --kv-heads), block size 16, float32. Two steps:
  batch1   one decode at a --batch1-context token context;
  decodes  --decodes decodes of --context LO HI tokens (uniform, seeded).
Every sequence's blocks are adjacent and the sequences lie one after another in the pool, in random
order (what BlockPool's placement mostly gives; --scatter shuffles every block instead).
Each backend is timed --repeats times per step, alternating backends, and the median is reported; its
first call is timed apart ("first": for "flex" that includes torch.compile of every graph it needs).
Outputs are checked against "paged-reference" (max abs difference).

  python bench/attention_step.py --threads 1
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

import torch  # noqa: E402

from muse.infer.paged_cache import PagedKVPool, SeqSpan  # noqa: E402
from muse.infer.seq_attention import make_step  # noqa: E402


def spans_for(contexts: list[int], bs: int, num_blocks: int, rng: random.Random, scatter: bool) -> list[SeqSpan]:
    need = [-(-c // bs) for c in contexts]
    ids = list(range(num_blocks))
    if scatter:
        rng.shuffle(ids)
    order = list(range(len(contexts)))
    rng.shuffle(order)
    tables: list[list[int]] = [[] for _ in contexts]
    nxt = 0
    for i in order:
        tables[i] = ids[nxt:nxt + need[i]]
        nxt += need[i]
    return [SeqSpan(c - 1, 1, t) for c, t in zip(contexts, tables)]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--backends", nargs="+", default=["paged-reference", "paged-contiguous", "flex"])
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--kv-heads", type=int, default=4)
    p.add_argument("--head-dim", type=int, default=64)
    p.add_argument("--block-size", type=int, default=16)
    p.add_argument("--batch1-context", type=int, default=150)
    p.add_argument("--decodes", type=int, default=32)
    p.add_argument("--context", type=int, nargs=2, default=[30, 230])
    p.add_argument("--scatter", action="store_true", help="every block of the pool shuffled")
    p.add_argument("--repeats", type=int, default=200)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    rng = random.Random(args.seed)
    bs, L, H, Hkv, D = args.block_size, args.layers, args.heads, args.kv_heads, args.head_dim
    steps = {"batch1": [args.batch1_context],
             "decodes": [rng.randint(*args.context) for _ in range(args.decodes)]}
    num_blocks = sum(-(-c // bs) for c in steps["decodes"]) + 64
    torch.manual_seed(args.seed)
    pools = {b: PagedKVPool(L, num_blocks, bs, Hkv, D) for b in args.backends}
    k0, v0 = torch.randn_like(pools[args.backends[0]].k), torch.randn_like(pools[args.backends[0]].v)
    rows = []
    for name, contexts in steps.items():
        spans = spans_for(contexts, bs, num_blocks, rng, args.scatter)
        N = len(spans)
        q = [torch.randn(1, N, H, D).transpose(1, 2) for _ in range(L)]  # as the model makes them
        k = [torch.randn(1, N, Hkv, D).transpose(1, 2) for _ in range(L)]
        v = [torch.randn(1, N, Hkv, D).transpose(1, 2) for _ in range(L)]
        for pool in pools.values():
            pool.k.copy_(k0)
            pool.v.copy_(v0)

        def one(b, spans=spans, q=q, k=k, v=v):
            step = make_step(b, pools[b], spans, n_rep=H // Hkv)
            return [step.attend(i, q[i], k[i], v[i]) for i in range(L)]

        times = {b: [] for b in args.backends}
        first, outs = {}, {}
        with torch.inference_mode():
            for b in args.backends:
                t0 = time.perf_counter()
                outs[b] = one(b)
                first[b] = time.perf_counter() - t0
            for _ in range(args.repeats):
                for b in args.backends:
                    t0 = time.perf_counter()
                    one(b)
                    times[b].append(time.perf_counter() - t0)
        ref = outs.get("paged-reference", outs[args.backends[0]])
        for b in args.backends:
            err = max((x - y).abs().max().item() for x, y in zip(outs[b], ref))
            rows.append({"step": name, "sequences": N, "contexts": f"{min(contexts)}-{max(contexts)}", "backend": b,
                         "median_ms": 1e3 * statistics.median(times[b]), "first_ms": 1e3 * first[b],
                         "max_abs_diff": err})
    print("| step | backend | median ms | first call ms | max abs diff vs reference |\n|---|---|---:|---:|---:|")
    for r in rows:
        print(f"| {r['step']} ({r['sequences']} x {r['contexts']}) | {r['backend']} | {r['median_ms']:.3f} "
              f"| {r['first_ms']:.0f} | {r['max_abs_diff']:.1e} |")
    print(json.dumps(rows), file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
