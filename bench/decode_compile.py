"""One decode step of the whole model, eager against torch.compile (inductor), on the engine's KV pool.

Does compiling the decode forward buy what issue #18's engine goals need on CPU (fewer per-op calls,
fused elementwise work)? Rows, all over the same step (--decodes sequences of --context LO HI tokens,
each sequence's blocks adjacent in the pool, one new token each):

  eager auto        the engine's eager step: the attention backend `auto` picks for it (seq_attention)
  eager static      the padded static decode path (cuda_graph.StaticDecodeStep), eagerly
  compiled static   the same, the model compiled with attention left eager (StaticDecodeStep.attend and
                    its constructor run outside the graph: dynamo breaks the graph around them)
  compiled whole    the same, everything inside one graph: the pool write and the gather too

Each row is timed --repeats times in turn (CPU time of the calling thread, `time.thread_time`), the
median reported; "first" is the first call (for compiled rows: dynamo + inductor). Logits are checked
against "eager auto" (max abs difference). Default model: bench/engine_vs_transformers.py's (depth 4,
d_model 256, 4 heads, vocab 4,096, max_seq_len 256), random weights, float32.

  python bench/decode_compile.py --threads 1
"""

from __future__ import annotations

import argparse
import random
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

import torch  # noqa: E402

from muse.infer.cuda_graph import DecodeGraphs, StaticDecodeStep  # noqa: E402
from muse.infer.paged_cache import PagedKVPool, SeqSpan  # noqa: E402
from muse.infer.seq_attention import make_step  # noqa: E402
from muse.model import ModelConfig, build_model  # noqa: E402


class _EagerAttention(StaticDecodeStep):
    """StaticDecodeStep whose attention (and index building) dynamo leaves out of the graph."""

    @torch.compiler.disable
    def __init__(self, *a, **k):
        super().__init__(*a, **k)

    @torch.compiler.disable
    def attend(self, layer, q, k, v):
        return super().attend(layer, q, k, v)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--depth", type=int, default=4)
    p.add_argument("--vocab", type=int, default=4096)
    p.add_argument("--max-seq-len", type=int, default=256)
    p.add_argument("--block-size", type=int, default=16)
    p.add_argument("--decodes", type=int, default=32)
    p.add_argument("--context", type=int, nargs=2, default=[130, 230])
    p.add_argument("--repeats", type=int, default=30)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--rows", nargs="+", default=["eager auto", "eager static", "compiled static", "compiled whole"])
    p.add_argument("--freezing", action="store_true",
                   help="inductor's freezing (weights as constants, oneDNN-prepacked linears: its CPU inference mode)")
    p.add_argument("--cpp-wrapper", action="store_true", help="inductor's C++ wrapper (no Python between kernels)")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    rng = random.Random(args.seed)
    cfg = ModelConfig.from_depth(args.depth, args.vocab, max_seq_len=args.max_seq_len)
    model = build_model(cfg).eval()
    bs = args.block_size
    per_seq = -(-args.max_seq_len // bs)
    pool = PagedKVPool.for_model(cfg, args.decodes * per_seq + 1, bs, "cpu", torch.float32)  # + the scratch block
    pool.k.normal_()
    pool.v.normal_()
    spans = [SeqSpan(rng.randint(*args.context) - 1, 1, list(range(i * per_seq, (i + 1) * per_seq)))
             for i in range(args.decodes)]
    ids = [rng.randrange(args.vocab) for _ in spans]
    graphs = DecodeGraphs(model, pool, max_model_len=args.max_seq_len, batch_sizes=(args.decodes,), capture=False)
    key = graphs.load(ids, spans)
    B, nb = key
    idx = torch.tensor([ids])
    n_rep = cfg.n_head // cfg.n_kv_head
    compiled = torch.compile(model, dynamic=False)
    compiled_whole = torch.compile(graphs._forward, dynamic=False)

    def eager_auto():
        step = make_step("auto", pool, spans, n_rep=n_rep)
        return model(idx, kv_cache=step)[0]

    def compiled_static():
        step = _EagerAttention(pool, graphs._bufs[B], B, nb)
        return compiled(step.input_ids[None], kv_cache=step)[0]

    fns = {"eager auto": eager_auto, "eager static": lambda: graphs._forward(key),
           "compiled static": compiled_static, "compiled whole": lambda: compiled_whole(key)}
    unknown = set(args.rows) - set(fns)
    if unknown:
        p.error(f"unknown rows {sorted(unknown)}; choose from {list(fns)}")
    outs, first, times = {}, {}, {r: [] for r in args.rows}
    import torch._inductor.config as inductor_config  # graphs compile at their first call, inside the patch

    with torch.inference_mode(), inductor_config.patch(freezing=args.freezing, cpp_wrapper=args.cpp_wrapper):
        for r in args.rows:
            t0 = time.perf_counter()
            outs[r] = fns[r]().clone()
            first[r] = time.perf_counter() - t0
        for _ in range(args.repeats):
            for r in args.rows:
                t0 = time.thread_time()
                fns[r]()
                times[r].append(time.thread_time() - t0)
    ref = outs[args.rows[0]]
    base = statistics.median(times[args.rows[0]])
    print(f"{args.decodes} decodes of {args.context[0]}-{args.context[1]} tokens, depth {args.depth}, "
          f"{args.threads} thread(s), median of {args.repeats}; freezing {args.freezing}, cpp_wrapper {args.cpp_wrapper}")
    print(f"| row | ms / step | vs {args.rows[0]} | first call s | max abs diff |\n|---|---:|---:|---:|---:|")
    for r in args.rows:
        m = statistics.median(times[r])
        err = (outs[r][:len(spans)] - ref[:len(spans)]).abs().max().item()
        print(f"| {r} | {1e3 * m:.2f} | {base / m:.2f}x | {first[r]:.1f} | {err:.1e} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
