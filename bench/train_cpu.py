"""CPU training throughput: `muse train` vs a minimal plain-PyTorch GPT-2 training loop of the same shape.

The baseline (below, ~60 lines) is what one writes from the GPT-2 paper and nanoGPT: LayerNorm, learned
positions, GELU MLP, causal SDPA attention, tied embeddings, AdamW, fp32, random windows from the same
token shards. Muse runs as the real command (`muse train --json`), whose tokens/s counts training steps
only (evaluation and checkpointing excluded); the baseline is timed the same way (after warm-up steps).
Both use the same d_model, n_layer, heads, vocab, seq_len and batch, on the same machine, alternating
`--repeats` times so drift from other load hits both.

Warm-up is left out of both the same way: the baseline times the steps after its first `--warmup`;
Muse logs every `--warmup` steps (metrics.jsonl) and its tokens/s is taken over the windows after the
first, so compilation (`--muse-args=--compile`) is not in the throughput.
Its cost is printed separately: the first window's time minus `--warmup` steady steps. Each
`--muse-args` (repeatable) is one more Muse row, e.g. `--muse-args= --muse-args=--compile` (with `=`:
the value starts with a dash).

`--interleaved` measures differently, for a shared machine: one process, the baseline and every Muse
variant taking one step in turn (the order rotating by one row each round), medians of per-step times: CPU
time with one thread (`--threads 1`, the default: the time a thread waits for a core is left out), wall time
with more. Load from other jobs then hits every row alike.

  python bench/train_cpu.py --data runs/sp --depth 6 --steps 30 --repeats 3 [--muse-args="--dtype bfloat16"]
  python bench/train_cpu.py --data runs/sp --interleaved --steps 12 --muse-args= --muse-args=--compile

`--unfused` inside a variant's `--muse-args` (interleaved mode only; it is the bench's flag, not Muse's)
runs that row with q/k/v and gate/up as separate matmuls (muse.model.layers.project's fusion switched off
during its steps), so fused vs unfused projections compare in one process (Muse fuses under autocast);
`--fused` forces the fusion on (in fp32 too). The chunked cross-entropy is Muse's `--set loss_chunk=N`
(0 = the plain loss over the whole logits tensor):
  python bench/train_cpu.py --data runs/sp --interleaved --threads 2 "--muse-args=--dtype bfloat16" \
      "--muse-args=--dtype bfloat16 --unfused"
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]


class Block(nn.Module):
    def __init__(self, d, h):
        super().__init__()
        self.h = h
        self.ln1, self.ln2 = nn.LayerNorm(d), nn.LayerNorm(d)
        self.qkv, self.proj = nn.Linear(d, 3 * d), nn.Linear(d, d)
        self.fc, self.out = nn.Linear(d, 4 * d), nn.Linear(4 * d, d)

    def forward(self, x):
        B, T, C = x.shape
        q, k, v = self.qkv(self.ln1(x)).split(C, dim=2)
        q, k, v = (t.view(B, T, self.h, C // self.h).transpose(1, 2) for t in (q, k, v))
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True).transpose(1, 2).reshape(B, T, C)
        x = x + self.proj(y)
        return x + self.out(F.gelu(self.fc(self.ln2(x))))


class GPT2(nn.Module):
    def __init__(self, vocab, d, n_layer, h, T):
        super().__init__()
        self.wte, self.wpe = nn.Embedding(vocab, d), nn.Embedding(T, d)
        self.blocks = nn.ModuleList(Block(d, h) for _ in range(n_layer))
        self.ln_f = nn.LayerNorm(d)
        for p in self.parameters():
            if p.dim() > 1:
                nn.init.normal_(p, std=0.02)

    def forward(self, idx, targets):
        x = self.wte(idx) + self.wpe(torch.arange(idx.shape[1]))
        for b in self.blocks:
            x = b(x)
        logits = self.ln_f(x) @ self.wte.weight.T
        return F.cross_entropy(logits.view(-1, logits.size(-1)), targets.reshape(-1))


def baseline_stepper(data: Path, vocab: int, d: int, n_layer: int, h: int, T: int, B: int):
    """One training step of the baseline per call: random windows, forward, backward, clip, AdamW."""
    torch.manual_seed(0)
    tokens = np.memmap(data / "train_000.bin", dtype=np.uint16, mode="r")
    model = GPT2(vocab, d, n_layer, h, T)
    opt = torch.optim.AdamW(model.parameters(), lr=6e-4, betas=(0.9, 0.95), weight_decay=0.1)
    rng = np.random.default_rng(0)

    def step():
        starts = rng.integers(0, len(tokens) - T - 1, B)
        w = torch.from_numpy(np.stack([tokens[s:s + T + 1].astype(np.int64) for s in starts]))
        loss = model(w[:, :-1], w[:, 1:])
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)

    return step


def baseline_tokens_per_s(data: Path, vocab: int, d: int, n_layer: int, h: int, T: int, B: int, steps: int, warmup: int) -> float:
    step = baseline_stepper(data, vocab, d, n_layer, h, T, B)
    for _ in range(warmup):
        step()
    t0 = time.perf_counter()
    for _ in range(steps):
        step()
    return steps * B * T / (time.perf_counter() - t0)


def muse_tokens_per_s(data_run: Path, depth: int, T: int, B: int, steps: int, warmup: int,
                      extra: list[str]) -> tuple[float, float]:
    """(tokens/s over the steps after the first `warmup`, seconds of warm-up beyond `warmup` steady steps)."""
    with tempfile.TemporaryDirectory() as tmp:
        run = Path(tmp) / "run"
        run.mkdir()
        os.symlink((data_run / "data").resolve(), run / "data")
        cmd = [sys.executable, "-m", "muse", "train", str(run), "--depth", str(depth), "--seq-len", str(T),
               "--batch-size", str(B), "--max-steps", str(warmup + steps), "--eval-every", "0", "--save-every", "0",
               "--set", "eval_batches=1", "--set", f"log_every={warmup}", "--device", "cpu", "--json", *extra]
        subprocess.run(cmd, check=True, capture_output=True, text=True, env=dict(os.environ, MUSE_NO_PROGRESS="1"))
        rows = [json.loads(line) for line in (run / "base" / "metrics.jsonl").read_text().splitlines()]
    windows = [r for r in rows if "tokens_per_s" in r]  # one per `warmup` steps: (tokens so far, tokens/s)
    assert len(windows) == (warmup + steps) // warmup, windows
    step_tokens = B * T
    seconds = [warmup * step_tokens / w["tokens_per_s"] for w in windows]
    steady = (len(seconds) - 1) * warmup * step_tokens / sum(seconds[1:])
    return steady, seconds[0] - warmup * step_tokens / steady


def _trainer_stepper(trainer):
    step = 0

    def one():
        nonlocal step
        trainer._train_step(step)
        step += 1

    return one


BENCH_FLAGS = ("--unfused", "--fused")  # this script's own flags inside --muse-args (interleaved mode only)


def _with_fusion(step, fuse: bool):
    """`step` with q/k/v and gate/up always as one matmul each (`--fused`, also in fp32) or always as
    separate matmuls (`--unfused`, muse.model.layers.project's reference path)."""
    from muse.model import layers

    def one():
        decide = layers._fuse_projections
        layers._fuse_projections = lambda x, linears: fuse and torch.is_grad_enabled()
        try:
            step()
        finally:
            layers._fuse_projections = decide

    return one


def turn_order(names: list[str], i: int) -> list[str]:
    """Round i's order of the rows: rotated by i, so that over len(names) rounds every row takes every place
    once. A row's step time may depend on what ran just before it (caches, the allocator): a run in one fixed
    order once put a row 21% behind, and the gap did not come back with the rows reordered (BENCHMARKS.md 6)."""
    k = i % len(names)
    return names[k:] + names[:k]


def interleaved(args, variants: list[str], vocab: int, d: int, h: int) -> None:
    """--interleaved: the baseline and each Muse variant take one step in turn in this process (Muse
    through its TrainLoop's own step function, built from the same flags as `muse train`), so drifting load
    from other jobs slows no row more than another. With `--threads 1` (default) it times CPU time, which
    also leaves out the time the thread waits for a core; with more threads, wall time (CPU time would
    count the threads' spin-waits)."""
    from muse.cli import train as train_cli
    from muse.train.pretrain import pretraining_loop

    torch.set_num_threads(args.threads)
    clock = time.process_time if args.threads == 1 else time.perf_counter
    data = Path(args.data) / "data"
    steppers = {"plain PyTorch GPT-2 loop (baseline)": baseline_stepper(
        data, vocab, d, args.depth, h, args.seq_len, args.batch_size)}
    tmp = tempfile.TemporaryDirectory()
    parser = argparse.ArgumentParser()
    train_cli.add_arguments(parser)
    for i, v in enumerate(variants):
        run = Path(tmp.name) / f"run{i}"
        run.mkdir()
        os.symlink(data.resolve(), run / "data")
        words = shlex.split(v)
        flags = parser.parse_args([str(run), "--depth", str(args.depth), "--seq-len", str(args.seq_len),
                                   "--batch-size", str(args.batch_size), "--max-steps", str(args.warmup + args.steps),
                                   "--device", "cpu", *[w for w in words if w not in BENCH_FLAGS]])
        trainer = pretraining_loop(train_cli.load_train_config(flags), run)
        # what TrainLoop.train() does before its loop, without checkpoints, metrics or evaluation
        trainer._prepare()
        trainer.model.train()
        step = _trainer_stepper(trainer)
        for flag in BENCH_FLAGS:
            if flag in words:
                step = _with_fusion(step, fuse=flag == "--fused")
        steppers[f"muse train {v}"] = step
    times: dict[str, list[float]] = {k: [] for k in steppers}
    names = list(steppers)
    for i in range(args.warmup + args.steps):
        for name in turn_order(names, i):
            t0 = clock()
            steppers[name]()
            if i >= args.warmup:
                times[name].append(clock() - t0)
    tmp.cleanup()
    tokens = args.batch_size * args.seq_len
    base = statistics.median(next(iter(times.values())))
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    what = "CPU" if args.threads == 1 else "wall"
    print(f"interleaved, {args.threads} thread(s), {what} time per step (median of {args.steps} after {args.warmup} "
          f"warm-up); {os.cpu_count()} cpus, torch {torch.__version__}, load average (1 min) at the end {load:.1f}")
    print(f"| run | {what} s / step (median) | tokens/s ({what} time) | ratio |")
    print("|---|---:|---:|---:|")
    for name, ts in times.items():
        m = statistics.median(ts)
        print(f"| {name} | {m:.2f} | {tokens / m:,.0f} | {base / m:.2f}x |")


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", default="runs/sp", help="a run dir prepared by `muse prepare`")
    p.add_argument("--depth", type=int, default=6)
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--interleaved", action="store_true",
                   help="CPU time per step on one thread, all runs stepping in turn in this process (robust to load)")
    p.add_argument("--threads", type=int, default=1, help="torch threads in --interleaved mode (default 1)")
    p.add_argument("--muse-args", action="append", default=None,
                   help='extra flags for muse train, one Muse row each (repeatable), e.g. --muse-args=--compile')
    args = p.parse_args()
    variants = args.muse_args or [""]
    if not args.interleaved and any(f in shlex.split(v) for v in variants for f in BENCH_FLAGS):
        p.error("--unfused / --fused rows need --interleaved (they swap a function inside this process)")
    if args.steps % args.warmup:
        p.error("--steps must be a multiple of --warmup (Muse logs one window every --warmup steps)")
    sys.path.insert(0, str(ROOT / "src"))
    from muse.model import ModelConfig, count_params

    data = Path(args.data) / "data"
    meta = json.loads((data / "meta.json").read_text())
    vocab = meta["vocab_size"]
    cfg = ModelConfig.from_depth(args.depth, vocab, max_seq_len=args.seq_len)
    d, h = cfg.d_model, cfg.n_head
    if args.interleaved:
        return interleaved(args, variants, vocab, d, h)
    base, muse, warm = [], {v: [] for v in variants}, {v: [] for v in variants}
    for _ in range(args.repeats):
        base.append(baseline_tokens_per_s(data, vocab, d, args.depth, h, args.seq_len, args.batch_size, args.steps, args.warmup))
        for v in variants:
            tps, extra_s = muse_tokens_per_s(Path(args.data), args.depth, args.seq_len, args.batch_size, args.steps,
                                             args.warmup, shlex.split(v))
            muse[v].append(tps)
            warm[v].append(extra_s)
    gpt2_params = count_params(ModelConfig.from_depth(args.depth, vocab, arch="gpt2", max_seq_len=args.seq_len))
    b = statistics.median(base)
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    print(f"machine: {os.cpu_count()} cpus, torch {torch.__version__}, threads {torch.get_num_threads()}, "
          f"load average (1 min) at the end {load:.1f}")
    print(f"shape: depth {args.depth}, d_model {d}, heads {h}, vocab {vocab}, seq {args.seq_len}, batch {args.batch_size}; "
          f"params muse {count_params(cfg):,} / gpt2 {gpt2_params:,}; {args.steps} timed steps after {args.warmup} warm-up")
    print("| run | tokens/s (median) | all | ratio | warm-up beyond steady steps, s (median) |")
    print("|---|---:|---|---:|---:|")
    print(f"| plain PyTorch GPT-2 loop (baseline) | {b:,.0f} | {', '.join(f'{x:,.0f}' for x in base)} | 1.00x | |")
    for v in variants:
        m = statistics.median(muse[v])
        print(f"| muse train {v} | {m:,.0f} | {', '.join(f'{x:,.0f}' for x in muse[v])} | {m / b:.2f}x "
              f"| {statistics.median(warm[v]):.1f} |")
        assert math.isfinite(m / b)


if __name__ == "__main__":
    main()
