"""Behaviours a client written for vLLM relies on (issues 20 and 38), through the official openai
SDK against a real `python -m minserve` on the tiny model: lenient fields, vLLM's error words,
how streams end, vLLM's extra routes, flags, usage and metrics. The flag-less defaults (and
VLLM_ALLOW_LONG_MAX_MODEL_LEN) run in-process."""
from __future__ import annotations

import json
import logging
import pathlib
import re
import subprocess
import sys
import urllib.error
import urllib.request
import uuid

import openai
import pytest
import torch

from minserve.config import ConfigError, EngineConfig, ModelConfig
from minserve.engine.builder import resolve_limits
from minserve.server import ServerConfig, create_app
from minserve.tokenizer import Tokenizer
from tests.asgi import call
from tests.serving import KEY, metric, real_app, run, serving

HI = [{"role": "user", "content": "Hi"}]
FLAGS = ["--enable-tokenizer-info-endpoint", "--enable-server-load-tracking",
         "--enable-prompt-tokens-details", "--enable-force-include-usage", "--max-logprobs", "-1",
         "--enable-chunked-prefill", "--structured-outputs-config.backend", "guidance",
         "--show-hidden-metrics-for-version", "0.10", "--disable-frontend-multiprocessing",
         "--api-server-count", "1"]


@pytest.fixture(scope="module")
def server(tiny_model_dir):
    with serving(["serve", tiny_model_dir, "--served-model-name", "tiny", "--api-key", KEY,
                  "--kv-cache-memory", "8MiB", "--max-model-len", "512", *FLAGS]) as url:
        yield url


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server + "/v1", api_key=KEY, max_retries=0)


def _get(url: str, auth: bool = True) -> tuple[int, bytes]:
    req = urllib.request.Request(url, headers={"Authorization": f"Bearer {KEY}"} if auth else {})
    try:
        with urllib.request.urlopen(req, timeout=30) as r:
            return r.status, r.read()
    except urllib.error.HTTPError as e:
        return e.code, e.read()


