"""ModelRunner: sizes and owns the KV cache tensors and runs one step given as plain data
(StepInputs: no Request, no grammar): prepare_inputs -> run_model -> sample -> host outputs, with
the step's one host sync at the end. It decides nothing: which tokens run is the scheduler's call.

The flat batch, for a step with a decode (r0), a prefill chunk mid-prompt (r1) and a new prompt
(r2); T = total scheduled tokens, R = 3:

    request:          r0 |      r1       |    r2
    input_ids[T]:     t  | t  t  t  t  t | t  t  t
    positions[T]:     41 | 16 17 18 19 20| 0  1  2        (context_len + i)
    query_start_loc:  0    1               6        9     [R+1]
    seq_lens[R]:      42   21              3              context_len + query_len
    slot_mapping[T]:  block_table[r, pos // BS] * BS + pos % BS
    logits_indices:   0    (r1 only if the chunk ends its prompt)  8

Speculative decoding (engine/spec/): a decode row with k drafts runs 1 + k tokens (its last
token, then the drafts) and samples at all 1 + k of them; to_output keeps the drafts the
target's own tokens confirm (spec/rejection.py). A drafter with a model then drafts the next
step's tokens on this rank, after the sync.
"""
from __future__ import annotations

import itertools
import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from minserve.config import ConfigError, EngineConfig, ModelConfig
from minserve.engine.encoder_cache import (
    EncoderCache,
    image_span_ends,
    merge_embeddings,
    to_tensors,
)
from minserve.engine.request import MultiModalItem, Request
from minserve.engine.sampler import (
    LogprobsTensors,
    SamplerResult,
    SamplingTensors,
    compute_logprobs,
    sample,
)
from minserve.engine.scheduler import SampledTokens
from minserve.engine.spec.rejection import accept_drafts
from minserve.engine.state_cache import lazy_zeros, size_state_caches
from minserve.kernels import AttnMetadata
from minserve.kernels.lora import LoRAMapping, lora_mapping
from minserve.models import parallel
from minserve.sampling_params import SamplingParams

# The CPU KV cache by default: room for one full-length sequence, at least 512 MiB (about 16
# CPU-sized batches' worth of short chats for the default model), at most 2 GiB; never more than
# max_num_seqs full-length sequences. Its pages are committed as blocks are first written.
DEFAULT_CPU_KV_CACHE_BYTES = 2 << 30
MIN_CPU_KV_CACHE_BYTES = 512 << 20


@dataclass(slots=True)
class PromptLogprobInputs:
    rows: list[int]            # rows that score prompt tokens this step
    counts: list[int]          # per row: how many (position p predicts prompt token p + 1)
    target_ids: list[int]      # the predicted prompt tokens, flat
    num_logprobs: list[int]    # per row: top-k asked


@dataclass(slots=True)
class StepInputs:
    """One step as plain data, built on the engine side (R rows, T tokens)."""
    token_ids: list[int]                 # [T] each row's scheduled tokens, row after row
    num_scheduled_tokens: list[int]      # [R] query_len
    num_computed_tokens: list[int]       # [R] context_len
    block_tables: list[list[int]]        # [R] the row's block ids
    sample_rows: list[int]               # rows the step brings up to date: they sample
    sampling: SamplingTensors | None     # host tensors for sample_rows, in that order
    prompt_logprobs: PromptLogprobInputs | None = None
    # (row, item): the images with placeholder tokens among the row's scheduled tokens
    mm_inputs: list[tuple[int, MultiModalItem]] = field(default_factory=list)
    # M-RoPE models: per row (prompt positions [3, P] or None, delta); None for other models
    mrope: list[tuple[Any, int]] | None = None
    adapter_slots: list[int] | None = None   # [R] LoRA slot per row, -1 = the base model
    # tensor parallel: the LoRA slots rank 0 (re)filled since the last step, [slot, name, path]
    # (path "": emptied); the other ranks load the same adapters into the same slots
    lora_loads: list[list] | None = None
    # speculative decoding: [R] the drafts at the end of each row's tokens (None: no row has
    # any); rank 0's drafter inputs (engine/spec/drafter.py's DraftInputs; None: no drafting)
    num_draft_tokens: list[int] | None = None
    draft: Any = None
    # hybrid models (engine/state_cache.py): [R] row slots; copies before the step (row pairs)
    state_slots: list[int] | None = None
    state_saves: list[int] | None = None
    state_restores: list[int] | None = None


