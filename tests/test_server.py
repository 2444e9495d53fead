"""The ASGI app through the in-test driver: routes, auth, body limit, CORS, SSE framing, client
disconnects (abort frees blocks), stop strings, and engine death (fake engine)."""
from __future__ import annotations

import asyncio
import threading

import pytest

from minserve.server import ServerConfig, create_app
from tests.asgi import call, lifespan
from tests.fake_engine import FakeEngine, make_fake_app
from tests.serving import real_app, run, wait_until

MSG = [{"role": "user", "content": "Hello there"}]
CHAT, COMP = "/v1/chat/completions", "/v1/completions"


def test_routes(tiny_model_dir):
    async def fn(app):
        r = {}
        for key, (m, p, body) in {
            "health": ("GET", "/health", None), "ping": ("GET", "/ping", None),
            "version": ("GET", "/version", None), "models": ("GET", "/v1/models", None),
            "model": ("GET", "/v1/models/alias", None), "nomodel": ("GET", "/v1/models/x", None),
            "unknown": ("GET", "/v2/nothing", None), "method": ("GET", CHAT, None),
            "method2": ("DELETE", "/health", None),
            "tok": ("POST", "/tokenize", {"prompt": "Hello world"}),
            "tokchat": ("POST", "/tokenize", {"messages": MSG}),
        }.items():
            r[key] = await call(app, m, p, body)
        ids = r["tok"].json()["tokens"]
        r["detok"] = await call(app, "POST", "/detokenize", {"tokens": ids})
        r["badtok"] = await call(app, "POST", "/detokenize", {"tokens": [-1]})
        await call(app, "POST", CHAT, {"messages": MSG, "max_tokens": 3})
        r["metrics"] = await call(app, "GET", "/metrics")
        return r

    r = run(real_app(tiny_model_dir), fn)
    assert r["health"].status == r["ping"].status == 200
    assert r["version"].json()["version"]
    assert [m["id"] for m in r["models"].json()["data"]] == ["tiny", "alias"]
    assert r["models"].json()["data"][0]["max_model_len"] == 512
    assert r["model"].json()["id"] == "alias"
    assert r["nomodel"].status == 404 and r["unknown"].status == 404
    assert r["method"].status == 405 and r["method2"].status == 405
    assert "error" in r["method"].json() and "error" in r["unknown"].json()
    assert r["tok"].json()["count"] == len(r["tok"].json()["tokens"]) > 0
    assert r["tokchat"].json()["count"] > r["tok"].json()["count"]
    assert r["detok"].json()["prompt"] == "Hello world"
    assert r["badtok"].status == 400
    text = r["metrics"].body.decode()
    for name in ("vllm:num_requests_running", "vllm:num_requests_waiting",
                 "vllm:kv_cache_usage_perc", "vllm:prompt_tokens_total",
                 "vllm:generation_tokens_total", "vllm:time_to_first_token_seconds_bucket",
                 "vllm:inter_token_latency_seconds_bucket",
                 "vllm:e2e_request_latency_seconds_count", "vllm:request_success_total",
                 "vllm:prefix_cache_queries_total", "vllm:prefix_cache_hits_total",
                 "vllm:request_prompt_tokens_bucket", "vllm:request_generation_tokens_sum",
                 "vllm:num_preemptions_total", "vllm:request_queue_time_seconds_count",
                 "vllm:request_prefill_time_seconds_bucket", "vllm:request_decode_time_seconds_sum",
                 "vllm:request_inference_time_seconds_count"):
        assert name in text, name
    assert 'vllm:request_success_total{finished_reason="length",model_name="tiny"} 1.0' in text
    assert 'vllm:generation_tokens_total{model_name="tiny"} 3.0' in text
    for phase in ("queue", "prefill", "decode", "inference"):   # the one finished request
        assert f'vllm:request_{phase}_time_seconds_count{{model_name="tiny"}} 1.0' in text
    assert 'vllm:request_time_per_output_token_seconds_count{model_name="tiny"} 1.0' in text


def test_not_ready_is_503(tiny_model_dir):
    gate = threading.Event()
    from minserve.tokenizer import Tokenizer
    tok = Tokenizer.from_folder(tiny_model_dir)

    def slow_factory(_cfg):
        gate.wait(30)
        return FakeEngine(tok)

    app = create_app(None, ServerConfig(["tiny"]), slow_factory)

    async def fn(app):
        before = [await call(app, "GET", p) for p in ("/health", "/ping", "/v1/models")]
        chat = await call(app, "POST", CHAT, {"messages": MSG})
        version = await call(app, "GET", "/version")
        gate.set()
        await app.chat.wait_ready(10)
        after = await call(app, "GET", "/health")
        return before, chat, version, after

    async def main():
        async with lifespan(app, wait_ready=False):
            return await fn(app)
    before, chat, version, after = asyncio.run(main())
    assert [r.status for r in before] == [503, 503, 503]
    assert chat.status == 503 and "loading" in chat.json()["error"]["message"]
    assert version.status == 200 and after.status == 200


