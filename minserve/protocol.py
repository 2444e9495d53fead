"""OpenAI chat/completions request bodies -> GenerateRequest, one EngineRequest per prompt: every
field checked (bad input is an OpenAIError 4xx naming the parameter; message errors come from
chat.py), the chat template rendered and the prompt tokenized. Responses are built in output.py.
No torch, no I/O here."""
from __future__ import annotations

import dataclasses
import math
import time
import uuid
from collections.abc import Callable, Container
from dataclasses import dataclass, field
from typing import Any

from minserve.chat import ChatContentError, ChatTemplateError, ImageParts, normalize_messages
from minserve.detokenizer import StopStrings
from minserve.engine.request import EngineRequest, prompt_length_error
from minserve.http import OpenAIError, model_not_found
from minserve.reasoning import get_reasoning_parser, prompt_opens_reasoning
from minserve.sampling_params import SamplingParams
from minserve.structured import StructuredOutputError, request_options, structured_from_request
from minserve.tool_parsers.constrained import (
    NamedToolCallParser,
    RequiredToolCallParser,
    ToolChoiceError,
    named_tool,
    tool_choice_spec,
)
from minserve.tool_parsers.generic import GENERIC, auto_call_spec, with_tools_in_system
from minserve.tool_parsers.registry import get_tool_parser
from minserve.value_text import value_text

MAX_N = 128
MAX_STOP = 16
MAX_STOP_CHARS = 16384  # all stop strings together: they are scanned at every token of every choice


@dataclass
class ServingContext:
    """What parsing needs from the loaded engine."""
    tokenizer: Any            # None: --skip-tokenizer-init (token ids in and out only)
    model_names: list[str]
    max_model_len: int
    vocab_size: int
    generation_defaults: dict[str, Any] = field(default_factory=dict)
    # Compiles a structured-output spec against the tokenizer (StructuredOutputError when it is
    # invalid), so a bad schema is a 400 here and not a failure in the engine thread.
    check_structured: Callable[[dict[str, Any]], None] | None = None
    enable_auto_tool_choice: bool = False
    # "generic" (a chat template that renders no tools): protocol puts the tools into the system
    # message and constrains "auto" (tool_parsers/generic.py)
    tool_call_parser: str | None = None
    reasoning_parser: str | None = None
    # --structured-outputs-config as spec options ({"any_whitespace": False, ...}); a request's
    # own structured_outputs switches win.
    structured_defaults: dict[str, bool] = field(default_factory=dict)
    # A longer prompt text cannot fit in max_model_len tokens whatever it tokenizes to (App sets
    # it from the tokenizer's longest token); None: no early check.
    max_prompt_chars: int | None = None
    max_logprobs: int = 20  # --max-logprobs (-1: no cap)
    force_include_usage: bool = False        # --enable-force-include-usage
    prompt_tokens_details: bool = False      # --enable-prompt-tokens-details
    return_tokens_as_token_ids: bool = False  # --return-tokens-as-token-ids
    # Vision-language models (EngineInfo's): None / 0 for a text-only model.
    image_processor: Any = None
    image_limit: int = 0
    media_policy: Any = None
    # LoRA adapters served as models (`model` = an adapter name); a live view, loads show up
    adapter_names: Container[str] = ()


def prompt_chars_limit(max_model_len: int, max_token_bytes: int) -> int:
    """A token covers at most max_token_bytes UTF-8 bytes and a character is at least one byte;
    x4 leaves room for normalizers that shorten text (NFKC ligatures)."""
    return 4 * max_model_len * max_token_bytes


def encode_prompt(ctx: ServingContext, text: str, what: str,
                  add_special_tokens: bool = True) -> list[int]:
    """Tokenize a prompt, refusing at once a text too long to fit (a 30 MB prompt took 34 s to
    tokenize, only to be refused for its length)."""
    if ctx.tokenizer is None:
        raise OpenAIError(400, f"{what}: this server runs with --skip-tokenizer-init: send "
                          "the prompt as token ids (completions only)", param=what)
    if ctx.max_prompt_chars is not None and len(text) > ctx.max_prompt_chars:
        raise OpenAIError(400, f"This model's maximum context length is {ctx.max_model_len} "
                          f"tokens. However, your request has {len(text)} characters of {what}, "
                          f"far more than fit in {ctx.max_model_len} tokens. Please reduce the "
                          f"length of the {what}.", param=what)
    return ctx.tokenizer.encode(text, add_special_tokens=add_special_tokens)


