"""--engine-process (engine/engine_process.py): the engine loop in a spawned process serves the
same tokens as the in-thread engine; killing it fails every in-flight request, turns /health
503 and refuses new requests; SIGKILL of the server leaves no engine process behind."""
from __future__ import annotations

import asyncio
import os
import signal

from minserve.engine.engine_process import decode_outputs, encode_outputs
from minserve.engine.request import FinishReason, Logprob, RequestOutput, RequestTimings
from tests.asgi import call
from tests.serving import alive, children, real_app, run, start_server, wait_until

COMP = "/v1/completions"
GREEDY = {"model": "tiny", "prompt": "Hello there", "max_tokens": 12, "temperature": 0,
          "ignore_eos": True, "logprobs": 2}


def test_output_encoding_round_trips():
    outs = [RequestOutput("a", [5, 6]),
            RequestOutput("b-1", [7], FinishReason.STOP, "stop!", 3, 2,
                          [Logprob(7, -0.5, 1, [(7, -0.5), (9, -1.5)])],
                          [None, Logprob(3, -2.0, 4, [])],
                          None, RequestTimings(0.1, 0.2, None, 0.3), 1),
            RequestOutput("c", [], FinishReason.ERROR, error="too long")]
    assert decode_outputs(encode_outputs(outs)) == outs


def test_same_tokens_then_a_killed_engine_process_fails_requests_and_health(tiny_model_dir):
    """One engine process (a spawn costs seconds): the thread's greedy tokens first, then it is
    killed with two requests in flight."""
    async def greedy(app):
        return (await call(app, "POST", COMP, GREEDY)).json()

    threaded = run(real_app(tiny_model_dir, engine_process=False), greedy)
    app = real_app(tiny_model_dir, engine_process=True)
    body = {"model": "tiny", "prompt": "Hi", "max_tokens": 400, "ignore_eos": True}

    async def fn(app):
        split = await greedy(app)
        # a client that leaves: its abort reaches the engine process, which frees its blocks
        r = await call(app, "POST", COMP, {**body, "stream": True}, disconnect_after=3)
        assert r.status == 200 and len(r.chunks) == 3
        await wait_until(lambda: app.chat.stats["num_running"] == 0
                         and app.chat.stats["kv_cache_usage"] == 0 and not app.chat.num_in_flight,
                         what="the aborted request's blocks freed")
        assert 'finished_reason="abort"' in app.metrics.render().decode()
        pid = app.chat.process.pid
        os.kill(pid, signal.SIGSTOP)   # the requests are surely in flight when it dies
        s = asyncio.ensure_future(call(app, "POST", COMP, {**body, "stream": True}))
        f = asyncio.ensure_future(call(app, "POST", COMP, body))
        await wait_until(lambda: app.chat.num_in_flight == 2, what="both requests in flight")
        os.kill(pid, signal.SIGKILL)
        s, f = await asyncio.wait_for(asyncio.gather(s, f), 60)
        return split, s, f, await call(app, "GET", "/health"), await call(app, "POST", COMP, body)

    split, s, f, health, after = run(app, fn)
    assert split["choices"] == threaded["choices"] and split["usage"] == threaded["usage"]
    ev = s.events()
    assert s.status == 200 and ev[-1] == "[DONE]" and "engine process exited" in \
        ev[-2]["error"]["message"]
    assert f.status == 500 and "engine process exited" in f.json()["error"]["message"]
    assert health.status == 503 and after.status == 503


def test_sigkill_of_the_server_leaves_nothing_behind(tiny_model_dir):
    shm_before = set(os.listdir("/dev/shm"))
    proc, _url = start_server(["serve", tiny_model_dir, "--served-model-name", "tiny",
                               "--kv-cache-memory", "8MiB", "--engine-process"])
    engine = children(proc.pid)
    assert engine, "no engine process"
    proc.kill()
    proc.communicate(timeout=30)
    asyncio.run(wait_until(lambda: not any(alive(k) for k in engine), 30,
                           "the engine process to die with the server"))
    ours = {str(proc.pid), *map(str, engine)}
    assert not [n for n in set(os.listdir("/dev/shm")) - shm_before
                if any(p in n for p in ours)]
