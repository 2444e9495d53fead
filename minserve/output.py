"""Engine outputs -> typed events -> OpenAI responses: SampleState (one sample's tokens, logprobs
and text: incremental detokenizing, stop strings, why it ended; the server's choices and LLM both
use it) turns each engine output into a Delta; ChoiceState (a server choice) adds the chat parsers
and the logprob shapes. The chat/completions JSON body and SSE chunk payloads are built from them
here; SSE framing is the HTTP edge's. Plain dicts; no I/O, no torch."""
from __future__ import annotations

import dataclasses
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from minserve.detokenizer import IncrementalDetokenizer, StopChecker, StopStrings
from minserve.engine.request import FinishReason, Logprob, RequestOutput
from minserve.sampling_params import SamplingParams

if TYPE_CHECKING:
    from minserve.protocol import GenerateRequest

_MIN_LOGPROB = -9999.0  # vLLM's floor for -inf, so the JSON stays finite


@dataclass(slots=True)
class Delta:
    """The event for one engine output of one choice: its new text, token ids and logprobs.
    Streamed chat runs its parsers on the text: `text` is then the content, beside `reasoning`
    and `tool_calls` deltas. `finished` on its last (the choice's finish_reason is set);
    `stopped`: a stop string ended it, so the caller aborts the sample in the engine."""
    choice: SampleState
    text: str
    token_ids: list[int]
    logprobs: list[Logprob]
    finished: bool
    stopped: bool = False
    reasoning: str = ""
    tool_calls: list[dict[str, Any]] | None = None


@dataclass(slots=True)
class Usage:
    """The event after a request's last Delta: its token counts (prompt tokens once per
    prompt, not per sample, as OpenAI counts them)."""
    prompt_tokens: int
    completion_tokens: int
    cached_tokens: int

    def to_dict(self, details: bool = True) -> dict[str, Any]:
        """OpenAI's usage; prompt_tokens_details only with `details` (the server's
        --enable-prompt-tokens-details: vLLM's usage otherwise). vLLM reports the prefix-cache
        hits as cache_read_input_tokens too, always (Anthropic's name, beside OpenAI's)."""
        return {"prompt_tokens": self.prompt_tokens, "completion_tokens": self.completion_tokens,
                "total_tokens": self.prompt_tokens + self.completion_tokens,
                "prompt_tokens_details": {"cached_tokens": self.cached_tokens} if details
                else None,
                "cache_read_input_tokens": self.cached_tokens}


