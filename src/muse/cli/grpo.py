"""GRPO with verifiable rewards: RUN_DIR's latest model (sft, dpo...; or --init-from) -> RUN_DIR/grpo/step_*.

Each step samples --group-size replies to each of --prompts-per-step prompts from the tasks' train splits
on the paged engine over the live weights, scores them (--reward: the task's grader by default; rm:PATH,
constitution[:FILE], module:function, each optionally *WEIGHT, repeatable for a weighted sum), and
trains on the group-relative advantages (docs/posttrain.md, GRPO). Settings resolve as defaults <-
--config FILE.toml <- flags <- --set key=value, like `muse sft`, and the same --resume, --force, --nproc
and progress output apply. Metrics: RUN_DIR/grpo/metrics.jsonl (reward_mean, pass_rate, entropy,
rollout_s, update_s, ... per log step; pass@1, pass@k, val_reward per evaluation).
"""

from __future__ import annotations

import argparse
import json
import sys

from muse.common.cli import add_loop_arguments, loop_flags

EXAMPLES = """examples:
  muse grpo runs/demo --task arithmetic_2digit                  # task verifier, from runs/demo/sft
  muse grpo runs/demo --task arithmetic_1digit,arithmetic_2digit --group-size 8 --prompts-per-step 16
  muse grpo runs/demo --task spelling --reward task --reward mymod:brevity*0.1
  muse grpo runs/demo --task arithmetic_2digit --updates-per-batch 2 --clip-eps 0.2 --kl-coef 0.01
  muse grpo runs/demo --task arithmetic_2digit --resume         # continue after a crash or Ctrl-C
"""


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("run_dir", help="run directory: checkpoints go to RUN_DIR/grpo/ (its latest stage before grpo is the start)")
    p.add_argument("--task", action="append", default=[], metavar="NAME[,NAME]",
                   help="generative task(s) whose train prompts are rolled out and whose graders verify (repeatable)")
    p.add_argument("--reward", action="append", default=[], metavar="SPEC",
                   help="task | rm:PATH | constitution[:FILE] | module:function, optionally *WEIGHT (repeatable: "
                        "a weighted sum); default: task")
    p.add_argument("--init-from", help="checkpoint to start from (default: RUN_DIR's latest generative stage other than grpo: sft, "
                        "dpo, ...; else base)")
    p.add_argument("--config", help="TOML file of settings (same keys as --set)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override any setting, e.g. optim.matrix_lr=0.001 or scale_rewards=false (repeatable)")
    p.add_argument("--max-steps", type=int, help="optimizer steps (default 100)")
    p.add_argument("--group-size", type=int, help="samples per prompt, G >= 2 (default 8)")
    p.add_argument("--prompts-per-step", type=int, help="prompts per step over all processes (default 16)")
    p.add_argument("--max-new-tokens", type=int, help="reply length cap (default: the tasks' max_tokens)")
    p.add_argument("--temperature", type=float, help="sampling temperature of rollouts and evaluation (default 1)")
    p.add_argument("--kl-coef", type=float, help="weight of the KL to the starting weights (default 0: none)")
    p.add_argument("--clip-eps", type=float, help="PPO ratio clip, used with --updates-per-batch > 1 (default 0.2)")
    p.add_argument("--updates-per-batch", type=int, help="optimizer steps per rollout batch (default 1)")
    p.add_argument("--eval-prompts", type=int, help="validation prompts per evaluation (default 64; 0 = none)")
    add_loop_arguments(p, "grpo")


def load_args_config(args):
    from muse.posttrain.grpo import load_grpo_config

    flags = {
        **loop_flags(args), "max_steps": args.max_steps, "group_size": args.group_size,
        "prompts_per_step": args.prompts_per_step, "max_new_tokens": args.max_new_tokens,
        "temperature": args.temperature, "kl_coef": args.kl_coef, "clip_eps": args.clip_eps,
        "updates_per_batch": args.updates_per_batch, "eval_prompts": args.eval_prompts, "init_from": args.init_from,
        "tasks": tuple(args.task) or None, "rewards": tuple(args.reward) or None,
    }
    return load_grpo_config(args.config, flags, args.set)


def run(args) -> int:
    from muse.distributed.launch import train_or_launch
    from muse.posttrain.grpo import grpo_loop

    cfg = load_args_config(args)
    loop = grpo_loop(cfg, args.run_dir, resume=args.resume, force=args.force)  # checks tasks, rewards, prompts first
    result = train_or_launch(loop, cfg, "grpo", add_arguments, args)
    if result is None:
        return 0
    summary = {
        "checkpoint": str(result.checkpoint) if result.checkpoint else None, "steps": result.steps,
        "tokens": result.tokens, "wall_s": round(result.wall_s, 2), "final_loss": result.final_loss,
        **{k: v for k, v in result.evals.items()},
    }
    if args.json:
        print(json.dumps(summary))
    else:
        print(f"GRPO: {result.steps} steps ({result.tokens:,} prompt and completion tokens) in {result.wall_s:.1f}s")
        if result.evals:
            print(" | ".join(f"{k.replace('_', ' ')} {v:.4f}" for k, v in result.evals.items()))
        print(f"checkpoint: {result.checkpoint}")
    sys.stdout.flush()
    return 0
