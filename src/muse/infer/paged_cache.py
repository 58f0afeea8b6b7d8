"""Paged K/V tensors, and one step's attention over them for a flattened batch of sequences.

`PagedKVPool` owns the runner's K/V memory: per layer, `num_blocks` blocks of `block_size` token
slots, (n_layer, num_blocks, block_size, Hkv, D) for keys and the same for values. Which block holds
which tokens is decided by the torch-free `KVCacheManager` (kv_blocks.py): position p of a request
lives in slot p % block_size of block `block_ids[p // block_size]`.

`StepPlan` is built once per engine step from the scheduled sequences (`SeqSpan`: start position,
number of new tokens, block table): every sequence's new tokens are flattened into ONE (1, N) batch,
so the model's matmuls run once for the whole step whatever mix of prefill chunks and decodes it
holds. `PagedStep(pool, plan)` implements the model's KV-cache protocol for that batch with the
optional ragged-batch members (transformer.py): `positions` (each token's own position),
`attend(layer, q, k, v)` (store the new K/V, then attend), `logits_indices` (logits only where the
runner samples). `pos` is 0 and `advance` does nothing: positions are per token.

How attention is grouped (pure PyTorch SDPA, the reference path on every device):
  - a sequence starting at position 0 with more than `max_batched_query` tokens (a fresh prefill)
    attends to its own new keys only: SDPA with is_causal, no gather;
  - every other sequence reads its context from the pool. Sequences are bucketed by query length
    (1, 2, 4, .. max_batched_query; longer ones alone) and each bucket is ONE padded SDPA call over
    the gathered blocks with a boolean mask: decodes (T = 1) of the whole batch go together, spec
    verifications (T = k + 1) together, and a long decode never pays for a padded prefill.
All K/V of a layer are written before any group of that layer reads the pool: a request may hit in
the prefix cache blocks that another request of the same step is computing (kv_blocks.py contract).

`write=False` plans (the draft model's proposal passes) do not write the new tokens: each sequence
attends to the pool for positions < start and to the new k, v straight from the step's tensors.

This module knows block ids and positions, not requests, sampling or the scheduler.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from muse.infer.kv_blocks import cdiv


class PagedKVPool:
    """K and V of every layer: (n_layer, num_blocks, block_size, n_kv_head, head_dim) each."""

    def __init__(self, n_layer: int, num_blocks: int, block_size: int, n_kv_head: int, head_dim: int,
                 device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32):
        shape = (n_layer, num_blocks, block_size, n_kv_head, head_dim)
        # zeros, not empty: padded queries read never-written slots; they must hold finite numbers
        self.k = torch.zeros(shape, device=device, dtype=dtype)
        self.v = torch.zeros(shape, device=device, dtype=dtype)
        self.n_layer, self.num_blocks, self.block_size = n_layer, num_blocks, block_size
        self.n_kv_head, self.head_dim = n_kv_head, head_dim

    @classmethod
    def for_model(cls, cfg, num_blocks: int, block_size: int, device="cpu",
                  dtype: torch.dtype = torch.float32) -> PagedKVPool:
        return cls(cfg.n_layer, num_blocks, block_size, cfg.n_kv_head, cfg.head_dim, device, dtype)

    @staticmethod
    def bytes_per_block(cfg, block_size: int, dtype: torch.dtype) -> int:
        """Bytes one block takes over all layers, keys and values."""
        itemsize = torch.empty((), dtype=dtype).element_size()
        return 2 * cfg.n_layer * block_size * cfg.n_kv_head * cfg.head_dim * itemsize

    def write(self, layer: int, slots: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
        """Store k, v (N, Hkv, D) at flat slot ids (N,) = block_id * block_size + offset."""
        flat = (-1, self.n_kv_head, self.head_dim)
        self.k[layer].view(flat).index_copy_(0, slots, k.to(self.k.dtype))
        self.v[layer].view(flat).index_copy_(0, slots, v.to(self.v.dtype))

    def gather(self, layer: int, table: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys and values of the blocks in `table` (B, nb): each (B, Hkv, nb * block_size, D)."""
        B, nb = table.shape
        idx = table.reshape(-1)
        shape = (B, nb * self.block_size, self.n_kv_head, self.head_dim)
        k = self.k[layer].index_select(0, idx).view(shape).transpose(1, 2)
        v = self.v[layer].index_select(0, idx).view(shape).transpose(1, 2)
        return k, v