def test_auth_body_limit_content_type(tiny_model_dir):
    app = make_fake_app(tiny_model_dir, server={"api_keys": ["sekret"], "max_body_bytes": 2000})
    good = {"authorization": "Bearer sekret"}

    async def fn(app):
        return {
            "none": await call(app, "POST", CHAT, {"messages": MSG}),
            "wrong": await call(app, "POST", CHAT, {"messages": MSG},
                                headers={"authorization": "Bearer nope"}),
            "basic": await call(app, "GET", "/v1/models", headers={"authorization": "sekret"}),
            "ok": await call(app, "POST", CHAT, {"messages": MSG, "max_tokens": 2}, headers=good),
            "tok": await call(app, "POST", "/tokenize", {"prompt": "a"}),
            "unknown": await call(app, "GET", "/v1/secret-route"),
            "unknown_ok": await call(app, "GET", "/v1/secret-route", headers=good),
            "health": await call(app, "GET", "/health"),
            "metrics": await call(app, "GET", "/metrics"),
            "big": await call(app, "POST", CHAT, {"messages": MSG * 200}, headers=good),
            "bigchunked": await call(app, "POST", CHAT, {"messages": MSG * 200}, chunked=True,
                                     headers=good),
            "ctype": await call(app, "POST", CHAT, {"messages": MSG},
                                headers={**good, "content-type": "text/plain"}),
        }

    r = run(app, fn)
    for k in ("none", "wrong", "basic", "tok", "unknown"):
        assert r[k].status == 401, k
        assert r[k].json()["error"]["type"] == "AuthenticationError"
    assert r["ok"].status == 200 and r["health"].status == 200 and r["metrics"].status == 200
    assert r["big"].status == 413 and r["bigchunked"].status == 413
    assert r["ctype"].status == 415
    assert r["unknown_ok"].status == 404


def test_tokenize_is_bounded_like_completions(tiny_model_dir):
    """/tokenize refuses a text too long to fit before tokenizing it (as completions do), and
    any input over max_model_len tokens, which bounds its response; the API key guards it."""
    app = make_fake_app(tiny_model_dir, server={"api_keys": ["k"]}, max_model_len=64)
    good = {"authorization": "Bearer k"}

    async def fn(app):
        huge = "word " * 2_000_000  # 10 MB: refused by its length in characters, untokenized
        return {
            "fits": await call(app, "POST", "/tokenize", {"prompt": "Hello world",
                                                          "return_token_strs": True},
                               headers=good),
            "huge": await call(app, "POST", "/tokenize", {"prompt": huge}, headers=good),
            "long": await call(app, "POST", "/tokenize", {"prompt": "Hello world " * 40},
                               headers=good),
            "chat": await call(app, "POST", "/tokenize", {"messages": [
                {"role": "user", "content": "Hello world " * 40}]}, headers=good),
            "nokey": await call(app, "POST", "/tokenize", {"prompt": "Hello"}),
        }

    r = run(app, fn)
    assert r["fits"].status == 200 and r["fits"].json()["count"] == len(
        r["fits"].json()["token_strs"])
    for k in ("huge", "long", "chat"):
        assert r[k].status == 400 and "maximum context length is 64" in \
            r[k].json()["error"]["message"], k
    assert "characters" in r["huge"].json()["error"]["message"]
    assert r["nokey"].status == 401


def test_auth_edge_cases_head_and_options(tiny_model_dir):
    """Two Authorization headers are a 400, not "the last one wins"; without a key OPTIONS
    answers every /v1 path alike (401), and a CORS preflight is a 200 for every path; HEAD is
    GET without the body (issue 22.8)."""
    app = make_fake_app(tiny_model_dir, server={"api_keys": ["k"]})
    good = {"authorization": "Bearer k"}

    async def fn(app):
        pre = {"origin": "https://x.example", "access-control-request-method": "POST"}
        return {
            "two": await call(app, "GET", "/v1/models", headers=[
                ("authorization", "Bearer wrong"), ("authorization", "Bearer k")]),
            "opt_route": await call(app, "OPTIONS", CHAT),
            "opt_none": await call(app, "OPTIONS", "/v1/no-such-route"),
            "pre_route": await call(app, "OPTIONS", CHAT, headers=pre),
            "pre_none": await call(app, "OPTIONS", "/v1/no-such-route", headers=pre),
            "head_health": await call(app, "HEAD", "/health"),
            "get_models": await call(app, "GET", "/v1/models", headers=good),
            "head_models": await call(app, "HEAD", "/v1/models", headers=good),
            "head_post_only": await call(app, "HEAD", CHAT, headers=good),
        }

    r = run(app, fn)
    assert r["two"].status == 400 and "Authorization headers" in r["two"].json()["error"]["message"]
    assert r["opt_route"].status == r["opt_none"].status == 401
    assert r["opt_route"].body == r["opt_none"].body
    assert r["pre_route"].status == r["pre_none"].status == 200
    assert r["pre_route"].headers == r["pre_none"].headers
    assert r["head_health"].status == 200 and r["head_health"].body == b""
    assert r["head_models"].status == 200 and r["head_models"].body == b""
    assert r["head_models"].headers["content-length"] == \
        r["get_models"].headers["content-length"] != "0"
    assert r["head_post_only"].status == 405