class SampleState:
    """One sample as its engine deltas arrive: token ids, logprobs, text and why it ended."""

    def __init__(self, index: int, tokenizer: Any, prompt_token_ids: list[int],
                 params: SamplingParams, stop: StopStrings | None = None) -> None:
        """index: the sample's (choice's) place in its request. stop: params.stop prepared once
        for all of a request's samples. tokenizer None (--skip-tokenizer-init): no detokenizer,
        no text (token ids out only)."""
        self.index = index
        self.detok = IncrementalDetokenizer(tokenizer, prompt_token_ids,
                                            params.skip_special_tokens,
                                            params.spaces_between_special_tokens) \
            if tokenizer is not None else None
        self.stop = StopChecker(stop or params.stop, params.include_stop_str_in_output) \
            if params.stop else None
        self.num_prompt_tokens = len(prompt_token_ids)
        self.num_cached_tokens = 0
        self.token_ids: list[int] = []
        self.logprobs: list[Logprob] = []
        self.prompt_logprobs: list[Logprob | None] | None = None
        self.finish_reason: str | None = None   # "stop" | "length" | "abort" | "error"
        self.stop_reason: int | str | None = None
        self.error: str | None = None
        self._pieces: list[str] = []

    @property
    def num_output_tokens(self) -> int:
        return len(self.token_ids)

    @property
    def text(self) -> str:
        """Emitted so far (joined once per read, not once per delta)."""
        if len(self._pieces) > 1:
            self._pieces = ["".join(self._pieces)]
        return self._pieces[0] if self._pieces else ""

    def update(self, out: RequestOutput) -> Delta:
        """-> the Delta of this output. On a stop string (stopped) the caller aborts the
        sample."""
        if self.stop is not None and len(out.new_token_ids) > 1:
            return self._update_each(out)
        self.token_ids += out.new_token_ids
        self.num_cached_tokens = max(self.num_cached_tokens, out.num_cached_tokens)
        if out.num_prompt_tokens:
            self.num_prompt_tokens = out.num_prompt_tokens
        if out.prompt_logprobs is not None:
            self.prompt_logprobs = out.prompt_logprobs
        lps = list(out.logprobs or [])
        self.logprobs += lps
        delta = self.detok.push(out.new_token_ids) if out.new_token_ids and self.detok else ""
        if out.finished and self.detok:  # what the detokenizer still held (a split character)
            delta += self.detok.flush()
        hit = None
        if self.stop is not None:
            delta, hit = self.stop.push(delta)
            if hit is None and out.finished:
                delta += self.stop.flush()
        if delta:
            self._pieces.append(delta)
        if hit is not None:
            self.finish_reason, self.stop_reason = "stop", hit
        elif out.finished:
            self.finish_reason = out.finish_reason.value
            self.stop_reason, self.error = out.stop_reason, out.error
        return Delta(self, delta, out.new_token_ids, lps, self.finish_reason is not None,
                     hit is not None)


    def _update_each(self, out: RequestOutput) -> Delta:
        """Several tokens at once (speculative decoding) under stop strings: one at a time, as
        they would have come alone, so a stop string ends the sample at the token completing
        it (the tokens after it are not output, nor counted)."""
        last = len(out.new_token_ids) - 1
        merged = None
        for i, token in enumerate(out.new_token_ids):
            d = SampleState.update(self, dataclasses.replace(
                out, new_token_ids=[token], logprobs=out.logprobs and out.logprobs[i:i + 1],
                prompt_logprobs=out.prompt_logprobs if i == 0 else None,
                finish_reason=out.finish_reason if i == last else None))
            if merged is None:
                merged = d
            else:
                merged.text += d.text
                merged.token_ids = merged.token_ids + d.token_ids
                merged.logprobs += d.logprobs
                merged.finished, merged.stopped = d.finished, d.stopped
            if d.stopped:
                break
        return merged


