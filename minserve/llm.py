"""LLM: the offline / embedded Python API. Drives Engine.step() synchronously (no asyncio, for
speed) over the serving path's shared parts: requests are built and checked by protocol.py (chat
through parse_chat, as the route: messages, template, tools, images, length), one EngineRequest
per prompt (the engine fans n out), and each sample's outputs become text through the server's
per-sample state (output.SampleState). A refused input is the route's OpenAIError (a ValueError).
With an embedding model (task="embed", or detected from the architecture) it wraps an Embedder
and offers embed()."""
from __future__ import annotations

import dataclasses
import functools
import itertools
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from minserve.config import EngineConfig, LoRAConfig
from minserve.detokenizer import StopStrings
from minserve.engine.engine import Engine
from minserve.engine.request import EngineRequest, FinishReason, Logprob
from minserve.lora.request import LoRARequest
from minserve.output import SampleState
from minserve.protocol import ServingContext, attach_images, check_length, media, parse_chat
from minserve.sampling_params import SamplingParams

if TYPE_CHECKING:   # imported when embed() runs: a chat-only LLM never loads the embeddings code
    from minserve.embeddings.offline import EmbeddingRequestOutput, ScoringRequestOutput

Prompt = str | list[int] | dict[str, Any]
# LLM(enable_lora=True, max_loras=..., ...): vLLM's engine args, gathered into a LoRAConfig
_LORA_ARGS = ("max_loras", "max_lora_rank", "max_cpu_loras", "lora_dtype", "allow_downloads")


@dataclass
class CompletionOutput:
    """One sample of one prompt."""
    index: int
    text: str = ""
    token_ids: list[int] = field(default_factory=list)
    cumulative_logprob: float | None = None
    logprobs: list[Logprob] | None = None
    finish_reason: str | None = None          # "stop" | "length" | "abort" | "error"
    stop_reason: int | str | None = None      # the stop token id or stop string
    error: str | None = None


@dataclass
class GenerateOutput:
    """One prompt's result: the vLLM RequestOutput shape (.prompt, .prompt_token_ids, .outputs)."""
    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    outputs: list[CompletionOutput]
    prompt_logprobs: list[Logprob | None] | None = None
    num_cached_tokens: int = 0

    @property
    def finished(self) -> bool:
        return all(o.finish_reason is not None for o in self.outputs)


# EngineConfig fields that mean something to an embedding model (no KV cache, no sampling).
_EMBEDDER_ARGS = ("dtype", "device", "max_model_len")


class _Progress:
    """A one-line progress bar on stderr (tqdm is not a dependency)."""

    def __init__(self, total: int, enabled: bool) -> None:
        self.total, self.enabled = total, enabled
        self.done = self.num_output_tokens = 0
        self.start = self.last = time.perf_counter()

    def update(self, num_done: int, num_new_tokens: int) -> None:
        self.done += num_done
        self.num_output_tokens += num_new_tokens
        now = time.perf_counter()
        if self.enabled and (now - self.last > 0.1 or self.done == self.total):
            self.last = now
            elapsed = max(now - self.start, 1e-9)
            width = 30
            filled = width * self.done // max(self.total, 1)
            sys.stderr.write(f"\rProcessed prompts: {self.done}/{self.total} "
                             f"[{'#' * filled}{'.' * (width - filled)}] {elapsed:.1f}s, "
                             f"{self.num_output_tokens / elapsed:.1f} output tok/s")
            sys.stderr.flush()

    def close(self) -> None:
        if self.enabled:
            sys.stderr.write("\n")
            sys.stderr.flush()


