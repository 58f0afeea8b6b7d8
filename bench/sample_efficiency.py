"""Sample efficiency on the embedded corpus: tokens Muse's default (Llama-style + Muon) needs to reach the
final val loss of the `gpt2` variant trained with AdamW for the same budget.

Every run is the real `muse train` command on the same prepared data, same shape knob (--depth), same
sequence length, batch and token budget. The baseline gets a small learning-rate sweep (its best final val
loss is the target, so the baseline is not handicapped by one untuned lr). Muse's run evaluates every
`--eval-every` steps; the tokens at which its val loss first reaches the target are interpolated linearly
between evaluations. This reads Muse's curve *before* its schedule's final decay, which makes the ratio
conservative (a run with the shorter budget would decay earlier and reach the target sooner).

  python bench/sample_efficiency.py --data runs/sp --depth 3 --steps 150
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def train(data_run: Path, extra: list[str], args) -> tuple[list[dict], dict, float]:
    with tempfile.TemporaryDirectory() as tmp:
        run = Path(tmp) / "run"
        run.mkdir()
        os.symlink((data_run / "data").resolve(), run / "data")
        cmd = [sys.executable, "-m", "muse", "train", str(run), "--depth", str(args.depth), "--seq-len", str(args.seq_len),
               "--batch-size", str(args.batch_size), "--max-steps", str(args.steps), "--eval-every", str(args.eval_every),
               "--save-every", "0", "--set", f"eval_batches={args.eval_batches}", "--set", "tensorboard=false",
               "--set", "plot=false", "--device", args.device, "--json", *extra]
        t0 = time.perf_counter()
        out = subprocess.run(cmd, check=True, capture_output=True, text=True, env=dict(os.environ, MUSE_NO_PROGRESS="1"))
        wall = time.perf_counter() - t0
        rows = [json.loads(line) for line in (run / "base" / "metrics.jsonl").read_text().splitlines()]
        return [r for r in rows if "val_loss" in r], json.loads(out.stdout.strip().splitlines()[-1]), wall


def tokens_to_reach(curve: list[dict], target: float) -> float | None:
    prev = None
    for r in curve:
        if r["val_loss"] <= target:
            if prev is None:
                return float(r["tokens"])
            (t0, l0), (t1, l1) = (prev["tokens"], prev["val_loss"]), (r["tokens"], r["val_loss"])
            return t0 + (l0 - target) / (l0 - l1) * (t1 - t0)
        prev = r
    return None


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", default="runs/sp")
    p.add_argument("--depth", type=int, default=3)
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--steps", type=int, default=150)
    p.add_argument("--eval-every", type=int, default=10)
    p.add_argument("--eval-batches", type=int, default=4)
    p.add_argument("--baseline-lrs", default="6e-4,1.5e-3,3e-3")
    p.add_argument("--device", default="cpu")
    args = p.parse_args()
    data = Path(args.data)
    base = []
    for lr in args.baseline_lrs.split(","):
        curve, res, wall = train(data, ["--arch", "gpt2", "--optimizer", "adamw", "--set", f"optim.lr={lr}"], args)
        base.append((curve[-1]["val_loss"], lr, curve, res, wall))
        print(f"gpt2+adamw lr {lr}: final val loss {curve[-1]['val_loss']:.4f} ({wall:.0f}s)", flush=True)
    target, best_lr, bcurve, bres, _ = min(base)
    curve, res, wall = train(data, [], args)
    print(f"llama+muon (defaults): final val loss {curve[-1]['val_loss']:.4f} ({wall:.0f}s)", flush=True)
    budget = bcurve[-1]["tokens"]
    reach = tokens_to_reach(curve, target)
    print(f"\nshape: depth {args.depth}, seq {args.seq_len}, batch {args.batch_size}, {args.steps} steps = {budget:,} tokens; "
          f"params gpt2 {bres['params']:,} / llama {res['params']:,}")
    print("| run | final val loss | val bpb | tokens to reach the baseline's final val loss |")
    print("|---|---|---|---|")
    print(f"| gpt2 + AdamW (best lr {best_lr}) | {target:.4f} | {bcurve[-1]['val_bpb']:.4f} | {budget:,} (its budget) |")
    reach_s = f"{reach:,.0f} ({reach / budget:.2f}x)" if reach else "not reached"
    print(f"| llama + Muon (Muse default) | {curve[-1]['val_loss']:.4f} | {curve[-1]['val_bpb']:.4f} | {reach_s} |")


if __name__ == "__main__":
    main()
