"""Paged K/V tensors, and one step's attention over them for a flattened batch of sequences.

`PagedKVPool` owns the runner's K/V memory: per layer and k/v head, `num_blocks` blocks of
`block_size` token slots, (n_layer, Hkv, num_blocks, block_size, D) for keys and the same for values.
Which block holds which tokens is decided by the torch-free `KVCacheManager` (kv_blocks.py): position
p of a request lives in slot p % block_size of block `block_ids[p // block_size]`.

`StepPlan` is built once per engine step from the scheduled sequences (`SeqSpan`: start position,
number of new tokens, block table): every sequence's new tokens are flattened into ONE (1, N) batch,
so the model's matmuls run once for the whole step whatever mix of prefill chunks and decodes it
holds. `PagedStep(pool, plan)` implements the model's KV-cache protocol for that batch with the
optional ragged-batch members (transformer.py): `positions` (each token's own position),
`attend(layer, q, k, v)` (store the new K/V, then attend), `logits_indices` (logits only where the
runner samples). `pos` is 0 and `advance` does nothing: positions are per token.

How attention is grouped (pure PyTorch on every device; SDPA, except for the masked groups on CPU:
scores by matmul, values summed straight from the pool by F.embedding_bag, see `_bag_values`):
  - a sequence starting at position 0 with more than `max_batched_query` tokens (a fresh prefill)
    attends to its own new keys only: SDPA with is_causal, no gather;
  - every other sequence reads its context from the pool. Sequences are bucketed by query length
    (1, 2, 4, .. max_batched_query; longer ones alone) and each group is ONE padded, masked
    attention over its blocks: the decodes (T = 1) of the batch go together, spec verifications
    (T = k + 1) together, and a short decode never pays for a long prefill. Query heads sharing a
    k/v head are folded into the query rows (grouped-query attention, no k/v copy).
  - short-query buckets on CPU (decodes, verifications) stay one group whatever their contexts:
    their scores are computed block by block over the real blocks only (`PagedStep._scores`), so
    padding costs nothing in the key gather. Other buckets are split by context length (no group
    pads a context to more than twice its length) and gather their padded block tables.
All K/V of a layer are written before any group of that layer reads the pool: a request may hit in
the prefix cache blocks that another request of the same step is computing (kv_blocks.py contract).

`write=False` plans (the draft model's proposal passes) do not write the new tokens: each sequence
attends to the pool for positions < start and to the new k, v straight from the step's tensors.

This is the engine's "paged-reference" attention backend; seq_attention.py holds the others and the
switch between them (EngineConfig.attention_backend).

This module knows block ids and positions, not requests, sampling or the scheduler.
"""

from __future__ import annotations

from array import array
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from muse.infer.kv_blocks import cdiv


def long_tensor(values: Sequence[int], device) -> torch.Tensor:
    """torch.tensor(values, dtype=torch.long) on `device`, built through array("q"): ~3x faster for
    the thousands of ints a step's plan converts (torch.tensor of a list was a third of it)."""
    if not len(values):
        return torch.empty(0, dtype=torch.long, device=device)
    return torch.frombuffer(array("q", values), dtype=torch.long).to(device, non_blocking=True)


