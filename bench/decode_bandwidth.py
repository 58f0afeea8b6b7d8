"""Batch-1 decode as a fraction of measured memory bandwidth (issue #5's GPU goal: >= 75% for ~1B bf16).

Decoding one sequence is memory-bound: every new token reads every weight once, plus the K/V of the
context so far. So the best tokens/s a device can reach is (bytes it can move per second) / (bytes per
token), and the fraction of that a decoder reaches says how much of the time goes to anything else
(Python, kernel launches, synchronisation, non-fused attention). gpt-fast reports ~72% on an A100.

  bytes per token  = the weights' bytes (every matrix, the output head included; the token embedding
                     contributes one row) + the K/V bytes read at the average context length
  copy rate        = a device-to-device copy of --copy-mib MiB, read + written bytes per second (the
                     median of 10 after 3 warm-up copies): what this device's memory really sustains
  fraction         = bytes per token x decode tokens/s / copy rate

Two decoders, both greedy from a --prompt-len prompt for --max-tokens tokens, timed over the decode
steps only (the prompt's prefill is left out):
  engine     muse.infer.engine (paged KV, the step loop `muse serve` runs), max_num_seqs 1;
  generate   muse.infer.generate (a contiguous KV cache, no scheduler): the floor for the engine's
             per-step overhead.

The default shape is ~1B parameters (depth 16, width 2048, vocab 32,768) in bf16 on an accelerator;
on CPU pass a smaller one (the weights are random: this measures speed, not text).

  python bench/decode_bandwidth.py --device cuda
  python bench/decode_bandwidth.py --device cpu --depth 4 --d-model 512 --vocab-size 8192 --threads 1
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

import torch  # noqa: E402

from muse.common.device import pick_device, synchronize  # noqa: E402
from muse.infer.engine import Engine, EngineConfig  # noqa: E402
from muse.infer.generate import generate_stream  # noqa: E402
from muse.infer.sampling_params import SamplingParams  # noqa: E402
from muse.model import ModelConfig, build_model, count_params  # noqa: E402


def copy_rate(device, mib: int) -> float:
    """Bytes per second a device-to-device copy moves (bytes read + bytes written)."""
    n = mib * (1 << 20) // 4
    src = torch.empty(n, dtype=torch.float32, device=device).uniform_()
    dst = torch.empty_like(src)
    times = []
    for i in range(13):
        synchronize(device)
        t0 = time.perf_counter()
        dst.copy_(src)
        synchronize(device)
        if i >= 3:
            times.append(time.perf_counter() - t0)
    return 2 * src.numel() * src.element_size() / statistics.median(times)


def bytes_per_token(model, cfg: ModelConfig, context: float, dtype: torch.dtype) -> float:
    size = torch.tensor([], dtype=dtype).element_size()
    weights = sum(p.numel() for n, p in model.named_parameters() if n != "tok_embeddings.weight")
    weights += cfg.d_model  # one embedding row (a tied head is the embedding matrix: counted above as output)
    if cfg.tie_embeddings:
        weights += cfg.vocab_size * cfg.d_model
    kv = 2 * cfg.n_layer * cfg.n_kv_head * cfg.head_dim * context
    return (weights + kv) * size


def engine_decode(model, prompt: list[int], max_tokens: int, device) -> tuple[float, int]:
    """(decode seconds, decoded tokens) for one request alone in the engine; the prefill step(s) excluded."""
    engine = Engine(model, EngineConfig(max_num_seqs=1, enable_prefix_caching=False))
    engine.add_request("r", prompt, SamplingParams(max_tokens=max_tokens, temperature=0, ignore_eos=True))
    got = 0
    while got == 0:  # the prefill (possibly chunked) ends with the first sampled token
        got = sum(len(o.outputs[0].new_token_ids) for o in engine.step())
    synchronize(device)
    t0 = time.perf_counter()
    n = 0
    while engine.has_unfinished_requests():
        n += sum(len(o.outputs[0].new_token_ids) for o in engine.step())
    synchronize(device)
    return time.perf_counter() - t0, n


def generate_decode(model, prompt: list[int], max_tokens: int, device) -> tuple[float, int]:
    stream = generate_stream(model, prompt, max_new_tokens=max_tokens, temperature=0)
    next(stream)  # prefill + the first token
    synchronize(device)
    t0 = time.perf_counter()
    n = sum(1 for _ in stream)
    synchronize(device)
    return time.perf_counter() - t0, n


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="auto")
    p.add_argument("--dtype", default=None, help="bfloat16 (default on accelerators) or float32 (default on cpu)")
    p.add_argument("--depth", type=int, default=16)
    p.add_argument("--d-model", type=int, default=2048)
    p.add_argument("--n-head", type=int, default=None, help="default: d_model / 128")
    p.add_argument("--n-kv-head", type=int, default=None, help="default: n_head / 4 (grouped-query attention)")
    p.add_argument("--vocab-size", type=int, default=32768)
    p.add_argument("--prompt-len", type=int, default=128)
    p.add_argument("--max-tokens", type=int, default=256)
    p.add_argument("--repeats", type=int, default=3, help="timed runs per decoder; the fastest is reported")
    p.add_argument("--copy-mib", type=int, default=1024)
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    p.add_argument("--json-out", metavar="PATH")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = pick_device(args.device)
    dtype = getattr(torch, args.dtype) if args.dtype else (torch.float32 if device.type == "cpu" else torch.bfloat16)
    n_head = args.n_head or max(1, args.d_model // 128)
    n_kv = args.n_kv_head or max(1, n_head // 4)
    cfg = ModelConfig(vocab_size=args.vocab_size, n_layer=args.depth, d_model=args.d_model, n_head=n_head,
                      n_kv_head=n_kv, max_seq_len=args.prompt_len + args.max_tokens + 16)
    torch.manual_seed(0)
    model = build_model(cfg, device=device, dtype=dtype).eval()
    prompt = torch.randint(0, cfg.vocab_size, (args.prompt_len,)).tolist()
    rate = copy_rate(device, args.copy_mib)
    context = args.prompt_len + args.max_tokens / 2  # the average context a decode step reads
    per_token = bytes_per_token(model, cfg, context, dtype)
    rows = {}
    for name, fn in (("engine", engine_decode), ("generate", generate_decode)):
        fn(model, prompt, min(16, args.max_tokens), device)  # warm-up: allocator, kernels
        best = min((fn(model, prompt, args.max_tokens, device) for _ in range(args.repeats)),
                   key=lambda r: r[0] / max(r[1], 1))
        tok_s = best[1] / best[0]
        rows[name] = {"tokens": best[1], "tok_s": tok_s, "fraction": per_token * tok_s / rate}
    report = {"device": str(device), "name": torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
              "dtype": str(dtype).removeprefix("torch."), "params": count_params(cfg), "bytes_per_token": per_token,
              "copy_rate_gb_s": rate / 1e9, "torch": torch.__version__, "threads": torch.get_num_threads(),
              "rows": rows}
    print(f"device {report['name']} ({device}), {report['dtype']}, torch {torch.__version__}, "
          f"{report['threads']} CPU threads; {report['params'] / 1e6:.0f}M params (depth {cfg.n_layer}, d_model "
          f"{cfg.d_model}, {n_head}/{n_kv} heads, vocab {cfg.vocab_size}); prompt {args.prompt_len}, "
          f"{args.max_tokens} tokens")
    print(f"measured copy rate {rate / 1e9:.1f} GB/s; {per_token / 1e6:.1f} MB read per token "
          f"(weights + K/V at context {context:.0f}) -> at most {rate / per_token:.0f} tok/s")
    print("| decoder | decode tok/s | fraction of measured bandwidth |")
    print("|---|---:|---:|")
    for name, r in rows.items():
        print(f"| {name} | {r['tok_s']:.1f} | **{r['fraction']:.0%}** |")
    if args.json_out:
        Path(args.json_out).write_text(json.dumps(report, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
