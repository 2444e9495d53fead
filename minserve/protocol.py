"""OpenAI chat/completions request bodies -> GenerateRequest, one EngineRequest per prompt, built
once and complete (a frozen SamplingParams): every field checked (bad input is an OpenAIError 4xx
naming the parameter; message errors come from chat.py), the chat template rendered, the prompt
tokenized and its length checked (check_length, the one check; LLM builds through it too).
Responses are built in output.py. No torch, no I/O here."""
from __future__ import annotations

import dataclasses
import time
import uuid
from collections.abc import Callable, Container
from dataclasses import dataclass, field
from typing import Any

from minserve.chat import ChatContentError, ChatTemplateError, ImageParts, normalize_messages
from minserve.detokenizer import StopStrings
from minserve.engine.request import EngineRequest
from minserve.http import OpenAIError
from minserve.reasoning import get_reasoning_parser, prompt_opens_reasoning
from minserve.request_fields import (
    MAX_N,
    bad,
    boolean,
    check_model,
    check_structured,
    int_list,
    num_logprobs,
    sampling_fields,
    stream_options,
    structured_param,
    truncate,
    vllm_extras,
)
from minserve.sampling_params import SamplingParams
from minserve.structured import StructuredOutputError, request_options
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

    @classmethod
    def from_info(cls, info: Any, engine_config: Any, model_names: list[str],
                  **options: Any) -> ServingContext:
        """What a loaded engine (its EngineInfo) tells parsing; options: the server's flags. The
        image fetch policy is the serving layer's, built from the engine's config."""
        from minserve.multimodal.fetch import MediaPolicy

        tok = info.tokenizer
        return cls(tokenizer=tok, model_names=model_names, max_model_len=info.max_model_len,
                   vocab_size=info.vocab_size, generation_defaults=dict(info.generation_defaults),
                   image_processor=info.image_processor, image_limit=info.image_limit,
                   media_policy=MediaPolicy.from_config(engine_config),
                   max_prompt_chars=prompt_chars_limit(info.max_model_len, tok.max_token_bytes)
                   if tok is not None else None, **options)


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
    own = None
    if ctx.image_processor is not None:    # a processor that tokenizes prompts itself
        own = media(lambda: ctx.image_processor.encode_text(text))
    return own if own is not None else ctx.tokenizer.encode(text,
                                                            add_special_tokens=add_special_tokens)


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
    rendered_prompt: str | None = None   # chat: the template's text (LLM.chat's `prompt`)

    def __post_init__(self) -> None:
        if self.stop_strings is None and self.params.stop:
            self.stop_strings = StopStrings(self.params.stop)

    @property
    def prompts(self) -> list[list[int]]:
        return [r.prompt_token_ids for r in self.requests]

    @property
    def params(self) -> SamplingParams:
        return self.requests[0].sampling


def _engine_requests(request_id: str, prompts: list[list[int]], params: SamplingParams,
                     body: dict, ctx: ServingContext, priority: int) -> list[EngineRequest]:
    """One EngineRequest per prompt, named request_id (one prompt) or request_id-p."""
    salt = body.get("cache_salt")
    if salt is not None and (not isinstance(salt, str) or not salt):
        raise bad("cache_salt", "must be a non-empty string")
    model = body.get("model")
    adapter = model if model is not None and model in ctx.adapter_names else None
    return [EngineRequest(request_id if len(prompts) == 1 else f"{request_id}-{p}", ids, params,
                          adapter_name=adapter, cache_salt=salt, priority=priority)
            for p, ids in enumerate(prompts)]


