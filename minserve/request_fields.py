"""Typed readers of an OpenAI request body's fields, as vLLM's pydantic models read them in lax
mode ("5" and 5.0 are an int, "true"/"yes"/1 a boolean), and the SamplingParams fields a body asks
for; protocol.py builds its requests from them. Bad input is an OpenAIError 400 naming the field.
No torch, no I/O."""
from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any

from minserve.http import OpenAIError, model_not_found
from minserve.structured import StructuredOutputError, structured_from_request
from minserve.value_text import value_text

if TYPE_CHECKING:
    from minserve.protocol import ServingContext

MAX_N = 128
INT64_MIN, INT64_MAX = -2**63, 2**63 - 1
MAX_STOP = 16
MAX_STOP_CHARS = 16384  # all stop strings together: they are scanned at every token of every choice


def bad(param: str, msg: str) -> OpenAIError:
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


def number(body: dict, name: str, default: Any, lo: float | None = None, hi: float | None = None,
           integer: bool = False, lo_open: bool = False) -> Any:
    raw = body.get(name)
    if raw is None:
        return default
    v = _lax_number(raw, integer)
    if v is None:
        raise bad(name, f"must be {'an integer' if integer else 'a number'}, got {value_text(raw)}")
    if isinstance(v, float) and not math.isfinite(v):
        raise bad(name, "must be a finite number")
    if integer and isinstance(v, float) and not v.is_integer():
        raise bad(name, f"must be an integer, got {raw!r}")
    # an integral float left here is past int64 too (_lax_number converts the others)
    if integer and (isinstance(v, float) or not INT64_MIN <= v <= INT64_MAX):
        raise _int64_error(name, v, raw)
    if lo is not None and (v <= lo if lo_open else v < lo):
        raise bad(name, f"must be {'>' if lo_open else '>='} {lo}, got {v}")
    if hi is not None and v > hi:
        raise bad(name, f"must be <= {hi}, got {v}")
    return v


def _int64_error(name: str, v: float, raw: Any) -> OpenAIError:
    """An integer field past int64, in the words of vLLM's pydantic models (their integers are
    bounded by torch.long), the value shown as sent."""
    bound, kind = (f"greater than or equal to {INT64_MIN}", "greater_than_equal") if v < 0 \
        else (f"less than or equal to {INT64_MAX}", "less_than_equal")
    return bad(name, f"Input should be {bound} [type={kind}], got {value_text(raw)}")


def _lax_bool(v: Any) -> bool | None:
    if isinstance(v, bool):
        return v
    if isinstance(v, (int, float)) and v in (0, 1):
        return bool(v)
    if isinstance(v, str) and v.strip().lower() in _TRUE | _FALSE:
        return v.strip().lower() in _TRUE
    return None


def boolean(body: dict, name: str, default: bool) -> bool:
    v = body.get(name)
    if v is None:
        return default
    b = _lax_bool(v)
    if b is None:
        raise bad(name, f"must be a boolean, got {value_text(v)}")
    return b


def int_list(v: Any, name: str, vocab_size: int | None = None) -> list[int]:
    if not isinstance(v, list) or not all(type(t) is int for t in v):
        raise bad(name, "must be a list of integers")
    wrong = next((t for t in v if t < 0 or t >= vocab_size), None) if vocab_size else None
    if wrong is not None:  # vLLM's words, with the id
        raise bad(name, f"Token id {wrong} is out of vocabulary (the vocabulary has {vocab_size} "
                  "tokens)")
    return v


def check_model(body: dict, ctx: ServingContext) -> str:
    model = body.get("model")
    if model is None:
        return ctx.model_names[0]
    if not isinstance(model, str):
        raise bad("model", "must be a string")
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
        raise bad("stop", "must be a string or a list of strings")
    if len(stop) > MAX_STOP:
        raise bad("stop", f"at most {MAX_STOP} stop strings")
    num_chars = sum(map(len, stop))
    if num_chars > MAX_STOP_CHARS:
        raise bad("stop", f"the stop strings have {num_chars} characters; at most "
                  f"{MAX_STOP_CHARS} together")
    return [s for s in stop if s]


