"""Scheduler invariants with a fake runner whose 'greedy' token is a pure function of the sequence:
token budget, decodes before prefill chunks, block conservation under finish/abort/preempt,
preemption resumes to the same tokens, an oversized prompt fails alone, n>1 siblings share."""
from __future__ import annotations

import random

from minserve.engine.kv_cache import KVCacheManager
from minserve.engine.request import FinishReason, Request, RequestStatus
from minserve.engine.scheduler import Scheduler, SchedulerConfig, StepPlan, is_sampling_row
from minserve.sampling_params import SamplingParams

BS = 4
EOS = 3


def fake_token(token_ids: list[int]) -> int:
    return 10 + hash(tuple(token_ids)) % 500


class FakeRunner:
    """Checks what a real runner relies on, and returns one token per sampling row."""

    def __init__(self, sched: Scheduler) -> None:
        self.sched = sched

    def execute(self, plan: StepPlan) -> list[int]:
        out = []
        for req, n in zip(plan.requests, plan.num_scheduled_tokens, strict=True):
            assert req.status == RequestStatus.RUNNING
            assert 0 < n <= req.num_uncomputed
            # the request owns enough blocks for every token it will have computed
            assert len(req.block_ids) * BS >= req.num_computed_tokens + n
            if is_sampling_row(req, n):
                out.append(fake_token(req.all_token_ids))
            else:
                out.append(-1)
        return out


def make(num_blocks: int = 64, max_num_seqs: int = 8, budget: int = 32,
         max_model_len: int = 256, caching: bool = True, threshold: int = 0,
         attention: int = 0) -> tuple[Scheduler, FakeRunner]:
    kv = KVCacheManager(num_blocks, BS, caching)
    sched = Scheduler(SchedulerConfig(max_num_seqs, budget, max_model_len, threshold, attention),
                      kv)
    return sched, FakeRunner(sched)


def new_req(rid: str, prompt: list[int], max_tokens: int = 8, **kw) -> Request:
    return Request(rid, prompt, SamplingParams(max_tokens=max_tokens, temperature=0, **kw),
                   eos_token_ids=frozenset([EOS]))


def run(sched: Scheduler, runner: FakeRunner, check=None, max_steps: int = 10_000):
    outputs: dict[str, list] = {}
    steps = 0
    while sched.has_unfinished_requests():
        plan = sched.schedule()
        if check:
            check(plan)
        for o in sched.update(plan, runner.execute(plan) if not plan.is_empty else []):
            outputs.setdefault(o.request_id, []).append(o)
        steps += 1
        assert steps < max_steps, "scheduler made no progress"
    return outputs


def tokens(outs) -> list[int]:
    return [t for o in outs for t in o.new_token_ids]


def check_blocks(sched: Scheduler) -> None:
    kv = sched.kv
    refs = [0] * kv.num_blocks
    for r in sched.running:
        for b in r.block_ids:
            refs[b] += 1
    for r in sched.waiting:
        assert r.block_ids == []
    assert [b.ref_cnt for b in kv.pool.blocks] == refs
    assert kv.num_free_blocks + sum(1 for c in refs if c) == kv.num_blocks


def test_budget_and_decodes_first():
    sched, runner = make(budget=16, max_num_seqs=4)
    rng = random.Random(0)
    for i in range(10):
        sched.add(new_req(f"r{i}", [rng.randrange(10, 500) for _ in range(rng.randrange(1, 40))],
                          max_tokens=rng.randrange(1, 12)))
    seen_chunked = False

    def check(plan: StepPlan) -> None:
        nonlocal seen_chunked
        assert plan.total_num_scheduled_tokens == sum(plan.num_scheduled_tokens) <= 16
        assert len(plan.requests) <= 4
        is_decode = [r.num_uncomputed == 1 and r.num_output_tokens > 0 for r in plan.requests]
        if False in is_decode:
            assert True not in is_decode[is_decode.index(False):], "prefill before a decode"
        seen_chunked |= any(n < r.num_uncomputed for r, n in
                            zip(plan.requests, plan.num_scheduled_tokens, strict=True))
        # every running decode got its token this step
        for r in sched.running:
            if r.num_uncomputed == 1 and r.num_output_tokens > 0:
                assert r in plan.requests

    outs = run(sched, runner, check)
    assert seen_chunked
    assert len(outs) == 10 and all(o[-1].finished for o in outs.values())


