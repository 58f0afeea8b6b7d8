"""KV-block bookkeeping (torch-free): hash chain, prefix-cache hits, refcounts, LRU eviction, revival."""

from collections import Counter

import pytest

from muse.infer.kv_blocks import ROOT_HASH, BlockPool, KVCacheManager, hash_block
from muse.infer.request import Request
from muse.infer.sampling_params import SamplingParams

BS = 4


def req(rid, tokens, **params):
    return Request(rid, tokens, SamplingParams(**params))


def admit(kv, r):
    """What the scheduler does for a waiting request: take the hits, allocate the rest."""
    hits, n = kv.get_computed_blocks(r)
    assert kv.allocate_slots(r, r.num_tokens - n, hits)
    r.num_computed_tokens = n
    return n


def test_hash_chain_distinguishes_equal_blocks_under_different_prefixes():
    a = hash_block(ROOT_HASH, [1, 2, 3, 4])
    assert a == hash_block(ROOT_HASH, [1, 2, 3, 4])  # deterministic
    assert hash_block(a, [5, 6, 7, 8]) != hash_block(hash_block(ROOT_HASH, [9, 9, 9, 9]), [5, 6, 7, 8])
    assert hash_block(ROOT_HASH, [1, 2, 3, 4]) != hash_block(ROOT_HASH, [1, 2, 3, 5])
    assert len(a) == 32


def test_prefix_hits_across_requests_sharing_a_prefix():
    kv = KVCacheManager(num_blocks=16, block_size=BS)
    a = req("a", list(range(10)))                       # blocks [0..3] [4..7] + partial [8, 9]
    assert admit(kv, a) == 0
    b = req("b", list(range(8)) + [50, 51, 52])         # same two full blocks, different tail
    assert admit(kv, b) == 8
    assert kv.block_ids("b")[:2] == kv.block_ids("a")[:2]
    assert kv.block_ids("b")[2] != kv.block_ids("a")[2]
    # same second block content after a different first block: the chain must say "miss"
    c = req("c", [9, 9, 9, 9] + [4, 5, 6, 7] + [1])
    assert admit(kv, c) == 0
    assert kv.block_ids("c")[1] not in kv.block_ids("a")
    kv.check_invariants()


def test_never_the_whole_prompt_is_a_hit():
    kv = KVCacheManager(num_blocks=16, block_size=BS)
    admit(kv, req("a", list(range(8))))
    b = req("b", list(range(8)))                         # identical, exactly two full blocks
    hits, n = kv.get_computed_blocks(b)
    assert n == 4 and len(hits) == 1                     # the last token must still be computed


def test_shared_blocks_are_reference_counted():
    kv = KVCacheManager(num_blocks=16, block_size=BS)
    a, b = req("a", list(range(9))), req("b", list(range(9)))
    admit(kv, a)
    admit(kv, b)
    shared = kv.block_ids("a")[:2]
    assert [kv.pool.blocks[i].ref_cnt for i in shared] == [2, 2]
    kv.check_invariants()
    used = 16 - kv.num_free_blocks
    assert used == 4                                     # 2 shared + 1 tail each
    kv.free(a)
    assert [kv.pool.blocks[i].ref_cnt for i in shared] == [1, 1]
    assert kv.num_free_blocks == 16 - 3
    kv.check_invariants()
    kv.free(b)
    assert kv.num_free_blocks == 16 and kv.usage == 0.0
    kv.check_invariants()


def test_freed_cached_blocks_are_revived():
    kv = KVCacheManager(num_blocks=8, block_size=BS)
    a = req("a", list(range(9)))
    admit(kv, a)
    old = kv.block_ids("a")
    kv.free(a)
    assert kv.num_free_blocks == 8 and kv.pool.num_cached_blocks == 2  # freed but still cached
    b = req("b", list(range(9)) + [3])
    assert admit(kv, b) == 8
    assert kv.block_ids("b")[:2] == old[:2]
    assert kv.num_free_blocks == 8 - 3
    kv.check_invariants()