def num_logprobs(body: dict, name: str, ctx: ServingContext) -> int | None:
    """How many alternatives per token: -1 is the whole vocabulary; vLLM refuses more than
    --max-logprobs (-1 there: no cap) in its words."""
    k = number(body, name, None, lo=-1, integer=True)
    if k is None:
        return None
    num = ctx.vocab_size if k == -1 else k
    cap = ctx.vocab_size if ctx.max_logprobs == -1 else ctx.max_logprobs
    if num > cap:
        raise bad(name, f"Requested sample logprobs of {num}"
                  f"{' (-1: the whole vocabulary)' if k == -1 else ''}, which is greater than "
                   f"max allowed: {cap} (--max-logprobs)")
    return num


def _logit_bias(body: dict, vocab_size: int) -> dict[int, float] | None:
    lb = body.get("logit_bias")
    if lb is None:
        return None
    if not isinstance(lb, dict):
        raise bad("logit_bias", "must be an object of token id -> bias")
    out: dict[int, float] = {}
    for k, v in lb.items():
        try:
            tok = int(k)
        except ValueError:
            raise bad("logit_bias", f"key {value_text(k)} is not a token id") from None
        if not 0 <= tok < vocab_size:
            raise bad("logit_bias", f"token id {tok} is out of range [0, {vocab_size})")
        out[tok] = float(number({"logit_bias": v}, "logit_bias", 0.0, -100, 100))
    return out


def _structured(body: dict, ctx: ServingContext) -> dict[str, Any] | None:
    """Every spelling of a structured-output constraint (structured.py reads them all), with the
    server's --structured-outputs-config where the request sets no option of its own."""
    try:
        spec = structured_from_request(body)
        return None if spec is None else {**ctx.structured_defaults, **spec}
    except StructuredOutputError as e:
        raise OpenAIError(400, str(e), param=structured_param(body)) from None


def structured_param(body: dict) -> str:
    for key in ("response_format", "structured_outputs", "guided_json", "guided_regex",
                "guided_choice", "guided_grammar", "guided_whitespace_pattern"):
        if body.get(key) is not None:
            return key
    return "response_format"


def check_structured(ctx: ServingContext, spec: dict[str, Any] | None, param: str) -> None:
    if spec is None or ctx.check_structured is None:
        return
    try:
        ctx.check_structured(spec)
    except StructuredOutputError as e:
        raise OpenAIError(400, f"{param}: {e}", param=param) from None


def sampling_fields(body: dict, ctx: ServingContext, max_tokens_default: int | None,
                    max_tokens_names: tuple[str, ...]) -> dict[str, Any]:
    """The body's SamplingParams fields; the caller adds logprobs, tools and vLLM's extras, then
    builds the SamplingParams once."""
    gd = ctx.generation_defaults
    max_tokens = max_tokens_default
    for name in max_tokens_names:
        v = number(body, name, None, lo=1, integer=True)
        if v is not None:
            max_tokens = v
            break
    else:
        default = gd.get("max_tokens") or gd.get("max_new_tokens")
        if default and (max_tokens is None or default < max_tokens):
            max_tokens = int(default)
    n = number(body, "n", 1, lo=1, hi=MAX_N, integer=True)
    best_of = number(body, "best_of", None, lo=1, integer=True)
    if best_of is not None and best_of != n:
        raise bad("best_of", "best_of other than n is not supported")
    min_tokens = number(body, "min_tokens", 0, lo=0, integer=True)
    if max_tokens is not None and min_tokens > max_tokens:
        raise bad("min_tokens", f"must be <= max_tokens ({max_tokens}), got {min_tokens}")
    top_k = number(body, "top_k", gd.get("top_k", 0), lo=-1, integer=True)
    stop_token_ids = body.get("stop_token_ids")
    return dict(
        n=n,
        temperature=number(body, "temperature", gd.get("temperature", 1.0), lo=0, hi=100),
        top_p=number(body, "top_p", gd.get("top_p", 1.0), lo=0, hi=1, lo_open=True),
        top_k=0 if top_k in (-1, 0) else top_k,
        min_p=number(body, "min_p", gd.get("min_p", 0.0), lo=0, hi=1),
        seed=number(body, "seed", None, integer=True),
        presence_penalty=number(body, "presence_penalty", 0.0, lo=-2, hi=2),
        frequency_penalty=number(body, "frequency_penalty", 0.0, lo=-2, hi=2),
        repetition_penalty=number(body, "repetition_penalty", gd.get("repetition_penalty", 1.0),
                                  lo=0, hi=100, lo_open=True),
        logit_bias=_logit_bias(body, ctx.vocab_size),
        min_tokens=min_tokens,
        max_tokens=max_tokens,
        stop=_stop(body),
        stop_token_ids=[] if stop_token_ids is None else int_list(
            stop_token_ids, "stop_token_ids", ctx.vocab_size),
        ignore_eos=boolean(body, "ignore_eos", False),
        skip_special_tokens=boolean(body, "skip_special_tokens", True),
        spaces_between_special_tokens=boolean(body, "spaces_between_special_tokens", True),
        include_stop_str_in_output=boolean(body, "include_stop_str_in_output", False),
        structured=_structured(body, ctx),
        **_beam(body),
    )


