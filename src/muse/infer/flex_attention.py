"""The engine's "flex" attention backend: one FlexAttention call per layer over the paged pool.

`FlexStep` implements the model's KV-cache protocol (`positions`, `logits_indices`, `attend`) for one
engine step, like paged_cache.PagedStep, with ONE `torch.nn.attention.flex_attention` call per layer
for the step's whole flat batch, whatever mix of fresh prefills, chunks after a context, prefix-cache
hits and decodes it holds:
  - queries: the step's (1, H, N, D), as the model made them (row r = one new token of one sequence);
  - keys, values: the layer's whole pool seen as one sequence of num_blocks * block_size slots,
    (1, Hkv, num_blocks * block_size, D), a view: nothing is gathered, copied or padded;
  - mask_mod(b, h, q, slot): row q belongs to sequence `q_seq[q]` at position `q_pos[q]`; slot lies in
    block slot // bs, which is that sequence's logical block `p2l[q_seq[q], slot // bs]` (-1: not
    one of its blocks) at offset slot % bs. The row may attend iff the block is the sequence's and
    the logical position is <= its own. A block shared by several sequences (prefix cache) has one
    entry per sequence, so sharing needs nothing special. This is the "paged" pattern of
    FlexAttention (attention-gym's paged attention): a logical causal mask read through the page table.
  - the block mask lists, for each tile of Q_TILE rows, only the pool blocks its sequences own (the
    kv tile is the pool's block), split into "full" blocks (every slot visible to every row of the
    tile: mask_mod skipped) and partial ones (mask_mod decides). The kernel touches nothing else, so
    one call costs what the step reads, not what the pool holds.
Grouped-query attention: flex's enable_gqa (no k/v copy). Every new K/V of the layer is written to the
pool before the call (a prefix-cache hit may read blocks another sequence of the same step computes).

Eager flex_attention is a dense reference (it scores every query against every slot of the pool and
masks): exact, and used by the tests ("flex-eager"), but slow for a real pool. `torch.compile` turns it
into a fused kernel (Triton on CUDA, a C++ template on CPU with AVX2) that skips unlisted blocks ("flex";
3-4 graphs per process, see `_kernel`). On CPU that kernel is no faster than "auto" and allocates a
buffer the size of the whole pool every call, and torch 2.13's CPU template can fail to compile in the
engine (`FlexStep.attend`); measured in BENCHMARKS.md section 5. Needs torch >= 2.5 (flex_attention);
older torch gets a ConfigError.

This module knows block ids, positions and the pool, not requests, sampling or the scheduler.
"""

from __future__ import annotations

import inspect
from collections.abc import Sequence

import torch

from muse.common.errors import ConfigError
from muse.infer.kv_blocks import cdiv
from muse.infer.paged_cache import PagedKVPool, SeqSpan, long_tensor

try:  # torch >= 2.5
    from torch.nn.attention.flex_attention import BlockMask, flex_attention
except ImportError:  # pragma: no cover - the CI's torch has it
    BlockMask = flex_attention = None

# Rows per block-mask tile. On CPU one row per tile: each row lists exactly its own blocks. Triton's
# kernels need tiles of at least their BLOCK_M rows (16), so on CUDA a tile of 16 consecutive rows lists
# the union of its rows' blocks, and mask_mod sorts out which row may read which slot.
Q_TILE = {"cpu": 1}
GPU_Q_TILE = 16

_kernels: dict[bool, object] = {}  # compiled? -> torch.compile(flex_attention, ...), built on first use


def check_available() -> None:
    """Raise a ConfigError when this torch has no FlexAttention."""
    if flex_attention is None:
        raise ConfigError(f"the flex attention backend needs torch >= 2.5 (torch.nn.attention.flex_attention); "
                          f"this is torch {torch.__version__}: upgrade torch or use --attention-backend auto")


