"""Supervised fine-tuning on chat data: RUN_DIR's base checkpoint (or --init-from) -> RUN_DIR/sft/step_*.

The data is a mixture (docs/posttrain.md): chat JSONL files (--data, {"messages": [{"role", "content"}]}
per line), built-in tasks' train splits, identity conversations and a share of the run's pretraining
text (--mixture FILE.toml lists them with weights). With neither flag, the default mixture: the built-in
generative tasks and the identity conversations. The loss counts assistant tokens only (and the text's).

Settings resolve as defaults <- --config FILE.toml <- flags <- --set key=value, like `muse train`, and the
same --resume, --force, --nproc and progress output apply. Metrics: RUN_DIR/sft/metrics.jsonl (loss on
trained tokens, val_loss, val_loss_<source>, val_bpb on the plays when the mixture has text).
"""

from __future__ import annotations

import argparse
import json
import sys

from muse.common.cli import add_loop_arguments, loop_flags

EXAMPLES = """examples:
  muse sft runs/demo                                   # the default mixture, from runs/demo/base
  muse sft runs/demo --data chats.jsonl --max-steps 400
  muse sft runs/demo --mixture mix.toml --set text_share=0.2
  muse sft runs/demo --resume                          # continue after a crash or Ctrl-C
  muse sft runs/imported --init-from runs/imported/base --data chats.jsonl --nproc 2
"""


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("run_dir", help="run directory: checkpoints go to RUN_DIR/sft/ (its base/ is the default start)")
    p.add_argument("--data", action="append", default=[], metavar="FILE",
                   help="chat JSONL file (repeatable); weighted by its number of conversations")
    p.add_argument("--mixture", help="mixture TOML: [[source]] tables with file/task/identity/text and weight")
    p.add_argument("--init-from", help="checkpoint to fine-tune (default: RUN_DIR's newest base checkpoint)")
    p.add_argument("--config", help="TOML file of settings (same keys as --set)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override any setting, e.g. optim.matrix_lr=0.005 or text_share=0.2 (repeatable)")
    p.add_argument("--max-steps", type=int, help="optimizer steps (default 300)")
    p.add_argument("--seq-len", type=int, help="longest row in tokens (default: the model's context)")
    p.add_argument("--batch-tokens", type=int, help="padded tokens per micro-batch (default 4096)")
    p.add_argument("--micro-batches", type=int, help="micro-batches per step over all processes (default 1)")
    add_loop_arguments(p, "sft")


def load_args_config(args):
    from muse.posttrain.sft import load_sft_config

    flags = {
        **loop_flags(args), "max_steps": args.max_steps, "seq_len": args.seq_len, "batch_tokens": args.batch_tokens,
        "micro_batches": args.micro_batches, "init_from": args.init_from, "mixture": args.mixture,
        "data": tuple(args.data) or None,
    }
    return load_sft_config(args.config, flags, args.set)


def run(args) -> int:
    from muse.distributed.launch import train_or_launch
    from muse.posttrain.sft import sft_loop

    cfg = load_args_config(args)
    loop = sft_loop(cfg, args.run_dir, resume=args.resume, force=args.force)  # reads and checks the data first
    result = train_or_launch(loop, cfg, "sft", add_arguments, args)
    if result is None:
        return 0
    obj = loop.objective
    share = obj.loss_tokens / max(obj.read_tokens, 1)
    summary = {
        "checkpoint": str(result.checkpoint) if result.checkpoint else None, "steps": result.steps,
        "tokens": result.tokens, "wall_s": round(result.wall_s, 2), "tokens_per_s": round(result.tokens_per_s, 1),
        "loss_tokens_per_s": round(result.tokens_per_s * share, 1), "final_loss": result.final_loss,
        **{k: v for k, v in result.evals.items()},
    }
    if args.json:
        print(json.dumps(summary))
    else:
        print(f"fine-tuned {result.steps} steps ({result.tokens:,} tokens, {share:.0%} of them trained on) in "
              f"{result.wall_s:.1f}s, {result.tokens_per_s:,.0f} tokens/s ({summary['loss_tokens_per_s']:,.0f} loss tokens/s)")
        if result.evals:
            print(" | ".join(f"{k.replace('_', ' ')} {v:.4f}" for k, v in result.evals.items()))
        print(f"checkpoint: {result.checkpoint}")
    sys.stdout.flush()
    return 0

