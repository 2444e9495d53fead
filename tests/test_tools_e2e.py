"""Tool calling and reasoning through the official openai SDK against a real server on a tiny
random model. "required" and a named function are enforced by the grammar, so every output must
be a valid call; "auto" and the reasoning split are driven by a regex that makes the random model
write the exact text a real model would (the parsers then see realistic output)."""
from __future__ import annotations

import json
import urllib.request

import jsonschema
import openai
import pytest
from openai.lib.streaming.chat import ChatCompletionStreamState

from minserve.protocol import OpenAIError, ServingContext, parse_chat
from tests.serving import KEY, serving

WEATHER = {"type": "object", "additionalProperties": False,
           "properties": {"location": {"type": "string", "maxLength": 16},
                          "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]}},
           "required": ["location", "unit"]}
TOOLS = [{"type": "function", "function": {
    "name": "get_weather", "description": "Get the current weather in a given location",
    "parameters": WEATHER}},
    {"type": "function", "function": {
        "name": "get_time", "parameters": {"type": "object", "additionalProperties": False,
                                           "properties": {
            "tz": {"type": "string", "enum": ["UTC", "CET"]}}, "required": ["tz"]}}}]
SCHEMAS = {t["function"]["name"]: t["function"]["parameters"] for t in TOOLS}
ASK = [{"role": "user", "content": "What's the weather like in Paris today?"}]
# No whitespace between JSON tokens: a random model would otherwise spend its tokens on it.
COMPACT = {"structured_outputs": {"disable_any_whitespace": True}}


# Qwen3's template (tools, past calls, tool results, enable_thinking), trimmed of what these
# tests do not reach; the arguments of past calls go through `tojson`, as in the real one.
QWEN3_TEMPLATE = """{%- if tools %}{{- '<|im_start|>system\n' }}
{%- if messages[0].role == 'system' %}{{- messages[0].content + '\n\n' }}{%- endif %}
{{- "# Tools\n\nFunction signatures within <tools></tools> XML tags:\n<tools>" }}
{%- for tool in tools %}{{- "\n" }}{{- tool | tojson }}{%- endfor %}
{{- "\n</tools>\n\nReturn each call within <tool_call></tool_call> XML tags.<|im_end|>\n" }}
{%- elif messages[0].role == 'system' %}
{{- '<|im_start|>system\n' + messages[0].content + '<|im_end|>\n' }}
{%- endif %}
{%- for message in messages %}
{%- if message.role == "user" or (message.role == "system" and not loop.first) %}
{{- '<|im_start|>' + message.role + '\n' + message.content + '<|im_end|>\n' }}
{%- elif message.role == "assistant" %}
{{- '<|im_start|>' + message.role + '\n' + message.content }}
{%- if message.tool_calls %}{%- for tool_call in message.tool_calls %}
{%- if tool_call.function %}{%- set tool_call = tool_call.function %}{%- endif %}
{{- '\n<tool_call>\n{"name": "' + tool_call.name + '", "arguments": ' }}
{{- tool_call.arguments | tojson }}{{- '}\n</tool_call>' }}
{%- endfor %}{%- endif %}
{{- '<|im_end|>\n' }}
{%- elif message.role == "tool" %}
{%- if loop.first or (messages[loop.index0 - 1].role != "tool") %}
{{- '<|im_start|>user' }}{%- endif %}
{{- '\n<tool_response>\n' + message.content + '\n</tool_response>' }}
{%- if loop.last or (messages[loop.index0 + 1].role != "tool") %}{{- '<|im_end|>\n' }}{%- endif %}
{%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}{{- '<|im_start|>assistant\n' }}
{%- if enable_thinking is defined and enable_thinking is false %}
{{- '<think>\n\n</think>\n\n' }}{%- endif %}
{%- endif %}"""


@pytest.fixture(scope="module")
def server(tiny_model_dir, tmp_path_factory):
    template = tmp_path_factory.mktemp("qwen3") / "chat_template.jinja"
    template.write_text(QWEN3_TEMPLATE)
    with serving(["serve", tiny_model_dir, "--served-model-name", "tiny",
                  "--api-key", KEY, "--max-model-len", "1024",
                  "--chat-template", str(template),
                  "--enable-auto-tool-choice", "--tool-call-parser", "hermes",
                  "--reasoning-parser", "qwen3"]) as url:
        yield url


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server + "/v1", api_key=KEY, max_retries=0)


