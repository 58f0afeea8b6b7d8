"""Pretrain a decoder on the shards `muse prepare` wrote into RUN_DIR/data.

The shape comes from one knob (--depth); any model field can be set with --set model.FIELD=value.
Settings resolve as defaults <- --config FILE.toml <- flags <- --set key=value, and the result is
written to RUN_DIR/base/train_config.json. Checkpoints go to RUN_DIR/base/step_*/ (latest -> newest).

Several devices: `--nproc N` starts N processes on this node through torchrun's machinery (FSDP2 by
default, `--parallel ddp`, `--tp 2` for tensor parallelism); for several nodes start it with torchrun
itself. See docs/distributed.md.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

EXAMPLES = """examples:
  muse prepare --out runs/demo
  muse train runs/demo --depth 4 --max-steps 600
  muse train runs/demo --resume                       # continue after a crash or Ctrl-C
  muse train runs/demo --config my.toml --set optim.matrix_lr=0.03 --set model.n_kv_head=2
  muse train runs/demo --nproc 8 --depth 20           # one node of 8 GPUs, FSDP2
  muse train runs/demo --nproc 8 --tp 2 --ac full     # 4-way FSDP x 2-way tensor parallel
  torchrun --nnodes 2 --nproc-per-node 8 --rdzv-backend c10d --rdzv-endpoint HOST:29500 -m muse train runs/demo
  muse train runs/demo/base/step_000500 --consolidate # add full weights to a sharded checkpoint
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
    p.add_argument("--dtype", choices=["auto", "float32", "bfloat16"],
                   help="compute dtype: auto (default) = bf16 where the device multiplies bf16 natively "
                        "(GPUs, CPUs with AVX512-BF16/AMX), else fp32")
    p.add_argument("--compile", action=argparse.BooleanOptionalAction, default=None,
                   help="torch.compile each block (default off; --no-compile overrides a config file)")
    p.add_argument("--nproc", type=int, help="processes to start on this node (torchrun standalone); default 1")
    p.add_argument("--parallel", choices=["fsdp", "ddp"], help="with several processes: fsdp (default) or ddp")
    p.add_argument("--dp", type=int, help="data-parallel size (default: processes / tp)")
    p.add_argument("--tp", type=int, help="tensor-parallel size (default 1)")
    p.add_argument("--ac", choices=["none", "full"], help="activation checkpointing per block (default none)")
    p.add_argument("--consolidate", action="store_true",
                   help="add full weights (model.safetensors) to the sharded checkpoint RUN_DIR names, then exit")
    p.add_argument("--peak-flops", type=float, help="dense bf16 FLOP/s of an accelerator missing from the MFU table")
    p.add_argument("--init-from", help="checkpoint whose shape and weights to continue pretraining from (e.g. one made "
                   "by `muse import`); prepare the data with its tokenizer: muse prepare --tokenizer CKPT/tokenizer.json")
    p.add_argument("--resume", action="store_true", help="continue from RUN_DIR/base/latest exactly")
    p.add_argument("--force", action="store_true", help="start over even though checkpoints exist")
    p.add_argument("--json", action="store_true", help="print one JSON object with the result")


def load_train_config(args):
    """The TrainConfig these parsed arguments ask for (defaults <- --config <- flags <- --set)."""
    from muse.train.config import load_config

    flags = {
        "depth": args.depth, "arch": args.arch, "seq_len": args.seq_len, "batch_size": args.batch_size,
        "total_batch_tokens": args.total_batch_tokens, "max_steps": args.max_steps,
        "train_tokens": args.train_tokens, "device": args.device, "seed": args.seed,
        "eval_every": args.eval_every, "save_every": args.save_every, "dtype": args.dtype,
        "peak_flops": args.peak_flops, "init_from": args.init_from, "parallel.compile": args.compile, "parallel.nproc": args.nproc,
        "parallel.mode": args.parallel, "parallel.dp": args.dp, "parallel.tp": args.tp, "parallel.ac": args.ac,
    }
    sets = list(args.set)
    if args.optim_name:
        sets.insert(0, f"optim.name={json.dumps(args.optim_name)}")
    cfg = load_config(args.config, flags, sets)
    if not cfg.max_steps and not cfg.train_tokens:
        cfg.max_steps = 600
    return cfg


def run(args) -> int:
    from muse.train.pretrain import pretraining_loop

    if args.consolidate:
        from muse.distributed.checkpoint import consolidate

        print(f"full weights in {consolidate(args.run_dir)}")
        return 0
    cfg = load_train_config(args)
    loop = pretraining_loop(cfg, args.run_dir, resume=args.resume, force=args.force)  # checks the run dir first
    if cfg.parallel.nproc > 1 and "WORLD_SIZE" not in os.environ:
        # The launcher: start N copies of this very command under torchrun's agent. They see WORLD_SIZE
        # and train; --nproc is then ignored. A failing rank surfaces here as one WorkerFailed line.
        from muse.distributed.launch import launch, rebuild_argv

        loop.check(world_size=cfg.parallel.nproc)
        launch(cfg.parallel.nproc, ["train", *rebuild_argv(add_arguments, args)])
        return 0
    result = loop.train()
    from muse.common import dist

    if not dist.is_main():
        return 0
    val_loss, val_bpb = result.evals.get("val_loss"), result.evals.get("val_bpb")
    summary = {
        "checkpoint": str(result.checkpoint) if result.checkpoint else None, "steps": result.steps,
        "tokens": result.tokens, "params": result.params, "wall_s": round(result.wall_s, 2),
        "tokens_per_s": round(result.tokens_per_s, 1), "final_loss": result.final_loss,
        "val_loss": val_loss, "val_bpb": val_bpb, "mfu": result.mfu,
    }
    if args.json:
        print(json.dumps(summary))
    else:
        print(f"trained {result.steps} steps ({result.tokens:,} tokens) in {result.wall_s:.1f}s, "
              f"{result.tokens_per_s:,.0f} tokens/s")
        if val_loss is not None:
            print(f"val loss {val_loss:.4f}, val bits/byte {val_bpb:.4f}")
        print(f"checkpoint: {result.checkpoint}")
    sys.stdout.flush()
    return 0

