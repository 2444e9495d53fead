"""Engine outputs -> text and OpenAI responses: SampleState (one sample's tokens, logprobs and
text: incremental detokenizing, stop strings, why it ended; the server's choices and LLM both use
it), ChoiceState (a server choice: chat parsers, logprob shapes) and the chat/completions response
and chunk builders. Plain dicts; no I/O, no torch."""
from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING, Any

from minserve.detokenizer import IncrementalDetokenizer, StopChecker, StopStrings
from minserve.engine.request import FinishReason, Logprob, RequestOutput
from minserve.sampling_params import SamplingParams

if TYPE_CHECKING:
    from minserve.protocol import GenerateRequest

_MIN_LOGPROB = -9999.0  # vLLM's floor for -inf, so the JSON stays finite


class SampleState:
    """One sample as its engine deltas arrive: token ids, logprobs, text and why it ended."""

    def __init__(self, tokenizer: Any, prompt_token_ids: list[int], params: SamplingParams,
                 stop: StopStrings | None = None) -> None:
        """stop: params.stop prepared once for all of a request's samples."""
        self.detok = IncrementalDetokenizer(tokenizer, prompt_token_ids,
                                            params.skip_special_tokens,
                                            params.spaces_between_special_tokens)
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

    def update(self, out: RequestOutput) -> tuple[str, list[Logprob], bool]:
        """-> (new text, new logprobs, stop string hit). On a hit the caller aborts the sample."""
        self.token_ids += out.new_token_ids
        self.num_cached_tokens = max(self.num_cached_tokens, out.num_cached_tokens)
        if out.num_prompt_tokens:
            self.num_prompt_tokens = out.num_prompt_tokens
        if out.prompt_logprobs is not None:
            self.prompt_logprobs = out.prompt_logprobs
        lps = list(out.logprobs or [])
        self.logprobs += lps
        delta = self.detok.push(out.new_token_ids) if out.new_token_ids else ""
        if out.finished:  # anything the detokenizer still held (a split UTF-8 char) comes out
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
        return delta, lps, hit is not None


class ChoiceState(SampleState):
    """One server choice (one prompt x one sample): the sample plus its chat parsers and the
    OpenAI shapes of its message, deltas and logprobs."""

    def __init__(self, index: int, req: GenerateRequest, tokenizer: Any,
                 prompt_token_ids: list[int]) -> None:
        super().__init__(tokenizer, prompt_token_ids, req.params, req.stop_strings)
        self.index = index
        self.tokenizer = tokenizer
        # chat only: reasoning / tool-call parsers (each keeps this choice's streaming state)
        self.reasoning, self.tools = req.make_parsers() if req.make_parsers else (None, None)
        self.num_tool_calls = 0
        self.echo_only = req.echo_only
        self.echo_sent = False   # streaming: the echoed prompt went out

    def update(self, out: RequestOutput) -> tuple[str, list[Logprob], bool]:
        if self.echo_only:  # max_tokens=0: drop the one sampled token; it ended on "length"
            reason = out.finish_reason
            if reason in (FinishReason.STOP, FinishReason.LENGTH):
                reason = FinishReason.LENGTH
            out = dataclasses.replace(out, new_token_ids=[], logprobs=None, finish_reason=reason,
                                      stop_reason=None)
        return super().update(out)

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
        msg["content"] = content if content is not None or calls else ""
        msg["tool_calls"] = [c.to_dict() for c in calls]
        return msg

    def chat_delta(self, text: str, finished: bool) -> dict[str, Any]:
        """The streamed delta for new text; on the last one the parsers flush what they held."""
        if self.reasoning is None and self.tools is None:
            return {"content": text} if text else {}
        out: dict[str, Any] = {}
        content = text
        if self.reasoning is not None:
            parts = [self.reasoning.extract_streaming(text) if text else None,
                     self.reasoning.finish() if finished else None]
            content = "".join((d or {}).get("content", "") for d in parts)
            thought = "".join((d or {}).get("reasoning_content", "") for d in parts)
            if thought:
                out["reasoning_content"] = out["reasoning"] = thought
        if self.tools is None:
            if content:
                out["content"] = content
            return out
        parts = [self.tools.extract_streaming(content) if content else None,
                 self.tools.finish() if finished else None]
        content = "".join((d or {}).get("content") or "" for d in parts)
        calls = [c for d in parts for c in (d or {}).get("tool_calls", [])]
        if content:
            out["content"] = content
        if calls:
            out["tool_calls"] = calls
            self.num_tool_calls += sum(1 for c in calls if "id" in c)  # a call's first delta
        return out

    # ---- logprobs in OpenAI's two shapes
    def _token(self, token_id: int) -> tuple[str, list[int]]:
        b = self.tokenizer.token_bytes(token_id)
        return b.decode("utf-8", errors="replace"), list(b)

    def chat_logprobs(self, lps: list[Logprob], k: int) -> dict[str, Any]:
        content = []
        for lp in lps:
            tok, b = self._token(lp.token_id)
            top = []
            for tid, v in lp.top[:k]:
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


