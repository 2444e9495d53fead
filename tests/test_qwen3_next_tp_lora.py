"""LoRA on a hybrid model under tensor parallelism (gloo, two processes, started once): an adapter
on the gated attention (q_proj's query and gate rows split by head pairs) and the dense MLPs
gives one process's greedy tokens and logprobs, the adapter mixed with the base in one batch."""
from __future__ import annotations

import pytest

from minserve.llm import LLM, LoRARequest
from tests.lora_adapters import make_adapter
from tests.test_qwen3_next import VARIANTS, prompt
from tests.test_qwen3_next_lora import TARGETS
from tests.test_tp_lora import SP, _same
from tests.tiny import make_tiny_model

pytest.importorskip("peft")
ARGS = dict(enable_lora=True, max_loras=1, max_lora_rank=8, kv_cache_memory=1 << 20,
            max_num_batched_tokens=32, max_model_len=128)


def test_adapter_mixed_with_the_base_equals_one_process(tmp_path):
    arch, overrides = VARIANTS["qwen3.5-dense"]
    folder = make_tiny_model(str(tmp_path / "q35"), arch, **overrides)
    path = make_adapter(folder, str(tmp_path / "ad"), r=8, targets=TARGETS["qwen3.5-dense"],
                        seed=3, scale=0.2)
    prompts = [prompt(n, n) for n in (37, 9, 20)]
    per_prompt = [LoRARequest("ad", 1, path), None, LoRARequest("ad", 1, path)]
    one = LLM(folder, **ARGS)
    got_one = one.generate(prompts, SP, lora_request=per_prompt, use_tqdm=False)
    assert got_one[0].outputs[0].token_ids != one.generate(
        prompts[:1], SP, use_tqdm=False)[0].outputs[0].token_ids        # the adapter acts
    two = LLM(folder, tensor_parallel_size=2, **ARGS)
    try:
        _same(got_one, two.generate(prompts, SP, lora_request=per_prompt, use_tqdm=False))
    finally:
        two.engine.shutdown()
