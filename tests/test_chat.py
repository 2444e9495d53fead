"""Chat templates: ChatML, Llama-3 and Qwen/Hermes (tools) templates rendered like transformers,
continue_final_message, content parts, errors, and the sandbox."""
# ruff: noqa: E501 - the templates below are kept as their authors write them
from __future__ import annotations

import copy
import datetime
import json
import os

import pytest

from minserve.chat import (
    ChatContentError,
    ChatTemplateError,
    detect_content_format,
    normalize_messages,
    render_chat_template,
)
from minserve.tokenizer import Tokenizer
from tests.tiny import CHATML, make_tokenizer_json

LLAMA3 = """{{- bos_token }}
{%- if not date_string is defined %}
    {%- set date_string = strftime_now("%d %b %Y") %}
{%- endif %}
{%- if messages[0]['role'] == 'system' %}
    {%- set system_message = messages[0]['content']|trim %}
    {%- set messages = messages[1:] %}
{%- else %}
    {%- set system_message = "" %}
{%- endif %}
{{- "<|start_header_id|>system<|end_header_id|>\\n\\n" }}
{{- "Cutting Knowledge Date: December 2023\\n" }}
{{- "Today Date: " + date_string + "\\n\\n" }}
{{- system_message }}
{{- "<|eot_id|>" }}
{%- for message in messages %}
    {%- if not (message.role == 'user' or message.role == 'assistant') %}
        {{- raise_exception("Only user and assistant roles are supported after the system message") }}
    {%- endif %}
    {{- '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n'+ message['content'] | trim + '<|eot_id|>' }}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}
{%- endif %}
"""

QWEN_TOOLS = """{%- if tools %}
    {{- '<|im_start|>system\\n' }}
    {%- if messages[0]['role'] == 'system' %}
        {{- messages[0]['content'] }}
    {%- else %}
        {{- 'You are a helpful assistant.' }}
    {%- endif %}
    {{- "\\n\\n# Tools\\n\\nYou are provided with function signatures within <tools></tools> XML tags:\\n<tools>" }}
    {%- for tool in tools %}
        {{- "\\n" }}
        {{- tool | tojson }}
    {%- endfor %}
    {{- "\\n</tools>\\n\\nFor each function call, return a json object within <tool_call></tool_call> XML tags.<|im_end|>\\n" }}
{%- else %}
    {%- if messages[0]['role'] == 'system' %}
        {{- '<|im_start|>system\\n' + messages[0]['content'] + '<|im_end|>\\n' }}
    {%- else %}
        {{- '<|im_start|>system\\nYou are a helpful assistant.<|im_end|>\\n' }}
    {%- endif %}
{%- endif %}
{%- for message in messages %}
    {%- if (message.role == "user") or (message.role == "system" and not loop.first) or (message.role == "assistant" and not message.tool_calls) %}
        {{- '<|im_start|>' + message.role + '\\n' + message.content + '<|im_end|>' + '\\n' }}
    {%- elif message.role == "assistant" %}
        {{- '<|im_start|>' + message.role }}
        {%- if message.content %}
            {{- '\\n' + message.content }}
        {%- endif %}
        {%- for tool_call in message.tool_calls %}
            {%- if tool_call.function is defined %}
                {%- set tool_call = tool_call.function %}
            {%- endif %}
            {{- '\\n<tool_call>\\n{"name": "' }}
            {{- tool_call.name }}
            {{- '", "arguments": ' }}
            {{- tool_call.arguments | tojson }}
            {{- '}\\n</tool_call>' }}
        {%- endfor %}
        {{- '<|im_end|>\\n' }}
    {%- elif message.role == "tool" %}
        {%- if (loop.index0 == 0) or (messages[loop.index0 - 1].role != "tool") %}
            {{- '<|im_start|>user' }}
        {%- endif %}
        {{- '\\n<tool_response>\\n' }}
        {{- message.content }}
        {{- '\\n</tool_response>' }}
        {%- if loop.last or (messages[loop.index0 + 1].role != "tool") %}
            {{- '<|im_end|>\\n' }}
        {%- endif %}
    {%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|im_start|>assistant\\n' }}
{%- endif %}
"""