def test_cors_and_root_path(tiny_model_dir):
    app = make_fake_app(tiny_model_dir, server={"allowed_origins": ["https://ok.example"],
                                                "root_path": "/api"})

    async def fn(app):
        pre = await call(app, "OPTIONS", "/api/v1/chat/completions", headers={
            "origin": "https://ok.example", "access-control-request-method": "POST",
            "access-control-request-headers": "authorization, content-type"})
        ok = await call(app, "GET", "/api/v1/models", headers={"origin": "https://ok.example"})
        bad = await call(app, "GET", "/api/v1/models", headers={"origin": "https://evil.example"})
        return pre, ok, bad

    pre, ok, bad = run(app, fn)
    assert pre.status == 200
    assert pre.headers["access-control-allow-origin"] == "https://ok.example"
    assert "POST" in pre.headers["access-control-allow-methods"]
    assert pre.headers["access-control-allow-headers"] == "authorization, content-type"
    assert ok.status == 200 and ok.headers["access-control-allow-origin"] == "https://ok.example"
    assert "access-control-allow-origin" not in bad.headers


def test_sse_framing_chat_and_completions(tiny_model_dir):
    async def fn(app):
        chat = await call(app, "POST", CHAT, {
            "messages": MSG, "max_tokens": 6, "stream": True, "n": 2, "ignore_eos": True,
            "logprobs": True, "top_logprobs": 2,
            "stream_options": {"include_usage": True, "continuous_usage_stats": True}})
        comp = await call(app, "POST", COMP, {"prompt": "Hello", "max_tokens": 5, "stream": True,
                                              "echo": True, "ignore_eos": True, "temperature": 0})
        full = await call(app, "POST", COMP, {"prompt": "Hello", "max_tokens": 5, "echo": True,
                                              "ignore_eos": True, "temperature": 0})
        return chat, comp, full

    chat, comp, full = run(real_app(tiny_model_dir), fn)
    assert chat.status == 200 and chat.headers["content-type"] == "text/event-stream"
    assert chat.headers["cache-control"] == "no-cache" and chat.closed
    assert all(c.startswith(b"data: ") and c.endswith(b"\n\n") for c in chat.chunks)
    ev = chat.events()
    assert ev[-1] == "[DONE]"
    assert ev[-2]["choices"] == [] and ev[-2]["usage"]["completion_tokens"] == 12
    body = ev[:-2]
    assert all(e["object"] == "chat.completion.chunk" for e in body)
    assert {e["choices"][0]["delta"].get("role") for e in body[:2]} == {"assistant"}
    assert all("usage" in e for e in body)  # continuous_usage_stats
    for idx in (0, 1):
        mine = [e["choices"][0] for e in body if e["choices"][0]["index"] == idx]
        assert mine[-1]["finish_reason"] == "length"
        assert all(c["finish_reason"] is None for c in mine[:-1])
        lps = [t for c in mine if c["logprobs"] for t in c["logprobs"]["content"]]
        assert len(lps) == 6 and all(len(t["top_logprobs"]) == 2 for t in lps)
    cev = comp.events()
    assert cev[-1] == "[DONE]" and cev[0]["choices"][0]["text"] == "Hello"
    streamed = "".join(e["choices"][0]["text"] for e in cev[:-1])
    assert streamed == full.json()["choices"][0]["text"] and streamed.startswith("Hello")


def test_echo_with_max_tokens_zero_scores_the_prompt(tiny_model_dir):
    """OpenAI's legacy scoring call (lm-eval's loglikelihood): the prompt and its logprobs come
    back, nothing is generated, finish_reason "length"; streamed too."""
    base = {"prompt": "The quick brown fox", "echo": True, "logprobs": 1, "temperature": 0}

    async def fn(app):
        zero = await call(app, "POST", COMP, {**base, "max_tokens": 0})
        one = await call(app, "POST", COMP, {**base, "max_tokens": 1})
        streamed = await call(app, "POST", COMP, {**base, "max_tokens": 0, "stream": True,
                                                  "stream_options": {"include_usage": True}})
        three = await call(app, "POST", COMP, {**base, "max_tokens": 3})
        three_streamed = await call(app, "POST", COMP, {**base, "max_tokens": 3, "stream": True})
        return zero, one, streamed, three, three_streamed

    zero, one, streamed, three, three_streamed = run(real_app(tiny_model_dir), fn)
    assert zero.status == 200, zero.body
    z, o = zero.json(), one.json()
    choice = z["choices"][0]
    assert choice["text"] == "The quick brown fox" and choice["finish_reason"] == "length"
    assert z["usage"]["completion_tokens"] == 0
    assert z["usage"]["prompt_tokens"] == len(choice["logprobs"]["tokens"]) > 1
    lp, lp1 = choice["logprobs"], o["choices"][0]["logprobs"]
    assert lp["token_logprobs"][0] is None and all(
        isinstance(v, float) for v in lp["token_logprobs"][1:])
    n = len(lp["tokens"])   # the prompt part equals the one-token call's prompt part
    assert lp["tokens"] == lp1["tokens"][:n] and len(lp1["tokens"]) == n + 1
    assert lp["token_logprobs"] == lp1["token_logprobs"][:n]
    ev = streamed.events()
    assert ev[-1] == "[DONE]" and ev[-2]["usage"]["completion_tokens"] == 0
    body = [e["choices"][0] for e in ev[:-2]]
    assert "".join(c["text"] for c in body) == "The quick brown fox"
    assert body[-1]["finish_reason"] == "length"
    # streamed, the prompt's logprobs ride on the echo chunk: the same as the whole body's
    for whole, events in ((z, ev[:-2]), (three.json(), three_streamed.events()[:-1])):
        want = whole["choices"][0]["logprobs"]
        got = {key: [] for key in want}
        for e in events:
            for key, values in (e["choices"][0]["logprobs"] or {}).items():
                got[key] += values
        assert got == want


