"""Train a reward model on preference pairs: RUN_DIR's sft (else base) checkpoint -> RUN_DIR/rm/step_*.

The data is one or more preference JSONL files (--data FILE, or FILE*WEIGHT to draw a file's pairs WEIGHT
times as often), one pair per line: {"prompt", "chosen", "rejected"} or {"messages", "chosen", "rejected"},
optional "margin" (docs/posttrain.md, "Preference data"). The model is the policy's trunk with a scalar head
read at the reply's last token, trained with the Bradley-Terry loss -log sigmoid(r_chosen - r_rejected -
margin). Metrics: RUN_DIR/rm/metrics.jsonl (loss, accuracy, margin per log step; val_loss, val_accuracy and
val_margin on the held-out pairs). GRPO and eval use the result as a reward: `--reward rm:RUN_DIR/rm`.

Settings resolve as defaults <- --config FILE.toml <- flags <- --set key=value, like `muse sft`, and the same
--resume, --force, --nproc and progress output apply.
"""

from __future__ import annotations

import argparse
import json
import sys

from muse.common.cli import add_loop_arguments, loop_flags

EXAMPLES = """examples:
  muse rm runs/demo --data prefs.jsonl                        # from runs/demo/sft (else base)
  muse rm runs/demo --data prefs.jsonl --data extra.jsonl*0.5 --max-steps 400
  muse rm runs/demo --data prefs.jsonl --resume               # continue after a crash or Ctrl-C
"""


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("run_dir", help="run directory: checkpoints go to RUN_DIR/rm/ (its sft/, else base/, is the start)")
    p.add_argument("--data", action="append", default=[], metavar="FILE[*WEIGHT]",
                   help="preference JSONL file (repeatable); *WEIGHT draws its pairs WEIGHT times as often")
    p.add_argument("--init-from", help="checkpoint whose trunk to start from (default: RUN_DIR's sft, else base)")
    p.add_argument("--config", help="TOML file of settings (same keys as --set)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override any setting, e.g. optim.head_lr=0.02 or val_fraction=0.2 (repeatable)")
    p.add_argument("--max-steps", type=int, help="optimizer steps (default 200)")
    p.add_argument("--seq-len", type=int, help="longest row (prompt + reply) in tokens (default: the model's context)")
    p.add_argument("--batch-tokens", type=int, help="padded tokens per micro-batch, both replies counted (default 4096)")
    p.add_argument("--micro-batches", type=int, help="micro-batches per step over all processes (default 1)")
    add_loop_arguments(p, "rm")


def run(args) -> int:
    from muse.distributed.launch import train_or_launch
    from muse.posttrain.rm import load_rm_config, rm_loop

    flags = {
        **loop_flags(args), "max_steps": args.max_steps, "seq_len": args.seq_len, "batch_tokens": args.batch_tokens,
        "micro_batches": args.micro_batches, "init_from": args.init_from, "data": tuple(args.data) or None,
    }
    cfg = load_rm_config(args.config, flags, args.set)
    loop = rm_loop(cfg, args.run_dir, resume=args.resume, force=args.force)  # reads and checks the data first
    result = train_or_launch(loop, cfg, "rm", add_arguments, args)
    if result is None:
        return 0
    pairs = loop.objective.pairs
    summary = {
        "checkpoint": str(result.checkpoint) if result.checkpoint else None, "steps": result.steps,
        "pairs": pairs, "tokens": result.tokens, "wall_s": round(result.wall_s, 2),
        "tokens_per_s": round(result.tokens_per_s, 1), "final_loss": result.final_loss, **result.evals,
    }
    if args.json:
        print(json.dumps(summary))
    else:
        print(f"trained a reward model {result.steps} steps ({pairs:,} pairs, {result.tokens:,} tokens) in "
              f"{result.wall_s:.1f}s, {result.tokens_per_s:,.0f} tokens/s")
        if result.evals:
            print(" | ".join(f"{k.replace('_', ' ')} {v:.4f}" for k, v in result.evals.items()))
        print(f"checkpoint: {result.checkpoint}")
    sys.stdout.flush()
    return 0
