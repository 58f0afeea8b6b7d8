"""Inference engine throughput vs sequential generation and static batching; prefix-cache TTFT.

Three ways to serve the same requests with the same randomly initialised model, greedy, eos ignored
(every request generates exactly its own max_tokens, drawn from --output-len, uniformly or
long-tailed with --output-dist longtail):
  sequential  muse.infer.generate (contiguous KV cache), one request at a time;
  static      batches of C requests, prompts left-padded (a key-padding mask keeps the padding out of
              attention), each batch runs until its longest request is done (written below);
  engine      muse.infer.engine with max_num_seqs = C: continuous batching, paged KV, chunked prefill.
Output tokens/s counts only requested tokens (static batching's padding steps are not credited).
Concurrency C serves the first max(16, 4 C) requests of the workload (--num-requests caps it): a
few waves of C for a steady state, and a bounded run at C = 1. The sequential baseline is timed on
the first --sequential-requests requests (its tokens/s does not depend on concurrency), at the start
and again at the end; the faster run is reported. Results print as JSON lines on stderr as they come
and as a markdown table at the end.
Greedy outputs of the three are compared (a sanity check that every path computes the same thing).

Then time to first token for requests that share a --prefix-len token prefix (plus a short unique
suffix), sent one after another, with the prefix cache on and off.

--decode-paths: the engine with its static decode path off and on, same requests, at each
--concurrency (on CUDA "on" is CUDA graphs; elsewhere the same padded path run eagerly, which only
checks it: it is not faster on CPU). Tok/s of both, greedy outputs compared (exit 1 on a difference).

--host-cost C ..: the host time per decode step, by phase (EngineStats.host_seconds: schedule,
prepare, forward, sample, update, output), with C requests decoding together (no prefill in the
timed window), for each decode path; set against the time one decode step of a ~1B bf16 model takes
on an H100 / H200 at full memory bandwidth (its weights' bytes / the bandwidth in muse.common.device).

--smoke: a tiny model and a small workload through every section (seconds on a CPU), so the script
does not rot between GPU sessions.

  python bench/engine.py --device cpu --depth 4 --d-model 256 --concurrency 1 8 32 64
  python bench/engine.py --device cuda --depth 12 --concurrency 1 8 32 64 128 --num-requests 256
  python bench/engine.py --threads 1 --skip-throughput --skip-prefix --host-cost 1 32
  python bench/engine.py --device cuda --skip-throughput --skip-prefix --decode-paths --concurrency 1 8 32 --host-cost 1 32
  python bench/engine.py --smoke
"""

from __future__ import annotations

import argparse
import json
import platform
import random
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from muse.common.device import PEAKS, pick_device, synchronize  # noqa: E402
from muse.infer.engine import HOST_PHASES, Engine, EngineConfig  # noqa: E402
from muse.infer.generate import generate  # noqa: E402
from muse.infer.sampling_params import SamplingParams  # noqa: E402
from muse.infer.seq_attention import ATTENTION_BACKENDS  # noqa: E402
from muse.model import ModelConfig, build_model, count_params  # noqa: E402

# bench/decode_bandwidth.py's default ~1B shape: the model whose GPU decode step the host must keep up with
ONE_B = ModelConfig(vocab_size=32768, n_layer=16, d_model=2048, n_head=16, n_kv_head=4, max_seq_len=2048)

# ---- the static-batching baseline ------------------------------------------------------------------

class PaddedBatchCache:
    """Contiguous (B, Hkv, S, D) K/V for a left-padded batch; implements the model's cache protocol
    with `attend` so that padded key positions are masked out. Rotary embeddings are relative, so a
    row shifted right by its padding attends exactly as it would alone (llama only; gpt2's learned
    positions would need per-row positions)."""

    def __init__(self, cfg, pads: list[int], max_len: int, device, dtype):
        B = len(pads)
        shape = (cfg.n_layer, B, cfg.n_kv_head, max_len, cfg.head_dim)
        self.k = torch.zeros(shape, device=device, dtype=dtype)
        self.v = torch.zeros(shape, device=device, dtype=dtype)
        self.pads = torch.tensor(pads, device=device)[:, None, None, None]  # (B, 1, 1, 1)
        self.pos = 0

    def attend(self, layer, q, k, v):
        T = q.size(2)
        end = self.pos + T
        self.k[layer, :, :, self.pos:end] = k
        self.v[layer, :, :, self.pos:end] = v
        keys = torch.arange(end, device=q.device)
        qpos = torch.arange(self.pos, end, device=q.device)[:, None]
        mask = (keys >= self.pads) & (keys <= qpos)  # (B, 1, T, end)
        return F.scaled_dot_product_attention(q, self.k[layer, :, :, :end], self.v[layer, :, :, :end],
                                              attn_mask=mask, enable_gqa=q.size(1) != k.size(1))

    def advance(self, T):
        self.pos += T