def test_long_prompt_is_split_and_others_advance_between_its_chunks():
    """The CPU step policy (issue 22.4): a 400-token prompt runs in chunks of at most 16 tokens
    and 2,000 (query, context) pairs, so its chunks shrink as its context grows; a stream decodes
    at every step meanwhile, and a request arriving mid-prefill runs at the next step and
    finishes long before the long prompt does. Its greedy tokens are those of an unsplit run."""
    sched, runner = make(num_blocks=256, budget=32, max_model_len=1024, threshold=16,
                         attention=2000)
    rng = random.Random(1)
    long_prompt = [rng.randrange(10, 500) for _ in range(400)]
    ticker = new_req("ticker", [11, 12, 13], max_tokens=400, ignore_eos=True)
    sched.add(ticker)
    finished_at: dict[str, int] = {}
    chunks: list[tuple[int, int]] = []   # (context_len, query_len) of the long prompt's chunks
    outputs: dict[str, list[int]] = {}

    def step(i: int) -> StepPlan:
        plan = sched.schedule()
        for r, n in zip(plan.requests, plan.num_scheduled_tokens, strict=True):
            if r.request_id == "long" and r.num_computed_tokens < r.num_prompt_tokens:
                chunks.append((r.num_computed_tokens, n))
        for o in sched.update(plan, runner.execute(plan)):
            outputs.setdefault(o.request_id, []).extend(o.new_token_ids)
            if o.finished:
                finished_at[o.request_id] = i
        return plan

    step(0)                                      # the ticker's prompt, then it decodes
    sched.add(new_req("long", long_prompt, max_tokens=2))
    decodes_during_prefill = 0
    for i in range(1, 1000):
        if i == 3:
            sched.add(new_req("probe", [21, 22, 23, 24], max_tokens=1))
        plan = step(i)
        if "long" not in finished_at and any(r.request_id == "ticker" for r in plan.requests):
            decodes_during_prefill += 1
        if "long" in finished_at:
            break
    assert sum(q for _, q in chunks) == 400 and len(chunks) > 400 // 16
    assert all(q <= 16 and q * (c + q) <= 2000 for c, q in chunks), chunks
    assert chunks[-1][1] < chunks[0][1]          # later chunks are smaller: more context each
    assert decodes_during_prefill >= len(chunks) - 1   # the stream moved at (nearly) every chunk
    assert finished_at["probe"] == 3             # admitted at once, done in one step
    assert finished_at["probe"] < finished_at["long"]
    # chunking changes when tokens are computed, not which: the same greedy tokens as alone
    alone, alone_runner = make(num_blocks=256, budget=1024, max_model_len=1024)
    alone.add(new_req("long", long_prompt, max_tokens=2))
    assert tokens(run(alone, alone_runner)["long"]) == outputs["long"]


def test_greedy_tokens_and_stop_conditions():
    sched, runner = make()
    prompt = [11, 12, 13, 14, 15, 16]
    sched.add(new_req("a", prompt, max_tokens=5))
    outs = run(sched, runner)
    toks = tokens(outs["a"])
    seq = list(prompt)
    for t in toks:
        assert t == fake_token(seq)
        seq.append(t)
    assert len(toks) == 5 and outs["a"][-1].finish_reason == FinishReason.LENGTH
    assert outs["a"][0].num_prompt_tokens == 6
    # stop_token_ids ends at the third token; min_tokens suppresses an earlier stop
    sched.add(new_req("b", prompt, max_tokens=5, stop_token_ids=[toks[2]]))
    sched.add(new_req("c", prompt, max_tokens=5, stop_token_ids=[toks[0]], min_tokens=2))
    outs = run(sched, runner)
    assert tokens(outs["b"]) == toks[:3] and outs["b"][-1].stop_reason == toks[2]
    assert tokens(outs["c"]) == toks  # toks[0] is only a stop once min_tokens is reached


class EosRunner(FakeRunner):
    def execute(self, plan):
        return [EOS if t != -1 else -1 for t in super().execute(plan)]


