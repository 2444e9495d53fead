"""ModelRunner: sizes and owns the KV cache tensors, turns a StepPlan into one flat batch, runs the
model and the sampler, and copies the results to the host in the step's one sync. It decides
nothing: which tokens run is the scheduler's call.

The flat batch, for a step with a decode (r0), a prefill chunk mid-prompt (r1) and a new prompt
(r2); T = total scheduled tokens, R = 3:

    request:          r0 |      r1       |    r2
    input_ids[T]:     t  | t  t  t  t  t | t  t  t
    positions[T]:     41 | 16 17 18 19 20| 0  1  2        (context_len + i)
    query_start_loc:  0    1               6        9     [R+1]
    seq_lens[R]:      42   21              3              context_len + query_len
    slot_mapping[T]:  block_table[r, pos // BS] * BS + pos % BS
    logits_indices:   0    (r1 only if the chunk ends its prompt)  8
"""
from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import torch

from minserve.config import ConfigError, EngineConfig, ModelConfig
from minserve.engine.request import Logprob, Request
from minserve.engine.sampler import (
    LogprobsTensors,
    SamplingTensors,
    compute_logprobs,
    sample,
)
from minserve.engine.scheduler import SampledTokens, StepPlan, is_sampling_row
from minserve.kernels import AttnMetadata
from minserve.sampling_params import SamplingParams

DEFAULT_CPU_KV_CACHE_BYTES = 2 << 30


def _token_slice(request: Request, start: int, end: int) -> list[int]:
    """request.all_token_ids[start:end] without concatenating the lists (decodes are hot)."""
    num_prompt = request.num_prompt_tokens
    if start >= num_prompt:
        return request.output_token_ids[start - num_prompt:end - num_prompt]
    if end <= num_prompt:
        return request.prompt_token_ids[start:end]
    return request.prompt_token_ids[start:] + request.output_token_ids[:end - num_prompt]


