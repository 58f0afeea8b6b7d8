"""Post-training benchmark: what SFT buys on the built-in tasks, what it costs on the plays, and how fast it runs.

    .venv/bin/python bench/posttrain.py --run runs/speedrun --threads 1 [--sft-minutes 10] [--limit 1000]

From the base checkpoint of RUN (a finished `muse speedrun` or `muse train`), in a scratch run directory
(OUT, default /tmp/muse_bench_posttrain; its data/ links to RUN/data):

1. Throughput at one shape: pretraining (Pretraining objective, init_from the base) for a few steps of
   batch_tokens/seq_len x seq_len tokens, then SFT on the default mixture with micro-batches of at most
   batch_tokens padded tokens. SFT's tokens/s counts non-padding tokens; loss tokens/s the trained ones.
2. SFT on the default mixture for --sft-minutes of wall time (max_time_s) or --max-steps.
3. Task scores of base and SFT models on every built-in generative task's test split (first --limit items;
   every generator has >= 1,000 except identity), zero-shot chat, greedy (muse.posttrain.taskscore), with
   bootstrap standard errors; the SFT gain in standard errors of the difference.
4. Forgetting: val bits/byte on the plays' val split (same windows) before and after SFT.

Prints one JSON object (and a markdown table on stderr) to paste into BENCHMARKS.md.

Options for other SFT recipes (the defaults above are the benchmark): --mixture FILE (a mixture TOML,
e.g. bench/arithmetic_mixture.toml), --text-share, --batch-tokens, --set KEY=VALUE (any SFT config key,
as `muse sft --set`), --tasks (score a subset), --no-base (skip the base model's scores),
--throughput-steps 0 (skip step 1). The JSON records every option it ran with.

    # issue #13's arithmetic goal (BENCHMARKS.md, post-training): 59.7% exact in 440 steps, 536 s, 2 threads
    .venv/bin/python bench/posttrain.py --run runs/speedrun --threads 2 --mixture bench/arithmetic_mixture.toml \
        --text-share 0 --max-steps 440 --set optim.matrix_lr=0.03 --set optim.embedding_lr=0.3 \
        --set optim.head_lr=0.006 --set schedule.decay_frac=0.5 --tasks arithmetic_1digit,arithmetic_2digit \
        --no-base --throughput-steps 0

SFT's schedule is per step (wsd over --max-steps): a run that --sft-minutes cuts short never decays its
learning rate, and the decay is where arithmetic is learned (one-digit: ~40% at the constant lr, 98.6%
after it). Pick --max-steps to fit the time budget.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from pathlib import Path


def val_bpb(model, data_dir: Path, seq_len: int, batch: int, batches: int) -> float:
    import torch

    from muse.data import TokenLoader, bytes_per_token

    loader = TokenLoader(data_dir, "val", batch, seq_len)
    total, n = 0.0, 0
    with torch.no_grad():
        for x, y in loader.eval_batches(batches):
            total += float(model(x, y, reduction="sum"))
            n += y.numel()
    return total / n / math.log(2) / bytes_per_token(data_dir, "val")


def pretrain_throughput(out: Path, base: Path, seq_len: int, batch_tokens: int, steps: int) -> float:
    from muse.train.config import load_config
    from muse.train.pretrain import pretraining_loop

    cfg = load_config(None, {"init_from": str(base), "seq_len": seq_len, "batch_size": batch_tokens // seq_len,
                             "max_steps": steps, "eval_every": 0, "save_every": 0, "log_every": 2,
                             "eval_batches": 1, "device": "cpu", "plot": False, "tensorboard": False})
    # stage "base" of a scratch directory: the throughput run never touches the real run
    return pretraining_loop(cfg, out / "pt", force=True).train().tokens_per_s


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--run", default="runs/speedrun", help="run directory with data/ and base/")
    p.add_argument("--out", default="/tmp/muse_bench_posttrain")
    p.add_argument("--threads", type=int, default=0, help="torch threads (0 = torch's default)")
    p.add_argument("--sft-minutes", type=float, default=10.0, help="SFT wall-time budget (max_time_s)")
    p.add_argument("--max-steps", type=int, default=100_000, help="SFT steps (the time budget usually ends it)")
    p.add_argument("--limit", type=int, default=1000, help="test items per task")
    p.add_argument("--throughput-steps", type=int, default=12)
    p.add_argument("--skip-sft", action="store_true", help="reuse OUT/sft (rescore only)")
    p.add_argument("--mixture", default="", help="SFT mixture TOML (default: the built-in default mixture)")
    p.add_argument("--text-share", type=float, default=None, help="plain-text share (default: SFT's, 0.25)")
    p.add_argument("--batch-tokens", type=int, default=4096, help="padded tokens per micro-batch")
    p.add_argument("--set", dest="sets", action="append", default=[], metavar="KEY=VALUE",
                   help="SFT config override, e.g. optim.matrix_lr=0.02 (repeatable)")
    p.add_argument("--tasks", default="", help="comma-separated tasks to score (default: every generative task)")
    p.add_argument("--no-base", action="store_true", help="do not score the base model (no gains)")
    args = p.parse_args(argv)
    from muse.common.errors import MuseError

    try:
        return bench(args)
    except MuseError as e:  # a bad mixture, --set or run directory: one line, as the CLI says it
        print(f"error: {e}", file=sys.stderr)
        return 2


def bench(args: argparse.Namespace) -> int:
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    os.environ.setdefault("MUSE_NO_PROGRESS", "1")
    from muse.checkpoint import load, load_train_state, resolve_checkpoint
    from muse.common.errors import UsageError
    from muse.posttrain.sft import load_sft_config, sft_loop
    from muse.posttrain.taskscore import generative_tasks, score_tasks

    names = generative_tasks()
    if args.tasks:
        unknown = [t for t in args.tasks.split(",") if t not in names]
        if unknown:
            raise UsageError(f"--tasks: '{unknown[0]}' is not a generative task; choose from {', '.join(names)}")
        names = args.tasks.split(",")
    if args.mixture and not Path(args.mixture).is_file():
        raise UsageError(f"--mixture {args.mixture}: no such file")
    run, out = Path(args.run), Path(args.out)
    base = resolve_checkpoint(run, stages=("base",))
    out.mkdir(parents=True, exist_ok=True)
    for d in (out, out / "pt"):
        d.mkdir(exist_ok=True)
        if not (d / "data").exists():
            os.symlink((run / "data").resolve(), d / "data")
    base_model, tok, meta = load(base)
    seq_len, batch_tokens = base_model.config.max_seq_len, args.batch_tokens
    result: dict = {"run": str(run), "base": str(base), "threads": torch.get_num_threads(), "seq_len": seq_len,
                    "batch_tokens": batch_tokens, "mixture": args.mixture or "default", "sets": args.sets}

    if args.throughput_steps > 0:
        result["pretrain_tokens_per_s"] = round(pretrain_throughput(out, base, seq_len, batch_tokens,
                                                                    args.throughput_steps), 1)
    sets = [f"max_time_s={args.sft_minutes * 60}", f"init_from={json.dumps(str(base))}"]
    if args.mixture:
        sets.append(f"mixture={json.dumps(str(Path(args.mixture).resolve()))}")
    flags = {"max_steps": args.max_steps, "batch_tokens": batch_tokens, "eval_every": 0, "save_every": 0,
             "eval_batches": 16, "log_every": 10, "device": "cpu"}
    if args.text_share is not None:
        flags["text_share"] = args.text_share
    cfg = load_sft_config(None, flags, sets + args.sets)
    result.update(text_share=cfg.text_share, optim={k: getattr(cfg.optim, k) for k in
                                                    ("matrix_lr", "embedding_lr", "head_lr", "scalar_lr")},
                  schedule=dict(cfg.schedule.__dict__))
    if not args.skip_sft:
        loop = sft_loop(cfg, out, force=True)
        t0 = time.perf_counter()
        res = loop.train()
        obj = loop.objective
        share = obj.loss_tokens / max(obj.read_tokens, 1)
        result.update(sft_steps=res.steps, sft_wall_s=round(time.perf_counter() - t0, 1),
                      sft_tokens=res.tokens, sft_tokens_per_s=round(res.tokens_per_s, 1),
                      sft_loss_tokens_per_s=round(res.tokens_per_s * share, 1), sft_evals=res.evals)
        pad = _padding(obj, 200)
        result["padding_fraction"] = round(pad, 4)
    sft_model, _, sft_meta = load(out, stages=("sft",))
    state = load_train_state(sft_meta["path"])
    result["sft_checkpoint"] = sft_meta["path"]
    result["sft_steps"] = state["step"]

    data_dir = run / "data"
    result["val_bpb_base"] = round(val_bpb(base_model, data_dir, seq_len, 16, 16), 4)
    result["val_bpb_sft"] = round(val_bpb(sft_model, data_dir, seq_len, 16, 16), 4)
    result["val_bpb_rise"] = round(result["val_bpb_sft"] / result["val_bpb_base"] - 1, 4)

    t0 = time.perf_counter()
    before = None if args.no_base else score_tasks(base_model, tok, names, limit=args.limit)
    after = score_tasks(sft_model, tok, names, limit=args.limit)
    result["score_wall_s"] = round(time.perf_counter() - t0, 1)
    rows = {}
    for name in names:
        a = after[name]
        rows[name] = {"n": a.n, "sft": round(a.score, 4), "sft_se": round(a.se, 4)}
        if before is not None:
            b = before[name]
            se = math.sqrt(b.se ** 2 + a.se ** 2)
            rows[name].update(
                base=round(b.score, 4), base_se=round(b.se, 4),
                # no spread at all (every item right or every item wrong in both): any gain is certain
                gain_in_se=round((a.score - b.score) / se, 1) if se else (math.inf if a.score > b.score else 0.0))
    result["tasks"] = rows
    if before is not None:
        result["tasks_2se_better"] = sum(1 for r in rows.values() if (r["gain_in_se"] or 0) >= 2)
    arith = [after[n] for n in ("arithmetic_1digit", "arithmetic_2digit") if n in after]
    if len(arith) == 2:
        result["arithmetic_1_2_digit_exact"] = round(sum(s.score * s.n for s in arith) / sum(s.n for s in arith), 4)
    print(json.dumps(result, indent=1))
    if before is None:
        lines = ["| task | items | SFT |", "|---|---:|---:|"]
        lines += [f"| {name} | {r['n']} | {r['sft']:.1%} +- {r['sft_se']:.1%} |" for name, r in rows.items()]
    else:
        lines = ["| task | items | base | SFT | gain / SE |", "|---|---:|---:|---:|---:|"]
        lines += [f"| {name} | {r['n']} | {r['base']:.1%} +- {r['base_se']:.1%} | {r['sft']:.1%} +- "
                  f"{r['sft_se']:.1%} | {r['gain_in_se']} |" for name, r in rows.items()]
    print("\n".join(lines), file=sys.stderr)
    return 0


def _padding(objective, n: int) -> float:
    """Share of padded positions over the next `n` micro-batches of a fresh copy of the objective's stream."""
    from muse.data.chat import MixtureStream

    s = objective.stream
    fresh = MixtureStream(s.sources, list(objective.mixture.weights), batch_tokens=s.batch_tokens, seed=s.seed)
    real = padded = 0
    for _ in range(n):
        rows = fresh.take().rows
        width = max(len(r[0]) for r in rows) - 1
        real += sum(len(r[0]) - 1 for r in rows)
        padded += width * len(rows)
    return 1 - real / padded


if __name__ == "__main__":
    sys.exit(main())
