"""The one generation path. Serving is the chat model as every front door sees it: parse() turns a
body into a GenerateRequest (protocol.py, in a worker thread; images fetched and attached), and
generate(req) runs it on the engine thread and yields typed events (output.py): a Delta per choice
output, then one Usage; a failure ends it with an OpenAIError. Chat and completions (JSON and
SSE), Responses, Messages, batch lines and /invocations consume it; LLM shares its per-choice
state. Wire formats are the callers'. No torch here."""
from __future__ import annotations

import asyncio
import functools
import logging
from collections.abc import AsyncIterator
from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING, Any

from minserve import output
from minserve.engine.async_engine import AsyncEngine, EngineError
from minserve.http import OpenAIError
from minserve.output import ChoiceState, Delta, Usage
from minserve.protocol import (
    GenerateRequest,
    ServingContext,
    attach_images,
    check_image_length,
    media_error,
    parse_chat,
    parse_chat_batch,
    parse_completion,
)
from minserve.tool_parsers.generic import GENERIC, detect_tool_parser

if TYPE_CHECKING:
    from minserve.metrics import Metrics

logger = logging.getLogger("minserve.server")
PARSERS = {"chat": parse_chat, "completion": parse_completion, "chat_batch": parse_chat_batch}


def engine_error(e: EngineError) -> OpenAIError:
    """The engine's word on a request (400: refused; 500/503: it failed or is stopping)."""
    return OpenAIError(e.status, e.message)