@dataclass
class GenerateRequest:
    kind: str                         # "chat" | "completion"
    request_id: str
    model: str
    requests: list[EngineRequest]     # one per completions prompt; chat has exactly one
    prompt_texts: list[str | None]    # for echo
    stream: bool = False
    include_usage: bool = False
    continuous_usage: bool = False
    echo: bool = False
    logprobs: int | None = None       # top alternatives per token; None = no logprobs
    created: int = field(default_factory=lambda: int(time.time()))
    # chat: () -> (reasoning parser | None, tool parser | None), fresh per choice (they keep state)
    make_parsers: Callable[[], tuple[Any, Any]] | None = None
    prompt_tokens_details: bool = False  # usage.prompt_tokens_details (else null, as vLLM)
    # vLLM's extras: prompt logprobs asked (top-k; None: `prompt_logprobs` is null), token ids
    # in the response, logprob tokens as "token_id:N"
    prompt_logprobs: int | None = None
    return_token_ids: bool = False
    tokens_as_token_ids: bool = False
    # completions with echo and max_tokens=0 (OpenAI's legacy scoring call, as lm-eval sends it):
    # the engine samples one token, which cannot be avoided; output.py drops it
    echo_only: bool = False
    # chat with image parts (chat.ImageRef, in prompt order): the caller fetches them and calls
    # attach_images(), which expands the prompt's placeholders and checks its length
    images: list[Any] = field(default_factory=list)
    # params.stop prepared once for all choices, while parsing (off the event loop)
    stop_strings: StopStrings | None = None

    def __post_init__(self) -> None:
        if self.stop_strings is None and self.params.stop:
            self.stop_strings = StopStrings(self.params.stop)

    @property
    def prompts(self) -> list[list[int]]:
        return [r.prompt_token_ids for r in self.requests]

    @property
    def params(self) -> SamplingParams:
        return self.requests[0].sampling_params


def _engine_requests(request_id: str, prompts: list[list[int]], params: SamplingParams,
                     body: dict, ctx: ServingContext) -> list[EngineRequest]:
    """One EngineRequest per prompt, named request_id (one prompt) or request_id-p."""
    salt = body.get("cache_salt")
    if salt is not None and (not isinstance(salt, str) or not salt):
        raise _bad("cache_salt", "must be a non-empty string")
    model = body.get("model")
    adapter = model if model is not None and model in ctx.adapter_names else None
    return [EngineRequest(request_id if len(prompts) == 1 else f"{request_id}-{p}", ids, params,
                          adapter_name=adapter, cache_salt=salt)
            for p, ids in enumerate(prompts)]


# ---------------------------------------------------------------- typed field readers
def _bad(param: str, msg: str) -> OpenAIError:
    return OpenAIError(400, f"{param}: {msg}", param=param)


# vLLM's request models validate in pydantic's lax mode: "5" and 5.0 are an int, "0.5" a number,
# "true"/"yes"/"1"/1 a boolean. The same forms pass here; anything else is a 400.
_TRUE, _FALSE = {"1", "on", "t", "true", "y", "yes"}, {"0", "off", "f", "false", "n", "no"}


def _lax_number(v: Any, integer: bool) -> Any:
    """v as an int/float the way pydantic's lax mode reads it, or None when it cannot."""
    if isinstance(v, bool):
        return int(v)
    if isinstance(v, str):
        try:
            v = float(v.strip()) if not integer or not v.strip().lstrip("+-").isdigit() \
                else int(v.strip())
        except ValueError:
            return None
    if isinstance(v, int) or not isinstance(v, float):
        return v if isinstance(v, int) else None
    if integer:
        return v if not math.isfinite(v) or not v.is_integer() else \
            (int(v) if abs(v) < 2**63 else v)
    return v