def test_stop_strings(tiny_model_dir):
    async def fn(app):
        base = {"prompt": "The quick brown fox", "max_tokens": 24, "temperature": 0,
                "ignore_eos": True}
        free = (await call(app, "POST", COMP, base)).json()["choices"][0]["text"]
        stop = free[8:11]
        cut = (await call(app, "POST", COMP, {**base, "stop": [stop]})).json()
        incl = (await call(app, "POST", COMP, {**base, "stop": stop,
                                               "include_stop_str_in_output": True})).json()
        streamed = (await call(app, "POST", COMP, {**base, "stop": [stop], "stream": True}))
        return free, stop, cut, incl, streamed.events()

    free, stop, cut, incl, ev = run(real_app(tiny_model_dir), fn)
    want = free[:free.index(stop)]
    c = cut["choices"][0]
    assert (c["text"], c["finish_reason"], c["stop_reason"]) == (want, "stop", stop)
    assert incl["choices"][0]["text"] == want + stop
    assert "".join(e["choices"][0]["text"] for e in ev[:-1]) == want
    assert ev[-2]["choices"][0]["finish_reason"] == "stop"


def test_stop_strings_are_prepared_once_off_the_event_loop(tiny_model_dir, monkeypatch):
    """A request's stop automata are built once, while parsing in a worker thread, and shared by
    its n choices (a 10 MB stop string with n=4 stalled every client for 3.9 s); their total
    size is bounded."""
    from minserve import detokenizer

    built: list[tuple[str, list[str]]] = []
    init = detokenizer.StopStrings.__init__

    def record(self, stop):
        built.append((threading.current_thread().name, stop))
        init(self, stop)
    monkeypatch.setattr(detokenizer.StopStrings, "__init__", record)
    app = make_fake_app(tiny_model_dir)

    async def fn(app):
        loop_thread = threading.current_thread().name
        ok = await call(app, "POST", COMP, {"prompt": "Hi", "max_tokens": 8, "n": 4,
                                            "stop": ["zz", "qq"], "stream": True})
        big = await call(app, "POST", COMP, {"prompt": "Hi", "stop": ["x" * 20000]})
        return loop_thread, ok, big

    loop_thread, ok, big = run(app, fn)
    assert ok.status == 200 and ok.events()[-1] == "[DONE]"
    assert [stop for _, stop in built] == [["zz", "qq"]]   # once for the 4 choices
    assert built[0][0] != loop_thread
    assert big.status == 400 and "at most 16384" in big.json()["error"]["message"]


LONG = {"max_tokens": 300, "ignore_eos": True, "stream": True}


@pytest.mark.parametrize("path,body", [
    (COMP, {"prompt": "Hello " * 40, **LONG}),
    ("/v1/responses", {"input": "Hello " * 40, **LONG, "max_output_tokens": 300}),
    ("/v1/messages", {"messages": [{"role": "user", "content": "Hello " * 40}], **LONG}),
], ids=["completions", "responses", "messages"])
def test_disconnect_aborts_and_frees_blocks_within_a_step(tiny_model_dir, path, body):
    """The abort reaches the engine before its next step, and that step frees the blocks."""
    async def fn(app):
        eng = app.chat._engine
        usage = []  # KV-cache usage after each engine step, recorded on the engine thread
        step = eng.step

        def counting_step():
            out = step()
            usage.append(eng.kv_cache.usage)
            return out
        eng.step = counting_step
        steps_at_abort = []
        abort = app.chat.abort

        def counting_abort(request_id):
            steps_at_abort.append(len(usage))
            abort(request_id)
        app.chat.abort = counting_abort
        r = await call(app, "POST", path, body, disconnect_after=3)
        await wait_until(lambda: not eng.has_unfinished_requests(), 5, "the engine to be idle")
        return (r, usage, steps_at_abort, app.chat.stats, app.chat.num_in_flight,
                app.metrics.render().decode())

    # the engine thread's (it counts steps in the engine; --engine-process: test_engine_process)
    r, usage, steps_at_abort, stats, in_flight, metrics = run(
        real_app(tiny_model_dir, engine_process=False), fn)
    assert r.status == 200 and len(r.chunks) == 3 and not r.closed
    k = steps_at_abort[0]  # steps completed when the server aborted the request
    assert usage[k - 1] > 0, "the request held blocks when the client left"
    # step k may already have been running; step k + 1 starts after the abort was taken in.
    assert len(usage) <= k + 2 and usage[-1] == 0, (k, usage[-4:])
    assert len(usage) < 300 // 2, "the request must not have run to completion"
    assert stats["kv_cache_usage"] == 0 and stats["num_running"] == 0 and in_flight == 0
    assert 'vllm:request_success_total{finished_reason="abort",model_name="tiny"} 1.0' in metrics


