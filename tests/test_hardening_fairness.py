"""Issue 36, finding 5: one n=128 (or beam-search) request filled every engine step while other
clients' one-token requests waited seconds. A fan-out now runs at most max_fanout_rows
tokens a step, its rows taking turns, and a one-row request arriving meanwhile runs alone in the
next step (the fan-outs sit that step out)."""
from __future__ import annotations

from minserve.engine.beam import Beam, BeamSearchManager
from minserve.engine.kv_cache import KVCacheManager
from minserve.engine.request import EngineRequest, Request
from minserve.engine.scheduler import Scheduler, SchedulerConfig
from minserve.sampling_params import SamplingParams
from tests.test_scheduler import FakeRunner, new_req, run, tokens

BS = 4


def make(max_fanout_rows: int, max_num_seqs: int = 256, budget: int = 2048
         ) -> tuple[Scheduler, FakeRunner]:
    sched = Scheduler(SchedulerConfig(max_num_seqs, budget, 512, max_fanout_rows=max_fanout_rows),
                      KVCacheManager(2048, BS, True))
    return sched, FakeRunner(sched)


def fan_out(sched: Scheduler, n: int, max_tokens: int = 16) -> list[Request]:
    rows = [Request(f"big-{i}", [5, 6, 7, 8, 9, 11], SamplingParams(max_tokens=max_tokens,
                                                                    ignore_eos=True),
                    parent_id="big", sample_seed=i) for i in range(n)]
    for r in rows:
        sched.add(r)
    return rows


def step(sched: Scheduler, runner: FakeRunner) -> list:
    plan = sched.schedule()
    return sched.update(plan, runner.execute(plan) if not plan.is_empty else [])


def test_a_probe_gets_its_token_in_the_next_step_under_n_128():
    sched, runner = make(max_fanout_rows=8)
    fan_out(sched, 128)
    for _ in range(3):
        step(sched, runner)
    sched.add(new_req("probe", [20, 21, 22], max_tokens=1))
    plan = sched.schedule()
    ids = [r.request_id for r in plan.requests]
    assert "probe" in ids
    assert sum(r.fanout == "big" for r in plan.requests) <= 8
    sched.update(plan, runner.execute(plan))


def test_without_the_cap_the_probe_waits_behind_the_whole_fan_out():
    """The finding itself: no cap (0), one row per step for everyone -> the probe is last."""
    sched, runner = make(max_fanout_rows=0, max_num_seqs=1)
    fan_out(sched, 16, max_tokens=1)
    sched.add(new_req("probe", [20, 21, 22], max_tokens=1))
    steps = 0
    while "probe" not in {o.request_id for o in step(sched, runner)}:
        steps += 1
    assert steps == 16
    sched, runner = make(max_fanout_rows=1, max_num_seqs=2)
    fan_out(sched, 16, max_tokens=1)
    sched.add(new_req("probe", [20, 21, 22], max_tokens=1))
    assert "probe" in {o.request_id for o in step(sched, runner)}


def test_fan_out_rows_take_turns_and_finish_as_without_the_cap():
    """Every running row of the fan-out runs within ceil(rows / cap) steps (none starves behind
    its siblings), and the tokens are the ones an uncapped run gives."""
    outs = {}
    for cap in (0, 3):
        sched, runner = make(max_fanout_rows=cap)
        fan_out(sched, 10, max_tokens=5)
        sat_out: dict[str, int] = {}

        def check(plan, sched=sched, cap=cap, sat_out=sat_out):
            ran = {r.request_id for r in plan.requests}
            assert cap == 0 or sum(r.fanout == "big" for r in plan.requests) <= cap
            for r in sched.running:
                sat_out[r.request_id] = 0 if r.request_id in ran else sat_out[r.request_id] + 1
                assert sat_out[r.request_id] <= -(-10 // max(cap, 1))
        outs[cap] = {rid: tokens(o) for rid, o in run(sched, runner, check).items()}
    assert outs[3] == outs[0] and len(outs[0]) == 10


def test_a_small_fan_out_keeps_its_whole_step():
    """n=3 under a share of 4: the first sibling's 6-token prompt runs in one step, and then all
    three rows decode in every step, as without the share (only large fan-outs are bounded)."""
    sched, runner = make(max_fanout_rows=4)
    fan_out(sched, 3)
    plan = sched.schedule()
    assert plan.num_scheduled_tokens == [6]
    sched.update(plan, runner.execute(plan))
    step(sched, runner)                    # the other two: prefix hits, their last token each
    plan = sched.schedule()
    assert plan.num_scheduled_tokens == [1, 1, 1]


def test_beam_search_rows_are_one_fan_out():
    """A round of 16 beams is 16 sub-requests of one fan-out (each recomputing 6 tokens): 4
    tokens of it a step, none in the step that runs a new request's prompt."""
    sched, runner = make(max_fanout_rows=4)
    beams = BeamSearchManager(sched.add, lambda ids: None, 512)
    params = SamplingParams(n=16, use_beam_search=True, max_tokens=4, temperature=0)
    beams.add(EngineRequest("beam", [5, 6, 7, 8, 9], params), frozenset([3]))
    search = beams.searches["beam"]   # a later round: 16 live beams
    for sub_id in search.pending:
        sched.requests.pop(sub_id)
    sched.waiting = type(sched.waiting)()
    search.pending.clear()
    search.beams = [Beam([12 + i]) for i in range(16)]
    beams._submit(search)
    sched.add(new_req("probe", [20, 21, 22], max_tokens=1))
    plan = sched.schedule()
    assert [r.request_id for r in plan.requests] == ["probe"]    # its first step is its own
    outs = sched.update(plan, runner.execute(plan))
    assert [o.request_id for o in outs] == ["probe"]
    plan = sched.schedule()      # then the round goes on: 4 tokens of it a step
    assert sum(plan.num_scheduled_tokens) == 4 and all(r.fanout == "beam" for r in plan.requests)


def test_an_engine_runs_a_new_request_alone_in_the_next_step_during_beam_search(tiny_model_dir):
    """The whole engine, a real n=8 beam search under way: the next step runs the probe alone
    and finishes it; the search then goes on and ends with its 8 choices."""
    from minserve.config import EngineConfig
    from minserve.engine.engine import Engine

    engine = Engine(EngineConfig(model=tiny_model_dir, kv_cache_memory=4 << 20,
                                 max_fanout_rows=4))
    plans = []
    schedule = engine.scheduler.schedule
    engine.scheduler.schedule = lambda: plans.append(schedule()) or plans[-1]
    engine.add_request(EngineRequest("beam", [5, 6, 7, 8, 9], SamplingParams(
        n=8, use_beam_search=True, max_tokens=2, temperature=0, ignore_eos=True)))
    for _ in range(4):
        assert not engine.step()                     # the search is under way, unfinished
    engine.add_request(EngineRequest("probe", [20, 21, 22], SamplingParams(max_tokens=1)))
    assert [o.request_id for o in engine.step()] == ["probe"]
    assert [r.request_id for r in plans[-1].requests] == ["probe"]
    choices = []
    while engine.has_unfinished_requests():
        choices += engine.step()
    assert len(choices) == 8 and all(len(o.new_token_ids) == 2 for o in choices)
    # round 0 is one row (the prompt, whole); from round 1 on 8 beams: 4 tokens a step, to
    # the round's last sub-request
    assert all(sum(p.num_scheduled_tokens) <= 4 for p in plans[1:] if p.requests and all(
        r.fanout == "beam" for r in p.requests))
