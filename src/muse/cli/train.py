"""Pretrain a decoder on the shards `muse prepare` wrote into RUN_DIR/data.

The shape comes from one knob (--depth); any model field can be set with --set model.FIELD=value.
Settings resolve as defaults <- --config FILE.toml <- flags <- --set key=value, and the result is
written to RUN_DIR/base/train_config.json. Checkpoints go to RUN_DIR/base/step_*/ (latest -> newest).
"""

from __future__ import annotations

import argparse
import json
import sys

EXAMPLES = """examples:
  muse prepare --out runs/demo
  muse train runs/demo --depth 4 --max-steps 600
  muse train runs/demo --resume                       # continue after a crash or Ctrl-C
  muse train runs/demo --config my.toml --set optim.matrix_lr=0.03 --set model.n_kv_head=2
"""


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("run_dir", help="run directory holding data/ (from `muse prepare`)")
    p.add_argument("--config", help="TOML file of settings (same keys as --set)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override any setting, e.g. optim.matrix_lr=0.03 or model.n_kv_head=2 (repeatable)")
    p.add_argument("--depth", type=int, help="number of layers; width, heads and learning rates follow (default 4)")
    p.add_argument("--arch", choices=["llama", "gpt2"], help="llama (default) or the gpt2 baseline")
    p.add_argument("--seq-len", type=int, help="tokens per training sequence (default 256)")
    p.add_argument("--batch-size", type=int, help="sequences per micro-batch per process (default 16)")
    p.add_argument("--total-batch-tokens", type=int, help="tokens per optimizer step; gradient accumulation makes up the rest")
    p.add_argument("--max-steps", type=int, help="optimizer steps to train")
    p.add_argument("--train-tokens", type=int, help="tokens to train on (used when --max-steps is not set)")
    p.add_argument("--optimizer", dest="optim_name", choices=["muon", "adamw"], help="muon (default) or adamw")
    p.add_argument("--device", help="auto (default), cpu, cuda, cuda:1, mps, xpu, ...")
    p.add_argument("--seed", type=int)
    p.add_argument("--eval-every", type=int)
    p.add_argument("--save-every", type=int)
    p.add_argument("--compile", action="store_true", default=None, help="torch.compile the model")
    p.add_argument("--peak-flops", type=float, help="dense bf16 FLOP/s of an accelerator missing from the MFU table")
    p.add_argument("--resume", action="store_true", help="continue from RUN_DIR/base/latest exactly")
    p.add_argument("--force", action="store_true", help="start over even though checkpoints exist")
    p.add_argument("--json", action="store_true", help="print one JSON object with the result")


def run(args) -> int:
    from muse.train.config import load_config
    from muse.train.trainer import Trainer

    flags = {
        "depth": args.depth, "arch": args.arch, "seq_len": args.seq_len, "batch_size": args.batch_size,
        "total_batch_tokens": args.total_batch_tokens, "max_steps": args.max_steps,
        "train_tokens": args.train_tokens, "device": args.device, "seed": args.seed,
        "eval_every": args.eval_every, "save_every": args.save_every, "compile": args.compile,
        "peak_flops": args.peak_flops,
    }
    sets = list(args.set)
    if args.optim_name:
        sets.insert(0, f"optim.name={json.dumps(args.optim_name)}")
    cfg = load_config(args.config, flags, sets)
    if not cfg.max_steps and not cfg.train_tokens:
        cfg.max_steps = 600
    result = Trainer(cfg, args.run_dir, resume=args.resume, force=args.force).train()
    summary = {
        "checkpoint": str(result.checkpoint) if result.checkpoint else None, "steps": result.steps,
        "tokens": result.tokens, "params": result.params, "wall_s": round(result.wall_s, 2),
        "tokens_per_s": round(result.tokens_per_s, 1), "final_loss": result.final_loss,
        "val_loss": result.val_loss, "val_bpb": result.val_bpb, "mfu": result.mfu,
    }
    if args.json:
        print(json.dumps(summary))
    else:
        print(f"trained {result.steps} steps ({result.tokens:,} tokens) in {result.wall_s:.1f}s, "
              f"{result.tokens_per_s:,.0f} tokens/s")
        if result.val_loss is not None:
            print(f"val loss {result.val_loss:.4f}, val bits/byte {result.val_bpb:.4f}")
        print(f"checkpoint: {result.checkpoint}")
    sys.stdout.flush()
    return 0