def test_disconnect_non_streaming(tiny_model_dir):
    """A non-streaming client that goes away is noticed by the receive() watcher too."""
    async def fn(app):
        gone = asyncio.Event()
        sent = []
        scope = {"type": "http", "method": "POST", "path": COMP, "root_path": "",
                 "headers": [(b"content-type", b"application/json")], "query_string": b""}
        body = b'{"prompt": "Hi", "max_tokens": 500, "ignore_eos": true}'
        msgs = [{"type": "http.request", "body": body, "more_body": False}]

        async def receive():
            if msgs:
                return msgs.pop()
            await gone.wait()
            return {"type": "http.disconnect"}

        async def send(m):
            sent.append(m)
        task = asyncio.ensure_future(app(scope, receive, send))
        await wait_until(lambda: app.chat.stats.get("num_running") == 1, 30, "the request to run")
        gone.set()
        await asyncio.wait_for(task, 5)
        await wait_until(lambda: app.chat.stats["kv_cache_usage"] == 0, 5, "its blocks freed")
        return sent, app.chat.stats

    sent, stats = run(real_app(tiny_model_dir), fn)
    assert sent == [] and stats["kv_cache_usage"] == 0 and stats["num_running"] == 0


def test_engine_death_fails_requests_and_health(tiny_model_dir):
    # The failure comes once both requests run (however slowly the second one is parsed).
    app = make_fake_app(tiny_model_dir, fail_at_step=4, fail_min_running=2, step_delay=0.02)

    async def fn(app):
        s = asyncio.ensure_future(call(app, "POST", CHAT, {"messages": MSG, "max_tokens": 50,
                                                           "stream": True}))
        f = asyncio.ensure_future(call(app, "POST", CHAT, {"messages": MSG, "max_tokens": 50}))
        s, f = await asyncio.wait_for(asyncio.gather(s, f), 10)
        return (s, f, await call(app, "GET", "/health"),
                await call(app, "POST", CHAT, {"messages": MSG}))

    s, f, health, after = run(app, fn)
    ev = s.events()
    assert s.status == 200 and ev[-1] == "[DONE]" and "injected" in ev[-2]["error"]["message"]
    assert f.status == 500 and "injected" in f.json()["error"]["message"]
    assert health.status == 503 and after.status == 503


def test_graceful_shutdown_lets_requests_finish(tiny_model_dir):
    app = make_fake_app(tiny_model_dir, step_delay=0.01)

    async def main():
        async with lifespan(app):
            task = asyncio.ensure_future(call(app, "POST", CHAT, {"messages": MSG,
                                                                  "max_tokens": 20}))
            await wait_until(lambda: app.chat.num_in_flight == 1, 10, "the request in flight")
        return await task  # lifespan shutdown waited for it

    r = asyncio.run(main())
    assert r.status == 200 and r.json()["choices"][0]["finish_reason"] == "length"


def test_unexpected_errors_are_openai_errors(tiny_model_dir, monkeypatch):
    """A bug of ours is a 500 OpenAI error before the response starts, and one SSE error event
    plus [DONE] after a stream started; the server keeps serving."""
    from minserve import output

    def broken_response(req, choices):  # a library's multi-line text: one bounded line reaches us
        raise RuntimeError("boom in response\nstack backtrace:\n  0: /home/ci/.cargo/x/src/a.rs:9")
    chunk_choice, calls = output.chunk_choice, []

    def broken_chunk_choice(*args, **kwargs):
        calls.append(1)
        if len(calls) == 3:
            raise RuntimeError("boom in chunk")
        return chunk_choice(*args, **kwargs)
    monkeypatch.setattr(output, "response", broken_response)
    monkeypatch.setattr(output, "chunk_choice", broken_chunk_choice)
    app = make_fake_app(tiny_model_dir)

    async def fn(app):
        full = await call(app, "POST", CHAT, {"messages": MSG, "max_tokens": 5})
        stream = await call(app, "POST", CHAT, {"messages": MSG, "max_tokens": 5,
                                                "stream": True})
        after = await call(app, "GET", "/v1/models")
        return full, stream, after, app.chat.num_in_flight

    full, stream, after, in_flight = run(app, fn)
    err = full.json()["error"]
    assert full.status == 500 and "boom in response" in err["message"]
    assert "\n" not in err["message"] and "/home" not in err["message"]
    assert err["type"] == "InternalServerError" and err["code"] == 500
    ev = stream.events()
    assert stream.status == 200 and stream.closed and ev[-1] == "[DONE]"
    assert len(ev) == 4 and "boom in chunk" in ev[-2]["error"]["message"]
    assert after.status == 200 and in_flight == 0


