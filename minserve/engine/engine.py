"""Engine: has its model built (builder.py), loads the tokenizer, owns scheduler + KV cache manager
+ runner, and steps them: schedule -> StepInputs (plain data, built here from the Requests) ->
runner.execute -> update. Synchronous; no asyncio, no HTTP, no stop strings (callers detokenize
and abort on those)."""
from __future__ import annotations

import bisect
import dataclasses
import functools
import os
import random
from collections.abc import Iterable
from typing import Any

from minserve.config import GENERATION_SAMPLING_KEYS, EngineConfig
from minserve.engine.beam import BeamSearchManager
from minserve.engine.builder import (
    build_model,
    build_runner,
    find_model,
    image_processor,
    load_worker_runner,
    rank_device,
    resolve_device,
    resolve_limits,
)
from minserve.engine.kv_cache import KVCacheManager
from minserve.engine.request import (
    EngineInfo,
    EngineRequest,
    MultiModalItem,
    Request,
    RequestOutput,
)
from minserve.engine.runner import PromptLogprobInputs, StepInputs
from minserve.engine.sampler import SamplingTensors
from minserve.engine.scheduler import Scheduler, SchedulerConfig, StepPlan, is_sampling_row
from minserve.engine.sleep import ParkedWeights
from minserve.engine.spec import make_speculator, num_lookahead_tokens
from minserve.engine.spec.drafter import build_drafter, find_draft
from minserve.engine.state_cache import hybrid_cache_settings, plan_states
from minserve.engine.workers import Workers

# vllm:iteration_tokens_total's bucket bounds (tokens run in one step)
ITERATION_TOKEN_BUCKETS = (1, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096, 8192, 16384)


