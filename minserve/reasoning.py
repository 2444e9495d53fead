"""Reasoning parsers (--reasoning-parser deepseek_r1 | qwen3 | gemma4 | openai_gptoss): split
<think>...</think> (Gemma 4: <|channel>thought ... <channel|>; gpt-oss: harmony's analysis
channel) into reasoning_content and content, whole or streamed. Streaming re-splits the text so
far and sends only what is certain, so the accumulated stream equals the whole-text split.
Touches no tokens."""
from __future__ import annotations

from typing import Any, ClassVar

from minserve import harmony
from minserve.tool_parsers.base import partial_marker_len
from minserve.tool_parsers.openai import HarmonyContentParser

THINK_START, THINK_END = "<think>", "</think>"


def prompt_opens_reasoning(prompt: str, start: str = THINK_START, end: str = THINK_END) -> bool:
    """True when the rendered prompt ends inside an unclosed <think> (templates that open the
    thinking block for the model, e.g. DeepSeek-R1 and Qwen3 thinking-2507)."""
    return prompt.rfind(start) > prompt.rfind(end)


class ReasoningParser:
    """Text before </think> is reasoning; after it, content. Subclasses decide what text with no
    think tags at all is (the one way deepseek_r1 and qwen3 differ)."""

    name: ClassVar[str] = ""
    # What an output that does not start with <think> is, when the prompt did not open one.
    untagged_is_reasoning: ClassVar[bool] = False
    start: ClassVar[str] = THINK_START
    end: ClassVar[str] = THINK_END
    # The markers are special tokens (Gemma 4, harmony): detokenize with
    # skip_special_tokens=False.
    needs_special_tokens: ClassVar[bool] = False
    # The tool parser its content goes through when the request has none (its content is
    # still marked up), or None.
    content_parser: ClassVar[type | None] = None

    def __init__(self, start_in_reasoning: bool = False) -> None:
        self.start_in_reasoning = start_in_reasoning or self.untagged_is_reasoning
        self._text = ""
        self._num_sent = [0, 0]  # chars of (reasoning, content) already sent

    def split(self, text: str, final: bool = True) -> tuple[str, str]:
        """(reasoning, content) of the text; with final=False only the certain part."""
        body = text.lstrip()
        if body.startswith(self.start):
            rest = body[len(self.start):]
        elif not final and self.start.startswith(body):  # "", "<thi": undecided
            return "", ""
        elif self.start_in_reasoning:
            rest = text
        else:
            return "", text
        end = rest.find(self.end)
        if end >= 0:
            return rest[:end], rest[end + len(self.end):]
        # No </think> (yet): all reasoning, as vLLM does for a truncated thought.
        keep = 0 if final else partial_marker_len(rest, self.end)
        return rest[:len(rest) - keep], ""

    def extract(self, text: str) -> tuple[str | None, str | None]:
        """(reasoning_content, content); None for an empty part."""
        reasoning, content = self.split(text, final=True)
        return reasoning or None, content or None

    def extract_streaming(self, delta_text: str) -> dict[str, Any] | None:
        """{"reasoning_content": ..., "content": ...} with what is new, or None."""
        self._text += delta_text
        return self._delta(*self.split(self._text, final=False))

    def finish(self) -> dict[str, Any] | None:
        """End of output: flush a held-back partial tag."""
        return self._delta(*self.split(self._text, final=True))

    def _delta(self, reasoning: str, content: str) -> dict[str, Any] | None:
        delta: dict[str, Any] = {}
        for i, (key, text) in enumerate((("reasoning_content", reasoning),
                                         ("content", content))):
            if len(text) > self._num_sent[i]:
                delta[key] = text[self._num_sent[i]:]
                self._num_sent[i] = len(text)
        return delta or None


class DeepSeekR1ReasoningParser(ReasoningParser):
    """DeepSeek-R1 (and distills): the template puts <think> in the prompt, so everything before
    </think> is reasoning, and output with no </think> at all is an unfinished thought."""

    name = "deepseek_r1"
    untagged_is_reasoning = True


class Qwen3ReasoningParser(ReasoningParser):
    """Qwen3: the model writes <think> itself; output with no <think> (enable_thinking=False puts
    an empty block in the prompt) is all content, unless the prompt opened the block."""

    name = "qwen3"


class Gemma4ReasoningParser(ReasoningParser):
    """Gemma 4 with thinking on: <|channel>thought\n ... <channel|>, then the answer (vLLM's
    gemma4); the channel marks are special tokens."""

    name = "gemma4"
    start, end = "<|channel>thought\n", "<channel|>"
    needs_special_tokens = True


class GptOssReasoningParser(ReasoningParser):
    """gpt-oss (harmony.py): analysis messages are reasoning. The content it hands on is the
    other messages still in harmony form, so that the tool parser (openai, or without one
    HarmonyContentParser) finds the calls and takes the markup off."""

    name = "openai_gptoss"
    needs_special_tokens = True
    content_parser = HarmonyContentParser

    def split(self, text: str, final: bool = True) -> tuple[str, str]:
        opened = harmony.opens_header(text)
        if not opened:      # plain text (a constrained tool call's JSON): content as it is
            return "", text if opened is False or final else ""
        messages = harmony.parse(text, final)
        reasoning = "\n".join(m.text for m in messages if m.kind == "reasoning")
        return reasoning, "".join(m.render() for m in messages if m.kind != "reasoning")


REASONING_PARSERS: dict[str, type[ReasoningParser]] = {
    cls.name: cls for cls in (DeepSeekR1ReasoningParser, Qwen3ReasoningParser,
                              Gemma4ReasoningParser, GptOssReasoningParser)
}


def get_reasoning_parser(name: str) -> type[ReasoningParser]:
    try:
        return REASONING_PARSERS[name]
    except KeyError:
        raise ValueError(f"unknown reasoning parser {name!r}; choose one of "
                         f"{', '.join(sorted(REASONING_PARSERS))}") from None