def _kernel(compiled: bool):
    """flex_attention through ONE torch.compile wrapper per process and mode, so dynamo's cache of
    graphs is kept across steps: each step's mask_mod is a new closure, but over the same code, and its
    tensors are inputs, so it costs no recompile. Shapes: dynamo's default (static first, then dynamic
    for what changed: the rows and sequences of a step) compiles 3-4 graphs in all, then none.
    compiled=False runs the same graphs with the "eager" backend: flex's unfused reference math (what
    plain eager flex_attention does too, but that one re-traces every call: seconds a step)."""
    if compiled not in _kernels:
        _kernels[compiled] = torch.compile(flex_attention, backend="inductor" if compiled else "eager")
    return _kernels[compiled]


# from_kv_blocks(compute_q_blocks=False) skips the transposed (backward) tables; older torch lacks it
_NO_Q_BLOCKS = ({"compute_q_blocks": False}
                if BlockMask is not None and "compute_q_blocks" in inspect.signature(BlockMask.from_kv_blocks).parameters
                else {})


class FlexStep:
    """The model's KV-cache protocol for one step, one flex_attention call per layer (module docstring)."""

    pos = 0  # positions are per token (`positions`)

    def __init__(self, pool: PagedKVPool, spans: Sequence[SeqSpan], logits_indices: torch.Tensor | None = None,
                 *, compiled: bool = True):
        check_available()
        self.pool, self.logits_indices = pool, logits_indices
        self.kernel = _kernel(compiled)
        bs, dev, nblocks = pool.block_size, pool.k.device, pool.num_blocks
        positions: list[int] = []
        slots: list[int] = []
        q_seq: list[int] = []
        p2l_index: list[int] = []   # flat (sequence, physical block) entries of p2l ...
        p2l_value: list[int] = []   # ... and their logical block numbers
        for j, s in enumerate(spans):
            T, S = s.num_tokens, s.start + s.num_tokens
            bids = s.block_ids
            nb = cdiv(S, bs)
            positions.extend(range(s.start, S))
            slots.extend(bids[p // bs] * bs + p % bs for p in range(s.start, S))
            q_seq.extend([j] * T)
            p2l_index.extend(j * nblocks + b for b in bids[:nb])
            p2l_value.extend(range(nb))
        tile = Q_TILE.get(dev.type, GPU_Q_TILE)
        tiles_part, tiles_full = _tiles(spans, q_seq, positions, tile, bs)
        self.num_tokens = N = len(positions)
        self.positions = long_tensor(positions, dev)
        self.slot_mapping = long_tensor(slots, dev)
        q_pos = self.positions.to(torch.int32)
        q_seq_t = long_tensor(q_seq, dev).to(torch.int32)
        # p2l's row count is a power of two >= 64, not the step's sequence count: one dynamic size less
        # for the compiler (inductor's CPU flex template renames size symbols by text, and with many of
        # them "ks1" clobbers "ks12": a C++ compile error), and one shape for every step of <= 64 sequences
        rows = max(64, 1 << (len(spans) - 1).bit_length())
        p2l = torch.full((rows * nblocks,), -1, dtype=torch.int32, device=dev)
        p2l[long_tensor(p2l_index, dev)] = long_tensor(p2l_value, dev).to(torch.int32)
        p2l = p2l.view(rows, nblocks)

        def mask_mod(b, h, q_idx, kv_idx):
            logical = p2l[q_seq_t[q_idx], kv_idx // bs]
            return (logical >= 0) & (logical * bs + kv_idx % bs <= q_pos[q_idx])

        # only the row count and the sequence count change from step to step (the pool never does)
        for t in (q_pos, q_seq_t):
            torch._dynamo.maybe_mark_dynamic(t, 0)
        # Triton tiles no bigger than the mask's (untested here: no GPU in this task; bench/gpu.sh checks it)
        self.kernel_options = None if tile == 1 else {"BLOCK_M": tile, "BLOCK_N": bs}
        self.block_mask = BlockMask.from_kv_blocks(
            *_tile_tensors(tiles_part, nblocks, dev), *_tile_tensors(tiles_full, nblocks, dev), BLOCK_SIZE=(tile, bs),
            mask_mod=mask_mod, seq_lengths=(N, nblocks * bs), **_NO_Q_BLOCKS)

    def advance(self, T: int) -> None:
        pass

    def attend(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """q (1, H, N, D), k, v (1, Hkv, N, D) of the flat batch -> attention output (1, H, N, D)."""
        pool = self.pool
        pool.write(layer, self.slot_mapping, k[0].transpose(0, 1), v[0].transpose(0, 1))
        Hkv, D = pool.n_kv_head, pool.head_dim
        kp = pool.k[layer].view(1, Hkv, -1, D)   # (1, Hkv, num_blocks * bs, D): the pool as one sequence
        vp = pool.v[layer].view(1, Hkv, -1, D)
        if kp.dtype != q.dtype:  # a pool kept in another dtype than this step's autocast output
            kp, vp = kp.to(q.dtype), vp.to(q.dtype)
        torch._dynamo.maybe_mark_dynamic(q, 2)
        try:
            return self.kernel(q, kp, vp, block_mask=self.block_mask, enable_gqa=q.size(1) != Hkv,
                               kernel_options=self.kernel_options)
        except Exception as e:
            # torch 2.13's CPU flex template renames size symbols by text ("ks1" inside "ks12"): a C++
            # compile error when the numbers dynamo gives the step's dynamic sizes collide that way
            # (bench/engine_vs_transformers.py's runs; BENCHMARKS.md section 5). Say what to use instead.
            if q.device.type == "cpu" and type(e).__name__ == "InductorError":
                raise ConfigError("the compiled flex attention backend failed to compile on this CPU with torch "
                                  f"{torch.__version__} ({str(e).splitlines()[0][:120]}); use --attention-backend "
                                  "auto (the fastest on CPU) or flex-eager") from e
            raise


def _tiles(spans: Sequence[SeqSpan], q_seq: list[int], positions: list[int], tile: int,
           bs: int) -> tuple[list[list[int]], list[list[int]]]:
    """Per tile of `tile` consecutive rows: (partial blocks, full blocks). A row at position p of its
    sequence sees logical blocks 0 .. p // bs, the first (p + 1) // bs of them whole. A tile's blocks are
    the union of its rows' (each once: a listed block is read once); a block is full only when the tile
    is rows of one sequence that all see it whole, else mask_mod decides slot by slot."""
    part: list[list[int]] = []
    full: list[list[int]] = []
    N = len(positions)
    for a in range(0, N, tile):
        b = min(a + tile, N)
        if q_seq[a] == q_seq[b - 1]:  # one sequence: its rows are consecutive, positions ascending
            bids = spans[q_seq[a]].block_ids
            whole = (positions[a] + 1) // bs
            full.append(list(bids[:whole]))
            part.append(list(bids[whole:positions[b - 1] // bs + 1]))
            continue
        seen: dict[int, None] = {}
        r = a
        while r < b:
            j = q_seq[r]
            while r + 1 < b and q_seq[r + 1] == j:
                r += 1
            seen.update(dict.fromkeys(spans[j].block_ids[:positions[r] // bs + 1]))
            r += 1
        full.append([])
        part.append(list(seen))
    return part, full


def _tile_tensors(tiles: list[list[int]], nblocks: int, dev) -> tuple[torch.Tensor, torch.Tensor]:
    """(1, 1, n_tiles) counts and (1, 1, n_tiles, nblocks) block ids, each tile's first, then zeros
    (never read). The width is the pool's block count: the CPU kernel requires the table to span the
    whole key length (flex_cpu.py asserts it), and a fixed width is one less dynamic shape."""
    rows: list[int] = []
    cols: list[int] = []
    flat: list[int] = []
    for i, t in enumerate(tiles):
        rows.extend([i] * len(t))
        cols.extend(range(len(t)))
        flat.extend(t)
    table = torch.zeros(len(tiles), nblocks, dtype=torch.int32, device=dev)
    if flat:
        table[long_tensor(rows, dev), long_tensor(cols, dev)] = long_tensor(flat, dev).to(torch.int32)
    counts = long_tensor([len(t) for t in tiles], dev).to(torch.int32).view(1, 1, -1)
    return counts, table.view(1, 1, len(tiles), nblocks)
