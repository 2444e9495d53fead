"""Multi-LoRA under tensor parallelism on CPU (gloo, two processes on loopback): with two
adapters and the base model mixed in one batch, LLM(tensor_parallel_size=2) gives one process's
greedy tokens and logprobs, query heads split and the KV heads replicated (K=1 < 2 ranks); the
other rank loads what rank 0 puts in each slot, runtime unload + load of other weights included.
The process group starts once per module (the one-process LLM first: a process in a group
stays in it).

The tp=2 engine also drafts with a draft model (the target's own folder, no adapter), which runs
whole on rank 0 while both ranks verify: its tokens must still be the one process's without
speculation, the adapters applying to the target only (issue 33: an adapter's row rejects the
base model's drafts where they differ)."""
from __future__ import annotations

import pytest

from minserve.llm import LLM, LoRARequest
from minserve.sampling_params import SamplingParams
from tests.lora_adapters import make_adapter
from tests.tiny import make_tiny_model

pytest.importorskip("peft")

ARGS = dict(enable_lora=True, max_loras=2, max_lora_rank=16, kv_cache_memory=1 << 20,
            max_num_batched_tokens=32, max_model_len=256)
SP = SamplingParams(temperature=0, max_tokens=10, ignore_eos=True, logprobs=3)
PROMPTS = [[(7 * i + j) % 300 + 3 for j in range(18 + 5 * i)] for i in range(5)]


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("tp-lora")
    folder = make_tiny_model(str(root / "kv1"), "LlamaForCausalLM", num_key_value_heads=1)
    adapters = {name: make_adapter(folder, str(root / name), r=r, seed=s, scale=0.3)
                for name, r, s in (("a", 8, 1), ("b", 16, 2), ("c", 4, 3))}
    one = LLM(folder, **ARGS)
    two = LLM(folder, tensor_parallel_size=2, **ARGS, speculative_config={
        "model": folder, "num_speculative_tokens": 3, "min_acceptance_rate": 0,
        "disable_by_batch_size": 64})
    yield adapters, one, two
    two.engine.shutdown()


def _same(a, b):
    for x, y in zip(a, b, strict=True):
        for u, v in zip(x.outputs, y.outputs, strict=True):
            assert u.token_ids == v.token_ids
            for p, q in zip(u.logprobs, v.logprobs, strict=True):
                assert [t for t, _ in p.top] == [t for t, _ in q.top]
                assert p.logprob == pytest.approx(q.logprob, abs=1e-4)


def test_two_adapters_mixed_with_the_base_equal_one_process(setup):
    adapters, one, two = setup
    a, b = (LoRARequest(n, i + 1, adapters[n]) for i, n in enumerate("ab"))
    per_prompt = [a, None, b, a, b]
    got_one = one.generate(PROMPTS, SP, lora_request=per_prompt)
    _same(got_one, two.generate(PROMPTS, SP, lora_request=per_prompt))
    base = one.generate(PROMPTS, SP)
    assert got_one[0].outputs[0].token_ids != base[0].outputs[0].token_ids   # a has an effect
    assert got_one[2].outputs[0].token_ids != base[2].outputs[0].token_ids
    stats = two.engine.stats()   # rank 0 drafted; adapter rows rejected some base drafts
    assert stats["spec_num_draft_tokens"] > stats["spec_num_accepted_tokens"] > 0


def test_runtime_unload_and_load_reach_every_rank(setup):
    """Other weights under the name "a" (c's): both ranks serve the new ones."""
    adapters, one, two = setup
    for llm in (one, two):
        llm.engine.remove_lora("a")
        llm.engine.add_lora("a", adapters["c"])
    new_a, b = LoRARequest("a", 1), LoRARequest("b", 2)
    per_prompt = [new_a, b, new_a, None, b]
    got_one = one.generate(PROMPTS, SP, lora_request=per_prompt)
    _same(got_one, two.generate(PROMPTS, SP, lora_request=per_prompt))
    c = one.generate(PROMPTS[:1], SP, lora_request=LoRARequest("c", 3, adapters["c"]))
    assert got_one[0].outputs[0].token_ids == c[0].outputs[0].token_ids
