"""Attention backends of the engine, and the "paged-contiguous" one: each sequence over a view of the pool.

The runner builds one KV-cache object per step from the step's `SeqSpan`s through `make_step(backend,
...)`; the model only calls its `attend(layer, q, k, v)` (and reads `positions`, `logits_indices`).
Backends (EngineConfig.attention_backend):
  "paged-reference"   paged_cache.StepPlan + PagedStep: every query-length bucket one padded, masked
                      attention over gathered blocks. The reference every other backend is tested
                      against; it also serves no-write plans (the draft model's proposals).
  "paged-contiguous"  SequenceStep, below: one F.scaled_dot_product_attention per sequence, on a view
                      of the pool when the sequence's blocks are adjacent (BlockPool.allocate places
                      them so: 86% of the table neighbours a decode reads, BENCHMARKS.md) and on a
                      gather of its own blocks otherwise.
  "paged-decode"      decode_attention.DecodeStep: a decode-only step whose sequences share no block
                      scores its keys in place, one bmm per run of adjacent blocks and k/v head, no key
                      gather; every other step runs the reference.
  "auto" (default)    "paged-contiguous" for steps of at most AUTO_MAX_SEQS sequences; bigger decode-only
                      steps on a CPU float32 pool "paged-decode" where decode_attention.fits says so (at
                      least 3 MiB of keys per layer, few runs of blocks for the blocks read); the reference
                      for the rest (measured below and in decode_attention.py).
  "flex"              flex_attention.FlexStep: one torch.compile'd FlexAttention call per layer over the
                      whole pool, a block mask listing each row's blocks (the GPU path; on CPU it
                      measured no faster than "auto", BENCHMARKS.md section 5, so "auto" never picks it).
  "flex-eager"        the same mask through flex's unfused reference math: exactness tests, debugging.

Why per sequence: with blocks adjacent, a sequence's keys of head h are rows base .. base + S - 1 of
the layer's (Hkv, num_blocks * block_size, D) pool, a strided view SDPA reads in place: no gather, no
padding, no mask for decodes, each K/V byte read once. The reference reads the keys twice (gather,
then scores) and pays for plan tensors (tables, masks, bag layouts) every step; the price here is one
SDPA call per sequence and layer, which a small batch (batch 1: one call per layer, like plain
generate) does not notice. Measured on the 2-core CPU (4 layers, 4 heads of 64, block size 16, one
thread, two runs; attention of one step including its plan): batch 1 at a 150-token context 0.29-0.30 ms
per-sequence against 0.64 ms reference; 32 decodes of 30-230 tokens 8.7-9.6 ms per-sequence (SDPA;
8.1-8.4 ms with matmul + softmax + matmul; 4.0 ms for the score matmuls alone) against 4.2-5.7 ms
reference (2.1 ms for its key gather + per-block scores): at 32 sequences 128 small calls per step cost
more than the gather saves. Per sequence ~0.28 ms against the reference's ~0.52 ms + 0.12 ms a sequence:
even at 3, so "auto" attended per sequence up to 3. Those SDPA calls took 3-D inputs, which torch's CPU
flash kernel does not accept (it falls back to the unfused math path, ~2.4x slower for a decode: 41 vs
17 us at a 150-token context). With 4-D inputs (2026-12-07, Zen 3, one thread, `bench/attention_step.py
--decodes N`, two runs, a step's attention): 4 decodes 1.1-1.5 ms per sequence vs 1.5-2.1 ms reference, 6
decodes 1.4-1.6 vs 1.6-1.8, 8 decodes 2.2-3.4 vs 2.2-3.0: "auto" attends per sequence up to 6 (measured on CPU
only, as the 3 was).

This module knows block ids, positions and the pool, not requests, sampling or the scheduler.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F

from muse.common.errors import ConfigError
from muse.infer.decode_attention import DecodeStep, fits, segments
from muse.infer.flex_attention import FlexStep
from muse.infer.flex_attention import check_available as check_flex
from muse.infer.kv_blocks import cdiv
from muse.infer.paged_cache import PagedKVPool, PagedStep, SeqSpan, StepPlan, long_tensor

ATTENTION_BACKENDS = ("auto", "paged-reference", "paged-contiguous", "paged-decode", "flex", "flex-eager")
AUTO_MAX_SEQS = 6  # "auto": steps of up to this many sequences attend per sequence (measured above)


def check_backend(name: str) -> str:
    if name not in ATTENTION_BACKENDS:
        raise ConfigError(f"unknown attention backend {name!r}; use one of: {', '.join(ATTENTION_BACKENDS)}")
    if name.startswith("flex"):
        check_flex()
    return name


def make_step(backend: str, pool: PagedKVPool, spans: Sequence[SeqSpan], *, max_batched_query: int = 64,
              n_rep: int = 1, logits_indices: torch.Tensor | None = None):
    """The step's KV-cache object for `spans` (every span written: the runner's steps)."""
    if backend.startswith("flex"):
        return FlexStep(pool, spans, logits_indices, compiled=backend == "flex")
    if backend == "paged-contiguous" or (backend == "auto" and len(spans) <= AUTO_MAX_SEQS):
        return SequenceStep(pool, spans, logits_indices)
    if backend == "paged-decode" or (backend == "auto" and pool.v.device.type == "cpu"
                                     and pool.v.dtype == torch.float32):
        runs = segments(spans, pool.block_size) if backend == "paged-decode" else fits(spans, pool)
        if runs is not None:
            return DecodeStep(pool, spans, logits_indices, runs)
    plan = StepPlan(spans, pool.block_size, pool.k.device, max_batched_query=max_batched_query, n_rep=n_rep)
    return PagedStep(pool, plan, logits_indices)


class _Seq:
    """One sequence of the step: its rows of the flat batch, its keys' place in the pool."""

    __slots__ = ("off", "T", "S", "base", "blocks", "mask", "causal", "start")

    def __init__(self, off: int, T: int, S: int, base: int | None, blocks: torch.Tensor | None,
                 mask: torch.Tensor | None, causal: bool):
        self.off, self.T, self.S = off, T, S          # rows off .. off + T - 1; keys 0 .. S - 1
        self.base = base                              # first slot of position 0 when blocks are adjacent
        self.blocks = blocks                          # else the (nb,) block ids to gather
        self.mask = mask                              # (T, S) True = may attend, for chunks after a context
        self.causal = causal                          # a prefill from position 0 (T == S)
        self.start = S - T                            # position of the first new token