class ModelRunner:
    def __init__(self, model: torch.nn.Module, model_config: ModelConfig,
                 engine_config: EngineConfig, device: torch.device, dtype: torch.dtype) -> None:
        self.model = model
        self.model_config = model_config
        self.device = device
        self.dtype = dtype
        self.engine_config = engine_config
        self.block_size = engine_config.block_size
        self.max_model_len = int(engine_config.max_model_len
                                 or model_config.max_position_embeddings)
        self.max_num_seqs = engine_config.max_num_seqs
        self.max_num_batched_tokens = int(engine_config.max_num_batched_tokens
                                          or max(8192, self.max_model_len))
        self.max_blocks_per_seq = math.ceil(self.max_model_len / self.block_size)
        self.vocab_size = model_config.vocab_size

        # Persistent host staging buffers (pinned on CUDA so copies are asynchronous).
        T, R = self.max_num_batched_tokens, self.max_num_seqs
        pin = device.type == "cuda"
        self._input_ids = torch.zeros(T, dtype=torch.long, pin_memory=pin)
        self._positions = torch.zeros(T, dtype=torch.long, pin_memory=pin)
        self._slot_mapping = torch.zeros(T, dtype=torch.long, pin_memory=pin)
        self._query_start_loc = torch.zeros(R + 1, dtype=torch.int32, pin_memory=pin)
        self._seq_lens = torch.zeros(R, dtype=torch.int32, pin_memory=pin)
        self._block_table = torch.zeros(R, self.max_blocks_per_seq, dtype=torch.int32,
                                        pin_memory=pin)

        self.kv_caches: list[tuple[torch.Tensor, torch.Tensor]] = []
        self.num_blocks = self._allocate_kv_cache(engine_config)

    # ---- KV cache sizing ----------------------------------------------------------------------
    @property
    def kv_dtype(self) -> torch.dtype:
        """--kv-cache-dtype fp8 stores e4m3 (half of bf16's bytes); auto: the model dtype."""
        if self.engine_config.kv_cache_dtype in ("fp8", "fp8_e4m3"):
            return torch.float8_e4m3fn
        return self.dtype

    @property
    def kv_bytes_per_block(self) -> int:
        mc = self.model_config
        elem = torch.empty(0, dtype=self.kv_dtype).element_size()
        return 2 * mc.num_hidden_layers * self.block_size * mc.num_key_value_heads * mc.head_dim \
            * elem

    def _allocate_kv_cache(self, engine_config: EngineConfig) -> int:
        per_block = self.kv_bytes_per_block
        # More than every sequence at full length can never be used.
        max_useful = self.max_num_seqs * self.max_blocks_per_seq
        if engine_config.kv_cache_memory is not None:
            budget = int(engine_config.kv_cache_memory)
        elif self.device.type == "cuda":
            budget = self._profile_cuda_budget(engine_config.gpu_memory_utilization)
        else:
            budget = DEFAULT_CPU_KV_CACHE_BYTES
        num_blocks = min(budget // per_block, max_useful)
        if num_blocks < 1:
            raise ConfigError(
                f"no room for the KV cache: {budget / 2**20:.0f} MiB available, one block needs "
                f"{per_block / 2**20:.2f} MiB; raise --gpu-memory-utilization or --kv-cache-memory")
        mc = self.model_config
        shape = (mc.num_hidden_layers, 2, num_blocks, self.block_size,
                 mc.num_key_value_heads, mc.head_dim)
        # NOTE: zeros, not empty: kernels may load whole tiles past seq_len and multiply the
        # masked part by 0, which would still turn garbage NaNs into NaN outputs.
        kv = torch.zeros(shape, dtype=self.kv_dtype, device=self.device)  # [L, 2, NB, BS, K, D]
        self.kv_caches = [(kv[i, 0], kv[i, 1]) for i in range(mc.num_hidden_layers)]
        self.model.set_kv_caches(self.kv_caches)
        return num_blocks

    def _profile_cuda_budget(self, gpu_memory_utilization: float) -> int:
        """Run a worst-case step (max_num_batched_tokens tokens, max_num_seqs sampled rows) with
        empty caches and give the KV cache what is left under gpu_memory_utilization."""
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(self.device)
        free, total = torch.cuda.mem_get_info(self.device)
        allocated_before = torch.cuda.memory_allocated(self.device)
        empty = torch.empty(0, dtype=self.dtype, device=self.device)
        self.model.set_kv_caches([(empty, empty)] * self.model_config.num_hidden_layers)
        self._dummy_run(self.max_num_batched_tokens, self.max_num_seqs)
        torch.cuda.synchronize(self.device)
        activation_peak = torch.cuda.max_memory_allocated(self.device) - allocated_before
        torch.cuda.empty_cache()
        used_before = total - free          # weights, CUDA context, other processes
        return int(total * gpu_memory_utilization - used_before - activation_peak)

    @torch.inference_mode()
    def _dummy_run(self, num_tokens: int, num_reqs: int) -> None:
        num_reqs = max(1, min(num_reqs, num_tokens))
        lens = [num_tokens // num_reqs] * num_reqs
        lens[-1] += num_tokens - sum(lens)
        qsl = [0]
        for n in lens:
            qsl.append(qsl[-1] + n)
        dev = self.device
        attn = AttnMetadata(
            query_start_loc=torch.tensor(qsl, dtype=torch.int32, device=dev),
            seq_lens=torch.tensor(lens, dtype=torch.int32, device=dev),
            block_table=torch.zeros(num_reqs, 1, dtype=torch.int32, device=dev),
            slot_mapping=torch.full((num_tokens,), -1, dtype=torch.long, device=dev),
            max_query_len=max(lens), max_seq_len=max(lens),
            query_start_loc_host=qsl, seq_lens_host=lens)
        positions = torch.cat([torch.arange(n, device=dev) for n in lens])
        input_ids = torch.zeros(num_tokens, dtype=torch.long, device=dev)
        hidden = self.model(input_ids, positions, attn)
        logits = self.model.compute_logits(hidden[torch.tensor(qsl[1:], device=dev) - 1])
        params = SamplingParams(temperature=1.0, top_p=0.9, top_k=50, logprobs=5)
        reqs = [Request(f"profile-{i}", [0], params) for i in range(num_reqs)]
        sample(logits, SamplingTensors.from_requests(reqs, logits.shape[1], dev))

    # ---- one step -----------------------------------------------------------------------------
    @torch.inference_mode()
    def execute(self, plan: StepPlan) -> SampledTokens:
        R, T = len(plan.requests), plan.total_num_scheduled_tokens
        assert 0 < R <= self.max_num_seqs and T <= self.max_num_batched_tokens
        bs = self.block_size
        input_ids = self._input_ids.numpy()
        qsl = self._query_start_loc.numpy()
        seq_lens = self._seq_lens.numpy()
        block_table = self._block_table.numpy()

        qsl[0] = 0
        qsl_host, seq_lens_host, context_lens = [0], [], []
        sample_rows, logits_indices = [], []
        plp_rows, plp_indices, plp_targets, plp_counts = [], [], [], []
        max_num_blocks = 1
        for r, (req, n) in enumerate(zip(plan.requests, plan.num_scheduled_tokens, strict=True)):
            start, ctx = qsl_host[-1], req.num_computed_tokens
            input_ids[start:start + n] = _token_slice(req, ctx, ctx + n)
            qsl_host.append(start + n)
            seq_lens_host.append(ctx + n)
            context_lens.append(ctx)
            num_blocks = len(req.block_ids)
            block_table[r, :num_blocks] = req.block_ids
            max_num_blocks = max(max_num_blocks, num_blocks)
            if is_sampling_row(req, n):
                sample_rows.append(r)
                logits_indices.append(start + n - 1)
            if req.sampling.prompt_logprobs is not None and not req.prompt_logprobs_done:
                # Position p predicts prompt token p + 1; the last prompt position predicts the
                # first output token, which is the sampled row's business.
                end = min(ctx + n, req.num_prompt_tokens - 1)
                plp_rows.append(r)
                plp_counts.append(max(end - ctx, 0))
                plp_indices.extend(range(start, start + max(end - ctx, 0)))
                plp_targets.extend(req.prompt_token_ids[ctx + 1:end + 1])
        qsl[:R + 1] = qsl_host
        seq_lens[:R] = seq_lens_host

        # positions and slot_mapping, vectorised over the T tokens
        req_of_token = np.repeat(np.arange(R), plan.num_scheduled_tokens)
        positions = np.arange(T) - np.repeat(np.array(qsl_host[:-1]) - np.array(context_lens),
                                             plan.num_scheduled_tokens)
        self._positions.numpy()[:T] = positions
        self._slot_mapping.numpy()[:T] = (
            block_table[req_of_token, positions // bs].astype(np.int64) * bs + positions % bs)

        dev = self.device
        nb = self.device.type == "cuda"
        attn = AttnMetadata(
            query_start_loc=self._query_start_loc[:R + 1].to(dev, non_blocking=nb),
            seq_lens=self._seq_lens[:R].to(dev, non_blocking=nb),
            block_table=self._block_table[:R, :max_num_blocks].to(dev, non_blocking=nb),
            slot_mapping=self._slot_mapping[:T].to(dev, non_blocking=nb),
            max_query_len=max(plan.num_scheduled_tokens), max_seq_len=max(seq_lens_host),
            query_start_loc_host=qsl_host, seq_lens_host=seq_lens_host)
        hidden = self.model(self._input_ids[:T].to(dev, non_blocking=nb),
                            self._positions[:T].to(dev, non_blocking=nb), attn)   # [T, hidden]

        num_sample = len(logits_indices)
        all_indices = logits_indices + plp_indices
        logits = None
        if all_indices:
            idx = torch.tensor(all_indices, dtype=torch.long).to(dev, non_blocking=nb)
            logits = self.model.compute_logits(hidden[idx]).float()      # [N, V]
        sample_reqs = [plan.requests[r] for r in sample_rows]
        result = None
        if num_sample:
            st = SamplingTensors.from_requests(sample_reqs, logits.shape[1], dev)
            result = sample(logits[:num_sample], st)
        plp = None
        if plp_indices:
            k = max(plan.requests[r].sampling.prompt_logprobs for r in plp_rows)
            targets = torch.tensor(plp_targets, dtype=torch.long).to(dev, non_blocking=nb)
            plp = compute_logprobs(logits[num_sample:], targets, k)

        # ---- the one host sync of the step ----
        host = _to_host([
            None if result is None else result.token_ids,
            *(_lp_fields(result.logprobs) if result is not None else _lp_fields(None)),
            *_lp_fields(plp),
        ])
        out = SampledTokens([-1] * R)
        if result is not None:
            toks = host[0].tolist()
            for r, tok in zip(sample_rows, toks, strict=True):
                out.token_ids[r] = tok
            if st.logprob_rows:
                out.logprobs = [None] * R
                rows = [sample_rows[i] for i in st.logprob_rows]
                lps = _to_logprobs(host[1:5], [toks[i] for i in st.logprob_rows],
                                   [plan.requests[r].sampling.logprobs for r in rows])
                for r, lp in zip(rows, lps, strict=True):
                    out.logprobs[r] = lp
        if plp_rows:
            out.prompt_logprobs = [None] * R
            ks = [plan.requests[r].sampling.prompt_logprobs
                  for r, c in zip(plp_rows, plp_counts, strict=True) for _ in range(c)]
            lps = _to_logprobs(host[5:9], plp_targets, ks) if plp_indices else []
            pos = 0
            for r, count in zip(plp_rows, plp_counts, strict=True):
                out.prompt_logprobs[r] = lps[pos:pos + count]
                pos += count
        return out


def _lp_fields(lp: LogprobsTensors | None) -> list[torch.Tensor | None]:
    if lp is None:
        return [None] * 4
    return [lp.token_logprobs, lp.ranks, lp.top_logprobs, lp.top_ids]


def _to_host(tensors: Sequence[torch.Tensor | None]) -> list[torch.Tensor | None]:
    """Copy device tensors to the host with one synchronization for all of them."""
    out = []
    cuda = False
    for t in tensors:
        if t is None or t.device.type == "cpu":
            out.append(t)
            continue
        cuda = True
        buf = torch.empty(t.shape, dtype=t.dtype, pin_memory=True)
        buf.copy_(t, non_blocking=True)
        out.append(buf)
    if cuda:
        torch.cuda.current_stream().synchronize()
    return out


def _to_logprobs(fields: list[torch.Tensor | None], tokens: list[int],
                 ks: list[int]) -> list[Logprob]:
    """Host tensors -> one Logprob per row, its top list trimmed to the k the request asked."""
    token_lp, ranks, top_lp, top_ids = (f.tolist() for f in fields)
    return [Logprob(tokens[i], token_lp[i], ranks[i],
                    list(zip(top_ids[i][:k], top_lp[i][:k], strict=True)))
            for i, k in enumerate(ks)]