class Engine:
    def __init__(self, config: EngineConfig) -> None:
        self.device = resolve_device(config.device)
        source = find_model(config, self.device)
        tokenizer, defaults, eos = _front_door_settings(config, source)
        self.config = config = resolve_limits(config, source.model_config, self.device)
        self.model_config = source.model_config
        draft = find_draft(config, source, self.device)   # checked before any rank starts
        self.workers = None
        if config.tensor_parallel_size > 1:
            self.device = rank_device(self.device, 0)
            # the other ranks load the folder this rank resolved (a hub id is fetched once)
            self.workers = Workers(dataclasses.replace(config, model=source.folder),
                                   source.model_config, self.device, load_worker_runner)
        # sleep level 2 drops the weights; wake_up builds them again from the checkpoint
        self._reload = functools.partial(build_model, config, source, self.device)
        self.parked: ParkedWeights | None = None    # set while asleep
        try:
            processor = image_processor(source, tokenizer)
            self.runner = build_runner(
                config, source, self.device, processor,
                None if draft is None else functools.partial(build_drafter, draft, self.device))
        except BaseException:
            self.shutdown()
            raise
        self.dtype, self.lora = self.runner.dtype, self.runner.lora_manager
        self.kv_cache = KVCacheManager(self.runner.num_blocks, config.block_size,
                                       *hybrid_cache_settings(config, self.runner))
        self.speculator = make_speculator(config, self.device)
        self.scheduler = Scheduler(
            SchedulerConfig(config.max_num_seqs, config.max_num_batched_tokens,
                            config.max_model_len, config.long_prefill_token_threshold,
                            config.max_chunk_attention,
                            config.lora.max_loras if config.lora is not None else 0,
                            whole_images=self.runner.bidirectional_images,
                            max_fanout_rows=config.max_fanout_rows or 0,
                            num_lookahead_tokens=num_lookahead_tokens(config),
                            align_chunks=self.kv_cache.state_snapshots is not None),
            self.kv_cache)
        self.info = EngineInfo(tokenizer, self.model_config.vocab_size, config.max_model_len,
                               source.arch.name, defaults, eos, self.runner.num_blocks,
                               config.block_size, processor,
                               config.image_limit if processor is not None else 0)
        # steps per bucket of ITERATION_TOKEN_BUCKETS (+inf last), and the tokens they ran
        self._iteration_buckets = [0] * (len(ITERATION_TOKEN_BUCKETS) + 1)
        self._iteration_tokens_sum = 0
        self.beams = BeamSearchManager(self._enqueue, self.scheduler.abort,
                                       config.max_model_len)
        # Unseeded requests draw their seed here: with --seed fixed a whole run is reproducible.
        self._seed_rng = random.Random(config.seed)

    # ---- requests -----------------------------------------------------------------------------
    def add_request(self, request: EngineRequest) -> None:
        """Queue one prompt as its n samples (named by request.sample_ids()); the scheduler
        admits siblings behind the first, so they share the prompt's KV blocks.
        NOTE: its length against max_model_len was checked once, where it was built
        (protocol.check_length: the HTTP routes and LLM alike)."""
        if self.parked is not None:
            raise ValueError("the model is sleeping: wake it up first")
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
            fresh = [r for r in plan.requests if not r.output_token_ids]
            num_generated = self.scheduler.num_generation_tokens
            step = self._step_inputs(plan)
            sampled = self._execute(step)
            outputs = self.scheduler.update(plan, sampled)
            # vLLM's count of a step (its IterationStats): the tokens it sampled, plus the whole
            # prompt of each request whose first token it sampled (cached or chunked alike), so
            # a request adds P + G over its steps
            num = self.scheduler.num_generation_tokens - num_generated + sum(
                r.num_prompt_tokens for r in fresh if r.output_token_ids)
            self._iteration_buckets[bisect.bisect_left(ITERATION_TOKEN_BUCKETS, num)] += 1
            self._iteration_tokens_sum += num
            if self.speculator is not None:   # the next step's drafts
                self.speculator.update(plan, step.num_draft_tokens, step.draft, sampled,
                                       self._num_requests)
        if self.lora is not None and self.lora.retired:   # unloaded adapters nobody uses now
            self.lora.purge({r.adapter_name for r in self.scheduler.requests.values()})
        return self._beam_outputs(outputs)

    def _enqueue(self, request: Request) -> None:
        """Into the scheduler, stamped with its adapter's current load (the prefix-cache root)."""
        if request.adapter_name is not None:
            request.adapter_load = self.lora.load_id(request.adapter_name)
        if self.speculator is not None:
            self.speculator.add(request)
        self.scheduler.add(request)

    @property
    def _num_requests(self) -> int:
        """The batch speculation weighs (disable_by_batch_size): running and waiting."""
        return self.scheduler.num_running + self.scheduler.num_waiting

    def _execute(self, step: StepInputs) -> Any:
        if self.workers is None:
            return self.runner.execute(step)
        return self.workers.run(step, lambda: self.runner.execute(step))

    def shutdown(self) -> None:
        """Stop the tensor-parallel workers (a no-op with one process)."""
        if self.workers is not None:
            self.workers.shutdown()
            self.workers = None

    # ---- sleep mode (POST /sleep, /wake_up, and the model pool parking an idle model) -------
    def sleep(self, level: int) -> None:
        """Free the KV cache and park the weights (level 1: in host memory; level 2: dropped,
        reloaded by wake_up). ValueError while requests run or where sleep is not supported."""
        if self.parked is not None:
            return
        if self.has_unfinished_requests():
            raise ValueError("cannot sleep while requests are running")
        if self.workers is not None or self.runner.drafter is not None:
            raise ValueError("sleep mode does not support tensor parallel or speculative "
                             "decoding with a draft model yet")
        self.runner.free_kv_cache()
        self.kv_cache.reset()    # the blocks' contents are gone: no prefix hits on them
        self.parked = ParkedWeights(self.runner.model, level)

    def wake_up(self) -> None:
        if self.parked is None:
            return
        self.parked.restore(self.runner.model, lambda: self._reload().model)
        self.parked = None
        self.runner.free_kv_cache(free=False)

    def _beam_outputs(self, outputs: list[RequestOutput]) -> list[RequestOutput]:
        return self.beams.process(outputs) if self.beams.searches else outputs

    # ---- LoRA adapters (the load/unload routes and LLM call these on the engine thread) ------
    def read_lora(self, name: str, path: str) -> Any:
        """Read and check an adapter without touching the engine's state, so from any thread
        (AsyncEngine reads in a worker, then add_lora() takes the weights between two steps)."""
        if self.lora is None:
            raise ValueError("LoRA is off: start the server with --enable-lora")
        return self.lora.read(name, path)

    def add_lora(self, name: str, path: str, weights: Any = None) -> None:
        """Serve another adapter (its weights from read_lora, or read here); ValueError
        (LoRAError) when it is refused."""
        if self.lora is None:
            raise ValueError("LoRA is off: start the server with --enable-lora")
        self.lora.add(name, path, weights)

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
            token_ids += req.spec_token_ids     # the drafts this step verifies
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
        num_verify, draft = (self.speculator.step_inputs(plan, self._num_requests)
                             if self.speculator is not None else (None, None))
        sampling = None
        if sample_rows:
            sampling = SamplingTensors.from_requests(
                [plan.requests[r] for r in sample_rows], self.info.vocab_size,
                pin=self.device.type == "cuda",
                spec_token_ids=None if num_verify is None else
                [plan.requests[r].spec_token_ids for r in sample_rows])
        slots = (None if self.lora is None
                 else self.lora.activate([r.adapter_name for r in plan.requests]))
        loads = self.lora.take_slot_loads() if self.lora is not None else None
        return StepInputs(token_ids, plan.num_scheduled_tokens, computed, block_tables,
                          sample_rows, sampling, plp, mm_inputs, mrope, slots,
                          loads if self.workers is not None else None, num_verify, draft,
                          *(() if self.kv_cache.state_slots is None else plan_states(
                              self.kv_cache, plan.requests, plan.num_scheduled_tokens)))

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
            **(self.speculator.stats.as_dict() if self.speculator is not None else {}),
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


def _front_door_settings(config: EngineConfig, source: Any
                         ) -> tuple[Any, dict[str, Any], frozenset[int]]:
    """The tokenizer (None with --skip-tokenizer-init), the default SamplingParams fields from
    generation_config.json and --override-generation-config, and every eos token id."""
    from minserve.tokenizer import Tokenizer, load_generation_config

    chat_template = config.chat_template
    if chat_template is not None and os.path.isfile(chat_template):
        with open(chat_template) as f:
            chat_template = f.read()
    tokenizer = None if config.skip_tokenizer_init else \
        Tokenizer.from_folder(config.tokenizer or source.folder, chat_template=chat_template)
    gen = {} if config.generation_config == "vllm" else load_generation_config(
        source.folder if config.generation_config == "auto" else config.generation_config)
    gen = {**gen, **(config.override_generation_config or {})}
    defaults = {k: gen[k] for k in GENERATION_SAMPLING_KEYS if gen.get(k) is not None}
    if "max_new_tokens" in defaults:
        defaults["max_tokens"] = defaults.pop("max_new_tokens")
    gen_eos = gen.get("eos_token_id")
    eos = set(source.model_config.eos_token_ids) | set(tokenizer.eos_token_ids if tokenizer
                                                       else ())
    eos |= set([gen_eos] if isinstance(gen_eos, int) else (gen_eos or []))
    return tokenizer, defaults, frozenset(eos)
