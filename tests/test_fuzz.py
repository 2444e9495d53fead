"""Seeded request fuzzing through the real ASGI app (tiny model, tool and reasoning parsers on):
valid chat/completions/tokenize/embeddings bodies with feature combinations, then fields
replaced, dropped or nested wrongly. Every answer must be a 2xx or a 4xx OpenAI error (never a
500) and a streamed answer must end in [DONE]; run 60 at a time with clients going away, nothing
may be left running or holding KV blocks; and a seeded valid request streamed must carry exactly
what the same request answers whole. FUZZ_SEED and FUZZ_COUNT run other, longer campaigns
(found so far: an unhashable message role was a 500; outputs queued after a stop string leaked
into the response)."""
from __future__ import annotations

import json
import os
import random

import orjson

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


def _mutate(rng: random.Random, value, depth: int = 0):
    """A wrong-ish replacement: an odd value, or the same shape with one part made odd."""
    if depth < 3 and isinstance(value, list) and value and rng.random() < 0.5:
        i = rng.randrange(len(value))
        return value[:i] + [_mutate(rng, value[i], depth + 1)] + value[i + 1:]
    if depth < 3 and isinstance(value, dict) and value and rng.random() < 0.5:
        k = rng.choice(list(value))
        return {**value, k: _mutate(rng, value[k], depth + 1)}
    return rng.choice(ODD)


def _bodies(seed: int, count: int):
    rng = random.Random(seed)
    for _ in range(count):
        path = rng.choice(list(BASES))
        base, fields = BASES[path]
        body = dict(base)
        for _ in range(rng.choice([1, 2, 4, 6])):
            key = rng.choice(fields)
            if key in VALID:
                body[key] = rng.choice(VALID[key])
        if rng.random() < 0.6:
            key = rng.choice(fields)
            if key in body and rng.random() < 0.2:
                del body[key]
            else:
                body[key] = _mutate(rng, body.get(key, rng.choice(ODD)))
        if isinstance(body.get("max_tokens"), int) and not isinstance(body["max_tokens"], bool):
            body["max_tokens"] = min(body["max_tokens"], 8)  # keep each generation short
        if isinstance(body.get("n"), int) and not isinstance(body["n"], bool):
            body["n"] = min(body["n"], 3)
        yield path, body


def test_fuzzed_requests_never_500_and_lose_nothing(tiny_model_dir):
    app = real_app(tiny_model_dir, enable_auto_tool_choice=True, tool_call_parser="hermes",
                   reasoning_parser="qwen3")

    async def fn(app):
        bad = []
        counts = {}
        for path, body in _bodies(seed=int(os.environ.get("FUZZ_SEED", 1234)),
                                  count=int(os.environ.get("FUZZ_COUNT", 400))):
            # the stdlib encoder: it writes integers past 64 bits, which orjson refuses
            r = await call(app, "POST", path.split("#")[0], body=json.dumps(body).encode(),
                           headers={"content-type": "application/json"})
            counts[r.status] = counts.get(r.status, 0) + 1
            if r.status >= 500 or r.status not in (200, 400, 404, 413, 422):
                bad.append((path, body, r.status, r.body[:300]))
            elif r.status != 200:
                err = r.json()["error"]
                assert err["message"] and err["code"] == r.status, (body, err)
            elif r.headers.get("content-type") == "text/event-stream":
                events = r.events()
                if events[-1] != "[DONE]" or any("error" in e for e in events[:-1]
                                                 if isinstance(e, dict)):
                    bad.append((path, body, "stream", r.body[-300:]))
            else:
                orjson.loads(r.body)
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
    bodies = list(_bodies(seed=rng.randrange(1 << 30),
                          count=int(os.environ.get("FUZZ_COUNT", 400)) // 2))

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
        path = rng.choice([p for p in BASES if not p.endswith("tokenize")])
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