def _num(body: dict, name: str, default: Any, lo: float | None = None, hi: float | None = None,
         integer: bool = False, lo_open: bool = False) -> Any:
    raw = body.get(name)
    if raw is None:
        return default
    v = _lax_number(raw, integer)
    if v is None:
        raise _bad(name, f"must be {'an integer' if integer else 'a number'}, got {value_text(raw)}")
    if isinstance(v, float) and not math.isfinite(v):
        raise _bad(name, "must be a finite number")
    if integer and isinstance(v, float) and v.is_integer():  # past int64, as a JSON float
        raise _bad(name, f"{raw!r} is out of range (a 64-bit integer)")
    if integer and isinstance(v, float):
        raise _bad(name, f"must be an integer, got {raw!r}")
    if integer and abs(v) >= 2**63:
        raise _bad(name, f"{raw!r} is out of range (a 64-bit integer)")
    if lo is not None and (v <= lo if lo_open else v < lo):
        raise _bad(name, f"must be {'>' if lo_open else '>='} {lo}, got {v}")
    if hi is not None and v > hi:
        raise _bad(name, f"must be <= {hi}, got {v}")
    return v


def _lax_bool(v: Any) -> bool | None:
    if isinstance(v, bool):
        return v
    if isinstance(v, (int, float)) and v in (0, 1):
        return bool(v)
    if isinstance(v, str) and v.strip().lower() in _TRUE | _FALSE:
        return v.strip().lower() in _TRUE
    return None


def _bool(body: dict, name: str, default: bool) -> bool:
    v = body.get(name)
    if v is None:
        return default
    b = _lax_bool(v)
    if b is None:
        raise _bad(name, f"must be a boolean, got {value_text(v)}")
    return b


def _int_list(v: Any, name: str, vocab_size: int | None = None) -> list[int]:
    if not isinstance(v, list) or not all(type(t) is int for t in v):
        raise _bad(name, "must be a list of integers")
    bad = next((t for t in v if t < 0 or t >= vocab_size), None) if vocab_size else None
    if bad is not None:  # vLLM's words, with the id
        raise _bad(name, f"Token id {bad} is out of vocabulary (the vocabulary has {vocab_size} "
                   "tokens)")
    return v


def _check_model(body: dict, ctx: ServingContext) -> str:
    model = body.get("model")
    if model is None:
        return ctx.model_names[0]
    if not isinstance(model, str):
        raise _bad("model", "must be a string")
    if model not in ctx.model_names and model not in ctx.adapter_names:
        raise model_not_found(model, ctx.model_names)
    return model


# ---------------------------------------------------------------- sampling
def _stop(body: dict) -> list[str]:
    stop = body.get("stop")
    if stop is None:
        return []
    stop = [stop] if isinstance(stop, str) else stop
    if not isinstance(stop, list) or not all(isinstance(s, str) for s in stop):
        raise _bad("stop", "must be a string or a list of strings")
    if len(stop) > MAX_STOP:
        raise _bad("stop", f"at most {MAX_STOP} stop strings")
    num_chars = sum(map(len, stop))
    if num_chars > MAX_STOP_CHARS:
        raise _bad("stop", f"the stop strings have {num_chars} characters; at most "
                   f"{MAX_STOP_CHARS} together")
    return [s for s in stop if s]


def _num_logprobs(body: dict, name: str, ctx: ServingContext) -> int | None:
    """How many alternatives per token: -1 is the whole vocabulary; vLLM refuses more than
    --max-logprobs (-1 there: no cap) in its words."""
    k = _num(body, name, None, lo=-1, integer=True)
    if k is None:
        return None
    num = ctx.vocab_size if k == -1 else k
    cap = ctx.vocab_size if ctx.max_logprobs == -1 else ctx.max_logprobs
    if num > cap:
        raise _bad(name, f"Requested sample logprobs of {num}"
                   f"{' (-1: the whole vocabulary)' if k == -1 else ''}, which is greater than "
                   f"max allowed: {cap} (--max-logprobs)")
    return num


