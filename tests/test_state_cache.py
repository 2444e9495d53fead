"""engine/state_cache.py on its own: slots handed out and back (fresh once), the snapshot LRU
(evicts the least recently used, keeps a key's id), the step plan (restores for prefix hits,
saves at block boundaries sent with the next step), and the tensors' prepare order (the last
step's saves, then zeroing fresh rows, then restores)."""
from __future__ import annotations

import types

import torch

from minserve.engine.state_cache import (
    StateCaches,
    StateSlotPool,
    StateSnapshots,
    plan_states,
    state_slot_bytes,
)


def test_slot_pool_hands_out_and_takes_back():
    pool = StateSlotPool(2)
    assert pool.allocate("a") == 0 and pool.allocate("a") == 0 and pool.allocate("b") == 1
    assert pool.allocate("c") is None and pool.num_free == 0
    assert pool.take_fresh("a") and not pool.take_fresh("a")
    pool.free("a")
    assert pool.allocate("c") == 0 and pool.take_fresh("c")


def test_snapshots_evict_least_recently_used():
    snaps = StateSnapshots(2, first_row=5)
    a, b = snaps.save("a"), snaps.save("b")
    assert snaps.lookup("a") == a and snaps.save("a") == a      # touched: b is oldest
    c = snaps.save("c")
    assert c == b and snaps.lookup("b") is None and snaps.row(c) == 5 + c


def test_plan_restores_hits_and_sends_saves_with_the_next_step():
    pool, snaps = StateSlotPool(4), StateSnapshots(4, first_row=5)
    kv = types.SimpleNamespace(state_slots=pool, state_snapshots=snaps, block_size=4,
                               block_key=lambda req, n: (req.request_id[0], n))
    hit = types.SimpleNamespace(request_id="x-hit", num_computed_tokens=8)
    snap = snaps.save(("x", 2))
    new = types.SimpleNamespace(request_id="y-new", num_computed_tokens=0)
    for r in (hit, new):
        pool.allocate(r.request_id)
    slots, saves, restores = plan_states(kv, [hit, new], [3, 4])
    assert slots == [0, 1] and restores == [snaps.row(snap), 0]
    assert saves == []                                   # y's save (at 4) goes with the next step
    new.num_computed_tokens, hit.num_computed_tokens = 4, 11
    slots, saves, restores = plan_states(kv, [hit, new], [1, 1])
    assert restores == [] and saves == [1, snaps.row(snaps.lookup(("y", 1)))]
    assert plan_states(kv, [hit], [1])[1] == [0, snaps.row(snaps.lookup(("x", 3)))]


def test_prepare_saves_then_zeroes_then_restores():
    layers = [(torch.zeros(5, 2, 3), torch.zeros(5, 2, 2, 2))]
    caches = StateCaches(layers, num_slots=2)        # rows: slots 0-1, scratch 2, snapshots 3-4
    conv, ssm = layers[0]
    conv[0], conv[1], conv[4] = 1.0, 2.0, 7.0
    step = types.SimpleNamespace(num_computed_tokens=[0, 8], state_slots=[0, 1],
                                 state_saves=[0, 3], state_restores=[4, 1])
    attn = types.SimpleNamespace()
    caches.prepare(attn, step)
    assert conv[3].eq(1).all() and conv[0].eq(0).all() and conv[1].eq(7).all()
    assert attn.state_slots_host == [0, 1] and attn.state_slots.tolist() == [0, 1]
    step = types.SimpleNamespace(num_computed_tokens=[0], state_slots=None, state_saves=None,
                                 state_restores=None)
    caches.prepare(attn, step)
    assert attn.state_slots_host == [caches.scratch_slot]


def test_slot_bytes_count_every_linear_layer():
    model = types.SimpleNamespace(state_cache_shapes=lambda: [((6, 3), (2, 4, 4))] * 3)
    assert state_slot_bytes(model, torch.bfloat16) == 3 * (18 * 2 + 32 * 4)
    assert state_slot_bytes(object(), torch.float32) == 0