def test_lru_eviction_order_tail_blocks_of_the_oldest_free_go_first():
    kv = KVCacheManager(num_blocks=4, block_size=2)
    a, b = req("a", [1, 2, 3, 4, 5]), req("b", [6, 7, 8, 9, 5])
    for r in (a, b):
        assert kv.allocate_slots(r, 4)                   # two full blocks each, both cached
        r.num_computed_tokens = 4
    kv.free(a)
    kv.free(b)

    def hits(tokens):
        return kv.get_computed_blocks(req("q", tokens))[1]

    assert hits([1, 2, 3, 4, 0]) == 4 and hits([6, 7, 8, 9, 0]) == 4
    kv.pool.allocate(1)                                  # evicts a's LAST block (freed first)
    assert hits([1, 2, 3, 4, 0]) == 2 and hits([6, 7, 8, 9, 0]) == 4
    kv.pool.allocate(1)                                  # then a's first block
    assert hits([1, 2, 3, 4, 0]) == 0 and hits([6, 7, 8, 9, 0]) == 4
    kv.pool.allocate(1)
    assert hits([6, 7, 8, 9, 0]) == 2
    assert kv.pool.num_evictions == 3


def test_revived_hits_count_against_free_blocks_and_failure_changes_nothing():
    kv = KVCacheManager(num_blocks=3, block_size=2)
    a = req("a", [1, 2, 3, 4, 5])
    admit(kv, a)
    kv.free(a)                                           # 3 free blocks, 2 of them cached
    big = req("big", [1, 2, 3, 4, 7, 8, 9])              # 2 hits + 2 new blocks > 3 free
    hits, n = kv.get_computed_blocks(big)
    assert n == 4
    assert not kv.allocate_slots(big, big.num_tokens - n, hits)
    assert kv.num_free_blocks == 3 and kv.block_ids("big") == []
    kv.check_invariants()
    ok = req("ok", [1, 2, 3, 4, 7, 8])                   # 2 hits + 1 new == 3 free
    assert admit(kv, ok) == 4
    assert kv.num_free_blocks == 0
    kv.check_invariants()


def test_hash_collision_is_treated_as_a_miss():
    pool = BlockPool(num_blocks=2, block_size=2)
    block = pool.allocate(1)[0]
    h = hash_block(ROOT_HASH, [1, 2])
    assert pool.cache(block, h, [1, 2])
    assert pool.lookup(h, [1, 2]) is block
    assert pool.lookup(h, [1, 3]) is None                # same hash (forged), other tokens: no hit


def test_duplicate_content_first_registration_wins():
    kv = KVCacheManager(num_blocks=8, block_size=BS)
    a, b = req("a", list(range(6))), req("b", list(range(6)))
    hits_b, _ = kv.get_computed_blocks(b)                # looked up before a is cached: no hit
    assert hits_b == []
    admit(kv, a)
    assert kv.allocate_slots(b, 6)                       # computes the same first block again
    first_a, first_b = kv.block_ids("a")[0], kv.block_ids("b")[0]
    assert first_a != first_b
    assert kv.pool.blocks[first_a].block_hash is not None and kv.pool.blocks[first_b].block_hash is None
    kv.check_invariants()
    kv.free(a)
    kv.free(b)
    assert kv.get_computed_blocks(req("c", list(range(6))))[0][0].block_id == first_a
    kv.check_invariants()


def test_draft_positions_are_never_cached():
    kv = KVCacheManager(num_blocks=8, block_size=BS)
    r = req("r", [1, 2, 3, 4, 5, 6])
    assert kv.allocate_slots(r, 6 + 3)                   # 6 known tokens + 3 drafts -> 9 slots, 3 blocks
    assert len(kv.block_ids("r")) == 3
    assert kv.pool.num_cached_blocks == 1                # only [1, 2, 3, 4]; block 2 holds drafts


