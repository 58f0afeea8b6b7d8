"""The flags every training verb spells the same (`muse sft`, `muse rm`, `muse dpo`, `muse grpo`): the loop's
settings (LoopConfig keys), --resume, --force and --json. Stdlib only, so a verb's --help and a bad flag
answer without importing torch; muse.distributed.launch.train_or_launch runs what they configure.
"""

from __future__ import annotations

import argparse


def add_loop_arguments(p: argparse.ArgumentParser, stage: str) -> None:
    """The loop's flags (LoopConfig keys, spelled as every stage spells them) and resume/force/json."""
    p.add_argument("--device", help="auto (default), cpu, cuda, ...")
    p.add_argument("--seed", type=int)
    p.add_argument("--eval-every", type=int)
    p.add_argument("--save-every", type=int)
    p.add_argument("--dtype", choices=["auto", "float32", "bfloat16"])
    p.add_argument("--nproc", type=int, help="processes to start on this node (torchrun standalone); default 1")
    p.add_argument("--parallel", choices=["fsdp", "ddp"], help="with several processes: fsdp (default) or ddp")
    p.add_argument("--resume", action="store_true", help=f"continue from RUN_DIR/{stage}/latest exactly")
    p.add_argument("--force", action="store_true", help=f"start over even though {stage} checkpoints exist")
    p.add_argument("--json", action="store_true", help="print one JSON object with the result")


def loop_flags(args) -> dict:
    """add_loop_arguments' flags as config keys (None = not given, the config's value stands)."""
    return {"device": args.device, "seed": args.seed, "eval_every": args.eval_every, "save_every": args.save_every,
            "dtype": args.dtype, "parallel.nproc": args.nproc, "parallel.mode": args.parallel}