@dataclass
class SeqSpan:
    """One sequence's part of a step: new tokens at positions start .. start + num_tokens - 1."""

    start: int
    num_tokens: int
    block_ids: Sequence[int]  # covers every position up to start + num_tokens - 1


@dataclass
class _Causal:
    """A fresh prefill: tokens [a, b) of the flat batch attend causally to each other only."""

    a: int
    b: int


@dataclass
class _Padded:
    """Sequences of similar query length, padded to Tq queries, attending to gathered pool blocks."""

    table: torch.Tensor        # (B, nb) block ids (padding: block 0, masked out)
    q_index: torch.Tensor      # (B * Tq,) flat token index of each padded query (N = a zero row)
    src: torch.Tensor          # (M,) padded rows holding real queries ...
    dst: torch.Tensor          # (M,) ... and their flat token index
    mask: torch.Tensor         # (B, 1, Tq, S) True = may attend
    Tq: int


def _bucket(T: int) -> int:
    return 1 << (T - 1).bit_length()


class StepPlan:
    """The flattened batch of one step: positions, slots to write, and the attention groups."""

    def __init__(self, spans: Sequence[SeqSpan], block_size: int, device, *, write: bool = True,
                 max_batched_query: int = 64):
        self.block_size, self.write, self.device = block_size, write, device
        self.num_tokens = N = sum(s.num_tokens for s in spans)
        positions: list[int] = []
        slots: list[int] = []
        offsets = []  # flat index of each span's first token
        for s in spans:
            offsets.append(len(positions))
            positions.extend(range(s.start, s.start + s.num_tokens))
            if write:
                bids = s.block_ids
                slots.extend(bids[p // block_size] * block_size + p % block_size
                             for p in range(s.start, s.start + s.num_tokens))
        self.max_position = max(positions, default=-1)
        self.positions = torch.tensor(positions, dtype=torch.long).to(device, non_blocking=True)
        self.slot_mapping = torch.tensor(slots, dtype=torch.long).to(device, non_blocking=True) if write else None
        self.causal: list[_Causal] = []
        buckets: dict[int, list[int]] = {}
        for i, s in enumerate(spans):
            if s.num_tokens == 0:
                continue
            if write and s.start == 0 and s.num_tokens > max_batched_query:
                self.causal.append(_Causal(offsets[i], offsets[i] + s.num_tokens))
            elif s.num_tokens > max_batched_query:
                buckets[-i - 1] = [i]  # alone (its own key: negative, never a power of two)
            else:
                buckets.setdefault(_bucket(s.num_tokens), []).append(i)
        self.padded = [self._padded([spans[i] for i in idx], [offsets[i] for i in idx], N)
                       for idx in buckets.values()]

    def _padded(self, spans: list[SeqSpan], offsets: list[int], N: int) -> _Padded:
        bs, dev = self.block_size, self.device
        Tq = max(s.num_tokens for s in spans)
        # with write, keys come from the pool up to the last new token; without, the pool holds the
        # context (< start) and the new keys are appended after it
        ctx_len = [s.start + s.num_tokens if self.write else s.start for s in spans]
        nb = max(1, max(cdiv(c, bs) for c in ctx_len))
        table = [list(s.block_ids[:cdiv(c, bs)]) + [0] * (nb - cdiv(c, bs)) for s, c in zip(spans, ctx_len)]
        q_index, src, dst = [], [], []
        for j, (s, off) in enumerate(zip(spans, offsets)):
            q_index.extend(range(off, off + s.num_tokens))
            q_index.extend([N] * (Tq - s.num_tokens))
            src.extend(range(j * Tq, j * Tq + s.num_tokens))
            dst.extend(range(off, off + s.num_tokens))
        t = lambda x: torch.tensor(x, dtype=torch.long).to(dev, non_blocking=True)  # noqa: E731
        start = t([s.start for s in spans])[:, None, None]                     # (B, 1, 1)
        qpos = torch.arange(Tq, device=dev)[None, :, None]                     # (1, Tq, 1): query i
        if self.write:
            key = torch.arange(nb * bs, device=dev)[None, None, :]
            mask = key <= start + qpos                                         # (B, Tq, S)
        else:
            ctx_key = torch.arange(nb * bs, device=dev)[None, None, :]
            new_key = torch.arange(Tq, device=dev)[None, None, :]
            mask = torch.cat([(ctx_key < start).expand(-1, Tq, -1),
                              (new_key <= qpos).expand(len(spans), -1, -1)], dim=2)
        return _Padded(t(table), t(q_index), t(src), t(dst), mask[:, None], Tq)


def _sdpa(q, k, v, mask=None, is_causal=False):
    """SDPA with grouped-query k/v. CUDA's fused kernels refuse enable_gqa with a mask (they fall back
    to the math kernel), so there k/v are expanded by hand, as in muse.model.layers."""
    n_rep = q.size(1) // k.size(1)
    if n_rep > 1 and (q.is_cuda and mask is not None):
        k, v = k.repeat_interleave(n_rep, 1), v.repeat_interleave(n_rep, 1)
        n_rep = 1
    return F.scaled_dot_product_attention(q, k.to(q.dtype), v.to(q.dtype), attn_mask=mask,
                                          is_causal=is_causal, enable_gqa=n_rep > 1)


class PagedStep:
    """The model's KV-cache protocol for one step of a StepPlan over a PagedKVPool."""

    pos = 0  # positions are per token (`positions`); the model reads pos only when positions is None

    def __init__(self, pool: PagedKVPool, plan: StepPlan, logits_indices: torch.Tensor | None = None):
        self.pool, self.plan = pool, plan
        self.positions = plan.positions
        self.logits_indices = logits_indices

    def advance(self, T: int) -> None:
        pass

    def attend(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """q (1, H, N, D), k, v (1, Hkv, N, D) of the flat batch -> attention output (1, H, N, D)."""
        plan, pool = self.plan, self.pool
        qf, kf, vf = q[0].transpose(0, 1), k[0].transpose(0, 1), v[0].transpose(0, 1)  # (N, H|Hkv, D)
        if plan.write:
            pool.write(layer, plan.slot_mapping, kf, vf)  # every write of the layer before any read
        N, H, D = qf.shape
        y = qf.new_empty(N, H, D)
        for g in plan.causal:
            qs, ks, vs = (x[g.a:g.b].transpose(0, 1)[None] for x in (qf, kf, vf))  # (1, H|Hkv, T, D)
            y[g.a:g.b] = _sdpa(qs, ks, vs, is_causal=True)[0].transpose(0, 1)
        if plan.padded:
            qpad = torch.cat([qf, qf.new_zeros(1, H, D)])  # row N: what padded queries read
            if not plan.write:
                kpad = torch.cat([kf, kf.new_zeros(1, *kf.shape[1:])])
                vpad = torch.cat([vf, vf.new_zeros(1, *vf.shape[1:])])
        for g in plan.padded:
            B = g.table.size(0)
            qg = qpad.index_select(0, g.q_index).view(B, g.Tq, H, D).transpose(1, 2)  # (B, H, Tq, D)
            kg, vg = pool.gather(layer, g.table)                                      # (B, Hkv, S, D)
            if not plan.write:
                kn = kpad.index_select(0, g.q_index).view(B, g.Tq, *kf.shape[1:]).transpose(1, 2)
                vn = vpad.index_select(0, g.q_index).view(B, g.Tq, *vf.shape[1:]).transpose(1, 2)
                kg, vg = torch.cat([kg, kn.to(kg.dtype)], 2), torch.cat([vg, vn.to(vg.dtype)], 2)
            out = _sdpa(qg, kg, vg, mask=g.mask)                                      # (B, H, Tq, D)
            out = out.transpose(1, 2).reshape(B * g.Tq, H, D)
            y.index_copy_(0, g.dst, out.index_select(0, g.src))
        return y.transpose(0, 1)[None]
