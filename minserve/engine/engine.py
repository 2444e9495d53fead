"""Engine: loads model and tokenizer, owns scheduler + KV cache manager + runner, and steps them:
schedule -> runner.execute -> scheduler.update. Synchronous; no asyncio, no HTTP, no stop
strings (callers detokenize and abort on those)."""
from __future__ import annotations

import dataclasses
import json
import os
import random
import time
from collections.abc import Iterable
from typing import Any

import torch

from minserve.config import DTYPE_NAMES, ConfigError, EngineConfig, ModelConfig
from minserve.engine.kv_cache import KVCacheManager
from minserve.engine.request import Request, RequestOutput
from minserve.engine.scheduler import Scheduler, SchedulerConfig
from minserve.sampling_params import SamplingParams

DTYPES = {name: getattr(torch, canonical) for name, canonical in DTYPE_NAMES.items()}
# generation_config.json keys that become default SamplingParams (vLLM's list)
_GEN_KEYS = ("temperature", "top_p", "top_k", "min_p", "repetition_penalty")


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError("--device cuda was asked for but CUDA is not available")
    return torch.device(name)


def set_cpu_threads(device: torch.device) -> None:
    """On CPU, one torch intra-op thread per CPU this process may use (cgroup quota included),
    unless OMP_NUM_THREADS says otherwise."""
    from minserve.cpu_threads import num_torch_threads

    num = num_torch_threads() if device.type == "cpu" else None
    if num is not None and num != torch.get_num_threads():
        torch.set_num_threads(num)


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
        set_cpu_threads(self.device)
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
        config = self._resolve_limits(config, model_config)
        torch.manual_seed(config.seed)
        model = load_model(folder, model_config, self.device, self.dtype, config.load_format)
        self._setup(config, model_config, model, tokenizer, gen, folder)

    @classmethod
    def from_parts(cls, config: EngineConfig, model_config: ModelConfig, model: Any,
                   tokenizer: Any = None, generation_config: dict | None = None,
                   device: str = "cpu", dtype: torch.dtype = torch.float32) -> Engine:
        """An engine around an already-built model (tests, embedding a custom model)."""
        self = cls.__new__(cls)
        self.device, self.dtype = torch.device(device), dtype
        config = cls._resolve_limits(config, model_config)
        self._setup(config, model_config, model, tokenizer, generation_config or {}, None)
        return self

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

    def _setup(self, config: EngineConfig, model_config: ModelConfig, model: Any,
               tokenizer: Any, gen: dict, folder: str | None) -> None:
        from minserve.engine.runner import ModelRunner

        self.config = config
        self.model_config = model_config
        self.model_folder = folder
        self.tokenizer = tokenizer
        self.max_model_len = config.max_model_len
        self.generation_defaults = {k: gen[k] for k in _GEN_KEYS if gen.get(k) is not None}
        if gen.get("max_new_tokens") is not None:
            self.generation_defaults["max_tokens"] = gen["max_new_tokens"]
        eos = set(model_config.eos_token_ids)
        if tokenizer is not None:
            eos |= set(tokenizer.eos_token_ids)
        gen_eos = gen.get("eos_token_id")
        eos |= set([gen_eos] if isinstance(gen_eos, int) else (gen_eos or []))
        self.eos_token_ids = frozenset(eos)
        self.runner = ModelRunner(model, model_config, config, self.device, self.dtype)
        self.kv_cache = KVCacheManager(self.runner.num_blocks, config.block_size,
                                       config.enable_prefix_caching)
        self.scheduler = Scheduler(
            SchedulerConfig(config.max_num_seqs, config.max_num_batched_tokens,
                            config.max_model_len),
            self.kv_cache)
        # Unseeded requests draw their seed here: with --seed fixed a whole run is reproducible.
        self._seed_rng = random.Random(config.seed)

    @property
    def num_kv_blocks(self) -> int:
        return self.runner.num_blocks

    # ---- requests -----------------------------------------------------------------------------
    def add_request(self, request_id: str, prompt_token_ids: list[int], params: SamplingParams,
                    *, parent_id: str | None = None, sample_index: int = 0,
                    arrival_time: float | None = None) -> None:
        """Queue one sample (callers fan n out into n requests sharing parent_id)."""
        num_prompt = len(prompt_token_ids)
        if num_prompt == 0:
            raise ValueError("the prompt is empty")
        if num_prompt >= self.max_model_len:
            raise ValueError(
                f"This model's maximum context length is {self.max_model_len} tokens, but the "
                f"prompt has {num_prompt} tokens (at least one must be left to generate).")
        if params.max_tokens is not None and num_prompt + params.max_tokens > self.max_model_len:
            raise ValueError(
                f"This model's maximum context length is {self.max_model_len} tokens. However, "
                f"you requested {num_prompt + params.max_tokens} tokens ({num_prompt} in the "
                f"prompt, {params.max_tokens} for the completion). Please reduce the length.")
        vocab = self.model_config.vocab_size
        if any(not 0 <= t < vocab for t in prompt_token_ids):
            raise ValueError(f"prompt token ids must be in [0, {vocab})")
        seed = (params.seed + sample_index if params.seed is not None
                else self._seed_rng.getrandbits(63))
        structured = None
        if params.structured is not None:
            structured = self._compile_structured(params.structured)
        self.scheduler.add(Request(
            request_id, list(prompt_token_ids), params,
            eos_token_ids=self.eos_token_ids,
            arrival_time=time.monotonic() if arrival_time is None else arrival_time,
            parent_id=parent_id, sample_seed=seed, structured=structured))

    def _compile_structured(self, spec: dict) -> object:
        from minserve import structured  # llguidance is imported only when a request asks

        return structured.compile(spec, self.tokenizer, vocab_size=self.model_config.vocab_size)

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
        sampled = self.runner.execute(plan)
        return self.scheduler.update(plan, sampled)

    def stats(self) -> dict[str, Any]:
        return {
            "num_running": self.scheduler.num_running,
            "num_waiting": self.scheduler.num_waiting,
            "kv_cache_usage": self.kv_cache.usage,
            "prefix_cache_queries": self.kv_cache.prefix_cache_queries,
            "prefix_cache_hits": self.kv_cache.prefix_cache_hits,
            "num_preemptions": self.scheduler.num_preemptions,
            "num_kv_tokens": self.runner.num_blocks * self.config.block_size,
        }