def _logit_bias(body: dict, vocab_size: int) -> dict[int, float] | None:
    lb = body.get("logit_bias")
    if lb is None:
        return None
    if not isinstance(lb, dict):
        raise _bad("logit_bias", "must be an object of token id -> bias")
    out: dict[int, float] = {}
    for k, v in lb.items():
        try:
            tok = int(k)
        except ValueError:
            raise _bad("logit_bias", f"key {value_text(k)} is not a token id") from None
        if not 0 <= tok < vocab_size:
            raise _bad("logit_bias", f"token id {tok} is out of range [0, {vocab_size})")
        out[tok] = float(_num({"logit_bias": v}, "logit_bias", 0.0, -100, 100))
    return out


def _structured(body: dict, ctx: ServingContext) -> dict[str, Any] | None:
    """Every spelling of a structured-output constraint (structured.py reads them all), with the
    server's --structured-outputs-config where the request sets no option of its own."""
    try:
        spec = structured_from_request(body)
        return None if spec is None else {**ctx.structured_defaults, **spec}
    except StructuredOutputError as e:
        raise OpenAIError(400, str(e), param=_structured_param(body)) from None


def _structured_param(body: dict) -> str:
    for key in ("response_format", "structured_outputs", "guided_json", "guided_regex",
                "guided_choice", "guided_grammar", "guided_whitespace_pattern"):
        if body.get(key) is not None:
            return key
    return "response_format"


def _check_structured(ctx: ServingContext, spec: dict[str, Any] | None, param: str) -> None:
    if spec is None or ctx.check_structured is None:
        return
    try:
        ctx.check_structured(spec)
    except StructuredOutputError as e:
        raise OpenAIError(400, f"{param}: {e}", param=param) from None


def _sampling(body: dict, ctx: ServingContext, max_tokens_default: int | None,
              max_tokens_names: tuple[str, ...]) -> SamplingParams:
    gd = ctx.generation_defaults
    max_tokens = max_tokens_default
    for name in max_tokens_names:
        v = _num(body, name, None, lo=1, integer=True)
        if v is not None:
            max_tokens = v
            break
    else:
        default = gd.get("max_tokens") or gd.get("max_new_tokens")
        if default and (max_tokens is None or default < max_tokens):
            max_tokens = int(default)
    n = _num(body, "n", 1, lo=1, hi=MAX_N, integer=True)
    best_of = _num(body, "best_of", None, lo=1, integer=True)
    if best_of is not None and best_of != n:
        raise _bad("best_of", "best_of other than n is not supported")
    min_tokens = _num(body, "min_tokens", 0, lo=0, integer=True)
    if max_tokens is not None and min_tokens > max_tokens:
        raise _bad("min_tokens", f"must be <= max_tokens ({max_tokens}), got {min_tokens}")
    top_k = _num(body, "top_k", gd.get("top_k", 0), lo=-1, integer=True)
    stop_token_ids = body.get("stop_token_ids")
    return SamplingParams(
        n=n,
        temperature=_num(body, "temperature", gd.get("temperature", 1.0), lo=0, hi=100),
        top_p=_num(body, "top_p", gd.get("top_p", 1.0), lo=0, hi=1, lo_open=True),
        top_k=0 if top_k in (-1, 0) else top_k,
        min_p=_num(body, "min_p", gd.get("min_p", 0.0), lo=0, hi=1),
        seed=_num(body, "seed", None, integer=True),
        presence_penalty=_num(body, "presence_penalty", 0.0, lo=-2, hi=2),
        frequency_penalty=_num(body, "frequency_penalty", 0.0, lo=-2, hi=2),
        repetition_penalty=_num(body, "repetition_penalty", gd.get("repetition_penalty", 1.0),
                                lo=0, hi=100, lo_open=True),
        logit_bias=_logit_bias(body, ctx.vocab_size),
        min_tokens=min_tokens,
        max_tokens=max_tokens,
        stop=_stop(body),
        stop_token_ids=[] if stop_token_ids is None else _int_list(
            stop_token_ids, "stop_token_ids", ctx.vocab_size),
        ignore_eos=_bool(body, "ignore_eos", False),
        skip_special_tokens=_bool(body, "skip_special_tokens", True),
        spaces_between_special_tokens=_bool(body, "spaces_between_special_tokens", True),
        include_stop_str_in_output=_bool(body, "include_stop_str_in_output", False),
        structured=_structured(body, ctx),
        **_beam(body),
    )


