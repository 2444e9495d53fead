"""Seeded request fuzzing through the real ASGI app (tiny model, tool and reasoning parsers on):
valid chat/completions/tokenize/embeddings bodies with feature combinations, then fields
replaced, dropped or nested wrongly. Every answer must be a 2xx or a 4xx OpenAI error (never a
500) and a streamed answer must end in [DONE]; run 60 at a time with clients going away, nothing
may be left running or holding KV blocks; and a seeded valid request streamed must carry exactly
what the same request answers whole. FUZZ_SEED and FUZZ_COUNT run other, longer campaigns
(found so far: an unhashable message role was a 500; outputs queued after a stop string leaked
into the response)."""
from __future__ import annotations

import asyncio
import json
import os
import random

import orjson

from minserve.http import OpenAIError
from minserve.messages import error_body
from tests.api_checks import message_body, message_events, response_body, response_events
from tests.asgi import call
from tests.serving import real_app, run, wait_until

MSG = [{"role": "user", "content": "Hello there"}]
TOOL = {"type": "function", "function": {"name": "f", "parameters": {
    "type": "object", "properties": {"a": {"type": "integer"}}, "required": ["a"]}}}
ODD = [None, True, False, 0, 1, -1, 2, 3.5, -0.0, 1e308, -1e308, 10**30, -(10**30), "", "x",
       "\u0000", "\u2028", "é" * 3, [], [1], ["a"], [[1, 2]], [None], {}, {"a": 1},
       {"type": "text"}, [{"role": "user"}], [{"type": "text", "text": 5}], {"json": {}},
       {"type": "json_schema"}, {"type": "json_schema", "json_schema": {"schema": 5}},
       {"include_usage": "yes"}, [[[]]], "[a-", "root ::= ", {"type": "function"}, 16, 40]
CHAT_FIELDS = ["messages", "model", "max_tokens", "max_completion_tokens", "temperature", "top_p",
               "top_k", "min_p", "n", "stop", "seed", "presence_penalty", "frequency_penalty",
               "repetition_penalty", "logit_bias", "logprobs", "top_logprobs", "stream",
               "stream_options", "user", "response_format", "guided_json", "guided_regex",
               "guided_choice", "guided_grammar", "structured_outputs", "tools", "tool_choice",
               "parallel_tool_calls", "chat_template_kwargs", "add_generation_prompt",
               "continue_final_message", "echo", "ignore_eos", "min_tokens", "stop_token_ids",
               "skip_special_tokens", "include_stop_str_in_output", "best_of",
               "spaces_between_special_tokens", "guided_whitespace_pattern"]
COMP_FIELDS = [f for f in CHAT_FIELDS if f not in (
    "messages", "tools", "tool_choice", "parallel_tool_calls", "chat_template_kwargs",
    "add_generation_prompt", "continue_final_message", "max_completion_tokens",
    "top_logprobs")] + ["prompt", "suffix"]
SCHEMA = {"type": "object", "properties": {"name": {"type": "string", "maxLength": 5},
                                           "age": {"type": "integer", "minimum": 0}},
          "required": ["name", "age"]}
ODD += [SCHEMA, {"type": "object", "properties": 5}, {"type": "string", "pattern": "["},
        {"$ref": "#/nowhere"}, {"enum": []}, {"type": "array", "items": {"type": "nothing"}},
        {"type": "json_object"}, {"type": "function", "function": {"name": "g"}}, "required",
        "none", {"type": "function", "function": {"name": "f"}}]
RTOOL = {"type": "function", "name": "f", "parameters": TOOL["function"]["parameters"]}
ATOOL = {"name": "f", "input_schema": TOOL["function"]["parameters"]}
HISTORY = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Weather?"},
           {"role": "assistant", "content": None, "tool_calls": [
               {"id": "call_1", "type": "function",
                "function": {"name": "f", "arguments": "{\"a\": 1}"}}]},
           {"role": "tool", "tool_call_id": "call_1", "content": "sunny"},
           {"role": "user", "content": [{"type": "text", "text": "And tomorrow?"}]}]
BASES = {
    "/v1/chat/completions": ({"messages": MSG, "max_tokens": 4, "tools": [TOOL],
                              "tool_choice": "auto"}, CHAT_FIELDS),
    "/v1/chat/completions#history": ({"messages": HISTORY, "max_tokens": 4, "tools": [TOOL],
                                      "tool_choice": "required", "stream": True}, CHAT_FIELDS),
    "/v1/chat/completions#schema": ({"messages": MSG, "max_tokens": 6, "response_format": {
        "type": "json_schema", "json_schema": {"name": "p", "schema": SCHEMA}}}, CHAT_FIELDS),
    "/v1/completions#guided": ({"prompt": ["a", "b"], "max_tokens": 6, "n": 2,
                                "guided_json": SCHEMA, "logprobs": 2}, COMP_FIELDS),
    "/v1/completions": ({"prompt": "Hello", "max_tokens": 4}, COMP_FIELDS),
    "/tokenize": ({"prompt": "Hello"}, ["prompt", "messages", "add_special_tokens",
                                        "add_generation_prompt", "model", "tools"]),
    "/detokenize": ({"tokens": [5, 6]}, ["tokens", "model"]),
}
# The other APIs' routes, drawn from a seed of their own (the bodies above stay as they were).
API_BASES = {
    "/v1/responses": ({"input": "Hello", "max_output_tokens": 4, "tools": [RTOOL]}, [
        "input", "instructions", "max_output_tokens", "model", "temperature", "top_p", "tools",
        "tool_choice", "parallel_tool_calls", "text", "reasoning", "metadata", "user", "stream",
        "store", "previous_response_id", "stop", "ignore_eos", "seed"]),
    "/v1/messages": ({"messages": MSG, "max_tokens": 4, "tools": [ATOOL]}, [
        "messages", "system", "max_tokens", "model", "temperature", "top_p", "top_k", "tools",
        "tool_choice", "stop_sequences", "thinking", "output_config", "metadata", "stream",
        "ignore_eos", "seed"]),
}


