"""RLAIF against a written constitution: sample, critique, revise, label pairs, then DPO (or the RM) on them.

The policy (RUN_DIR's sft checkpoint, or --policy) answers each prompt --samples times; the critic judges
the answers against the constitution (--constitution FILE.toml; default: the sample that ships with Muse):

  checks                        the principles' programmatic checks and fixes (the default; no model)
  policy                        the policy itself critiques, revises and compares
  NAME=openai:BASE_URL@MODEL    any OpenAI-compatible endpoint (`muse serve` too); the API key is read from
                                the environment variable --api-key-env (default MUSE_CRITIC_API_KEY)

Preference pairs (revised over original, the best over the worst of the samples) go to
RUN_DIR/rlaif/pairs.jsonl with the critiques, a summary to RUN_DIR/rlaif/summary.json; then DPO trains on
them into RUN_DIR/dpo/ (--train rm: the reward model into RUN_DIR/rm/), unless --pairs-only. A killed run
started again skips the prompts it finished and reads the critic's answers from its cache.
"""

from __future__ import annotations

import argparse
import json
import sys

EXAMPLES = """examples:
  muse rlaif runs/demo                                  # checks as critic, then DPO from runs/demo/sft
  muse rlaif runs/demo --pairs-only --samples 8 --limit 200
  muse rlaif runs/demo --constitution mine.toml --prompts prompts.jsonl --train rm
  muse rlaif runs/demo --critic policy --revisions 2 --pairs-only
  MUSE_CRITIC_API_KEY=... muse rlaif runs/demo --critic judge=openai:http://localhost:8000/v1@big --concurrency 32
"""


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("run_dir", help="run directory: the policy is RUN_DIR/sft; pairs go to RUN_DIR/rlaif/")
    p.add_argument("--constitution", metavar="FILE", help="constitution TOML (default: the sample, docs/posttrain.md)")
    p.add_argument("--prompts", metavar="FILE|task:NAME[=SHARE],...",
                   help='JSONL of {"prompt": ...} or {"messages": [...]} rows, or task:NAME[=SHARE],... (the tasks\' '
                        'train questions, interleaved by share; default task:compliance=0.8,identity=0.2)')
    p.add_argument("--critic", default="checks",
                   help="checks (default), policy, NAME=openai:BASE_URL@MODEL, or a checkpoint directory")
    p.add_argument("--samples", type=int, default=4, help="responses per prompt (default 4)")
    p.add_argument("--limit", type=int, default=1000, help="prompts at most (default 1000; 0 = all)")
    p.add_argument("--max-tokens", type=int, default=64, help="tokens per response (default 64)")
    p.add_argument("--temperature", type=float, default=1.0, help="policy sampling temperature (default 1.0)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--pairing", choices=["best-vs-worst", "compliant-vs-rest"], default="best-vs-worst",
                   help="sample pairs a prompt: its best over its worst (default), or (checks critic) every sample "
                        "meeting every checked principle over every sample that does not")
    p.add_argument("--policy", metavar="CKPT", help="checkpoint or run to sample from (default: RUN_DIR's sft)")
    p.add_argument("--revisions", type=int, default=1,
                   help="critique-revision rounds per response with a model critic (default 1)")
    p.add_argument("--critic-max-tokens", type=int, default=256)
    p.add_argument("--concurrency", type=int, default=16, help="critic requests in flight (default 16)")
    p.add_argument("--api-key-env", default="MUSE_CRITIC_API_KEY",
                   help="environment variable holding the critic endpoint's API key")
    p.add_argument("--cache", metavar="PATH", help="response cache (default RUN_DIR/rlaif/cache.sqlite3)")
    p.add_argument("--no-cache", action="store_true", help="remember no answers (a killed run pays again)")
    p.add_argument("--device", default="auto", help="auto (default), cpu, cuda, ...")
    p.add_argument("--pairs-only", action="store_true", help="stop after writing the pairs")
    p.add_argument("--train", choices=["dpo", "rm"], default="dpo", help="what to train on the pairs (default dpo)")
    p.add_argument("--config", help="TOML file of the training stage's settings")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override a training setting, e.g. beta=0.2 (repeatable)")
    p.add_argument("--max-steps", type=int, help="training steps (default: the stage's)")
    p.add_argument("--resume", action="store_true", help="continue the training stage from its latest checkpoint")
    p.add_argument("--force", action="store_true",
                   help="start over: forget RUN_DIR/rlaif's finished prompts, replace the stage's checkpoints")
    p.add_argument("--json", action="store_true", help="print one JSON object with the result")


def run(args) -> int:
    from muse.posttrain.rlaif import RLAIFConfig, run_rlaif, train_on_pairs

    cfg = RLAIFConfig(constitution=args.constitution, prompts=args.prompts, limit=args.limit or None,
                      samples=args.samples, max_tokens=args.max_tokens, temperature=args.temperature,
                      seed=args.seed, pairing=args.pairing.replace("-", "_"), policy=args.policy, critic=args.critic,
                      revisions=args.revisions,
                      critic_max_tokens=args.critic_max_tokens, concurrency=args.concurrency,
                      api_key_env=args.api_key_env, cache=False if args.no_cache else (args.cache or True),
                      device=args.device, force=args.force)
    summary = run_rlaif(cfg, args.run_dir)
    result = {"rlaif": summary}
    if not args.pairs_only:
        if summary["pairs"]["total"] == 0:
            from muse.common.errors import DataError

            raise DataError(f"no preference pairs were made (see {summary['pairs_file']}'s summary.json); "
                            "more --samples, a higher --temperature or another critic may find differences")
        flags = {"max_steps": args.max_steps, "device": None if args.device == "auto" else args.device,
                 "init_from": args.policy}
        loop = train_on_pairs(args.train, summary["pairs_file"], args.run_dir, config=args.config, flags=flags,
                              sets=args.set, resume=args.resume, force=args.force)
        trained = loop.train()
        result[args.train] = {"checkpoint": str(trained.checkpoint) if trained.checkpoint else None,
                              "steps": trained.steps, "final_loss": trained.final_loss, **trained.evals}
    if args.json:
        print(json.dumps(result))
    else:
        _print(summary)
        if args.train in result:
            t = result[args.train]
            print(f"{args.train}: {t['steps']} steps, final loss {t['final_loss']:.4f}; checkpoint: {t['checkpoint']}")
    sys.stdout.flush()
    return 0


def _print(s: dict) -> None:
    c = s["compliance"]
    fmt = lambda x: "-" if x is None else f"{x:.0%}"
    print(f"rlaif: {s['prompts']} prompts ({s['prompts_this_run']} this run), {s['samples']} samples, "
          f"{s['revised']} revised; critic {s['settings']['critic']}")
    print(f"compliance (all checked principles): samples {fmt(c['samples'])}, revisions {fmt(c['revisions'])}")
    for name, r in c["per_principle"].items():
        print(f"  {name:<20} samples {fmt(r['samples']):>5}  revisions {fmt(r['revisions']):>5}")
    skipped = s["skipped"]
    failed = sum(skipped["failed_requests"].values())
    print(f"pairs: {s['pairs']['total']} ({s['pairs']['revision']} revised over original, "
          f"{s['pairs']['best_vs_worst']} best over worst"
          + (f", {s['pairs']['compliant_vs_rest']} compliant over the rest" if s["pairs"].get("compliant_vs_rest") else "")
          + f"); skipped: {skipped['unparseable_labels']} unparseable "
          f"labels, {failed} failed requests, {skipped['prompts_without_pair']} prompts without a pair")
    print(f"pairs file: {s['pairs_file']}")
