"""The "paged-decode" attention backend: a step of decodes scored straight from the pool, no key gather.

A step in which every sequence computes one token (a decode) and no two sequences share a block reads
its keys where they lie. The step's blocks, sorted, are cut into runs wherever more than MAX_GAP unused
blocks lie between two of them (`segments`); with blocks placed next to each other
(kv_blocks.BlockPool.allocate) a run is little more than the blocks it holds. Per layer, run and k/v
head, one batched matmul scores every block of the run against the query of the sequence that owns it:
q (R, r, D) x keys (R, D, bs), the keys a strided view of the pool. The scores of each sequence's blocks
are then picked (a small index_select: scores are D times smaller than keys), masked by an additive
bias, softmaxed, and the values summed straight from the pool by F.embedding_bag (as the reference does;
padding slots weigh 0). Unused blocks inside a run are scored too and never read again: their read is
the price of one call instead of several.

Against the reference (paged_cache.PagedStep), which gathers the real blocks' keys into a scratch
buffer and then scores the copy, this reads each key once instead of read, write, read again. That
pays only when the copy does not stay in cache: `fits` ("auto") takes a step from 3 MiB of keys per
layer, in few runs for its blocks (measured there and in BENCHMARKS.md section 5, "The paged-decode
backend"). "auto" uses it for CPU float32 pools only (seq_attention.make_step); elsewhere the reference
runs. A block shared by two sequences (a prefix-cache hit) would need two rows of scores: such steps,
and every step that is not decode-only, run the reference under "paged-decode" too.

This module knows block ids, positions and the pool, not requests, sampling or the scheduler.
"""

from __future__ import annotations

from bisect import bisect_right
from collections.abc import Sequence

import torch
import torch.nn.functional as F

from muse.infer.kv_blocks import cdiv
from muse.infer.paged_cache import PagedKVPool, SeqSpan, long_tensor

MAX_GAP = 16      # unused blocks between two of the step's blocks read through rather than split there
MAX_SEGMENTS = 8  # "auto": at most this many runs of blocks (each costs one bmm per k/v head and layer) ...
BLOCKS_PER_RUN = 32  # ... and at most one run per this many of the step's blocks (4 decodes of 13 blocks in
                     # 4 runs measured slower than the reference's gather of their 52 blocks; 32 decodes of
                     # 267 blocks in one run faster) ...
MIN_GATHER_BYTES = 3 << 20  # ... and only steps whose reference key gather would copy this much per layer


def segments(spans: Sequence[SeqSpan], block_size: int, max_gap: int = MAX_GAP) -> tuple[list[tuple[int, int]], int] | None:
    """The runs [lo, hi) of pool blocks a decode-only step scores, and its number of real blocks; None
    when the step does not qualify (a multi-token span, or a block read by two of its sequences).

    The step's blocks, sorted, are cut into runs wherever more than `max_gap` unused blocks lie between
    two of them: reading a few unused blocks costs less than another bmm call per head and layer."""
    seen: set[int] = set()
    n = 0
    for s in spans:
        if s.num_tokens != 1:
            return None
        nb = cdiv(s.start + 1, block_size)
        seen.update(s.block_ids[:nb])
        n += nb
        if len(seen) != n:  # a block read by two sequences of the step (a shared prefix)
            return None
    if not n:
        return None
    runs: list[tuple[int, int]] = []
    lo = prev = None
    for b in sorted(seen):
        if lo is None:
            lo = b
        elif b - prev - 1 > max_gap:
            runs.append((lo, prev + 1))
            lo = b
        prev = b
    runs.append((lo, prev + 1))
    return runs, n