def _stream(client, **kw):
    """The SDK's own accumulation of a streamed chat completion."""
    state = ChatCompletionStreamState()
    for chunk in client.chat.completions.create(stream=True, **kw):
        state.handle_chunk(chunk)
    return state.current_completion_snapshot


def _check_calls(message, names=SCHEMAS):
    assert message.tool_calls, message
    for call in message.tool_calls:
        assert call.id.startswith("call_") and call.type == "function"
        assert call.function.name in names
        jsonschema.validate(json.loads(call.function.arguments), SCHEMAS[call.function.name])


@pytest.mark.parametrize("stream", [False, True])
def test_required_tool_choice_always_valid_calls(client, stream):
    complete = 0
    for seed in range(5):
        kw = {"model": "tiny", "messages": ASK, "tools": TOOLS, "tool_choice": "required",
              "seed": seed, "temperature": 1.0, "max_tokens": 200, "extra_body": COMPACT}
        r = _stream(client, **kw) if stream else client.chat.completions.create(**kw)
        ch = r.choices[0]
        if ch.finish_reason == "length":
            continue  # cut off: never a half call, and no raw text in content
        complete += 1
        assert ch.finish_reason == "tool_calls"
        _check_calls(ch.message)
    assert complete >= 3


@pytest.mark.parametrize("stream", [False, True])
def test_named_tool_choice_arguments_validate(client, stream):
    choice = {"type": "function", "function": {"name": "get_weather"}}
    for seed in range(5):
        kw = {"model": "tiny", "messages": ASK, "tools": TOOLS, "tool_choice": choice, "seed": seed,
              "temperature": 1.0, "max_tokens": 120, "extra_body": COMPACT}
        r = _stream(client, **kw) if stream else client.chat.completions.create(**kw)
        ch = r.choices[0]
        assert [c.function.name for c in ch.message.tool_calls] == ["get_weather"]
        if ch.finish_reason == "length":  # cut off: the unfinished call (issue 38), no content
            assert not ch.message.content
            continue
        if ch.finish_reason != "length":
            _check_calls(ch.message, {"get_weather"})
            assert stream or ch.message.content == ""  # vLLM's content for a named call


def test_required_tool_calls_cut_off_by_max_tokens_are_null(client):
    """As vLLM: "required" calls that max_tokens cut off are no call (tool_calls null, never a
    call with broken JSON) and their raw text never leaks into content."""
    r = client.chat.completions.create(model="tiny", messages=ASK, tools=TOOLS,
                                       tool_choice="required", max_tokens=3, extra_body=COMPACT)
    ch = r.choices[0]
    assert ch.finish_reason == "length"
    assert ch.message.tool_calls is None and ch.message.content == "", ch.message
    raw = client.chat.completions.with_raw_response.create(
        model="tiny", messages=ASK, tools=TOOLS, tool_choice="required", max_tokens=3,
        extra_body=COMPACT).http_response.json()
    assert raw["choices"][0]["message"]["tool_calls"] is None


