"""GRPO rollouts through the engine (muse.posttrain.rollout) vs plain generate, one sample at a time.

The workload of one GRPO step: P prompts x G samples x N new tokens, temperature 1, from a checkpoint.
  engine   `Rollouts.generate(prompts, n=G, seeds=...)`: every group submitted at once, continuous
           batching, the G samples of a prompt sharing its KV blocks;
  plain    muse.infer.generate (contiguous KV cache), the same P x G samples one after another.
Both ignore eos by default (every sample generates exactly N tokens: the same work on both sides;
--stop-at-eos lets samples end early, then only tokens/s compare). Also timed: the synced-copy
path (`copy_weights=True`, what FSDP runs) and its `weights_changed()` (state dict + copy), against
the shared path's (a prefix-cache reset). Prompts are few-shot prompts of a built-in task. With
--repeats R the three paths run R times, interleaved, and each reports its fastest run.

Prints one JSON line on stdout and a small table on stderr.

  python bench/grpo_rollout.py /tmp/sr/base/step_000320 --prompts 16 --group 8 --new-tokens 64 --threads 2
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

import torch  # noqa: E402

import muse.tasks as tasks  # noqa: E402
from muse.checkpoint import load  # noqa: E402
from muse.infer.generate import generate  # noqa: E402
from muse.posttrain.rollout import Rollouts  # noqa: E402
from muse.tokenizer.text import prompt_ids  # noqa: E402


def task_prompts(tok, task_name: str, count: int, max_tokens: int) -> list[list[int]]:
    """`count` few-shot prompts of a built-in task, each cut to its last max_tokens tokens."""
    task = tasks.get(task_name)
    out = []
    for sample in task.samples("test"):
        text = tasks.build_prompt(task, sample, tasks.fewshot_examples(task, sample))
        out.append(prompt_ids(tok, text)[-max_tokens:])
        if len(out) == count:
            return out
    raise SystemExit(f"task {task_name} has only {len(out)} test samples; ask for fewer --prompts")


def time_engine(model, prompts, args, *, copy: bool) -> dict:
    roll = Rollouts(model, max_prompt_tokens=args.max_prompt_tokens, max_new_tokens=args.new_tokens,
                    max_sequences=len(prompts) * args.group, eos_ids=args.eos, copy_weights=copy)
    # warm-up at the measured shape (the allocator's first growth to 128-row tensors is slow on CPU)
    roll.generate(prompts, n=args.group, seeds=[-1 - i for i in range(len(prompts))])
    roll.weights_changed()
    t0 = time.perf_counter()
    groups = roll.generate(prompts, n=args.group, seeds=list(range(len(prompts))))
    seconds = time.perf_counter() - t0
    syncs = []
    for _ in range(5):
        roll.weights_changed()
        syncs.append(roll.stats.sync_seconds)
    tokens = sum(len(c.token_ids) for g in groups for c in g)
    return {"seconds": seconds, "tokens": tokens, "tokens_per_s": tokens / seconds,
            "sync_seconds": sorted(syncs)[len(syncs) // 2]}


def time_plain(model, prompts, args) -> dict:
    generate(model, prompts[0], max_new_tokens=2, seed=0)  # warm-up
    t0 = time.perf_counter()
    tokens = 0
    for i, p in enumerate(prompts):
        for k in range(args.group):
            tokens += len(generate(model, p, max_new_tokens=args.new_tokens, temperature=1.0,
                                   seed=i * args.group + k, stop_ids=args.eos))
    seconds = time.perf_counter() - t0
    return {"seconds": seconds, "tokens": tokens, "tokens_per_s": tokens / seconds}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("checkpoint", help="checkpoint or run directory (e.g. /tmp/sr/base/step_000320)")
    ap.add_argument("--prompts", type=int, default=16)
    ap.add_argument("--group", type=int, default=8, help="samples per prompt (GRPO's G)")
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--max-prompt-tokens", type=int, default=128)
    ap.add_argument("--task", default="arithmetic_2digit")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=1, help="interleaved runs of each path; the fastest is reported")
    ap.add_argument("--stop-at-eos", action="store_true", help="end samples at the tokenizer's end-of-text")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    model, tok, meta = load(args.checkpoint, stages=("base", "sft"))
    model.train()  # as in a training loop: the rollouts must put it in eval mode and back
    args.eos = [tok.eot_id] if args.stop_at_eos else []
    prompts = task_prompts(tok, args.task, args.prompts, args.max_prompt_tokens)
    n_params = sum(p.numel() for p in model.parameters())

    runs = {"engine": [], "engine_copy": [], "plain": []}
    for _ in range(args.repeats):  # interleaved, so a change in the machine's load hits every path
        runs["engine"].append(time_engine(model, prompts, args, copy=False))
        runs["engine_copy"].append(time_engine(model, prompts, args, copy=True))
        runs["plain"].append(time_plain(model, prompts, args))
    engine, copy, plain = (min(runs[k], key=lambda r: r["seconds"]) for k in ("engine", "engine_copy", "plain"))
    assert model.training
    result = {
        "bench": "grpo_rollout", "checkpoint": str(meta["path"]), "params": n_params,
        "prompts": len(prompts), "group": args.group, "new_tokens": args.new_tokens,
        "prompt_tokens_mean": sum(map(len, prompts)) / len(prompts), "stop_at_eos": args.stop_at_eos,
        "threads": args.threads, "repeats": args.repeats, "load_avg_1m": os.getloadavg()[0], "torch": torch.__version__, "cpu": platform.processor() or platform.machine(),
        "engine": engine, "engine_copy": copy, "plain": plain,
        "speedup": engine["tokens_per_s"] / plain["tokens_per_s"],
        "copy_vs_shared": (copy["seconds"] + copy["sync_seconds"]) / (engine["seconds"] + engine["sync_seconds"]),
    }
    print(json.dumps(result))
    rows = [("engine (shared module)", engine), ("engine (synced copy)", copy), ("plain generate, 1 at a time", plain)]
    print(f"\n{len(prompts)} prompts x G={args.group} x {args.new_tokens} new tokens, {n_params / 1e6:.1f}M params, "
          f"{args.threads} threads", file=sys.stderr)
    print(f"| {'path':28} | seconds | tokens/s | vs plain | sync s |", file=sys.stderr)
    print(f"|{'-' * 30}|---------|----------|----------|--------|", file=sys.stderr)
    for name, r in rows:
        sync = f"{r['sync_seconds']:.4f}" if "sync_seconds" in r else "-"
        print(f"| {name:28} | {r['seconds']:7.2f} | {r['tokens_per_s']:8.0f} | "
              f"{r['tokens_per_s'] / plain['tokens_per_s']:7.2f}x | {sync:>6} |", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
