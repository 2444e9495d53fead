"""Malformed and edge-case requests, each with the status vLLM/OpenAI give it (never a 500)."""
from __future__ import annotations

import asyncio

import pytest

from tests.asgi import call, lifespan
from tests.fake_engine import make_fake_app

MSG = [{"role": "user", "content": "hi"}]
CHAT, COMP = "/v1/chat/completions", "/v1/completions"

# (route, body or raw bytes, expected status, a word the error must name)
CASES = [
    (CHAT, b"{not json", 400, "JSON"),
    (CHAT, b"\xff\xfe", 400, "JSON"),
    (CHAT, b'{"messages": [{"role": "user", "content": "\\ud800"}]}', 400, "JSON"),
    (CHAT, b"[1, 2]", 400, "object"),
    (CHAT, b'{"messages": NaN}', 400, "JSON"),
    (CHAT, b'{"messages": [], "temperature": 1e400}', 400, "JSON"),
    (CHAT, b'{"messages": [{"role": "user", "content": "\xff\xfe"}]}', 400, "JSON"),
    (CHAT, b"", 400, "JSON"),
    (CHAT, b"[" * 5000 + b"]" * 5000, 400, "JSON"),
    (CHAT, b'{"messages": [{"role": "user", "content": "hi"}], "n": 1e999}', 400, "JSON"),
    (CHAT, b'{"messages": [{"role": "user", "content": "hi"}], "max_tokens": '
     b'100000000000000000000000000000}', 400, "max_tokens"),
    (CHAT, b'{"messages": [{"role": "user", "content": "hi"}], "seed": '
     b'18446744073709551615}', 400, "seed"),
    (CHAT, {"messages": MSG, "temperature": 1e308}, 400, "temperature"),
    (CHAT, {"messages": [{"content": "x"}]}, 400, "role"),
    (CHAT, {"messages": [{"role": "user", "content": [{"type": "text", "text": 3}]}]}, 400,
     "content"),
    (CHAT, {"messages": [{"role": "user", "content": [{"type": "input_audio"}]}]}, 400,
     "text-only"),
    (CHAT, {"messages": [{"role": "user", "content": "x", "name": 5}]}, 400, "name"),
    (CHAT, {"messages": [None]}, 400, "messages[0]"),
    (CHAT, {"messages": MSG, "stream": True, "stream_options": [1]}, 400, "stream_options"),
    (CHAT, {"messages": MSG, "user": 5}, 400, "user"),
    (CHAT, {"messages": MSG, "logit_bias": [1]}, 400, "logit_bias"),
    (CHAT, {"messages": MSG, "logit_bias": {"1": "x"}}, 400, "logit_bias"),
    (CHAT, {"messages": MSG, "stop_token_ids": [10**6]}, 400, "stop_token_ids"),
    (CHAT, {}, 400, "messages"),
    (CHAT, {"messages": []}, 400, "messages"),
    (CHAT, {"messages": "hi"}, 400, "messages"),
    (CHAT, {"messages": [{"role": "user", "content": 5}]}, 400, "content"),
    (CHAT, {"messages": [{"role": "user", "content": [{"type": "image_url",
                                                        "image_url": {"url": "x"}}]}]},
     400, "text-only"),
    (CHAT, {"messages": MSG, "model": "nope"}, 404, "nope"),
    (CHAT, {"messages": MSG, "model": 3}, 400, "model"),
    (CHAT, {"messages": MSG, "temperature": "hot"}, 400, "temperature"),
    (CHAT, {"messages": MSG, "temperature": -1}, 400, "temperature"),
    (CHAT, {"messages": MSG, "top_p": 0}, 400, "top_p"),
    (CHAT, {"messages": MSG, "top_p": 1.5}, 400, "top_p"),
    (CHAT, {"messages": MSG, "n": 0}, 400, "n"),
    (CHAT, {"messages": MSG, "n": 1.5}, 400, "n"),
    (CHAT, {"messages": MSG, "n": "two"}, 400, "n"),
    (CHAT, {"messages": MSG, "stream": "maybe"}, 400, "stream"),
    (CHAT, {"messages": MSG, "logprobs": 2}, 400, "logprobs"),
    (CHAT, {"messages": MSG, "ignore_eos": [True]}, 400, "ignore_eos"),
    (CHAT, {"messages": MSG, "logprobs": True, "top_logprobs": -1}, 400, "max allowed: 20"),
    (CHAT, {"messages": MSG, "logprobs": True, "top_logprobs": -2}, 400, "top_logprobs"),
    (CHAT, b'{"messages": [{"role": "user", "content": "hi"}], "seed": '
     b'-9223372036854775809}', 400, "greater_than_equal], got integer -9223372036854775809"),
    (COMP, {"prompt": [5, 10**9]}, 400, "Token id 1000000000 is out of vocabulary"),
    (CHAT, {"messages": MSG, "stop_token_ids": [3, 10**6]}, 400, "Token id 1000000"),
    (COMP, {"prompt": ""}, 400, "Either prompt or prompt_embeds must be provided"),
    (COMP, {"prompt": [[]]}, 400, "The decoder prompt cannot be empty"),
    (CHAT, {"messages": MSG, "n": 10**6}, 400, "n"),
    (CHAT, {"messages": MSG, "max_tokens": 0}, 400, "max_tokens"),
    (CHAT, b'{"messages": [{"role": "user", "content": "hi"}], "max_tokens": 1e30}', 400,
     "max_tokens"),
    (CHAT, {"messages": MSG, "max_tokens": 2**62}, 400, "maximum context length"),
    (CHAT, {"messages": MSG, "max_completion_tokens": -3}, 400, "max_completion_tokens"),
    (CHAT, {"messages": MSG, "max_tokens": 100000}, 400, "maximum context length"),
    (CHAT, {"messages": MSG, "presence_penalty": 3}, 400, "presence_penalty"),
    (CHAT, {"messages": MSG, "frequency_penalty": -2.5}, 400, "frequency_penalty"),
    (CHAT, {"messages": MSG, "repetition_penalty": 0}, 400, "repetition_penalty"),
    (CHAT, {"messages": MSG, "top_k": -2}, 400, "top_k"),
    (CHAT, {"messages": MSG, "min_p": 2}, 400, "min_p"),
    (CHAT, {"messages": MSG, "seed": "x"}, 400, "seed"),
    (CHAT, {"messages": MSG, "stop": 5}, 400, "stop"),
    (CHAT, {"messages": MSG, "stop": ["a"] * 40}, 400, "stop"),
    (CHAT, {"messages": MSG, "logit_bias": {"abc": 1}}, 400, "logit_bias"),
    (CHAT, {"messages": MSG, "logit_bias": {"1": 500}}, 400, "logit_bias"),
    (CHAT, {"messages": MSG, "logit_bias": {"99999999": 1}}, 400, "logit_bias"),
    (CHAT, {"messages": MSG, "top_logprobs": 3}, 400, "top_logprobs"),
    (CHAT, {"messages": MSG, "logprobs": True, "top_logprobs": 50}, 400, "top_logprobs"),
    (CHAT, {"messages": MSG, "stream_options": {"include_usage": True}}, 400, "stream_options"),
    (CHAT, {"messages": MSG, "stop_token_ids": [1, "x"]}, 400, "stop_token_ids"),
    (CHAT, {"messages": MSG, "min_tokens": 50, "max_tokens": 10}, 400, "min_tokens"),
    (CHAT, {"messages": MSG, "best_of": 3}, 400, "best_of"),
    (CHAT, {"messages": MSG, "use_beam_search": True, "early_stopping": "soon"}, 400,
     "early_stopping"),
    (CHAT, {"messages": MSG, "response_format": {"type": "xml"}}, 400, "response_format"),
    (CHAT, {"messages": MSG, "response_format": {"type": "json_schema"}}, 400, "response_format"),
    (CHAT, {"messages": MSG, "response_format": {"type": "json_object"},
            "guided_regex": "a+"}, 400, "only one"),
    (CHAT, {"messages": MSG, "guided_choice": []}, 400, "guided_choice"),
    (CHAT, {"messages": MSG, "tool_choice": "required", "tools": []}, 400, "tool_choice"),
    (CHAT, {"messages": MSG, "chat_template_kwargs": [1]}, 400, "chat_template_kwargs"),
    (CHAT, {"messages": MSG, "add_generation_prompt": True, "continue_final_message": True},
     400, "continue_final_message"),
    (COMP, {}, 400, "prompt"),
    (COMP, {"prompt": ""}, 400, "empty"),
    (COMP, {"prompt": []}, 400, "prompt"),
    (COMP, {"prompt": [1, "a"]}, 400, "prompt"),
    (COMP, {"prompt": [[1, 2], [3, -1]]}, 400, "prompt"),
    (COMP, {"prompt": [10**9]}, 400, "prompt"),
    (COMP, {"prompt": {"a": 1}}, 400, "prompt"),
    (COMP, {"prompt": "hi", "suffix": "bye"}, 400, "suffix"),
    (COMP, {"prompt": "hi", "logprobs": 99}, 400, "logprobs"),
    (COMP, {"prompt": "hi", "max_tokens": 0}, 400, "only with echo"),
    # far too long to fit whatever it tokenizes to: refused before tokenizing
    (COMP, {"prompt": "hi " * 300_000}, 400, "characters of prompt"),
    (CHAT, {"messages": [{"role": "user", "content": "hi " * 300_000}]}, 400,
     "characters of messages"),
    (CHAT, {"messages": [{"role": {"a": 1}, "content": "x"}]}, 400, "role"),  # found by fuzzing
    (COMP, {"prompt": "hi", "max_tokens": -1, "echo": True}, 400, "max_tokens"),
    (COMP, {"prompt": "hi " * 300}, 400, "maximum context length"),
    (COMP, {"prompt": ["hi"] * 100, "n": 2}, 400, "n"),
    ("/tokenize", {"prompt": 5}, 400, "prompt"),
    ("/tokenize", {"prompt": "x", "add_special_tokens": "y"}, 400, "add_special_tokens"),
    ("/tokenize", {"messages": []}, 400, "messages"),
    ("/tokenize", b"[1]", 400, "object"),
    ("/detokenize", {"tokens": "abc"}, 400, "tokens"),
    ("/detokenize", {"tokens": [1.5]}, 400, "tokens"),
    ("/detokenize", b"{bad", 400, "JSON"),
]


