"""Quantized serving end to end on tiny models: the engine with an fp8 KV cache, and (below)
models whose weights are quantized into each checkpoint format, whose logits must equal the same
model run on the producer-dequantized weights."""
from __future__ import annotations

import pytest
import torch

from minserve import LLM, SamplingParams

PROMPTS = [[5, 17, 33, 200, 9, 41, 77, 12, 300, 8, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12],
           [100, 3, 4]]


def test_fp8_kv_cache_holds_more_blocks_and_stays_close(tiny_model_dir):
    params = SamplingParams(temperature=0, max_tokens=4, prompt_logprobs=1)
    runs = {}
    for kv in ("auto", "fp8"):
        llm = LLM(tiny_model_dir, kv_cache_dtype=kv, kv_cache_memory=1 << 22)
        runs[kv] = (llm.engine.num_kv_blocks, llm.engine.runner.kv_caches[0][0].dtype,
                    llm.generate(PROMPTS, params, use_tqdm=False))
    (blocks, dtype, ref), (blocks8, dtype8, outs) = runs["auto"], runs["fp8"]
    assert (dtype, dtype8) == (torch.float32, torch.float8_e4m3fn)
    assert blocks8 == 4 * blocks                     # one byte per element instead of four
    for a, b in zip(ref, outs, strict=True):
        diffs = [abs(x.logprob - y.logprob)
                 for x, y in zip(a.prompt_logprobs[1:], b.prompt_logprobs[1:], strict=True)]
        assert max(diffs) < 0.3, diffs               # e4m3 keeps ~3 mantissa bits per K/V
        assert a.outputs[0].token_ids[0] == b.outputs[0].token_ids[0]


def test_kv_cache_dtype_refuses_unknown():
    from minserve.config import ConfigError, EngineConfig

    with pytest.raises(ConfigError, match="--kv-cache-dtype 'int8' is not supported"):
        EngineConfig(kv_cache_dtype="int8")