TOOLS = [{"type": "function", "function": {
    "name": "get_weather", "description": "Météo d'une ville",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}},
                   "required": ["city"]}}}]
CHAT = [
    {"role": "system", "content": "You are terse."},
    {"role": "user", "content": "Hi there  "},
    {"role": "assistant", "content": "Hello! 🙂"},
    {"role": "user", "content": "What's the capital of France?"},
]
TOOL_CHAT = [
    {"role": "user", "content": "Weather in Paris?"},
    {"role": "assistant", "content": None, "tool_calls": [{
        "id": "call_1", "type": "function",
        "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}]},
    {"role": "tool", "tool_call_id": "call_1", "content": "22°C, sunny"},
]


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> str:
    path = str(tmp_path_factory.mktemp("chat"))
    make_tokenizer_json(os.path.join(path, "tokenizer.json"))
    with open(os.path.join(path, "tokenizer_config.json"), "w") as f:
        json.dump({"bos_token": "<|endoftext|>", "eos_token": "<|im_end|>",
                   "chat_template": CHATML, "tokenizer_class": "PreTrainedTokenizerFast"}, f)
    return path


@pytest.fixture(scope="module")
def tok(folder) -> Tokenizer:
    return Tokenizer.from_folder(folder)


@pytest.fixture(scope="module")
def ref(folder):
    transformers = pytest.importorskip("transformers")
    return transformers.AutoTokenizer.from_pretrained(folder)


def _hf(ref, messages, template=None, **kw) -> str:
    kw.setdefault("add_generation_prompt", True)
    return ref.apply_chat_template(messages, chat_template=template, tokenize=False, **kw)


def _hf_messages(messages: list[dict]) -> list[dict]:
    """What transformers wants: tool-call arguments as dicts, content never None."""
    out = copy.deepcopy(messages)
    for m in out:
        m["content"] = m.get("content") or ""
        for call in m.get("tool_calls", []):
            call["function"]["arguments"] = json.loads(call["function"]["arguments"])
    return out


# ---------------------------------------------------------------- rendering like transformers


@pytest.mark.parametrize("add_generation_prompt", [True, False])
def test_chatml_matches_transformers(tok, ref, add_generation_prompt):
    ours = tok.apply_chat_template(CHAT, add_generation_prompt=add_generation_prompt)
    assert ours == _hf(ref, CHAT, add_generation_prompt=add_generation_prompt)
    assert ours.endswith("<|im_start|>assistant\n") == add_generation_prompt
    assert ours.startswith("<|im_start|>system\nYou are terse.<|im_end|>\n")


def test_llama3_matches_transformers(tok, ref):
    ours = tok.apply_chat_template(CHAT, chat_template=LLAMA3)
    assert ours == _hf(ref, CHAT, LLAMA3)
    assert ours.startswith("<|endoftext|><|start_header_id|>system")
    today = datetime.datetime.now().strftime("%d %b %Y")
    assert f"Today Date: {today}" in ours  # strftime_now
    assert "Hi there<|eot_id|>" in ours  # | trim
    # chat_template_kwargs reach the template.
    fixed = tok.apply_chat_template(CHAT, chat_template=LLAMA3,
                                    chat_template_kwargs={"date_string": "01 Jan 2030"})
    assert "Today Date: 01 Jan 2030" in fixed


def test_qwen_tools_matches_transformers(tok, ref):
    msgs = [{"role": "system", "content": "Sé bref."}, *TOOL_CHAT]
    ours = tok.apply_chat_template(msgs, tools=TOOLS, chat_template=QWEN_TOOLS)
    assert ours == _hf(ref, _hf_messages(msgs), QWEN_TOOLS, tools=TOOLS)
    assert '"description": "Météo d\'une ville"' in ours  # tojson keeps non-ASCII
    assert '{"name": "get_weather", "arguments": {"city": "Paris"}}' in ours
    assert "<tool_response>\n22°C, sunny\n</tool_response>" in ours
    assert msgs[2]["tool_calls"][0]["function"]["arguments"] == '{"city": "Paris"}'  # untouched
    no_tools = tok.apply_chat_template(msgs, chat_template=QWEN_TOOLS)
    assert "# Tools" not in no_tools and no_tools == _hf(ref, _hf_messages(msgs), QWEN_TOOLS)


@pytest.mark.parametrize("template", [CHATML, LLAMA3, QWEN_TOOLS])
@pytest.mark.parametrize("final", ["The capital is", "The capital is  ", "Paris: "])
def test_continue_final_message_matches_transformers(tok, ref, template, final):
    msgs = [*CHAT, {"role": "assistant", "content": final}]
    ours = tok.apply_chat_template(msgs, chat_template=template, add_generation_prompt=False,
                                   continue_final_message=True)
    assert ours == _hf(ref, msgs, template, add_generation_prompt=False,
                       continue_final_message=True)
    assert ours.rstrip().endswith(final.rstrip())
    assert not ours.endswith(("<|im_end|>\n", "<|eot_id|>"))
    if template == CHATML:  # the template keeps spacing, so the trailing spaces stay
        assert ours.endswith(final)
    with pytest.raises(ChatTemplateError, match="add_generation_prompt"):
        tok.apply_chat_template(msgs, add_generation_prompt=True, continue_final_message=True)


# ---------------------------------------------------------------- messages


def test_content_parts_joined_and_media_refused(tok):
    parts = [{"role": "user", "content": [{"type": "text", "text": "one"}, "two",
                                          {"type": "text", "text": "three"}]}]
    assert "one\ntwo\nthree<|im_end|>" in tok.apply_chat_template(parts)
    image = [{"role": "user", "content": [
        {"type": "text", "text": "what is this?"},
        {"type": "image_url", "image_url": {"url": "data:image/png;base64,AAAA"}}]}]
    with pytest.raises(ChatContentError, match="does not accept images") as e:
        tok.apply_chat_template(image)
    assert e.value.param == "messages[0].content[1]"
    audio = [{"role": "user", "content": [{"type": "input_audio", "input_audio": {}}]}]
    with pytest.raises(ChatContentError, match="audio"):
        tok.apply_chat_template(audio)
    with pytest.raises(ChatContentError, match="role"):
        tok.apply_chat_template([{"role": 7, "content": "x"}])
    with pytest.raises(ChatContentError, match="non-empty"):
        tok.apply_chat_template([])
    with pytest.raises(ChatContentError, match="string or a list"):
        tok.apply_chat_template([{"role": "user", "content": 5}])


def test_normalize_messages():
    msgs = [
        {"role": "developer", "content": "rules"},
        {"role": "user", "content": "hi", "name": "ann"},
        {"role": "assistant", "content": None, "tool_calls": [
            {"id": "a", "type": "function", "function": {"name": "f", "arguments": "not json"}},
            {"id": "b", "type": "function", "function": {"name": "g", "arguments": ""}}]},
        {"role": "assistant", "content": "x", "tool_calls": []},
        {"role": "tool", "tool_call_id": "a", "content": [{"type": "text", "text": "r1"},
                                                          {"type": "text", "text": "r2"}]},
    ]
    out = normalize_messages(msgs)
    assert out[0] == {"role": "developer", "content": "rules"}
    assert out[1]["name"] == "ann"
    assert out[2]["content"] == "" and [c["function"]["arguments"] for c in
                                        out[2]["tool_calls"]] == [{}, {}]
    assert "tool_calls" not in out[3]  # an empty list keeps templates on the plain path
    assert out[4] == {"role": "tool", "content": "r1\nr2", "tool_call_id": "a"}
    openai = normalize_messages(msgs, "openai")
    assert openai[1]["content"] == [{"type": "text", "text": "hi"}]
    assert openai[4]["content"] == "r1\nr2"  # tool results stay strings (vLLM)


def test_openai_content_format_detected():
    loops = ("{% for m in messages %}{% for part in m['content'] %}{{ part.text }}|{% endfor %}"
             "{% endfor %}")
    assert detect_content_format(loops) == "openai"
    assert detect_content_format(CHATML) == "string"
    assert detect_content_format(QWEN_TOOLS) == "string"
    assigned = ("{% for m in messages %}{% set c = m.content %}{% for p in c %}{{ p.text }}"
                "{% endfor %}{% endfor %}")
    assert detect_content_format(assigned) == "openai"
    msgs = [{"role": "user", "content": [{"type": "text", "text": "a"}, "b"]}]
    assert render_chat_template(loops, msgs) == "a|b|"
    assert render_chat_template(loops, [{"role": "user", "content": "s"}]) == "s|"


def test_documents_kwargs_and_generation_tag():
    template = ("{% for d in documents %}[{{ d.title }}]{% endfor %}{{ greeting }}"
                "{% generation %}{{ messages[0].content }}{% endgeneration %}")
    out = render_chat_template(template, [{"role": "user", "content": "x"}],
                               documents=[{"title": "A", "text": "t"}], greeting="hey ")
    assert out == "[A]hey x"
    with pytest.raises(ChatContentError, match="messages"):
        render_chat_template(template, [{"role": "user", "content": "x"}],
                             chat_template_kwargs={"messages": []})


def test_namespace_and_dict_globals():
    template = ("{% set ns = namespace(n=0, self=1) %}{% for m in messages %}{% set ns.n = ns.n + 1 %}"
                "{% endfor %}{{ ns.n }}{{ dict(a=1)['a'] }}{% for m in messages %}"
                "{% if loop.index > 1 %}{% break %}{% endif %}{{ m.role }}{% endfor %}")
    msgs = [{"role": "user", "content": "x"}, {"role": "assistant", "content": "y"}]
    assert render_chat_template(template, msgs, add_generation_prompt=False) == "21user"


def test_tojson_filter():
    template = "{{ tools | tojson(indent=2) }}|{{ 'é<b>' | tojson }}"
    out = render_chat_template(template, [{"role": "user", "content": "x"}], tools=TOOLS)
    assert out == json.dumps(TOOLS, indent=2, ensure_ascii=False) + '|"é<b>"'


# ---------------------------------------------------------------- errors and the sandbox


def test_raise_exception_is_chat_template_error(tok):
    with pytest.raises(ChatTemplateError, match="Only user and assistant roles"):
        tok.apply_chat_template([*CHAT, {"role": "tool", "content": "x"}], chat_template=LLAMA3)
    with pytest.raises(ChatTemplateError, match="does not compile"):
        render_chat_template("{% for %}", CHAT)
    with pytest.raises(ChatTemplateError, match="--chat-template"):
        render_chat_template(None, CHAT)


@pytest.mark.parametrize("template", [
    "{{ ''.__class__.__mro__[1].__subclasses__() }}",
    "{{ messages.__class__.__init__.__globals__ }}",
    "{{ raise_exception.__globals__['os'] }}",
    "{% set x = messages.append(1) %}",
    "{% set ns = namespace(_private=1) %}{{ ns._private }}",
    "{{ cycler.__init__.__globals__.os.popen('id').read() }}",
])
def test_sandbox_blocks_escapes(template):
    with pytest.raises(ChatTemplateError):
        render_chat_template(template, [{"role": "user", "content": "x"}])


def test_sandbox_hides_private_attributes():
    # A bare unsafe lookup renders as undefined (empty), never the object it would reach.
    out = render_chat_template("[{{ messages.__class__ }}]", [{"role": "user", "content": "x"}])
    assert out == "[]"


# (messages, chat_template_kwargs or None, the param a refusal names, or None when accepted)
FRONT_DOOR_CASES = [
    ([{"role": "user", "content": "Hi"}], None, None),
    ([{"role": "user", "content": [{"type": "input_text", "text": "Hi"}]}], None, None),
    ([{"role": "user", "content": [{"type": "text", "text": "a"}, "b",
                                   {"type": "thinking", "thinking": "c"}]}], None, None),
    ([{"role": "user", "content": "Hi"}, {"role": "assistant", "content": [
        {"type": "output_text", "text": "Yo"}, {"type": "refusal", "refusal": "no"}]},
      {"role": "user", "content": "again"}], None, None),
    ([{"role": "user", "content": "Weather?"}, {"role": "assistant", "content": None,
                                                 "tool_calls": [{"id": "1", "type": "function",
                                                                 "function": {"name": "w",
                                                                              "arguments": "{}"}}]},
      {"role": "tool", "tool_call_id": "1", "content": [{"type": "text", "text": "sunny"}]}],
     None, None),
    ([{"role": "user", "content": "Hi"}, {"role": "function", "name": "f", "content": "42"}],
     None, None),
    ([{"role": "system", "content": None}, {"role": "user", "content": "Hi"}], None, None),
    ([{"role": "user", "content": "Hi"}], {"flag": True}, None),
    ([{"role": ["user"], "content": "Hi"}], None, "messages[0].role"),
    ([{"role": "wizard", "content": "Hi"}], None, None),  # custom roles reach the template
    ([{"content": "Hi"}], None, "messages[0].role"),
    ([{"role": "user", "content": 5}], None, "messages[0].content"),
    ([{"role": "user", "content": "Hi", "name": 5}], None, "messages[0].name"),
    ([{"role": "user", "content": [{"type": "text", "text": 3}]}], None,
     "messages[0].content[0].text"),
    ([{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}], None,
     "messages[0].content[0]"),
    ([{"role": "user", "content": [{"type": "video"}]}], None, "messages[0].content[0]"),
    ([{"role": "user", "content": [{"type": "hologram"}]}], None, "messages[0].content[0].type"),
    ([], None, "messages"),
    ([{"role": "user", "content": "Hi"}], {"messages": []}, "chat_template_kwargs"),
    ([{"role": "user", "content": "Hi"}], ["x"], "chat_template_kwargs"),
]


# Refused by both front doors in the same words: the chat route's own checks after the messages.
FRONT_DOOR_CASES += [
    ([{"role": "user", "content": "hello " * 300}], None, "messages"),   # > max_model_len
    ([{"role": "assistant", "content": "x", "tool_calls": "call"}], None,
     "messages[0].tool_calls"),
    ([{"role": "assistant", "content": "x", "tool_calls": [{"id": "1"}]}], None,
     "messages[0].tool_calls[0]"),
    ("Hi", None, "messages"),
    (["Hi"], None, "messages[0]"),
    ([{"role": "user", "content": "Hi"}], {"add_generation_prompt": False},
     "chat_template_kwargs"),
]


@pytest.fixture(scope="module")
def llm_256(tiny_model_dir):
    """An LLM over the tiny model with the fake engine's max_model_len (256)."""
    from minserve import LLM

    return LLM(tiny_model_dir, kv_cache_memory=1 << 20, max_model_len=256)


@pytest.mark.parametrize("messages,kwargs,param", FRONT_DOOR_CASES)
def test_http_and_llm_chat_agree_on_messages(tiny_model_dir, llm_256, messages, kwargs, param):
    """The same messages through POST /v1/chat/completions (and /tokenize) and LLM.chat: both
    accept them with the same prompt tokens, or both refuse them naming the same field in the
    same words."""
    import asyncio

    from minserve import SamplingParams
    from tests.asgi import call, lifespan
    from tests.fake_engine import make_fake_app

    app, llm = make_fake_app(tiny_model_dir), llm_256

    async def over_http():
        async with lifespan(app):
            body = {"messages": messages, "max_tokens": 1}
            if kwargs is not None:
                body["chat_template_kwargs"] = kwargs
            chat = await call(app, "POST", "/v1/chat/completions", body)
            tok = await call(app, "POST", "/tokenize", body)
            return chat.status, chat.json(), tok.json()

    status, chat, tok = asyncio.run(over_http())
    case = (messages, kwargs)
    if param is None:
        assert status == 200, (case, chat)
        got = llm.chat(messages, SamplingParams(max_tokens=1), chat_template_kwargs=kwargs)
        assert got[0].prompt_token_ids == tok["tokens"], case
    else:
        assert status == 400 and chat["error"]["param"] == param, (case, chat)
        with pytest.raises(ValueError) as err:
            llm.chat(messages, SamplingParams(max_tokens=1), chat_template_kwargs=kwargs)
        assert getattr(err.value, "param", None) == param, (case, err.value)
        assert str(err.value) == chat["error"]["message"], case