def test_named_tool_call_cut_off_by_max_tokens_comes_back_unfinished(client):
    """issue 38 item 11, as vLLM: the named function was forced, so the output is its call even
    when max_tokens cuts the arguments short: one call, its arguments the text written so far
    (a prefix of valid arguments), content empty; streamed, the SDK builds the same message."""
    kw = {"model": "tiny", "messages": ASK, "tools": TOOLS, "max_tokens": 3, "temperature": 0,
          "tool_choice": {"type": "function", "function": {"name": "get_weather"}},
          "extra_body": COMPACT}
    whole = client.chat.completions.create(**kw).choices[0]
    streamed = _stream(client, **kw).choices[0]
    for ch in (whole, streamed):
        assert ch.finish_reason == "length" and not ch.message.content
        [call] = ch.message.tool_calls
        assert call.function.name == "get_weather" and call.id.startswith("call_")
        assert call.function.arguments.startswith("{")
        with pytest.raises(json.JSONDecodeError):
            json.loads(call.function.arguments)   # unfinished, as the model left it
    assert streamed.message.tool_calls[0].function.arguments == \
        whole.message.tool_calls[0].function.arguments


def test_n_samples_each_constrained(client):
    r = client.chat.completions.create(model="tiny", messages=ASK, tools=TOOLS, n=4, seed=3,
                                       tool_choice={"type": "function",
                                                    "function": {"name": "get_time"}},
                                       max_tokens=100, extra_body=COMPACT)
    assert len(r.choices) == 4
    for ch in r.choices:
        assert ch.finish_reason == "stop"  # OpenAI's reason for a forced named function
        assert ch.message.tool_calls[0].function.name == "get_time"
        assert json.loads(ch.message.tool_calls[0].function.arguments)["tz"] in ("UTC", "CET")


HERMES_CALL = ('<tool_call>\n{"name": "get_weather", "arguments": {"location": "Paris", '
               '"unit": "celsius"}}\n</tool_call>')


def _forced(text: str) -> dict:
    """A regex that only lets the model write `text` (escaped)."""
    return {"guided_regex": "".join("\\" + c if c in r"\.^$*+?()[]{}|/" else c for c in text)}


@pytest.mark.parametrize("stream", [False, True])
def test_auto_hermes_call_with_reasoning(client, stream):
    text = "<think>Paris, so celsius.</think>Let me check." + HERMES_CALL
    kw = {"model": "tiny", "messages": ASK, "tools": TOOLS, "max_tokens": 120,
          "extra_body": _forced(text)}  # no tool_choice: "auto" as the server enables it
    r = _stream(client, **kw) if stream else client.chat.completions.create(**kw)
    ch = r.choices[0]
    assert ch.finish_reason == "tool_calls"
    assert ch.message.content == "Let me check."
    assert ch.message.reasoning_content == "Paris, so celsius." if not stream else True
    (call,) = ch.message.tool_calls
    assert call.function.name == "get_weather"
    assert json.loads(call.function.arguments) == {"location": "Paris", "unit": "celsius"}


def test_streamed_reasoning_deltas(client):
    text = "<think>two plus two</think>four"
    thoughts, content = "", ""
    for chunk in client.chat.completions.create(model="tiny", messages=ASK, stream=True,
                                                max_tokens=60, extra_body=_forced(text)):
        delta = chunk.choices[0].delta
        thoughts += getattr(delta, "reasoning_content", None) or ""
        content += delta.content or ""
    assert (thoughts, content) == ("two plus two", "four")


def test_malformed_call_is_content(client):
    text = '<tool_call>\n{"name": "get_weather", "arguments": {"location": </tool_call>'
    r = client.chat.completions.create(model="tiny", messages=ASK, tools=TOOLS, max_tokens=80,
                                       extra_body=_forced(text))
    ch = r.choices[0]
    assert ch.finish_reason == "stop" and not ch.message.tool_calls
    assert ch.message.content == text


def test_none_renders_tools_but_never_parses(client):
    r = client.chat.completions.create(model="tiny", messages=ASK, tools=TOOLS,
                                       tool_choice="none", max_tokens=80,
                                       extra_body=_forced(HERMES_CALL))
    assert r.choices[0].message.content == HERMES_CALL and not r.choices[0].message.tool_calls