def test_no_hits_without_prefix_caching_or_with_prompt_logprobs():
    kv = KVCacheManager(num_blocks=8, block_size=BS, enable_prefix_caching=False)
    admit(kv, req("a", list(range(9))))
    assert kv.get_computed_blocks(req("b", list(range(9)))) == ([], 0)
    assert kv.pool.num_cached_blocks == 0
    kv = KVCacheManager(num_blocks=8, block_size=BS)
    admit(kv, req("a", list(range(9))))
    assert kv.get_computed_blocks(req("b", list(range(9)), prompt_logprobs=1)) == ([], 0)
    assert kv.get_computed_blocks(req("c", list(range(9))))[1] == 8


def test_allocation_fails_cleanly_when_the_pool_is_full():
    kv = KVCacheManager(num_blocks=2, block_size=BS)
    a = req("a", list(range(8)))
    assert kv.allocate_slots(a, 8)
    b = req("b", [7])
    assert not kv.allocate_slots(b, 1)
    assert kv.usage == 1.0 and kv.block_ids("b") == []
    kv.check_invariants()
    with pytest.raises(RuntimeError, match="double free"):
        kv.pool.free([kv.pool.blocks[0]] * 2)


def test_check_invariants_catches_corruption():
    kv = KVCacheManager(num_blocks=4, block_size=BS)
    a = req("a", list(range(5)))
    admit(kv, a)
    kv.check_invariants()
    kv.pool.blocks[kv.block_ids("a")[0]].ref_cnt += 1    # a leaked reference
    with pytest.raises(AssertionError, match="ref_cnt"):
        kv.check_invariants()
    kv.pool.blocks[kv.block_ids("a")[0]].ref_cnt -= 1
    kv.pool.check_invariants(Counter({b: 1 for b in kv.block_ids("a")}))
    with pytest.raises(AssertionError):
        kv.pool.check_invariants(Counter())              # blocks referenced by nobody but not free


def grow(kv, r, new_tokens):
    """A decode step at a time: room for the last token, then it is computed and a token appended."""
    for tok in new_tokens:
        assert kv.allocate_slots(r, r.num_tokens - r.num_computed_tokens)
        r.num_computed_tokens = r.num_tokens
        r.append_output(tok)


def test_decode_steps_register_every_block_that_fills_up():
    # most decode steps take the fast path (no new block); the blocks they fill must still be cached
    kv = KVCacheManager(num_blocks=16, block_size=BS)
    a = req("a", [1, 2, 3], max_tokens=20)
    admit(kv, a)
    grow(kv, a, range(10, 24))                           # 17 known tokens, 16 computed: 4 full blocks
    assert kv.pool.num_cached_blocks == 4
    b = req("b", list(a.all_token_ids) + [99])
    assert kv.get_computed_blocks(b)[1] == 16
    kv.check_invariants()


def test_a_growing_request_gets_adjacent_blocks_and_a_new_one_starts_with_room():
    kv = KVCacheManager(num_blocks=16, block_size=2)
    a, b = req("a", [1, 2, 3, 4], max_tokens=3), req("b", [5, 6, 7, 8], max_tokens=2)
    admit(kv, a)                                         # may grow to cdiv(4 + 3 - 1, 2) = 3 blocks
    admit(kv, b)
    ta, tb = kv.block_ids("a"), kv.block_ids("b")
    assert ta == [ta[0], ta[0] + 1] and tb == [tb[0], tb[0] + 1]
    assert ta[0] + 2 not in tb and tb[0] + 2 not in ta   # each one's next block is left free for it
    grow(kv, a, [9, 10])
    assert kv.block_ids("a") == [ta[0], ta[0] + 1, ta[0] + 2]
    grow(kv, b, [11, 12])
    assert kv.block_ids("b") == [tb[0], tb[0] + 1, tb[0] + 2]
    kv.check_invariants()


