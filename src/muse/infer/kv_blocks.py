"""KV-cache block bookkeeping: which fixed-size blocks of the KV pool hold which tokens (torch-free).

The runner owns the K/V tensors, laid out as `num_blocks` blocks of `block_size` token slots; token
position p of a request lives in slot p % block_size of block `block_ids[p // block_size]`. This
module decides those block ids and nothing else: it never sees a tensor.

`BlockPool` is the pool: blocks with reference counts, a free queue in LRU order, and the prefix
cache (block hash -> block). `KVCacheManager` maps requests to their blocks on top of it.

Prefix caching. A FULL block is identified by everything up to and including it: its hash is
sha256(parent block's hash, its token ids as int64), a hash chain, so equal block contents under
different prefixes get different hashes. sha256 (not Python's `hash`, whose int-tuple hashes are
predictable, so a user could forge a collision and read another user's cache) makes collisions
practically impossible; on a hit we still compare the stored token ids and treat a mismatch as a miss.
Two blocks computed with the same hash (two requests prefilling equal text in parallel): the first one
registered stays in the cache, the other is an ordinary uncached block.

Lifetime. A block held by k requests has ref_cnt k (shared prompt blocks, n > 1 samples). At ref_cnt 0
it joins the END of the free queue but KEEPS its hash, so a later request with the same prefix revives
it. Allocation takes from the FRONT (least recently freed) and evicts the hash there. A request's
blocks are freed tail first, so its last blocks (least likely shared) are evicted before its first.

Timing contract with the runner: `allocate_slots` registers the full blocks that the step is ABOUT to
compute, so another request scheduled in the same step may reuse them (this is how n > 1 samples
share a prompt computed once). The runner must therefore write every scheduled token's K/V of a layer
before any attention of that layer reads the cache, which a batched paged-attention forward does.
"""

from __future__ import annotations

import hashlib
from array import array
from collections import Counter, OrderedDict
from collections.abc import Iterable, Sequence

from muse.infer.request import Request

# The parent of a request's first block. Every hash input is 32 bytes of parent + 8 bytes per token,
# so inputs of one block size never alias each other.
ROOT_HASH = hashlib.sha256(b"muse-kv-prefix-root").digest()


def hash_block(parent_hash: bytes, token_ids: Sequence[int]) -> bytes:
    """The chained identity of a full block: sha256(parent hash || token ids as int64)."""
    h = hashlib.sha256(parent_hash)
    h.update(array("q", token_ids).tobytes())
    return h.digest()