def test_eos_and_ignore_eos():
    sched, _ = make()
    runner = EosRunner(sched)
    sched.add(new_req("a", [20, 21], max_tokens=4))
    sched.add(new_req("b", [20, 21], max_tokens=4, ignore_eos=True))
    sched.add(new_req("c", [20, 21], max_tokens=4, min_tokens=2))
    outs = run(sched, runner)
    assert tokens(outs["a"]) == [EOS] and outs["a"][-1].finish_reason == FinishReason.STOP
    assert tokens(outs["b"]) == [EOS] * 4 and outs["b"][-1].finish_reason == FinishReason.LENGTH
    assert tokens(outs["c"]) == [EOS] * 2 and outs["c"][-1].finish_reason == FinishReason.STOP


def test_max_model_len_ends_request():
    sched, runner = make(max_model_len=10)
    sched.add(new_req("a", list(range(20, 27)), max_tokens=None))
    outs = run(sched, runner)
    assert len(tokens(outs["a"])) == 3 and outs["a"][-1].finish_reason == FinishReason.LENGTH


def test_preemption_resumes_with_same_tokens():
    rng = random.Random(1)
    prompts = [[rng.randrange(10, 500) for _ in range(rng.randrange(5, 30))] for _ in range(8)]
    results = []
    for num_blocks in (200, 14):
        sched, runner = make(num_blocks=num_blocks, budget=64)
        for i, p in enumerate(prompts):
            sched.add(new_req(f"r{i}", p, max_tokens=20))
        preempted: list = []
        outs = run(sched, runner, lambda plan, seen=preempted: seen.extend(plan.preempted))
        results.append({k: tokens(v) for k, v in outs.items()})
        if num_blocks == 14:
            assert preempted, "the small cache should have forced preemption"
        check_blocks(sched)
        assert sched.kv.num_free_blocks == num_blocks
    assert results[0] == results[1]


def test_blocks_conserved_randomized():
    for seed in range(6):
        rng = random.Random(seed)
        sched, runner = make(num_blocks=rng.randrange(12, 40), max_num_seqs=rng.randrange(2, 8),
                             budget=rng.randrange(8, 48), caching=bool(seed % 2))
        n = 0
        live: list[str] = []
        for _ in range(120):
            action = rng.random()
            if action < 0.3:
                rid = f"r{n}"
                n += 1
                shared = [7] * rng.choice([0, 4, 8])  # common prefixes exercise the cache
                sched.add(new_req(rid, shared + [rng.randrange(10, 500)
                                                 for _ in range(rng.randrange(1, 30))],
                                  max_tokens=rng.randrange(1, 25)))
                live.append(rid)
            elif action < 0.4 and live:
                sched.abort([live.pop(rng.randrange(len(live)))])
            plan = sched.schedule()
            check_blocks(sched)
            sched.update(plan, runner.execute(plan) if not plan.is_empty else [])
            check_blocks(sched)
        sched.abort(list(sched.requests))
        run(sched, runner)
        assert sched.kv.num_free_blocks == sched.kv.num_blocks
        assert not sched.requests and not sched.running and not sched.waiting


def test_prompt_that_can_never_fit_fails_alone():
    sched, runner = make(num_blocks=6)
    sched.add(new_req("ok1", [30] * 5, max_tokens=3))
    sched.add(new_req("big", list(range(10, 40)), max_tokens=3))   # 30 tokens > 6*4 slots
    sched.add(new_req("ok2", [31] * 5, max_tokens=3))
    outs = run(sched, runner)
    assert outs["big"][-1].finish_reason == FinishReason.ERROR
    assert "never fit" in outs["big"][-1].error
    assert len(tokens(outs["ok1"])) == 3 and len(tokens(outs["ok2"])) == 3


def test_request_growing_past_the_cache_fails_alone():
    sched, runner = make(num_blocks=3)
    sched.add(new_req("a", [40] * 5, max_tokens=20))     # 25 tokens > 12 slots
    outs = run(sched, runner)
    assert outs["a"][-1].finish_reason == FinishReason.ERROR
    assert len(tokens(outs["a"])) == 12 - 5 + 1   # the last sampled token needs no slot yet
    assert sched.kv.num_free_blocks == 3