def _beam(body: dict) -> dict[str, Any]:
    """vLLM's use_beam_search (n beams), length_penalty and early_stopping."""
    if not _bool(body, "use_beam_search", False):
        return {}
    early = body.get("early_stopping", False)
    if early != "never":
        early = _bool(body, "early_stopping", False)
    if body.get("structured_outputs") is not None or body.get("response_format") not in (
            None, {"type": "text"}):
        raise _bad("use_beam_search", "cannot be combined with structured outputs")
    return {"use_beam_search": True, "early_stopping": early,
            "length_penalty": _num(body, "length_penalty", 1.0)}


def _stream_opts(body: dict, stream: bool, force_usage: bool) -> tuple[bool, bool]:
    so = body.get("stream_options")
    if so is None:
        return stream and force_usage, False
    if not isinstance(so, dict):
        raise _bad("stream_options", "must be an object")
    if not stream:
        raise _bad("stream_options", "is only allowed when stream is true")
    return (_bool(so, "include_usage", False) or force_usage,
            _bool(so, "continuous_usage_stats", False))


def _truncate(body: dict, ctx: ServingContext, prompt: list[int]) -> list[int]:
    """vLLM's truncate_prompt_tokens (-1: max_model_len) and truncation_side: the prompt is cut
    before the length check, and usage counts what is left."""
    k = _num(body, "truncate_prompt_tokens", None, lo=-1, integer=True)
    side = body.get("truncation_side", "left")
    if side not in ("left", "right"):
        raise _bad("truncation_side", f"must be 'left' or 'right', got {side!r}")
    if k is None:
        return prompt
    k = ctx.max_model_len if k == -1 else k
    if k > ctx.max_model_len:
        raise _bad("truncate_prompt_tokens", f"must be <= max_model_len ({ctx.max_model_len}), "
                   f"got {k}")
    if len(prompt) <= k:
        return prompt
    return prompt[len(prompt) - k:] if side == "left" else prompt[:k]


def _vllm_extras(body: dict, ctx: ServingContext, params: SamplingParams) -> dict[str, Any]:
    """prompt_logprobs / return_token_ids / return_tokens_as_token_ids -> GenerateRequest
    fields; the prompt's logprobs come from the engine through SamplingParams."""
    plp = body.get("prompt_logprobs")
    if plp is not None and _lax_number(plp, True) == -1:
        raise _bad("prompt_logprobs", "-1 (the whole vocabulary) is not supported for prompt "
                   "logprobs; ask for at most --max-logprobs")
    k = _num_logprobs(body, "prompt_logprobs", ctx)
    if k is not None:
        params.prompt_logprobs = max(k, params.prompt_logprobs or 0)
    asked = body.get("logprob_token_ids")
    if asked is not None:  # logprobs of these ids at every generated position (implies logprobs)
        params.logprob_token_ids = _int_list(asked, "logprob_token_ids", ctx.vocab_size) or None
        if params.logprob_token_ids and params.logprobs is None:
            params.logprobs = 0
    if ctx.tokenizer is None and (params.stop or params.structured is not None):
        raise _bad("stop" if params.stop else _structured_param(body),
                   "needs the tokenizer, which --skip-tokenizer-init leaves out")
    return {"prompt_logprobs": k,
            "return_token_ids": _bool(body, "return_token_ids", ctx.tokenizer is None),
            "tokens_as_token_ids": _bool(body, "return_tokens_as_token_ids",
                                         ctx.return_tokens_as_token_ids)}


def _check_length(ctx: ServingContext, prompt: list[int], params: SamplingParams,
                  what: str) -> None:
    error = prompt_length_error(len(prompt), params.max_tokens, ctx.max_model_len, what)
    if error is not None:
        raise OpenAIError(400, error[0], param=error[1])


def _common(body: Any, ctx: ServingContext) -> tuple[str, bool, bool, bool]:
    if not isinstance(body, dict):
        raise OpenAIError(400, "the request body must be a JSON object")
    model = _check_model(body, ctx)
    stream = _bool(body, "stream", False)
    if body.get("user") is not None and not isinstance(body["user"], str):
        raise _bad("user", "must be a string")
    return (model, stream, *_stream_opts(body, stream, ctx.force_include_usage))