class ChoiceState(SampleState):
    """One server choice (one prompt x one sample): the sample plus its chat parsers and the
    OpenAI shapes of its message, deltas and logprobs."""

    def __init__(self, index: int, req: GenerateRequest, tokenizer: Any,
                 prompt_token_ids: list[int]) -> None:
        super().__init__(index, tokenizer, prompt_token_ids, req.params, req.stop_strings)
        self.tokenizer = tokenizer
        # chat only: reasoning / tool-call parsers (each keeps this choice's streaming state);
        # streamed, they split each delta; otherwise chat_message() splits the whole text
        self.reasoning, self.tools = req.make_parsers() if req.make_parsers else (None, None)
        self.parse_deltas = req.stream and req.make_parsers is not None
        self.num_tool_calls = 0
        self.echo_only = req.echo_only
        self.echo_sent = False   # streaming: the echoed prompt went out
        self.tokens_as_ids = req.tokens_as_token_ids
        self.num_ids_sent = 0    # streaming return_token_ids: token ids already in a chunk
        self.prompt_extras_sent = False  # ... prompt_token_ids / prompt_logprobs went out

    def update(self, out: RequestOutput) -> Delta:
        if self.echo_only:  # max_tokens=0: drop the one sampled token; it ended on "length"
            reason = out.finish_reason
            if reason in (FinishReason.STOP, FinishReason.LENGTH):
                reason = FinishReason.LENGTH
            out = dataclasses.replace(out, new_token_ids=[], logprobs=None, finish_reason=reason,
                                      stop_reason=None)
        d = super().update(out)
        if self.parse_deltas:
            self._parse(d)
        return d

    @property
    def api_finish_reason(self) -> str | None:
        """OpenAI reports "tool_calls" when the output ended (normally) in tool calls."""
        if self.finish_reason == "stop" and self.num_tool_calls and self.tools.reports_tool_calls:
            return "tool_calls"
        return self.finish_reason

    # ---- chat: text -> reasoning_content / content / tool_calls
    def chat_message(self, prefix: str) -> dict[str, Any]:
        """The whole message. Order as vLLM: reasoning split first, tool calls from the rest."""
        text: str | None = self.text
        msg: dict[str, Any] = {"role": "assistant"}
        if self.reasoning is not None:
            reasoning, text = self.reasoning.extract(text)
            msg["reasoning_content"] = msg["reasoning"] = reasoning
        calls = []
        if self.tools is not None:
            text, calls = self.tools.extract(text or "")
            self.num_tool_calls = len(calls)
        content = (prefix + text) if text is not None else (prefix or None)
        forced = getattr(self.tools, "forced", False)  # tool_choice required / named
        msg["content"] = content if content is not None or (calls and not forced) else ""
        # vLLM: "required" calls that never completed (max_tokens) are no call: null, not []
        # (a named function's call comes back even unfinished: NamedToolCallParser)
        msg["tool_calls"] = [c.to_dict() for c in calls] if calls or not forced else None
        return msg

    def _parse(self, d: Delta) -> None:
        """A streamed delta's text through the parsers: content, reasoning and tool-call
        deltas. On the last one the parsers flush what they held."""
        text, finished = d.text, d.finished
        if self.reasoning is not None:
            parts = [self.reasoning.extract_streaming(text) if text else None,
                     self.reasoning.finish() if finished else None]
            text = "".join((p or {}).get("content", "") for p in parts)
            d.reasoning = "".join((p or {}).get("reasoning_content", "") for p in parts)
        if self.tools is not None:
            parts = [self.tools.extract_streaming(text) if text else None,
                     self.tools.finish() if finished else None]
            text = "".join((p or {}).get("content") or "" for p in parts)
            calls = [c for p in parts for c in (p or {}).get("tool_calls", [])]
            if calls:
                d.tool_calls = calls
                self.num_tool_calls += sum(1 for c in calls if "id" in c)  # a call's first delta
        d.text = text

    # ---- logprobs in OpenAI's two shapes
    def _token(self, token_id: int) -> tuple[str, list[int]]:
        if self.tokens_as_ids or self.tokenizer is None:  # vLLM's return_tokens_as_token_ids
            tok = f"token_id:{token_id}"
            return tok, list(tok.encode())
        b = self.tokenizer.token_bytes(token_id)
        return b.decode("utf-8", errors="replace"), list(b)

    def vllm_prompt_logprobs(self) -> list[dict[str, Any] | None]:
        """vLLM's prompt_logprobs: per prompt position None (the first) or {token id: {logprob,
        rank, decoded_token}} for the prompt's token and the top alternatives."""
        out: list[dict[str, Any] | None] = []
        for lp in self.prompt_logprobs or []:
            if lp is None:
                out.append(None)
                continue
            d = {str(lp.token_id): {"logprob": max(lp.logprob, _MIN_LOGPROB), "rank": lp.rank,
                                    "decoded_token": self._token(lp.token_id)[0]}}
            for rank, (tid, v) in enumerate(lp.top, 1):
                d.setdefault(str(tid), {"logprob": max(v, _MIN_LOGPROB), "rank": rank,
                                        "decoded_token": self._token(tid)[0]})
            out.append(d)
        return out

    def chat_logprobs(self, lps: list[Logprob], k: int, sampled_first: bool = False
                      ) -> dict[str, Any]:
        """sampled_first (logprob_token_ids): top_logprobs is the sampled token, then the ids
        asked, as vLLM's sampler fills it."""
        content = []
        for lp in lps:
            tok, b = self._token(lp.token_id)
            top = []
            pairs = lp.top[:k]
            if sampled_first:
                pairs = [(lp.token_id, lp.logprob), *(p for p in pairs if p[0] != lp.token_id)]
            for tid, v in pairs:
                t, tb = self._token(tid)
                top.append({"token": t, "logprob": max(v, _MIN_LOGPROB), "bytes": tb})
            content.append({"token": tok, "logprob": max(lp.logprob, _MIN_LOGPROB), "bytes": b,
                            "top_logprobs": top})
        return {"content": content}

    def completion_logprobs(self, lps: list[Logprob | None], k: int, offset: int,
                            prompt_ids: list[int] | None = None) -> dict[str, Any]:
        """text_offset counts characters from the start of the choice's text (echo included)."""
        out: dict[str, list] = {"tokens": [], "token_logprobs": [], "top_logprobs": [],
                                "text_offset": []}
        ids = prompt_ids or [lp.token_id for lp in lps if lp is not None]
        for i, lp in enumerate(lps):
            tid = lp.token_id if lp is not None else ids[i]
            tok, _ = self._token(tid)
            out["tokens"].append(tok)
            out["text_offset"].append(offset)
            offset += len(tok)
            if lp is None:
                out["token_logprobs"].append(None)
                out["top_logprobs"].append(None)
                continue
            out["token_logprobs"].append(max(lp.logprob, _MIN_LOGPROB))
            top = {tok: max(lp.logprob, _MIN_LOGPROB)}
            for t, v in lp.top[:k]:
                top.setdefault(self._token(t)[0], max(v, _MIN_LOGPROB))
            out["top_logprobs"].append(top)
        return out


