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


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--run", default="runs/speedrun", help="run directory with data/ and base/")
    p.add_argument("--out", default="/tmp/muse_bench_posttrain")
    p.add_argument("--threads", type=int, default=0, help="torch threads (0 = torch's default)")
    p.add_argument("--sft-minutes", type=float, default=10.0, help="SFT wall-time budget (max_time_s)")
    p.add_argument("--max-steps", type=int, default=100_000, help="SFT steps (the time budget usually ends it)")
    p.add_argument("--limit", type=int, default=1000, help="test items per task")
    p.add_argument("--throughput-steps", type=int, default=12)
    p.add_argument("--skip-sft", action="store_true", help="reuse OUT/sft (rescore only)")
    args = p.parse_args()

    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    os.environ.setdefault("MUSE_NO_PROGRESS", "1")
    from muse.checkpoint import load, load_train_state, resolve_checkpoint
    from muse.posttrain.sft import load_sft_config, sft_loop
    from muse.posttrain.taskscore import generative_tasks, score_tasks

    run, out = Path(args.run), Path(args.out)
    base = resolve_checkpoint(run, stages=("base",))
    out.mkdir(parents=True, exist_ok=True)
    for d in (out, out / "pt"):
        d.mkdir(exist_ok=True)
        if not (d / "data").exists():
            os.symlink((run / "data").resolve(), d / "data")
    base_model, tok, meta = load(base)
    seq_len, batch_tokens = base_model.config.max_seq_len, 4096
    result: dict = {"run": str(run), "base": str(base), "threads": torch.get_num_threads(), "seq_len": seq_len,
                    "batch_tokens": batch_tokens}

    result["pretrain_tokens_per_s"] = round(pretrain_throughput(out, base, seq_len, batch_tokens,
                                                                args.throughput_steps), 1)
    sets = [f"max_time_s={args.sft_minutes * 60}", f"init_from={json.dumps(str(base))}"]
    cfg = load_sft_config(None, {"max_steps": args.max_steps, "batch_tokens": batch_tokens, "eval_every": 0,
                                 "save_every": 0, "eval_batches": 16, "log_every": 10, "device": "cpu"}, sets)
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

    names = generative_tasks()
    t0 = time.perf_counter()
    before = score_tasks(base_model, tok, names, limit=args.limit)
    after = score_tasks(sft_model, tok, names, limit=args.limit)
    result["score_wall_s"] = round(time.perf_counter() - t0, 1)
    rows = {}
    for name in names:
        b, a = before[name], after[name]
        se = math.sqrt(b.se ** 2 + a.se ** 2)
        rows[name] = {"n": a.n, "base": round(b.score, 4), "base_se": round(b.se, 4), "sft": round(a.score, 4),
                      "sft_se": round(a.se, 4),
                      # no spread at all (every item right or every item wrong in both): any gain is certain
                      "gain_in_se": round((a.score - b.score) / se, 1) if se else (math.inf if a.score > b.score else 0.0)}
    result["tasks"] = rows
    result["tasks_2se_better"] = sum(1 for r in rows.values() if (r["gain_in_se"] or 0) >= 2)
    arith = [after[n] for n in ("arithmetic_1digit", "arithmetic_2digit")]
    result["arithmetic_1_2_digit_exact"] = round(sum(s.score * s.n for s in arith) / sum(s.n for s in arith), 4)
    print(json.dumps(result, indent=1))
    lines = ["| task | items | base | SFT | gain / SE |", "|---|---:|---:|---:|---:|"]
    for name, r in rows.items():
        lines.append(f"| {name} | {r['n']} | {r['base']:.1%} +- {r['base_se']:.1%} | {r['sft']:.1%} +- "
                     f"{r['sft_se']:.1%} | {r['gain_in_se']} |")
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