@dataclass(slots=True)
class ModelInputs:
    """One step on the device: [:T] / [:R] views of the runner's persistent buffers."""
    input_ids: torch.Tensor              # [T] int64
    positions: torch.Tensor              # [T] int64
    attn: AttnMetadata
    logits_indices: torch.Tensor         # [N] sample rows' last tokens, then prompt positions
    num_sample: int                      # the first num_sample logits rows sample
    inputs_embeds: torch.Tensor | None = None     # [T, hidden] in place of input_ids (images)
    # the tokens grouped by LoRA slot (kernels/lora.py), handed down to every linear layer;
    # None: no token of the step uses an adapter
    lora_mapping: LoRAMapping | None = None


class _Buffer:
    """A persistent host buffer (pinned for a GPU) and its device twin; on CPU they are one."""

    def __init__(self, shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> None:
        cuda = device.type == "cuda"
        self.host = torch.zeros(shape, dtype=dtype, pin_memory=cuda)
        self.np = self.host.numpy()
        self.device = torch.zeros(shape, dtype=dtype, device=device) if cuda else self.host

    def to_device(self, n: int) -> torch.Tensor:
        """The first n rows, copied to the device without blocking."""
        if self.device is self.host:
            return self.host[:n]
        return self.device[:n].copy_(self.host[:n], non_blocking=True)


class ModelRunner:
    def __init__(self, model: torch.nn.Module, model_config: ModelConfig,
                 engine_config: EngineConfig, device: torch.device, dtype: torch.dtype,
                 profile_images: list[dict[str, Any]] | None = None,
                 extra_kv_bytes_per_block: int = 0, num_blocks: int | None = None) -> None:
        """extra_kv_bytes_per_block: what a block costs elsewhere too (a drafter's cache, sized
        with this one). num_blocks: a drafter's runner (engine/spec/drafter.py): exactly this
        many blocks, the target's, for a model built whole (unsharded) on rank 0."""
        self.model = model
        self.model_config = model_config
        self.device = device
        self.dtype = dtype
        # --kv-cache-dtype fp8 stores e4m3 (half of bf16's bytes); auto: the model dtype.
        fp8_kv = engine_config.kv_cache_dtype in ("fp8", "fp8_e4m3")
        self.kv_dtype = torch.float8_e4m3fn if fp8_kv else dtype
        self.block_size = engine_config.block_size
        self.max_model_len = engine_config.max_model_len   # resolved by the Engine
        self.max_num_seqs = engine_config.max_num_seqs
        self.max_num_batched_tokens = engine_config.max_num_batched_tokens
        self.max_blocks_per_seq = math.ceil(self.max_model_len / self.block_size)

        T, R = self.max_num_batched_tokens, self.max_num_seqs
        self._input_ids = _Buffer((T,), torch.long, device)
        self._positions = _Buffer((T,), torch.long, device)
        self._slot_mapping = _Buffer((T,), torch.long, device)
        self._logits_indices = _Buffer((T,), torch.long, device)
        self._query_start_loc = _Buffer((R + 1,), torch.int32, device)
        self._seq_lens = _Buffer((R,), torch.int32, device)
        self._block_table = _Buffer((R, self.max_blocks_per_seq), torch.int32, device)
        # Vision-language models: M-RoPE positions ([T, 3], handed over as [3, T]), the encoder
        # outputs by image hash, and the images the profile run encodes.
        self.uses_mrope = bool(getattr(model, "uses_mrope", False))
        # Gemma 3: a step's image tokens attend to each other both ways (image spans)
        self.bidirectional_images = bool(getattr(model, "bidirectional_images", False))
        self._mrope_positions = _Buffer((T, 3), torch.long, device) if self.uses_mrope else None
        self.encoder_cache = EncoderCache(max(self.max_num_batched_tokens, 16384))
        self.profile_images = profile_images or []
        # NOTE: a step that samples nothing returns without a host sync, so the next step could
        # rewrite the pinned buffers above while the GPU has yet to run this step's non-blocking
        # copies out of them (the next step would then read half-new inputs). prepare_inputs
        # records this event after its copies and waits on it before writing the buffers again.
        self._copied = torch.cuda.Event() if device.type == "cuda" else None

        self.drafter = None    # engine/spec/drafter.py: a draft model or an EAGLE-3 head (rank 0)
        self.state_caches, _ = size_state_caches(model, 0, None, dtype, device)  # hybrid models
        self.lora_manager = None
        if engine_config.lora is not None:   # before the KV sizing, which sees the LoRA slots
            from minserve.lora.manager import LoRAManager

            self.lora_manager = LoRAManager(model, model_config, engine_config.lora, device, dtype)
        if num_blocks is not None:      # a drafter's runner (whole on rank 0): the target's blocks
            self._set_kv_layout(1)
            self.num_blocks = num_blocks
            self._kv_cache(num_blocks)
        else:
            self.num_blocks = self._allocate_kv_cache(engine_config, extra_kv_bytes_per_block)

    # ---- KV cache sizing ----------------------------------------------------------------------
    def _kv_cache(self, num_blocks: int) -> None:
        # NOTE: zeros, not empty: kernels may load whole tiles past seq_len and multiply the
        # masked part by 0, which would still turn garbage NaNs into NaN outputs. On CPU the
        # zeros come from an anonymous mapping, so only the pages of blocks in use are resident.
        def zeros(shape: tuple[int, ...]) -> torch.Tensor:
            return (torch.zeros(shape, dtype=self.kv_dtype, device=self.device)
                    if self.device.type != "cpu" else lazy_zeros(shape, self.kv_dtype))

        layout = self.kv_layout
        if len(set(layout)) == 1:      # every cache alike: one tensor [L, 2, NB, BS, K, D]
            kv = zeros((len(layout), 2, num_blocks, self.block_size, *layout[0]))
            self.model.set_kv_caches([(kv[i, 0], kv[i, 1]) for i in range(len(layout))])
            return
        # Gemma 4: global layers with their own head size and kv heads; one buffer, carved up
        sizes = [2 * num_blocks * self.block_size * k * d for k, d in layout]
        flat = zeros((sum(sizes),))
        caches = [part.view(2, num_blocks, self.block_size, k, d)
                  for part, (k, d) in zip(flat.split(sizes), layout, strict=True)]
        self.model.set_kv_caches([(kv[0], kv[1]) for kv in caches])

    def free_kv_cache(self, free: bool = True) -> None:
        """Sleep mode: the cache shrinks to one block (free=False: back to num_blocks, zeros)."""
        self._kv_cache(1 if free else self.num_blocks)

    def _set_kv_layout(self, tp_size: int) -> None:
        """(this rank's kv heads, head dim) of each KV cache, in set_kv_caches' order; one per
        layer unless the model says otherwise (Gemma 4: per-layer shapes, shared caches)."""
        mc = self.model_config
        layout = getattr(self.model, "kv_cache_layout", None)
        self.kv_layout = layout() if layout is not None else [
            (parallel.num_local_kv_heads(mc.num_key_value_heads, tp_size), mc.head_dim)
        ] * mc.num_hidden_layers

    def _allocate_kv_cache(self, engine_config: EngineConfig, extra_per_block: int) -> int:
        self._set_kv_layout(parallel.tp_size())
        per_block = (2 * self.block_size * sum(k * d for k, d in self.kv_layout)
                     * self.kv_dtype.itemsize) + extra_per_block
        # More than every sequence at full length can never be used.
        max_useful = self.max_num_seqs * self.max_blocks_per_seq
        if engine_config.kv_cache_memory is not None:
            budget = int(engine_config.kv_cache_memory)
        elif self.device.type == "cuda":
            budget = self._profile_cuda_budget(engine_config.gpu_memory_utilization)
        else:
            budget = min(DEFAULT_CPU_KV_CACHE_BYTES,
                         max(MIN_CPU_KV_CACHE_BYTES, per_block * self.max_blocks_per_seq))
        self.state_caches, budget = size_state_caches(self.model, budget, engine_config,
                                                      self.dtype, self.device)
        num_blocks = parallel.min_across_ranks(min(budget // per_block, max_useful))
        if num_blocks < 1:
            raise ConfigError(
                f"no room for the KV cache: {budget / 2**20:.0f} MiB available, one block needs "
                f"{per_block / 2**20:.2f} MiB; raise --gpu-memory-utilization or --kv-cache-memory")
        self._kv_cache(num_blocks)
        return num_blocks

    def _profile_cuda_budget(self, gpu_memory_utilization: float) -> int:
        """Run a worst-case step (max_num_batched_tokens tokens, max_num_seqs sampled rows) on a
        one-block cache and give the KV cache what is left under gpu_memory_utilization."""
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(self.device)
        free, total = torch.cuda.mem_get_info(self.device)
        allocated_before = torch.cuda.memory_allocated(self.device)
        self._kv_cache(1)
        self.dummy_run(self.max_num_batched_tokens, self.max_num_seqs)
        torch.cuda.synchronize(self.device)
        activation_peak = torch.cuda.max_memory_allocated(self.device) - allocated_before
        self.profile_images = []    # the largest images' arrays are not needed again
        torch.cuda.empty_cache()
        used_before = total - free          # weights, CUDA context, other processes
        return int(total * gpu_memory_utilization - used_before - activation_peak)

    def dummy_run(self, num_tokens: int, num_reqs: int) -> None:
        """A step of num_reqs fresh prompts, each sampling, through the serving path. Every block
        table entry is block 0, so a one-block cache is enough (the K/V are garbage)."""
        num_reqs = max(1, min(num_reqs, num_tokens))
        num_tokens = min(num_tokens, num_reqs * self.max_model_len)   # no row is ever longer
        lens = [num_tokens // num_reqs] * num_reqs
        lens[-1] += num_tokens - sum(lens)
        params = SamplingParams(temperature=1.0, top_p=0.9, top_k=50, logprobs=5)
        reqs = [Request(f"profile-{i}", [0], params) for i in range(num_reqs)]
        # NOTE: the encoder's outputs stay alive through the step, as cached embeddings do.
        encoded = self.encode_images(self.profile_images) if self.profile_images else None
        self.execute(StepInputs(
            [0] * num_tokens, lens, [0] * num_reqs,
            [[0] * -(-n // self.block_size) for n in lens], list(range(num_reqs)),
            SamplingTensors.from_requests(reqs, self.model_config.vocab_size),
            mrope=[(None, 0)] * num_reqs if self.uses_mrope else None))
        del encoded

    # ---- one step -----------------------------------------------------------------------------
    @torch.inference_mode()
    def execute(self, step: StepInputs) -> SampledTokens:
        inputs = self.prepare_inputs(step)
        if step.mm_inputs:
            self.place_images(step, inputs)
        self.share_from_head(inputs, bool(step.mm_inputs))
        hidden = self.run_model(inputs)
        aux_hidden = None
        if isinstance(hidden, tuple):   # and the layers' states an EAGLE-3 head reads
            hidden, aux_hidden = hidden
        result, prompt_lps = self.sample(hidden, inputs, step)
        out = self.to_output(step, result, prompt_lps)
        if step.draft is not None:
            out.draft_token_ids = self.drafter.propose(step, inputs, hidden, aux_hidden,
                                                       out.token_ids)
        return out

    def prepare_inputs(self, step: StepInputs) -> ModelInputs:
        """Fill the host buffers and copy them to the device (no sync)."""
        counts = step.num_scheduled_tokens
        R, T = len(counts), len(step.token_ids)
        assert 0 < R <= self.max_num_seqs and T <= self.max_num_batched_tokens
        if self._copied is not None:
            self._copied.synchronize()    # the previous step's copies have read the buffers
        bs = self.block_size
        qsl = self._query_start_loc.np
        qsl[0] = 0
        np.cumsum(counts, out=qsl[1:R + 1])
        qsl_host = qsl[:R + 1].tolist()
        seq_lens_host = [c + n for c, n in zip(step.num_computed_tokens, counts, strict=True)]
        self._seq_lens.np[:R] = seq_lens_host
        self._input_ids.np[:T] = step.token_ids
        block_table = self._block_table.np
        for r, block_ids in enumerate(step.block_tables):
            block_table[r, :len(block_ids)] = block_ids

        # positions and slot_mapping, vectorised over the T tokens
        req_of_token = np.repeat(np.arange(R), counts)
        positions = np.arange(T) - np.repeat(qsl[:R] - np.array(step.num_computed_tokens), counts)
        self._positions.np[:T] = positions
        self._slot_mapping.np[:T] = (
            block_table[req_of_token, positions // bs].astype(np.int64) * bs + positions % bs)

        nd = step.num_draft_tokens
        if nd is None:
            indices = [qsl_host[r + 1] - 1 for r in step.sample_rows]
        else:   # a row with k drafts samples at its last 1 + k tokens
            indices = [i for r in step.sample_rows
                       for i in range(qsl_host[r + 1] - 1 - nd[r], qsl_host[r + 1])]
        num_sample = len(indices)
        plp = step.prompt_logprobs
        if plp is not None:
            for r, count in zip(plp.rows, plp.counts, strict=True):
                indices.extend(range(qsl_host[r], qsl_host[r] + count))
        self._logits_indices.np[:len(indices)] = indices

        attn = AttnMetadata(
            query_start_loc=self._query_start_loc.to_device(R + 1),
            seq_lens=self._seq_lens.to_device(R),
            block_table=self._block_table.to_device(R),
            slot_mapping=self._slot_mapping.to_device(T),
            max_query_len=max(counts), max_seq_len=max(seq_lens_host),
            query_start_loc_host=qsl_host, seq_lens_host=seq_lens_host)
        positions = self._positions.to_device(T)
        if self._mrope_positions is not None:
            positions = self._fill_mrope(step, positions_np=self._positions.np[:T], T=T)
        inputs = ModelInputs(self._input_ids.to_device(T), positions, attn,
                             self._logits_indices.to_device(len(indices)), num_sample)
        if self.state_caches is not None:
            self.state_caches.prepare(attn, step)
        if step.adapter_slots is not None and max(step.adapter_slots) >= 0:
            inputs.lora_mapping = lora_mapping(np.repeat(step.adapter_slots, counts), self.device)
        if self._copied is not None:
            self._copied.record()
        return inputs

    def _fill_mrope(self, step: StepInputs, positions_np: np.ndarray, T: int) -> torch.Tensor:
        """M-RoPE positions [3, T]: a prompt's own (t, row, col) positions where it has them,
        else (for text-only prompts and every output token) position + delta on all rows."""
        counts, computed = step.num_scheduled_tokens, step.num_computed_tokens
        deltas = np.repeat(np.array([d for _, d in step.mrope], dtype=np.int64), counts)
        buf = self._mrope_positions.np
        buf[:T] = (positions_np + deltas)[:, None]
        start = 0
        for (prompt_pos, _), ctx, n in zip(step.mrope, computed, counts, strict=True):
            if prompt_pos is not None and ctx < prompt_pos.shape[1]:
                m = min(ctx + n, prompt_pos.shape[1]) - ctx
                buf[start:start + m] = prompt_pos[:, ctx:ctx + m].T
            start += n
        return self._mrope_positions.to_device(T).t()

    def encode_images(self, images: list[dict[str, Any]]) -> list[torch.Tensor]:
        """The vision encoder over a batch of images' processor outputs (numpy)."""
        return self.model.encode_images([to_tensors(d, self.device, self.dtype) for d in images])

    def place_images(self, step: StepInputs, inputs: ModelInputs) -> None:
        """The step's images into its inputs: their embeddings into inputs_embeds, and (a model
        whose images attend both ways) their spans into the attention metadata."""
        inputs.inputs_embeds = self.embed_multimodal(step, inputs)
        if self.bidirectional_images:
            spans = image_span_ends(step.mm_inputs, inputs.attn.query_start_loc_host,
                                    step.num_computed_tokens, len(step.token_ids))
            inputs.attn.image_span_end = torch.from_numpy(spans).to(self.device)

    def embed_multimodal(self, step: StepInputs, inputs: ModelInputs) -> torch.Tensor:
        """inputs_embeds [T, hidden]: the token embeddings with the step's image placeholder
        rows replaced by the encoder's outputs (each distinct uncached image encoded once, all
        of them in one batch)."""
        embeds = self.encoder_cache.lookup_or_encode(
            [item for _, item in step.mm_inputs],
            lambda items: self.encode_images([item.data for item in items]))
        inputs_embeds = self.model.embed_input_ids(inputs.input_ids)
        merge_embeddings(inputs_embeds, step.mm_inputs, embeds,
                         inputs.attn.query_start_loc_host, step.num_computed_tokens)
        return inputs_embeds

    def share_from_head(self, inputs: ModelInputs, has_images: bool) -> None:
        """Tensor parallelism: what only rank 0 can build (it holds the requests' images and
        M-RoPE positions) into every rank's inputs: the merged image embeddings (the vision
        encoder runs on rank 0 alone) and the M-RoPE positions. Every rank calls it each step
        (engine/workers.py); nothing with one rank."""
        if parallel.tp_size() == 1:
            return
        if has_images:
            parallel.broadcast_activations(inputs.inputs_embeds)
            if self.bidirectional_images:
                if inputs.attn.image_span_end is None:     # a rank > 0: filled by rank 0's
                    inputs.attn.image_span_end = torch.zeros(
                        inputs.input_ids.shape[0], dtype=torch.int32, device=self.device)
                parallel.broadcast_activations(inputs.attn.image_span_end)
        if self.uses_mrope:
            inputs.positions = inputs.positions.contiguous()
            parallel.broadcast_activations(inputs.positions)

    def run_model(self, inputs: ModelInputs) -> torch.Tensor:
        """The forward pass alone, -> hidden [T, hidden]: the one call a CUDA graph will wrap."""
        return self.model(inputs.input_ids, inputs.positions, inputs.attn, inputs.inputs_embeds,
                          inputs.lora_mapping)

    def sample(self, hidden: torch.Tensor, inputs: ModelInputs, step: StepInputs
               ) -> tuple[SamplerResult | None, LogprobsTensors | None]:
        """Logits of the rows that need them -> sampled tokens and prompt logprobs (on device)."""
        if inputs.logits_indices.numel() == 0:
            return None, None
        logits = self.model.compute_logits(hidden[inputs.logits_indices])   # [N, V] float32
        if logits is None:      # a tensor-parallel worker: rank 0 samples
            return None, None
        n = inputs.num_sample
        result = sample(logits[:n], step.sampling.to(self.device)) if n else None
        plp = step.prompt_logprobs
        if plp is None or not plp.target_ids:
            return result, None
        targets = torch.tensor(plp.target_ids, dtype=torch.long).to(self.device,
                                                                    non_blocking=True)
        return result, compute_logprobs(logits[n:], targets, max(plp.num_logprobs))

    def to_output(self, step: StepInputs, result: SamplerResult | None,
                  prompt_lps: LogprobsTensors | None) -> SampledTokens:
        """Copy the results to the host (the step's one sync) and spread them over the rows."""
        if result is not None:
            result = SamplerResult(_to_host(result.token_ids),
                                   result.logprobs and result.logprobs.map(_to_host))
        prompt_lps = prompt_lps and prompt_lps.map(_to_host)
        if self.device.type == "cuda" and (result is not None or prompt_lps is not None):
            torch.cuda.current_stream().synchronize()
        R = len(step.num_scheduled_tokens)
        out = SampledTokens([[] for _ in range(R)])
        if result is not None:
            toks = result.token_ids.tolist()
            st = step.sampling
            lps = (result.logprobs.to_list([toks[i] for i in st.logprob_rows], st.num_logprobs,
                                           st.num_logprob_token_ids)
                   if st.logprob_rows else None)
            self._spread(step, toks, dict(zip(st.logprob_rows, lps or (), strict=True)), out)
        plp = step.prompt_logprobs
        if plp is not None:
            out.prompt_logprobs = [None] * R
            ks = [k for k, c in zip(plp.num_logprobs, plp.counts, strict=True) for _ in range(c)]
            lps = prompt_lps.to_list(plp.target_ids, ks) if prompt_lps is not None else []
            pos = 0
            for r, count in zip(plp.rows, plp.counts, strict=True):
                out.prompt_logprobs[r] = lps[pos:pos + count]
                pos += count
        return out

    @staticmethod
    def _spread(step: StepInputs, toks: list[int], lps: dict[int, Any],
                out: SampledTokens) -> None:
        """Sampled positions -> each sampling row's emitted tokens (and their logprobs): its one
        token, or with drafts the accepted ones and the target's token after them."""
        if lps:
            out.logprobs = [[] for _ in out.token_ids]
        nd = step.num_draft_tokens
        ends = list(itertools.accumulate(step.num_scheduled_tokens)) if nd is not None else []
        pos = 0
        for r in step.sample_rows:
            k = nd[r] if nd is not None else 0
            sampled = toks[pos:pos + 1 + k]
            out.token_ids[r] = emitted = (
                accept_drafts(sampled, step.token_ids[ends[r] - k:ends[r]]) if k else sampled)
            if lps:
                out.logprobs[r] = [lps[i] for i in range(pos, pos + len(emitted)) if i in lps]
            pos += 1 + k


def kv_block_bytes(mc: ModelConfig, block_size: int, num_kv_heads: int,
                   kv_dtype: torch.dtype) -> int:
    """One block's K and V over every layer."""
    return 2 * mc.num_hidden_layers * block_size * num_kv_heads * mc.head_dim * kv_dtype.itemsize


def _to_host(t: torch.Tensor) -> torch.Tensor:
    """Start a non-blocking copy into pinned memory (the caller syncs once for all of them)."""
    if t.device.type == "cpu":
        return t
    return torch.empty(t.shape, dtype=t.dtype, pin_memory=True).copy_(t, non_blocking=True)

