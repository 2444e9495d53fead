"""Engine: loads model and tokenizer, owns scheduler + KV cache manager + runner, and steps them:
schedule -> StepInputs (plain data, built here from the Requests) -> runner.execute -> update.
Synchronous; no asyncio, no HTTP, no stop strings (callers detokenize and abort on those)."""
from __future__ import annotations

import bisect
import dataclasses
import json
import os
import random
from collections.abc import Iterable
from typing import Any

import torch

from minserve.config import DTYPE_NAMES, ConfigError, EngineConfig, ModelConfig
from minserve.engine.beam import BeamSearchManager
from minserve.engine.kv_cache import KVCacheManager
from minserve.engine.request import (
    EngineInfo,
    EngineRequest,
    MultiModalItem,
    Request,
    RequestOutput,
)
from minserve.engine.runner import ModelRunner, PromptLogprobInputs, StepInputs
from minserve.engine.sampler import SamplingTensors
from minserve.engine.scheduler import Scheduler, SchedulerConfig, StepPlan, is_sampling_row

DTYPES = {name: getattr(torch, canonical) for name, canonical in DTYPE_NAMES.items()}
# generation_config.json keys that become default SamplingParams (vLLM's list)
# vllm:iteration_tokens_total's bucket bounds (tokens run in one step)
ITERATION_TOKEN_BUCKETS = (1, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096, 8192, 16384)
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


# Step sizes on CPU: a step holds every stream back until it ends, so it should stay short,
# about 0.5 s on 2 cores for the default model. From the idle figures (SmolLM2-135M float32: a
# 2,000-token prompt in one step took 14 s, an 8,000-token one 183 s) a chunk of q prompt tokens
# at context c costs about q * 1.7 ms + q * (c + q/2) * 5.3 us. So: 128 prompt tokens per
# request per step (~0.25 s at the start; half the 256-token budget stays for other requests,
# so a new arrival starts at the next step), and 48k (query, context) pairs per chunk (~0.25 s
# of attention at any context). bench/stall.py measures it (bench/RESULTS.md).
CPU_BATCHING = (256, 128, 48 * 1024)


def default_batching(device: torch.device) -> tuple[int, int, int]:
    """(max_num_batched_tokens, long_prefill_token_threshold, max_chunk_attention) when
    not given. GPU: vLLM's server defaults (8192 tokens on a GPU of >= 70 GiB that is not an
    A100, else 2048; no per-request caps)."""
    if device.type != "cuda":
        return CPU_BATCHING
    props = torch.cuda.get_device_properties(device)
    big = props.total_memory >= 70 << 30 and "a100" not in props.name.lower()
    return (8192 if big else 2048), 0, 0


def _or(value: int | None, default: int) -> int:
    return default if value is None else value


