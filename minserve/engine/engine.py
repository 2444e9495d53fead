"""Engine: loads model and tokenizer, owns scheduler + KV cache manager + runner, and steps them:
schedule -> StepInputs (plain data, built here from the Requests) -> runner.execute -> update.
Synchronous; no asyncio, no HTTP, no stop strings (callers detokenize and abort on those)."""
from __future__ import annotations

import dataclasses
import json
import os
import random
from collections.abc import Iterable
from typing import Any

import torch

from minserve.config import DTYPE_NAMES, ConfigError, EngineConfig, ModelConfig
from minserve.engine.kv_cache import KVCacheManager
from minserve.engine.request import (
    EngineInfo,
    EngineRequest,
    Request,
    RequestOutput,
    prompt_length_error,
)
from minserve.engine.runner import ModelRunner, PromptLogprobInputs, StepInputs
from minserve.engine.sampler import SamplingTensors
from minserve.engine.scheduler import Scheduler, SchedulerConfig, StepPlan, is_sampling_row

DTYPES = {name: getattr(torch, canonical) for name, canonical in DTYPE_NAMES.items()}
# generation_config.json keys that become default SamplingParams (vLLM's list)
_GEN_KEYS = ("temperature", "top_p", "top_k", "min_p", "repetition_penalty")


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError("--device cuda was asked for but CUDA is not available")
    return torch.device(name)


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    if name == "auto":
        # bf16 halves memory traffic on GPUs; CPUs run float32 (bf16 matmuls are slow there).
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return DTYPES[name]