def usage(choices: list[SampleState], num_prompts: int, n: int) -> Usage:
    firsts = choices[::n][:num_prompts]
    return Usage(sum(c.num_prompt_tokens for c in firsts),
                 sum(c.num_output_tokens for c in choices),
                 sum(c.num_cached_tokens for c in firsts))


def echo_prefix(req: GenerateRequest, c: ChoiceState) -> str:
    return (req.prompt_texts[c.index // req.params.n] or "") if req.echo else ""


def _prompt_logprobs(req: GenerateRequest, c: ChoiceState) -> dict[str, Any]:
    """The echoed prompt's completions-shaped logprobs (None for the first token, which has no
    logprob, and for any the engine did not report)."""
    ids = req.prompts[c.index // req.params.n]
    lps = list(c.prompt_logprobs or [])
    return c.completion_logprobs(lps + [None] * (len(ids) - len(lps)), req.logprobs, 0, ids)


def response(req: GenerateRequest, choices: list[ChoiceState]) -> dict[str, Any]:
    """The non-streaming body."""
    out = []
    for c in choices:
        if req.kind == "chat":
            msg = c.chat_message(echo_prefix(req, c))
            ch: dict[str, Any] = {"index": c.index, "message": msg, "logprobs": None}
            if req.logprobs is not None:
                ch["logprobs"] = c.chat_logprobs(c.logprobs, _num_top(req), _asked_ids(req))
        else:
            prefix = echo_prefix(req, c)
            ch = {"index": c.index, "text": prefix + c.text, "logprobs": None}
            if req.logprobs is not None:
                if req.echo:
                    lp = _prompt_logprobs(req, c)
                    gen = c.completion_logprobs(c.logprobs, _num_top(req), len(prefix))
                    for key in lp:
                        lp[key] += gen[key]
                else:
                    lp = c.completion_logprobs(c.logprobs, _num_top(req), 0)
                ch["logprobs"] = lp
        ch["finish_reason"] = c.api_finish_reason
        ch["stop_reason"] = c.stop_reason
        ch["token_ids"] = c.token_ids if req.return_token_ids else None
        if req.kind != "chat":  # vLLM: per choice for completions, top-level for chat
            ch.update(_prompt_extras(req, c))
        out.append(ch)
    body = {"id": req.request_id,
            "object": "chat.completion" if req.kind == "chat" else "text_completion",
            "created": req.created, "model": req.model, "choices": out,
            # null, as vLLM sends them: clients that compare key sets see OpenAI's fields
            "service_tier": None, "system_fingerprint": None,
            "usage": usage(choices, len(req.prompts), req.params.n).to_dict(
                req.prompt_tokens_details)}
    if req.kind == "chat":
        body.update(_prompt_extras(req, choices[0]))
    return body


def _num_top(req: GenerateRequest) -> int:
    """Alternatives per generated token: top_logprobs, then the logprob_token_ids asked."""
    return req.logprobs + len(req.params.logprob_token_ids or [])


def _asked_ids(req: GenerateRequest) -> bool:
    return bool(req.params.logprob_token_ids)


def _prompt_extras(req: GenerateRequest, c: ChoiceState) -> dict[str, Any]:
    """vLLM's prompt_logprobs and prompt_token_ids: null unless asked."""
    return {"prompt_logprobs": c.vllm_prompt_logprobs() if req.prompt_logprobs is not None
            else None,
            "prompt_token_ids": req.prompts[c.index // req.params.n] if req.return_token_ids
            else None}


def chunk(req: GenerateRequest, choice_dicts: list[dict[str, Any]],
          usage_dict: dict[str, Any] | None = None) -> dict[str, Any]:
    d: dict[str, Any] = {
        "id": req.request_id,
        "object": "chat.completion.chunk" if req.kind == "chat" else "text_completion",
        "created": req.created, "model": req.model, "choices": choice_dicts}
    if usage_dict is not None:
        d["usage"] = usage_dict
    return d


def chunk_choice(req: GenerateRequest, d: Delta, *, opening: bool = False) -> dict[str, Any]:
    """One choice's delta inside a streaming chunk. opening: before any output, chat's role or
    the echoed prompt of completions."""
    c, text, lps, finished = d.choice, d.text, d.logprobs, d.finished
    if req.kind == "chat":
        delta: dict[str, Any] = {"role": "assistant", "content": text} if opening else {}
        if d.reasoning:
            delta["reasoning_content"] = delta["reasoning"] = d.reasoning
        if text and not opening:
            delta["content"] = text
        if d.tool_calls:
            delta["tool_calls"] = d.tool_calls
        if finished and not delta:  # vLLM's last delta: clients do `text += delta.content`
            delta = {"content": ""}
        ch: dict[str, Any] = {"index": c.index, "delta": delta, "logprobs": None}
        if req.logprobs is not None and lps:
            ch["logprobs"] = c.chat_logprobs(lps, _num_top(req), _asked_ids(req))
    else:
        ch = {"index": c.index, "text": text, "logprobs": None}
        if req.logprobs is not None and opening and req.echo:   # the echoed prompt's own
            ch["logprobs"] = _prompt_logprobs(req, c)
        elif req.logprobs is not None and lps:
            offset = len(echo_prefix(req, c)) + len(c.text) - len(text)
            ch["logprobs"] = c.completion_logprobs(lps, _num_top(req), offset)
    ch["finish_reason"] = c.api_finish_reason if finished else None
    ch["stop_reason"] = c.stop_reason if finished else None
    if req.return_token_ids and not opening:  # the ids new since the last chunk
        ch["token_ids"] = c.token_ids[c.num_ids_sent:]
        c.num_ids_sent = len(c.token_ids)
    return ch


def stream_prompt_extras(req: GenerateRequest, c: ChoiceState) -> dict[str, Any] | None:
    """Streaming: prompt_token_ids / prompt_logprobs once, with the first chunk that can carry
    them (prompt logprobs arrive with the choice's first output)."""
    if c.prompt_extras_sent or (req.prompt_logprobs is None and not req.return_token_ids):
        return None
    if req.prompt_logprobs is not None and c.prompt_logprobs is None:
        return None
    c.prompt_extras_sent = True
    return {k: v for k, v in _prompt_extras(req, c).items() if v is not None}


async def stream_chunks(req: GenerateRequest, gen: Any) -> AsyncIterator[dict[str, Any]]:
    """A streamed chat/completions request's chunk payloads from its generation (serving.py):
    each choice's opening (chat's role, the echoed prompt), a chunk per Delta that says
    anything, the usage chunk when asked. Framing them as SSE is the HTTP edge's."""
    n, num_prompts, details = req.params.n, len(req.prompts), req.prompt_tokens_details
    continuous = req.include_usage and req.continuous_usage
    # Echo with logprobs waits for the prompt's logprobs, which come with the first output.
    echo_later = req.kind == "completion" and req.echo and req.logprobs is not None

    def full(choice: dict[str, Any], c: ChoiceState) -> dict[str, Any]:
        u = usage(gen.choices, num_prompts, n).to_dict(details) if continuous else None
        d = chunk(req, [choice], u)
        extras = stream_prompt_extras(req, c)
        if extras:  # vLLM: top-level for chat, in the choice for completions
            (d if req.kind == "chat" else choice).update(extras)
        return d

    for c in gen.choices:
        text = echo_prefix(req, c)
        if req.kind == "chat" or (text and not echo_later):
            yield full(chunk_choice(req, Delta(c, text, [], [], False), opening=True), c)
    async for ev in gen:
        if type(ev) is Usage:
            if req.include_usage:
                yield chunk(req, [], ev.to_dict(details))
            continue
        c = ev.choice
        if echo_later and not c.echo_sent:
            c.echo_sent = True
            yield full(chunk_choice(req, Delta(c, echo_prefix(req, c), [], [], False),
                                    opening=True), c)
        if ev.text or ev.logprobs or ev.finished or ev.reasoning or ev.tool_calls or (
                req.return_token_ids and ev.token_ids):
            yield full(chunk_choice(req, ev), c)
