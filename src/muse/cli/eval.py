"""Score checkpoints and OpenAI-compatible endpoints side by side on tasks.

Each --model is a run or checkpoint directory (evaluated in this process through the paged engine) or
NAME=openai:BASE_URL@MODEL (any OpenAI-compatible endpoint, `muse serve` included). Writes results.json,
report.md, bar charts and per-sample records to --out. Answers are cached (SQLite, --cache): a rerun
sends only what it has not received. docs/eval.md has the task format, the providers and the report.

Exit codes: 0 done, 2 a user error or a model that could not be evaluated (one line each),
3 the --gate failed (one line: the first failure).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

EXAMPLES = """examples:
  muse eval --model runs/speedrun --tasks all --limit 200
  muse eval --model A=runs/a --model B=runs/b --tasks arithmetic_2digit,quote_completion --out cmp/
  MUSE_KEY=... muse eval --model runs/x --model S=openai:http://localhost:8000/v1@speedrun \\
      --api-key-env MUSE_KEY --tasks my_tasks/capitals.toml --concurrency 32
  muse eval --model runs/x --tasks all --limit 100 --gate release_gate.toml     # exit 3 below the gate
  muse eval --model sft=runs/x/sft/latest --model grpo=runs/x/grpo/latest --tasks arithmetic_2digit \\
      --limit 200 --samples 8 --temperature 1.0                                 # sampled pass@1, pass@2..8