class LLM:
    """`LLM(model=None, **engine_args)`: engine_args are EngineConfig fields (vLLM names).
    task/runner as on the command line: "embed"/"pooling" (or an embedding model's architecture)
    makes an embedding LLM, whose embed() works and generate()/chat() do not."""

    def __init__(self, model: str | None = None, *, task: str = "auto", runner: str = "auto",
                 **engine_args: Any) -> None:
        from minserve.embeddings.models import DEFAULT_EMBEDDING_MODEL, resolve_task

        self._ids = itertools.count()
        self.engine: Engine | None = None
        self.embedder: Any = None
        if resolve_task(task, runner, model, None) == "embed":
            from minserve.embeddings.embedder import Embedder

            other = sorted(set(engine_args) - set(_EMBEDDER_ARGS))
            if other:
                raise TypeError(f"{', '.join(other)}: not used by an embedding model (it takes "
                                f"{', '.join(_EMBEDDER_ARGS)})")
            self.embedder = Embedder(model or DEFAULT_EMBEDDING_MODEL, **engine_args)
        else:
            lora_args = {k: engine_args.pop(k) for k in _LORA_ARGS if k in engine_args}
            if engine_args.pop("enable_lora", False):
                engine_args["lora"] = LoRAConfig(**lora_args)
            elif lora_args:
                raise TypeError(f"{', '.join(lora_args)}: need enable_lora=True")
            self.engine = Engine(EngineConfig(model=model, **engine_args))

    def _generator(self) -> Engine:
        if self.engine is None:
            raise ValueError(f"{self.embedder.model_name} is an embedding model: use "
                             "LLM.embed(), or load a chat model for generate()/chat()")
        return self.engine

    @functools.cached_property
    def _ctx(self) -> ServingContext:
        """What request building needs from the engine (the routes' checks, LLM's defaults)."""
        return ServingContext.from_info(self._generator().info, self.engine.config, ["llm"])

    def get_tokenizer(self) -> Any:
        return self.engine.info.tokenizer if self.engine is not None else self.embedder.tokenizer

    def sleep(self, level: int = 1) -> None:
        """vLLM's sleep mode: the KV cache freed, the weights in host memory (level 1) or
        dropped (level 2, reloaded from the checkpoint by wake_up)."""
        self._generator().sleep(level)

    def wake_up(self) -> None:
        self._generator().wake_up()

    def get_default_sampling_params(self) -> SamplingParams:
        """SamplingParams with the model's generation_config.json defaults (as vLLM does)."""
        return SamplingParams(**self._generator().info.generation_defaults)

    def embed(self, prompts: Prompt | Sequence[Prompt], *, truncate_prompt_tokens: int | None
              = None, dimensions: int | None = None) -> list[EmbeddingRequestOutput]:
        """Strings, token-id lists or {"prompt"} / {"prompt_token_ids"} dicts -> one embedding
        per prompt, in order, pooled and normalized as the model's sentence-transformers config
        says (what /v1/embeddings returns). Large lists run in length-sorted batches."""
        if self.embedder is None:
            raise ValueError("LLM.embed() needs an embedding model (LLM(model, task=\"embed\") "
                             "or an embedding architecture); this LLM holds a chat model")
        from minserve.embeddings.offline import embed_prompts

        return embed_prompts(self.embedder, prompts, truncate_prompt_tokens, dimensions)

    def score(self, data_1: str | list[str], data_2: str | list[str], *,
              truncate_prompt_tokens: int | None = None) -> list[ScoringRequestOutput]:
        """Relevance of data_1 against data_2 (one to one, one to many, or pairwise), as
        /v1/score: a cross-encoder's score, or the cosine of an embedding model's vectors."""
        if self.embedder is None:
            raise ValueError("LLM.score() needs a cross-encoder or an embedding model "
                             "(LLM(model, task=\"score\")); this LLM holds a chat model")
        from minserve.embeddings.offline import score_prompts

        return score_prompts(self.embedder, data_1, data_2, truncate_prompt_tokens)

    def generate(self, prompts: Prompt | Sequence[Prompt],
                 sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
                 use_tqdm: bool | None = None,
                 lora_request: LoRARequest | Sequence[LoRARequest | None] | None = None
                 ) -> list[GenerateOutput]:
        """Prompts are strings, token-id lists, or {"prompt": ...} / {"prompt_token_ids": ...}.
        lora_request: one adapter for every prompt, or one (or None) per prompt.
        Returns one GenerateOutput per prompt, in order."""
        self._generator()
        if isinstance(prompts, (str, dict)) or (
                isinstance(prompts, list) and prompts and isinstance(prompts[0], int)):
            prompts = [prompts]
        prompts = list(prompts)
        params = self._params(sampling_params, len(prompts))
        adapters = self._adapters(lora_request, len(prompts))
        return self._run([self._request(p, sp, a) for p, sp, a in zip(prompts, params, adapters,
                                                                       strict=True)], use_tqdm)

    def _params(self, sampling_params: SamplingParams | Sequence[SamplingParams] | None,
                num_prompts: int) -> list[SamplingParams]:
        if sampling_params is None:
            sampling_params = self.get_default_sampling_params()
        if isinstance(sampling_params, SamplingParams):
            return [sampling_params] * num_prompts
        params_list = list(sampling_params)
        if len(params_list) != num_prompts:
            raise ValueError("sampling_params must be one SamplingParams or one per prompt")
        return params_list

    def _request(self, prompt: Prompt, params: SamplingParams, adapter: str | None
                 ) -> tuple[EngineRequest, str | None]:
        """One prompt -> (its EngineRequest, checked as the completions route checks it; the
        prompt text)."""
        text, ids = self._tokenize(prompt)
        request = EngineRequest(f"llm-{next(self._ids)}", ids, params, adapter_name=adapter)
        if isinstance(prompt, dict) and prompt.get("multi_modal_data") is not None:
            attach_images(request, self._images(prompt["multi_modal_data"]), self._ctx)
        else:
            check_length(self._ctx, ids, params.max_tokens, "prompt")
        return request, text

    def _adapters(self, lora_request: LoRARequest | Sequence[LoRARequest | None] | None,
                  num_prompts: int) -> list[str | None]:
        """Each prompt's adapter name, loading adapters the engine does not serve yet."""
        if lora_request is None or isinstance(lora_request, LoRARequest):
            requests = [lora_request] * num_prompts
        else:
            requests = list(lora_request)
            if len(requests) != num_prompts:
                raise ValueError("lora_request must be one LoRARequest or one per prompt")
        served = self.engine.list_loras()
        for lr in {r for r in requests if r is not None}:
            if lr.lora_name not in served:
                self.engine.add_lora(lr.lora_name, lr.lora_path)
                served[lr.lora_name] = lr.lora_path
            elif lr.lora_path and served[lr.lora_name] != lr.lora_path:
                raise ValueError(f"LoRA adapter {lr.lora_name!r} is loaded from "
                                 f"{served[lr.lora_name]}, not {lr.lora_path}")
        return [None if r is None else r.lora_name for r in requests]

    def _tokenize(self, prompt: Prompt) -> tuple[str | None, list[int]]:
        if isinstance(prompt, dict):
            if "prompt_token_ids" in prompt:
                return prompt.get("prompt"), list(prompt["prompt_token_ids"])
            prompt = prompt["prompt"]
        if isinstance(prompt, str):
            processor = self.engine.info.image_processor
            own = processor.encode_text(prompt) if processor is not None else None
            return prompt, own if own is not None else self.engine.info.tokenizer.encode(prompt)
        return None, list(prompt)

    def _images(self, data: Any) -> list[Any]:
        """multi_modal_data {"image": a PIL image or a list of them} (vLLM's offline form) -> the
        images, checked."""
        from minserve.multimodal.image import check_image
        from minserve.multimodal.inputs import check_image_count

        info = self.engine.info
        if not isinstance(data, dict) or set(data) - {"image"}:
            raise ValueError('multi_modal_data must be {"image": <PIL image or list>}; '
                             "minserve's models take images only")
        if info.image_processor is None:
            raise ValueError(f"{info.architecture} is a text-only model: it takes no images")
        images = data.get("image")
        images = list(images) if isinstance(images, (list, tuple)) else [images]
        check_image_count(len(images), info.image_limit)
        return [check_image(im) for im in images]

    def _run(self, requests: list[tuple[EngineRequest, str | None]], use_tqdm: bool | None
             ) -> list[GenerateOutput]:
        """Add the requests, step the engine until each has all its samples; -> one output per
        request, in order. Whatever happens meanwhile, nothing is left running."""
        tok = self.engine.info.tokenizer
        results, samples = [], {}
        try:
            for request, text in requests:
                params = request.sampling
                res = GenerateOutput(request.request_id, text, request.prompt_token_ids,
                                     [CompletionOutput(i) for i in range(params.n)])
                results.append(res)
                self.engine.add_request(request)
                stop = StopStrings(params.stop)  # once for the n samples
                for i, sid in enumerate(request.sample_ids()):
                    samples[sid] = (res, params, SampleState(i, tok, request.prompt_token_ids,
                                                             params, stop))
            self._step(samples, use_tqdm, len(results))
        except BaseException:
            self.engine.abort_request(list(samples))
            while self.engine.has_unfinished_requests():  # drain the aborts
                self.engine.step()
            raise
        return results

    def _step(self, samples: dict[str, tuple[GenerateOutput, SamplingParams, SampleState]],
              use_tqdm: bool | None, num_prompts: int) -> None:
        if use_tqdm is None:
            use_tqdm = num_prompts >= 8 and sys.stderr.isatty()
        bar = _Progress(num_prompts, use_tqdm)
        pending = {res.request_id: len(res.outputs) for res, *_ in samples.values()}
        unfinished = set(samples)
        while unfinished:
            num_done = num_tokens = 0
            for ro in self.engine.step():
                if ro.request_id not in unfinished:
                    continue  # the ABORT echo of a sample a stop string already ended
                res, params, sample = samples[ro.request_id]
                num_tokens += len(ro.new_token_ids)
                if sample.update(ro).stopped:
                    self.engine.abort_request(ro.request_id)
                if sample.finish_reason is not None:
                    lps = sample.logprobs if params.logprobs is not None else None
                    res.outputs[sample.index] = CompletionOutput(
                        sample.index, sample.text, sample.token_ids,
                        sum(lp.logprob for lp in lps) if lps is not None else None, lps,
                        sample.finish_reason, sample.stop_reason, sample.error)
                    res.num_cached_tokens = max(res.num_cached_tokens, sample.num_cached_tokens)
                    res.prompt_logprobs = res.prompt_logprobs or sample.prompt_logprobs
                    unfinished.discard(ro.request_id)
                    pending[res.request_id] -= 1
                    num_done += pending[res.request_id] == 0
            bar.update(num_done, num_tokens)
        while self.engine.has_unfinished_requests():  # let aborts of stopped samples land
            self.engine.step()
        bar.close()

    def chat(self, messages: list[dict[str, Any]] | Sequence[list[dict[str, Any]]],
             sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
             use_tqdm: bool | None = None, *, add_generation_prompt: bool = True,
             continue_final_message: bool = False, tools: list[dict] | None = None,
             chat_template_kwargs: dict[str, Any] | None = None,
             lora_request: LoRARequest | Sequence[LoRARequest | None] | None = None
             ) -> list[GenerateOutput]:
        """One conversation (a list of {"role", "content"}) or a list of conversations, each
        parsed as POST /v1/chat/completions parses its messages (parse_chat: the same checks,
        template, tools, images and length check), sampled with sampling_params."""
        convs = list(messages) if messages and isinstance(messages[0], list) else [messages]
        self._generator()
        params = self._params(sampling_params, len(convs))
        adapters = self._adapters(lora_request, len(convs))
        requests = []
        for conv, sp, adapter in zip(convs, params, adapters, strict=True):
            body = {"messages": conv, "continue_final_message": continue_final_message,
                    "tools": tools, "chat_template_kwargs": chat_template_kwargs}
            if not continue_final_message:  # continuing a message opens no new one
                body["add_generation_prompt"] = add_generation_prompt
            req = parse_chat(body, self._ctx, sp)
            request = dataclasses.replace(req.requests[0], request_id=f"llm-{next(self._ids)}",
                                          adapter_name=adapter)
            if req.images:
                from minserve.multimodal.inputs import load_images_sync

                images = media(lambda: load_images_sync(req.images, self._ctx.media_policy,
                                                        self._ctx.image_processor))
                attach_images(request, images, self._ctx)
            requests.append((request, req.rendered_prompt))
        return self._run(requests, use_tqdm)


__all__ = ["LLM", "CompletionOutput", "FinishReason", "GenerateOutput", "LoRARequest"]
