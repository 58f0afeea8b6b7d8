"""KV block placement vs plain LRU allocation: adjacency of the blocks decodes read, and the forward time.

`BlockPool.allocate` places a request's new blocks next to its last one where LRU order allows
(muse/infer/kv_blocks.py, "Placement"). This script measures what that buys, side by side in one run:

  1. The scheduler alone replays bench/engine.py's uniform workload (prompts of 16-256 random tokens,
     16-256 output tokens, --concurrency running at once, block size 16) twice: once as it is, once
     with the placement hints dropped (`allocate(n)`: blocks from the LRU end of the free queue, which
     is exactly the allocator before placement). It records every step's SchedulerOutput and reports
     the share of the table neighbours each step reads that are adjacent in the pool, and how many
     cached blocks each run evicted.
  2. Both recorded runs are executed through a ModelRunner on the same random model (depth 4,
     d_model 256 by default), step i of one then step i of the other (alternating which goes first),
     --repeats times. Forward time is summed per allocator; the ratio is the speed-up.

Sampled tokens are random (seeded) rather than the model's: the step plans, not the text, are what
the timing depends on.

  python bench/kv_placement.py --threads 1
"""

from __future__ import annotations

import argparse
import contextlib
import random
import sys
import time
from pathlib import Path
from unittest import mock

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

import torch  # noqa: E402

from muse.infer.kv_blocks import BlockPool  # noqa: E402
from muse.infer.request import Request  # noqa: E402
from muse.infer.runner import ModelRunner  # noqa: E402
from muse.infer.sampling_params import SamplingParams  # noqa: E402
from muse.infer.scheduler import RunnerOutput, Scheduler, SchedulerConfig  # noqa: E402
from muse.model import ModelConfig, build_model  # noqa: E402

BLOCK = 16


def record(args, placement: bool) -> dict:
    """Schedule the workload to the end; the steps, adjacency of the tables read and evictions."""
    rng = random.Random(args.seed)
    prompts = [[rng.randrange(16, args.vocab_size) for _ in range(rng.randint(16, 256))] for _ in range(args.requests)]
    max_tokens = [rng.randint(16, 256) for _ in range(args.requests)]
    longest = max(len(p) + m for p, m in zip(prompts, max_tokens))
    num_blocks = max(args.concurrency * longest, 2048) // BLOCK + 64  # as bench/engine.py sizes its pool
    sched = Scheduler(SchedulerConfig(num_blocks=num_blocks, block_size=BLOCK, max_num_seqs=args.concurrency,
                                      max_num_batched_tokens=2048, max_model_len=2048))
    for i, (p, m) in enumerate(zip(prompts, max_tokens)):
        sched.add_request(Request(str(i), p, SamplingParams(max_tokens=m, temperature=0, ignore_eos=True)))
    allocate = BlockPool.allocate
    plain = mock.patch.object(BlockPool, "allocate", lambda self, n, after=None, room=0: allocate(self, n))
    steps, pairs, adjacent = [], 0, 0
    with contextlib.nullcontext() if placement else plain:
        while sched.has_unfinished_requests():
            so = sched.schedule()
            ro = RunnerOutput()
            for r in so.requests:
                if r.sample:
                    ro.sampled_token_ids[r.request_id] = [rng.randrange(16, args.vocab_size)]
                table = r.block_ids[:-(-(r.start_pos + len(r.token_ids)) // BLOCK)]
                pairs += len(table) - 1
                adjacent += sum(b == a + 1 for a, b in zip(table, table[1:]))
            sched.update_from_output(so, ro)
            steps.append(so)
    sched.check_invariants()
    return {"steps": steps, "num_blocks": num_blocks, "adjacent": adjacent / max(pairs, 1),
            "evictions": sched.kv.pool.num_evictions}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--concurrency", type=int, default=32)
    p.add_argument("--requests", type=int, default=128, help="requests in the workload (bench/engine.py: 4 x C)")
    p.add_argument("--depth", type=int, default=4)
    p.add_argument("--d-model", type=int, default=256)
    p.add_argument("--vocab-size", type=int, default=4096)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    runs = {"LRU (no placement)": record(args, placement=False), "placement": record(args, placement=True)}
    torch.manual_seed(0)
    cfg = ModelConfig.from_depth(args.depth, args.vocab_size, d_model=args.d_model, max_seq_len=2048)
    model = build_model(cfg).eval()
    n = min(len(r["steps"]) for r in runs.values())
    names = list(runs)
    speedups = []
    for _ in range(args.repeats):
        runners = {k: ModelRunner(model, num_blocks=r["num_blocks"], block_size=BLOCK, max_model_len=2048)
                   for k, r in runs.items()}
        total = dict.fromkeys(names, 0.0)
        for i in range(n):
            for k in (names if i % 2 == 0 else names[::-1]):
                t0 = time.perf_counter()
                runners[k].execute(runs[k]["steps"][i])
                total[k] += time.perf_counter() - t0
        speedups.append(total[names[0]] / total[names[1]])
    print(f"concurrency {args.concurrency}, {args.requests} requests, {n} steps replayed; model depth {args.depth}, "
          f"d_model {args.d_model}; torch {torch.__version__}, {torch.get_num_threads()} threads")
    print("| allocator | adjacent table neighbours read | cached blocks evicted |")
    print("|---|---:|---:|")
    for k, r in runs.items():
        print(f"| {k} | {r['adjacent']:.0%} | {r['evictions']} |")
    print(f"forward speed-up of placement over LRU, per repeat: {', '.join(f'{s:.3f}x' for s in speedups)} "
          f"(median {sorted(speedups)[len(speedups) // 2]:.3f}x)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
