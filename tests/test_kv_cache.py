"""KVCacheManager / BlockPool invariants: ref counts, conservation, prefix hits (chained, verified),
LRU eviction, and allocate_slots returning None without side effects."""
from __future__ import annotations

import pytest

from minserve.engine import kv_cache
from minserve.engine.kv_cache import KVCacheManager
from minserve.engine.request import MultiModalItem, Request
from minserve.sampling_params import SamplingParams

BS = 4


def req(rid: str, ids: list[int]) -> Request:
    return Request(rid, list(ids), SamplingParams())


def check_conserved(kv: KVCacheManager, requests: list[Request]) -> None:
    refs = [0] * kv.num_blocks
    for r in requests:
        for b in r.block_ids:
            refs[b] += 1
    assert [blk.ref_cnt for blk in kv.pool.blocks] == refs
    used = sum(1 for c in refs if c)
    assert kv.num_free_blocks + used == kv.num_blocks
    assert set(kv.pool.free_queue) == {i for i, c in enumerate(refs) if c == 0}


def admit(kv: KVCacheManager, r: Request, num_new: int | None = None) -> list[int] | None:
    blocks, num_cached = kv.get_computed_blocks(r)
    num_new = r.num_tokens - num_cached if num_new is None else num_new
    new = kv.allocate_slots(r, num_new, blocks)
    if new is not None:
        r.num_computed_tokens = num_cached
        r.num_cached_tokens = num_cached
    return new


def finish_prefill(kv: KVCacheManager, r: Request) -> None:
    r.num_computed_tokens = r.num_tokens
    kv.cache_full_blocks(r)


def test_allocate_and_free_conserve_blocks():
    kv = KVCacheManager(8, BS)
    a, b = req("a", range(10)), req("b", range(100, 105))
    assert len(admit(kv, a)) == 3 and len(a.block_ids) == 3
    assert len(admit(kv, b)) == 2
    check_conserved(kv, [a, b])
    assert kv.usage == pytest.approx(5 / 8)
    kv.free(a)
    assert a.block_ids == []
    check_conserved(kv, [b])
    kv.free(b)
    check_conserved(kv, [])
    assert kv.usage == 0.0


def test_allocate_slots_returns_none_and_changes_nothing():
    kv = KVCacheManager(3, BS)
    a = req("a", range(8))
    admit(kv, a)
    b = req("b", range(50, 59))          # needs 3 blocks, only 1 free
    before = list(kv.pool.free_queue)
    assert admit(kv, b) is None
    assert b.block_ids == [] and list(kv.pool.free_queue) == before
    check_conserved(kv, [a])
    # growing a request by one token past its last block needs a new block
    finish_prefill(kv, a)
    a.output_token_ids.append(7)
    assert kv.allocate_slots(a, 1) == [2]
    assert kv.allocate_slots(req("c", [1]), 1) is None


def test_prefix_hit_shares_blocks_and_leaves_one_token():
    kv = KVCacheManager(16, BS)
    prompt = list(range(12))
    a = req("a", prompt + [99])
    admit(kv, a)
    finish_prefill(kv, a)
    b = req("b", prompt + [77, 78])
    blocks, num_cached = kv.get_computed_blocks(b)
    assert blocks == a.block_ids[:3] and num_cached == 12
    admit(kv, b)
    assert b.block_ids[:3] == a.block_ids[:3] and b.num_computed_tokens == 12
    check_conserved(kv, [a, b])
    # a prompt that is exactly the cached blocks still computes its last token
    c = req("c", prompt)
    blocks, num_cached = kv.get_computed_blocks(c)
    assert num_cached == 8 and blocks == a.block_ids[:2]
    assert kv.prefix_cache_hits == 12 + 12 + 8   # b looked up twice (get + admit)


def test_prefix_root_keeps_adapters_salts_and_images_apart():
    """Blocks are shared only between requests with the same adapter, cache_salt and images."""
    kv = KVCacheManager(64, BS)
    cat, dog = [MultiModalItem(2, 4, "cat")], [MultiModalItem(2, 4, "dog")]
    kinds = [{}, {"adapter_name": "sql"}, {"cache_salt": "t1"}, {"mm_items": cat},
             {"mm_items": dog}, {"adapter_name": "sql", "cache_salt": "t1"}]
    firsts = {}
    for i, kw in enumerate(kinds * 2):   # round 2 hits round 1's blocks, kind by kind
        r = Request(str(i), list(range(13)), SamplingParams(), **kw)
        admit(kv, r)
        finish_prefill(kv, r)
        first = firsts.setdefault(i % len(kinds), r)
        assert r.num_cached_tokens == (0 if first is r else 12), kw
        assert r.block_ids[:3] == first.block_ids[:3]


def test_hash_is_chained_over_the_prefix():
    kv = KVCacheManager(16, BS)
    a = req("a", [1, 2, 3, 4, 5, 6, 7, 8, 9])
    admit(kv, a)
    finish_prefill(kv, a)
    # same second block, different first block: no hit at all
    b = req("b", [0, 2, 3, 4, 5, 6, 7, 8, 9])
    assert kv.get_computed_blocks(b) == ([], 0)


def test_hash_collision_is_verified(monkeypatch):
    monkeypatch.setattr(kv_cache, "hash_block", lambda parent, ids: 42)
    kv = KVCacheManager(16, BS)
    a = req("a", [1, 2, 3, 4, 5])
    admit(kv, a)
    finish_prefill(kv, a)
    b = req("b", [9, 9, 9, 9, 5])        # same (forced) hash, other tokens
    assert kv.get_computed_blocks(b) == ([], 0)
    c = req("c", [1, 2, 3, 4, 6])
    assert kv.get_computed_blocks(c)[1] == 4


def test_free_cached_blocks_stay_findable_until_evicted_lru():
    kv = KVCacheManager(4, BS)
    a = req("a", range(9))               # 3 blocks, 2 full
    admit(kv, a)
    finish_prefill(kv, a)
    kv.free(a)
    check_conserved(kv, [])
    # hit on free cached blocks: touching them takes them out of the free queue
    b = req("b", list(range(8)) + [50])
    blocks, num_cached = kv.get_computed_blocks(b)
    assert num_cached == 8
    admit(kv, b)
    assert b.block_ids[:2] == blocks
    check_conserved(kv, [b])
    kv.free(b)
    # a new unrelated request needing all 4 blocks evicts every cached hash
    c = req("c", range(200, 216))
    admit(kv, c)
    assert kv.pool.cached == {}
    kv.free(c)
    assert kv.get_computed_blocks(req("d", list(range(8)) + [1])) == ([], 0)


def test_eviction_order_is_lru_tail_first():
    kv = KVCacheManager(6, BS)
    a = req("a", range(13))              # 4 blocks, 3 full and published
    admit(kv, a)
    finish_prefill(kv, a)
    kv.free(a)
    # one new block: the oldest free blocks (never used: 4, 5) go first, then a's tail blocks
    x = req("x", [500])
    admit(kv, x)
    assert x.block_ids == [4]
    y = req("y", range(300, 309))        # 3 blocks: 5, then a's last (partial) and last full
    admit(kv, y)
    assert y.block_ids == [5, 3, 2]
    # a's first two blocks survived
    assert kv.get_computed_blocks(req("a2", list(range(13)) + [1]))[1] == 8


def test_prefix_caching_off():
    kv = KVCacheManager(8, BS, enable_prefix_caching=False)
    a = req("a", range(9))
    admit(kv, a)
    finish_prefill(kv, a)
    assert kv.get_computed_blocks(req("b", range(9))) == ([], 0)
    assert kv.pool.cached == {}