@torch.no_grad()
def static_batch_generate(model, prompts: list[list[int]], max_tokens: list[int], pad_id: int = 0):
    """Greedy outputs of one static batch: left-pad, prefill together, decode max(max_tokens) steps."""
    cfg, param = model.config, next(model.parameters())
    P = max(len(p) for p in prompts)
    steps = max(max_tokens)
    pads = [P - len(p) for p in prompts]
    cache = PaddedBatchCache(cfg, pads, P + steps, param.device, param.dtype)
    idx = torch.tensor([[pad_id] * pad + p for pad, p in zip(pads, prompts)], device=param.device)
    tok = model(idx, kv_cache=cache)[:, -1].argmax(-1)
    out = [tok]
    for _ in range(steps - 1):
        tok = model(tok[:, None], kv_cache=cache)[:, -1].argmax(-1)
        out.append(tok)
    out = torch.stack(out, 1).tolist()
    return [row[:m] for row, m in zip(out, max_tokens)]


# ---- runs --------------------------------------------------------------------------------------------

def timed(fn, device):
    synchronize(device)
    t0 = time.perf_counter()
    result = fn()
    synchronize(device)
    return result, time.perf_counter() - t0


def decode_config(args, static: bool | None = None) -> dict:
    """EngineConfig fields of the decode path: `static` None -> --cuda-graphs / --static-decode-eager;
    False -> off; True -> CUDA graphs on CUDA, the eager static path elsewhere."""
    if static is None:
        graphs = {"auto": args.device_type == "cuda", "on": True, "off": False}[args.cuda_graphs]
        return dict(cuda_graphs=graphs, static_decode_eager=args.static_decode_eager)
    if not static:
        return dict(cuda_graphs=False)
    return dict(cuda_graphs=True) if args.device_type == "cuda" else dict(static_decode_eager=True)


def make_engine(model, concurrency, longest, args, static: bool | None = None) -> Engine:
    # a pool for `concurrency` requests of the longest length in the workload (at least one
    # max_seq_len sequence, which the engine insists on), plus slack
    num_blocks = args.num_blocks or max(concurrency * longest, args.max_seq_len) // args.block_size + 64
    return Engine(model, EngineConfig(max_num_seqs=concurrency, block_size=args.block_size,
                                      max_num_batched_tokens=args.max_batched_tokens,
                                      max_model_len=args.max_seq_len, num_blocks=num_blocks,
                                      attention_backend=args.attention_backend, **decode_config(args, static)))


def run_engine(model, prompts, max_tokens, concurrency, args, device, static: bool | None = None):
    """(outputs, stats, seconds): building the engine (allocating its pool, capturing graphs) is not timed."""
    longest = max(len(p) + m for p, m in zip(prompts, max_tokens))
    engine = make_engine(model, concurrency, longest, args, static)

    def go():
        for i, (p, m) in enumerate(zip(prompts, max_tokens)):
            engine.add_request(str(i), p, SamplingParams(max_tokens=m, temperature=0, ignore_eos=True))
        outs = {}
        while engine.has_unfinished_requests():
            for o in engine.step():
                if o.finished:
                    outs[int(o.request_id)] = o.token_ids
        return [outs[i] for i in range(len(prompts))]

    outs, seconds = timed(go, device)
    return outs, engine.stats(), seconds


def run_static(model, prompts, max_tokens, batch_size):
    out = []
    for i in range(0, len(prompts), batch_size):
        out += static_batch_generate(model, prompts[i:i + batch_size], max_tokens[i:i + batch_size])
    return out