def check_length(ctx: ServingContext, prompt_token_ids: list[int] | int,
                 max_tokens: int | None, what: str) -> None:
    """The one check of a prompt (its token ids, or their number) against max_model_len, in
    vLLM's words, where the request is built (the engine relies on it). `what` names the
    prompt's field."""
    num_prompt = prompt_token_ids if isinstance(prompt_token_ids, int) else \
        len(prompt_token_ids)
    max_len = ctx.max_model_len
    if num_prompt == 0:
        raise OpenAIError(400, "The decoder prompt cannot be empty", param=what)
    if num_prompt >= max_len:
        raise OpenAIError(400, f"This model's maximum context length is {max_len} tokens. "
                          f"However, your request has {num_prompt} input tokens. Please reduce "
                          "the length of the input.", param=what)
    if max_tokens is not None and num_prompt + max_tokens > max_len:
        raise OpenAIError(400, f"This model's maximum context length is {max_len} tokens. "
                          f"However, you requested {num_prompt + max_tokens} tokens "
                          f"({num_prompt} in the {what}, {max_tokens} in the completion). Please "
                          f"reduce the length of the {what} or completion.", param="max_tokens")


def _common(body: Any, ctx: ServingContext) -> tuple[str, bool, bool, bool]:
    if not isinstance(body, dict):
        raise OpenAIError(400, "the request body must be a JSON object")
    model = check_model(body, ctx)
    stream = boolean(body, "stream", False)
    if body.get("user") is not None and not isinstance(body["user"], str):
        raise bad("user", "must be a string")
    return (model, stream, *stream_options(body, stream, ctx.force_include_usage))


# ---------------------------------------------------------------- chat
def _chat_error(e: Exception) -> OpenAIError:
    """chat.py's errors (bad messages, chat_template_kwargs, a failing template) -> a 400."""
    msg = str(e) if isinstance(e, (ChatContentError, ChatTemplateError)) else \
        f"chat template error: {e}"
    return OpenAIError(400, msg, param=getattr(e, "param", None) or "messages")


def _image_parts(ctx: ServingContext) -> ImageParts | None:
    """A vision model's collector of the chat's image parts; None (image parts refused) else."""
    return ImageParts(ctx.image_processor.placeholder) if ctx.image_processor else None


def parse_chat(body: Any, ctx: ServingContext, params: SamplingParams | None = None,
               priority: int = 0) -> GenerateRequest:
    """A chat body -> its request. params: LLM.chat's own SamplingParams in place of the body's
    sampling fields; the messages, template, tools, images and length go the route's way."""
    model, stream, include_usage, continuous = _common(body, ctx)
    if ctx.tokenizer is None:
        raise OpenAIError(400, "chat needs the tokenizer and its chat template, which "
                          "--skip-tokenizer-init leaves out: use /v1/completions with token ids",
                          param="messages")
    try:  # the template reads its own copy; this one is for checking and for echo
        messages = normalize_messages(body.get("messages"), images=_image_parts(ctx))
    except ChatContentError as e:
        raise _chat_error(e) from None
    fields = _chat_sampling(body, ctx, params)
    add_gen = boolean(body, "add_generation_prompt", True)
    cont = boolean(body, "continue_final_message", False)
    if add_gen and cont and "add_generation_prompt" in body:
        raise bad("continue_final_message", "cannot be combined with add_generation_prompt")
    if cont:
        add_gen = False
    tools, make_tool_parser, forced = _tools(body, ctx, fields)
    check_structured(ctx, fields["structured"], "tool_choice" if forced else structured_param(body))
    images = _image_parts(ctx)
    template_messages = body["messages"]
    if ctx.tool_call_parser == GENERIC and make_tool_parser is not None:
        template_messages = with_tools_in_system(template_messages, tools)
    try:
        text = ctx.tokenizer.apply_chat_template(
            template_messages, add_generation_prompt=add_gen, continue_final_message=cont,
            tools=tools, chat_template_kwargs=_template_kwargs(body), images=images)
    except (ValueError, TypeError, KeyError) as e:  # chat.py's errors are ValueErrors
        raise _chat_error(e) from None
    prompt = truncate(body, ctx, encode_prompt(ctx, text, "messages", add_special_tokens=False))
    reasoning_cls = get_reasoning_parser(ctx.reasoning_parser) if ctx.reasoning_parser else None
    opens = reasoning_cls is not None and prompt_opens_reasoning(text, reasoning_cls.start,
                                                                 reasoning_cls.end)
    if reasoning_cls is not None:
        if reasoning_cls.needs_special_tokens:   # Gemma 4's tags, harmony's markers
            fields["skip_special_tokens"] = False
        make_tool_parser = make_tool_parser or reasoning_cls.content_parser

    def make_parsers() -> tuple[Any, Any]:
        return (reasoning_cls(start_in_reasoning=opens) if reasoning_cls else None,
                make_tool_parser() if make_tool_parser else None)
    refs = images.found if images is not None else []
    if refs and body.get("truncate_prompt_tokens") is not None:  # it could cut an image apart
        raise bad("truncate_prompt_tokens", "cannot be combined with images")
    if refs:   # the length is known once the images are in (attach_images)
        from minserve.multimodal.inputs import check_image_count

        media(lambda: check_image_count(len(refs), ctx.image_limit))
    else:
        check_length(ctx, prompt, fields["max_tokens"], "messages")
    echo = boolean(body, "echo", False)
    # vLLM echoes the last message only when it has the response's role: "assistant" with a
    # generation prompt, else the last message's own role (i.e. always).
    last = messages[-1]
    echoed = last["content"] if echo and (not add_gen or last["role"] == "assistant") else None
    request_id = f"chatcmpl-{uuid.uuid4().hex}"
    extras = vllm_extras(body, ctx, fields)
    params = SamplingParams(**fields)
    return GenerateRequest("chat", request_id, model,
                           _engine_requests(request_id, [prompt], params, body, ctx, priority),
                           [echoed], stream, include_usage, continuous, echo, params.logprobs,
                           make_parsers=make_parsers if reasoning_cls or make_tool_parser
                           else None, prompt_tokens_details=ctx.prompt_tokens_details,
                           images=refs, rendered_prompt=text, **extras)