def test_history_with_tool_calls_and_results(client):
    messages = ASK + [
        {"role": "assistant", "content": None, "tool_calls": [{
            "id": "call_1", "type": "function", "function": {
                "name": "get_weather", "arguments": '{"location": "Paris", "unit": "celsius"}'}}]},
        {"role": "tool", "tool_call_id": "call_1", "content": "18 degrees, sunny"}]
    r = client.chat.completions.create(model="tiny", messages=messages, tools=TOOLS,
                                       max_tokens=5)
    assert r.choices[0].finish_reason in ("length", "stop")


@pytest.mark.parametrize("extra, word", [
    ({"tool_choice": "required"}, "tools"),                          # no tools given
    ({"tools": TOOLS, "tool_choice": {"type": "function", "function": {"name": "nope"}}},
     "nope"),
    ({"tools": TOOLS, "tool_choice": "sometimes"}, "tool_choice"),
    ({"tools": TOOLS, "tool_choice": "required", "guided_regex": "a"}, "tool_choice"),
    ({"tools": "get_weather"}, "tools"),
])
def test_bad_tool_requests_are_400(client, extra, word):
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model="tiny", messages=ASK, max_tokens=5, **{
            k: v for k, v in extra.items() if k in ("tools", "tool_choice")},
            extra_body={k: v for k, v in extra.items() if k not in ("tools", "tool_choice")})
    assert word in str(e.value)


def test_auto_needs_the_server_flags(tiny_model_dir):
    """Without --enable-auto-tool-choice, "auto" is a 400 with vLLM's words; absent means none."""
    from minserve.tokenizer import Tokenizer
    ctx = ServingContext(tokenizer=Tokenizer.from_folder(tiny_model_dir), model_names=["tiny"],
                         max_model_len=512, vocab_size=512)
    with pytest.raises(OpenAIError) as e:
        parse_chat({"messages": ASK, "tools": TOOLS, "tool_choice": "auto"}, ctx)
    assert e.value.status == 400 and "--enable-auto-tool-choice" in e.value.message
    req = parse_chat({"messages": ASK, "tools": TOOLS}, ctx)
    assert req.make_parsers is None and req.params.structured is None