def _post(url: str, body: dict) -> tuple[int, dict]:
    req = urllib.request.Request(url, data=json.dumps(body).encode(), method="POST", headers={
        "Authorization": f"Bearer {KEY}", "Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=60) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


# ---------------------------------------------------------------- item 7: error words
def test_error_messages_carry_vllms_values(client):
    with pytest.raises(openai.BadRequestError, match="Token id 100000 is out of vocabulary"):
        client.completions.create(model="tiny", prompt=[1, 2, 100000], max_tokens=2)
    with pytest.raises(openai.BadRequestError, match="The decoder prompt cannot be empty"):
        client.completions.create(model="tiny", prompt=[[]], max_tokens=2)
    with pytest.raises(openai.BadRequestError, match="stop_token_ids.*Token id 7777"):
        client.chat.completions.create(model="tiny", messages=HI, max_tokens=2,
                                       extra_body={"stop_token_ids": [3, 7777]})


# ---------------------------------------------------------------- item 2: lenient fields
def test_lenient_fields_custom_roles_and_whole_vocabulary_logprobs(client):
    r = client.chat.completions.create(
        model="tiny", max_tokens=2, messages=[{"role": "my-custom-role", "content": "x"}, *HI],
        extra_body={"logprobs": "true", "top_logprobs": "2", "temperature": "0"})
    assert len(r.choices[0].logprobs.content[0].top_logprobs) == 2
    # --max-logprobs -1 here: -1 is every token of the vocabulary
    r = client.chat.completions.create(model="tiny", messages=HI, max_tokens=1, logprobs=True,
                                       top_logprobs=-1)
    assert len(r.choices[0].logprobs.content[0].top_logprobs) == 512
    with pytest.raises(openai.BadRequestError, match="n"):
        client.chat.completions.create(model="tiny", messages=HI, extra_body={"n": "two"})


# ---------------------------------------------------------------- item 3: how streams end
def test_stream_stopped_by_eos_ends_with_empty_content(client, tiny_model_dir):
    eos = Tokenizer.from_folder(tiny_model_dir).eos_token_id
    chunks = list(client.chat.completions.create(
        model="tiny", messages=HI, max_tokens=5, stream=True, logit_bias={str(eos): 100}))
    last = [c for c in chunks if c.choices][-1]
    assert last.choices[0].finish_reason == "stop"
    assert last.choices[0].delta.content == ""
    text = ""
    for c in chunks:
        for ch in c.choices:
            text += ch.delta.content  # what vLLM clients do; never None here
    assert text == ""


# ---------------------------------------------------------------- item 5: routes and flags
def test_batch_chat_route(client, server):
    status, body = _post(server + "/v1/chat/completions/batch", {
        "model": "tiny", "max_tokens": 3, "temperature": 0, "ignore_eos": True,
        "messages": [HI, [{"role": "user", "content": "Tell me more"}]]})
    assert status == 200, body
    assert body["object"] == "chat.completion" and [c["index"] for c in body["choices"]] == [0, 1]
    one = client.chat.completions.create(model="tiny", messages=HI, max_tokens=3, temperature=0,
                                         extra_body={"ignore_eos": True})
    assert body["choices"][0]["message"]["content"] == one.choices[0].message.content
    assert body["usage"]["completion_tokens"] == 6
    status, err = _post(server + "/v1/chat/completions/batch", {"messages": HI})
    assert status == 400 and "conversations" in err["error"]["message"]


def test_invocations_routes_by_body(server):
    status, chat = _post(server + "/invocations", {"messages": HI, "max_tokens": 2})
    assert status == 200 and chat["object"] == "chat.completion"
    status, comp = _post(server + "/invocations", {"prompt": "Hi", "max_tokens": 2})
    assert status == 200 and comp["object"] == "text_completion"
    status, err = _post(server + "/invocations", {"foo": 1})
    assert status == 400 and "suitable handler" in err["error"]["message"]


def test_tokenizer_info_and_load(server):
    status, body = _get(server + "/tokenizer_info")
    info = json.loads(body)
    assert status == 200 and info["eos_token"] == "<|im_end|>" and "chat_template" in info
    status, body = _get(server + "/load")
    assert status == 200 and json.loads(body) == {"server_load": 0}


def test_force_include_usage_and_prompt_tokens_details(client):
    chunks = list(client.chat.completions.create(model="tiny", messages=HI, max_tokens=2,
                                                 stream=True))
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 2
    r = client.completions.create(model="tiny", prompt="Hi", max_tokens=2)
    assert isinstance(r.usage.prompt_tokens_details.cached_tokens, int)


def test_api_server_count_above_one_is_a_clear_error(tiny_model_dir):
    """issue 38 item 6: the module's server runs with --api-server-count 1; more is a start-up
    error that says what is supported (one front end, in the engine's process)."""
    out = subprocess.run([sys.executable, "-m", "minserve", tiny_model_dir,
                          "--api-server-count", "2"], capture_output=True, text=True, timeout=60)
    assert out.returncode == 2 and "--api-server-count 2" in out.stderr
    assert "(use 1)" in out.stderr


# ---------------------------------------------------------------- item 6: metrics
def test_vllm_dashboard_metrics(client, server):
    client.completions.create(model="tiny", prompt="Hi", max_tokens=3, n=2)
    status, body = _get(server + "/metrics")
    text = body.decode()
    assert status == 200
    for line in ('vllm:iteration_tokens_total_bucket{le="+Inf",model_name="tiny"}',
                 'vllm:num_requests_waiting_by_reason{model_name="tiny",reason="capacity"} 0.0',
                 'vllm:num_requests_waiting_by_reason{model_name="tiny",reason="deferred"} 0.0',
                 'vllm:request_params_n_bucket{le="2.0",model_name="tiny"}',
                 'vllm:request_params_max_tokens_bucket{le="5.0",model_name="tiny"}',
                 'vllm:request_num_preemptions_bucket{le="0.0",model_name="tiny"}'):
        assert line in text, line
    cache = next(ln for ln in text.splitlines() if ln.startswith("vllm:cache_config_info{"))
    for label in ("block_size=", "num_gpu_blocks=", "kv_cache_size_tokens=",
                  "kv_cache_max_concurrency="):
        assert label in cache
    assert cache.endswith(" 1.0")
    steps = next(ln for ln in text.splitlines()
                 if ln.startswith("vllm:iteration_tokens_total_count"))
    assert float(steps.split()[-1]) >= 3


# ---------------------------------------------------------------- defaults, without the flags
def test_defaults_match_vllm_without_the_flags(tiny_model_dir):
    async def fn(app):
        full = await call(app, "POST", "/v1/completions", {"prompt": "Hi", "max_tokens": 2})
        streamed = await call(app, "POST", "/v1/chat/completions",
                              {"messages": HI, "max_tokens": 2, "stream": True})
        load = await call(app, "GET", "/load")
        info = await call(app, "GET", "/tokenizer_info")
        capped = await call(app, "POST", "/v1/chat/completions", {
            "messages": HI, "logprobs": True, "top_logprobs": -1})
        capped_prompt = await call(app, "POST", "/v1/completions", {
            "prompt": "Hi", "max_tokens": 1, "prompt_logprobs": -1})
        assert capped_prompt.status == 400, capped_prompt.body
        assert "max allowed: 20" in capped_prompt.json()["error"]["message"]
        return full, streamed, load, info, capped

    full, streamed, load, info, capped = run(real_app(tiny_model_dir), fn)
    assert full.json()["usage"]["prompt_tokens_details"] is None
    assert full.json()["usage"]["cache_read_input_tokens"] == 0  # always there (issue 38)
    assert all("usage" not in e for e in streamed.events() if isinstance(e, dict))
    assert load.status == 404 and info.status == 404
    assert capped.status == 400 and "max allowed: 20" in capped.json()["error"]["message"]


# ---------------------------------------------------------------- item 4: vLLM's extra fields
def test_prompt_logprobs_completions_and_chat(client, tiny_model_dir):
    ids = Tokenizer.from_folder(tiny_model_dir).encode("The quick brown fox")
    r = client.completions.create(model="tiny", prompt=ids, max_tokens=1,
                                  extra_body={"prompt_logprobs": 2})
    plp = r.choices[0].prompt_logprobs
    assert len(plp) == len(ids) and plp[0] is None
    for tid, pos in zip(ids[1:], plp[1:], strict=True):
        assert str(tid) in pos and 2 <= len(pos) <= 3
        assert pos[str(tid)]["rank"] >= 1 and pos[str(tid)]["logprob"] <= 0
        assert {1, 2} <= {v["rank"] for v in pos.values()}  # the top 2, by rank
    chat = client.chat.completions.create(model="tiny", messages=HI, max_tokens=1,
                                          extra_body={"prompt_logprobs": 0})
    assert chat.prompt_logprobs[0] is None and len(chat.prompt_logprobs) > 1
    raw = client.chat.completions.with_raw_response.create(
        model="tiny", messages=HI, max_tokens=1).http_response.json()
    assert raw["prompt_logprobs"] is None and raw["choices"][0]["token_ids"] is None


def test_return_token_ids_streamed_and_not(client, tiny_model_dir):
    ids = Tokenizer.from_folder(tiny_model_dir).encode("Hello there")
    kw = {"model": "tiny", "prompt": "Hello there", "max_tokens": 5, "temperature": 0,
          "extra_body": {"return_token_ids": True, "ignore_eos": True}}
    r = client.completions.create(**kw)
    ch = r.choices[0]
    assert ch.prompt_token_ids == ids and len(ch.token_ids) == 5 == r.usage.completion_tokens
    streamed, prompt_ids = [], None
    for chunk in client.completions.create(stream=True, **kw):
        for c in chunk.choices:
            streamed += c.model_extra.get("token_ids") or []
            prompt_ids = prompt_ids or c.model_extra.get("prompt_token_ids")
    assert streamed == ch.token_ids and prompt_ids == ids
    chat = client.chat.completions.create(model="tiny", messages=HI, max_tokens=3,
                                          extra_body={"return_token_ids": True})
    assert chat.prompt_token_ids and \
        len(chat.choices[0].token_ids) == chat.usage.completion_tokens
    s_ids, s_prompt = [], None
    for chunk in client.chat.completions.create(model="tiny", messages=HI, max_tokens=3,
                                                stream=True, temperature=0,
                                                extra_body={"return_token_ids": True,
                                                            "ignore_eos": True}):
        s_prompt = s_prompt or chunk.model_extra.get("prompt_token_ids")
        for c in chunk.choices:
            s_ids += c.model_extra.get("token_ids") or []
    assert s_prompt == chat.prompt_token_ids and len(s_ids) == 3


def test_truncate_prompt_tokens_left_and_right(client, tiny_model_dir):
    ids = Tokenizer.from_folder(tiny_model_dir).encode("one two three four five six seven " * 4)
    assert len(ids) > 12
    kw = {"model": "tiny", "max_tokens": 3, "temperature": 0, "extra_body": {"ignore_eos": True}}
    for side, kept in (("left", ids[-8:]), ("right", ids[:8])):
        cut = client.completions.create(prompt=ids, **{**kw, "extra_body": {
            "ignore_eos": True, "truncate_prompt_tokens": 8, "truncation_side": side}})
        same = client.completions.create(prompt=kept, **kw)
        assert cut.usage.prompt_tokens == 8 and cut.choices[0].text == same.choices[0].text
    long = client.completions.create(model="tiny", prompt=ids * 40, max_tokens=2,  # > 512
                                     extra_body={"truncate_prompt_tokens": 100})
    assert long.usage.prompt_tokens == 100
    with pytest.raises(openai.BadRequestError, match="truncation_side"):
        client.completions.create(prompt=ids, model="tiny",
                                  extra_body={"truncate_prompt_tokens": 4,
                                              "truncation_side": "middle"})


def test_return_tokens_as_token_ids(client):
    r = client.completions.create(model="tiny", prompt="Hi", max_tokens=2, logprobs=1,
                                  extra_body={"return_tokens_as_token_ids": True})
    assert all(t.startswith("token_id:") for t in r.choices[0].logprobs.tokens)
    chat = client.chat.completions.create(model="tiny", messages=HI, max_tokens=2, logprobs=True,
                                          top_logprobs=1,
                                          extra_body={"return_tokens_as_token_ids": True})
    lp = chat.choices[0].logprobs.content[0]
    assert lp.token.startswith("token_id:") and lp.top_logprobs[0].token.startswith("token_id:")


def test_logprob_token_ids(client):
    """issue 38 item 2: at every generated position top_logprobs is the sampled token, then the
    asked ids (no natural top-k, whatever top_logprobs says), their logprobs those of the
    whole-vocabulary list of the same greedy run."""
    body = {"ignore_eos": True, "return_tokens_as_token_ids": True}
    kw = {"model": "tiny", "messages": HI, "max_tokens": 3, "temperature": 0}
    whole = client.chat.completions.create(**kw, logprobs=True, top_logprobs=-1,
                                           extra_body=body)
    ref = [{t.token: t.logprob for t in pos.top_logprobs}
           for pos in whole.choices[0].logprobs.content]
    sampled = [pos.token for pos in whole.choices[0].logprobs.content]
    asked = [5, 7]
    r = client.chat.completions.create(**kw, logprobs=True, top_logprobs=5, extra_body={
        **body, "logprob_token_ids": [*asked, int(sampled[1].split(":")[1])]})
    assert len(r.choices[0].logprobs.content) == 3
    for i, pos in enumerate(r.choices[0].logprobs.content):
        want = list(dict.fromkeys([sampled[i], *(f"token_id:{t}" for t in asked), sampled[1]]))
        assert [t.token for t in pos.top_logprobs] == want
        for t in pos.top_logprobs:
            assert abs(t.logprob - ref[i][t.token]) < 1e-4
    comp = client.completions.create(model="tiny", prompt="Hi", max_tokens=2, logprobs=3,
                                     extra_body={"logprob_token_ids": [9],
                                                 "return_tokens_as_token_ids": True})
    lps = comp.choices[0].logprobs
    for tok, top in zip(lps.tokens, lps.top_logprobs, strict=True):
        assert list(top) == list(dict.fromkeys([tok, "token_id:9"]))
    with pytest.raises(openai.BadRequestError, match="logprob_token_ids"):
        client.completions.create(model="tiny", prompt="Hi",
                                  extra_body={"logprob_token_ids": [10**6]})


def test_beam_search_through_the_sdk(client):
    kw = {"model": "tiny", "prompt": "The quick brown", "max_tokens": 4, "n": 3,
          "extra_body": {"use_beam_search": True, "ignore_eos": True, "length_penalty": 0.8}}
    r = client.completions.create(**kw)
    texts = [c.text for c in r.choices]
    assert len(texts) == 3 and len(set(texts)) == 3  # three distinct beams, best first
    assert r.usage.completion_tokens == 12
    streamed = {}
    for chunk in client.completions.create(stream=True, **kw):
        for c in chunk.choices:
            streamed[c.index] = streamed.get(c.index, "") + c.text
    assert [streamed[i] for i in range(3)] == texts
    greedy = client.completions.create(model="tiny", prompt="The quick brown", max_tokens=4,
                                       temperature=0, extra_body={"ignore_eos": True})
    one = client.completions.create(**{**kw, "n": 1})
    assert one.choices[0].text == greedy.choices[0].text
    chat = client.chat.completions.create(model="tiny", messages=HI, max_tokens=3, n=2,
                                          extra_body={"use_beam_search": True,
                                                      "early_stopping": "never"})
    assert len(chat.choices) == 2


def test_skip_tokenizer_init_token_ids_in_and_out(tiny_model_dir):
    """--skip-tokenizer-init: no tokenizer is loaded; token-id prompts give token_ids (and
    empty text); what needs the tokenizer is a clear 400."""
    ids = Tokenizer.from_folder(tiny_model_dir).encode("Hello there")
    with serving(["serve", tiny_model_dir, "--served-model-name", "tiny",
                  "--kv-cache-memory", "4MiB", "--max-model-len", "256",
                  "--skip-tokenizer-init"]) as url:
        c = openai.OpenAI(base_url=url + "/v1", api_key="x", max_retries=0)
        r = c.completions.create(model="tiny", prompt=ids, max_tokens=4, temperature=0,
                                 logprobs=1, extra_body={"ignore_eos": True})
        ch = r.choices[0]
        assert ch.text == "" and len(ch.token_ids) == 4 and ch.prompt_token_ids == ids
        assert ch.logprobs.tokens == [f"token_id:{t}" for t in ch.token_ids]
        for bad in ({"prompt": "Hello"}, {"prompt": ids, "stop": ["x"]}):
            with pytest.raises(openai.BadRequestError, match="tokenizer"):
                c.completions.create(model="tiny", max_tokens=2, **bad)
        # issue 38 item 5: echo gives the prompt back as its token ids (no text to echo)
        echoed = c.completions.create(model="tiny", prompt=ids, max_tokens=2, echo=True,
                                      temperature=0, extra_body={"ignore_eos": True})
        ch = echoed.choices[0]
        assert ch.prompt_token_ids == ids and len(ch.token_ids) == 2 and ch.text == ""
        off = c.completions.create(model="tiny", prompt=ids, max_tokens=2, echo=True,
                                   extra_body={"return_token_ids": False})
        assert off.choices[0].prompt_token_ids == ids
        streamed = [ch for chunk in c.completions.create(model="tiny", prompt=ids, max_tokens=2,
                                                         echo=True, stream=True)
                    for ch in chunk.choices]
        assert streamed[0].model_extra["prompt_token_ids"] == ids
        with pytest.raises(openai.BadRequestError, match="skip-tokenizer-init"):
            c.chat.completions.create(model="tiny", messages=HI)
        status, _ = _post(url + "/tokenize", {"prompt": "x"})
        assert status == 400


# ---------------------------------------------------------------- issue 38: the last twelve
def test_usage_reports_cache_read_input_tokens(client):
    """item 1: prefix-cache hits as cache_read_input_tokens, beside
    prompt_tokens_details.cached_tokens, whole and streamed, chat and completions."""
    salt = uuid.uuid4().hex  # apart from every earlier request's blocks
    words = " ".join(f"w{i}" for i in range(40))
    kw = {"model": "tiny", "max_tokens": 2, "extra_body": {"cache_salt": salt}}
    chat = {**kw, "messages": [{"role": "user", "content": words}]}
    first = client.chat.completions.create(**chat)
    assert first.usage.cache_read_input_tokens == 0
    second = client.chat.completions.create(**chat)
    hits = second.usage.cache_read_input_tokens
    assert hits > 0 and hits == second.usage.prompt_tokens_details.cached_tokens
    last = list(client.chat.completions.create(stream=True, **chat))[-1]
    assert last.choices == [] and last.usage.cache_read_input_tokens == hits
    comp = client.completions.create(prompt=words, **kw)
    assert comp.usage.cache_read_input_tokens == comp.usage.prompt_tokens_details.cached_tokens
    comp = client.completions.create(prompt=words, **kw)
    assert comp.usage.cache_read_input_tokens > 0


def test_logprob_token_ids_listed_after_the_sampled_token(client):
    """item 2 (the whole check is test_logprob_token_ids above): top_logprobs=5 asks for no
    natural top-5 once logprob_token_ids is given."""
    r = client.chat.completions.create(model="tiny", messages=HI, max_tokens=1, logprobs=True,
                                       top_logprobs=5, extra_body={
                                           "logprob_token_ids": [5], "temperature": 0,
                                           "return_tokens_as_token_ids": True})
    pos = r.choices[0].logprobs.content[0]
    assert [t.token for t in pos.top_logprobs] == list(dict.fromkeys([pos.token, "token_id:5"]))


def test_prompt_logprobs_of_the_whole_vocabulary(client, tiny_model_dir):
    """item 3: prompt_logprobs -1 under --max-logprobs -1 (the default cap's 400 is in
    test_defaults_match_vllm_without_the_flags)."""
    ids = Tokenizer.from_folder(tiny_model_dir).encode("The quick brown fox")
    r = client.completions.create(model="tiny", prompt=ids, max_tokens=1,
                                  extra_body={"prompt_logprobs": -1})
    plp = r.choices[0].prompt_logprobs
    assert len(plp) == len(ids) and plp[0] is None
    for tid, pos in zip(ids[1:], plp[1:], strict=True):
        assert len(pos) == 512 and pos[str(tid)]["rank"] >= 1   # the model's vocabulary


def test_force_include_usage_puts_usage_on_every_chunk(client):
    """item 4: --enable-force-include-usage, whatever stream_options says: every chunk has
    usage, growing with each token, and the last (no choices) has the totals."""
    for options in ({}, {"stream_options": {"include_usage": False}}):
        for create, what in ((client.chat.completions.create, {"messages": HI}),
                             (client.completions.create, {"prompt": "Hi"})):
            chunks = list(create(model="tiny", max_tokens=4, stream=True, temperature=0,
                                 extra_body={"ignore_eos": True}, **what, **options))
            assert all(c.usage is not None for c in chunks)
            assert all(c.usage.total_tokens == c.usage.prompt_tokens + c.usage.completion_tokens
                       for c in chunks)
            counts = [c.usage.completion_tokens for c in chunks if c.choices]
            assert counts == sorted(counts) and counts[-1] == 4
            assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 4


def test_iteration_tokens_count_every_prompt_and_sampled_token(client, server):
    """item 7: a request adds its prompt plus every token it sampled to
    vllm:iteration_tokens_total's sum (the token sampled at the end of the prompt included),
    whole or streamed, in one chunk or several, cached or not."""
    name = "vllm:iteration_tokens_total_sum"
    long_prompt = [100 + i % 200 for i in range(300)]  # > the CPU's 128 per step: chunked
    for prompt, max_tokens in (([100 + i for i in range(10)], 9), (long_prompt, 3),
                               (long_prompt, 3)):   # the second: its blocks are cached
        for stream in (False, True):
            before = metric(server, name)
            out = client.completions.create(model="tiny", prompt=prompt, max_tokens=max_tokens,
                                            stream=stream, temperature=0,
                                            extra_body={"ignore_eos": True})
            if stream:
                list(out)
            assert metric(server, name) - before == len(prompt) + max_tokens


def test_seed_out_of_int64_in_vllms_words(client):
    """item 8: pydantic's bound words and the seed as sent (never a rounded float)."""
    for seed, kind in ((-2**63 - 1, "greater_than_equal"), (2**63, "less_than_equal"),
                       (-10**30, "greater_than_equal")):
        with pytest.raises(openai.BadRequestError) as e:
            client.chat.completions.create(model="tiny", messages=HI, max_tokens=1, seed=seed)
        assert kind in str(e.value) and str(seed) in str(e.value), str(e.value)
        assert "e+" not in str(e.value)
    for seed in (-2**63, 2**63 - 1):   # the bounds are seeds
        client.chat.completions.create(model="tiny", messages=HI, max_tokens=1, seed=seed)


def test_empty_prompt_in_vllms_words(client, server):
    """item 9: a missing, empty or empty-list prompt; prompt_embeds are not taken here."""
    for prompt in ("", []):
        with pytest.raises(openai.BadRequestError, match=re.escape(
                "Either prompt or prompt_embeds must be provided and non-empty.")):
            client.completions.create(model="tiny", prompt=prompt, max_tokens=2)
    status, err = _post(server + "/v1/completions", {"prompt": None, "prompt_embeds": []})
    assert status == 400 and err["error"]["message"].startswith("Either prompt or prompt_embeds")
    status, err = _post(server + "/v1/completions", {"prompt": "Hi", "prompt_embeds": "AAAA"})
    assert status == 400 and err["error"]["param"] == "prompt_embeds"


def test_null_service_tier_and_system_fingerprint(server):
    """item 10: the whole bodies carry both keys, null, as vLLM sends them (a client comparing
    key sets, /invocations against the route, sees OpenAI's fields)."""
    chat = {"model": "tiny", "messages": HI, "max_tokens": 1}
    comp = {"model": "tiny", "prompt": "Hi", "max_tokens": 1}
    for path, body in (("/v1/chat/completions", chat), ("/v1/completions", comp)):
        status, raw = _post(server + path, body)
        assert status == 200 and raw["system_fingerprint"] is None
        assert raw["service_tier"] is None
        assert {"id", "object", "created", "model", "choices", "usage"} <= set(raw)
        status, invoked = _post(server + "/invocations", body)
        assert set(invoked) == set(raw)


def test_long_max_model_len_with_vllms_variable(tiny_model_factory, monkeypatch, caplog):
    """item 12: --max-model-len past max_position_embeddings is a start-up error naming
    VLLM_ALLOW_LONG_MAX_MODEL_LEN; with it set the server starts, warns, and a prompt past
    the model's positions generates."""
    folder = tiny_model_factory(max_position_embeddings=64)
    monkeypatch.delenv("VLLM_ALLOW_LONG_MAX_MODEL_LEN", raising=False)
    cfg = EngineConfig(model=folder, kv_cache_memory=4 << 20, max_model_len=160)
    with pytest.raises(ConfigError, match="VLLM_ALLOW_LONG_MAX_MODEL_LEN=1"):
        resolve_limits(cfg, ModelConfig.from_dict(json.loads(
            pathlib.Path(folder, "config.json").read_text())), torch.device("cpu"))
    monkeypatch.setenv("VLLM_ALLOW_LONG_MAX_MODEL_LEN", "1")

    async def fn(app):
        return await call(app, "POST", "/v1/completions", {
            "prompt": list(range(100, 200)), "max_tokens": 8, "ignore_eos": True})

    with caplog.at_level(logging.WARNING, logger="minserve.engine"):
        # in-process, where caplog sees the engine's warning
        r = run(create_app(cfg, ServerConfig(served_model_names=["tiny"], engine_process=False)),
                fn)
    assert r.status == 200, r.body
    assert r.json()["usage"] == {**r.json()["usage"], "prompt_tokens": 100,
                                 "completion_tokens": 8}
    assert "VLLM_ALLOW_LONG_MAX_MODEL_LEN" in caplog.text