# Valid values, so that feature combinations (n + stream + logprobs + guided + stop + echo ...)
# are reached too, not only the first refusal.
VALID = {
    "max_tokens": [0, 1, 3, 8], "max_completion_tokens": [1, 5], "temperature": [0, 0.7, 2],
    "top_p": [0.1, 1], "top_k": [-1, 1, 5], "min_p": [0, 0.2], "n": [1, 2, 3],
    "stop": ["a", ["e", "\n"], []], "seed": [0, 7, -5], "presence_penalty": [-2, 1.5],
    "frequency_penalty": [2], "repetition_penalty": [0.5, 1.3], "logit_bias": [{"5": 100},
                                                                               {"7": -100}],
    "logprobs": [True, False, 0, 3], "top_logprobs": [0, 2], "stream": [True, False],
    "stream_options": [{"include_usage": True, "continuous_usage_stats": True}],
    "user": ["u"], "response_format": [{"type": "json_object"}, {"type": "text"}, {
        "type": "json_schema", "json_schema": {"name": "p", "schema": SCHEMA, "strict": True}}],
    "guided_json": [SCHEMA, json.dumps(SCHEMA)], "guided_regex": ["[a-c]{2,4}", "(yes|no)"],
    "guided_choice": [["SPAM", "NOT_SPAM"]], "guided_grammar": ['start: "a" "b"+'],
    "structured_outputs": [{"choice": ["x", "y"]}, {"regex": "[0-9]+"}, {"json": SCHEMA}],
    "tools": [[TOOL]], "tool_choice": ["none", "auto", "required",
                                       {"type": "function", "function": {"name": "f"}}],
    "parallel_tool_calls": [False], "chat_template_kwargs": [{"enable_thinking": False}],
    "add_generation_prompt": [False], "continue_final_message": [True], "echo": [True, False],
    "ignore_eos": [True], "min_tokens": [0, 2], "stop_token_ids": [[5, 6]],
    "skip_special_tokens": [False], "include_stop_str_in_output": [True], "best_of": [2],
    "spaces_between_special_tokens": [False], "guided_whitespace_pattern": [" ?"],
    "prompt": ["Hi", ["a", "b"], [5, 6, 7], [[5], [6, 7]]], "suffix": [None],
    "messages": [MSG, HISTORY, [*MSG, {"role": "assistant", "content": "Sure"}]],
    "add_special_tokens": [False], "tokens": [[1, 2]], "model": ["tiny", "alias"],
}


# Where a route's field has another shape than the chat field of that name.
ROUTE_VALID = {
    "/v1/responses": {
        "input": ["Hi", [{"role": "user", "content": [{"type": "input_text", "text": "Hi"}]}],
                  [{"role": "user", "content": "Hi"}, {"type": "function_call", "call_id": "c1",
                                                       "name": "f", "arguments": "{}"},
                   {"type": "function_call_output", "call_id": "c1", "output": "ok"}]],
        "max_output_tokens": [1, 4], "instructions": ["Be brief."], "store": [True, False],
        "tool_choice": ["auto", "none", "required", {"type": "function", "name": "f"}],
        "text": [{"format": {"type": "json_object"}}, {"format": {
            "type": "json_schema", "name": "p", "schema": SCHEMA}}],
        "reasoning": [{"effort": "low"}, {"effort": "none"}], "metadata": [{"a": "b"}],
        "tools": [[RTOOL]], "previous_response_id": ["resp_nope"]},
    "/v1/messages": {
        "system": ["Be brief.", [{"type": "text", "text": "Be brief."}]],
        "messages": [MSG, [*MSG, {"role": "assistant", "content": "Sure"}], [
            *MSG, {"role": "assistant", "content": [{"type": "tool_use", "id": "t1",
                                                     "name": "f", "input": {"a": 1}}]},
            {"role": "user", "content": [{"type": "tool_result", "tool_use_id": "t1",
                                          "content": "ok"}]}]],
        "tool_choice": [{"type": "auto"}, {"type": "any"}, {"type": "none"},
                        {"type": "tool", "name": "f"}],
        "tools": [[ATOOL]], "stop_sequences": [["a", "\n"]], "metadata": [{"user_id": "u"}],
        "thinking": [{"type": "enabled", "budget_tokens": 1024}, {"type": "disabled"}],
        "output_config": [{"format": {"type": "json_schema", "schema": SCHEMA}}]},
}


def _valid(path: str, key: str) -> list | None:
    return ROUTE_VALID.get(path.split("#")[0], {}).get(key) or VALID.get(key)


def _answer_problem(path: str, r) -> str | None:
    """What is wrong with an answer: a 5xx or odd status, an error not in the route's shape, a
    stream that ends badly; None when it is fine."""
    path = path.split("#")[0]
    if r.status >= 500 or r.status not in (200, 400, 404, 413, 422):
        return f"status {r.status}"
    if r.status != 200:
        body = r.json()
        if path.startswith("/v1/messages"):
            ok = body == error_body(OpenAIError(r.status, body["error"]["message"]))
        else:
            ok = body["error"]["code"] == r.status
        return None if ok and body["error"]["message"] else f"error shape {body}"
    streamed = r.headers.get("content-type") == "text/event-stream"
    if path == "/v1/responses":
        return None if (response_events(r.named_events()) if streamed else
                        response_body(r.json())) else "no response"
    if path == "/v1/messages":
        return None if (message_events(r.named_events()) if streamed else
                        message_body(r.json())) else "no message"
    if streamed:
        events = r.events()
        if events[-1] != "[DONE]" or any("error" in e for e in events[:-1]
                                         if isinstance(e, dict)):
            return "stream"
        return None
    orjson.loads(r.body)
    return None