# ---------------------------------------------------------------- chat
def _chat_error(e: Exception) -> OpenAIError:
    """chat.py's errors (bad messages, chat_template_kwargs, a failing template) -> a 400."""
    msg = str(e) if isinstance(e, (ChatContentError, ChatTemplateError)) else \
        f"chat template error: {e}"
    return OpenAIError(400, msg, param=getattr(e, "param", None) or "messages")


def _image_parts(ctx: ServingContext) -> ImageParts | None:
    """A vision model's collector of the chat's image parts; None (image parts refused) else."""
    return ImageParts(ctx.image_processor.placeholder) if ctx.image_processor else None


def parse_chat(body: Any, ctx: ServingContext) -> GenerateRequest:
    model, stream, include_usage, continuous = _common(body, ctx)
    if ctx.tokenizer is None:
        raise OpenAIError(400, "chat needs the tokenizer and its chat template, which "
                          "--skip-tokenizer-init leaves out: use /v1/completions with token ids",
                          param="messages")
    try:  # the template reads its own copy; this one is for checking and for echo
        messages = normalize_messages(body.get("messages"),
                                      images=_image_parts(ctx))
    except ChatContentError as e:
        raise _chat_error(e) from None
    want_logprobs = _bool(body, "logprobs", False)
    top = _num_logprobs(body, "top_logprobs", ctx)
    if top is not None and top > 0 and not want_logprobs:
        raise _bad("top_logprobs", "requires logprobs to be true")
    add_gen = _bool(body, "add_generation_prompt", True)
    cont = _bool(body, "continue_final_message", False)
    if add_gen and cont and "add_generation_prompt" in body:
        raise _bad("continue_final_message", "cannot be combined with add_generation_prompt")
    if cont:
        add_gen = False
    params = _sampling(body, ctx, None, ("max_completion_tokens", "max_tokens"))
    params.logprobs = (top or 0) if want_logprobs else None
    tools, make_tool_parser, forced = _tools(body, ctx, params)
    _check_structured(ctx, params.structured, "tool_choice" if forced else _structured_param(body))
    images = _image_parts(ctx)
    template_messages = body["messages"]
    if ctx.tool_call_parser == GENERIC and make_tool_parser is not None:
        template_messages = with_tools_in_system(template_messages, tools)
    try:
        text = ctx.tokenizer.apply_chat_template(
            template_messages, add_generation_prompt=add_gen, continue_final_message=cont,
            tools=tools, chat_template_kwargs=body.get("chat_template_kwargs"), images=images)
    except (ValueError, TypeError, KeyError) as e:  # chat.py's errors are ValueErrors
        raise _chat_error(e) from None
    prompt = _truncate(body, ctx, encode_prompt(ctx, text, "messages", add_special_tokens=False))
    reasoning_cls = get_reasoning_parser(ctx.reasoning_parser) if ctx.reasoning_parser else None
    opens = reasoning_cls is not None and prompt_opens_reasoning(text)

    def make_parsers() -> tuple[Any, Any]:
        return (reasoning_cls(start_in_reasoning=opens) if reasoning_cls else None,
                make_tool_parser() if make_tool_parser else None)
    refs = images.found if images is not None else []
    if refs and body.get("truncate_prompt_tokens") is not None:  # it could cut an image apart
        raise _bad("truncate_prompt_tokens", "cannot be combined with images")
    if refs:   # the length is known once the images are in (attach_images)
        _media(lambda: _check_image_count(len(refs), ctx.image_limit))
    else:
        _check_length(ctx, prompt, params, "messages")
    echo = _bool(body, "echo", False)
    # vLLM echoes the last message only when it has the response's role: "assistant" with a
    # generation prompt, else the last message's own role (i.e. always).
    last = messages[-1]
    echoed = last["content"] if echo and (not add_gen or last["role"] == "assistant") else None
    request_id = f"chatcmpl-{uuid.uuid4().hex}"
    extras = _vllm_extras(body, ctx, params)  # before params.logprobs is read below
    return GenerateRequest("chat", request_id, model,
                           _engine_requests(request_id, [prompt], params, body, ctx),
                           [echoed], stream, include_usage, continuous, echo,
                           params.logprobs,
                           make_parsers=make_parsers if reasoning_cls or make_tool_parser
                           else None, prompt_tokens_details=ctx.prompt_tokens_details,
                           images=refs, **extras)


