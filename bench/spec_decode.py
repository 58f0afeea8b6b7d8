"""Speculative decoding at batch 1: a trained target with a trained draft (and prompt lookup) vs plain decoding.

Issue #5's goal: >= 1.8x decode tokens/s at batch 1 with a draft model (on a GPU, where a step of a
large target costs about what verifying k + 1 tokens costs). The speed-up depends on how often the
draft agrees with the target, so random weights say nothing: both models must be trained on the same
text with the same tokenizer, e.g. on the embedded corpus:

  muse prepare --out runs/sd
  muse train runs/sd --depth 8                        # the target
  mkdir -p runs/sd-draft && ln -s ../sd/data runs/sd-draft/data
  muse train runs/sd-draft --depth 2                  # the draft: same data, same tokenizer
  python bench/spec_decode.py --target runs/sd --draft runs/sd-draft

Prompts are --prompts windows of --prompt-len tokens from the target run's validation split (text the
models did not train on), each decoded greedily for --max-tokens tokens, one request at a time. Rows:
plain decoding, the draft model proposing k tokens per step (`--k`, several values allowed) and prompt
lookup (n-gram) proposing k. Timed over the decode steps only (each prompt's prefill left out); the
greedy outputs of every row must equal plain decoding's token for token (checked, reported).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

import numpy as np  # noqa: E402
import torch  # noqa: E402

from muse.checkpoint import load  # noqa: E402
from muse.common.device import pick_device, synchronize  # noqa: E402
from muse.infer.engine import Engine, EngineConfig  # noqa: E402
from muse.infer.sampling_params import SamplingParams  # noqa: E402
from muse.infer.spec_decode import SpeculativeConfig  # noqa: E402
from muse.model import count_params  # noqa: E402


def val_prompts(run: Path, n: int, length: int, seed: int) -> list[list[int]]:
    """`n` windows of `length` tokens from the run's validation shards, at seeded random offsets."""
    shards = sorted((run / "data").glob("val_*.bin"))
    if not shards:
        raise SystemExit(f"{run}/data has no val_*.bin: pass --data with a prepared run directory (muse prepare)")
    tokens = np.concatenate([np.memmap(s, dtype=np.uint16, mode="r") for s in shards])
    if len(tokens) <= length:
        raise SystemExit(f"the validation split of {run} has {len(tokens)} tokens, fewer than --prompt-len {length}")
    rng = np.random.default_rng(seed)
    return [tokens[s:s + length].astype(np.int64).tolist() for s in rng.integers(0, len(tokens) - length, n)]


def decode(model, prompts, max_tokens: int, device, speculative=None) -> dict:
    """Batch-1 greedy decoding of each prompt in turn; decode seconds (prefills excluded) and outputs."""
    engine = Engine(model, EngineConfig(max_num_seqs=1, enable_prefix_caching=False, speculative=speculative))
    params = SamplingParams(max_tokens=max_tokens, temperature=0, ignore_eos=True)
    seconds, outputs, tokens = 0.0, [], 0
    for i, prompt in enumerate(prompts):
        engine.add_request(str(i), prompt, params)
        out = []
        while not out:  # the prefill ends with the first token
            out = [t for o in engine.step() for t in o.outputs[0].new_token_ids]
        synchronize(device)
        t0 = time.perf_counter()
        first = len(out)
        while engine.has_unfinished_requests():
            out += [t for o in engine.step() for t in o.outputs[0].new_token_ids]
        synchronize(device)
        seconds += time.perf_counter() - t0
        tokens += len(out) - first
        outputs.append(out)
    stats = engine.stats()
    return {"seconds": seconds, "tokens": tokens, "tok_s": tokens / seconds, "outputs": outputs,
            "acceptance": stats.spec_acceptance_rate, "steps": stats.num_steps}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--target", required=True, help="run, stage or checkpoint directory of the target model")
    p.add_argument("--draft", required=True, help="the draft model's (same tokenizer and vocabulary)")
    p.add_argument("--data", help="prepared run directory for prompts (default: the target's run directory)")
    p.add_argument("--k", type=int, nargs="+", default=[4], help="tokens proposed per step (default 4)")
    p.add_argument("--prompts", type=int, default=8)
    p.add_argument("--prompt-len", type=int, default=64)
    p.add_argument("--max-tokens", type=int, default=128)
    p.add_argument("--device", default="auto")
    p.add_argument("--dtype", default=None, help="bfloat16 (default on accelerators) or float32 (default on cpu)")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json-out", metavar="PATH")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = pick_device(args.device)
    dtype = getattr(torch, args.dtype) if args.dtype else (torch.float32 if device.type == "cpu" else torch.bfloat16)
    target, tok, meta = load(args.target, device=device, dtype=dtype, stages=None)
    draft, draft_tok, _ = load(args.draft, device=device, dtype=dtype, stages=None)
    if draft.config.vocab_size != target.config.vocab_size or (
            tok is not None and draft_tok is not None and tok.vocab_size != draft_tok.vocab_size):
        raise SystemExit("the draft's vocabulary differs from the target's: train both on the same prepared data")
    data = Path(args.data) if args.data else Path(meta["path"]).parents[1]
    prompts = val_prompts(data, args.prompts, args.prompt_len, args.seed)
    decode(target, prompts[:1], 8, device)  # warm-up: allocator, kernels
    rows = {"plain": decode(target, prompts, args.max_tokens, device)}
    for k in args.k:
        rows[f"draft k={k}"] = decode(target, prompts, args.max_tokens, device,
                                      SpeculativeConfig(method="draft", num_tokens=k, draft_model=draft))
        rows[f"ngram k={k}"] = decode(target, prompts, args.max_tokens, device,
                                      SpeculativeConfig(method="ngram", num_tokens=k))
    base = rows["plain"]
    name = torch.cuda.get_device_name() if device.type == "cuda" else "cpu"
    print(f"device {name}, {str(dtype).removeprefix('torch.')}, torch {torch.__version__}, "
          f"{torch.get_num_threads()} CPU threads; target {count_params(target.config) / 1e6:.1f}M params "
          f"(depth {target.config.n_layer}), draft {count_params(draft.config) / 1e6:.1f}M (depth "
          f"{draft.config.n_layer}); {args.prompts} prompts of {args.prompt_len} validation tokens, "
          f"{args.max_tokens} greedy tokens each, batch 1")
    print("| decoding | decode tok/s | speed-up | draft acceptance | tokens per target step | same output as plain |")
    print("|---|---:|---:|---:|---:|:-:|")
    report = {"device": name, "dtype": str(dtype), "rows": {}}
    for label, r in rows.items():
        same = r["outputs"] == base["outputs"]
        acc = "-" if r["acceptance"] is None else f"{r['acceptance']:.0%}"
        per_step = (r["tokens"] + len(prompts)) / max(r["steps"], 1)
        print(f"| {label} | {r['tok_s']:.1f} | **{r['tok_s'] / base['tok_s']:.2f}x** | {acc} | {per_step:.2f} "
              f"| {'yes' if same else 'NO'} |")
        report["rows"][label] = {k: v for k, v in r.items() if k != "outputs"} | {"same_as_plain": same}
    if args.json_out:
        Path(args.json_out).write_text(json.dumps(report, indent=1))
    return 0 if all(r["same_as_plain"] for r in report["rows"].values()) else 1


if __name__ == "__main__":
    sys.exit(main())
