"""vLLM's tokenizer routes over the tokenizer of the model the body names (a pooled model is leased,
loading on demand, as the generation routes do; else the chat model's): POST /tokenize (a prompt,
or chat messages rendered and counted as the chat route sees them, images expanded), POST
/detokenize and GET /tokenizer_info (--enable-tokenizer-info-endpoint; the chat model's). No
torch."""
from __future__ import annotations

import asyncio
from typing import Any

from minserve.http import Http, OpenAIError
from minserve.protocol import GenerateRequest, ServingContext, encode_prompt, parse_chat
from minserve.serving import Serving


def _ctx(serving: Serving) -> ServingContext:
    """The model's parsing context; 400 when it runs without a tokenizer."""
    ctx = serving.ctx
    if ctx.tokenizer is None:
        raise OpenAIError(400, "this server runs with --skip-tokenizer-init: it has no "
                          "tokenizer (token ids in and out only)")
    return ctx


async def tokenize(app: Any, http: Http) -> None:
    body = await http.read_json()
    if not isinstance(body, dict):
        raise OpenAIError(400, "the request body must be a JSON object")
    async with app.serving_for(body) as serving:
        ctx = _ctx(serving)
        chat = None
        if "messages" in body:
            chat = await asyncio.to_thread(parse_chat, {
                **body, "max_tokens": None, "max_completion_tokens": None, "stream": False,
                "stream_options": None}, ctx)
            if chat.images:     # counted as the model sees them: each image's tokens expanded
                await serving.attach_images(chat)
        await http.send_json(200, await asyncio.to_thread(_tokenize, body, ctx, chat))


def _tokenize(body: dict[str, Any], ctx: ServingContext,
              chat: GenerateRequest | None) -> dict[str, Any]:
    if chat is not None:
        ids = chat.prompts[0]
    else:
        prompt = body.get("prompt")
        if not isinstance(prompt, str):
            raise OpenAIError(400, "prompt: must be a string", param="prompt")
        add = body.get("add_special_tokens", True)
        if not isinstance(add, bool):
            raise OpenAIError(400, "add_special_tokens: must be a boolean",
                              param="add_special_tokens")
        ids = encode_prompt(ctx, prompt, "prompt", add_special_tokens=add)
    # NOTE: this bounds the response too: at most max_model_len ids and token strings (a 31 MB
    # prompt once took 53 s, answered 43 MB and kept 6 GB resident).
    if len(ids) > ctx.max_model_len:
        raise OpenAIError(400, f"This model's maximum context length is {ctx.max_model_len} "
                          f"tokens. However, your request has {len(ids)} input tokens. Please "
                          "reduce the length of the input.", param="prompt")
    strs = ctx.tokenizer.convert_ids_to_tokens(ids) if body.get("return_token_strs") else None
    return {"count": len(ids), "max_model_len": ctx.max_model_len, "tokens": ids,
            "token_strs": strs}


async def detokenize(app: Any, http: Http) -> None:
    body = await http.read_json()
    async with app.serving_for(body) as serving:
        await _send_detokenized(http, body, _ctx(serving))


async def _send_detokenized(http: Http, body: Any, ctx: ServingContext) -> None:
    ids = body.get("tokens") if isinstance(body, dict) else None
    if isinstance(ids, list) and len(ids) > ctx.max_model_len:
        # NOTE: as /tokenize, at most max_model_len ids: 4M ids held the event loop 1.2 s
        raise OpenAIError(400, f"tokens: {len(ids)} token ids; at most {ctx.max_model_len} (the "
                          "model's maximum context length) are detokenized at once",
                          param="tokens")
    # checking and decoding a few thousand ids is still milliseconds: not on the event loop
    await http.send_json(200, await asyncio.to_thread(_detokenize, ids, ctx))


def _detokenize(ids: Any, ctx: ServingContext) -> dict[str, Any]:
    vocab = ctx.vocab_size
    if not isinstance(ids, list) or not all(type(t) is int and 0 <= t < vocab for t in ids):
        raise OpenAIError(400, f"tokens: must be a list of token ids in [0, {vocab})",
                          param="tokens")
    return {"prompt": ctx.tokenizer.decode(ids)}


async def tokenizer_info(app: Any, http: Http) -> None:
    if not app.cfg.enable_tokenizer_info_endpoint:
        raise OpenAIError(404, "Not Found: GET /tokenizer_info (start the server with "
                          "--enable-tokenizer-info-endpoint)", type="NotFoundError")
    ctx = _ctx(app.chat_serving())
    tok = ctx.tokenizer
    cfg = {k: v for k, v in tok.tokenizer_config.items() if k != "added_tokens_decoder"}
    await http.send_json(200, {**cfg, "tokenizer_class": cfg.get("tokenizer_class",
                                                                 "PreTrainedTokenizerFast"),
                               "chat_template": tok.chat_template,
                               "model_max_length": ctx.max_model_len,
                               "bos_token": tok.bos_token, "eos_token": tok.eos_token,
                               "pad_token": tok.pad_token, "unk_token": tok.unk_token,
                               "vocab_size": ctx.vocab_size})


ROUTES = {"/tokenize": {"POST": tokenize}, "/detokenize": {"POST": detokenize},
          "/tokenizer_info": {"GET": tokenizer_info}}
