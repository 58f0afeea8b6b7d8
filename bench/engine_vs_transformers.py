"""Muse's engine against Hugging Face transformers on the same exported weights, side by side.

One model, exported with Muse's own exporter (muse.checkpoint.hf_export) and loaded back by
transformers' LlamaForCausalLM, serves the same prompts (--prompts of 16-120 random token ids),
greedy, eos ignored (every request generates exactly its own length), four ways:
  engine      muse.infer.engine.Engine, every request queued at once (max_num_seqs = --prompts):
              continuous batching, paged KV cache, chunked prefill;
  hf static   one `model.generate` call on the whole batch, prompts left-padded (attention mask):
              the batch runs until its longest request is done;
  hf one      `model.generate` one prompt at a time;
and at batch 1 (the first --batch1-prompts prompts, one request at a time):
  muse plain  muse.infer.generate (contiguous KV cache), against the engine with max_num_seqs = 1.
--paired-replay runs only the engine instead, and every step its backend runs through the "paged-decode"
path (muse.infer.decode_attention.DecodeStep) runs twice, through that and through the reference plan,
on the same pool, alternating which goes first: CPU time per step and backend, by blocks read (a
comparison that shares the machine's load between the two, unlike runs of whole benches).
Output lengths: "uniform" (every request --uniform-len tokens) and "longtail" (most requests short,
--longtail-short tokens drawn uniformly, one in --longtail-every long, --uniform-len tokens): the
engine's continuous batching frees a finished request's slot at once, a static batch waits for its
longest row. Tokens/s counts only the requested tokens. Building the engine (allocating its KV pool)
and loading the models are not timed; every path is warmed up once first.

Identical outputs: every method's greedy tokens must equal the engine's, request by request; the
report names the first request that differs and the script exits 1 when any does. --hf-model runs
transformers on another exported directory instead (a different model must fail the check).

The model is the checkpoint given by --checkpoint (a run or checkpoint directory, e.g. a finished
`muse speedrun`), or else a randomly initialised llama of the speedrun's shape (its PRESET depth and
sequence length, --vocab-size); greedy decoding is deterministic, so random weights test the same
thing, and speed does not depend on the weights.

  python bench/engine_vs_transformers.py --threads 1 2
  python bench/engine_vs_transformers.py --checkpoint runs/speedrun --threads 1
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import random
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

import torch  # noqa: E402

from muse.infer.engine import Engine, EngineConfig  # noqa: E402
from muse.infer.generate import generate  # noqa: E402
from muse.infer.sampling_params import SamplingParams  # noqa: E402
from muse.infer.seq_attention import ATTENTION_BACKENDS  # noqa: E402

TOKENIZER_VOCAB = 300  # the tiny BPE a random model is saved with (the exporter needs a tokenizer)


# ---- models ------------------------------------------------------------------------------------------

def speedrun_shape() -> dict:
    from muse.cli.speedrun import PRESET

    return {"depth": PRESET["depth"], "max_seq_len": PRESET["seq_len"]}


def random_checkpoint(root: Path, depth: int, vocab_size: int, max_seq_len: int, seed: int) -> Path:
    """A run directory whose base stage holds a seeded random llama (a tiny BPE tokenizer goes with it:
    the exporter needs one; the bench itself works on token ids)."""
    from muse.checkpoint import save_checkpoint
    from muse.model import ModelConfig, build_model
    from muse.tokenizer import train_bpe

    rng = random.Random(seed)
    words = "the king queen lord lady love night day sword crown heart fair speak hear come go".split()
    tok = train_bpe([" ".join(rng.choice(words) for _ in range(60)) for _ in range(40)], vocab_size=TOKENIZER_VOCAB)
    torch.manual_seed(seed)
    model = build_model(ModelConfig.from_depth(depth, vocab_size, max_seq_len=max_seq_len))
    save_checkpoint(root / "base", 0, model=model, tokenizer=tok)
    return root


def load_models(args, work: Path):
    """(Muse model, transformers model) of the same weights, float32, eval mode."""
    from transformers import LlamaForCausalLM

    from muse.checkpoint import load
    from muse.checkpoint.hf_export import export_hf

    ckpt = Path(args.checkpoint) if args.checkpoint else random_checkpoint(
        work / "run", args.depth, args.vocab_size, args.max_seq_len, args.seed)
    model, _, _ = load(ckpt, device="cpu", dtype=torch.float32)
    hf_dir = args.hf_model
    if hf_dir is None:
        hf_dir = work / "hf"
        export_hf(ckpt, hf_dir, dtype="float32")
    hf = LlamaForCausalLM.from_pretrained(hf_dir, dtype=torch.float32).eval()
    hf.generation_config.eos_token_id = None  # eos ignored: every request runs to its own length
    return model.eval(), hf


# ---- workloads ---------------------------------------------------------------------------------------

def workload(args, vocab_size: int, dist: str) -> tuple[list[list[int]], list[int]]:
    rng = random.Random(args.seed)
    lo, hi = args.prompt_len
    prompts = [[rng.randrange(16, vocab_size) for _ in range(rng.randint(lo, hi))] for _ in range(args.prompts)]
    if dist == "uniform":
        lengths = [args.uniform_len] * args.prompts
    else:  # most short, one in --longtail-every as long as the uniform ones
        lengths = [args.uniform_len if i % args.longtail_every == args.longtail_every - 1
                   else rng.randint(*args.longtail_short) for i in range(args.prompts)]
    return prompts, lengths


# ---- the methods -------------------------------------------------------------------------------------

def run_engine(model, prompts, lengths, max_num_seqs: int, one_at_a_time: bool = False, backend: str = "auto"):
    """(outputs, seconds); building the engine is not timed."""
    longest = max(len(p) + m for p, m in zip(prompts, lengths))
    engine = Engine(model, EngineConfig(max_num_seqs=max_num_seqs, block_size=16, max_model_len=model.config.max_seq_len,
                                        num_blocks=max_num_seqs * -(-longest // 16) + 64, attention_backend=backend))
    outs: dict[int, list[int]] = {}

    def drain():
        while engine.has_unfinished_requests():
            for o in engine.step():
                if o.finished:
                    outs[int(o.request_id)] = o.token_ids

    t0 = time.perf_counter()
    for i, (p, m) in enumerate(zip(prompts, lengths)):
        engine.add_request(str(i), p, SamplingParams(max_tokens=m, temperature=0, ignore_eos=True))
        if one_at_a_time:
            drain()
    drain()
    return [outs[i] for i in range(len(prompts))], time.perf_counter() - t0


@torch.inference_mode()
def run_hf_static(hf, prompts, lengths, pad_id: int):
    """One generate call over the whole batch, left-padded; each row cut to its own length."""
    P = max(len(p) for p in prompts)
    ids = torch.tensor([[pad_id] * (P - len(p)) + p for p in prompts])
    mask = torch.tensor([[0] * (P - len(p)) + [1] * len(p) for p in prompts])
    t0 = time.perf_counter()
    out = hf.generate(input_ids=ids, attention_mask=mask, max_new_tokens=max(lengths), do_sample=False,
                      pad_token_id=pad_id)
    seconds = time.perf_counter() - t0
    return [row[P:P + m] for row, m in zip(out.tolist(), lengths)], seconds


@torch.inference_mode()
def run_hf_one(hf, prompts, lengths, pad_id: int):
    outs = []
    t0 = time.perf_counter()
    for p, m in zip(prompts, lengths):
        out = hf.generate(input_ids=torch.tensor([p]), attention_mask=torch.ones(1, len(p), dtype=torch.long),
                          max_new_tokens=m, do_sample=False, pad_token_id=pad_id)
        outs.append(out[0, len(p):].tolist())
    return outs, time.perf_counter() - t0


def run_plain(model, prompts, lengths):
    t0 = time.perf_counter()
    outs = [generate(model, p, max_new_tokens=m, temperature=0) for p, m in zip(prompts, lengths)]
    return outs, time.perf_counter() - t0


class PairedReplay(torch.nn.Module):
    """The engine's model, except that a step the engine runs through DecodeStep runs twice: through a fresh
    DecodeStep and through the reference plan, on the same pool (both write the same K/V), alternating
    which goes first; the CPU time (thread_time) of each plan + forward is recorded with the step's
    blocks and runs. The engine goes on with DecodeStep's logits."""

    def __init__(self, model):
        super().__init__()
        self.model, self.config = model, model.config
        self.rows: list[tuple[int, int, float, float]] = []  # (blocks, runs, reference s, decode s)
        self.max_diff = 0.0

    def forward(self, idx, kv_cache=None):
        from muse.infer.decode_attention import DecodeStep
        from muse.infer.seq_attention import make_step

        if not isinstance(kv_cache, DecodeStep):
            return self.model(idx, kv_cache=kv_cache)
        cfg, st = self.config, kv_cache
        build = {"reference": lambda: make_step("paged-reference", st.pool, st.spans, n_rep=cfg.n_head // cfg.n_kv_head,
                                                logits_indices=st.logits_indices),
                 "decode": lambda: DecodeStep(st.pool, st.spans, st.logits_indices)}
        seconds, out = {}, {}
        for name in (("reference", "decode") if len(self.rows) % 2 else ("decode", "reference")):
            t = time.thread_time()
            out[name] = self.model(idx, kv_cache=build[name]())
            seconds[name] = time.thread_time() - t
        self.max_diff = max(self.max_diff, (out["decode"] - out["reference"]).abs().max().item())
        self.rows.append((st.R, len(st.runs), seconds["reference"], seconds["decode"]))
        return out["decode"]