def test_chat_echo_and_missing_chat_template(tiny_model_dir):
    from minserve.tokenizer import Tokenizer
    tok = Tokenizer.from_folder(tiny_model_dir)
    convo = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Sure, "}]

    async def echo(app):
        return [await call(app, "POST", CHAT, {"messages": m, "max_tokens": 3, "echo": True,
                                               **extra})
                for m, extra in ((convo, {}), (convo[:1], {}),
                                 (convo, {"continue_final_message": True}),
                                 (convo, {"stream": True}))]

    cont, user_last, continued, streamed = run(make_fake_app(tiny_model_dir), echo)
    fake_text = FakeEngine(tok).script
    generated = tok.decode(fake_text[:3])
    assert cont.json()["choices"][0]["message"]["content"] == "Sure, " + generated
    assert user_last.json()["choices"][0]["message"]["content"] == generated
    assert continued.json()["choices"][0]["message"]["content"] == "Sure, " + generated
    first = streamed.events()[0]["choices"][0]["delta"]
    assert first == {"role": "assistant", "content": "Sure, "}

    tok.chat_template = None
    app = create_app(None, ServerConfig(["tiny"]), lambda _cfg: FakeEngine(tok))

    async def no_template(app):
        return (await call(app, "POST", CHAT, {"messages": MSG}),
                await call(app, "POST", COMP, {"prompt": "Hi", "max_tokens": 2}))

    chat, comp = run(app, no_template)
    assert chat.status == 400 and "--chat-template" in chat.json()["error"]["message"]
    assert comp.status == 200


def test_shutdown_grace_expiry_ends_streams_with_an_error(tiny_model_dir):
    """Past the grace period in-flight streams end with an error event and [DONE], not a hang;
    requests arriving during shutdown get a 503."""
    app = make_fake_app(tiny_model_dir, server={"shutdown_grace_s": 0.2}, step_delay=0.01,
                        max_model_len=100000)

    async def main():
        async with lifespan(app):
            task = asyncio.ensure_future(call(app, "POST", COMP, {
                "prompt": "Hi", "max_tokens": 5000, "stream": True}))
            await wait_until(lambda: app.chat.num_in_flight == 1, 10, "the request in flight")
        late = await call(app, "POST", COMP, {"prompt": "Hi"})
        return await asyncio.wait_for(task, 10), late

    r, late = asyncio.run(main())
    ev = r.events()
    assert r.status == 200 and r.closed and ev[-1] == "[DONE]"
    assert "shutting down" in ev[-2]["error"]["message"]
    assert late.status == 503


def test_shutdown_deadline_cuts_requests_in_flight(tiny_model_dir):
    """What the signal handler does at the --shutdown-timeout deadline (minserve/shutdown.py):
    a stream in flight ends with a 503 error event and [DONE], a whole request is a 503, and
    what arrives afterwards is refused; the lifespan shutdown then has nothing left to wait for.
    """
    app = make_fake_app(tiny_model_dir, server={"shutdown_grace_s": 3600}, step_delay=0.01,
                        max_model_len=100000)

    async def main():
        async with lifespan(app):
            s = asyncio.ensure_future(call(app, "POST", COMP, {
                "prompt": "Hi", "max_tokens": 50000, "stream": True}))
            f = asyncio.ensure_future(call(app, "POST", COMP, {"prompt": "Hi",
                                                               "max_tokens": 50000}))
            await wait_until(lambda: len(app.chat._engine.running) == 2, 30, "both to run")
            assert app.begin_shutdown() == 3600 and app.num_in_flight == 2
            app.cut_in_flight()
            s, f = await asyncio.wait_for(asyncio.gather(s, f), 30)
            late = await call(app, "POST", COMP, {"prompt": "Hi"})
            return s, f, late, app.num_in_flight

    s, f, late, left = asyncio.run(main())
    ev = s.events()
    assert s.status == 200 and s.closed and ev[-1] == "[DONE]"
    assert ev[-2]["error"]["code"] == 503 and "shutting down" in ev[-2]["error"]["message"]
    assert f.status == 503 and "shutting down" in f.json()["error"]["message"]
    assert late.status == 503 and left == 0


def test_usage_reports_cached_prompt_tokens(tiny_model_dir):
    """The second identical prompt hits the prefix cache: usage says how many tokens were reused,
    streamed or not, and prompt tokens count once per prompt whatever n is."""
    body = {"prompt": "The quick brown fox jumps over the lazy dog. " * 6, "max_tokens": 2,
            "ignore_eos": True}

    async def fn(app):
        first = await call(app, "POST", COMP, body)
        again = await call(app, "POST", COMP, {**body, "n": 2})
        streamed = await call(app, "POST", COMP, {**body, "stream": True,
                                                  "stream_options": {"include_usage": True}})
        return first.json()["usage"], again.json()["usage"], streamed.events()[-2]["usage"]

    first, again, streamed = run(real_app(tiny_model_dir, enable_prompt_tokens_details=True), fn)
    assert first["prompt_tokens_details"]["cached_tokens"] == 0
    block = 16  # EngineConfig's default block size: whole blocks are reused
    want_cached = first["prompt_tokens"] // block * block
    for u in (again, streamed):
        assert u["prompt_tokens"] == first["prompt_tokens"]
        assert 0 < u["prompt_tokens_details"]["cached_tokens"] <= want_cached
    assert again["completion_tokens"] == 4 and again["total_tokens"] == first["prompt_tokens"] + 4