def fits(spans: Sequence[SeqSpan], pool: PagedKVPool) -> tuple[list[tuple[int, int]], int] | None:
    """"auto": the step's `segments` when it takes DecodeStep (else None): decodes only, enough keys that
    the reference's gather would not stay in cache, few enough runs for the blocks it reads.

    Measured in a paired replay of engine runs (32 decodes, block size 16, 4 k/v heads of 64, fp32, one
    thread on a 2-vCPU Zen 3; every step through both backends on one pool): DecodeStep's step took
    1.01-1.03x the reference's time at 64-191 blocks (a key gather of 1-3 MiB per layer), 0.97x at
    192-255, 0.94x at 256-319, 0.90x at 320+, 0.77-0.80x at ~1,000. The cheap checks come first: most
    steps that fail fail them."""
    bs = pool.block_size
    if any(s.num_tokens != 1 for s in spans):
        return None
    blocks = sum(cdiv(s.start + 1, bs) for s in spans)
    if blocks * pool.n_kv_head * bs * pool.head_dim * pool.k.element_size() < MIN_GATHER_BYTES:
        return None
    runs = segments(spans, bs)
    if runs is None or len(runs[0]) > min(MAX_SEGMENTS, max(1, runs[1] // BLOCKS_PER_RUN)):
        return None
    return runs


class DecodeStep:
    """The model's KV-cache protocol for a decode-only step (see the module docstring)."""

    pos = 0  # positions are per token (`positions`)

    def __init__(self, pool: PagedKVPool, spans: Sequence[SeqSpan], logits_indices: torch.Tensor | None = None,
                 runs: tuple[list[tuple[int, int]], int] | None = None):
        """runs: `segments(spans, pool.block_size)` when the caller has it already."""
        r = runs or segments(spans, pool.block_size)
        if r is None:
            raise ValueError("DecodeStep takes decode-only steps whose sequences share no block")
        self.pool, self.spans, self.logits_indices = pool, spans, logits_indices
        bs, dev = pool.block_size, pool.k.device
        # runs (lo, hi, first row of the run in the step's scores)
        self.runs, R = [], 0
        for lo, hi in r[0]:
            self.runs.append((lo, hi, R))
            R += hi - lo
        self.R = R
        B = self.num_tokens = len(spans)
        nbs = [cdiv(s.start + 1, bs) for s in spans]
        nb = max(nbs)
        starts = [lo for lo, _, _ in self.runs]
        owner = [0] * R        # score row -> the sequence whose query scores it (unused blocks: 0)
        table: list[int] = []  # (B, nb) score rows of each sequence's blocks (padding: 0, masked)
        blocks: list[int] = []  # (B, nb) pool blocks of each sequence (padding: block 0, weighed 0)
        slots = []
        for j, (s, n) in enumerate(zip(spans, nbs)):
            bids = s.block_ids
            lo = hi = 0
            for b in bids[:n]:
                if not lo <= b < hi:  # a sequence's blocks are mostly one run: look it up once
                    lo, hi, first = self.runs[bisect_right(starts, b) - 1]
                    shift = first - lo
                owner[b + shift] = j
                table.append(b + shift)
            table.extend([0] * (nb - n))
            blocks.extend(bids[:n])
            blocks.extend([0] * (nb - n))
            slots.append(bids[s.start // bs] * bs + s.start % bs)
        S = nb * bs
        self.positions = long_tensor([s.start for s in spans], dev)
        self.slot_mapping = long_tensor(slots, dev)
        self.owner = long_tensor(owner, dev)
        self.table = long_tensor(table, dev)
        self.B, self.nb = B, nb
        ctx = torch.tensor([s.start + 1 for s in spans], device=dev)
        key = torch.arange(S, device=dev)
        # additive mask (B, 1, S): 0 where the key is in the sequence's context, -inf after it
        self.bias = torch.zeros(B, S, device=dev).masked_fill_(key[None] >= ctx[:, None], float("-inf")).view(B, 1, S)
        # embedding_bag rows over the flattened value pool (Hkv * num_blocks * bs, D): one bag of S slots
        # per (head, sequence); padding slots read the range's first slot with weight 0
        abs_blocks = long_tensor(blocks, dev).view(B, nb)
        slot = (abs_blocks[:, :, None] * bs + torch.arange(bs, device=dev)).view(1, B, S)
        heads = torch.arange(pool.n_kv_head, device=dev)[:, None, None] * (pool.num_blocks * bs)
        self.rows = heads + slot                                                   # (Hkv, B, S)

    def advance(self, T: int) -> None:
        pass

    def attend(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """q (1, H, B, D), k, v (1, Hkv, B, D) of the step's decodes -> attention output (1, H, B, D)."""
        pool = self.pool
        pool.write(layer, self.slot_mapping, k[0].transpose(0, 1), v[0].transpose(0, 1))
        H, D = q.size(1), q.size(3)
        Hkv, B, nb, bs = pool.n_kv_head, self.B, self.nb, pool.block_size
        r = H // Hkv
        # query head h belongs to k/v head h // r: (Hkv, B, r, D), each sequence's query repeated per block
        qg = (q[0] * D ** -0.5).view(Hkv, r, B, D).transpose(1, 2)
        kl = pool.k[layer]                                                         # (Hkv, num_blocks, bs, D)
        qb = qg.index_select(1, self.owner).to(kl.dtype)                           # (Hkv, R, r, D)
        scores = qb.new_empty(Hkv, self.R, r, bs)
        for lo, hi, first in self.runs:
            for h in range(Hkv):  # 3-d bmm on a view of the pool (4-d matmul would copy the keys)
                torch.bmm(qb[h, first:first + hi - lo], kl[h, lo:hi].transpose(1, 2),
                          out=scores[h, first:first + hi - lo])
        sel = scores.index_select(1, self.table).view(Hkv, B, nb, r, bs)          # each sequence's blocks
        sel = sel.view(Hkv, B, 1, nb * bs) if r == 1 else sel.transpose(2, 3).reshape(Hkv, B, r, nb * bs)
        w = (sel + self.bias).softmax(-1).to(pool.v.dtype)                         # (Hkv, B, r, S)
        rows = self.rows if r == 1 else self.rows[:, :, None].expand(Hkv, B, r, nb * bs)
        out = F.embedding_bag(rows.reshape(-1, nb * bs), pool.v[layer].view(-1, D), mode="sum",
                              per_sample_weights=w.reshape(-1, nb * bs))           # (Hkv * B * r, D)
        out = out.to(q.dtype)
        if r == 1:
            return out.view(1, H, B, D)
        return out.view(Hkv, B, r, D).transpose(1, 2).reshape(1, H, B, D)