def test_abort_takes_effect_at_next_schedule():
    sched, runner = make()
    sched.add(new_req("a", list(range(20, 30)), max_tokens=50))
    sched.add(new_req("b", list(range(40, 50)), max_tokens=5))
    plan = sched.schedule()
    sched.update(plan, runner.execute(plan))
    used = sched.kv.num_blocks - sched.kv.num_free_blocks
    sched.abort(["a"])
    assert sched.kv.num_blocks - sched.kv.num_free_blocks == used   # not yet
    plan = sched.schedule()
    assert [o.finish_reason for o in plan.finished_outputs] == [FinishReason.ABORT]
    assert plan.finished_outputs[0].request_id == "a"
    assert all(r.request_id != "a" for r in plan.requests)
    check_blocks(sched)
    sched.abort(["a", "nope"])   # aborting twice / unknown ids is a no-op
    outs = run(sched, runner)
    assert tokens(outs["b"]) and sched.kv.num_free_blocks == sched.kv.num_blocks


def test_n_siblings_wait_for_the_first_and_share_prompt_blocks():
    sched, runner = make(budget=8)
    prompt = list(range(100, 121))    # 21 tokens: 5 full blocks
    for i in range(3):
        r = new_req(f"p-{i}", prompt, max_tokens=4)
        r.parent_id = "p"
        sched.add(r)
    first = sched.schedule()
    assert [r.request_id for r in first.requests] == ["p-0"]   # siblings wait for the prompt
    sched.update(first, runner.execute(first))
    leader = first.requests[0]
    admitted = {}
    while sched.has_unfinished_requests():
        plan = sched.schedule()
        for r in plan.requests:
            if r is not leader and r.request_id not in admitted:
                assert leader.num_computed_tokens >= len(prompt)
                admitted[r.request_id] = r.block_ids[:5]
                assert r.block_ids[:5] == leader.block_ids[:5]
        sched.update(plan, runner.execute(plan))
    assert set(admitted) == {"p-1", "p-2"}
    assert sched.kv.prefix_cache_hits == 2 * 20


def test_prompt_logprobs_requests_skip_prefix_hits():
    sched, runner = make()
    prompt = list(range(100, 113))
    sched.add(new_req("a", prompt, max_tokens=2))
    run(sched, runner)
    sched.add(new_req("b", prompt, max_tokens=2, prompt_logprobs=1))
    sched.add(new_req("c", prompt, max_tokens=2))
    outs = run(sched, runner)
    assert outs["b"][0].num_cached_tokens == 0 and outs["c"][0].num_cached_tokens == 12


def test_finished_outputs_carry_phase_timings():
    """Only the last output of a request carries timings; the phases add up; a request aborted
    before it was ever scheduled has queue time only."""
    sched, runner = make(max_num_seqs=1, budget=8)
    sched.add(new_req("a", list(range(10, 30)), max_tokens=3))   # 20 tokens: 3 prefill chunks
    sched.add(new_req("b", [5, 6], max_tokens=2))                # waits behind "a"
    plan = sched.schedule()
    outs = list(sched.update(plan, runner.execute(plan)))
    sched.abort(["b"])
    outs += [o for v in run(sched, runner).values() for o in v]
    by_id: dict[str, list] = {}
    for o in outs:
        by_id.setdefault(o.request_id, []).append(o)
    a = by_id["a"]
    assert all(o.timings is None for o in a[:-1]) and a[-1].timings is not None
    t = a[-1].timings
    assert t.queue >= 0 and t.prefill >= 0 and t.decode >= 0
    assert abs(t.prefill + t.decode - t.inference) < 1e-6
    (b,) = by_id["b"]
    assert b.finish_reason == FinishReason.ABORT and b.timings.queue >= 0
    assert (b.timings.prefill, b.timings.decode, b.timings.inference) == (None, None, None)


# ---------------------------------------------------------------------------------------------
# priorities (vLLM's priority policy: lower first; batch lines run at a large one)
# ---------------------------------------------------------------------------------------------

