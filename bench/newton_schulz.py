"""Muon's Newton-Schulz iteration on CPU: fp32 vs bf16, and baddbmm steps vs separate elementwise passes.

Times one optimizer step's worth of `zeropower_via_newtonschulz5` for the hidden matrices of a
`--depth` model (Muse's default shapes from ModelConfig.from_depth, stacked per shape as Muon does),
in four variants, alternating them `--repeats` times and reporting the median CPU time (one thread by
default, so the time a thread waits for a core is left out):

  baddbmm fp32 / bf16   muse.train.muon.zeropower_via_newtonschulz5 (each step: B = b A + c A A and
                        X = a X + B X as two baddbmm calls)
  plain fp32 / bf16     the same iteration with the scale-and-adds as separate elementwise passes, the
                        formulation the recipe writes down (the baseline)

bf16 pays only on CPUs that multiply bf16 in hardware (AVX512-BF16 or AMX); `muse.common.device.cpu_has_native_bf16()`
says whether this one does, and Muon's "auto" picks bf16 only then (docs/optim.md).

  python bench/newton_schulz.py --depth 6
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

import torch  # noqa: E402

from muse.common.device import cpu_has_native_bf16  # noqa: E402
from muse.model import ModelConfig  # noqa: E402
from muse.train.muon import NS_COEFFS, zeropower_via_newtonschulz5  # noqa: E402


def plain_newtonschulz(G: torch.Tensor, steps: int, dtype: torch.dtype) -> torch.Tensor:
    """The baseline: the same quintic iteration written with separate elementwise passes."""
    a, b, c = NS_COEFFS
    X = G.to(dtype)
    transposed = G.size(-2) > G.size(-1)
    if transposed:
        X = X.mT
    X = X / (X.norm(dim=(-2, -1), keepdim=True) + 1e-7)
    for _ in range(steps):
        A = X @ X.mT
        B = b * A + c * (A @ A)
        X = a * X + B @ X
    return X.mT if transposed else X


def hidden_shapes(cfg: ModelConfig) -> dict[tuple[int, int], int]:
    """(rows, cols) -> how many matrices of that shape Muon orthogonalises per step."""
    d, kv = cfg.d_model, cfg.n_kv_head * cfg.head_dim
    per_layer = [(d, d), (kv, d), (kv, d), (d, d), (cfg.d_ff, d), (d, cfg.d_ff), (cfg.d_ff, d)]
    shapes: dict[tuple[int, int], int] = {}
    for s in per_layer:
        shapes[s] = shapes.get(s, 0) + cfg.n_layer
    return shapes


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--depth", type=int, default=6)
    p.add_argument("--vocab-size", type=int, default=4096)
    p.add_argument("--steps", type=int, default=5, help="Newton-Schulz iterations (Muon's default 5)")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    clock = time.process_time if args.threads == 1 else time.perf_counter
    cfg = ModelConfig.from_depth(args.depth, args.vocab_size)
    gen = torch.Generator().manual_seed(0)
    stacks = [torch.randn(k, r, c, generator=gen) for (r, c), k in hidden_shapes(cfg).items()]
    variants = {f"{name} {dt}": (fn, getattr(torch, dt))
                for name, fn in (("baddbmm", zeropower_via_newtonschulz5), ("plain", plain_newtonschulz))
                for dt in ("float32", "bfloat16")}
    times: dict[str, list[float]] = {v: [] for v in variants}
    for rep in range(args.repeats + 1):  # the first round warms up (allocator, oneDNN kernels)
        for name, (fn, dtype) in variants.items():
            t0 = clock()
            for G in stacks:
                fn(G, args.steps, dtype)
            if rep:
                times[name].append(clock() - t0)
    ref = zeropower_via_newtonschulz5(stacks[0], args.steps, torch.float32)
    gap = (plain_newtonschulz(stacks[0], args.steps, torch.float32) - ref).abs().max().item()
    base = statistics.median(times["plain float32"])
    print(f"depth {args.depth} (d_model {cfg.d_model}, d_ff {cfg.d_ff}): {sum(s.size(0) for s in stacks)} matrices "
          f"in {len(stacks)} shapes; {args.steps} iterations; torch {torch.__version__}, {args.threads} thread(s); "
          f"native bf16 matmul: {cpu_has_native_bf16()}; max |baddbmm - plain| in fp32: {gap:.1e}")
    print("| variant | s per optimizer step (median) | vs plain fp32 |")
    print("|---|---:|---:|")
    for name, ts in times.items():
        m = statistics.median(ts)
        print(f"| {name} | {m:.3f} | {base / m:.2f}x |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