def _mutate(rng: random.Random, value, depth: int = 0):
    """A wrong-ish replacement: an odd value, or the same shape with one part made odd."""
    if depth < 3 and isinstance(value, list) and value and rng.random() < 0.5:
        i = rng.randrange(len(value))
        return value[:i] + [_mutate(rng, value[i], depth + 1)] + value[i + 1:]
    if depth < 3 and isinstance(value, dict) and value and rng.random() < 0.5:
        k = rng.choice(list(value))
        return {**value, k: _mutate(rng, value[k], depth + 1)}
    return rng.choice(ODD)


def _bodies(seed: int, count: int, bases: dict = BASES):
    rng = random.Random(seed)
    for _ in range(count):
        path = rng.choice(list(bases))
        base, fields = bases[path]
        body = dict(base)
        for _ in range(rng.choice([1, 2, 4, 6])):
            key = rng.choice(fields)
            if _valid(path, key):
                body[key] = rng.choice(_valid(path, key))
        if rng.random() < 0.6:
            key = rng.choice(fields)
            if key in body and rng.random() < 0.2:
                del body[key]
            else:
                body[key] = _mutate(rng, body.get(key, rng.choice(ODD)))
        for key in ("max_tokens", "max_output_tokens"):  # keep each generation short
            if isinstance(body.get(key), int) and not isinstance(body[key], bool):
                body[key] = min(body[key], 8)
        if path == "/v1/responses":  # without it, a response runs to the context's end
            body.setdefault("max_output_tokens", 8)
        if isinstance(body.get("n"), int) and not isinstance(body["n"], bool):
            body["n"] = min(body["n"], 3)
        yield path, body