REASONING_EFFORTS = ("none", "minimal", "low", "medium", "high", "xhigh")


def _template_kwargs(body: dict) -> Any:
    """chat_template_kwargs, with the body's reasoning_effort (OpenAI's chat field; the gpt-oss
    template reads it) unless they set it themselves."""
    kwargs, effort = body.get("chat_template_kwargs"), body.get("reasoning_effort")
    if effort is None:
        return kwargs
    if effort not in REASONING_EFFORTS:
        raise bad("reasoning_effort", f"must be one of {', '.join(REASONING_EFFORTS)}, got "
                  f"{value_text(effort)}")
    if kwargs is not None and not isinstance(kwargs, dict):
        return kwargs     # the template renderer names that error
    return {"reasoning_effort": effort, **(kwargs or {})}


def _chat_sampling(body: dict, ctx: ServingContext, params: SamplingParams | None
                   ) -> dict[str, Any]:
    """The SamplingParams fields: the body's (with logprobs / top_logprobs), or params'."""
    if params is not None:
        return {f.name: getattr(params, f.name) for f in dataclasses.fields(params)}
    want_logprobs = boolean(body, "logprobs", False)
    top = num_logprobs(body, "top_logprobs", ctx)
    if top is not None and top > 0 and not want_logprobs:
        raise bad("top_logprobs", "requires logprobs to be true")
    fields = sampling_fields(body, ctx, None, ("max_completion_tokens", "max_tokens"))
    fields["logprobs"] = (top or 0) if want_logprobs else None
    return fields


def parse_chat_batch(body: Any, ctx: ServingContext, priority: int = 0) -> GenerateRequest:
    """vLLM's POST /v1/chat/completions/batch: a chat body whose `messages` is a list of
    conversations -> one request, one choice per conversation (x n), not streamed."""
    if not isinstance(body, dict):
        raise OpenAIError(400, "the request body must be a JSON object")
    convs = body.get("messages")
    if not isinstance(convs, list) or not convs or not all(isinstance(c, list) for c in convs):
        raise bad("messages", "must be a non-empty list of conversations (lists of messages)")
    if boolean(body, "stream", False):
        raise bad("stream", "the batch chat route does not stream")
    parsed = [parse_chat({**body, "messages": conv}, ctx, priority=priority) for conv in convs]
    if any(p.images for p in parsed):
        raise bad("messages", "the batch chat route takes text conversations only")
    first = parsed[0]
    if len(first.prompts) * len(parsed) * first.params.n > MAX_N:
        raise bad("n", f"conversations x n must be <= {MAX_N}")
    first.requests = [dataclasses.replace(p.requests[0], request_id=f"{first.request_id}-{i}")
                      for i, p in enumerate(parsed)]
    first.prompt_texts = [p.prompt_texts[0] for p in parsed]
    return first