class SequenceStep:
    """The model's KV-cache protocol for one step, one SDPA per sequence (see the module docstring).

    Writes every new K/V of a layer before any sequence of it reads the pool (a prefix-cache hit may
    read blocks another sequence of the same step computes: kv_blocks.py contract)."""

    pos = 0  # positions are per token (`positions`)

    def __init__(self, pool: PagedKVPool, spans: Sequence[SeqSpan], logits_indices: torch.Tensor | None = None):
        self.pool, self.logits_indices = pool, logits_indices
        bs, dev = pool.block_size, pool.k.device
        positions: list[int] = []
        slots: list[int] = []
        self.seqs: list[_Seq] = []
        for s in spans:
            T = s.num_tokens
            off, S = len(positions), s.start + T
            positions.extend(range(s.start, S))
            if T == 0:
                continue
            nb = cdiv(S, bs)
            bids = s.block_ids
            b0 = bids[0]
            adjacent = bids[nb - 1] - b0 == nb - 1 and list(bids[:nb]) == list(range(b0, b0 + nb))
            if adjacent:  # position p lives in slot b0 * bs + p
                slots.extend(range(b0 * bs + s.start, b0 * bs + S))
            else:
                slots.extend(bids[p // bs] * bs + p % bs for p in range(s.start, S))
            mask = None
            if T > 1 and s.start > 0:  # a chunk after its context: bottom-right aligned causal mask
                q_pos = torch.arange(s.start, S, device=dev)[:, None]
                mask = torch.arange(S, device=dev)[None, :] <= q_pos
            self.seqs.append(_Seq(off, T, S, b0 * bs if adjacent else None,
                                  None if adjacent else long_tensor(bids[:nb], dev), mask,
                                  causal=T > 1 and s.start == 0))
        self.num_tokens = len(positions)
        # every sequence's blocks adjacent (batch 1 nearly always): new K/V are copied into their views
        # of the pool, two copies per sequence and layer instead of an index_copy of transposed rows
        self.slice_writes = all(s.base is not None for s in self.seqs)
        self.positions = long_tensor(positions, dev)
        self.slot_mapping = long_tensor(slots, dev)

    def advance(self, T: int) -> None:
        pass

    def attend(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """q (1, H, N, D), k, v (1, Hkv, N, D) of the flat batch -> attention output (1, H, N, D)."""
        pool = self.pool
        Hkv, D = pool.n_kv_head, pool.head_dim
        kl, vl = pool.k[layer], pool.v[layer]                       # (Hkv, num_blocks, bs, D)
        kflat, vflat = kl.view(Hkv, -1, D), vl.view(Hkv, -1, D)     # (Hkv, num_blocks * bs, D)
        if self.slice_writes:
            for s in self.seqs:
                a = s.base + s.start
                kflat[:, a:a + s.T].copy_(k[0, :, s.off:s.off + s.T])
                vflat[:, a:a + s.T].copy_(v[0, :, s.off:s.off + s.T])
        else:
            pool.write(layer, self.slot_mapping, k[0].transpose(0, 1), v[0].transpose(0, 1))
        gqa = q.size(1) != Hkv
        q0 = q[0]
        outs = []
        for s in self.seqs:
            if s.base is not None:  # adjacent blocks: a view, nothing copied
                ks, vs = kflat[:, s.base:s.base + s.S], vflat[:, s.base:s.base + s.S]
            else:
                ks = kl.index_select(1, s.blocks).view(Hkv, -1, D)[:, :s.S]
                vs = vl.index_select(1, s.blocks).view(Hkv, -1, D)[:, :s.S]
            qs = q0[:, s.off:s.off + s.T]                              # (H, T, D)
            if ks.dtype != qs.dtype:  # a pool kept in another dtype than this step's autocast output
                ks, vs = ks.to(qs.dtype), vs.to(qs.dtype)
            # 4-D: torch's CPU flash kernel takes only (B, H, L, D); 3-D inputs fall back to the unfused
            # math path, ~2.4x slower for a decode (BENCHMARKS.md section 5)
            outs.append(F.scaled_dot_product_attention(qs[None], ks[None], vs[None], attn_mask=s.mask,
                                                       is_causal=s.causal, enable_gqa=gqa))
        # every row belongs to one sequence, in order: the outputs side by side are the step's
        return outs[0] if len(outs) == 1 else torch.cat(outs, 2)
