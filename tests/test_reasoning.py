"""Reasoning parsers: <think> split on literal outputs, whole and streamed in random fragments
(the accumulated stream must equal the whole split); reasoning followed by tool calls."""
from __future__ import annotations

import random

import pytest

from minserve.reasoning import (
    REASONING_PARSERS,
    get_reasoning_parser,
    prompt_opens_reasoning,
)
from minserve.tool_parsers import get_tool_parser
from tests.test_tool_parsers import random_fragments

CASES = [
    # (parser, start_in_reasoning, text, reasoning, content)
    ("deepseek_r1", False, "<think>\nLet me add.\n</think>\n\nThe answer is 4.",
     "\nLet me add.\n", "\n\nThe answer is 4."),
    ("deepseek_r1", False, "Okay, 2+2 is 4.\n</think>\n\n**4**", "Okay, 2+2 is 4.\n", "\n\n**4**"),
    ("deepseek_r1", False, "Still thinking about </thi", "Still thinking about </thi", None),
    ("deepseek_r1", False, "</think>Just the answer.", None, "Just the answer."),
    ("qwen3", False, "<think>\nUser wants 4.\n</think>\n\n4", "\nUser wants 4.\n", "\n\n4"),
    ("qwen3", False, "4, with no thinking at all. Not even </think> counts.",
     None, "4, with no thinking at all. Not even </think> counts."),
    ("qwen3", False, "  <think>cut off by max_tokens", "cut off by max_tokens", None),
    ("qwen3", False, "<thinking> is not the tag", None, "<thinking> is not the tag"),
    ("qwen3", True, "opened by the prompt</think>answer", "opened by the prompt", "answer"),
    ("qwen3", False, "<think></think>", None, None),
    # Gemma 4's channel marks (special tokens, kept in the text for this parser)
    ("gemma4", False, "<|channel>thought\nCompare the two.<channel|>The first.",
     "Compare the two.", "The first."),
    ("gemma4", False, "No thinking today.", None, "No thinking today."),
    ("gemma4", False, "<|channel>thought\ncut off", "cut off", None),
    ("gemma4", False, "<think>not Gemma's tag</think>x", None, "<think>not Gemma's tag</think>x"),
]


@pytest.mark.parametrize("name,opened,text,reasoning,content", CASES)
def test_whole_and_streamed(name, opened, text, reasoning, content):
    parser_cls = get_reasoning_parser(name)
    assert parser_cls(opened).extract(text) == (reasoning, content)
    for seed in range(30):
        parser = parser_cls(opened)
        got = {"reasoning_content": "", "content": ""}
        deltas = [parser.extract_streaming(f) for f in random_fragments(text, random.Random(seed))]
        for delta in [*deltas, parser.finish()]:
            for key, value in (delta or {}).items():
                assert value, "empty deltas are not sent"
                got[key] += value
        assert (got["reasoning_content"] or None, got["content"] or None) == (reasoning, content)


def test_streaming_sends_reasoning_before_the_end_tag():
    parser = get_reasoning_parser("qwen3")()
    assert parser.extract_streaming("<thi") is None
    assert parser.extract_streaming("nk>Hmm, ") == {"reasoning_content": "Hmm, "}
    assert parser.extract_streaming("ok</th") == {"reasoning_content": "ok"}
    assert parser.extract_streaming("ink>Hi") == {"content": "Hi"}
    assert parser.finish() is None


def test_reasoning_then_tool_calls():
    text = ('<think>Need weather.</think>\n<tool_call>\n{"name": "get_weather", '
            '"arguments": {"city": "Paris"}}\n</tool_call>')
    reasoning, content = get_reasoning_parser("qwen3")().extract(text)
    assert reasoning == "Need weather."
    content, calls = get_tool_parser("hermes")().extract(content)
    assert content is None and [(c.name, c.arguments) for c in calls] == [
        ("get_weather", '{"city": "Paris"}')]


def test_registry_and_prompt_detection():
    assert set(REASONING_PARSERS) == {"deepseek_r1", "qwen3", "gemma4", "openai_gptoss"}
    gemma = get_reasoning_parser("gemma4")
    assert gemma.needs_special_tokens
    assert prompt_opens_reasoning("<|turn>model\n<|channel>thought\n", gemma.start, gemma.end)
    with pytest.raises(ValueError, match="qwen3"):
        get_reasoning_parser("o1")
    assert prompt_opens_reasoning("<|im_start|>assistant\n<think>\n")
    assert not prompt_opens_reasoning("<|im_start|>assistant\n<think>\n\n</think>\n\n")
    assert not prompt_opens_reasoning("<|im_start|>assistant\n")
