"""Preference-optimise a policy (DPO, IPO or SimPO): RUN_DIR's sft (else base) checkpoint -> RUN_DIR/dpo/step_*.

The data is one or more preference JSONL files (--data FILE, or FILE*WEIGHT to draw a file's pairs WEIGHT
times as often), one pair per line: {"prompt", "chosen", "rejected"} or {"messages", "chosen", "rejected"}
(docs/posttrain.md, "Preference data"). The frozen reference is the starting checkpoint unless --ref names
another; --loss simpo needs none. Metrics: RUN_DIR/dpo/metrics.jsonl (loss, pairs_per_s, chosen_reward,
rejected_reward, margin and accuracy per log step; the same as val_* on the held-out pairs; with --ptx-weight,
ptx_loss per log step and val_bpb on the plays' val split).

Settings resolve as defaults <- --config FILE.toml <- flags <- --set key=value, like `muse sft`, and the same
--resume, --force, --nproc and progress output apply.
"""

from __future__ import annotations

import argparse
import json
import sys

from muse.common.cli import add_loop_arguments, loop_flags

EXAMPLES = """examples:
  muse dpo runs/demo --data prefs.jsonl                       # DPO from runs/demo/sft, which is also the reference
  muse dpo runs/demo --data prefs.jsonl --beta 0.2 --max-steps 400
  muse dpo runs/demo --data prefs.jsonl --loss simpo          # reference-free, length-normalised
  muse dpo runs/demo --data prefs.jsonl --nll-weight 1        # + the chosen replies' NLL (RPO)
  muse dpo runs/demo --data prefs.jsonl --ptx-weight 1       # + the plays' text NLL: limits drift (needs runs/demo/data)
  muse dpo runs/demo --data prefs.jsonl --ref runs/other/sft  # another frozen reference
  muse dpo runs/demo --data prefs.jsonl --resume              # continue after a crash or Ctrl-C
"""


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("run_dir", help="run directory: checkpoints go to RUN_DIR/dpo/ (its sft/, else base/, is the start)")
    p.add_argument("--data", action="append", default=[], metavar="FILE[*WEIGHT]",
                   help="preference JSONL file (repeatable); *WEIGHT draws its pairs WEIGHT times as often")
    p.add_argument("--init-from", help="checkpoint to optimise (default: RUN_DIR's sft, else base)")
    p.add_argument("--ref", help="frozen reference checkpoint (default: the --init-from checkpoint)")
    p.add_argument("--loss", choices=["dpo", "ipo", "simpo"], help="preference loss (default dpo)")
    p.add_argument("--beta", type=float, help="inverse temperature (default: 0.1 for dpo and ipo, 2.0 for simpo)")
    p.add_argument("--nll-weight", type=float,
                   help="add this times the chosen reply's NLL per token to the loss (RPO; default 0: none)")
    p.add_argument("--ptx-weight", type=float,
                   help="add this times the NLL per token of anchor data per pair: the run's pretraining text "
                        "(RUN_DIR/data), or --set ptx_mixture=FILE.toml|default (default 0: no anchor)")
    p.add_argument("--config", help="TOML file of settings (same keys as --set)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override any setting, e.g. optim.matrix_lr=0.001 or gamma=0.5 (repeatable)")
    p.add_argument("--max-steps", type=int, help="optimizer steps (default 200)")
    p.add_argument("--seq-len", type=int, help="longest row (prompt + reply) in tokens (default: the model's context)")
    p.add_argument("--batch-tokens", type=int, help="padded tokens per micro-batch, both replies counted (default 4096)")
    p.add_argument("--micro-batches", type=int, help="micro-batches per step over all processes (default 1)")
    add_loop_arguments(p, "dpo")


def run(args) -> int:
    from muse.distributed.launch import train_or_launch
    from muse.posttrain.dpo import dpo_loop, load_dpo_config

    flags = {
        **loop_flags(args), "max_steps": args.max_steps, "seq_len": args.seq_len, "batch_tokens": args.batch_tokens,
        "micro_batches": args.micro_batches, "init_from": args.init_from, "ref": args.ref, "loss": args.loss,
        "beta": args.beta, "nll_weight": args.nll_weight, "ptx_weight": args.ptx_weight, "data": tuple(args.data) or None,
    }
    cfg = load_dpo_config(args.config, flags, args.set)
    loop = dpo_loop(cfg, args.run_dir, resume=args.resume, force=args.force)  # reads and checks the data first
    result = train_or_launch(loop, cfg, "dpo", add_arguments, args)
    if result is None:
        return 0
    pairs = loop.objective.pairs
    summary = {
        "checkpoint": str(result.checkpoint) if result.checkpoint else None, "steps": result.steps,
        "loss_kind": cfg.loss, "beta": cfg.beta, "nll_weight": cfg.nll_weight, "ptx_weight": cfg.ptx_weight, "pairs": pairs, "tokens": result.tokens,
        "wall_s": round(result.wall_s, 2), "tokens_per_s": round(result.tokens_per_s, 1),
        "pairs_per_s": round(result.tokens_per_s * pairs / max(result.tokens, 1), 2),
        "final_loss": result.final_loss, **result.evals,
    }
    if args.json:
        print(json.dumps(summary))
    else:
        print(f"{cfg.loss} {result.steps} steps ({pairs:,} pairs, {result.tokens:,} tokens) in {result.wall_s:.1f}s, "
              f"{summary['pairs_per_s']:,.1f} pairs/s, {result.tokens_per_s:,.0f} tokens/s")
        if result.evals:
            print(" | ".join(f"{k.replace('_', ' ')} {v:.4f}" for k, v in result.evals.items()))
        print(f"checkpoint: {result.checkpoint}")
    sys.stdout.flush()
    return 0