def test_waiting_queue_orders_by_priority_then_arrival():
    from minserve.engine.waiting import WaitingQueue

    q = WaitingQueue()
    reqs = {name: Request(name, [11], SamplingParams(), priority=p)
            for name, p in [("a", 5), ("b", 0), ("c", 5), ("d", 0), ("e", -1)]}
    for r in reqs.values():
        q.append(r)
    assert [r.request_id for r in q] == ["e", "b", "d", "a", "c"]
    q.appendleft(Request("p", [11], SamplingParams(), priority=5))
    q.extendleft(reversed([Request("s1", [11], SamplingParams()),
                           Request("s2", [11], SamplingParams())]))
    # appendleft: the front of its own priority; extendleft(reversed(x)) keeps x's order
    assert [r.request_id for r in q] == ["e", "s1", "s2", "b", "d", "p", "a", "c"]
    q.remove(reqs["b"])
    assert q.popleft().request_id == "e" and q.peek().request_id == "s1" and len(q) == 6


def _prio(rid: str, prompt: list[int], priority: int, max_tokens: int, t: float) -> Request:
    r = Request(rid, prompt, SamplingParams(max_tokens=max_tokens, temperature=0,
                                            ignore_eos=True), eos_token_ids=frozenset([EOS]),
                priority=priority)
    r.arrival_time = t
    return r


def test_interactive_request_preempts_batch_for_a_sequence_slot():
    """Every slot held by batch requests: an interactive one is admitted at the next step
    (the latest batch request is preempted for it) and finishes long before the batch; the
    preempted request resumes to the same tokens; blocks are conserved throughout."""
    sched, runner = make(num_blocks=64, max_num_seqs=4, budget=64)
    prompts = {f"b{i}": [20 + i, 30 + i, 40 + i] for i in range(4)}
    for i, (rid, p) in enumerate(prompts.items()):
        sched.add(_prio(rid, p, 1 << 20, 30, float(i)))
    outs: dict[str, list] = {}
    for _ in range(3):                          # the batch is running, all slots taken
        for o in sched.update(plan := sched.schedule(), runner.execute(plan)):
            outs.setdefault(o.request_id, []).append(o)
    assert len(sched.running) == 4
    sched.add(_prio("chat", [50, 51, 52, 53, 54], 0, 5, 10.0))
    plan = sched.schedule()
    assert "chat" in [r.request_id for r in plan.requests]
    assert [r.request_id for r in plan.preempted] == ["b3"]   # lowest priority, latest arrival
    finish_order: list[str] = []
    while True:
        for o in sched.update(plan, runner.execute(plan) if not plan.is_empty else []):
            outs.setdefault(o.request_id, []).append(o)
            if o.finished:
                finish_order.append(o.request_id)
        check_blocks(sched)
        if not sched.has_unfinished_requests():
            break
        plan = sched.schedule()
    assert finish_order[0] == "chat"
    for rid, prompt in prompts.items():          # b3 recomputed: same tokens as alone
        seq, toks = list(prompt), tokens(outs[rid])
        for t in toks:
            assert t == fake_token(seq)
            seq.append(t)
        assert len(toks) == 30


def test_interactive_request_preempts_batch_for_cache_room():
    """The batch holds nearly every block: the interactive request gets room by preemption
    instead of waiting for the batch to finish."""
    sched, runner = make(num_blocks=12, max_num_seqs=8, budget=64)
    for i in range(3):   # 3 x (10 prompt + 2 output) tokens = 3 blocks each at BS=4: 9 blocks
        sched.add(_prio(f"b{i}", [100 + i] * 10, 1 << 20, 20, float(i)))
    for _ in range(3):
        sched.update(plan := sched.schedule(), runner.execute(plan))
    assert sched.kv.num_free_blocks <= 3
    sched.add(_prio("chat", list(range(200, 214)), 0, 2, 10.0))   # needs 4 blocks
    plan = sched.schedule()
    assert "chat" in [r.request_id for r in plan.requests] and plan.preempted
    assert all(r.priority > 0 for r in plan.preempted)
    run(sched, runner, lambda plan: check_blocks(sched))
    assert not sched.requests and sched.kv.num_free_blocks == 12


def test_equal_priorities_never_preempt_for_priority():
    sched, runner = make(num_blocks=64, max_num_seqs=2, budget=64)
    for i in range(4):
        sched.add(_prio(f"r{i}", [60 + i, 61], 0, 6, float(i)))

    def check(plan):
        assert not plan.preempted

    outs = run(sched, runner, check)
    assert len(outs) == 4


