"""Batch lines through the app in-process (fake engine): they reach the engine at batch priority
while HTTP requests stay at 0, need no API key (no HTTP exchange is built for them, and no client
header can claim a batch line's standing), stop cleanly (nothing recorded, engine requests
aborted) and are cut off when the server says 503."""
from __future__ import annotations

import asyncio

from minserve.batch.lines import iter_lines
from minserve.batch.runner import BATCH_PRIORITY, LineRunner, run_line
from tests.asgi import call, lifespan
from tests.fake_engine import make_fake_app
from tests.serving import wait_until
from tests.test_batch_store import _line


def test_lines_run_at_batch_priority_without_the_key_check(tiny_model_dir):
    app = make_fake_app(tiny_model_dir, server={"api_keys": ["secret"]})
    (line,) = iter_lines([_line("c0", url="/v1/completions",
                                body={"prompt": "Hi", "max_tokens": 2})])

    async def fn():
        async with lifespan(app):
            out = await run_line(app, line)
            http = await call(app, "POST", "/v1/completions", {"prompt": "Hi", "max_tokens": 2},
                              headers={"authorization": "Bearer secret"})
            no_key = await call(app, "POST", "/v1/completions", {"prompt": "Hi"})
            # a client header named like the old in-process batch marker is just a header
            spoof = await call(app, "POST", "/v1/completions", {"prompt": "Hi"},
                               headers={"minserve.batch_priority": "0"})
            return out, http, no_key, spoof, app.chat._engine.priorities

    out, http, no_key, spoof, priorities = asyncio.run(fn())
    response = out["response"]
    assert response["status_code"] == 200 and response["body"]["object"] == "text_completion"
    assert http.status == 200
    assert no_key.status == 401 and spoof.status == 401
    assert sorted(priorities.values()) == [0, BATCH_PRIORITY]


def test_stop_aborts_lines_in_flight_and_records_nothing_for_them(tiny_model_dir):
    app = make_fake_app(tiny_model_dir, step_delay=0.01)
    lines = list(iter_lines([_line(f"c{i}", url="/v1/completions",
                                   body={"prompt": "Hi", "max_tokens": 1 if i < 2 else 200,
                                         "ignore_eos": True}) for i in range(6)]))

    async def fn():
        async with lifespan(app):
            runner = LineRunner(app, max_in_flight=4)
            done = []

            async def on_result(line, out):
                done.append(line.custom_id)
                if len(done) == 2:
                    runner.stop()        # as a cancel does
            await runner.run(lines, on_result)
            # the aborts land at the engine's next step
            await wait_until(lambda: not app.chat._engine.running, what="the aborts")
            return done, runner, app.chat._engine.running

    done, runner, running = asyncio.run(fn())
    assert sorted(done) == ["c0", "c1"] and running == {}
    assert {x.custom_id for x in runner.not_answered} <= {"c2", "c3", "c4", "c5"}


def test_a_503_stops_the_run(tiny_model_dir):
    app = make_fake_app(tiny_model_dir, fail_at_step=1)
    lines = list(iter_lines([_line(f"c{i}", url="/v1/completions",
                                   body={"prompt": "Hi", "max_tokens": 2}) for i in range(50)]))

    async def fn():
        async with lifespan(app):
            runner = LineRunner(app, max_in_flight=2)
            done = []

            async def on_result(line, out):
                done.append(out)
            await runner.run(lines, on_result)
            return done, runner

    done, runner = asyncio.run(fn())
    # the engine died: its 500s are answers (recorded); after that the server says 503 and the
    # run stops instead of failing every remaining line
    assert runner.stopped and runner.not_answered
    assert len(done) + len(runner.not_answered) < 50