def parse_chat_batch(body: Any, ctx: ServingContext) -> GenerateRequest:
    """vLLM's POST /v1/chat/completions/batch: a chat body whose `messages` is a list of
    conversations -> one request, one choice per conversation (x n), not streamed."""
    if not isinstance(body, dict):
        raise OpenAIError(400, "the request body must be a JSON object")
    convs = body.get("messages")
    if not isinstance(convs, list) or not convs or not all(isinstance(c, list) for c in convs):
        raise _bad("messages", "must be a non-empty list of conversations (lists of messages)")
    if _bool(body, "stream", False):
        raise _bad("stream", "the batch chat route does not stream")
    parsed = [parse_chat({**body, "messages": conv}, ctx) for conv in convs]
    if any(p.images for p in parsed):
        raise _bad("messages", "the batch chat route takes text conversations only")
    first = parsed[0]
    if len(first.prompts) * len(parsed) * first.params.n > MAX_N:
        raise _bad("n", f"conversations x n must be <= {MAX_N}")
    first.requests = [dataclasses.replace(p.requests[0], request_id=f"{first.request_id}-{i}")
                      for i, p in enumerate(parsed)]
    first.prompt_texts = [p.prompt_texts[0] for p in parsed]
    return first


def attach_images(req: GenerateRequest, images: list[Any], ctx: ServingContext) -> None:
    """A parsed chat request's images (fetched and decoded by the caller) -> its prompt with
    each placeholder expanded to the image's tokens, then the length check parse_chat left."""
    from minserve.multimodal.inputs import attach_images as attach

    (request,) = req.requests
    _media(lambda: attach(request, images, ctx.image_processor))
    _check_length(ctx, request.prompt_token_ids, request.sampling_params, "messages")


def _check_image_count(num_images: int, limit: int) -> None:
    from minserve.multimodal.inputs import check_image_count

    check_image_count(num_images, limit)


def media_error(e: Exception) -> OpenAIError:
    """A multimodal.MediaError (bad URL, fetch failure, not an image...) -> its 400."""
    return OpenAIError(400, str(e), param=getattr(e, "param", None) or "messages")


def _media(fn: Callable[[], Any]) -> Any:
    from minserve.multimodal.image import MediaError

    try:
        return fn()
    except MediaError as e:
        raise media_error(e) from None


# ---------------------------------------------------------------- tools
def _tools(body: dict, ctx: ServingContext, params: SamplingParams
           ) -> tuple[list[dict] | None, Callable[[], Any] | None, bool]:
    """tools + tool_choice as vLLM does them -> (tools for the template, a parser factory (one
    parser per choice: they keep streaming state), forced). Forced ("required" or a named
    function) constrains the output (params.structured) on any model; "auto" parses the
    model's own call format and needs --enable-auto-tool-choice."""
    tools = body.get("tools")
    if tools is not None and (not isinstance(tools, list)
                              or not all(isinstance(t, dict) for t in tools)):
        raise _bad("tools", "must be a list of tool objects")
    tools = tools or None
    choice = body.get("tool_choice")
    parallel = _bool(body, "parallel_tool_calls", True)
    if choice is not None and choice != "none" and tools is None:
        raise _bad("tool_choice", "is only allowed when `tools` are given")
    if choice is None:  # OpenAI's default is "auto" with tools; vLLM: "none" unless enabled
        choice = "auto" if tools and ctx.enable_auto_tool_choice else "none"
    if choice == "none" or tools is None:
        return tools, None, False
    if choice == "auto":
        if not (ctx.enable_auto_tool_choice and ctx.tool_call_parser):
            raise _bad("tool_choice", '"auto" tool choice requires --enable-auto-tool-choice '
                       "and --tool-call-parser to be set")
        parser_cls = get_tool_parser(ctx.tool_call_parser)
        if parser_cls.needs_special_tokens:  # the call markers are special tokens
            params.skip_special_tokens = False
        if ctx.tool_call_parser == GENERIC and params.structured is None:
            try:
                params.structured = {**ctx.structured_defaults, **auto_call_spec(tools)}
            except ToolChoiceError as e:
                raise _bad("tools", str(e)) from None
        return tools, lambda: parser_cls(tools), False
    try:
        spec = tool_choice_spec(choice, tools, parallel)
        name = named_tool(choice)
    except ToolChoiceError as e:
        raise _bad("tool_choice", str(e)) from None
    if params.structured is not None:
        raise _bad("tool_choice", f"{value_text(choice)} tool choice cannot be combined with "
                   f"{_structured_param(body)}")
    # The whitespace options of structured outputs apply to the calls' JSON as well.
    try:
        spec.update(ctx.structured_defaults, **request_options(body.get("structured_outputs")))
    except StructuredOutputError as e:
        raise _bad("structured_outputs", str(e)) from None
    ws = body.get("guided_whitespace_pattern")
    if isinstance(ws, str):
        spec["whitespace_pattern"] = ws
    params.structured = spec
    if name is not None:
        return tools, lambda: NamedToolCallParser(name), True
    return tools, RequiredToolCallParser, True