class Engine:
    def __init__(self, config: EngineConfig) -> None:
        from minserve.models.loader import load_model, resolve_model
        from minserve.tokenizer import Tokenizer, load_generation_config

        self.device = resolve_device(config.device)
        self.dtype = resolve_dtype(config.dtype, self.device)
        set_cpu_threads(self.device)
        # GGUF: serve the quantized blocks, or dequantize at load (--gguf-dequantize). By
        # default served quantized: the weights' bytes are the decode time, on a GPU and, with
        # the native CPU kernel (kernels/cpu_native.py), on a CPU. Without that kernel a CPU
        # dequantizes, since dense float32 matmuls measured faster than torch's int ones.
        gguf_dequantize = config.gguf_dequantize
        if gguf_dequantize is None:
            from minserve.kernels import cpu_native

            gguf_dequantize = (self.device.type == "cpu" and config.quantization != "gguf"
                               and not cpu_native.available())
        folder = resolve_model(config.model, config.revision, gguf_quantized=not gguf_dequantize)
        with open(os.path.join(folder, "config.json")) as f:
            model_config = ModelConfig.from_dict(json.load(f))
        chat_template = config.chat_template
        if chat_template is not None and os.path.isfile(chat_template):
            with open(chat_template) as f:
                chat_template = f.read()
        tokenizer = None if config.skip_tokenizer_init else \
            Tokenizer.from_folder(config.tokenizer or folder, chat_template=chat_template)
        if config.generation_config == "vllm":
            gen = {}
        else:
            gen = load_generation_config(folder if config.generation_config == "auto"
                                         else config.generation_config)
        gen = {**gen, **(config.override_generation_config or {})}
        self.config = config = self._resolve_limits(config, model_config, self.device)
        self.model_config = model_config
        self.workers = None
        if config.tensor_parallel_size > 1:
            from minserve.engine.workers import Workers, rank_device

            self.device = rank_device(self.device, 0)
            # the other ranks load the folder this rank resolved (a hub id is fetched once)
            self.workers = Workers(dataclasses.replace(config, model=folder), model_config,
                                   self.device, load_worker_runner)
        try:
            torch.manual_seed(config.seed)
            model = load_model(folder, model_config, self.device, self.dtype, config.load_format,
                               quantization=config.quantization)
            image_processor, media_policy = self._multimodal(folder, model_config, tokenizer,
                                                             config)
            self.lora = None
            if config.lora is not None:   # before the runner: its KV sizing sees the LoRA slots
                self.lora = _lora_manager(model, model_config, config, self.device, self.dtype)
                for module in config.lora.lora_modules:
                    self.lora.add(module.name, module.path)
            self.runner = ModelRunner(model, model_config, config, self.device, self.dtype,
                                      profile_images=self._profile_images(image_processor,
                                                                          config))
            if self.lora is not None:
                self.runner.lora_state = self.lora.state
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
                            config.max_model_len, config.long_prefill_token_threshold,
                            config.max_chunk_attention,
                            config.lora.max_loras if config.lora is not None else 0),
            self.kv_cache)
        defaults = {k: gen[k] for k in _GEN_KEYS if gen.get(k) is not None}
        if gen.get("max_new_tokens") is not None:
            defaults["max_tokens"] = gen["max_new_tokens"]
        gen_eos = gen.get("eos_token_id")
        eos = set(model_config.eos_token_ids) | set(tokenizer.eos_token_ids if tokenizer else ())
        eos |= set([gen_eos] if isinstance(gen_eos, int) else (gen_eos or []))
        self.info = EngineInfo(tokenizer, model_config.vocab_size, config.max_model_len,
                               model_config.architecture, defaults, frozenset(eos),
                               self.runner.num_blocks, config.block_size, image_processor,
                               config.image_limit if image_processor is not None else 0,
                               media_policy)
        # steps per bucket of ITERATION_TOKEN_BUCKETS (+inf last), and the tokens they ran
        self._iteration_buckets = [0] * (len(ITERATION_TOKEN_BUCKETS) + 1)
        self._iteration_tokens_sum = 0
        self.beams = BeamSearchManager(self._enqueue, self.scheduler.abort,
                                       config.max_model_len)
        # Unseeded requests draw their seed here: with --seed fixed a whole run is reproducible.
        self._seed_rng = random.Random(config.seed)

    @staticmethod
    def _resolve_limits(config: EngineConfig, mc: ModelConfig,
                        device: torch.device) -> EngineConfig:
        max_model_len = config.max_model_len or mc.max_position_embeddings
        if max_model_len > mc.max_position_embeddings and not mc.rope_scaling:
            raise ConfigError(f"--max-model-len {max_model_len} is longer than the model's "
                              f"max_position_embeddings ({mc.max_position_embeddings})")
        tokens, threshold, attention = default_batching(device)
        max_batched = config.max_num_batched_tokens or tokens
        if max_batched < config.block_size:
            raise ConfigError("--max-num-batched-tokens must be at least --block-size")
        return dataclasses.replace(
            config, max_model_len=max_model_len, max_num_batched_tokens=max_batched,
            long_prefill_token_threshold=_or(config.long_prefill_token_threshold, threshold),
            max_chunk_attention=_or(config.max_chunk_attention, attention))

    @staticmethod
    def _multimodal(folder: str, mc: ModelConfig, tokenizer: Any, config: EngineConfig
                    ) -> tuple[Any, Any]:
        """(image processor or None, MediaPolicy) for the front doors."""
        from minserve.multimodal.fetch import MediaPolicy
        from minserve.multimodal.inputs import get_image_processor

        try:
            policy = MediaPolicy.create(config.allowed_local_media_path,
                                        config.allowed_media_domains,
                                        config.allow_private_media_urls)
        except ValueError as e:
            raise ConfigError(str(e)) from None
        if not mc.is_multimodal:
            return None, policy
        return get_image_processor(mc.architecture, folder, mc.hf_config, tokenizer), policy

    def _profile_images(self, processor: Any, config: EngineConfig) -> list[dict[str, Any]]:
        """The largest batch of images one step can encode, for the KV-cache profile run: the
        largest image the processor makes, as many times as --limit-mm-per-prompt allows across
        max_num_seqs prompts, but no more than a step's token budget can reach."""
        if processor is None or config.image_limit == 0 or self.device.type != "cuda" \
                or config.kv_cache_memory is not None:
            return []    # only the CUDA profile run uses them
        from PIL import Image

        largest = processor.process(Image.new("RGB", processor.largest_image_size()))
        per_step = config.max_num_batched_tokens // max(largest.num_embeds, 1) + 1
        return [largest.data] * min(config.image_limit * config.max_num_seqs, per_step)

    # ---- requests -----------------------------------------------------------------------------
    def add_request(self, request: EngineRequest) -> None:
        """Queue one prompt as its n samples (named by request.sample_ids()); the scheduler
        admits siblings behind the first, so they share the prompt's KV blocks.
        NOTE: its length against max_model_len was checked once, where it was built
        (protocol.check_length: the HTTP routes and LLM alike)."""
        prompt, params = request.prompt_token_ids, request.sampling
        vocab = self.info.vocab_size
        bad = next((t for t in prompt if not 0 <= t < vocab), None)
        if bad is not None:
            raise ValueError(f"Token id {bad} is out of vocabulary")
        self._check_mm_items(request)
        name = request.adapter_name
        if name is not None and (self.lora is None or not self.lora.has(name)):
            raise ValueError(f"The model `{name}` does not exist." if self.lora is not None
                             else f"LoRA adapter {name!r}: LoRA is off (start with --enable-lora)")
        ids = request.sample_ids()
        if any(rid in self.scheduler.requests for rid in ids) or \
                request.request_id in self.beams.searches:
            raise ValueError(f"request id {request.request_id!r} is already in use")
        if params.use_beam_search:
            return self.beams.add(request, self.info.eos_token_ids)
        # All n compile before any is queued: a bad grammar rejects the request as a whole.
        constraints = [None if params.structured is None
                       else self._compile_structured(params.structured) for _ in ids]
        parent_id = request.request_id if len(ids) > 1 else None
        for i, (rid, structured) in enumerate(zip(ids, constraints, strict=True)):
            seed = (params.seed + i if params.seed is not None
                    else self._seed_rng.getrandbits(63))
            self._enqueue(Request(
                rid, prompt, params, eos_token_ids=self.info.eos_token_ids,
                arrival_time=request.arrival_time, adapter_name=request.adapter_name,
                mm_items=request.mm_items, cache_salt=request.cache_salt,
                priority=request.priority, mrope_positions=request.mrope_positions,
                mrope_position_delta=request.mrope_position_delta, parent_id=parent_id,
                sample_seed=seed, structured=structured))

    def _check_mm_items(self, request: EngineRequest) -> None:
        if request.mm_items and self.info.image_processor is None:
            raise ValueError(f"{self.model_config.architecture} is a text-only model: it takes "
                             "no images")
        end = 0
        for item in request.mm_items:
            if item.offset < end or item.offset + item.length > len(request.prompt_token_ids):
                raise ValueError("multimodal items must lie in the prompt, in order, apart")
            end = item.offset + item.length

    def _compile_structured(self, spec: dict) -> object:
        from minserve import structured  # llguidance is imported only when a request asks

        return structured.compile(spec, self.info.tokenizer, vocab_size=self.info.vocab_size)

    def abort_request(self, request_ids: str | Iterable[str]) -> None:
        """Takes effect at the next step: the request's blocks are freed then."""
        ids = [request_ids] if isinstance(request_ids, str) else list(request_ids)
        self.scheduler.abort(self.beams.abort(ids) if self.beams.searches else ids)

    def has_unfinished_requests(self) -> bool:
        return self.scheduler.has_unfinished_requests()

    # ---- the step -----------------------------------------------------------------------------
    def step(self) -> list[RequestOutput]:
        """schedule -> execute -> update. Exceptions reach the caller (AsyncEngine fails the
        requests in flight); the scheduler's state is then undefined."""
        plan = self.scheduler.schedule()
        if plan.is_empty:
            outputs = self.scheduler.update(plan, [])
        else:
            num = plan.total_num_scheduled_tokens
            self._iteration_buckets[bisect.bisect_left(ITERATION_TOKEN_BUCKETS, num)] += 1
            self._iteration_tokens_sum += num
            outputs = self.scheduler.update(plan, self._execute(self._step_inputs(plan)))
        if self.lora is not None and self.lora.retired:   # unloaded adapters nobody uses now
            self.lora.purge({r.adapter_name for r in self.scheduler.requests.values()})
        return self._beam_outputs(outputs)

    def _enqueue(self, request: Request) -> None:
        """Into the scheduler, stamped with its adapter's current load (the prefix-cache root)."""
        if request.adapter_name is not None:
            request.adapter_load = self.lora.load_id(request.adapter_name)
        self.scheduler.add(request)

    def _execute(self, step: StepInputs) -> Any:
        if self.workers is None:
            return self.runner.execute(step)
        try:
            self.workers.check_alive()
            self.workers.broadcast(step)
            return self.runner.execute(step)
        except BaseException:
            self.workers.kill()   # a rank died or timed out: the others may be stuck
            raise

    def shutdown(self) -> None:
        """Stop the tensor-parallel workers (a no-op with one process)."""
        if self.workers is not None:
            self.workers.shutdown()
            self.workers = None

    def _beam_outputs(self, outputs: list[RequestOutput]) -> list[RequestOutput]:
        return self.beams.process(outputs) if self.beams.searches else outputs

    # ---- LoRA adapters (the load/unload routes and LLM call these on the engine thread) ------
    def add_lora(self, name: str, path: str) -> None:
        """Serve another adapter; ValueError (LoRAError) when it is refused."""
        if self.lora is None:
            raise ValueError("LoRA is off: start the server with --enable-lora")
        self.lora.add(name, path)

    def remove_lora(self, name: str) -> None:
        """Stop serving an adapter; requests running with it finish first."""
        if self.lora is None:
            raise ValueError("LoRA is off: start the server with --enable-lora")
        self.lora.remove(name)
        self.lora.purge({r.adapter_name for r in self.scheduler.requests.values()})

    def list_loras(self) -> dict[str, str]:
        return dict(self.lora.paths) if self.lora is not None else {}

    def _step_inputs(self, plan: StepPlan) -> StepInputs:
        """The plan as plain data for the runner: tokens, block tables, the rows that sample and
        their SamplingTensors (grammar bitmask included), the prompt-logprob targets."""
        token_ids, computed, block_tables, sample_rows = [], [], [], []
        mm_inputs: list[tuple[int, MultiModalItem]] = []
        mrope = [] if self.runner.uses_mrope else None
        plp = None
        for r, (req, n) in enumerate(zip(plan.requests, plan.num_scheduled_tokens, strict=True)):
            ctx = req.num_computed_tokens
            token_ids += _token_slice(req, ctx, ctx + n)
            computed.append(ctx)
            # the images whose placeholder tokens this step runs (a chunk may cut one in two)
            mm_inputs += [(r, item) for item in req.mm_items
                          if item.offset < ctx + n and ctx < item.offset + item.length]
            if mrope is not None:
                mrope.append((req.mrope_positions, req.mrope_position_delta))
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
        slots = (None if self.lora is None
                 else self.lora.activate([r.adapter_name for r in plan.requests]))
        loads = self.lora.take_slot_loads() if self.lora is not None else None
        return StepInputs(token_ids, plan.num_scheduled_tokens, computed, block_tables,
                          sample_rows, sampling, plp, mm_inputs, mrope, slots,
                          loads if self.workers is not None else None)

    def stats(self) -> dict[str, Any]:
        return {
            "num_running": self.scheduler.num_running,
            "num_waiting": self.scheduler.num_waiting,
            "kv_cache_usage": self.kv_cache.usage,
            "prefix_cache_queries": self.kv_cache.prefix_cache_queries,
            "prefix_cache_hits": self.kv_cache.prefix_cache_hits,
            "num_preemptions": self.scheduler.num_preemptions,
            "num_prompt_tokens": self.scheduler.num_prompt_tokens_computed,
            "num_generation_tokens": self.scheduler.num_generation_tokens,
            "num_waiting_deferred": self.scheduler.num_waiting_deferred,
            "iteration_tokens": (tuple(self._iteration_buckets), self._iteration_tokens_sum),
            **(self._lora_stats() if self.lora is not None else {}),
        }

    def _lora_stats(self) -> dict[str, Any]:
        """vllm:lora_requests_info's labels: adapters of running and of waiting requests."""
        sched = self.scheduler
        return {"lora_running": sorted({r.adapter_name for r in sched.running
                                        if r.adapter_name is not None}),
                "lora_waiting": sorted({r.adapter_name for r in sched.waiting
                                        if r.adapter_name is not None}),
                "max_lora": self.config.lora.max_loras}