def paired_replay(model, args) -> tuple[str, float]:
    """The markdown table, and the largest difference between the two backends' logits."""
    worst = 0.0
    lines = ["| lengths | blocks read | steps | runs | reference ms/step | paged-decode ms/step | ratio |",
             "|---|---|---:|---|---:|---:|---:|"]
    for dist in args.lengths:
        prompts, lengths = workload(args, model.config.vocab_size, dist)
        replay = PairedReplay(model)
        run_engine(replay, prompts, lengths, len(prompts), backend=args.attention_backend)
        buckets: dict[int, list] = {}
        for blocks, runs, ref, dec in replay.rows:
            b = buckets.setdefault(min(blocks // 64 * 64, 1024), [0, set(), 0.0, 0.0])
            b[0] += 1
            b[1].add(runs)
            b[2] += ref
            b[3] += dec
        rows = sorted(buckets.items()) + [("all", [len(replay.rows), {r[1] for r in replay.rows},
                                                   sum(r[2] for r in replay.rows), sum(r[3] for r in replay.rows)])]
        for lo, (n, runs, ref, dec) in rows:
            if not n:
                continue
            span = lo if lo == "all" else (f"{lo}+" if lo == 1024 else f"{lo}-{lo + 63}")
            lines.append(f"| {dist} | {span} | {n} | {min(runs)}-{max(runs)} | {ref / n * 1e3:.2f} "
                         f"| {dec / n * 1e3:.2f} | {dec / ref:.3f} |")
        if not replay.rows:
            lines.append(f"| {dist} | - | 0 | - | - | - | - |")
        lines.append(f"| {dist} | max abs logit difference {replay.max_diff:.1e} | | | | | |")
        worst = max(worst, replay.max_diff)
    return "\n".join(lines) + "\n", worst


def first_mismatch(reference: list[list[int]], other: list[list[int]]) -> int | None:
    """Index of the first request whose tokens differ (None: all equal)."""
    for i, (a, b) in enumerate(zip(reference, other)):
        if a != b:
            return i
    return None if len(reference) == len(other) else min(len(reference), len(other))


# ---- one run -----------------------------------------------------------------------------------------

def bench_lengths(model, hf, args, dist: str) -> dict:
    prompts, lengths = workload(args, model.config.vocab_size, dist)
    total = sum(lengths)
    pad = hf.generation_config.pad_token_id or 0
    results = {"engine": run_engine(model, prompts, lengths, len(prompts), backend=args.attention_backend),
               "hf_static": run_hf_static(hf, prompts, lengths, pad)}
    if not args.skip_one:
        results["hf_one"] = run_hf_one(hf, prompts, lengths, pad)
    ref = results["engine"][0]
    row = {"lengths": dist, "requests": len(prompts), "output_tokens": total,
           "prompt_tokens": sum(map(len, prompts)), "longest": max(lengths)}
    mismatches = {}
    for name, (outs, seconds) in results.items():
        row[f"{name}_tok_s"] = total / seconds
        bad = first_mismatch(ref, outs)
        if bad is not None:
            mismatches[name] = bad
    for name in results:
        if name != "engine":
            row[f"engine_vs_{name}"] = row["engine_tok_s"] / row[f"{name}_tok_s"]
    row["identical"] = not mismatches
    row["first_mismatch"] = mismatches
    return row


def bench_batch1(model, args) -> dict:
    prompts, lengths = workload(args, model.config.vocab_size, "uniform")
    prompts, lengths = prompts[:args.batch1_prompts], lengths[:args.batch1_prompts]
    total = sum(lengths)
    # alternate: plain, engine, plain, engine; the faster of each is kept (load on a shared machine drifts)
    plain_t, engine_t, same = [], [], True
    for _ in range(args.batch1_repeats):
        p_out, t = run_plain(model, prompts, lengths)
        plain_t.append(t)
        e_out, t = run_engine(model, prompts, lengths, 1, one_at_a_time=True, backend=args.attention_backend)
        engine_t.append(t)
        same &= first_mismatch(p_out, e_out) is None
    row = {"requests": len(prompts), "output_tokens": total, "plain_tok_s": total / min(plain_t),
           "engine_tok_s": total / min(engine_t), "identical": same}
    row["engine_vs_plain"] = row["engine_tok_s"] / row["plain_tok_s"]
    return row


def warm_up(model, hf, args) -> None:
    prompts, lengths = [[17, 18, 19], [20, 21]], [3, 2]
    run_engine(model, prompts, lengths, 2)
    run_engine(model, prompts[:1], lengths[:1], 1)
    run_hf_static(hf, prompts, lengths, 0)
    run_hf_one(hf, prompts[:1], lengths[:1], 0)
    run_plain(model, prompts[:1], lengths[:1])


def markdown(args, model, results: list[dict]) -> str:
    cfg = model.config
    lines = [f"Command: `python bench/engine_vs_transformers.py {' '.join(args.argv)}`", "",
             f"CPU: {platform.processor() or platform.machine()}, {os.cpu_count()} cores; torch {torch.__version__}, "
             f"transformers {__import__('transformers').__version__}; model: "
             f"{args.checkpoint or 'random llama'} (depth {cfg.n_layer}, d_model {cfg.d_model}, "
             f"{cfg.n_head} heads, vocab {cfg.vocab_size}, max_seq_len {cfg.max_seq_len}), float32; "
             f"{args.prompts} prompts of {args.prompt_len[0]}-{args.prompt_len[1]} random tokens, greedy, eos ignored; "
             f"engine attention backend {args.attention_backend}.",
             "", "| threads | lengths | requests | output tokens | engine tok/s | hf static tok/s | hf one tok/s "
             "| engine / static | engine / one | identical |", "|---:|---|---:|---:|---:|---:|---:|---:|---:|:-:|"]
    for r in results:
        for row in r["lengths"]:
            one = row.get("hf_one_tok_s")
            one_s = "-" if one is None else f"{one:.0f}"
            one_x = "-" if one is None else f"{row['engine_vs_hf_one']:.1f}x"
            lines.append(
                f"| {r['threads']} | {row['lengths']} (longest {row['longest']}) | {row['requests']} "
                f"| {row['output_tokens']} | {row['engine_tok_s']:.0f} | {row['hf_static_tok_s']:.0f} "
                f"| {one_s} | {row['engine_vs_hf_static']:.2f}x | {one_x} "
                f"| {'yes' if row['identical'] else 'NO: ' + json.dumps(row['first_mismatch'])} |")
    lines += ["", "| threads | requests | output tokens | muse plain generate tok/s | engine (batch 1) tok/s "
              "| engine / plain | identical |", "|---:|---:|---:|---:|---:|---:|:-:|"]
    for r in results:
        b = r.get("batch1")
        if b:
            lines.append(f"| {r['threads']} | {b['requests']} | {b['output_tokens']} | {b['plain_tok_s']:.0f} "
                         f"| {b['engine_tok_s']:.0f} | {b['engine_vs_plain']:.2f}x | {'yes' if b['identical'] else 'NO'} |")
    return "\n".join(lines) + "\n"


def parse_args(argv):
    shape = speedrun_shape()
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", help="run or checkpoint directory (default: a random llama of the speedrun's shape)")
    p.add_argument("--hf-model", help="a transformers model directory to compare against (default: the "
                                      "checkpoint exported by muse's exporter)")
    p.add_argument("--depth", type=int, default=shape["depth"], help="random model: depth (default the speedrun's)")
    p.add_argument("--max-seq-len", type=int, default=shape["max_seq_len"],
                   help="random model: max_seq_len (default the speedrun's seq_len)")
    p.add_argument("--vocab-size", type=int, default=4096, help="random model: vocabulary")
    p.add_argument("--prompts", type=int, default=32)
    p.add_argument("--prompt-len", type=int, nargs=2, default=[16, 120])
    p.add_argument("--uniform-len", type=int, default=112, help="output tokens of every uniform / long request")
    p.add_argument("--longtail-short", type=int, nargs=2, default=[8, 32], help="output tokens of the short requests")
    p.add_argument("--longtail-every", type=int, default=8, help="one request in this many is long")
    p.add_argument("--lengths", nargs="+", choices=["uniform", "longtail"], default=["uniform", "longtail"])
    p.add_argument("--batch1-prompts", type=int, default=8, help="requests of the batch-1 comparison (0 skips it)")
    p.add_argument("--batch1-repeats", type=int, default=2)
    p.add_argument("--skip-one", action="store_true", help="skip transformers one prompt at a time (the slow one)")
    p.add_argument("--threads", type=int, nargs="+", default=[1], help="torch CPU threads, one run each")
    p.add_argument("--attention-backend", default="auto", choices=ATTENTION_BACKENDS,
                   help="the engine's attention backend (muse.infer.seq_attention)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", action="store_true", help="print one JSON object instead of markdown")
    p.add_argument("--paired-replay", action="store_true",
                   help="only the engine: its paged-decode steps also through the reference, timed in pairs")
    args = p.parse_args(argv)
    if args.prompts < 1 or args.longtail_every < 1 or args.uniform_len < 1:
        p.error("--prompts, --uniform-len and --longtail-every must be at least 1")
    if not 1 <= args.prompt_len[0] <= args.prompt_len[1]:
        p.error("--prompt-len needs 1 <= LO <= HI")
    if args.checkpoint is None and args.vocab_size < TOKENIZER_VOCAB:
        p.error(f"--vocab-size must be at least {TOKENIZER_VOCAB} (the random model's tokenizer)")
    args.argv = argv
    return args


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="muse-vs-hf-") as work:
        model, hf = load_models(args, Path(work))
        if max(args.prompt_len) + args.uniform_len > model.config.max_seq_len:
            print(f"error: prompts of up to {args.prompt_len[1]} tokens + {args.uniform_len} outputs exceed the "
                  f"model's max_seq_len ({model.config.max_seq_len}); lower --prompt-len or --uniform-len",
                  file=sys.stderr)
            return 2
        if args.paired_replay:
            worst = 0.0
            for threads in args.threads:
                torch.set_num_threads(threads)
                text, diff = paired_replay(model, args)
                print(f"threads {threads}\n\n" + text)
                worst = max(worst, diff)
            if worst > 1e-4:
                print(f"error: paged-decode's logits differ from the reference's by {worst:.1e}", file=sys.stderr)
                return 1
            return 0
        results = []
        for threads in args.threads:
            torch.set_num_threads(threads)
            with contextlib.redirect_stdout(sys.stderr):  # transformers' warnings stay off stdout
                warm_up(model, hf, args)
                r = {"threads": threads, "lengths": [bench_lengths(model, hf, args, d) for d in args.lengths]}
                if args.batch1_prompts:
                    r["batch1"] = bench_batch1(model, args)
            print(json.dumps(r), file=sys.stderr)
            results.append(r)
    print(json.dumps({"results": results}) if args.json else markdown(args, model, results))
    ok = all(row["identical"] for r in results for row in r["lengths"]) and \
        all(r["batch1"]["identical"] for r in results if "batch1" in r)
    if not ok:
        print("error: outputs differ between methods (see 'identical')", file=sys.stderr)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
