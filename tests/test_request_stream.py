"""RequestStream (engine/async_engine.py): outputs a lagging reader has not taken yet arrive
merged, one per choice, in order; errors and the end still reach it. No model, no engine thread."""
from __future__ import annotations

import asyncio

import pytest

from minserve.engine.async_engine import EngineError, RequestStream
from minserve.engine.request import FinishReason, Logprob, RequestOutput


def _lp(t: int) -> Logprob:
    return Logprob(t, -float(t), 1, [])


def _read(stream: RequestStream) -> list[RequestOutput]:
    async def read():
        return [out async for out in stream]
    return asyncio.run(read())


def test_queued_outputs_of_one_choice_arrive_merged():
    s = RequestStream("r", ["a"])
    engine_ids = [1]
    s.put(RequestOutput("a", engine_ids, num_prompt_tokens=3, num_cached_tokens=2,
                        logprobs=[_lp(1)], prompt_logprobs=[None, _lp(9)]))
    s.put(RequestOutput("a", [2, 3], num_prompt_tokens=3, logprobs=[_lp(2), _lp(3)],
                        num_preemptions=1))
    s.put(RequestOutput("a", [4], FinishReason.STOP, stop_reason=4, logprobs=[_lp(4)],
                        num_preemptions=1))
    [out] = _read(s)
    assert out.new_token_ids == [1, 2, 3, 4] and [lp.token_id for lp in out.logprobs] == [
        1, 2, 3, 4]
    assert out.finish_reason == FinishReason.STOP and out.stop_reason == 4
    assert out.prompt_logprobs == [None, _lp(9)] and out.num_cached_tokens == 2
    assert out.num_prompt_tokens == 3 and out.num_preemptions == 1
    assert engine_ids == [1]   # the engine's list is left as it was
    assert s.finished


def test_choices_merge_apart_and_a_read_output_is_never_merged_into():
    s = RequestStream("r", ["a", "b"])
    for step in range(3):
        s.put(RequestOutput("a", [10 + step]))
        s.put(RequestOutput("b", [20 + step], FinishReason.LENGTH if step == 2 else None))

    async def read():
        got = [await s.__anext__()]          # a's three, then b's three
        s.put(RequestOutput("a", [13], FinishReason.LENGTH))   # after the reader took a's
        got += [out async for out in s]
        return got

    got = asyncio.run(read())
    assert [(o.request_id, o.new_token_ids) for o in got] == [
        ("a", [10, 11, 12]), ("b", [20, 21, 22]), ("a", [13])]


def test_an_error_after_queued_outputs_ends_the_stream_after_them():
    s = RequestStream("r", ["a"])
    s.put(RequestOutput("a", [1]))
    s.put(EngineError("engine failed: boom", 500))
    s.put(RequestOutput("a", [2]))   # a late one (never expected): merged before the error

    async def read():
        got = []
        with pytest.raises(EngineError, match="boom"):
            async for out in s:
                got.append(out.new_token_ids)
        return got

    assert asyncio.run(read()) == [[1, 2]]


def test_a_waiting_reader_wakes_for_an_output_and_for_close():
    s = RequestStream("r", ["a"])

    async def read():
        loop = asyncio.get_running_loop()
        loop.call_soon(s.put, RequestOutput("a", [1]))
        first = await s.__anext__()
        loop.call_soon(s.close)
        rest = [out async for out in s]
        return first.new_token_ids, rest

    assert asyncio.run(read()) == ([1], [])