class Engine:
    def __init__(self, config: EngineConfig) -> None:
        from minserve.models.loader import load_model, resolve_model
        from minserve.tokenizer import Tokenizer, load_generation_config

        self.device = resolve_device(config.device)
        self.dtype = resolve_dtype(config.dtype, self.device)
        folder = resolve_model(config.model, config.revision)
        with open(os.path.join(folder, "config.json")) as f:
            model_config = ModelConfig.from_dict(json.load(f))
        chat_template = config.chat_template
        if chat_template is not None and os.path.isfile(chat_template):
            with open(chat_template) as f:
                chat_template = f.read()
        tokenizer = Tokenizer.from_folder(config.tokenizer or folder, chat_template=chat_template)
        if config.generation_config == "vllm":
            gen = {}
        else:
            gen = load_generation_config(folder if config.generation_config == "auto"
                                         else config.generation_config)
        self.config = config = self._resolve_limits(config, model_config)
        self.model_config = model_config
        self.workers = None
        if config.tensor_parallel_size > 1:
            from minserve.engine.workers import Workers, rank_device

            self.device = rank_device(self.device, 0)
            # the other ranks load the folder this rank resolved (a hub id is fetched once)
            self.workers = Workers(dataclasses.replace(config, model=folder), model_config,
                                   self.device)
        try:
            torch.manual_seed(config.seed)
            model = load_model(folder, model_config, self.device, self.dtype, config.load_format)
            self.runner = ModelRunner(model, model_config, config, self.device, self.dtype)
            if self.workers is not None:
                # every rank's first forward (lazy imports) runs now, not under the step timeout
                self.runner.dummy_run(config.block_size, 1)
        except BaseException:
            self.shutdown()
            raise
        self.kv_cache = KVCacheManager(self.runner.num_blocks, config.block_size,
                                       config.enable_prefix_caching)
        self.scheduler = Scheduler(
            SchedulerConfig(config.max_num_seqs, config.max_num_batched_tokens,
                            config.max_model_len),
            self.kv_cache)
        defaults = {k: gen[k] for k in _GEN_KEYS if gen.get(k) is not None}
        if gen.get("max_new_tokens") is not None:
            defaults["max_tokens"] = gen["max_new_tokens"]
        gen_eos = gen.get("eos_token_id")
        eos = set(model_config.eos_token_ids) | set(tokenizer.eos_token_ids) | set(
            [gen_eos] if isinstance(gen_eos, int) else (gen_eos or []))
        self.info = EngineInfo(tokenizer, model_config.vocab_size, config.max_model_len,
                               model_config.architecture, defaults, frozenset(eos),
                               self.runner.num_blocks, config.block_size)
        # Unseeded requests draw their seed here: with --seed fixed a whole run is reproducible.
        self._seed_rng = random.Random(config.seed)

    @staticmethod
    def _resolve_limits(config: EngineConfig, mc: ModelConfig) -> EngineConfig:
        max_model_len = config.max_model_len or mc.max_position_embeddings
        if max_model_len > mc.max_position_embeddings and not mc.rope_scaling:
            raise ConfigError(f"--max-model-len {max_model_len} is longer than the model's "
                              f"max_position_embeddings ({mc.max_position_embeddings})")
        max_batched = config.max_num_batched_tokens or max(8192, max_model_len)
        if max_batched < config.block_size:
            raise ConfigError("--max-num-batched-tokens must be at least --block-size")
        return dataclasses.replace(config, max_model_len=max_model_len,
                                   max_num_batched_tokens=max_batched)

    # ---- requests -----------------------------------------------------------------------------
    def add_request(self, request: EngineRequest) -> None:
        """Queue one prompt as its n samples (named by request.sample_ids()); the scheduler
        admits siblings behind the first, so they share the prompt's KV blocks."""
        prompt, params = request.prompt_token_ids, request.sampling_params
        error = prompt_length_error(len(prompt), params.max_tokens, self.info.max_model_len)
        if error is not None:
            raise ValueError(error[0])
        vocab = self.info.vocab_size
        if any(not 0 <= t < vocab for t in prompt):
            raise ValueError(f"prompt token ids must be in [0, {vocab})")
        ids = request.sample_ids()
        if any(rid in self.scheduler.requests for rid in ids):
            raise ValueError(f"request id {request.request_id!r} is already in use")
        # All n compile before any is queued: a bad grammar rejects the request as a whole.
        constraints = [None if params.structured is None
                       else self._compile_structured(params.structured) for _ in ids]
        parent_id = request.request_id if len(ids) > 1 else None
        for i, (rid, structured) in enumerate(zip(ids, constraints, strict=True)):
            seed = (params.seed + i if params.seed is not None
                    else self._seed_rng.getrandbits(63))
            self.scheduler.add(Request(
                rid, prompt, params, eos_token_ids=self.info.eos_token_ids,
                arrival_time=request.arrival_time, adapter_name=request.adapter_name,
                mm_items=request.mm_items, cache_salt=request.cache_salt,
                priority=request.priority, parent_id=parent_id, sample_seed=seed,
                structured=structured))

    def _compile_structured(self, spec: dict) -> object:
        from minserve import structured  # llguidance is imported only when a request asks

        return structured.compile(spec, self.info.tokenizer, vocab_size=self.info.vocab_size)

    def abort_request(self, request_ids: str | Iterable[str]) -> None:
        """Takes effect at the next step: the request's blocks are freed then."""
        self.scheduler.abort([request_ids] if isinstance(request_ids, str) else request_ids)

    def has_unfinished_requests(self) -> bool:
        return self.scheduler.has_unfinished_requests()

    # ---- the step -----------------------------------------------------------------------------
    def step(self) -> list[RequestOutput]:
        """schedule -> execute -> update. Exceptions reach the caller (AsyncEngine fails the
        requests in flight); the scheduler's state is then undefined."""
        plan = self.scheduler.schedule()
        if plan.is_empty:
            return self.scheduler.update(plan, [])
        step = self._step_inputs(plan)
        if self.workers is None:
            return self.scheduler.update(plan, self.runner.execute(step))
        try:
            self.workers.check_alive()
            self.workers.broadcast(step)
            sampled = self.runner.execute(step)
        except BaseException:
            self.workers.kill()   # a rank died or timed out: the others may be stuck
            raise
        return self.scheduler.update(plan, sampled)

    def shutdown(self) -> None:
        """Stop the tensor-parallel workers (a no-op with one process)."""
        if self.workers is not None:
            self.workers.shutdown()
            self.workers = None

    def _step_inputs(self, plan: StepPlan) -> StepInputs:
        """The plan as plain data for the runner: tokens, block tables, the rows that sample and
        their SamplingTensors (grammar bitmask included), the prompt-logprob targets."""
        token_ids, computed, block_tables, sample_rows = [], [], [], []
        plp = None
        for r, (req, n) in enumerate(zip(plan.requests, plan.num_scheduled_tokens, strict=True)):
            ctx = req.num_computed_tokens
            token_ids += _token_slice(req, ctx, ctx + n)
            computed.append(ctx)
            block_tables.append(req.block_ids)   # read before the scheduler changes it again
            if is_sampling_row(req, n):
                sample_rows.append(r)
            k = req.sampling.prompt_logprobs
            if k is not None and not req.prompt_logprobs_done:
                # Position p predicts prompt token p + 1; the last prompt position predicts the
                # first output token, which is the sampled row's business.
                end = min(ctx + n, req.num_prompt_tokens - 1)
                plp = plp or PromptLogprobInputs([], [], [], [])
                plp.rows.append(r)
                plp.counts.append(max(end - ctx, 0))
                plp.target_ids += req.prompt_token_ids[ctx + 1:end + 1]
                plp.num_logprobs.append(k)
        sampling = None
        if sample_rows:
            sampling = SamplingTensors.from_requests(
                [plan.requests[r] for r in sample_rows], self.info.vocab_size,
                pin=self.device.type == "cuda")
        return StepInputs(token_ids, plan.num_scheduled_tokens, computed, block_tables,
                          sample_rows, sampling, plp)

    def stats(self) -> dict[str, Any]:
        return {
            "num_running": self.scheduler.num_running,
            "num_waiting": self.scheduler.num_waiting,
            "kv_cache_usage": self.kv_cache.usage,
            "prefix_cache_queries": self.kv_cache.prefix_cache_queries,
            "prefix_cache_hits": self.kv_cache.prefix_cache_hits,
            "num_preemptions": self.scheduler.num_preemptions,
        }


def _token_slice(request: Request, start: int, end: int) -> list[int]:
    """request.all_token_ids[start:end] without concatenating the lists (decodes are hot)."""
    num_prompt = request.num_prompt_tokens
    if start >= num_prompt:
        return request.output_token_ids[start - num_prompt:end - num_prompt]
    if end <= num_prompt:
        return request.prompt_token_ids[start:end]
    return request.prompt_token_ids[start:] + request.output_token_ids[:end - num_prompt]