@pytest.fixture(scope="module")
def run(tiny_model_dir):
    """run(coro_fn) -> result, with the app started once per call."""
    def runner(fn):
        async def main():
            app = make_fake_app(tiny_model_dir, max_model_len=256)
            async with lifespan(app):
                return await fn(app)
        return asyncio.run(main())
    return runner


def test_malformed_requests_table(run):
    async def all_cases(app):
        out = []
        for path, body, _, _ in CASES:
            if isinstance(body, bytes):
                r = await call(app, "POST", path, body=body,
                               headers={"content-type": "application/json"})
            else:
                r = await call(app, "POST", path, body)
            out.append(r)
        # the server is still alive and serving after all of them
        out.append(await call(app, "POST", CHAT, {"messages": MSG, "max_tokens": 2}))
        return out

    results = run(all_cases)
    for (path, body, status, word), r in zip(CASES, results[:-1], strict=True):
        assert r.status == status, (path, body, r.status, r.body)
        err = r.json()["error"]
        assert set(err) >= {"message", "type", "param", "code"}
        assert word.lower() in err["message"].lower(), (body, err)
    assert results[-1].status == 200


def test_valid_edge_requests(run):
    async def cases(app):
        ok = [
            {"messages": [{"role": "system", "content": "s"},
                          {"role": "developer", "content": "d"},
                          {"role": "user", "name": "bob", "content": [
                              {"type": "text", "text": "a"}, {"type": "text", "text": "b"}]},
                          {"role": "assistant", "content": None},
                          {"role": "tool", "content": "r", "tool_call_id": "1"}],
             "max_tokens": 3, "user": "u", "top_k": -1, "seed": 7, "logit_bias": {"5": 10},
             "response_format": {"type": "text"}, "unknown_field": 1},
            {"messages": MSG, "max_completion_tokens": 2, "stop": "x", "n": 2,
             "logprobs": True, "top_logprobs": 0},
        ]
        return [await call(app, "POST", CHAT, b) for b in ok]

    for r in run(cases):
        assert r.status == 200, r.body