def throughput(model, args, device):
    n_req = args.num_requests  # concurrency C serves the first min(n_req, max(16, 4 C)) of them
    prompts, max_tokens = workload(args, model.config.vocab_size, n_req, args.seed)
    rows = []
    # warm up every path once (allocator, kernels)
    run_engine(model, prompts[:4], [4] * 4, 4, args, device)
    static_batch_generate(model, prompts[:4], [4] * 4)
    generate(model, prompts[0], max_new_tokens=4, temperature=0)

    n_seq = min(args.sequential_requests, n_req)

    def sequential():
        out, t = timed(lambda: [generate(model, p, max_new_tokens=m, temperature=0)
                                for p, m in zip(prompts[:n_seq], max_tokens[:n_seq])], device)
        print(f"sequential: {sum(max_tokens[:n_seq]) / t:.1f} tok/s over {n_seq} requests", file=sys.stderr)
        return out, sum(max_tokens[:n_seq]) / t

    seq_out, seq_tps = sequential()
    for c in args.concurrency:
        n = min(n_req, max(16, 4 * c))  # enough waves for a steady state, and a bounded run at C = 1
        ps, ms = prompts[:n], max_tokens[:n]
        total = sum(ms)
        st_out, t_st = timed(lambda c=c, ps=ps, ms=ms: run_static(model, ps, ms, c), device)
        en_out, stats, t_en = run_engine(model, ps, ms, c, args, device)
        k = min(n, n_seq)
        same = (en_out[:k] == seq_out[:k]) and (st_out == en_out)
        row = dict(concurrency=c, requests=n, output_tokens=total, sequential_tok_s=seq_tps,
                   static_tok_s=total / t_st, engine_tok_s=total / t_en, vs_sequential=total / t_en / seq_tps,
                   vs_static=t_st / t_en, engine_steps=stats.num_steps, preemptions=stats.num_preemptions,
                   outputs_identical=same)
        print(json.dumps(row), file=sys.stderr)
        rows.append(row)
    # measured again at the end; the faster of the two is the baseline (load on a shared machine drifts)
    seq_tps = max(seq_tps, sequential()[1])
    for row in rows:
        row["sequential_tok_s"], row["vs_sequential"] = seq_tps, row["engine_tok_s"] / seq_tps
    return rows


def prefix_ttft(model, args, device):
    rng = random.Random(args.seed + 1)
    V = model.config.vocab_size
    prefix = [rng.randrange(16, V) for _ in range(args.prefix_len)]
    prompts = [prefix + [rng.randrange(16, V) for _ in range(32)] for _ in range(args.prefix_requests + 1)]
    rows = []
    for on in (True, False):
        num_blocks = args.num_blocks or max(8 * len(prompts[0]), args.max_seq_len) // args.block_size + 64
        engine = Engine(model, EngineConfig(max_num_seqs=8, block_size=args.block_size, enable_prefix_caching=on,
                                            max_num_batched_tokens=args.max_batched_tokens,
                                            max_model_len=args.max_seq_len, num_blocks=num_blocks,
                                            **decode_config(args)))
        ttfts = []
        for i, p in enumerate(prompts):  # one after another; request 0 fills the cache (not counted)
            synchronize(device)
            t0 = time.perf_counter()
            engine.add_request(str(i), p, SamplingParams(max_tokens=1, temperature=0))
            while engine.has_unfinished_requests():
                engine.step()
            synchronize(device)
            if i:
                ttfts.append(time.perf_counter() - t0)
        rows.append(dict(prefix_cache=on, prefix_len=args.prefix_len, requests=len(ttfts),
                         mean_ttft_ms=1e3 * sum(ttfts) / len(ttfts),
                         hit_rate=engine.stats().prefix_cache_hit_rate))
        print(json.dumps(rows[-1]), file=sys.stderr)
    return rows


def workload(args, V: int, n: int, seed: int):
    rng = random.Random(seed)
    prompts = [[rng.randrange(16, V) for _ in range(rng.randint(*args.prompt_len))] for _ in range(n)]
    lo, hi = args.output_len
    if args.output_dist == "uniform":
        max_tokens = [rng.randint(lo, hi) for _ in range(n)]
    else:  # long-tailed, like chat replies: lo + Exp(mean (hi - lo) / 4), capped at hi
        max_tokens = [min(hi, lo + int(rng.expovariate(4 / (hi - lo)))) for _ in range(n)]
    return prompts, max_tokens