def test_placement_never_evicts_the_most_recently_freed_quarter_out_of_lru_order():
    pool = BlockPool(num_blocks=9, block_size=2)
    blocks = pool.allocate(9)
    for i, b in enumerate(blocks):
        assert pool.cache(b, hash_block(ROOT_HASH, [i, i]), [i, i])
    pool.free(blocks[:8])                                # freed in id order; block 8 stays held
    # freed_at 1..8: the last quarter (blocks 6, 7) are protected from placement
    assert pool.allocate(1, after=2)[0].block_id == 3    # placed: out of LRU order, but old enough
    # 6 is too recent: a run elsewhere instead (first fit by address, block 0 left as room)
    assert pool.allocate(1, after=5)[0].block_id == 1
    assert pool.blocks[6].block_hash is not None and pool.blocks[7].block_hash is not None
    assert pool.allocate(1)[0].block_id == 0             # without hints: LRU as always
    # an uncached free block is placed however recently it was freed (3 lost its hash when taken)
    pool.free([pool.blocks[3]])
    assert pool.blocks[3].block_hash is None
    assert pool.allocate(1, after=2)[0].block_id == 3
    pool.check_invariants(Counter({1: 1, 0: 1, 3: 1, 8: 1}))


def test_placement_hints_change_which_blocks_not_what_is_cached_or_counted():
    # the same admissions and frees with and without hints leave the same cached contents and counts
    import random
    rng = random.Random(0)
    ops = [(rng.random() < 0.6, rng.randint(1, 4), rng.randrange(10)) for _ in range(300)]
    for hinted in (False, True):
        pool = BlockPool(num_blocks=24, block_size=2)
        held: list[list] = []
        for alloc, n, pick in ops:
            if alloc and n <= pool.num_free_blocks:
                after = held[-1][-1].block_id if hinted and held else None
                got = pool.allocate(n, after=after, room=n + 2 if hinted else 0)
                assert len({b.block_id for b in got}) == n and all(b.ref_cnt == 1 for b in got)
                held.append(got)
            elif held:
                pool.free(held.pop(pick % len(held)))
            pool.check_invariants(Counter(b.block_id for bs in held for b in bs))
        assert pool.num_free_blocks == 24 - sum(map(len, held))


def test_placement_prefers_a_run_of_uncached_blocks_to_evicting_cached_ones():
    pool = BlockPool(num_blocks=16, block_size=2)
    blocks = pool.allocate(8)                            # 0..7, cached, then freed long ago
    for i, b in enumerate(blocks):
        pool.cache(b, hash_block(ROOT_HASH, [i, i]), [i, i])
    pool.free(blocks)
    got = [b.block_id for b in pool.allocate(2, room=3)]
    assert got == [got[0], got[0] + 1] and got[0] >= 8  # never-used blocks 8..15, nothing evicted
    assert pool.num_evictions == 0 and pool.num_cached_blocks == 8
    pool.check_invariants(Counter(got))


def test_reset_prefix_cache_forgets_free_and_held_blocks_and_stops_registering_held_ones():
    """After a weight update nothing computed before may be hit: free cached blocks become plain free
    blocks, held ones leave the index (their holder keeps them), and a holder registers none of the
    blocks it fills later (they continue K/V of the old weights)."""
    kv = KVCacheManager(num_blocks=16, block_size=BS)
    done = req("done", list(range(9)))
    admit(kv, done)
    kv.free(done)                                        # 2 cached blocks, free
    held = req("held", list(range(100, 109)))
    admit(kv, held)                                      # 2 cached blocks, held
    assert kv.pool.num_cached_blocks == 4
    assert kv.reset_prefix_cache() == 4
    assert kv.pool.num_cached_blocks == 0
    kv.check_invariants()
    assert kv.get_computed_blocks(req("x", list(range(9))))[1] == 0
    assert kv.get_computed_blocks(req("y", list(range(100, 109))))[1] == 0
    held.num_computed_tokens = 9
    for t in range(109, 116):                            # decode until its third block is full
        held.append_output(t)
        assert kv.allocate_slots(held, 1)
        held.num_computed_tokens += 1
    assert kv.pool.num_cached_blocks == 0
    kv.check_invariants()
    kv.free(held)
    again = req("again", list(range(100, 109)))          # computed after the reset: cached again
    admit(kv, again)
    assert kv.pool.num_cached_blocks == 2
    kv.check_invariants()