def test_structured_seam_fills_sampling_params(tiny_model_dir):
    from minserve.protocol import ServingContext, parse_chat
    from minserve.tokenizer import Tokenizer

    ctx = ServingContext(Tokenizer.from_folder(tiny_model_dir), ["tiny"], 256, 512)
    schema = {"type": "object"}
    cases = [({"response_format": {"type": "json_schema", "json_schema": {"name": "x",
                                                                        "schema": schema}}},
              {"json": schema}),
             ({"response_format": {"type": "json_object"}}, {"json_object": True}),
             ({"guided_json": '{"type": "object"}'}, {"json": schema}),
             ({"guided_choice": ["a", "b"]}, {"choice": ["a", "b"]}),
             ({"guided_regex": "a+"}, {"regex": "a+"}),
             ({}, None)]
    for extra, want in cases:
        assert parse_chat({"messages": MSG, **extra}, ctx).params.structured == want


def test_structured_outputs_config_defaults_and_request_switches(tiny_model_dir):
    """--structured-outputs-config's switches reach every spec (tool calls' JSON too) unless
    the request's structured_outputs sets its own; a non-boolean switch is a 400."""
    from minserve.protocol import OpenAIError, ServingContext, parse_chat
    from minserve.tokenizer import Tokenizer

    ctx = ServingContext(Tokenizer.from_folder(tiny_model_dir), ["tiny"], 256, 512,
                         structured_defaults={"any_whitespace": False})
    schema = {"type": "object", "properties": {"a": {"type": "integer"}}}
    tool = {"type": "function", "function": {"name": "f", "parameters": schema}}
    spec = parse_chat({"messages": MSG, "guided_json": schema}, ctx).params.structured
    assert spec == {"json": schema, "any_whitespace": False}
    spec = parse_chat({"messages": MSG, "structured_outputs": {
        "json": schema, "disable_any_whitespace": False, "disable_additional_properties": False}},
        ctx).params.structured
    assert spec == {"json": schema, "any_whitespace": True, "additional_properties": True}
    spec = parse_chat({"messages": MSG, "tools": [tool], "tool_choice": "required",
                       "structured_outputs": {"disable_additional_properties": False}},
                      ctx).params.structured
    assert spec["any_whitespace"] is False and spec["additional_properties"] is True
    with pytest.raises(OpenAIError, match="must be a boolean"):
        parse_chat({"messages": MSG, "structured_outputs": {
            "json": schema, "disable_additional_properties": "yes"}}, ctx)


