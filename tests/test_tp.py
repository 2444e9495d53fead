"""Tensor parallelism on CPU (gloo, two processes on loopback): sharded logits equal one
process's for every architecture; LLM(tensor_parallel_size=2) gives one process's tokens through
chunked prefill, prefix hits, preemption, seeded sampling, structured output and prompt
logprobs; a hung worker fails the requests in flight and /health says 503, leaving no process.
Each process group starts once per module."""
from __future__ import annotations

import asyncio
import os
import signal

import pytest

from minserve import LLM
from minserve.config import ConfigError, EngineConfig, ModelConfig
from minserve.engine.runner import PromptLogprobInputs, StepInputs
from minserve.engine.workers import decode_step, encode_step
from minserve.models import parallel
from minserve.sampling_params import SamplingParams
from minserve.server import ServerConfig, create_app
from tests.asgi import call, lifespan
from tests.paged_runner import load_ours
from tests.serving import children, wait_until
from tests.tiny import make_tiny_model
from tests.tp_ranks import assert_steps_match, run_steps, spawn_ranks

# (arch, overrides): GQA split and replicated (K=1 < 2 ranks), qkv bias + tied embeddings,
# q/k norm, a sliding window, a vocab that does not divide by 2 (the last shard is padded)
ARCHS = {
    "llama-gqa": ("LlamaForCausalLM", {"vocab_size": 509}),
    "mistral": ("MistralForCausalLM", {}),
    "qwen2-bias-tied": ("Qwen2ForCausalLM", {}),
    "qwen3-qknorm-kv1": ("Qwen3ForCausalLM", {"num_key_value_heads": 1}),
    "llama-tied-kv1": ("LlamaForCausalLM", {"tie_word_embeddings": True,
                                            "num_key_value_heads": 1}),
    # issue 31: NoPE layers; fused qkv/gate_up checkpoint tensors split per rank (LongRoPE,
    # partial rotary); Gemma 3 with one kv head (as the 1B); Gemma 4's global layers (one kv
    # head, v = k), shared KV caches and replicated per-layer inputs
    "smollm3": ("SmolLM3ForCausalLM", {}),
    "phi3-fused": ("Phi3ForCausalLM", {"partial_rotary_factor": 0.5, "rope_scaling": {
        "rope_type": "longrope", "short_factor": [1.0, 1.2, 1.4, 1.6],
        "long_factor": [1.0, 2.0, 3.0, 4.0]}, "original_max_position_embeddings": 16}),
    "gemma3-kv1": ("Gemma3ForCausalLM", {"num_key_value_heads": 1}),
    "gemma4": ("Gemma4ForCausalLM", {}),
    # attention-logit softcapping on the sharded heads
    "gemma2-softcap": ("Gemma2ForCausalLM", {}),
}


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("tp")
    return {name: make_tiny_model(str(root / name), arch, **over)
            for name, (arch, over) in ARCHS.items()}


@pytest.fixture(scope="module")
def sharded_logits(folders, tmp_path_factory):
    """Both ranks run every model in one process group (started once)."""
    names = list(folders)
    logits = spawn_ranks([folders[n] for n in names], tmp_path_factory.mktemp("tp-out"))
    return dict(zip(names, logits, strict=True))


@pytest.mark.parametrize("name", list(ARCHS))
def test_sharded_logits_match_one_process(name, folders, sharded_logits):
    # prefill chunks, chunk + decode, decodes
    assert_steps_match(run_steps(load_ours(folders[name])), sharded_logits[name])


def test_step_plan_round_trips_as_plain_tensors():
    step = StepInputs([5, 6, 7, 8], [1, 3], [9, 0], [[4, 2], [7]], [0, 1], None,
                      PromptLogprobInputs([1], [2], [7, 8], [3]))
    header, payload = encode_step(step)
    got = decode_step(header.tolist(), payload)
    assert (got.token_ids, got.num_scheduled_tokens, got.num_computed_tokens, got.block_tables,
            got.sample_rows) == ([5, 6, 7, 8], [1, 3], [9, 0], [[4, 2], [7]], [0, 1])
    assert (got.prompt_logprobs.rows, got.prompt_logprobs.counts) == ([1], [2])
    assert decode_step(*(lambda h, p: (h.tolist(), p))(*encode_step(
        StepInputs([1], [1], [0], [[0]], [], None)))).prompt_logprobs is None
    lora = StepInputs([5, 6], [1, 1], [3, 4], [[1], [2]], [0, 1], None, adapter_slots=[1, -1],
                      lora_loads=[[1, "sql", "/adapters/sql"], [0, "poet", ""]])
    got = decode_step(*(lambda h, p: (h.tolist(), p))(*encode_step(lora)))
    assert (got.adapter_slots, got.lora_loads) == ([1, -1], [[1, "sql", "/adapters/sql"],
                                                             [0, "poet", ""]])
    assert (got.token_ids, got.block_tables) == ([5, 6], [[1], [2]])