"""


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", action="append", required=True, metavar="SPEC",
                   help="RUN_DIR, CHECKPOINT_DIR, NAME=PATH or NAME=openai:BASE_URL@MODEL (repeat to compare)")
    p.add_argument("--tasks", default="all", help="'all', task names and/or task files, comma-separated (default all)")
    p.add_argument("--limit", type=int, help="the first N samples of each task (bpb: N windows)")
    p.add_argument("--out", help="output directory (default: RUN/eval of the first checkpoint, else ./eval)")
    p.add_argument("--split", default="test", help="which split to score (default test)")
    p.add_argument("--shots", "--num-fewshot", dest="shots", type=int, metavar="K",
                   help="few-shot examples in every prompt (default: each task's own fewshot.k)")
    p.add_argument("--task-seed", type=int, default=0, help="seed of the built-in task generators (default 0)")
    p.add_argument("--samples", type=int, default=1, metavar="K",
                   help="generate/chat tasks: ask each item K times, each with its own seed, and report the mean "
                        "score over samples (pass@1) and pass@k for k = 1, 2, 4, ..., K (default 1: greedy, as "
                        "each task says); multiple-choice and bpb tasks are unaffected. Costs K x the requests")
    p.add_argument("--temperature", type=float, metavar="T",
                   help="generate/chat tasks: sampling temperature, 0 to 10 (default: 1.0 with --samples > 1, else "
                        "each task's own, 0 = greedy for the built-ins); multiple-choice and bpb are unaffected")
    p.add_argument("--stage", help="which stage of a run directory (default: the latest trained)")
    p.add_argument("--device", default="auto", help="device for checkpoints (default auto)")
    p.add_argument("--dtype", choices=("float32", "bfloat16", "float16"), help="weights dtype (default: as saved)")
    p.add_argument("--style", choices=("auto", "completion", "chat"), default="auto",
                   help="how generate tasks are asked (auto: chat for sft/dpo/grpo checkpoints and chat-only "
                        "endpoints, completion otherwise)")
    p.add_argument("--api-key-env", metavar="VAR",
                   help="name of the environment variable holding the endpoints' API key (never the key itself)")
    p.add_argument("--concurrency", type=int, help="requests in flight per model (default: 32 for endpoints, "
                                                   "2 x the engine's max_num_seqs for checkpoints)")
    p.add_argument("--retries", type=int, default=4, help="retries of a request on 429/5xx/timeouts (default 4)")
    p.add_argument("--timeout", type=float, default=120.0, help="seconds per HTTP request (default 120)")
    p.add_argument("--judge", metavar="SPEC", help="the model that grades judge-graded tasks (same forms as --model)")
    cache = p.add_mutually_exclusive_group()
    cache.add_argument("--cache", help="response cache file (default $MUSE_EVAL_CACHE, else $MUSE_HOME/eval-cache.sqlite3)")
    cache.add_argument("--no-cache", action="store_true", help="send every request; remember nothing")
    p.add_argument("--gate", metavar="FILE.toml", help="minimum per task metric; exit 3 when a model falls below")
    p.add_argument("--contamination", metavar="RUN_DIR",
                   help="also check that no test item of the tasks occurs in RUN_DIR's training shards (13-gram "
                        "overlap, docs/eval.md); writes contamination.json and a table in report.md")
    p.add_argument("--contamination-data", action="append", default=[], metavar="FILE.jsonl",
                   help="post-training data to check as well (chat JSONL or text rows; repeatable)")
    p.add_argument("--json", action="store_true", help="print results.json to stdout instead of the table")


def _default_out(specs) -> Path:
    for s in specs:
        if s.kind == "muse":
            p = Path(s.target).resolve()
            for d in (p, *p.parents[:3]):
                if (d / "data").is_dir() or (d / "base").is_dir():
                    return d / "eval"
    return Path("eval")


def run(args) -> int:
    from muse.common.errors import UsageError
    from muse.eval import check_gate, load_gate, parse_model_spec, results_table, run_eval
    for flag in ("limit", "concurrency"):
        v = getattr(args, flag)
        if v is not None and v < 1:
            raise UsageError(f"--{flag} must be >= 1, got {v}")
    if args.shots is not None and args.shots < 0:
        raise UsageError(f"--shots must be >= 0, got {args.shots}")
    if args.retries < 0 or args.timeout <= 0:
        raise UsageError("--retries must be >= 0 and --timeout > 0")
    gate = load_gate(args.gate) if args.gate else None  # a broken gate file fails before any model runs
    specs = [parse_model_spec(m) for m in args.model]
    out = Path(args.out) if args.out else _default_out(specs)
    results = run_eval(specs, args.tasks, limit=args.limit, out_dir=out, split=args.split, task_seed=args.task_seed,
                       shots=args.shots, cache=False if args.no_cache else (args.cache or True), concurrency=args.concurrency,
                       judge=args.judge, stage=args.stage, device=args.device, dtype=args.dtype, style=args.style,
                       api_key_env=args.api_key_env, retries=args.retries, timeout=args.timeout,
                       samples=args.samples, temperature=args.temperature)
    if args.contamination or args.contamination_data:
        contamination(args, out)
    if args.json:
        print(json.dumps(results.data, indent=2))
    else:
        print(results_table(results.data))
        paired = results.data.get("paired")
        if paired and paired["tasks"]:
            from muse.eval.report import paired_table

            print(f"\npaired with {paired['baseline']} ({paired['confidence']:.0%} bootstrap interval of the difference):")
            print(paired_table(paired))
        print(f"\nreport: {out / 'report.md'}")
    for error in results.errors:
        print(f"muse eval: error: {error}", file=sys.stderr)
    if gate is not None:
        failures = check_gate(results.data, gate)
        if failures:
            more = f" (and {len(failures) - 1} more, see {out / 'report.md'})" if len(failures) > 1 else ""
            print(f"muse eval: gate failed: {failures[0]}{more}", file=sys.stderr)
            return 3
    return 2 if results.errors else 0


def contamination(args, out: Path) -> list:
    """Per task: test items found in the run's training shards and in the post-training files given."""
    from muse.common.errors import UsageError
    from muse.common.paths import atomic_write_json, atomic_write_text
    from muse.eval import contamination_table
    from muse.tasks import resolve
    from muse.tasks.contamination import check_contamination

    rows = []
    for f in args.contamination_data:
        path = Path(f)
        if not path.is_file():
            raise UsageError(f"--contamination-data {path} does not exist")
        for i, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
            if line.strip():
                try:
                    rows.append(json.loads(line))
                except json.JSONDecodeError as e:
                    raise UsageError(f"{path}:{i}: not JSON ({e.msg})") from None
    data_dir = None
    if args.contamination:
        data_dir = Path(args.contamination)
        data_dir = data_dir / "data" if (data_dir / "data").is_dir() else data_dir
    tasks = [t for t in resolve(args.tasks) if t.kind != "bpb"]
    reports = check_contamination(tasks, texts=rows or None, data_dir=data_dir, split=args.split)
    atomic_write_json(out / "contamination.json", [r.to_dict() for r in reports])
    report = out / "report.md"
    text = report.read_text() if report.exists() else ""
    atomic_write_text(report, text + "\n## Contamination\n\nTest items found in the training text (word 13-gram "
                      "overlap; short templated items checked whole):\n\n" + contamination_table(reports) + "\n")
    bad = [r for r in reports if r.contaminated and not r.overlap_expected]
    for r in bad:
        print(f"muse eval: warning: {r.contaminated} of {r.checked} {r.task} test items occur in the training "
              "text", file=sys.stderr)
    return reports
