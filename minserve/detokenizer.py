"""The streaming side of tokenization: IncrementalDetokenizer (token ids -> text deltas that
never split a UTF-8 character) and StopChecker (stop strings over those deltas). Per choice; no
torch."""
from __future__ import annotations

from minserve.tokenizer import Tokenizer

# How many tokens may pile up behind a trailing U+FFFD before the detokenizer gives up waiting:
# a UTF-8 character is at most 4 bytes, so more than this means genuinely invalid bytes.
_MAX_PENDING_TOKENS = 8


class IncrementalDetokenizer:
    """Turns streamed token ids into text deltas. Holds back a trailing U+FFFD (a UTF-8
    character split across tokens) until the rest arrives; concatenated deltas plus flush() equal
    a decode of the output ids.

        ids: | prompt context | ...emitted... | prefix_offset .. read_offset | new tokens |
    Each token decodes only ids[prefix_offset:] and ids[prefix_offset:read_offset] (a few
    tokens), never the whole sequence. The prompt context (a clean-decoding suffix of the prompt,
    like vLLM) gives sentencepiece decoders the left context they need for leading spaces."""

    def __init__(self, tokenizer: Tokenizer, prompt_token_ids: list[int],
                 skip_special_tokens: bool = True,
                 spaces_between_special_tokens: bool = True) -> None:
        self.tokenizer = tokenizer
        self.skip_special_tokens = skip_special_tokens
        # As in vLLM's fast path, this only matters when special tokens are kept: two added
        # tokens in a row are then joined without whatever space the decoder put between them.
        self._raw_added = not skip_special_tokens and not spaces_between_special_tokens
        self._last_was_added = False
        self._decode = tokenizer.backend.decode
        self._ids = self._prompt_context(prompt_token_ids)
        self.prefix_offset = 0
        self.read_offset = len(self._ids)
        self._prefix_text: str | None = None  # decode of ids[prefix_offset:read_offset], cached
        self._window_emitted = 0  # chars past _prefix_text already emitted (complete chars only)

    def _prompt_context(self, prompt: list[int]) -> list[int]:
        n = len(prompt)
        for k in range(min(n, 5), min(n, 24) + 1):
            if k == 0:
                break
            suffix = list(prompt[-k:])
            if "\ufffd" not in self._decode(suffix, skip_special_tokens=self.skip_special_tokens):
                return suffix
        return []

    def push(self, new_token_ids: list[int]) -> str:
        """Append sampled ids; return the newly complete text (maybe "")."""
        return "".join([self._step(t) for t in new_token_ids])

    def _step(self, token_id: int) -> str:
        ids = self._ids
        ids.append(token_id)
        skip = self.skip_special_tokens
        if self._prefix_text is None:
            self._prefix_text = self._decode(ids[self.prefix_offset:self.read_offset],
                                             skip_special_tokens=skip)
        prefix_text = self._prefix_text
        new_text = self._decode(ids[self.prefix_offset:], skip_special_tokens=skip)
        if len(new_text) <= len(prefix_text):
            return ""  # e.g. a skipped special token: nothing to show yet
        start = len(prefix_text) + self._window_emitted
        if new_text.endswith("\ufffd") and len(ids) - self.read_offset <= _MAX_PENDING_TOKENS:
            # A multi-byte character is still incomplete: show the complete characters before
            # it now (they cannot change) and wait for the rest of its bytes.
            stable = new_text.rstrip("\ufffd")
            if len(stable) <= start:
                return ""
            self._window_emitted += len(stable) - start
            return stable[start:]
        self.prefix_offset, self.read_offset = self.read_offset, len(ids)
        self._prefix_text = None
        self._window_emitted = 0
        delta = new_text[start:]
        if self._raw_added:
            content = self.tokenizer.added_token_contents.get(token_id)
            if content is not None and self._last_was_added and delta == " " + content:
                delta = content
            self._last_was_added = content is not None
        return delta

    def flush(self) -> str:
        """At the end of the request: whatever was held back (a genuinely broken tail)."""
        skip = self.skip_special_tokens
        prefix_text = self._decode(self._ids[self.prefix_offset:self.read_offset],
                                   skip_special_tokens=skip)
        new_text = self._decode(self._ids[self.prefix_offset:], skip_special_tokens=skip)
        start = len(prefix_text) + self._window_emitted
        self.prefix_offset = self.read_offset = len(self._ids)
        self._prefix_text, self._window_emitted = None, 0
        return new_text[start:]


def _kmp_failure(s: str) -> list[int]:
    """fail[i]: the length of the longest proper prefix of s[:i+1] that is also its suffix."""
    fail, k = [0] * len(s), 0
    for i in range(1, len(s)):
        while k and s[i] != s[k]:
            k = fail[k - 1]
        if s[i] == s[k]:
            k += 1
        fail[i] = k
    return fail


class StopStrings:
    """A request's stop strings, prepared once (a KMP automaton each) and shared by all its
    choices; build it while parsing, off the event loop (a 10 MB stop string with n=4 once took
    the loop 3.9 s and 1.5 GB, prepared per choice)."""

    __slots__ = ("stop", "fail")

    def __init__(self, stop: list[str] | str | None) -> None:
        if isinstance(stop, str):
            stop = [stop]
        self.stop = [s for s in (stop or []) if s]
        # How far the text's tail is into each stop string: the held tail is the longest such
        # partial match. Linear in the text and the stop strings; the earlier set of all
        # prefixes cost O(len^2) memory (a 100k-character stop string took 16 s and gigabytes).
        self.fail = [_kmp_failure(s) for s in self.stop]


class StopChecker:
    """Stop strings over streamed text. push() returns the text safe to show now, holding back a
    tail that could still become a stop string, and the stop string once one is hit (the text
    then ends before it, or after it with include_stop_str_in_output). flush() at the end
    releases the held tail when no stop string came. One per choice; it keeps only its state."""

    def __init__(self, stop: StopStrings | list[str] | str | None,
                 include_stop_str_in_output: bool = False) -> None:
        prepared = stop if isinstance(stop, StopStrings) else StopStrings(stop)
        self.stop = prepared.stop
        self._fail = prepared.fail
        self.include_stop_str_in_output = include_stop_str_in_output
        self._state = [0] * len(self.stop)
        self._held = ""
        self.stop_hit: str | None = None

    def push(self, delta: str) -> tuple[str, str | None]:
        if self.stop_hit is not None or not delta:
            return "", None
        if not self.stop:
            return delta, None
        # Search only where a match can start: the held tail plus the new text.
        buf = self._held + delta
        best_at, best = -1, ""
        for s in self.stop:
            at = buf.find(s)
            # The earliest match wins; at the same place, the longer stop string.
            if at != -1 and (best_at == -1 or (at, -len(s)) < (best_at, -len(best))):
                best_at, best = at, s
        if best_at != -1:
            self._held = ""
            self.stop_hit = best
            end = best_at + len(best) if self.include_stop_str_in_output else best_at
            return buf[:end], best
        # No match in buf, so each automaton (its state covers the held tail) only needs delta.
        for i, (s, fail) in enumerate(zip(self.stop, self._fail, strict=True)):
            k = self._state[i]
            for ch in delta:
                while k and s[k] != ch:
                    k = fail[k - 1]
                if s[k] == ch:
                    k += 1
            self._state[i] = k   # < len(s): a full match would have been found above
        hold = max(self._state)
        self._held = buf[len(buf) - hold:] if hold else ""
        return buf[:len(buf) - hold], None

    def flush(self) -> str:
        held, self._held = self._held, ""
        return "" if self.stop_hit is not None else held