class PagedKVPool:
    """K and V of every layer: (n_layer, n_kv_head, num_blocks, block_size, head_dim) each.

    Heads before blocks: gathering a batch's block tables gives (Hkv, B, S, D) with every (head,
    sequence) matrix contiguous, which a batched matmul reads as is. With blocks first, the gathered
    keys are (B, S, Hkv, D) and attention has to copy them into that layout again (measured 2-3x
    slower on CPU for decode shapes)."""

    def __init__(self, n_layer: int, num_blocks: int, block_size: int, n_kv_head: int, head_dim: int,
                 device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32):
        shape = (n_layer, n_kv_head, num_blocks, block_size, head_dim)
        # zeros, not empty: padded queries read never-written slots; they must hold finite numbers
        self.k = torch.zeros(shape, device=device, dtype=dtype)
        self.v = torch.zeros(shape, device=device, dtype=dtype)
        self.n_layer, self.num_blocks, self.block_size = n_layer, num_blocks, block_size
        self.n_kv_head, self.head_dim = n_kv_head, head_dim
        self._buffers: dict[str, torch.Tensor] = {}  # gather scratch ("k", "v"): see _scratch

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
        flat = (self.n_kv_head, -1, self.head_dim)
        self.k[layer].view(flat).index_copy_(1, slots, k.transpose(0, 1).to(self.k.dtype))
        self.v[layer].view(flat).index_copy_(1, slots, v.transpose(0, 1).to(self.v.dtype))

    def gather_index(self, table: torch.Tensor) -> torch.Tensor:
        """(Hkv * B * nb,) rows of the flattened (Hkv * num_blocks, ...) layer for a table (B, nb)."""
        heads = torch.arange(self.n_kv_head, device=table.device)[:, None] * self.num_blocks
        return (heads + table.reshape(1, -1)).reshape(-1)

    def _scratch(self, which: str, numel: int) -> torch.Tensor | None:
        """CPU: a reusable flat buffer of at least `numel` elements (grown by half again when too
        small, then kept: it holds the largest gather so far). Elsewhere None: allocate.

        Why: on CPU a fresh multi-MB tensor is fresh pages from the OS, and first touching them
        (page faults, zeroing) cost as much as the copy itself (a 7 MB key gather measured 430 us
        into a new tensor, 225 us into a reused one). Accelerator allocators cache their blocks."""
        if self.k.device.type != "cpu":
            return None
        buf = self._buffers.get(which)
        if buf is None or buf.numel() < numel:
            size = max(numel, 3 * (0 if buf is None else buf.numel()) // 2)
            with torch.inference_mode(False):  # a normal tensor, usable in and out of inference mode
                buf = self._buffers[which] = torch.empty(size, dtype=self.k.dtype)
        return buf[:numel]

    def gather(self, layer: int, index: torch.Tensor, B: int, which: str = "kv"):
        """Keys and/or values of the blocks given by gather_index: each (Hkv, B, -1, D).

        One index_select over the flattened layer (measured ~1.5x faster on CPU than selecting
        along the block dimension of the 4-d layer). Footgun: on CPU the result lives in a scratch
        buffer of the pool and is only valid until the next gather of the same `which`."""
        flat = (self.n_kv_head * self.num_blocks, self.block_size, self.head_dim)
        shape = (self.n_kv_head, B, -1, self.head_dim)
        n = index.numel() * self.block_size * self.head_dim
        out = []
        for name in which:
            src = (self.k if name == "k" else self.v)[layer].view(flat)
            buf = self._scratch(name, n)
            if buf is None:
                out.append(src.index_select(0, index).view(shape))
            else:
                buf = buf.view(-1, self.block_size, self.head_dim)
                out.append(torch.index_select(src, 0, index, out=buf).view(shape))
        return out[0] if len(out) == 1 else tuple(out)


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
    per_block: bool            # scores block by block over the real blocks only (PagedStep._scores)
    blocks: torch.Tensor       # (nr,) the real (non-padding) entries of table, row by row ...
    block_row: torch.Tensor    # (nr,) ... the row (sequence) of each ...
    block_pos: torch.Tensor    # (nr,) ... and its index in table.reshape(-1)
    blocks_in_place: bool      # block_pos is 0..B*nb-1 (no padding, table order)
    dense: bool                # no padded queries: src is 0..M-1 and q_index holds no N
    identity: bool             # dense, and dst is 0..N-1: the group's output is the step's output


def _bucket(T: int) -> int:
    return 1 << (T - 1).bit_length()


class StepPlan:
    """The flattened batch of one step: positions, slots to write, and the attention groups.

    `n_rep` (query heads per k/v head) only chooses how short-query groups are computed on CPU
    (see PagedStep._scores); any value gives the same attention."""

    def __init__(self, spans: Sequence[SeqSpan], block_size: int, device, *, write: bool = True,
                 max_batched_query: int = 64, n_rep: int = 1):
        self.block_size, self.write, self.device = block_size, write, torch.device(device)
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
        self.positions = long_tensor(positions, device)
        self.slot_mapping = long_tensor(slots, device) if write else None
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
        self.padded: list[_Padded] = []
        for bucket in buckets.values():
            Tq = max(spans[i].num_tokens for i in bucket)
            # Short queries on CPU get per-block scores (PagedStep._scores), which gather no
            # padding: one group of any mix of contexts costs no more than split ones, and fewer
            # groups mean fewer calls per layer. Query rows (Tq * n_rep) up to half a block: past
            # that the per-block matmuls measured slower than padded ones over the same bytes.
            # (A CPU pool in another dtype than float32 computes such a group padded and unsplit:
            # correct, not tuned.)
            per_block = write and self.device.type == "cpu" and 2 * Tq * n_rep <= block_size
            for idx in [bucket] if per_block else self._split_by_context(bucket, spans):
                self.padded.append(self._padded([spans[i] for i in idx], [offsets[i] for i in idx], N,
                                                per_block))
        # padded queries read row N of the step's queries (zeros)
        self.pad_queries = any(not g.dense for g in self.padded)

    @staticmethod
    def _split_by_context(idx: list[int], spans: Sequence[SeqSpan]) -> list[list[int]]:
        """Sequences of one query bucket, longest context first, in groups whose shortest context is
        at least half their longest: padding never more than doubles a group's gather and attention
        (one group for 32 decodes between 30 and 500 tokens would gather ~2x what they need), at the
        price of a few more calls per layer (at most log2(max_model_len) groups)."""
        order = sorted(idx, key=lambda i: -(spans[i].start + spans[i].num_tokens))
        groups: list[list[int]] = []
        for i in order:
            ctx = spans[i].start + spans[i].num_tokens
            if groups and 2 * ctx >= spans[groups[-1][0]].start + spans[groups[-1][0]].num_tokens:
                groups[-1].append(i)
            else:
                groups.append([i])
        return groups

    def _padded(self, spans: list[SeqSpan], offsets: list[int], N: int, per_block: bool) -> _Padded:
        bs, dev = self.block_size, self.device
        Tq = max(s.num_tokens for s in spans)
        # with write, keys come from the pool up to the last new token; without, the pool holds the
        # context (< start) and the new keys are appended after it
        ctx_len = [s.start + s.num_tokens if self.write else s.start for s in spans]
        nbs = [cdiv(c, bs) for c in ctx_len]
        nb = max(1, max(nbs))
        table, blocks, block_row, block_pos = [], [], [], []
        for j, (s, n) in enumerate(zip(spans, nbs)):
            real = list(s.block_ids[:n])
            table.extend(real)
            table.extend([0] * (nb - n))
            if per_block:
                blocks.extend(real)
                block_row.extend([j] * n)
                block_pos.extend(range(j * nb, j * nb + n))
        if per_block:
            # gather in address order: a step's blocks lie all over the pool, and reading them in
            # ascending order measured 1.1-1.3x faster than in table order (fewer TLB and DRAM page
            # misses); per-block scores do not care about the order
            order = sorted(range(len(blocks)), key=blocks.__getitem__)
            blocks = [blocks[o] for o in order]
            block_row = [block_row[o] for o in order]
            block_pos = [block_pos[o] for o in order]
        dense = all(s.num_tokens == Tq for s in spans)
        q_index, src, dst = [], [], []
        for j, (s, off) in enumerate(zip(spans, offsets)):
            q_index.extend(range(off, off + s.num_tokens))
            dst.extend(range(off, off + s.num_tokens))
            if not dense:
                q_index.extend([N] * (Tq - s.num_tokens))
                src.extend(range(j * Tq, j * Tq + s.num_tokens))
        t = lambda x: long_tensor(x, dev)  # noqa: E731
        dst_t = t(dst)
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
        return _Padded(
            table=t(table).view(len(spans), nb), q_index=dst_t if dense else t(q_index),
            src=torch.arange(len(dst), device=dev) if dense else t(src), dst=dst_t, mask=mask[:, None], Tq=Tq,
            per_block=per_block, blocks=t(blocks), block_row=t(block_row), block_pos=t(block_pos),
            blocks_in_place=block_pos == list(range(len(table))), dense=dense,
            identity=dense and dst == list(range(N)))


def _sdpa(q, k, v, is_causal=False):
    """Causal self-attention of a fresh prefill, (1, H|Hkv, T, D), grouped-query k/v."""
    return F.scaled_dot_product_attention(q, k.to(q.dtype), v.to(q.dtype), is_causal=is_causal,
                                          enable_gqa=q.size(1) != k.size(1))


def _masked_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """softmax(q k^T / sqrt(D), masked) v for q (Hkv, B, L, D), k, v (Hkv, B, S, D), mask (1, B, L, S).

    The query heads sharing a k/v head are folded into L, so grouped-query attention needs no copy
    of k/v. SDPA on accelerators; on CPU two matmuls and a softmax in float32, which measured faster
    than SDPA's CPU kernel for these (short query, long key) shapes."""
    if q.device.type != "cpu":
        return F.scaled_dot_product_attention(q, k.to(q.dtype), v.to(q.dtype), attn_mask=mask)
    scores = (q.float() * q.size(-1) ** -0.5) @ k.float().transpose(-1, -2)
    scores = scores.masked_fill_(~mask, float("-inf"))
    return (scores.softmax(-1) @ v.float()).to(q.dtype)


class PagedStep:
    """The model's KV-cache protocol for one step of a StepPlan over a PagedKVPool."""

    pos = 0  # positions are per token (`positions`); the model reads pos only when positions is None

    def __init__(self, pool: PagedKVPool, plan: StepPlan, logits_indices: torch.Tensor | None = None):
        self.pool, self.plan = pool, plan
        self.positions = plan.positions
        self.logits_indices = logits_indices
        self._masks: dict[tuple[int, int], torch.Tensor] = {}  # (group, n_rep) -> folded mask
        self._hidden: dict[tuple[int, int], torch.Tensor] = {}  # (group, n_rep) -> ~folded mask
        self._index: dict[int, torch.Tensor] = {}              # group i -> gather index of its table,
                                                                # -1 - i -> of its real blocks
        self._bags: dict[tuple[int, int], tuple] = {}          # (group, n_rep) -> embedding-bag layout
        # CPU, float32, written plans: values are summed straight from the pool (_bag_values)
        self.bag_values = plan.write and pool.v.device.type == "cpu" and pool.v.dtype == torch.float32

    def advance(self, T: int) -> None:
        pass

    def _folded_mask(self, i: int, g: _Padded, n_rep: int) -> torch.Tensor:
        """(B, 1, Tq, S) -> (1, B, n_rep * Tq, S): one row per (query head of a group, query)."""
        key = (i, n_rep)
        if key not in self._masks:
            B, _, Tq, S = g.mask.shape
            self._masks[key] = g.mask.expand(B, n_rep, Tq, S).reshape(1, B, n_rep * Tq, S)
        return self._masks[key]

    def _hidden_mask(self, i: int, g: _Padded, n_rep: int) -> torch.Tensor:
        """~_folded_mask, True = may NOT attend (masked_fill's convention), built once per step."""
        key = (i, n_rep)
        if key not in self._hidden:
            self._hidden[key] = ~self._folded_mask(i, g, n_rep)
        return self._hidden[key]

    def _bag_layout(self, i: int, g: _Padded, n_rep: int):
        """For F.embedding_bag over the flattened value pool (Hkv * num_blocks * block_size, D): one
        bag per (head, sequence, query row) holding the slots that row may attend to."""
        key = (i, n_rep)
        if key not in self._bags:
            pool, dev = self.pool, g.table.device
            mask = self._folded_mask(i, g, n_rep)[0]                                   # (B, L, S)
            B, L, S = mask.shape
            bs = pool.block_size
            slots = (g.table[:, :, None] * bs + torch.arange(bs, device=dev)).reshape(B, 1, S)
            pos = mask.reshape(-1).nonzero().squeeze(1)                               # (M,) of B*L*S
            base = slots.expand(B, L, S).reshape(-1).index_select(0, pos)              # (M,) slot ids
            counts = mask.sum(-1).reshape(-1)                                          # (B*L,)
            heads = torch.arange(pool.n_kv_head, device=dev)[:, None]
            rows = (heads * (pool.num_blocks * bs) + base[None]).reshape(-1)           # (Hkv*M,)
            offsets = (heads * pos.numel() + (counts.cumsum(0) - counts)[None]).reshape(-1)
            self._bags[key] = (pos, rows, offsets)
        return self._bags[key]

    def _scores(self, layer: int, i: int, g: _Padded, q: torch.Tensor) -> torch.Tensor:
        """Scaled scores q k^T (Hkv, B, L, S) of a group's queries (Hkv, B, L, D) against its keys in
        the pool, masked positions not yet masked."""
        pool = self.pool
        Hkv, B, L, D = q.shape
        q = q * D ** -0.5  # scale the (small) queries, not the scores
        if not g.per_block:  # one matmul per sequence over its padded, gathered keys
            if i not in self._index:
                self._index[i] = pool.gather_index(g.table)
            return q @ pool.gather(layer, self._index[i], B, "k").transpose(-1, -2)
        # Short queries (decodes, draft verifications): gather only the real blocks, one small
        # matmul per block, scores scattered into the padded layout (L / D the size of the keys).
        # A padded gather copies every padding block too: 28% of what it gathered for steps of 32
        # decodes of 16-500 tokens even split by context (bench/engine.py, concurrency 32).
        key = -1 - i
        if key not in self._index:
            self._index[key] = pool.gather_index(g.blocks[None])
        nb, bs = g.table.size(1), pool.block_size
        kb = pool.gather(layer, self._index[key], 1, "k").view(-1, bs, D)               # (Hkv*nr, bs, D)
        qb = q.index_select(1, g.block_row).view(-1, L, D)                               # (Hkv*nr, L, D)
        # bmm on 3-d views: the same product through 4-d matmul measured ~1.5x slower
        sb = torch.bmm(qb, kb.transpose(1, 2)).view(Hkv, -1, L, bs)                      # (Hkv, nr, L, bs)
        if not g.blocks_in_place:  # zeros, not -inf, at padding: the mask decides; rows stay finite
            sb = sb.new_zeros(Hkv, B * nb, L, bs).index_copy_(1, g.block_pos, sb)
        return sb.view(Hkv, B, nb, L, bs).transpose(2, 3).reshape(Hkv, B, L, nb * bs)

    def _bag_values(self, layer: int, i: int, g: _Padded, n_rep: int, q) -> torch.Tensor:
        """Masked attention whose value side never gathers: softmax weights of the allowed slots go
        to F.embedding_bag(mode="sum", per_sample_weights), which reads each value row once from
        the pool. On CPU the value gather (a full read + write of the context) and the p @ v
        matmul measured ~3x slower than this for decode batches."""
        pos, rows, offsets = self._bag_layout(i, g, n_rep)
        Hkv, B, L, D = q.shape
        scores = self._scores(layer, i, g, q)
        w = scores.masked_fill_(self._hidden_mask(i, g, n_rep), float("-inf")).softmax(-1)
        w = w.reshape(Hkv, -1).index_select(1, pos).reshape(-1)
        out = F.embedding_bag(rows, self.pool.v[layer].view(-1, D), offsets, mode="sum", per_sample_weights=w)
        return out.view(Hkv, B, L, D)

    def attend(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """q (1, H, N, D), k, v (1, Hkv, N, D) of the flat batch -> attention output (1, H, N, D)."""
        plan, pool = self.plan, self.pool
        qf, kf, vf = q[0].transpose(0, 1), k[0].transpose(0, 1), v[0].transpose(0, 1)  # (N, H|Hkv, D)
        if plan.write:
            pool.write(layer, plan.slot_mapping, kf, vf)  # every write of the layer before any read
        N, H, D = qf.shape
        Hkv = kf.size(1)
        r = H // Hkv
        y = qf.new_empty(N, H, D)
        for g in plan.causal:
            qs, ks, vs = (x[g.a:g.b].transpose(0, 1)[None] for x in (qf, kf, vf))  # (1, H|Hkv, T, D)
            y[g.a:g.b] = _sdpa(qs, ks, vs, is_causal=True)[0].transpose(0, 1)
        qpad, kpad, vpad = qf, kf, vf
        if plan.pad_queries:  # row N: what padded queries read
            qpad = torch.cat([qf, qf.new_zeros(1, H, D)])
            if not plan.write:
                kpad = torch.cat([kf, kf.new_zeros(1, Hkv, D)])
                vpad = torch.cat([vf, vf.new_zeros(1, Hkv, D)])
        for i, g in enumerate(plan.padded):
            B, Tq = g.table.size(0), g.Tq
            # (B*Tq, H, D) -> (Hkv, B, r*Tq, D): query head h = kv head h // r, folded into the rows
            if g.identity:  # the group is the whole step in order: q (1, H, N, D) as it is
                qg = q[0].view(Hkv, r, B, Tq, D).transpose(1, 2)
            else:
                qg = qpad.index_select(0, g.q_index).view(B, Tq, Hkv, r, D).permute(2, 0, 3, 1, 4)
            qg = qg.reshape(Hkv, B, r * Tq, D)
            if self.bag_values and q.dtype == torch.float32:
                out = self._bag_values(layer, i, g, r, qg)
                out = out.view(Hkv, B, r, Tq, D).permute(1, 3, 0, 2, 4).reshape(B * Tq, H, D)
                if g.identity:  # every token of the step, in order (a step of decodes only)
                    y = out
                else:
                    y.index_copy_(0, g.dst, out if g.dense else out.index_select(0, g.src))
                continue
            if i not in self._index:
                self._index[i] = pool.gather_index(g.table)
            kg, vg = pool.gather(layer, self._index[i], B)                           # (Hkv, B, S, D)
            if not plan.write:
                kn = kpad.index_select(0, g.q_index).view(B, Tq, Hkv, D).permute(2, 0, 1, 3)
                vn = vpad.index_select(0, g.q_index).view(B, Tq, Hkv, D).permute(2, 0, 1, 3)
                kg, vg = torch.cat([kg, kn.to(kg.dtype)], 2), torch.cat([vg, vn.to(vg.dtype)], 2)
            out = _masked_attention(qg, kg, vg, self._folded_mask(i, g, r))          # (Hkv, B, r*Tq, D)
            out = out.view(Hkv, B, r, Tq, D).permute(1, 3, 0, 2, 4).reshape(B * Tq, H, D)
            y.index_copy_(0, g.dst, out if g.dense else out.index_select(0, g.src))
        return y.transpose(0, 1)[None]
