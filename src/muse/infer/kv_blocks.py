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

Placement. The runner reads a request's blocks in table order, and reads them faster from adjacent
addresses (fewer TLB and DRAM page misses): bench/kv_placement.py replays bench/engine.py's steps at
concurrency 32 under both allocators, and the forward ran ~4% faster with 85% of the table neighbours
it reads adjacent than with the 31% of plain LRU order (BENCHMARKS.md section 5). So a request's new blocks are, where possible, the free blocks right after its last one;
its first ones (or when that block is taken) start in a free run with room for it to grow to prompt +
max_tokens: a run of never-used or evicted blocks if there is one (evicting nothing, as LRU order
would), past half the run's slack (room for a request ending just before it). `allocate_slots`
passes these hints to `BlockPool.allocate`. That takes cached blocks out of LRU order, but never the
most recently freed quarter of the free queue (by free count): a block freed that recently (a
conversation's previous turn, a preempted request's prefix) is evicted in LRU order only, as without
placement. (No such guard measured a little faster still, but evicted a third more cached blocks.)

Timing contract with the runner: `allocate_slots` registers the full blocks that the step is ABOUT to
compute, so another request scheduled in the same step may reuse them (this is how n > 1 samples
share a prompt computed once). The runner must therefore write every scheduled token's K/V of a layer
before any attention of that layer reads the cache, which a batched paged-attention forward does.
"""

from __future__ import annotations

import hashlib
import sys
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


# Room a request is placed with at most (blocks): a longer one moves to a new run once in a while,
# and the search for a run stays short for long max_tokens.
MAX_PLACEMENT_ROOM = 64


def cdiv(a: int, b: int) -> int:
    return -(-a // b)


class Block:
    """One block of KV slots: its id, reference count, and (when full and cached) hash and token ids."""

    __slots__ = ("block_id", "ref_cnt", "block_hash", "token_ids", "freed_at")

    def __init__(self, block_id: int):
        self.block_id = block_id
        self.ref_cnt = 0
        self.freed_at = 0  # BlockPool's count of frees when it last joined the free queue
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
        self._num_frees = 0     # blocks that joined the free queue so far: a clock for `freed_at`
        self._free_map = bytearray(b"\x01") * num_blocks   # 1 = free: bytes.find looks for runs
        self._clean_map = bytearray(b"\x01") * num_blocks  # 1 = free and uncached

    @property
    def num_free_blocks(self) -> int:
        """Blocks no request holds (cached or not): what allocate() can hand out."""
        return len(self._free)

    @property
    def num_cached_blocks(self) -> int:
        return len(self._cached)

    def allocate(self, n: int, after: int | None = None, room: int = 0) -> list[Block]:
        """n blocks, ref_cnt 1, hashes evicted; without hints from the LRU end of the free queue.

        Placement hints (module docstring): `after`, the block the new ones follow in a request's
        table; `room`, how many blocks the request may still grow to (these n included). Each block
        is then the one after the previous if that one may be taken, else from the LRU end.
        """
        if n > len(self._free):
            raise RuntimeError(f"allocate({n}) with only {len(self._free)} free blocks; check first")
        nxt = limit = None
        if n and (after is not None or room):
            oldest = next(iter(self._free.values())).freed_at  # the free queue is in freed_at order
            limit = oldest + 3 * (self._num_frees - oldest) // 4  # cached blocks freed later stay put
            if after is not None and self._placeable(after + 1, limit):
                nxt = after + 1
            else:
                nxt = self._find_run(max(room, n), limit)
        out = []
        for _ in range(n):
            if nxt is not None and self._placeable(nxt, limit):
                block = self._free.pop(nxt)
            else:
                _, block = self._free.popitem(last=False)
            self._free_map[block.block_id] = self._clean_map[block.block_id] = 0
            self._evict(block)
            block.ref_cnt = 1
            out.append(block)
            if nxt is not None:
                nxt = block.block_id + 1
        return out

    def _placeable(self, block_id: int, limit: int) -> bool:
        """Free, and uncached or freed at `limit` or before (not among the most recently freed)."""
        if block_id >= self.num_blocks or not self._free_map[block_id]:
            return False
        block = self.blocks[block_id]
        return block.block_hash is None or block.freed_at <= limit

    def _find_run(self, want: int, limit: int, max_tries: int = 32) -> int | None:
        """Where a request that may grow to `want` blocks should start: in the first run (first fit
        by address) of want + 1 free blocks, uncached ones if there is such a run (evicting nothing),
        else placeable ones; failing both, of 2 placeable blocks. It starts past half the run's
        slack (at most `want` blocks): the room of a request that may end right before the run.
        None: no such run among the first `max_tries` candidates."""
        j = self._clean_map.find(b"\x01" * (want + 1))
        if j >= 0:
            return self._past_slack(j, want + 1, self._clean_map)
        for w in (want + 1, 2):
            pattern = b"\x01" * w
            j = self._free_map.find(pattern)
            for _ in range(max_tries):
                if j < 0:
                    break
                bad = next((i for i in range(j + 1, j + w) if not self._placeable(i, limit)), None)
                if bad is None:
                    return self._past_slack(j, w, self._free_map)
                j = self._free_map.find(pattern, bad)
        return None

    def _past_slack(self, j: int, w: int, run_map: bytearray) -> int:
        """The start in the run found at j (w blocks wanted): past half its slack, at most w - 1."""
        end = run_map.find(b"\x00", j)
        slack = (self.num_blocks if end < 0 else end) - j - w
        return j + 1 + min(slack // 2, w - 1)

    def touch(self, blocks: Iterable[Block]) -> None:
        """Take one more reference on each block (a cache hit); revives free cached blocks."""
        for block in blocks:
            if block.ref_cnt == 0:
                del self._free[block.block_id]
                self._free_map[block.block_id] = self._clean_map[block.block_id] = 0
            block.ref_cnt += 1

    def free(self, blocks: Iterable[Block]) -> None:
        """Drop one reference each, in the given order; blocks reaching 0 join the MRU end of the queue."""
        for block in blocks:
            if block.ref_cnt <= 0:
                raise RuntimeError(f"double free of {block}")
            block.ref_cnt -= 1
            if block.ref_cnt == 0:
                self._free[block.block_id] = block
                self._free_map[block.block_id] = 1
                self._clean_map[block.block_id] = block.block_hash is None
                self._num_frees += 1
                block.freed_at = self._num_frees

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
        self._clean_map[block.block_id] = 0
        return True

    def reset_prefix_cache(self) -> int:
        """Drop every cache entry, of free and of held blocks alike (held ones stay with their holders);
        returns how many. Free blocks become plain free blocks: nothing is evicted twice."""
        dropped = len(self._cached)
        for block in self._cached.values():
            block.block_hash = block.token_ids = None
            if block.ref_cnt == 0:
                self._clean_map[block.block_id] = 1
        self._cached.clear()
        return dropped

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
        stamps = [b.freed_at for b in self._free.values()]
        if stamps != sorted(stamps):
            fail("the free queue is not in the order blocks were freed")
        for b in self.blocks:
            if b.ref_cnt != holders.get(b.block_id, 0):
                fail(f"{b} has ref_cnt {b.ref_cnt} but {holders.get(b.block_id, 0)} holders")
            if (b.ref_cnt == 0) != (b.block_id in self._free):
                fail(f"{b} is {'not ' if b.ref_cnt == 0 else ''}in the free queue")
            if self._free_map[b.block_id] != (b.ref_cnt == 0):
                fail(f"{b} is marked {'free' if self._free_map[b.block_id] else 'held'} in the free map")
            if self._clean_map[b.block_id] != (b.ref_cnt == 0 and b.block_hash is None):
                fail(f"{b} is marked {'clean' if self._clean_map[b.block_id] else 'not clean'} in the clean map")
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
        logits to sample from. A request asking for prompt logprobs from position S on
        (`SamplingParams.first_prompt_logprob`, 1 by default) hits at most S - 1 tokens: position S - 1
        must be computed, as its logits give token S's logprob (so without a start: no hits at all).
        """
        if not self.enable_prefix_caching:
            return [], 0
        # the hit covers positions < limit: at least the last known token is computed
        limit = request.num_tokens - 1
        if request.sampling_params.prompt_logprobs is not None:
            limit = min(limit, request.sampling_params.first_prompt_logprob - 1)
        if limit < self.block_size:
            return [], 0
        hashes, tokens, bs = self._block_hashes(request), request.all_token_ids, self.block_size
        hits: list[Block] = []
        for i in range(min(len(hashes), limit // bs)):
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
        if num_new_blocks == 0 and not computed_blocks and held:  # most decode steps: room left
            self.cache_full_blocks(request, total)
            return True
        self.pool.touch(computed_blocks)  # before allocate(), which could otherwise evict them
        held = self._blocks.setdefault(request.request_id, held)
        held.extend(computed_blocks)
        if num_new_blocks:
            # placement hints: after its last block, room for prompt + max_tokens (its most)
            most = self.num_blocks_needed(request.num_prompt_tokens + request.max_tokens - 1)
            room = max(min(most - len(held), MAX_PLACEMENT_ROOM), num_new_blocks)
            held.extend(self.pool.allocate(num_new_blocks, held[-1].block_id if held else None, room))
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
        if num_tokens // bs <= self._num_registered.get(rid, 0):
            return  # no block filled up since the last call (most steps)
        held, hashes, tokens = self._blocks[rid], self._block_hashes(request), request.all_token_ids
        num_full = min(num_tokens // bs, len(hashes), len(held))
        for i in range(self._num_registered.get(rid, 0), num_full):
            self.pool.cache(held[i], hashes[i], tokens[i * bs:(i + 1) * bs])
        self._num_registered[rid] = max(self._num_registered.get(rid, 0), num_full)

    def reset_prefix_cache(self) -> int:
        """Forget every cached prefix: after a weight update the cached K/V no longer match the model.
        A request holding blocks keeps them and finishes on them, but registers none of its blocks from
        now on (they continue K/V computed by the old weights), until it is preempted and recomputes.
        Returns the number of cache entries dropped."""
        for rid in self._blocks:
            self._num_registered[rid] = sys.maxsize
        return self.pool.reset_prefix_cache()

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