def test_fuzzed_requests_never_500_and_lose_nothing(tiny_model_dir):
    app = real_app(tiny_model_dir, enable_auto_tool_choice=True, tool_call_parser="hermes",
                   reasoning_parser="qwen3")

    async def fn(app):
        bad = []
        counts = {}
        seed, count = int(os.environ.get("FUZZ_SEED", 1234)), int(os.environ.get("FUZZ_COUNT",
                                                                                 400))
        for path, body in [*_bodies(seed, count), *_bodies(seed + 3, count // 8, API_BASES)]:
            # the stdlib encoder: it writes integers past 64 bits, which orjson refuses
            r = await call(app, "POST", path.split("#")[0], body=json.dumps(body).encode(),
                           headers={"content-type": "application/json"})
            counts[r.status] = counts.get(r.status, 0) + 1
            problem = _answer_problem(path, r)
            if problem:
                bad.append((path, body, problem, r.body[:300]))
        ok = await call(app, "POST", "/v1/completions", {"prompt": "Hi", "max_tokens": 2})
        return bad, counts, ok, app.chat.stats

    bad, counts, ok, stats = run(app, fn)
    assert not bad, bad[:5]
    # the table exercises both sides: accepted requests and refused ones
    assert counts.get(200, 0) > 50 and counts.get(400, 0) > 50, counts
    assert ok.status == 200 and stats["num_running"] == stats["num_waiting"] == 0
    assert stats["kv_cache_usage"] == 0


EMBED_VALID = {
    "input": ["hi", ["a b", "c"], [5, 6, 7], [[5], [6, 7]], "", [], [""], ["x " * 300]],
    "encoding_format": ["float", "base64"], "dimensions": [8, 64, 16], "user": ["u"],
    "truncate_prompt_tokens": [-1, 4, 1], "model": ["emb"],
}


def test_fuzzed_embedding_requests_never_500(tmp_path):
    from minserve.embeddings.service import EmbeddingService
    from minserve.server import ServerConfig, create_app
    from tests.tiny import make_tiny_encoder

    folder, _ = make_tiny_encoder(str(tmp_path / "bert"), "bert", is_matryoshka=True)
    app = create_app(None, ServerConfig(served_model_names=[], embedding_model_names=["emb"]),
                     embedding=EmbeddingService.lazy(folder, served_model_name="emb"))
    rng = random.Random(int(os.environ.get("FUZZ_SEED", 1234)))

    async def fn(app):
        bad, counts = [], {}
        for _ in range(int(os.environ.get("FUZZ_COUNT", 400)) // 2):
            body = {"input": "hello", "model": "emb"}
            for _ in range(rng.choice([1, 2, 3])):
                key = rng.choice(list(EMBED_VALID))
                body[key] = rng.choice(EMBED_VALID[key])
            if rng.random() < 0.6:
                key = rng.choice(list(EMBED_VALID))
                body[key] = _mutate(rng, body.get(key, rng.choice(ODD)))
            r = await call(app, "POST", "/v1/embeddings", body=json.dumps(body).encode(),
                           headers={"content-type": "application/json"})
            counts[r.status] = counts.get(r.status, 0) + 1
            if r.status not in (200, 400, 404):
                bad.append((body, r.status, r.body[:300]))
            elif r.status == 200:
                data = r.json()["data"]
                n = len(body["input"]) if isinstance(body["input"], list) and body[
                    "input"] and not isinstance(body["input"][0], int) else 1
                assert len(data) == n and [d["index"] for d in data] == list(range(n)), body
        return bad, counts

    bad, counts = run(app, fn)
    assert not bad, bad[:5]
    assert counts.get(200, 0) > 20 and counts.get(400, 0) > 20, counts


def test_concurrent_fuzzed_requests_with_disconnects_leak_nothing(tiny_model_dir):
    """The same bodies, 60 at a time, a third of the clients going away after a few chunks:
    no 500, and once all is over no request runs or waits and every KV block is free."""
    import asyncio

    app = real_app(tiny_model_dir, enable_auto_tool_choice=True, tool_call_parser="hermes",
                   reasoning_parser="qwen3")
    rng = random.Random(int(os.environ.get("FUZZ_SEED", 1234)) + 1)
    count = int(os.environ.get("FUZZ_COUNT", 400))
    bodies = list(_bodies(seed=rng.randrange(1 << 30), count=count // 2))
    bodies += _bodies(int(os.environ.get("FUZZ_SEED", 1234)) + 4, count // 16, API_BASES)

    async def one(path, body):
        cut = rng.choice([None, None, 1, 2, 3])
        return await call(app, "POST", path.split("#")[0], body=json.dumps(body).encode(),
                          headers={"content-type": "application/json"}, disconnect_after=cut)

    async def fn(app):
        results = []
        for i in range(0, len(bodies), 60):
            results += await asyncio.gather(*(one(p, b) for p, b in bodies[i:i + 60]))
        # aborts land at the engine's next step
        await wait_until(lambda: app.chat.stats["num_running"] == app.chat.stats["num_waiting"]
                         == 0, 30, "every request to leave the engine")
        ok = await call(app, "POST", "/v1/completions", {"prompt": "Hi", "max_tokens": 2})
        sched, kv = app.chat._engine.scheduler, app.chat._engine.kv_cache
        # per-request bookkeeping everywhere is gone too (a leak here grows with uptime)
        leftovers = [len(app.chat._streams), len(app.chat._parents), len(sched.requests),
                     len(sched._leaders), len(sched._prompt_logprobs), len(kv._block_hashes)]
        return results, ok, app.chat.stats, leftovers

    results, ok, stats, leftovers = run(app, fn)
    assert leftovers == [0] * 6, leftovers
    assert all(r.status is None or r.status < 500 for r in results), \
        [r.body[:200] for r in results if r.status and r.status >= 500][:3]
    assert ok.status == 200 and stats["num_running"] == stats["num_waiting"] == 0
    assert stats["kv_cache_usage"] == 0


def _collect_stream(kind: str, events: list) -> dict[int, dict]:
    """Streamed chunks -> per choice what the whole body has (as the SDK accumulates them)."""
    out: dict[int, dict] = {}
    for e in events:
        if not isinstance(e, dict):
            continue
        for ch in e["choices"]:
            acc = out.setdefault(ch["index"], {"text": "", "reasoning": "", "calls": {},
                                               "lp": [], "finish": None})
            if kind == "chat":
                delta = ch["delta"]
                acc["text"] += delta.get("content") or ""
                acc["reasoning"] += delta.get("reasoning_content") or ""
                for call in delta.get("tool_calls") or []:
                    c = acc["calls"].setdefault(call["index"], {"name": "", "arguments": ""})
                    fn = call.get("function") or {}
                    c["name"] += fn.get("name") or ""
                    c["arguments"] += fn.get("arguments") or ""
                acc["lp"] += (ch["logprobs"] or {}).get("content") or []
            else:
                acc["text"] += ch["text"]
                acc["lp"] += (ch["logprobs"] or {}).get("tokens") or []
            acc["finish"] = ch["finish_reason"] or acc["finish"]
    return out


def _collect_whole(kind: str, body: dict) -> dict[int, dict]:
    out = {}
    for ch in body["choices"]:
        if kind == "chat":
            msg = ch["message"]
            calls = {i: {"name": c["function"]["name"], "arguments": c["function"]["arguments"]}
                     for i, c in enumerate(msg.get("tool_calls") or [])}
            out[ch["index"]] = {"text": msg.get("content") or "",
                                "reasoning": msg.get("reasoning_content") or "", "calls": calls,
                                "lp": (ch["logprobs"] or {}).get("content") or [],
                                "finish": ch["finish_reason"]}
        else:
            out[ch["index"]] = {"text": ch["text"], "reasoning": "", "calls": {},
                                "lp": (ch["logprobs"] or {}).get("tokens") or [],
                                "finish": ch["finish_reason"]}
    return out


def test_streamed_equals_whole_for_seeded_feature_combinations(tiny_model_dir):
    """Valid combinations (tools + reasoning parsers, guided outputs, stop strings, echo, n,
    logprobs), each sent twice with one seed: the streamed chunks, accumulated, carry exactly
    the non-streamed body's text, reasoning, tool calls, logprobs and finish reasons."""
    app = real_app(tiny_model_dir, enable_auto_tool_choice=True, tool_call_parser="hermes",
                   reasoning_parser="qwen3")
    rng = random.Random(int(os.environ.get("FUZZ_SEED", 1234)) + 2)
    cases = []
    for _ in range(int(os.environ.get("FUZZ_COUNT", 400)) // 4):
        path = rng.choice([p for p in BASES if p.startswith(("/v1/chat", "/v1/completions"))])
        base, fields = BASES[path]
        body = dict(base)
        for _ in range(rng.choice([1, 2, 4])):
            key = rng.choice(fields)
            if key in VALID and key not in ("stream", "stream_options"):
                body[key] = rng.choice(VALID[key])
        body.update(stream=False, seed=rng.randrange(1000))
        body.pop("stream_options", None)
        cases.append((path.split("#")[0], body))

    async def fn(app):
        pairs = []
        for path, body in cases:
            whole = await call(app, "POST", path, body)
            streamed = await call(app, "POST", path, {**body, "stream": True})
            pairs.append((path, body, whole, streamed))
        return pairs

    compared = 0
    for path, body, whole, streamed in run(app, fn):
        assert whole.status == streamed.status, (body, whole.body[:200], streamed.body[:200])
        if whole.status != 200:
            continue
        kind = "chat" if path.endswith("chat/completions") else "completion"
        got, want = _collect_stream(kind, streamed.events()), _collect_whole(kind, whole.json())
        assert got == want, json.dumps([body, got, want])
        compared += 1
    assert compared > len(cases) // 4, compared


HI = [{"role": "user", "content": "Hi"}]
# Malformed requests to the Responses and Messages routes: (method, path, body, status, a word
# the error message must carry). Each answer is in its route's error shape, and none is a 500.
MALFORMED = [
    ("POST", "/v1/responses", [], 400, "JSON object"),
    ("POST", "/v1/responses", {}, 400, "input"),
    ("POST", "/v1/responses", {"input": 5}, 400, "input"),
    ("POST", "/v1/responses", {"input": [5]}, 400, "input"),
    ("POST", "/v1/responses", {"input": []}, 400, "input"),
    ("POST", "/v1/responses", {"input": [{"role": "robot", "content": "x"}]}, 400, "role"),
    ("POST", "/v1/responses", {"input": [{"role": "user", "content": 5}]}, 400, "content"),
    ("POST", "/v1/responses", {"input": [{"role": "user", "content": [
        {"type": "input_image", "image_url": "http://x/y.png"}]}]}, 400, "text-only"),
    ("POST", "/v1/responses", {"input": [{"role": "user", "content": [{"type": "input_text"}]}]},
     400, "input_text"),
    ("POST", "/v1/responses", {"input": [{"type": "function_call", "name": "f"}]}, 400, "call_id"),
    ("POST", "/v1/responses", {"input": [{"type": "function_call_output", "output": "x"}]}, 400,
     "call_id"),
    ("POST", "/v1/responses", {"input": [{"type": "function_call_output", "call_id": "c",
                                          "output": 5}]}, 400, "output"),
    ("POST", "/v1/responses", {"input": [{"type": "web_search_call", "id": "w"}]}, 400,
     "web_search_call"),
    ("POST", "/v1/responses", {"input": [{"type": "item_reference", "id": "i"}]}, 400,
     "item_reference"),
    ("POST", "/v1/responses", {"input": "x", "tools": [{"type": "web_search"}]}, 400, "web_search"),
    ("POST", "/v1/responses", {"input": "x", "tools": [{"type": "file_search"}]}, 400,
     "file_search"),
    ("POST", "/v1/responses", {"input": "x", "tools": [{"type": "code_interpreter"}]}, 400,
     "code_interpreter"),
    ("POST", "/v1/responses", {"input": "x", "tools": [{"type": "mcp", "server_label": "s"}]},
     400, "mcp"),
    ("POST", "/v1/responses", {"input": "x", "tools": "f"}, 400, "tools"),
    ("POST", "/v1/responses", {"input": "x", "tools": [{"type": "function"}]}, 400, "name"),
    ("POST", "/v1/responses", {"input": "x", "tools": [RTOOL], "tool_choice": {
        "type": "web_search_preview"}}, 400, "web_search_preview"),
    ("POST", "/v1/responses", {"input": "x", "tools": [RTOOL], "tool_choice": {
        "type": "function", "name": "g"}}, 400, "g"),
    ("POST", "/v1/responses", {"input": "x", "tool_choice": "required"}, 400, "tools"),
    ("POST", "/v1/responses", {"input": "x", "max_output_tokens": 0}, 400, "max_output_tokens"),
    ("POST", "/v1/responses", {"input": "x", "max_output_tokens": 10**6}, 400,
     "maximum context length"),
    ("POST", "/v1/responses", {"input": "x", "temperature": -1}, 400, "temperature"),
    ("POST", "/v1/responses", {"input": "x", "top_p": 0}, 400, "top_p"),
    ("POST", "/v1/responses", {"input": "x", "text": "json"}, 400, "text"),
    ("POST", "/v1/responses", {"input": "x", "text": {"format": {"type": "xml"}}}, 400,
     "text.format"),
    ("POST", "/v1/responses", {"input": "x", "text": {"format": {"type": "json_schema",
                                                                 "name": "a"}}}, 400, "schema"),
    ("POST", "/v1/responses", {"input": "x", "text": {"format": {
        "type": "json_schema", "name": "a", "schema": {"type": "string", "pattern": "["}}}}, 400,
     "text.format"),
    ("POST", "/v1/responses", {"input": "x", "reasoning": {"effort": "extreme"}}, 400,
     "reasoning.effort"),
    ("POST", "/v1/responses", {"input": "x", "reasoning": "high"}, 400, "reasoning"),
    ("POST", "/v1/responses", {"input": "x", "metadata": {"a": 1}}, 400, "metadata"),
    ("POST", "/v1/responses", {"input": "x", "metadata": [1]}, 400, "metadata"),
    ("POST", "/v1/responses", {"input": "x", "stream": "yes"}, 400, "stream"),
    ("POST", "/v1/responses", {"input": "x", "store": 1}, 400, "store"),
    ("POST", "/v1/responses", {"input": "x", "background": True, "store": False}, 400,
     "background"),
    ("POST", "/v1/responses", {"input": "x", "previous_response_id": "resp_nope"}, 404,
     "resp_nope"),
    ("POST", "/v1/responses", {"input": "x", "previous_response_id": 5}, 400,
     "previous_response_id"),
    ("POST", "/v1/responses", {"input": "x", "instructions": ["a"]}, 400, "instructions"),
    ("POST", "/v1/responses", {"input": "x", "conversation": "conv_1"}, 400, "conversation"),
    ("POST", "/v1/responses", {"input": "x", "model": "gpt-5"}, 404, "gpt-5"),
    ("POST", "/v1/responses", {"input": "x" * 300_000}, 400, "maximum context length"),
    ("GET", "/v1/responses/resp_nope", None, 404, "resp_nope"),
    ("DELETE", "/v1/responses/resp_nope", None, 404, "resp_nope"),
    ("POST", "/v1/responses/resp_nope/cancel", None, 404, "resp_nope"),
    ("PUT", "/v1/responses", {"input": "x"}, 405, "POST"),
    ("POST", "/v1/messages", [], 400, "JSON object"),
    ("POST", "/v1/messages", {"messages": HI}, 400, "max_tokens"),
    ("POST", "/v1/messages", {"max_tokens": 5}, 400, "messages"),
    ("POST", "/v1/messages", {"max_tokens": 5, "messages": []}, 400, "messages"),
    ("POST", "/v1/messages", {"max_tokens": 0, "messages": HI}, 400, "max_tokens"),
    ("POST", "/v1/messages", {"max_tokens": 10**6, "messages": HI}, 400, "maximum context"),
    ("POST", "/v1/messages", {"max_tokens": 5, "messages": [{"role": "system", "content": "x"}]},
     400, "role"),
    ("POST", "/v1/messages", {"max_tokens": 5, "messages": ["Hi"]}, 400, "role"),
    ("POST", "/v1/messages", {"max_tokens": 5, "messages": [{"role": "user", "content": 5}]},
     400, "content"),
    ("POST", "/v1/messages", {"max_tokens": 5, "messages": [{"role": "user", "content": [
        {"type": "image", "source": {"type": "url", "url": "http://x/y.png"}}]}]}, 400,
     "text-only"),
    ("POST", "/v1/messages", {"max_tokens": 5, "messages": [{"role": "user", "content": [
        {"type": "tool_use", "id": "t", "name": "f", "input": {}}]}]}, 400, "text"),
    ("POST", "/v1/messages", {"max_tokens": 5, "messages": [*HI, {"role": "assistant", "content": [
        {"type": "tool_use", "name": "f"}]}]}, 400, "tool_use"),
    ("POST", "/v1/messages", {"max_tokens": 5, "messages": [{"role": "user", "content": [
        {"type": "tool_result", "content": "x"}]}]}, 400, "tool_use_id"),
    ("POST", "/v1/messages", {"max_tokens": 5, "messages": [{"role": "user", "content": [
        {"type": "tool_result", "tool_use_id": "t", "content": [{"type": "image"}]}]}]}, 400,
     "text-only"),
    ("POST", "/v1/messages", {"max_tokens": 5, "messages": HI, "system": 5}, 400, "system"),
    ("POST", "/v1/messages", {"max_tokens": 5, "messages": HI, "system": [{"type": "x"}]}, 400,
     "system"),
    ("POST", "/v1/messages", {"max_tokens": 5, "messages": HI, "stop_sequences": "x"}, 400,
     "stop_sequences"),
    ("POST", "/v1/messages", {"max_tokens": 5, "messages": HI, "stop_sequences": [1]}, 400,
     "stop_sequences"),
    ("POST", "/v1/messages", {"max_tokens": 5, "messages": HI, "tools": [
        {"type": "web_search_20250305", "name": "web_search"}]}, 400, "web_search_20250305"),
    ("POST", "/v1/messages", {"max_tokens": 5, "messages": HI, "tools": [
        {"type": "bash_20250124", "name": "bash"}]}, 400, "bash_20250124"),
    ("POST", "/v1/messages", {"max_tokens": 5, "messages": HI, "tools": [{"name": "f"}]}, 400,
     "input_schema"),
    ("POST", "/v1/messages", {"max_tokens": 5, "messages": HI, "tools": {"name": "f"}}, 400,
     "tools"),
    ("POST", "/v1/messages", {"max_tokens": 5, "messages": HI, "tools": [ATOOL],
                              "tool_choice": {"type": "maybe"}}, 400, "tool_choice"),
    ("POST", "/v1/messages", {"max_tokens": 5, "messages": HI, "tools": [ATOOL],
                              "tool_choice": "auto"}, 400, "tool_choice"),
    ("POST", "/v1/messages", {"max_tokens": 5, "messages": HI, "tools": [ATOOL],
                              "tool_choice": {"type": "tool"}}, 400, "tool_choice.name"),
    ("POST", "/v1/messages", {"max_tokens": 5, "messages": HI, "tools": [ATOOL],
                              "tool_choice": {"type": "tool", "name": "g"}}, 400, "g"),
    ("POST", "/v1/messages", {"max_tokens": 5, "messages": HI, "tool_choice": {"type": "any"}},
     400, "tools"),
    ("POST", "/v1/messages", {"max_tokens": 5, "messages": HI, "thinking": {"type": "on"}}, 400,
     "thinking"),
    ("POST", "/v1/messages", {"max_tokens": 5, "messages": HI, "output_config": {
        "format": {"type": "json_schema"}}}, 400, "output_config.format"),
    ("POST", "/v1/messages", {"max_tokens": 5, "messages": HI, "output_config": {"format": {
        "type": "json_schema", "schema": {"type": "string", "pattern": "["}}}}, 400,
     "output_config.format"),
    ("POST", "/v1/messages", {"max_tokens": 5, "messages": HI, "output_config": 5}, 400,
     "output_config"),
    ("POST", "/v1/messages", {"max_tokens": 5, "messages": HI, "metadata": "u"}, 400, "metadata"),
    ("POST", "/v1/messages", {"max_tokens": 5, "messages": HI, "temperature": -1}, 400,
     "temperature"),
    ("POST", "/v1/messages", {"max_tokens": 5, "messages": HI, "top_k": "a"}, 400, "top_k"),
    ("POST", "/v1/messages", {"max_tokens": 5, "messages": HI, "stream": "yes"}, 400, "stream"),
    ("POST", "/v1/messages", {"max_tokens": 5, "messages": HI, "model": "claude-opus"}, 404,
     "claude-opus"),
    ("POST", "/v1/messages", {"max_tokens": 5, "messages": [{"role": "user",
                                                            "content": "x" * 300_000}]},
     400, "maximum context length"),
    ("GET", "/v1/messages", None, 405, "POST"),
    ("POST", "/v1/messages/count_tokens", [], 400, "JSON object"),
    ("POST", "/v1/messages/count_tokens", {"messages": "x"}, 400, "messages"),
    ("POST", "/v1/messages/count_tokens", {"messages": HI, "system": 5}, 400, "system"),
    ("POST", "/v1/messages/count_tokens", {"messages": HI, "model": "claude-opus"}, 404,
     "claude-opus"),
]


def test_malformed_responses_and_messages_requests(tiny_model_dir):
    app = real_app(tiny_model_dir)

    async def fn(app):
        out = []
        for method, path, body, status, word in MALFORMED:
            r = await call(app, method, path, body=None if body is None else orjson.dumps(body),
                           headers={"content-type": "application/json"})
            out.append((method, path, body, status, word, r))
        return out

    for method, path, body, status, word, r in run(app, fn):
        case = (method, path, str(body)[:200])
        assert r.status == status, (case, r.body[:300])
        err = r.json()["error"]
        assert word in err["message"], (case, err)
        if path.startswith("/v1/messages"):
            assert r.json() == error_body(OpenAIError(status, err["message"])), case
        else:
            assert err["code"] == status and err["type"], case


# ---------------------------------------------------------------- scores, reranks and batches
RERANK_VALID = {"query": ["a man", "horse"], "documents": [["a", "b"], [{"text": "x"}], ["y"]],
                "top_n": [0, 1, 5], "return_documents": [True, False],
                "truncate_prompt_tokens": [-1, 8], "model": ["rr"]}
SCORE_VALID = {"text_1": ["a man", ["a", "b"]], "text_2": ["horse", ["x", "y"], ["q"]],
               "truncate_prompt_tokens": [-1, 8], "model": ["rr"]}
BATCH_VALID = {"endpoint": ["/v1/chat/completions", "/v1/completions", "/v1/embeddings"],
               "completion_window": ["24h"], "metadata": [{"a": "b"}, None]}
_BOUNDARY = b"fuzz-boundary"


def _upload_body(rng: random.Random) -> tuple[bytes, str]:
    content = b"\n".join(orjson.dumps({"custom_id": f"c{i}", "method": "POST",
                                       "url": "/v1/completions",
                                       "body": {"prompt": "hi", "max_tokens": 1}})
                         for i in range(rng.randrange(1, 4)))
    purpose = rng.choice([b"batch", b"batch", b"fine-tune", b""])
    body = (b"--" + _BOUNDARY + b"\r\nContent-Disposition: form-data; name=\"purpose\"\r\n\r\n"
            + purpose + b"\r\n--" + _BOUNDARY + b"\r\nContent-Disposition: form-data; "
            b"name=\"file\"; filename=\"in.jsonl\"\r\n\r\n" + content + b"\r\n--" + _BOUNDARY
            + b"--\r\n")
    ctype = f"multipart/form-data; boundary={_BOUNDARY.decode()}"
    cut = rng.random()
    if cut < 0.15:
        body = body[:rng.randrange(len(body))]
    elif cut < 0.3:
        i = rng.randrange(len(body))
        body = body[:i] + bytes([rng.randrange(256)]) * rng.randrange(1, 9) + body[i + 1:]
    elif cut < 0.4:
        ctype = rng.choice(["multipart/form-data", "application/json", "multipart/form-data; "
                            "boundary=", "text/plain; boundary=x", "multipart/form-data; "
                            "boundary=other"])
    elif cut < 0.5:
        body = body.replace(content, rng.choice([b"{bad json", b"[1]", b"\xff\xfe", b"", b"\n"]))
    return body, ctype


def test_fuzzed_score_rerank_and_batch_requests_never_500(tiny_model_dir, tmp_path):
    """/v1/score, /score, /v1/rerank, /rerank, /v2/rerank with a tiny cross-encoder, and the
    Batch API (multipart uploads, batch bodies, odd ids and query strings): 2xx or 4xx only."""
    from minserve.batch.service import BatchLimits, BatchService
    from minserve.config import EngineConfig
    from minserve.embeddings.service import EmbeddingService
    from minserve.server import ServerConfig, create_app
    from tests.asgi import lifespan
    from tests.test_scoring import make_tiny_cross_encoder

    folder, _ = make_tiny_cross_encoder(str(tmp_path / "ce"), "bert")
    app = create_app(EngineConfig(model=tiny_model_dir, kv_cache_memory=4 << 20,
                                  max_model_len=512),
                     ServerConfig(served_model_names=["tiny"], embedding_model_names=["rr"]),
                     embedding=EmbeddingService.lazy(folder, served_model_name="rr"),
                     batches=BatchService(str(tmp_path / "store"),
                                          BatchLimits(max_file_bytes=4096, max_file_lines=3)))
    rng = random.Random(int(os.environ.get("FUZZ_SEED", 1234)) + 3)
    count = int(os.environ.get("FUZZ_COUNT", 400)) // 2

    def fuzzed(valid: dict, base: dict) -> bytes:
        body = dict(base)
        for _ in range(rng.choice([1, 2, 3])):
            key = rng.choice(list(valid))
            body[key] = rng.choice(valid[key])
        if rng.random() < 0.6:
            key = rng.choice(list(valid))
            if key in body and rng.random() < 0.2:
                del body[key]
            else:
                body[key] = _mutate(rng, body.get(key, rng.choice(ODD)))
        return json.dumps(body).encode()

    async def fn(app):
        await app.embedding.wait_ready(timeout=120)
        bad, counts, file_ids = [], {}, ["file-" + "0" * 32]
        batch_ids = ["batch_" + "0" * 32]
        for _ in range(count):
            roll = rng.random()
            query = b""
            hdrs = {"content-type": "application/json"}
            if roll < 0.3:
                path = rng.choice(["/v1/rerank", "/rerank", "/v2/rerank"])
                method, body = "POST", fuzzed(RERANK_VALID, {"query": "q", "documents": ["d"]})
            elif roll < 0.45:
                path = rng.choice(["/v1/score", "/score"])
                method, body = "POST", fuzzed(SCORE_VALID, {"text_1": "a", "text_2": "b"})
            elif roll < 0.6:
                method, path = "POST", "/v1/files"
                body, ctype = _upload_body(rng)
                hdrs = {"content-type": ctype}
            elif roll < 0.75:
                method, path = "POST", "/v1/batches"
                body = fuzzed({**BATCH_VALID, "input_file_id": file_ids},
                              {"input_file_id": rng.choice(file_ids),
                               "endpoint": "/v1/completions", "completion_window": "24h"})
            else:
                ident = rng.choice(file_ids + batch_ids + ["x", "file-../../etc", "%00",
                                                            "file-" + "g" * 32])
                method, path = rng.choice([
                    ("GET", f"/v1/files/{ident}"), ("DELETE", f"/v1/files/{ident}"),
                    ("GET", f"/v1/files/{ident}/content"), ("GET", f"/v1/batches/{ident}"),
                    ("POST", f"/v1/batches/{ident}/cancel"), ("GET", "/v1/files"),
                    ("GET", "/v1/batches"), ("PUT", "/v1/files"), ("GET", "/v1/files/a/b/c")])
                query = rng.choice([b"", b"limit=2", b"limit=abc", b"limit=0", b"order=up",
                                    b"after=" + ident.encode(), b"purpose=batch", b"%zz=&&",
                                    b"limit=100000"])
                body = b""
                hdrs = {}
            r = await call(app, method, path, body=body, headers=hdrs, query=query)
            counts[r.status] = counts.get(r.status, 0) + 1
            if r.status >= 500 or r.status not in (200, 400, 404, 405, 413, 415):
                bad.append((method, path, body[:200], r.status, r.body[:300]))
                continue
            if path.endswith("/content") and r.status == 200:
                continue
            payload = r.json()
            if r.status != 200:
                assert payload["error"]["message"] and payload["error"]["code"] == r.status
            elif path == "/v1/files" and method == "POST":
                file_ids.append(payload["id"])
            elif path == "/v1/batches" and method == "POST":
                batch_ids.append(payload["id"])
        return bad, counts, file_ids, batch_ids

    async def main():
        async with lifespan(app):
            return await fn(app)

    bad, counts, file_ids, batch_ids = asyncio.run(main())
    assert not bad, bad[:5]
    assert counts.get(200, 0) > 30 and counts.get(400, 0) > 30, counts
    assert len(file_ids) > 3 and len(batch_ids) > 1, (file_ids, batch_ids)   # some were made


def _deep_bodies(base: dict, fields: list[str]):
    """`base` with one field set to a list / an object 1,000 levels deep (raw JSON text: the
    stdlib encoder would recurse too), then deeper than any JSON reader takes."""
    for name in fields:
        rest = orjson.dumps({k: v for k, v in base.items() if k != name}).decode()[:-1]
        for deep in ("[" * 1000 + "]" * 1000, '{"a":' * 1000 + "1" + "}" * 1000,
                     "[" * 5000 + "]" * 5000):
            yield name, f'{rest}{", " if len(rest) > 1 else ""}"{name}": {deep}}}'.encode()


def test_deeply_nested_values_are_400s_on_every_route(tiny_model_dir, tmp_path):
    """A field holding a list or object 1,000 levels deep was a 500 on chat, completions,
    embeddings and tokenize: building the error message repr'd the value (RecursionError). Now
    every route answers 4xx, and the message shows the value's type and a bounded prefix."""
    from minserve.config import EngineConfig
    from minserve.embeddings.service import EmbeddingService
    from minserve.server import ServerConfig, create_app
    from tests.tiny import make_tiny_encoder

    folder, _ = make_tiny_encoder(str(tmp_path / "bert"), "bert")
    app = create_app(EngineConfig(model=tiny_model_dir, kv_cache_memory=4 << 20,
                                  max_model_len=512),
                     ServerConfig(served_model_names=["tiny"], embedding_model_names=["emb"],
                                  enable_auto_tool_choice=True, tool_call_parser="hermes"),
                     embedding=EmbeddingService.lazy(folder, served_model_name="emb"))
    role = (b'{"messages": [{"role": ' + b'{"a":' * 1000 + b"1" + b"}" * 1000
            + b', "content": "x"}]}')
    cases = [(p.split("#")[0], f, b) for p, (base, fields) in BASES.items()
             for f, b in _deep_bodies(base, fields)]
    cases += [("/v1/chat/completions", "messages[0].role", role)]
    cases += [("/v1/embeddings", f, b) for f, b in _deep_bodies({"input": "hi", "model": "emb"},
                                                                list(EMBED_VALID))]

    async def fn(app):
        bad, messages, accepted = [], [], []
        for path, name, body in cases:
            r = await call(app, "POST", path, body=body,
                           headers={"content-type": "application/json"})
            if r.status not in (200, 400, 404, 413, 422):
                bad.append((path, name, r.status, r.body[:200]))
            elif r.status != 200:
                messages.append(r.json()["error"]["message"])
            else:
                accepted.append((path, name))
        return bad, messages, accepted

    bad, messages, _ = run(app, fn)
    assert not bad, bad[:5]
    assert max(map(len, messages)) < 400
    assert any("array [[[[" in m for m in messages) and any("object {'a': {" in m
                                                            for m in messages)