def _token_slice(request: Request, start: int, end: int) -> list[int]:
    """request.all_token_ids[start:end] without concatenating the lists (decodes are hot)."""
    num_prompt = request.num_prompt_tokens
    if start >= num_prompt:
        return request.output_token_ids[start - num_prompt:end - num_prompt]
    if end <= num_prompt:
        return request.prompt_token_ids[start:end]
    return request.prompt_token_ids[start:] + request.output_token_ids[:end - num_prompt]


def _lora_manager(model: Any, model_config: ModelConfig, config: EngineConfig,
                  device: torch.device, dtype: torch.dtype) -> Any:
    """The LoRA slots on a rank's model (every rank builds them before its runner sizes KV)."""
    from minserve.lora.manager import LoRAManager

    lora_dtype = dtype if config.lora.lora_dtype == "auto" else DTYPES[config.lora.lora_dtype]
    return LoRAManager(model, model_config, config.lora, device, lora_dtype)


def load_worker_runner(config: EngineConfig, rank: int, local_rank: int, port: int) -> ModelRunner:
    """The rank's model shards and KV cache share, built as the Engine builds rank 0's."""
    from minserve.engine.workers import rank_device, step_timeout_s
    from minserve.models import parallel
    from minserve.models.loader import load_model, resolve_model

    device = rank_device(resolve_device(config.device), local_rank)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    dtype = resolve_dtype(config.dtype, device)
    folder = resolve_model(config.model, config.revision)
    with open(os.path.join(folder, "config.json")) as f:
        model_config = ModelConfig.from_dict(json.load(f))
    config = Engine._resolve_limits(config, model_config, device)
    parallel.check_divisible(model_config, config.tensor_parallel_size)
    parallel.init(rank, config.tensor_parallel_size, config.master_addr, port, device,
                  step_timeout_s())
    torch.manual_seed(config.seed)
    model = load_model(folder, model_config, device, dtype, config.load_format,
                       quantization=config.quantization)   # --quantization fp8 on every rank
    lora = (None if config.lora is None
            else _lora_manager(model, model_config, config, device, dtype))
    runner = ModelRunner(model, model_config, config, device, dtype)
    if lora is not None:   # the head's step plans say what to load in which slot
        runner.lora_state, runner.lora_manager = lora.state, lora
    runner.dummy_run(config.block_size, 1)   # the head runs the same warm-up step (Engine)
    return runner