def test_indivisible_models_are_a_startup_error_with_the_numbers():
    mc = ModelConfig("LlamaForCausalLM", 512, 64, 128, 2, num_attention_heads=6,
                     num_key_value_heads=2, head_dim=16)
    with pytest.raises(ConfigError, match=r"num_attention_heads \(6\).*4"):
        parallel.check_divisible(mc, 4)
    mc.num_attention_heads, mc.num_key_value_heads = 8, 3
    with pytest.raises(ConfigError, match=r"num_key_value_heads \(3\).*2"):
        parallel.check_divisible(mc, 2)
    mc.num_key_value_heads, mc.intermediate_size = 2, 100
    with pytest.raises(ConfigError, match=r"intermediate_size \(100\).*8"):
        parallel.check_divisible(mc, 8)
    for bad in ({"distributed_executor_backend": "ray"}, {"tensor_parallel_size": 3, "nnodes": 2},
                {"nnodes": 2, "node_rank": 2, "tensor_parallel_size": 2}):
        with pytest.raises(ConfigError):
            EngineConfig(**bad)


# ---- the engine: LLM(tensor_parallel_size=2) against one process -----------------------------
# 8 KiB per block (2 layers x K=1 x D=32 x 16 slots x fp32 x k|v) on both: 12 blocks preempt
ENGINE_ARGS = dict(kv_cache_memory=12 * 8192, max_num_batched_tokens=16, max_model_len=256,
                   max_num_seqs=6)


@pytest.fixture(scope="module")
def llms(folders):
    os.environ["MINSERVE_STEP_TIMEOUT"] = "15"   # the hung-worker test below waits this long
    try:
        one = LLM(folders["qwen3-qknorm-kv1"], **ENGINE_ARGS)
        two = LLM(folders["qwen3-qknorm-kv1"], tensor_parallel_size=2, **ENGINE_ARGS)
    finally:
        del os.environ["MINSERVE_STEP_TIMEOUT"]
    yield one, two
    two.engine.shutdown()


def _same(a, b, logprobs: bool = False):
    for x, y in zip(a, b, strict=True):
        for u, v in zip(x.outputs, y.outputs, strict=True):
            assert u.token_ids == v.token_ids
            if logprobs:
                for p, q in zip(u.logprobs, v.logprobs, strict=True):
                    assert [t for t, _ in p.top] == [t for t, _ in q.top]
                    assert p.logprob == pytest.approx(q.logprob, abs=1e-4)


def test_greedy_through_chunks_preemption_and_prefix_hits(llms):
    one, two = llms
    prompts = [[(7 * i + j) % 300 + 3 for j in range(20 + 3 * i)] for i in range(6)]
    prompts.append(prompts[0][:18] + [5, 6])      # shares a full block with prompt 0
    sp = SamplingParams(temperature=0, max_tokens=24, ignore_eos=True, logprobs=3)
    _same(one.generate(prompts, sp), two.generate(prompts, sp), logprobs=True)
    for llm in llms:
        stats = llm.engine.stats()
        assert stats["num_preemptions"] > 0 and stats["prefix_cache_hits"] > 0
    assert two.engine.info.num_kv_blocks == one.engine.info.num_kv_blocks == 12


def test_seeded_sampling_structured_output_and_prompt_logprobs(llms):
    one, two = llms
    prompts = [[3, 4, 5, 6, 7], [40, 41]]
    for sp in (SamplingParams(temperature=1.0, top_p=0.9, seed=7, max_tokens=12, n=2),
               SamplingParams(temperature=0.8, max_tokens=8,
                              structured={"choice": ["Paris", "London", "Rome"]}),
               SamplingParams(temperature=0, max_tokens=3, prompt_logprobs=2)):
        a, b = one.generate(prompts, sp), two.generate(prompts, sp)
        _same(a, b)
        if sp.prompt_logprobs:
            for x, y in zip(a, b, strict=True):
                for p, q in zip(x.prompt_logprobs[1:], y.prompt_logprobs[1:], strict=True):
                    assert p.logprob == pytest.approx(q.logprob, abs=1e-4)


def test_hung_worker_fails_in_flight_requests_and_health_is_503(llms, folders):
    """The last test of the module: it takes the tp=2 engine down."""
    two = llms[1].engine
    worker = two.workers._procs[0]
    app = create_app(EngineConfig(model=folders["qwen3-qknorm-kv1"]),
                     ServerConfig(served_model_names=["tiny"]), engine_factory=lambda _: two)

    async def scenario(app):
        body = {"model": "tiny", "prompt": "hello", "max_tokens": 230, "ignore_eos": True,
                "stream": True}
        task = asyncio.ensure_future(call(app, "POST", "/v1/completions", body))
        await wait_until(lambda: app.chat.stats.get("num_running", 0) > 0, 60, "a running step")
        os.kill(worker.pid, signal.SIGSTOP)        # hangs: the step times out on the head
        res = await asyncio.wait_for(task, 120)
        health = await call(app, "GET", "/health")
        return res, health

    async def main():
        async with lifespan(app):
            return await scenario(app)

    res, health = asyncio.run(main())
    assert res.status == 200 and "error" in res.events()[-2]   # then [DONE]
    assert health.status == 503
    assert worker.exitcode is not None and worker.pid not in children(os.getpid())