def test_requests_that_finish_in_their_prefill_step_leave_their_blocks_cached():
    """max_tokens 1 (a score, a choice, a loglikelihood) ends in the step that computes the
    prompt: its full blocks are published all the same, so the same prompt again hits them,
    whether the prompt ran in one step or in chunks, and whatever ended the request."""
    for budget in (64, 8):  # one prefill step; chunks of 8
        sched, runner = make(budget=budget)
        prompt = list(range(100, 137))  # 37 tokens: 9 full blocks of 4
        sched.add(new_req("a", prompt, max_tokens=1))
        run(sched, runner)
        sched.add(new_req("b", prompt, max_tokens=1))
        sched.add(new_req("c", prompt[:20] + [7] * 9, max_tokens=1))
        outs = run(sched, runner)
        assert outs["b"][0].num_cached_tokens == 36 and outs["c"][0].num_cached_tokens == 20
        assert sched.kv.num_free_blocks == sched.kv.num_blocks


def test_lower_priority_rows_sit_out_while_a_better_one_waits_for_its_first_token():
    """A batch is decoding; an interactive request arrives: the steps up to its first token run
    it alone (the batch rows keep their K/V and are not preempted), then both share the steps
    again, and everyone's tokens are as if alone."""
    sched, runner = make(num_blocks=64, max_num_seqs=8, budget=4)
    for i in range(3):
        sched.add(_prio(f"b{i}", [20 + i, 30 + i], 1 << 20, 12, float(i)))
    outs: dict[str, list] = {}
    for _ in range(3):
        for o in sched.update(plan := sched.schedule(), runner.execute(plan)):
            outs.setdefault(o.request_id, []).append(o)
    sched.add(_prio("chat", list(range(60, 70)), 0, 3, 10.0))   # 10 tokens: 3 chunks of 4
    steps = []
    while sched.has_unfinished_requests():
        plan = sched.schedule()
        steps.append([r.request_id for r in plan.requests])
        assert not plan.preempted
        for o in sched.update(plan, runner.execute(plan)):
            outs.setdefault(o.request_id, []).append(o)
        check_blocks(sched)
    assert steps[:3] == [["chat"], ["chat"], ["chat"]]       # prompt chunks, the batch held
    assert "chat" in steps[3] and any(r.startswith("b") for r in steps[3])
    for rid, prompt in [("b0", [20, 30]), ("b1", [21, 31]), ("b2", [22, 32]),
                        ("chat", list(range(60, 70)))]:
        seq, toks = list(prompt), tokens(outs[rid])
        for t in toks:
            assert t == fake_token(seq)
            seq.append(t)
    assert sched.kv.num_free_blocks == sched.kv.num_blocks


def test_whole_images_no_chunk_ends_inside_an_image():
    """A model whose images attend both ways (SchedulerConfig.whole_images): prefill chunks stop
    before an image's run of embedding tokens or run through its end, past the per-request
    chunk cap but within the step's budget; two requests share the budget, all finish."""
    import numpy as np

    from minserve.engine.request import MultiModalItem

    kv = KVCacheManager(64, BS, True)
    sched = Scheduler(SchedulerConfig(4, 24, 256, 8, 0, whole_images=True), kv)
    runner = FakeRunner(sched)
    # embedding runs at [6, 18) (markers at 5 and 18) and [25, 35)
    items = [MultiModalItem(5, 14, "a", embed_mask=np.array([0] + [1] * 12 + [0], bool)),
             MultiModalItem(25, 10, "b")]
    runs = [(6, 18), (25, 35)]
    for rid in ("x", "y"):
        req = new_req(rid, list(range(100, 140)), max_tokens=2)
        req.mm_items = items
        sched.add(req)
    ends = {"x": [], "y": []}

    def check(plan: StepPlan) -> None:
        assert plan.total_num_scheduled_tokens <= 24
        for req, n in zip(plan.requests, plan.num_scheduled_tokens, strict=True):
            end = req.num_computed_tokens + n
            assert not any(a < end < b for a, b in runs), (req.request_id, end)
            ends[req.request_id].append(end)

    outputs = run(sched, runner, check)
    assert set(outputs) == {"x", "y"}
    assert 18 in ends["x"] and 6 in ends["x"]      # stopped before an image, ran through one
    assert any(b - a > 8 for a, b in zip([0, *ends["x"]], ends["x"]))   # past the cap of 8