def decode_paths(model, args, device):
    """The engine with the static decode path off and on, same requests: tok/s and outputs compared."""
    V = model.config.vocab_size
    prompts, max_tokens = workload(args, V, args.num_requests, args.seed + 2)
    for static in (False, True):  # warm-up (allocator, kernels)
        run_engine(model, prompts[:4], [4] * 4, 4, args, device, static)
    rows = []
    for c in args.concurrency:
        n = min(args.num_requests, max(16, 4 * c))
        ps, ms = prompts[:n], max_tokens[:n]
        row = dict(concurrency=c, requests=n, output_tokens=sum(ms))
        outs = {}
        for static in (False, True):
            out, stats, t = run_engine(model, ps, ms, c, args, device, static)
            name = "static" if static else "off"
            outs[name] = out
            row[f"{name}_tok_s"] = sum(ms) / t
        row.update(static_decode=stats.static_decode, static_steps=stats.num_static_steps, steps=stats.num_steps,
                   cuda_graph_bytes=stats.cuda_graph_bytes)
        row["static_vs_off"] = row["static_tok_s"] / row["off_tok_s"]
        row["outputs_identical"] = outs["off"] == outs["static"]
        print(json.dumps(row), file=sys.stderr)
        rows.append(row)
    return rows


def host_cost(model, args, device):
    """Host seconds per decode step by phase, C requests decoding together, for each decode path."""
    V = model.config.vocab_size
    rng = random.Random(args.seed + 3)
    warm, window = 4, args.host_cost_steps
    rows = []
    for c in args.host_cost:
        # prompts short enough to be prefilled in the first step; every request outlives the window
        plen = min(args.host_cost_prompt, args.max_batched_tokens // c)
        prompts = [[rng.randrange(16, V) for _ in range(plen)] for _ in range(c)]
        for static in (False, True):
            engine = make_engine(model, c, plen + warm + window + 2, args, static)
            if args.host_only:
                stub_forward(engine, c, V, device)
            for i, p in enumerate(prompts):
                engine.add_request(str(i), p, SamplingParams(max_tokens=warm + window + 2, temperature=0,
                                                             ignore_eos=True))
            for _ in range(warm):
                engine.step()
            before = engine.stats()
            synchronize(device)
            t0 = time.perf_counter()
            for _ in range(window):
                engine.step()
            synchronize(device)
            wall = time.perf_counter() - t0
            after = engine.stats()
            assert after.num_running == c and after.num_waiting == 0, "a request left the timed window"
            steps = after.num_steps - before.num_steps
            per = {k: (after.host_seconds[k] - before.host_seconds[k]) / steps * 1e6 for k in HOST_PHASES}
            row = dict(concurrency=c, context=plen + warm + window // 2, static_decode=after.static_decode,
                       static_steps=after.num_static_steps - before.num_static_steps, steps=steps,
                       step_us=wall / steps * 1e6, **{f"{k}_us": v for k, v in per.items()})
            row["host_us"] = sum(v for k, v in per.items() if k != "forward")
            row["argmax_us"] = argmax_us(c, V, device)
            print(json.dumps(row), file=sys.stderr)
            rows.append(row)
    return rows


def stub_forward(engine: Engine, rows: int, V: int, device) -> None:
    """--host-only: the engine's forward becomes a fixed (rows, V) logits tensor (greedy tokens are then
    the same every step, which is all the host's bookkeeping needs): what is left is the host's own work,
    with no device compute to wait for or to evict its caches."""
    fixed = torch.randn(rows, V, device=device)
    engine.runner.model = lambda ids, kv_cache: fixed[None, :ids.size(1)]  # eager steps (logits rows = rows)
    if engine.runner.decode_graphs is not None:
        engine.runner.decode_graphs.run = lambda key: fixed


def argmax_us(rows: int, V: int, device) -> float:
    """The greedy argmax over (rows, V) float32 logits alone (median of 20): part of "sample", but
    device work (on a CPU it is computed right there; a GPU runs it as one kernel)."""
    x = torch.randn(rows, V, device=device)
    times = []
    for _ in range(20):
        synchronize(device)
        t0 = time.perf_counter()
        x.argmax(-1).tolist()
        times.append(time.perf_counter() - t0)
    return sorted(times)[10] * 1e6


def one_b_step_us() -> dict[str, float]:
    """Microseconds one decode step of ONE_B in bf16 takes at the data-sheet bandwidth: every weight read
    once (the output head included, the embedding table not), K/V left out."""
    weights = count_params(ONE_B, non_embedding=True) * 2
    return {name: weights / bw * 1e6 for name, _, bw in PEAKS if name in ("H100", "H200")}


def markdown(args, device, rows, prefix_rows, path_rows=(), host_rows=()) -> str:
    cpu = platform.processor() or platform.machine()
    dev = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU ({cpu}), {torch.get_num_threads()} threads"
    lines = [f"Command: `python bench/engine.py {' '.join(sys.argv[1:])}`", "",
             f"Device: {dev}; torch {torch.__version__}; model: llama depth {args.depth}, d_model {args.d_model}, "
             f"vocab {args.vocab_size}, {args.dtype}; prompts {args.prompt_len[0]}-{args.prompt_len[1]} tokens, "
             f"outputs {args.output_len[0]}-{args.output_len[1]} tokens ({args.output_dist}), greedy, eos ignored."]
    if rows:
        lines += ["", "| concurrency | requests | sequential tok/s | static tok/s | engine tok/s | engine / sequential "
                  "| engine / static | same outputs |", "|---:|---:|---:|---:|---:|---:|---:|:-:|"]
    for r in rows:
        lines.append(f"| {r['concurrency']} | {r['requests']} | {r['sequential_tok_s']:.0f} | {r['static_tok_s']:.0f} "
                     f"| {r['engine_tok_s']:.0f} | {r['vs_sequential']:.1f}x | {r['vs_static']:.2f}x "
                     f"| {'yes' if r['outputs_identical'] else 'NO'} |")
    if prefix_rows:
        lines += ["", "| prefix cache | shared prefix | requests | mean TTFT (ms) | hit rate |", "|---|---:|---:|---:|---:|"]
    for r in prefix_rows:
        lines.append(f"| {'on' if r['prefix_cache'] else 'off'} | {r['prefix_len']} | {r['requests']} "
                     f"| {r['mean_ttft_ms']:.1f} | {r['hit_rate']:.2f} |")
    if path_rows:
        lines += ["", "| concurrency | requests | static path | off tok/s | static tok/s | static / off | static steps "
                  "| graph MiB | same outputs |", "|---:|---:|---|---:|---:|---:|---:|---:|:-:|"]
    for r in path_rows:
        lines.append(f"| {r['concurrency']} | {r['requests']} | {r['static_decode']} | {r['off_tok_s']:.0f} "
                     f"| {r['static_tok_s']:.0f} | {r['static_vs_off']:.2f}x | {r['static_steps']}/{r['steps']} "
                     f"| {r['cuda_graph_bytes'] / 2**20:.0f} | {'yes' if r['outputs_identical'] else 'NO'} |")
    if host_rows:
        ref = one_b_step_us()
        lines += ["", f"Host time per decode step (us), {args.host_cost_steps} decode-only steps"
                  f"{' (forward stubbed: --host-only)' if args.host_only else ''}; \"host\" = every "
                  f"phase but forward. A ~1B bf16 decode step ({count_params(ONE_B) / 1e6:.0f}M params) at "
                  "data-sheet bandwidth: " + ", ".join(f"{k} {v:.0f} us" for k, v in ref.items()) + ".", "",
                  "| concurrency | decode path | schedule | prepare | sample (argmax alone) | update | output | **host** "
                  "| forward | step (wall) | host / H100 1B step |", "|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in host_rows:
        lines.append(f"| {r['concurrency']} | {r['static_decode']} | {r['schedule_us']:.0f} | {r['prepare_us']:.0f} "
                     f"| {r['sample_us']:.0f} ({r['argmax_us']:.0f}) | {r['update_us']:.0f} | {r['output_us']:.0f} "
                     f"| **{r['host_us']:.0f}** | {r['forward_us']:.0f} | {r['step_us']:.0f} "
                     f"| {r['host_us'] / one_b_step_us()['H100']:.2f} |")
    return "\n".join(lines) + "\n"


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default=None, help="float32 (default on cpu) or bfloat16 (default elsewhere)")
    p.add_argument("--depth", type=int, default=4)
    p.add_argument("--d-model", type=int, default=256)
    p.add_argument("--vocab-size", type=int, default=4096)
    p.add_argument("--max-seq-len", type=int, default=2048)
    p.add_argument("--concurrency", type=int, nargs="+", default=[1, 8, 32, 64])
    p.add_argument("--num-requests", type=int, default=256,
                   help="workload size; concurrency C serves the first min(this, max(16, 4 C)) requests")
    p.add_argument("--sequential-requests", type=int, default=16, help="requests timed for the sequential baseline")
    p.add_argument("--prompt-len", type=int, nargs=2, default=[16, 256])
    p.add_argument("--output-len", type=int, nargs=2, default=[16, 256])
    p.add_argument("--output-dist", choices=["uniform", "longtail"], default="uniform",
                   help="output lengths: uniform in --output-len, or lo + exponential with mean (hi - lo) / 4, capped at hi")
    p.add_argument("--block-size", type=int, default=16)
    p.add_argument("--num-blocks", type=int, default=None,
                   help="KV blocks (default: concurrency x the longest request, plus 64)")
    p.add_argument("--max-batched-tokens", type=int, default=2048)
    p.add_argument("--attention-backend", default="auto", choices=ATTENTION_BACKENDS,
                   help="the engine's attention backend (muse.infer.seq_attention)")
    p.add_argument("--prefix-len", type=int, default=1000)
    p.add_argument("--prefix-requests", type=int, default=8)
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--skip-throughput", action="store_true")
    p.add_argument("--skip-prefix", action="store_true", help="skip the prefix-cache TTFT section")
    p.add_argument("--cuda-graphs", choices=["auto", "on", "off"], default="auto",
                   help="EngineConfig.cuda_graphs for the throughput and prefix sections (auto: on for CUDA)")
    p.add_argument("--static-decode-eager", action="store_true",
                   help="EngineConfig.static_decode_eager for the throughput and prefix sections")
    p.add_argument("--decode-paths", action="store_true",
                   help="the engine with the static decode path off and on at each --concurrency, outputs compared")
    p.add_argument("--host-cost", type=int, nargs="*", default=[], metavar="C",
                   help="host time per decode step by phase with C requests decoding, e.g. --host-cost 1 32")
    p.add_argument("--host-cost-steps", type=int, default=64, help="decode steps timed per --host-cost row")
    p.add_argument("--host-cost-prompt", type=int, default=128, help="prompt tokens of the --host-cost requests")
    p.add_argument("--host-only", action="store_true",
                   help="--host-cost with the model's forward replaced by fixed logits: the host's work alone")
    p.add_argument("--smoke", action="store_true",
                   help="a tiny model and workload through every section: a quick check that the script runs")
    p.add_argument("--json-out", metavar="PATH", help="also write every section's rows as JSON")
    args = p.parse_args()
    if args.smoke:
        args.depth, args.d_model, args.vocab_size, args.max_seq_len = 2, 64, 512, 256
        args.concurrency, args.num_requests, args.sequential_requests = [1, 4], 8, 2
        args.prompt_len, args.output_len, args.prefix_len, args.prefix_requests = [4, 32], [4, 16], 32, 2
        args.decode_paths, args.host_cost, args.host_cost_steps, args.host_cost_prompt = True, [1, 4], 8, 16
    if args.threads:
        torch.set_num_threads(args.threads)
    device = pick_device(args.device)
    args.device_type = device.type
    args.dtype = args.dtype or ("float32" if device.type == "cpu" else "bfloat16")
    torch.manual_seed(args.seed)
    cfg = ModelConfig.from_depth(args.depth, args.vocab_size, d_model=args.d_model, max_seq_len=args.max_seq_len)
    model = build_model(cfg, device=device, dtype=getattr(torch, args.dtype)).eval()
    rows = [] if args.skip_throughput else throughput(model, args, device)
    prefix_rows = [] if args.skip_prefix else prefix_ttft(model, args, device)
    path_rows = decode_paths(model, args, device) if args.decode_paths else []
    host_rows = host_cost(model, args, device) if args.host_cost else []
    print(markdown(args, device, rows, prefix_rows, path_rows, host_rows))
    if args.json_out:
        Path(args.json_out).write_text(json.dumps(dict(throughput=rows, prefix=prefix_rows, decode_paths=path_rows,
                                                       host_cost=host_rows, one_b_step_us=one_b_step_us()), indent=1))
    same = all(r["outputs_identical"] for r in rows + path_rows)
    if not same:
        print("outputs differ between methods or decode paths", file=sys.stderr)
    return 0 if same else 1


if __name__ == "__main__":
    sys.exit(main())