def cdiv(a: int, b: int) -> int:
    return -(-a // b)


class Block:
    """One block of KV slots: its id, reference count, and (when full and cached) hash and token ids."""

    __slots__ = ("block_id", "ref_cnt", "block_hash", "token_ids")

    def __init__(self, block_id: int):
        self.block_id = block_id
        self.ref_cnt = 0
        self.block_hash: bytes | None = None
        self.token_ids: tuple[int, ...] | None = None  # kept to verify cache hits

    def __repr__(self) -> str:
        return f"Block({self.block_id}, ref={self.ref_cnt}, cached={self.block_hash is not None})"


class BlockPool:
    """Fixed-size blocks, reference counts, an LRU free queue and the prefix-cache index."""

    def __init__(self, num_blocks: int, block_size: int):
        if num_blocks < 1 or block_size < 1:
            raise ValueError(f"need num_blocks >= 1 and block_size >= 1, got {num_blocks}, {block_size}")
        self.num_blocks, self.block_size = num_blocks, block_size
        self.blocks = [Block(i) for i in range(num_blocks)]
        # ref_cnt == 0 blocks, least recently freed first (OrderedDict: O(1) pop-front and remove-any)
        self._free: OrderedDict[int, Block] = OrderedDict((b.block_id, b) for b in self.blocks)
        self._cached: dict[bytes, Block] = {}
        self.num_evictions = 0  # cached blocks whose hash was dropped to reuse them

    @property
    def num_free_blocks(self) -> int:
        """Blocks no request holds (cached or not): what allocate() can hand out."""
        return len(self._free)

    @property
    def num_cached_blocks(self) -> int:
        return len(self._cached)

    def allocate(self, n: int) -> list[Block]:
        """n blocks from the LRU end of the free queue, ref_cnt 1, hashes evicted."""
        if n > len(self._free):
            raise RuntimeError(f"allocate({n}) with only {len(self._free)} free blocks; check first")
        out = []
        for _ in range(n):
            _, block = self._free.popitem(last=False)
            self._evict(block)
            block.ref_cnt = 1
            out.append(block)
        return out

    def touch(self, blocks: Iterable[Block]) -> None:
        """Take one more reference on each block (a cache hit); revives free cached blocks."""
        for block in blocks:
            if block.ref_cnt == 0:
                del self._free[block.block_id]
            block.ref_cnt += 1

    def free(self, blocks: Iterable[Block]) -> None:
        """Drop one reference each, in the given order; blocks reaching 0 join the MRU end of the queue."""
        for block in blocks:
            if block.ref_cnt <= 0:
                raise RuntimeError(f"double free of {block}")
            block.ref_cnt -= 1
            if block.ref_cnt == 0:
                self._free[block.block_id] = block

    def lookup(self, block_hash: bytes, token_ids: Sequence[int]) -> Block | None:
        """The cached block with this hash and these token ids, or None (a miss or a hash collision)."""
        block = self._cached.get(block_hash)
        if block is None or block.token_ids != tuple(token_ids):
            return None
        return block

    def cache(self, block: Block, block_hash: bytes, token_ids: Sequence[int]) -> bool:
        """Register a full block under its hash; False if the hash is already taken (first one wins)."""
        if block.block_hash is not None or block_hash in self._cached:
            return False
        block.block_hash, block.token_ids = block_hash, tuple(token_ids)
        self._cached[block_hash] = block
        return True

    def _evict(self, block: Block) -> None:
        if block.block_hash is not None:
            del self._cached[block.block_hash]
            block.block_hash = block.token_ids = None
            self.num_evictions += 1

    def check_invariants(self, holders: Counter) -> None:
        """Raise AssertionError unless refcounts match `holders` (block_id -> number of holders),
        free <=> unreferenced, and the cache index and the blocks agree."""
        def fail(msg):
            raise AssertionError(msg)
        if len(self._free) != len(set(self._free)):
            fail("duplicate block in the free queue")
        for b in self.blocks:
            if b.ref_cnt != holders.get(b.block_id, 0):
                fail(f"{b} has ref_cnt {b.ref_cnt} but {holders.get(b.block_id, 0)} holders")
            if (b.ref_cnt == 0) != (b.block_id in self._free):
                fail(f"{b} is {'not ' if b.ref_cnt == 0 else ''}in the free queue")
            if b.block_hash is not None and self._cached.get(b.block_hash) is not b:
                fail(f"{b} has a hash the cache index does not map to it")
        for h, b in self._cached.items():
            if b.block_hash != h or b.token_ids is None or len(b.token_ids) != self.block_size:
                fail(f"cache index entry for {b} is stale")


class KVCacheManager:
    """Which blocks each request holds: prefix-cache lookup, slot allocation, caching, freeing."""

    def __init__(self, num_blocks: int, block_size: int, enable_prefix_caching: bool = True):
        self.pool = BlockPool(num_blocks, block_size)
        self.block_size = block_size
        self.enable_prefix_caching = enable_prefix_caching
        self._blocks: dict[str, list[Block]] = {}    # request id -> its block table
        self._num_registered: dict[str, int] = {}    # request id -> its leading blocks already cached

    @property
    def num_free_blocks(self) -> int:
        return self.pool.num_free_blocks

    @property
    def usage(self) -> float:
        """Fraction of blocks held by requests (free cached blocks count as free: they are evictable)."""
        return 1.0 - self.pool.num_free_blocks / self.pool.num_blocks

    def block_ids(self, request_id: str) -> list[int]:
        return [b.block_id for b in self._blocks.get(request_id, ())]

    def num_blocks_needed(self, num_tokens: int) -> int:
        return cdiv(num_tokens, self.block_size)

    def _block_hashes(self, request: Request) -> list[bytes]:
        """request.block_hashes extended over every full block of its known tokens."""
        hashes, tokens, bs = request.block_hashes, request.all_token_ids, self.block_size
        for i in range(len(hashes), len(tokens) // bs):
            hashes.append(hash_block(hashes[-1] if hashes else ROOT_HASH, tokens[i * bs:(i + 1) * bs]))
        return hashes

    def get_computed_blocks(self, request: Request) -> tuple[list[Block], int]:
        """The longest cached prefix of full blocks: (blocks, num_cached_tokens). Does not take them.

        Never the whole known sequence: at least one token is left to compute so the model produces
        logits to sample from. Requests asking for prompt logprobs get no hits (cached positions would
        have no logits).
        """
        if not self.enable_prefix_caching or request.sampling_params.prompt_logprobs is not None:
            return [], 0
        hashes, tokens, bs = self._block_hashes(request), request.all_token_ids, self.block_size
        hits: list[Block] = []
        for i in range(min(len(hashes), (request.num_tokens - 1) // bs)):
            block = self.pool.lookup(hashes[i], tokens[i * bs:(i + 1) * bs])
            if block is None:
                break
            hits.append(block)
        return hits, len(hits) * bs

    def allocate_slots(self, request: Request, num_new_tokens: int,
                       computed_blocks: Sequence[Block] = ()) -> bool:
        """Make room for `num_new_tokens` more tokens after the computed ones; False if blocks run out.

        `computed_blocks` are prefix-cache hits from get_computed_blocks (only for a request that holds
        no blocks yet); they are taken here. On False nothing changed. On success, the full blocks of
        known tokens this step will have computed are registered in the prefix cache.
        """
        held = self._blocks.get(request.request_id, [])
        if computed_blocks and held:
            raise RuntimeError(f"{request.request_id} already holds blocks; cache hits are for admission")
        total = request.num_computed_tokens + len(computed_blocks) * self.block_size + num_new_tokens
        num_new_blocks = max(0, self.num_blocks_needed(total) - len(held) - len(computed_blocks))
        # hits sitting in the free queue leave it when taken, so they count against the free blocks
        num_revived = sum(1 for b in computed_blocks if b.ref_cnt == 0)
        if num_new_blocks + num_revived > self.pool.num_free_blocks:
            return False
        self.pool.touch(computed_blocks)  # before allocate(), which could otherwise evict them
        held = self._blocks.setdefault(request.request_id, held)
        held.extend(computed_blocks)
        held.extend(self.pool.allocate(num_new_blocks))
        self._num_registered.setdefault(request.request_id, len(computed_blocks))
        self.cache_full_blocks(request, total)
        return True

    def cache_full_blocks(self, request: Request, num_tokens: int) -> None:
        """Register the request's full blocks among its first `num_tokens` tokens in the prefix cache.

        Only known tokens have block hashes, so blocks holding draft tokens are never cached.
        """
        if not self.enable_prefix_caching:
            return
        rid, bs = request.request_id, self.block_size
        held, hashes, tokens = self._blocks[rid], self._block_hashes(request), request.all_token_ids
        num_full = min(num_tokens // bs, len(hashes), len(held))
        for i in range(self._num_registered.get(rid, 0), num_full):
            self.pool.cache(held[i], hashes[i], tokens[i * bs:(i + 1) * bs])
        self._num_registered[rid] = max(self._num_registered.get(rid, 0), num_full)

    def free(self, request: Request) -> None:
        """Release every block of the request (tail first: its last blocks get evicted first)."""
        blocks = self._blocks.pop(request.request_id, [])
        self._num_registered.pop(request.request_id, None)
        self.pool.free(reversed(blocks))

    def check_invariants(self) -> None:
        """Every block is free or referenced, ref counts equal the requests holding it, no leaks."""
        holders: Counter = Counter()
        for rid, blocks in self._blocks.items():
            ids = [b.block_id for b in blocks]
            if len(set(ids)) != len(ids):
                raise AssertionError(f"request {rid} holds a block twice: {ids}")
            holders.update(ids)
        self.pool.check_invariants(holders)