def usage(choices: list[SampleState], num_prompts: int, n: int) -> dict[str, Any]:
    """Prompt tokens count once per prompt (not per sample), as OpenAI does."""
    firsts = choices[::n][:num_prompts]
    prompt = sum(c.num_prompt_tokens for c in firsts)
    completion = sum(c.num_output_tokens for c in choices)
    return {"prompt_tokens": prompt, "completion_tokens": completion,
            "total_tokens": prompt + completion,
            "prompt_tokens_details": {"cached_tokens": sum(c.num_cached_tokens for c in firsts)}}


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
                ch["logprobs"] = c.chat_logprobs(c.logprobs, req.logprobs)
        else:
            prefix = echo_prefix(req, c)
            ch = {"index": c.index, "text": prefix + c.text, "logprobs": None}
            if req.logprobs is not None:
                if req.echo:
                    lp = _prompt_logprobs(req, c)
                    gen = c.completion_logprobs(c.logprobs, req.logprobs, len(prefix))
                    for key in lp:
                        lp[key] += gen[key]
                else:
                    lp = c.completion_logprobs(c.logprobs, req.logprobs, 0)
                ch["logprobs"] = lp
        ch["finish_reason"] = c.api_finish_reason
        ch["stop_reason"] = c.stop_reason
        out.append(ch)
    return {"id": req.request_id,
            "object": "chat.completion" if req.kind == "chat" else "text_completion",
            "created": req.created, "model": req.model, "choices": out,
            "usage": usage(choices, len(req.prompts), req.params.n)}


def chunk(req: GenerateRequest, choice_dicts: list[dict[str, Any]],
          usage_dict: dict[str, Any] | None = None) -> dict[str, Any]:
    d: dict[str, Any] = {
        "id": req.request_id,
        "object": "chat.completion.chunk" if req.kind == "chat" else "text_completion",
        "created": req.created, "model": req.model, "choices": choice_dicts}
    if usage_dict is not None:
        d["usage"] = usage_dict
    return d


def echo_chunk_choice(req: GenerateRequest, c: ChoiceState) -> dict[str, Any]:
    """Streaming completions with echo: the prompt text, and with logprobs the prompt's logprobs
    (as the non-streaming body has them), which arrive with the choice's first output."""
    ch = chunk_choice(req, c, echo_prefix(req, c), [], echo=True)
    if req.logprobs is not None:
        ch["logprobs"] = _prompt_logprobs(req, c)
    return ch


def chunk_choice(req: GenerateRequest, c: ChoiceState, text: str, lps: list[Logprob],
                 *, role: bool = False, finished: bool = False, echo: bool = False
                 ) -> dict[str, Any]:
    """One choice's delta inside a streaming chunk."""
    if req.kind == "chat":
        delta: dict[str, Any] = {"role": "assistant", "content": text} if role else \
            c.chat_delta(text, finished)
        ch: dict[str, Any] = {"index": c.index, "delta": delta, "logprobs": None}
        if req.logprobs is not None and lps:
            ch["logprobs"] = c.chat_logprobs(lps, req.logprobs)
    else:
        ch = {"index": c.index, "text": text, "logprobs": None}
        if req.logprobs is not None and lps:
            offset = 0 if echo else len(echo_prefix(req, c)) + len(c.text) - len(text)
            ch["logprobs"] = c.completion_logprobs(lps, req.logprobs, offset)
    ch["finish_reason"] = c.api_finish_reason if finished else None
    ch["stop_reason"] = c.stop_reason if finished else None
    return ch