# ---------------------------------------------------------------- completions
def _prompts(body: dict, ctx: ServingContext) -> tuple[list[list[int]], list[str | None]]:
    p = body.get("prompt")
    if isinstance(p, str):
        p = [p]
    if not isinstance(p, list) or not p:
        raise _bad("prompt", "must be a string, a list of strings, a list of token ids or a "
                   "list of lists of token ids, and not empty")
    if all(type(t) is int for t in p):
        return [_int_list(p, "prompt", ctx.vocab_size)], [None]
    if all(isinstance(s, str) for s in p):
        return [encode_prompt(ctx, s, "prompt") for s in p], list(p)
    if all(isinstance(s, list) for s in p):
        return [_int_list(s, "prompt", ctx.vocab_size) for s in p], [None] * len(p)
    raise _bad("prompt", "mixes strings, token ids and lists")


def parse_completion(body: Any, ctx: ServingContext) -> GenerateRequest:
    model, stream, include_usage, continuous = _common(body, ctx)
    if body.get("suffix"):
        raise _bad("suffix", "is not supported (no fill-in-the-middle)")
    prompts, texts = _prompts(body, ctx)
    cut = [_truncate(body, ctx, ids) for ids in prompts]
    texts = [t if len(c) == len(ids) else None for t, c, ids in zip(texts, cut, prompts,
                                                                     strict=True)]
    prompts = cut
    echo = _bool(body, "echo", False)
    echo_only = type(body.get("max_tokens")) is int and body["max_tokens"] == 0
    if echo_only and not echo:
        raise _bad("max_tokens", "must be >= 1 (0 is accepted only with echo=true, to score "
                   "the prompt)")
    if echo_only:
        body = {**body, "max_tokens": 1}
    params = _sampling(body, ctx, 16, ("max_tokens",))
    params.logprobs = _num_logprobs(body, "logprobs", ctx)
    if echo and params.logprobs is not None:
        params.prompt_logprobs = params.logprobs
    extras = _vllm_extras(body, ctx, params)
    if len(prompts) * params.n > MAX_N:
        raise _bad("n", f"prompts x n must be <= {MAX_N}")
    for ids in prompts:
        _check_length(ctx, ids, params, "prompt")
    _check_structured(ctx, params.structured, _structured_param(body))
    if echo and ctx.tokenizer is None:
        raise _bad("echo", "needs the tokenizer, which --skip-tokenizer-init leaves out")
    if echo:
        texts = [t if t is not None else ctx.tokenizer.decode(ids, skip_special_tokens=False)
                 for t, ids in zip(texts, prompts, strict=True)]
    request_id = f"cmpl-{uuid.uuid4().hex}"
    return GenerateRequest("completion", request_id, model,
                           _engine_requests(request_id, prompts, params, body, ctx), texts,
                           stream, include_usage, continuous, echo, params.logprobs,
                           echo_only=echo_only, prompt_tokens_details=ctx.prompt_tokens_details,
                           **extras)