def test_requests_ending_in_their_prefill_step_are_prefix_cache_hits_later(tiny_model_dir):
    """max_tokens 1 and a guided_choice end in the step that computes their prompt (scoring and
    classification calls): the same prompt sent again hits every full block of it."""
    prompt = "The quick brown fox jumps over the lazy dog. " * 6
    bodies = [{"prompt": prompt, "max_tokens": 1},
              {"messages": [{"role": "user", "content": prompt}], "max_tokens": 1},
              {"prompt": "Spam? " + prompt, "guided_choice": ["yes", "no"], "max_tokens": 4}]

    async def fn(app):
        out = []
        for body in bodies:
            path = CHAT if "messages" in body else COMP
            usages = [(await call(app, "POST", path, body)).json()["usage"] for _ in range(2)]
            out.append(usages)
        return out

    block = 16
    for first, again in run(real_app(tiny_model_dir, enable_prompt_tokens_details=True), fn):
        assert first["prompt_tokens_details"]["cached_tokens"] == 0
        want = (first["prompt_tokens"] - 1) // block * block  # the last token always runs
        assert again["prompt_tokens_details"]["cached_tokens"] == want > 0, (first, again)


def test_cache_salt_keeps_tenants_apart_in_the_prefix_cache(tiny_model_dir):
    """vLLM's cache_salt on completions and chat: the same prompt shares KV blocks with an
    earlier request only under the same salt (no salt is a tenant of its own); a salt that is
    not a non-empty string is a 400."""
    prompt = "The quick brown fox jumps over the lazy dog. " * 6
    bodies = {COMP: {"prompt": prompt, "max_tokens": 2, "ignore_eos": True},
              CHAT: {"messages": [{"role": "user", "content": prompt}], "max_tokens": 2}}

    async def fn(app):
        cached, bad = {}, []
        for path, body in bodies.items():
            cached[path] = []
            for salt in ("tenant-a", "tenant-b", "tenant-a", None, "tenant-b"):
                r = await call(app, "POST", path, {**body, "cache_salt": salt})
                cached[path].append(r.json()["usage"]["prompt_tokens_details"]["cached_tokens"])
            for salt in ("", 7, ["a"]):
                bad.append(await call(app, "POST", path, {**body, "cache_salt": salt}))
        return cached, bad, app.chat.stats

    cached, bad, stats = run(real_app(tiny_model_dir, enable_prompt_tokens_details=True), fn)
    for got in cached.values():
        assert got[0] == got[1] == got[3] == 0 and got[2] > 0 and got[4] == got[2], got
    assert all(r.status == 400 and r.json()["error"]["param"] == "cache_salt" for r in bad)
    assert stats["num_running"] == 0


def test_ttft_and_itl_are_per_choice():
    """n > 1: each choice has its own first token and its own gaps (no gap between choices)."""
    from minserve.metrics import Metrics

    m = Metrics("m", lambda: {})
    t = m.tracker()
    for choice in (0, 1, 0, 1, 0):
        t.on_tokens(1, choice)
    t.on_tokens(0, 1)   # no new tokens: nothing observed
    text = m.render().decode()
    assert 'vllm:time_to_first_token_seconds_count{model_name="m"} 2.0' in text
    assert 'vllm:inter_token_latency_seconds_count{model_name="m"} 3.0' in text
    assert 'vllm:generation_tokens_total{model_name="m"} 5.0' in text


@pytest.mark.parametrize("finished_in_engine", [False, True])
def test_outputs_after_a_stop_string_are_dropped(tiny_model_dir, finished_in_engine):
    """The engine thread runs ahead of the event loop: when the server reads the output that
    hits a stop string (and aborts the choice), later steps' outputs may already be queued.
    None of them may count: no extra tokens, logprobs or text, and no second final chunk."""

    from minserve.engine.async_engine import AsyncEngine
    from minserve.engine.request import FinishReason, Logprob, RequestOutput
    from minserve.metrics import Metrics
    from minserve.output import Delta
    from minserve.protocol import ServingContext, parse_completion
    from minserve.serving import Serving
    from minserve.tokenizer import Tokenizer

    tok = Tokenizer.from_folder(tiny_model_dir)
    ctx = ServingContext(tokenizer=tok, model_names=["tiny"], max_model_len=256,
                         vocab_size=tok.vocab_size)
    req = parse_completion({"prompt": "Hi", "max_tokens": 12, "stop": " world", "logprobs": 1,
                            "n": 2}, ctx)
    engine = AsyncEngine(None)   # never started: only its stream bookkeeping is used
    engine.is_ready = True
    serving = Serving(ServerConfig(["tiny"]), engine, Metrics("m", lambda: {}), {})
    serving._ctx = ctx
    gen = serving.generate(req)
    c0, c1 = gen.stream.child_ids
    while not engine._inbox.empty():   # the requests the never-started engine thread would add
        engine._inbox.get()
    ids = tok.encode(" hello world and more", add_special_tokens=False)
    # every output queued before the reader looks at the first: c0 writes the whole text (and
    # may even have finished, so the engine side let go of it), c1 one token and finishes
    for i, t in enumerate(ids):
        last = finished_in_engine and i == len(ids) - 1
        gen.stream.put(RequestOutput(c0, [t], FinishReason.LENGTH if last else None,
                                     logprobs=[Logprob(t, -0.5, 1, [])]))
    if finished_in_engine:
        engine._streams.pop(c0)   # as _deliver does once a child's last output is queued
    gen.stream.put(RequestOutput(c1, [ids[0]], FinishReason.LENGTH,
                                 logprobs=[Logprob(ids[0], -0.5, 1, [])]))

    async def read():
        return [(gen.stream.child_ids[d.choice.index], d) async for d in gen
                if type(d) is Delta]

    results = asyncio.run(read())
    first = gen.choices[0]
    seen = [d for cid, d in results if cid == c0]
    assert first.finish_reason == "stop" and first.text == " hello" and seen[-1].finished
    assert [d.finished for d in seen].count(True) == 1   # one final chunk
    # queued outputs of one choice arrive merged (RequestStream): count tokens, not deltas
    assert first.num_output_tokens == len(first.logprobs) == sum(
        len(d.token_ids) for d in seen) < len(ids)
    assert gen.choices[1].finish_reason == "length" and (c1, True) in [
        (cid, d.finished) for cid, d in results]
    # the engine is asked to abort c0 only while it still runs there
    assert engine._inbox.empty() == finished_in_engine and c0 not in engine._streams