def test_sampling_mapping(tiny_model_dir):
    from minserve.protocol import ServingContext, parse_completion
    from minserve.tokenizer import Tokenizer

    ctx = ServingContext(Tokenizer.from_folder(tiny_model_dir), ["tiny"], 256, 512,
                         {"temperature": 0.6, "top_p": 0.9})
    p = parse_completion({"prompt": "hi"}, ctx).params
    assert (p.temperature, p.top_p, p.max_tokens) == (0.6, 0.9, 16)  # generation_config defaults
    req = parse_completion({"prompt": [[1, 2], "hi"] if False else ["a", "b"], "n": 2,
                            "temperature": 0, "top_k": 5, "min_p": 0.1,
                            "repetition_penalty": 1.2, "stop": "z", "stop_token_ids": [3],
                            "ignore_eos": True, "min_tokens": 2, "max_tokens": 9,
                            "include_stop_str_in_output": True, "skip_special_tokens": False,
                            "logprobs": 2, "echo": True, "seed": 4}, ctx)
    p = req.params
    assert (p.n, p.temperature, p.top_k, p.min_p, p.repetition_penalty, p.stop,
            p.stop_token_ids, p.ignore_eos, p.min_tokens, p.max_tokens, p.logprobs,
            p.prompt_logprobs, p.seed, p.include_stop_str_in_output, p.skip_special_tokens) == (
        2, 0, 5, 0.1, 1.2, ["z"], [3], True, 2, 9, 2, 2, 4, True, False)
    assert req.prompt_texts == ["a", "b"] and len(req.prompts) == 2


