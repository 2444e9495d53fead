"""vLLM's guide snippets, run as written through the OpenAI SDK against `python -m minserve` on
the default model (slow): structured outputs Task 4 (a JSON schema without
additionalProperties, no max_tokens) and Task 9 (the IPv4 regex with \\b), tool calling Task 7
(`--enable-auto-tool-choice` alone). One server for the module."""
from __future__ import annotations

import json
import re
from concurrent.futures import ThreadPoolExecutor

import openai
import pytest

from tests.serving import serving

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def client():
    # max_new_tokens bounds the snippets that send no max_tokens (Task 7's text answers)
    with serving(["--enable-auto-tool-choice", "--max-model-len", "2048",
                  "--kv-cache-memory", "64MiB",
                  "--override-generation-config", '{"max_new_tokens": 256}'],
                 timeout=900) as url:
        yield openai.OpenAI(base_url=url + "/v1", api_key="-", max_retries=0)


def test_task4_json_schema_closes_the_object(client):
    model = client.models.list().data[0].id
    json_schema = {"type": "object",
                   "properties": {"name": {"type": "string"}, "age": {"type": "integer"}},
                   "required": ["name", "age"]}
    completion = client.chat.completions.create(
        model=model,
        messages=[{"role": "user",
                   "content": "Generate a JSON with the name and age of one random person."}],
        extra_body={"guided_json": json_schema},
    )
    value = json.loads(completion.choices[0].message.content)
    assert set(value) == {"name", "age"} and isinstance(value["age"], int), value
    assert completion.choices[0].finish_reason == "stop"
    assert completion.usage.completion_tokens <= 60, completion.usage


def test_task9_regex_with_word_boundaries(client):
    model = client.models.list().data[0].id
    ip = (r"\b(25[0-5]|2[0-4][0-9]|[01]?[0-9][0-9]?)\.(25[0-5]|2[0-4][0-9]|[01]?[0-9][0-9]?)\."
          r"(25[0-5]|2[0-4][0-9]|[01]?[0-9][0-9]?)\.(25[0-5]|2[0-4][0-9]|[01]?[0-9][0-9]?)\b")
    completion = client.chat.completions.create(
        model=model,
        messages=[{"role": "user", "content": "Generate an example IP address."}],
        extra_body={"guided_regex": ip, "stop": ["\n"]},
    )
    assert re.fullmatch(ip, completion.choices[0].message.content), completion


TASK7_TOOLS = [{
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Get the current weather in a given location",
        "parameters": {
            "type": "object",
            "properties": {
                "location": {"type": "string", "description": "City and state, e.g., 'San Francisco, CA'"},  # noqa: E501
                "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]},
            },
            "required": ["location", "unit"],
        },
    },
}]


def test_task7_auto_tool_choice_on_the_default_model(client):
    """SmolLM2's template renders no tools: minserve's generic format. The snippet as written,
    then the same request over 8 seeds: every call is well formed, at least one seed calls
    (bench/tool_choice.py measures the share over 20 seeds: about half). The nine requests go
    at once, so the server decodes them in one batch instead of one after another."""
    def snippet():
        return client.chat.completions.create(
            model=client.models.list().data[0].id,
            messages=[{"role": "user", "content": "What's the weather like in San Francisco?"}],
            tools=TASK7_TOOLS,
            tool_choice="auto",
        )

    def seeded(seed: int):
        return client.chat.completions.create(
            model=client.models.list().data[0].id, seed=seed, tools=TASK7_TOOLS, max_tokens=64,
            messages=[{"role": "user", "content": "What's the weather like in San Francisco?"}],
            tool_choice="auto")

    with ThreadPoolExecutor(9) as pool:
        verbatim = pool.submit(snippet)
        runs = list(pool.map(seeded, range(8)))
    response = verbatim.result()
    for c in response.choices[0].message.tool_calls or []:  # a call, or plain text
        assert c.function.name == "get_weather"
        assert set(json.loads(c.function.arguments)) == {"location", "unit"}
    num_calls = 0
    for r in runs:
        calls = r.choices[0].message.tool_calls or []
        for c in calls:
            assert c.function.name == "get_weather", c
            assert set(json.loads(c.function.arguments)) == {"location", "unit"}
        num_calls += bool(calls)
    print(f"task 7: {num_calls}/8 seeds call get_weather; verbatim snippet: "
          f"{bool(response.choices[0].message.tool_calls)}")
    assert num_calls >= 1