class Generation:
    """One request on the engine: `with serving.generate(req) as gen: async for event in gen`.
    `choices` hold each choice's state (the JSON bodies are built from them). Leaving the block
    before the end (a client gone, an error) aborts whatever still runs."""

    def __init__(self, serving: Serving, req: GenerateRequest) -> None:
        self.req, self._engine = req, serving.engine
        try:
            self.stream = serving.engine.add_request(req.request_id, req.requests)
        except EngineError as e:   # not ready, shutting down
            raise engine_error(e) from None
        n, ctx = req.params.n, serving.ctx
        self.choices = [ChoiceState(i, req, ctx.tokenizer, req.prompts[i // n])
                        for i in range(len(req.prompts) * n)]
        self.tracker = serving.metrics.tracker()
        self.tracker.on_params(n, [req.params.max_tokens or ctx.max_model_len - len(p)
                                   for p in req.prompts])
        self.finished = False

    def __enter__(self) -> Generation:
        return self

    def __exit__(self, exc_type: Any, exc: BaseException | None, tb: Any) -> None:
        if not self.finished and (exc is None or isinstance(exc, asyncio.CancelledError)):
            logger.info("%s aborted: its client went away", self.req.request_id)
            self._finish()   # counted as finished_reason="abort"
        self._engine.abort(self.req.request_id)  # a no-op once it finished

    def _finish(self) -> None:
        self.finished = True
        self.tracker.on_finish(sum(c.num_prompt_tokens for c in self.choices[::self.req.params.n]),
                               [c.finish_reason or "abort" for c in self.choices],
                               [c.num_output_tokens for c in self.choices])

    async def __aiter__(self) -> AsyncIterator[Delta | Usage]:
        stream, choices, tracker = self.stream, self.choices, self.tracker
        try:
            async for out in stream:
                c = choices[stream.index_of(out.request_id)]
                before = c.num_output_tokens
                d = c.update(out)
                if d.stopped:
                    self._engine.abort_child(stream, out.request_id)
                tracker.on_tokens(c.num_output_tokens - before, c.index)
                if out.timings is not None:
                    tracker.on_engine_timings(out.timings, c.num_output_tokens,
                                              out.num_preemptions)
                yield d
        except EngineError as e:
            raise engine_error(e) from None
        self._finish()
        yield output.usage(choices, len(self.req.prompts), self.req.params.n)


class Serving:
    """The chat model behind the generation routes: what parsing needs (ctx, built once the
    model is loaded), parse(), generate() and complete()."""

    def __init__(self, cfg: Any, engine: AsyncEngine, metrics: Metrics,
                 adapters: dict[str, Any]) -> None:
        """cfg: the ServerConfig; adapters: the LoRA adapters served as models (a live view)."""
        self.cfg, self.engine, self.metrics, self.adapters = cfg, engine, metrics, adapters
        self._ctx: ServingContext | None = None
        self._pixel_budget: Any = None    # multimodal.PixelBudget, made for the first image
        # PERF: batch lines parse (template + tokenize) on their own thread: on the shared
        # pool, 512 lines queued ahead of a chat request made its TTFT 32 s instead of ~1 s
        # (tiny model, loaded 2-core CPU, bench/RESULTS.md).
        self._batch_pool = ThreadPoolExecutor(1, thread_name_prefix="minserve-batch-parse")

    def close(self) -> None:
        """The model is unloaded (the model pool): its parse thread goes."""
        self._batch_pool.shutdown(wait=False)

    @property
    def ctx(self) -> ServingContext:
        if self._ctx is None:
            cfg, info = self.cfg, self.engine.info
            self._ctx = ServingContext.from_info(
                info, self.engine.config, cfg.served_model_names,
                check_structured=self._check_structured,
                enable_auto_tool_choice=cfg.enable_auto_tool_choice,
                tool_call_parser=self._tool_call_parser(info.tokenizer),
                reasoning_parser=cfg.reasoning_parser, max_logprobs=cfg.max_logprobs,
                force_include_usage=cfg.enable_force_include_usage,
                prompt_tokens_details=cfg.enable_prompt_tokens_details,
                return_tokens_as_token_ids=cfg.return_tokens_as_token_ids,
                adapter_names=self.adapters, structured_defaults=cfg.structured_defaults)
        return self._ctx

    def _tool_call_parser(self, tokenizer: Any) -> str | None:
        """--tool-call-parser, or with --enable-auto-tool-choice alone the parser the chat
        template's markers name (logged); generic: minserve renders the tools into the system
        message (tool_parsers/generic.py)."""
        parser = self.cfg.tool_call_parser
        if not parser and self.cfg.enable_auto_tool_choice:
            templates = getattr(tokenizer, "chat_templates", None) or {}
            template = templates.get("tool_use") or getattr(tokenizer, "chat_template", None)
            parser = detect_tool_parser(template)
            if parser == GENERIC:
                logger.info("tool calls: the chat template renders no tools; minserve puts "
                            "them into the system message (--tool-call-parser generic)")
            else:
                logger.info("tool calls: --tool-call-parser %s, detected from the chat "
                            "template", parser)
        return parser

    def _check_structured(self, spec: dict[str, Any]) -> None:
        # The engine compiles the same spec again; structured.compile caches it, so this is the
        # one real compile, done here where a bad grammar can still be a 400.
        from minserve import structured  # imports torch lazily only for the bitmask helpers
        info = self.engine.info
        structured.compile(spec, info.tokenizer, vocab_size=info.vocab_size)

    def check_model(self, body: Any) -> None:
        """Refuse an embedding model on the generation routes, naming the model to use."""
        model = body.get("model") if isinstance(body, dict) else None
        if isinstance(model, str) and model in self.cfg.embedding_model_names:
            names = ", ".join(f"`{n}`" for n in self.cfg.served_model_names)
            raise OpenAIError(400, f"`{model}` is an embedding model: it answers POST "
                              f"/v1/embeddings (and /v1/score, /v1/rerank) only. For completions "
                              f"use {names}.", param="model")

    # Parsing renders chat templates and tokenizes (up to a megabyte-scale prompt: about a
    # second): in a worker thread, so the event loop keeps every other stream flowing meanwhile.
    async def parse(self, kind: str, body: Any, priority: int = 0) -> GenerateRequest:
        """kind: "chat", "completion" or "chat_batch". Batch lines (priority > 0) parse on their
        own thread, never queued ahead of interactive requests."""
        self.check_model(body)
        parse = functools.partial(PARSERS[kind], body, self.ctx, priority=priority)
        req = await asyncio.get_running_loop().run_in_executor(
            self._batch_pool if priority else None, parse)
        if req.images:
            await self.attach_images(req)
        return req

    async def attach_images(self, req: GenerateRequest) -> None:
        """Fetch the request's images (their own threads, all at once, each bounded by the fetch
        timeout: other streams flow meanwhile) and read their sizes; check the prompt's length;
        only then decode them, one at a time within the server's pixel budget; expand the
        prompt."""
        from minserve.multimodal import inputs
        from minserve.multimodal.budget import PixelBudget
        from minserve.multimodal.image import MediaError

        ctx, request = self.ctx, req.requests[0]
        if self._pixel_budget is None:
            self._pixel_budget = PixelBudget(*filter(None, [getattr(
                self.engine.config, "max_image_pixels_in_flight", None)]))
        try:
            images = await inputs.load_images(req.images, ctx.media_policy)
            check_image_length(request, images, ctx)
            decoded = await inputs.decode_images(images, ctx.image_processor,
                                                 self._pixel_budget)
        except MediaError as e:
            raise media_error(e) from None
        await asyncio.to_thread(attach_images, request, decoded, ctx)

    def generate(self, req: GenerateRequest) -> Generation:
        if self.cfg.log_requests:
            logger.info("request %s: %d prompt(s), %d prompt tokens, params=%s", req.request_id,
                        len(req.prompts), sum(map(len, req.prompts)), req.params)
        return Generation(self, req)

    async def complete(self, req: GenerateRequest) -> dict[str, Any]:
        """The whole (not streamed) chat/completions response body."""
        with self.generate(req) as gen:
            async for _ in gen:
                pass
        return output.response(req, gen.choices)