def test_every_sampling_field_reaches_sampling_params(tiny_model_dir):
    from minserve.protocol import ServingContext, parse_chat
    from minserve.tokenizer import Tokenizer

    ctx = ServingContext(Tokenizer.from_folder(tiny_model_dir), ["tiny"], 256, 512)
    req = parse_chat({"messages": MSG, "temperature": 0.5, "top_p": 0.8, "n": 3, "seed": 9,
                      "max_completion_tokens": 7, "max_tokens": 99, "stop": ["a", "b"],
                      "presence_penalty": 0.5, "frequency_penalty": -0.5,
                      "logit_bias": {"5": -100, "6": 2.5}, "logprobs": True, "top_logprobs": 4,
                      "user": "u", "top_k": 3, "min_p": 0.2, "repetition_penalty": 1.1,
                      "stop_token_ids": [7], "ignore_eos": True, "min_tokens": 1,
                      "skip_special_tokens": False, "spaces_between_special_tokens": False,
                      "include_stop_str_in_output": True, "stream": True,
                      "stream_options": {"include_usage": True,
                                         "continuous_usage_stats": True}}, ctx)
    p = req.params
    assert (p.temperature, p.top_p, p.n, p.seed, p.max_tokens, p.stop, p.presence_penalty,
            p.frequency_penalty, p.logit_bias, p.logprobs, p.top_k, p.min_p,
            p.repetition_penalty, p.stop_token_ids, p.ignore_eos, p.min_tokens,
            p.skip_special_tokens, p.spaces_between_special_tokens,
            p.include_stop_str_in_output) == (
        0.5, 0.8, 3, 9, 7, ["a", "b"], 0.5, -0.5, {5: -100.0, 6: 2.5}, 4, 3, 0.2, 1.1, [7],
        True, 1, False, False, True)
    assert (req.stream, req.include_usage, req.continuous_usage, req.logprobs) == (
        True, True, True, 4)
    # chat without max_tokens leaves the length to the context (the engine caps it)
    assert parse_chat({"messages": MSG}, ctx).params.max_tokens is None


def test_completion_prompt_forms(tiny_model_dir):
    from minserve.protocol import ServingContext, parse_completion
    from minserve.tokenizer import Tokenizer

    tok = Tokenizer.from_folder(tiny_model_dir)
    ctx = ServingContext(tok, ["tiny"], 256, 512)
    ids = tok.encode("Hello world")
    for prompt, want in (("Hello world", [ids]), (["Hello world", "Hi"], [ids, tok.encode("Hi")]),
                         (ids, [ids]), ([ids, [5, 6]], [ids, [5, 6]])):
        assert parse_completion({"prompt": prompt}, ctx).prompts == want
    echo = parse_completion({"prompt": [ids, [5, 6]], "echo": True}, ctx)
    assert echo.prompt_texts == [tok.decode(ids, skip_special_tokens=False),
                                 tok.decode([5, 6], skip_special_tokens=False)]


def test_lenient_fields_as_vllm_reads_them(tiny_model_dir):
    """vLLM validates in pydantic's lax mode: the string/number forms it accepts pass here too,
    custom roles reach the template, and top_logprobs -1 is the whole vocabulary."""
    from minserve.protocol import ServingContext, parse_chat, parse_completion
    from minserve.tokenizer import Tokenizer

    ctx = ServingContext(Tokenizer.from_folder(tiny_model_dir), ["tiny"], 256, 512)
    req = parse_chat({"messages": MSG, "logprobs": "true", "top_logprobs": "3", "n": "2",
                      "temperature": "0.5", "max_tokens": 4.0, "ignore_eos": 1,
                      "stream": "yes", "stream_options": {"include_usage": "on"},
                      "skip_special_tokens": "False", "seed": "7"}, ctx)
    p = req.params
    assert (p.logprobs, p.n, p.temperature, p.max_tokens, p.ignore_eos, p.seed,
            p.skip_special_tokens, req.stream, req.include_usage) == (
        3, 2, 0.5, 4, True, 7, False, True, True)
    custom = parse_chat({"messages": [{"role": "my-custom-role", "content": "x"}, *MSG]}, ctx)
    assert custom.prompts[0]
    ctx.max_logprobs = -1
    whole = parse_chat({"messages": MSG, "logprobs": True, "top_logprobs": -1}, ctx)
    assert whole.params.logprobs == 512 == ctx.vocab_size
    assert parse_completion({"prompt": "hi", "logprobs": -1}, ctx).params.logprobs == 512