def _beam(body: dict) -> dict[str, Any]:
    """vLLM's use_beam_search (n beams), length_penalty and early_stopping."""
    if not boolean(body, "use_beam_search", False):
        return {}
    early = body.get("early_stopping", False)
    if early != "never":
        early = boolean(body, "early_stopping", False)
    if body.get("structured_outputs") is not None or body.get("response_format") not in (
            None, {"type": "text"}):
        raise bad("use_beam_search", "cannot be combined with structured outputs")
    return {"use_beam_search": True, "early_stopping": early,
            "length_penalty": number(body, "length_penalty", 1.0)}


def stream_options(body: dict, stream: bool, force_usage: bool) -> tuple[bool, bool]:
    """-> (include_usage, continuous_usage_stats). force_usage (--enable-force-include-usage)
    puts usage on every chunk, whatever the request asks, as vLLM does."""
    so = body.get("stream_options")
    if so is None:
        return stream and force_usage, stream and force_usage
    if not isinstance(so, dict):
        raise bad("stream_options", "must be an object")
    if not stream:
        raise bad("stream_options", "is only allowed when stream is true")
    include = boolean(so, "include_usage", False)
    continuous = boolean(so, "continuous_usage_stats", False)
    return (True, True) if force_usage else (include, continuous)


def truncate(body: dict, ctx: ServingContext, prompt: list[int]) -> list[int]:
    """vLLM's truncate_prompt_tokens (-1: max_model_len) and truncation_side: the prompt is cut
    before the length check, and usage counts what is left."""
    k = number(body, "truncate_prompt_tokens", None, lo=-1, integer=True)
    side = body.get("truncation_side", "left")
    if side not in ("left", "right"):
        raise bad("truncation_side", f"must be 'left' or 'right', got {side!r}")
    if k is None:
        return prompt
    k = ctx.max_model_len if k == -1 else k
    if k > ctx.max_model_len:
        raise bad("truncate_prompt_tokens", f"must be <= max_model_len ({ctx.max_model_len}), "
                  f"got {k}")
    if len(prompt) <= k:
        return prompt
    return prompt[len(prompt) - k:] if side == "left" else prompt[:k]


def vllm_extras(body: dict, ctx: ServingContext, fields: dict[str, Any]) -> dict[str, Any]:
    """prompt_logprobs / return_token_ids / return_tokens_as_token_ids -> GenerateRequest
    fields; the prompt's logprobs come from the engine through the SamplingParams `fields`."""
    k = num_logprobs(body, "prompt_logprobs", ctx)   # -1: the whole vocabulary, as top_logprobs
    if k is not None:
        fields["prompt_logprobs"] = max(k, fields.get("prompt_logprobs") or 0)
    asked = body.get("logprob_token_ids")
    if asked is not None:  # logprobs of these ids at every generated position (implies logprobs)
        fields["logprob_token_ids"] = int_list(asked, "logprob_token_ids", ctx.vocab_size) or None
        if fields["logprob_token_ids"]:  # vLLM: the ids asked replace the natural top-k
            fields["logprobs"] = 0
    if ctx.tokenizer is None and (fields.get("stop") or fields.get("structured") is not None):
        raise bad("stop" if fields.get("stop") else structured_param(body),
                  "needs the tokenizer, which --skip-tokenizer-init leaves out")
    return {"prompt_logprobs": k,
            "return_token_ids": boolean(body, "return_token_ids", ctx.tokenizer is None),
            "tokens_as_token_ids": boolean(body, "return_tokens_as_token_ids",
                                           ctx.return_tokens_as_token_ids)}


