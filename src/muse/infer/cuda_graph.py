"""Decode-only steps with static shapes: padded input buffers, and on CUDA one captured graph per bucket.

Why: on a GPU an eager decode step of a small or mid-size model is mostly launch overhead (a dozen
kernels per layer, each a few microseconds of Python and driver work, while the device needs well
under a millisecond for the weights of a 1B model). A CUDA graph replays the whole forward as one
launch. A graph needs static shapes and static addresses, which the engine's ragged steps do not
have, so decode-only steps (every scheduled request computes exactly one token: no drafts, no prefill
chunk of more than one token) may take a second, padded path instead (runner.py decides):

  - the step's n requests are padded to a batch bucket of B rows (1, 2, 4, .. max_num_seqs) and the
    longest context to a context bucket of nb block-table columns (1, 2, 4, .. max_model_len /
    block_size): the smallest of each that holds the step;
  - one flat int64 buffer per batch bucket holds, for the step's (B, nb): token ids (B), positions
    (B), slots (B), context lengths (B), then the block tables (B x nb). A step fills it with ONE
    host-to-device copy, and the model reads views of it (`StaticDecodeStep`), so a graph finds its
    inputs at the same addresses at every replay;
  - padding rows (n .. B-1) write their K/V into the pool's scratch block (one block past the
    scheduler's num_blocks, never handed to a request) and attend to its slot 0 only; table columns
    past a row's context point at the scratch block and are masked out. Padding never writes a
    real block (tests/test_cuda_graph.py checks the pool bytes);
  - attention: every row's nb blocks of keys and values are gathered from the pool, (Hkv, B, nb *
    block_size, D), and one SDPA runs over them with a (B, S) mask "key position < context length";
    the query heads that share a k/v head are folded into the query rows (no k/v copy per head);
  - logits come back for all B rows; the runner keeps the first n and samples them OUTSIDE the
    graph (sampling has data-dependent work and reads results on the host).

`DecodeGraphs(capture=True)` (CUDA) captures every (B, nb) at engine start, largest first, all in one
memory pool: only one graph replays at a time, so a smaller graph reuses the largest one's activation
memory. Why any replay order is safe with a shared pool: a graph reads only the input buffers and the
K/V pool (both allocated outside it) and recomputes every intermediate it uses; the one thing another
graph's replay may overwrite is its output, which the runner uses up before the next replay. What
they hold is measured (`graph_bytes`) and logged. `capture=False` runs the same padded
step eagerly on any device (EngineConfig.static_decode_eager): that is what the CPU tests exercise,
and on CUDA it separates "the padded path is wrong" from "the capture is wrong".

Memory, up front: the input buffers are sum(B) x (4 + max_blocks) x 8 bytes (~140 KB for
max_num_seqs 64, max_model_len 2048, block size 16). The graph pool holds about one layer's gathered
K and V of the largest bucket, 2 x Hkv x B x max_model_len x D x itemsize (256 MiB for a 1B Llama,
8 k/v heads of 64, B = 64, 2,048 tokens, bf16), plus the (B, V) float32 logits and one layer's
activations; `estimate_bytes` computes it. The price of the padding: a step reads the K/V of nb
blocks for every row (at most twice the longest context in the step, for each of up to 2n rows):
the batch's short sequences pay for its longest one.

Footgun: a graph bakes in the addresses of the model's parameters and buffers and of the pool.
Weights updated in place (load_state_dict, an optimizer step) are seen by the next replay; a parameter
or buffer REPLACED by a new tensor (model.to(...), RotaryEmbedding.init_buffers()) is not: build a new
engine. The logits a replay returns are the graph's own output tensor, valid until the next replay.

This module knows the pool, block ids and positions; not requests, sampling or the scheduler.
"""

from __future__ import annotations

import time
from array import array
from collections.abc import Sequence

import torch
import torch.nn.functional as F

from muse.common.errors import ResourceError
from muse.common.logging import get_logger
from muse.infer.kv_blocks import cdiv
from muse.infer.paged_cache import PagedKVPool, SeqSpan

log = get_logger("muse.infer")


def powers_of_two_up_to(limit: int) -> tuple[int, ...]:
    """1, 2, 4, .. below `limit`, then `limit` itself: the default batch and context buckets."""
    out, b = [], 1
    while b < limit:
        out.append(b)
        b *= 2
    return (*out, limit)