@pytest.mark.slow
def test_default_model_seed_guide_examples():
    """The examples of the seed guide, verbatim, on the real default model."""
    with serving(["--max-model-len", "2048"], timeout=600) as url:
        client = openai.OpenAI(base_url=url + "/v1", api_key="none", max_retries=0)
        model = client.models.list().data[0].id
        r = client.chat.completions.create(
            model=model, max_tokens=80,
            messages=[{"role": "user", "content": "Extract data: John Doe is 30 years old."}],
            extra_body=dict(guided_json={"type": "object", "properties": {  # noqa: C408 (the guide's spelling)
                "name": {"type": "string"}, "age": {"type": "integer"}},
                "required": ["name", "age"]}))
        data = json.loads(r.choices[0].message.content)
        assert isinstance(data["name"], str) and isinstance(data["age"], int)
        r = client.chat.completions.create(
            model=model, max_tokens=20,
            messages=[{"role": "user", "content": "Give me an IP address."}],
            extra_body=dict(guided_regex=r"\d{1,3}\.\d{1,3}\.\d{1,3}\.\d{1,3}"))  # noqa: C408 (the guide's spelling)
        assert len(r.choices[0].message.content.split(".")) == 4
        r = client.chat.completions.create(
            model=model, max_tokens=5,
            messages=[{"role": "user", "content": "Classify: 'WIN A FREE PRIZE NOW!!!'"}],
            extra_body=dict(guided_choice=["SPAM", "NOT_SPAM"]))  # noqa: C408 (the guide's spelling)
        assert r.choices[0].message.content in ("SPAM", "NOT_SPAM")
        tools = [{"type": "function", "function": {
            "name": "get_weather", "description": "Get the current weather in a given location",
            "parameters": {"type": "object", "properties": {
                "location": {"type": "string", "description": "City and state, e.g. Paris"},
                "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]}},
                "required": ["location", "unit"]}}}]
        messages = [{"role": "user", "content": "What's the weather like in Paris today?"}]
        for stream in (False, True):
            kw = {"model": model, "messages": messages, "tools": tools, "tool_choice": "required",
                  "max_tokens": 100, "temperature": 0, "parallel_tool_calls": False}
            r = _stream(client, **kw) if stream else client.chat.completions.create(**kw)
            call = r.choices[0].message.tool_calls[0]
            assert call.function.name == "get_weather"
            args = json.loads(call.function.arguments)
            assert args["unit"] in ("celsius", "fahrenheit") and "Paris" in args["location"]


def _post(url: str, path: str, body: dict) -> dict:
    req = urllib.request.Request(url + path, data=json.dumps(body).encode(), headers={
        "Content-Type": "application/json", "Authorization": f"Bearer {KEY}"})
    with urllib.request.urlopen(req, timeout=30) as r:
        return json.loads(r.read())


def _rendered(url: str, **body) -> str:
    """The prompt text the server renders for a chat request (its /tokenize, then decoded)."""
    ids = _post(url, "/tokenize", {"model": "tiny", **body})["tokens"]
    return _post(url, "/detokenize", {"model": "tiny", "tokens": ids})["prompt"]


HISTORY = ASK + [
    {"role": "assistant", "content": None, "tool_calls": [
        {"id": "call_1", "type": "function", "function": {
            "name": "get_weather", "arguments": '{"location": "Paris", "unit": "celsius"}'}},
        {"id": "call_2", "type": "function", "function": {
            "name": "get_time", "arguments": '{"tz": "CET"}'}}]},
    {"role": "tool", "tool_call_id": "call_1", "content": "18 degrees, sunny"},
    {"role": "tool", "tool_call_id": "call_2", "content": "14:05"}]


def test_qwen3_template_gets_tools_calls_results_and_thinking_switch(server):
    text = _rendered(server, messages=HISTORY, tools=TOOLS,
                     chat_template_kwargs={"enable_thinking": False})
    assert json.dumps(TOOLS[0]) in text  # the tool definitions, as the template writes them
    # Past arguments arrive as a dict (tojson writes an object, not a quoted string).
    assert ('<tool_call>\n{"name": "get_weather", "arguments": {"location": "Paris", '
            '"unit": "celsius"}}\n</tool_call>') in text
    assert '{"name": "get_time", "arguments": {"tz": "CET"}}' in text
    assert "user\n<tool_response>\n18 degrees, sunny\n</tool_response>\n<tool_response>\n14:05" \
        in text
    assert text.endswith("assistant\n<think>\n\n</think>\n\n")
    assert not _rendered(server, messages=ASK).endswith("</think>\n\n")


def test_thinking_off_answer_is_content(client):
    r = client.chat.completions.create(model="tiny", messages=ASK, max_tokens=40,
                                       extra_body={"chat_template_kwargs": {
                                           "enable_thinking": False}, **_forced("Sunny.")})
    msg = r.choices[0].message
    assert msg.content == "Sunny." and getattr(msg, "reasoning_content", None) is None


def test_parallel_tool_calls_false_gives_one_call(client):
    counts = []  # (the "required" tests above run with the default, parallel calls allowed)
    for seed in range(3):
        r = client.chat.completions.create(model="tiny", messages=ASK, tools=TOOLS, seed=seed,
                                           tool_choice="required", temperature=1.0,
                                           parallel_tool_calls=False, max_tokens=120,
                                           extra_body=COMPACT)
        if r.choices[0].finish_reason != "length":
            _check_calls(r.choices[0].message)
            counts.append(len(r.choices[0].message.tool_calls))
    assert counts and all(c == 1 for c in counts)


# Llama 3.1's template: tools in the first user message, past calls as {"name", "parameters"},
# tool results under the ipython role.
LLAMA31_TEMPLATE = """{{- bos_token }}
{%- if messages[0].role == 'system' %}{%- set system_message = messages[0].content|trim %}
{%- set messages = messages[1:] %}{%- else %}{%- set system_message = "" %}{%- endif %}
{{- "<|start_header_id|>system<|end_header_id|>\\n\\n" }}
{%- if tools is not none %}{{- "Environment: ipython\\n" }}{%- endif %}
{{- system_message }}{{- "<|eot_id|>" }}
{%- if tools is not none %}
{%- set first_user_message = messages[0].content|trim %}{%- set messages = messages[1:] %}
{{- '<|start_header_id|>user<|end_header_id|>\\n\\n' -}}
{{- 'Respond with a JSON for a function call, as {"name": function name, "parameters": \
dictionary of argument name and its value}.\\n\\n' }}
{%- for t in tools %}{{- t | tojson(indent=4) }}{{- "\\n\\n" }}{%- endfor %}
{{- first_user_message + "<|eot_id|>"}}
{%- endif %}
{%- for message in messages %}
{%- if not (message.role == 'ipython' or message.role == 'tool' or 'tool_calls' in message) %}
{{- '<|start_header_id|>' + message.role + '<|end_header_id|>\\n\\n' + message.content|trim \
+ '<|eot_id|>' }}
{%- elif 'tool_calls' in message %}
{%- set tool_call = message.tool_calls[0].function %}
{{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' -}}
{{- '{"name": "' + tool_call.name + '", "parameters": ' }}{{- tool_call.arguments | tojson }}
{{- "}<|eot_id|>" }}
{%- else %}
{{- "<|start_header_id|>ipython<|end_header_id|>\\n\\n" + message.content + "<|eot_id|>" }}
{%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}{{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}
{%- endif %}"""


@pytest.fixture(scope="module")
def llama_server(tiny_model_dir, tmp_path_factory):
    template = tmp_path_factory.mktemp("llama31") / "chat_template.jinja"
    template.write_text(LLAMA31_TEMPLATE)
    with serving(["serve", tiny_model_dir, "--served-model-name", "tiny",
                  "--api-key", KEY, "--max-model-len", "1024",
                  "--chat-template", str(template),
                  "--enable-auto-tool-choice", "--tool-call-parser", "llama3_json"]) as url:
        yield url


def test_llama31_template_and_llama3_json_calls(llama_server):
    # One tool only: the tiny tokenizer spends a token per ~2 characters of indented JSON.
    text = _rendered(llama_server, messages=HISTORY[:3], tools=TOOLS[1:])
    assert json.dumps(TOOLS[1], indent=4) in text
    assert ('<|start_header_id|>assistant<|end_header_id|>\n\n{"name": "get_weather", '
            '"parameters": {"location": "Paris", "unit": "celsius"}}<|eot_id|>') in text
    assert "<|start_header_id|>ipython<|end_header_id|>\n\n18 degrees, sunny<|eot_id|>" in text
    client = openai.OpenAI(base_url=llama_server + "/v1", api_key=KEY, max_retries=0)
    out = ('<|python_tag|>{"name": "get_time", "parameters": {"tz": "UTC"}}; '
           '{"name": "get_time", "parameters": {"tz": "CET"}}')
    for stream in (False, True):
        kw = {"model": "tiny", "messages": ASK, "tools": TOOLS[1:], "max_tokens": 150,
              "extra_body": _forced(out)}
        r = _stream(client, **kw) if stream else client.chat.completions.create(**kw)
        ch = r.choices[0]
        assert ch.finish_reason == "tool_calls" and not ch.message.content
        assert [(c.function.name, json.loads(c.function.arguments))
                for c in ch.message.tool_calls] == [
            ("get_time", {"tz": "UTC"}), ("get_time", {"tz": "CET"})]
        assert all(c.id.startswith("call_") for c in ch.message.tool_calls)