def check_image_length(request: EngineRequest, images: list[Any], ctx: ServingContext) -> None:
    """The length check parse_chat left, made from the images' sizes (multimodal.ImageInputs)
    before any of them is decoded."""
    from minserve.multimodal.inputs import num_prompt_tokens

    num = media(lambda: num_prompt_tokens(len(request.prompt_token_ids), images,
                                          ctx.image_processor))
    check_length(ctx, num, request.sampling.max_tokens, "messages")


def attach_images(request: EngineRequest, images: list[Any], ctx: ServingContext) -> None:
    """A prompt's images (Pillow images, or multimodal.DecodedImages) -> its prompt with each
    placeholder expanded to the image's tokens, then the length check parse_chat left."""
    from minserve.multimodal.inputs import attach_images as attach

    media(lambda: attach(request, images, ctx.image_processor))
    check_length(ctx, request.prompt_token_ids, request.sampling.max_tokens, "messages")


def media_error(e: Exception) -> OpenAIError:
    """A multimodal.MediaError (bad URL, fetch failure, not an image...) -> its 400 (503: the
    server's image decoding stayed busy)."""
    return OpenAIError(getattr(e, "status", 400), str(e),
                       param=getattr(e, "param", None) or "messages")


def media(fn: Callable[[], Any]) -> Any:
    """fn(), a multimodal.MediaError from it as its 400."""
    from minserve.multimodal.image import MediaError

    try:
        return fn()
    except MediaError as e:
        raise media_error(e) from None


# ---------------------------------------------------------------- tools
def _tools(body: dict, ctx: ServingContext, fields: dict[str, Any]
           ) -> tuple[list[dict] | None, Callable[[], Any] | None, bool]:
    """tools + tool_choice as vLLM does them -> (tools for the template, a parser factory (one
    parser per choice: they keep streaming state), forced). Forced ("required" or a named
    function) constrains the output (the SamplingParams `fields`' structured) on any model;
    "auto" parses the model's own call format and needs --enable-auto-tool-choice."""
    tools = body.get("tools")
    if tools is not None and (not isinstance(tools, list)
                              or not all(isinstance(t, dict) for t in tools)):
        raise bad("tools", "must be a list of tool objects")
    tools = tools or None
    choice = body.get("tool_choice")
    parallel = boolean(body, "parallel_tool_calls", True)
    if choice is not None and choice != "none" and tools is None:
        raise bad("tool_choice", "is only allowed when `tools` are given")
    if choice is None:  # OpenAI's default is "auto" with tools; vLLM: "none" unless enabled
        choice = "auto" if tools and ctx.enable_auto_tool_choice else "none"
    if choice == "none" or tools is None:
        return tools, None, False
    if choice == "auto":
        if not (ctx.enable_auto_tool_choice and ctx.tool_call_parser):
            raise bad("tool_choice", '"auto" tool choice requires --enable-auto-tool-choice '
                      "and --tool-call-parser to be set")
        parser_cls = get_tool_parser(ctx.tool_call_parser)
        if parser_cls.needs_special_tokens:  # the call markers are special tokens
            fields["skip_special_tokens"] = False
        if ctx.tool_call_parser == GENERIC and fields["structured"] is None:
            try:
                fields["structured"] = {**ctx.structured_defaults, **auto_call_spec(tools)}
            except ToolChoiceError as e:
                raise bad("tools", str(e)) from None
        return tools, lambda: parser_cls(tools), False
    try:
        spec = tool_choice_spec(choice, tools, parallel)
        name = named_tool(choice)
    except ToolChoiceError as e:
        raise bad("tool_choice", str(e)) from None
    if fields["structured"] is not None:
        raise bad("tool_choice", f"{value_text(choice)} tool choice cannot be combined with "
                  f"{structured_param(body)}")
    # The whitespace options of structured outputs apply to the calls' JSON as well.
    try:
        spec.update(ctx.structured_defaults, **request_options(body.get("structured_outputs")))
    except StructuredOutputError as e:
        raise bad("structured_outputs", str(e)) from None
    ws = body.get("guided_whitespace_pattern")
    if isinstance(ws, str):
        spec["whitespace_pattern"] = ws
    fields["structured"] = spec
    if name is not None:
        return tools, lambda: NamedToolCallParser(name), True
    return tools, RequiredToolCallParser, True