class StaticDecodeStep:
    """The model's KV-cache protocol (transformer.py's optional members) for one padded decode step
    of B rows over nb block-table columns. Every tensor is a view of `buf` or computed from one, and
    the object is built inside the captured function, so a replay recomputes the mask and the
    gather index from the buffer's new contents."""

    pos = 0                 # positions are per row (`positions`)
    logits_indices = None   # logits for every row: (1, B, V)

    def __init__(self, pool: PagedKVPool, buf: torch.Tensor, B: int, nb: int):
        self.pool, self.B = pool, B
        self.input_ids = buf[:B]
        self.positions = buf[B:2 * B]
        self.slot_mapping = buf[2 * B:3 * B]
        context_lens = buf[3 * B:4 * B]
        table = buf[4 * B:4 * B + B * nb].view(B, nb)
        self.index = pool.gather_index(table)                                   # (Hkv * B * nb,)
        keys = torch.arange(nb * pool.block_size, device=buf.device)
        self.mask = (keys[None, :] < context_lens[:, None])[None, :, None, :]   # (1, B, 1, S)

    def advance(self, T: int) -> None:
        pass

    def attend(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """q (1, H, B, D), k, v (1, Hkv, B, D): store every row's k, v (padding rows: the scratch
        slot), then each row attends to its gathered blocks -> (1, H, B, D)."""
        pool = self.pool
        pool.write(layer, self.slot_mapping, k[0].transpose(0, 1), v[0].transpose(0, 1))  # writes before reads
        H, B, D = q.size(1), self.B, q.size(3)
        Hkv = pool.n_kv_head
        kg, vg = pool.gather(layer, self.index, B)                            # (Hkv, B, S, D) each
        qg = q[0].view(Hkv, H // Hkv, B, D).transpose(1, 2)                   # (Hkv, B, r, D): head h -> k/v h // r
        if kg.dtype != qg.dtype:
            kg, vg = kg.to(qg.dtype), vg.to(qg.dtype)
        y = F.scaled_dot_product_attention(qg, kg, vg, attn_mask=self.mask)  # (Hkv, B, r, D)
        return y.transpose(1, 2).reshape(1, H, B, D)


class DecodeGraphs:
    """Input buffers for every batch bucket and, with `capture`, one CUDA graph per (B, nb).

    `pool` must have one block more than the scheduler hands out: its last block is the scratch
    block of padding rows. Use: `key = graphs.load(ids, spans)` (host: fills the inputs, one copy),
    then `logits = graphs.run(key)` (B, V); rows n.. are padding."""

    def __init__(self, model, pool: PagedKVPool, *, max_model_len: int, batch_sizes: Sequence[int],
                 capture: bool):
        self.model, self.pool = model, pool
        self.scratch = pool.num_blocks - 1
        self.block_size = pool.block_size
        self.max_blocks = cdiv(max_model_len, pool.block_size)
        self.batch_sizes = tuple(sorted(set(batch_sizes)))
        self.block_counts = powers_of_two_up_to(self.max_blocks)
        self.max_batch = self.batch_sizes[-1]
        device = pool.k.device
        self._bufs = {}
        for B in self.batch_sizes:
            buf = torch.empty(4 * B + B * self.max_blocks, dtype=torch.long, device=device)
            self._bufs[B] = buf
            self._fill_padding(buf, B)
        self.buffer_bytes = sum(b.numel() * b.element_size() for b in self._bufs.values())
        # padding values for `load`, sliced as needed
        self._zeros, self._ones = array("q", [0]) * self.max_batch, array("q", [1]) * self.max_batch
        self._scratch_slots = array("q", [self.scratch * self.block_size]) * self.max_batch
        self._scratch_ids = array("q", [self.scratch]) * (self.max_batch * self.max_blocks)
        self._graphs: dict[tuple[int, int], tuple[torch.cuda.CUDAGraph, torch.Tensor]] = {}
        self.graph_bytes = 0
        if capture:
            self._capture_all()

    @property
    def captured(self) -> bool:
        return bool(self._graphs)

    def _fill_padding(self, buf: torch.Tensor, B: int) -> None:
        """Every row a padding row: token 0 at position 0, writing and reading the scratch block."""
        buf[:2 * B] = 0
        buf[2 * B:3 * B] = self.scratch * self.block_size
        buf[3 * B:4 * B] = 1
        buf[4 * B:] = self.scratch

    def estimate_bytes(self) -> int:
        """What the largest bucket's forward holds at once, roughly: one layer's gathered K and V,
        the mask, the float32 logits (every other activation of a decode row is far smaller)."""
        cfg, B, S = self.model.config, self.max_batch, self.max_blocks * self.block_size
        kv = 2 * cfg.n_kv_head * B * S * cfg.head_dim * self.pool.k.element_size()
        return kv + B * S + 4 * B * cfg.vocab_size

    # ----- a step ------------------------------------------------------------------------------------
    def bucket(self, n: int, max_context: int) -> tuple[int, int] | None:
        """The smallest (B, nb) that holds n rows whose longest context is `max_context` tokens;
        None when n is over the largest batch bucket (the step runs eagerly)."""
        if n > self.max_batch:
            return None
        need = cdiv(max_context, self.block_size)
        B = next(b for b in self.batch_sizes if b >= n)
        return B, next(c for c in self.block_counts if c >= need)

    def load(self, ids: Sequence[int], spans: Sequence[SeqSpan]) -> tuple[int, int] | None:
        """Fill the inputs of a decode step (spans of one token each, ids their tokens) into its
        bucket's buffer with one copy; returns the bucket, or None when the step does not fit."""
        bs = self.block_size
        pos = [s.start for s in spans]
        key = self.bucket(len(spans), max(pos) + 1)
        if key is None:
            return None
        B, nb = key
        pad = B - len(spans)
        # Python ints go in by array.fromlist, padding by slices of prebuilt arrays (a memcpy): a table of
        # 32 rows x 64 columns took ~45 us this way, ~55-80 us as one list converted at the end, ~150 us
        # by array.extend (the table is most of the values; the whole load ~55-60 us at 32 rows)
        flat = array("q", ids)
        flat += self._zeros[:pad]
        flat.fromlist(pos)
        flat += self._zeros[:pad]
        flat.fromlist([s.block_ids[p // bs] * bs + p % bs for s, p in zip(spans, pos)])
        flat += self._scratch_slots[:pad]
        flat.fromlist([p + 1 for p in pos])
        flat += self._ones[:pad]
        scratch_ids = self._scratch_ids
        for s, p in zip(spans, pos):
            m = p // bs + 1  # blocks holding positions 0..p
            blocks = s.block_ids[:m]
            flat.fromlist(blocks if type(blocks) is list else list(blocks))
            flat += scratch_ids[:nb - m]
        flat += scratch_ids[:nb * pad]
        # a pageable source: the copy has read it when copy_ returns, so `flat` may go
        self._bufs[B][:len(flat)].copy_(torch.frombuffer(flat, dtype=torch.long), non_blocking=True)
        return key

    def run(self, key: tuple[int, int]) -> torch.Tensor:
        """Logits (B, V) of the step `load` filled in: a graph replay, or the same forward eagerly."""
        graph = self._graphs.get(key)
        if graph is None:
            return self._forward(key)
        graph[0].replay()
        return graph[1]

    def _forward(self, key: tuple[int, int]) -> torch.Tensor:
        B, nb = key
        step = StaticDecodeStep(self.pool, self._bufs[B], B, nb)
        return self.model(step.input_ids[None], kv_cache=step)[0]

    # ----- capture (CUDA) ----------------------------------------------------------------------------
    @torch.inference_mode()
    def _capture_all(self) -> None:
        device = self.pool.k.device
        torch.cuda.synchronize(device)
        torch.cuda.empty_cache()  # so that the reserved memory after, minus before, is what the graphs hold
        before = torch.cuda.memory_reserved(device)
        t0 = time.perf_counter()
        mempool = torch.cuda.graph_pool_handle()
        keys = [(B, nb) for B in reversed(self.batch_sizes) for nb in reversed(self.block_counts)]
        try:
            for key in keys:  # largest first: the smaller graphs fit into the pool it leaves
                self._graphs[key] = self._capture(key, mempool)
        except torch.cuda.OutOfMemoryError:
            self._graphs.clear()
            raise ResourceError(f"not enough GPU memory to capture the decode graphs (about "
                                f"{self.estimate_bytes() / 2**20:.0f} MiB for batch {self.max_batch} at "
                                f"{self.max_blocks * self.block_size} tokens); lower max_num_seqs or "
                                f"max_model_len, give the KV cache less (kv_cache_bytes), or set "
                                f"cuda_graphs=False") from None
        torch.cuda.synchronize(device)
        torch.cuda.empty_cache()
        self.graph_bytes = torch.cuda.memory_reserved(device) - before
        log.info("captured %d decode CUDA graphs (batch %s x context blocks %s) in %.1f s; they hold %.0f MiB "
                 "(estimate %.0f MiB), input buffers %.2f MiB", len(keys), list(self.batch_sizes),
                 list(self.block_counts), time.perf_counter() - t0, self.graph_bytes / 2**20,
                 self.estimate_bytes() / 2**20, self.buffer_bytes / 2**20)

    def _capture(self, key: tuple[int, int], mempool) -> tuple[torch.cuda.CUDAGraph, torch.Tensor]:
        """Warm up on a side stream (lazy initialisation must not happen during capture), then capture.
        The buffers hold padding rows only, so neither run touches a real block."""
        B = key[0]
        self._fill_padding(self._bufs[B], B)
        stream = torch.cuda.Stream(self.pool.k.device)
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            for _ in range(2):
                self._forward(key)
        torch.cuda.current_stream().wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=mempool):
            logits = self._forward(key)
        return graph, logits