def test_route_patterns():
    """Route tables hold patterns: `{name}` is one path segment, `{name:path}` the rest (model
    ids may hold slashes); exact paths win."""
    from minserve.http import find_route, match_path

    assert match_path("/v1/models/{model:path}", "/v1/models/org/name") == {"model": "org/name"}
    assert match_path("/v1/models/{model:path}", "/v1/models/") is None
    assert match_path("/v1/batches/{id}/cancel", "/v1/batches/b1/cancel") == {"id": "b1"}
    for path in ("/v1/batches/b1", "/v1/batches//cancel", "/v1/batches/b1/cancel/x"):
        assert match_path("/v1/batches/{id}/cancel", path) is None, path
    routes = {"/v1/files/{id}": {"GET": 1}, "/v1/files/{id}/content": {"GET": 2},
              "/v1/files/list": {"GET": 3}}
    assert find_route(routes, "/v1/files/f1/content") == ({"GET": 2}, {"id": "f1"})
    assert find_route(routes, "/v1/files/list") == ({"GET": 3}, {})
    assert find_route(routes, "/v1/files/f1") == ({"GET": 1}, {"id": "f1"})
    assert find_route(routes, "/v1/nothing") is None


def test_stats_window_logs_vllm_line_and_feeds_throughput_gauges(tiny_model_dir, caplog):
    """vLLM's periodic line (Avg prompt/generation throughput, Running, Waiting, KV cache usage,
    Prefix cache hit rate) over the tokens of the last interval; the same throughputs and the
    old gpu_cache_usage_perc name on /metrics; nothing logged for an idle interval, and nothing
    at all with log_stats off (--disable-log-stats) while the gauges still move."""
    import logging
    import re

    from minserve.metrics import StatsWindow

    async def fn(app):
        window = app.metrics.window
        window.tick(now=100.0)
        for _ in range(2):
            await call(app, "POST", COMP, {"prompt": "Hello there " * 8, "max_tokens": 5,
                                           "ignore_eos": True})
        line = window.tick(now=102.0)
        metrics = (await call(app, "GET", "/metrics")).body.decode()
        idle = window.tick(now=104.0)
        return line, metrics, idle, dict(app.chat.stats)

    with caplog.at_level(logging.INFO, logger="minserve.stats"):
        line, metrics, idle, stats = run(real_app(tiny_model_dir), fn)
    assert stats["num_generation_tokens"] == 10
    assert "Avg generation throughput: 5.0 tokens/s" in line, line  # 10 tokens in 2 s
    prompt_tps = float(re.search(r"Avg prompt throughput: ([\d.]+)", line)[1])
    assert 0 < prompt_tps <= stats["num_prompt_tokens"] / 2
    assert re.search(r"Running: 0 reqs, Waiting: 0 reqs, KV cache usage: [\d.]+%, "
                     r"Prefix cache hit rate: [1-9][\d.]*%$", line), line  # the 2nd hit the 1st
    assert any(r.getMessage() == line for r in caplog.records)
    assert re.search(r'^vllm:avg_generation_throughput_toks_per_s\{model_name="tiny"\} 5\.0$',
                     metrics, re.M), metrics
    assert re.search(r"^vllm:avg_prompt_throughput_toks_per_s\{.*\} [1-9]", metrics, re.M)
    assert re.search(r"^vllm:gpu_cache_usage_perc\{", metrics, re.M)
    assert idle is None
    stats = {"num_generation_tokens": 0}
    quiet = StatsWindow(lambda: stats, log=False)
    quiet.tick(now=0.0)
    stats["num_generation_tokens"] = 30
    caplog.clear()
    assert quiet.tick(now=3.0) and quiet.generation_throughput == 10.0 and not caplog.records


def test_unknown_model_404_lists_the_served_names(tiny_model_dir):
    """A newcomer's first 404: it names what is served and where the names come from."""
    async def fn(app):
        return [await call(app, "POST", CHAT, {"model": "gpt-4", "messages": [
                    {"role": "user", "content": "x"}]}),
                await call(app, "POST", COMP, {"model": "m" * 10_000, "prompt": "x"}),
                await call(app, "GET", "/v1/models/gpt-4")]

    for r in run(real_app(tiny_model_dir), fn):
        err = r.json()["error"]
        assert r.status == 404 and err["type"] == "NotFoundError" and err["param"] == "model"
        assert "does not exist" in err["message"] and "`tiny`, `alias`" in err["message"]
        assert "--served-model-name" in err["message"] and len(err["message"]) < 400