# ---------------------------------------------------------------- completions
def _prompts(body: dict, ctx: ServingContext) -> tuple[list[list[int]], list[str | None]]:
    p, embeds = body.get("prompt"), body.get("prompt_embeds")
    if embeds not in (None, "", []):
        raise bad("prompt_embeds", "is not supported: send the prompt as text or token ids")
    if p in (None, "", []):   # vLLM's words
        raise OpenAIError(400, "Either prompt or prompt_embeds must be provided and non-empty.",
                          param="prompt")
    if isinstance(p, str):
        p = [p]
    if not isinstance(p, list) or not p:
        raise bad("prompt", "must be a string, a list of strings, a list of token ids or a "
                  "list of lists of token ids, and not empty")
    if all(type(t) is int for t in p):
        return [int_list(p, "prompt", ctx.vocab_size)], [None]
    if all(isinstance(s, str) for s in p):
        return [encode_prompt(ctx, s, "prompt") for s in p], list(p)
    if all(isinstance(s, list) for s in p):
        return [int_list(s, "prompt", ctx.vocab_size) for s in p], [None] * len(p)
    raise bad("prompt", "mixes strings, token ids and lists")


def parse_completion(body: Any, ctx: ServingContext, priority: int = 0) -> GenerateRequest:
    model, stream, include_usage, continuous = _common(body, ctx)
    if body.get("suffix"):
        raise bad("suffix", "is not supported (no fill-in-the-middle)")
    prompts, texts = _prompts(body, ctx)
    cut = [truncate(body, ctx, ids) for ids in prompts]
    texts = [t if len(c) == len(ids) else None for t, c, ids in zip(texts, cut, prompts,
                                                                     strict=True)]
    prompts = cut
    echo = boolean(body, "echo", False)
    echo_only = type(body.get("max_tokens")) is int and body["max_tokens"] == 0
    if echo_only and not echo:
        raise bad("max_tokens", "must be >= 1 (0 is accepted only with echo=true, to score "
                  "the prompt)")
    if echo_only:
        body = {**body, "max_tokens": 1}
    fields = sampling_fields(body, ctx, 16, ("max_tokens",))
    fields["logprobs"] = num_logprobs(body, "logprobs", ctx)
    if echo and fields["logprobs"] is not None:
        fields["prompt_logprobs"] = fields["logprobs"]
    extras = vllm_extras(body, ctx, fields)
    params = SamplingParams(**fields)
    if len(prompts) * params.n > MAX_N:
        raise bad("n", f"prompts x n must be <= {MAX_N}")
    for ids in prompts:
        check_length(ctx, ids, params.max_tokens, "prompt")
    check_structured(ctx, params.structured, structured_param(body))
    if echo and ctx.tokenizer is None:  # vLLM: no text to echo; the prompt's ids come back
        texts = [""] * len(prompts)
        extras["return_token_ids"] = True
    elif echo:
        texts = [t if t is not None else ctx.tokenizer.decode(ids, skip_special_tokens=False)
                 for t, ids in zip(texts, prompts, strict=True)]
    request_id = f"cmpl-{uuid.uuid4().hex}"
    return GenerateRequest("completion", request_id, model,
                           _engine_requests(request_id, prompts, params, body, ctx, priority),
                           texts,
                           stream, include_usage, continuous, echo, params.logprobs,
                           echo_only=echo_only, prompt_tokens_details=ctx.prompt_tokens_details,
                           **extras)
