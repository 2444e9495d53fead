"""Mixture-of-experts models under tensor parallelism on CPU (gloo, two processes): each expert's
intermediate dim split across the ranks (-tp 2), or whole experts per rank
(--enable-expert-parallel), dense and GPTQ int4 experts, give one process's logits and the
engine's greedy tokens; experts that do not divide are a start-up error naming the fix. Each
process group starts once."""
from __future__ import annotations

import pytest
from minserve.kernels import fused_moe as fm

from minserve import LLM, SamplingParams
from minserve.config import ConfigError, ModelConfig
from minserve.models import parallel
from minserve.models.moe import FusedMoE
from tests.paged_runner import load_ours
from tests.tiny import make_tiny_model
from tests.tp_ranks import assert_steps_match, run_steps, spawn_ranks

MODELS = {
    "qwen3moe": ("Qwen3MoeForCausalLM", {"num_experts": 8, "num_experts_per_tok": 2,
                                         "moe_intermediate_size": 32, "norm_topk_prob": True,
                                         "mlp_only_layers": [0]}),
    "qwen2moe": ("Qwen2MoeForCausalLM", {"num_experts": 8, "num_experts_per_tok": 3,
                                         "moe_intermediate_size": 32,
                                         "shared_expert_intermediate_size": 48}),
    "mixtral": ("MixtralForCausalLM", {"num_local_experts": 4, "num_experts_per_tok": 2,
                                       "sliding_window": 24}),
    # routed experts beside the dense MLP, fused [E, 2I, H] checkpoint tensors (issue 31)
    "gemma4moe": ("Gemma4ForCausalLM", {"enable_moe_block": True, "num_experts": 4,
                                        "top_k_experts": 2, "moe_intermediate_size": 32}),
}
# (name, model, load options): split experts, and expert parallel ("ep"); the GPTQ int4 model
# (group 16: a rank's half of the 32-wide expert down_proj is one group) and the block-FP8 one
# (16x16 blocks: a rank's half is whole blocks) split quantized experts
CASES = [("qwen3moe-split", "qwen3moe", ""), ("qwen3moe-ep", "qwen3moe", "ep"),
         ("qwen2moe-split", "qwen2moe", ""), ("mixtral-ep", "mixtral", "ep"),
         ("qwen3moe-gptq-split", "qwen3moe-gptq", ""), ("qwen3moe-gptq-ep", "qwen3moe-gptq", "ep"),
         ("qwen3moe-fp8-split", "qwen3moe-fp8", ""),
         ("gemma4moe-split", "gemma4moe", ""), ("gemma4moe-ep", "gemma4moe", "ep")]


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    from tests.quant_packers import quantize_model_folder

    root = tmp_path_factory.mktemp("moe-tp")
    out = {name: make_tiny_model(str(root / name), arch, **over)
           for name, (arch, over) in MODELS.items()}
    out["qwen3moe-gptq"] = str(root / "qwen3moe-gptq")
    quantize_model_folder(out["qwen3moe"], out["qwen3moe-gptq"], str(root / "qwen3moe-dq"),
                          "gptq", bits=4, group_size=16)
    out["qwen3moe-fp8"] = str(root / "qwen3moe-fp8")
    quantize_model_folder(out["qwen3moe"], out["qwen3moe-fp8"], str(root / "qwen3moe-fp8-dq"),
                          "fp8-block", block=(16, 16))
    return out


@pytest.fixture(scope="module")
def sharded_logits(folders, tmp_path_factory):
    specs = [folders[model] + (f"::{opts}" if opts else "") for _, model, opts in CASES]
    logits = spawn_ranks(specs, tmp_path_factory.mktemp("moe-tp-out"))
    return {name: got for (name, _, _), got in zip(CASES, logits, strict=True)}


@pytest.mark.parametrize("name,model", [(c[0], c[1]) for c in CASES], ids=[c[0] for c in CASES])
def test_sharded_logits_match_one_process(name, model, folders, sharded_logits):
    model_ = load_ours(folders[model])
    stacks = [type(m.weights.w13) for m in model_.modules() if isinstance(m, FusedMoE)]
    quantized = "gptq" in name or "fp8" in name
    assert stacks and all((s is fm.DenseExperts) != quantized for s in stacks)
    assert ("fp8" not in name) or all(s is fm.Fp8Experts for s in stacks)
    assert_steps_match(run_steps(model_), sharded_logits[name])


ENGINE_ARGS = {"kv_cache_memory": 1 << 20, "max_num_batched_tokens": 16, "max_model_len": 128}
PROMPTS = [[(5 * i + j) % 300 + 3 for j in range(30 + 4 * i)] for i in range(3)]
GREEDY = SamplingParams(temperature=0, max_tokens=10, ignore_eos=True)


@pytest.fixture(scope="module")
def one_process_tokens(folders):
    llm = LLM(folders["qwen2moe"], **ENGINE_ARGS)
    return [o.outputs[0].token_ids for o in llm.generate(PROMPTS, GREEDY)]


@pytest.mark.parametrize("expert_parallel", [False, True], ids=["split", "expert-parallel"])
def test_engine_greedy_tokens_equal_one_process(folders, one_process_tokens, expert_parallel):
    """Chunked prefill (16-token steps) of a Qwen2-MoE (routed and shared experts)."""
    two = LLM(folders["qwen2moe"], tensor_parallel_size=2,
              enable_expert_parallel=expert_parallel, **ENGINE_ARGS)
    try:
        got = [o.outputs[0].token_ids for o in two.generate(PROMPTS, GREEDY)]
    finally:
        two.engine.shutdown()
    assert got == one_process_tokens


def test_experts_that_do_not_divide_are_a_startup_error():
    mc = ModelConfig.from_dict({
        "architectures": ["Qwen3MoeForCausalLM"], "vocab_size": 64, "hidden_size": 64,
        "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4,
        "num_key_value_heads": 4, "num_experts": 6, "num_experts_per_tok": 2,
        "moe_intermediate_size": 34})
    parallel.check_divisible(mc, 2)          # 34 / 2 per expert
    with pytest.raises(ConfigError, match=r"moe_intermediate_size \(34\) is not divisible by "
                                          r"--tensor-parallel-size 4.*--enable-expert-parallel"):
        parallel.check_divisible(mc, 4)
    mc.moe.expert_parallel = True
    parallel.check_divisible(mc, 2)          # 3 whole experts per rank
    with pytest.raises(ConfigError, match=r"--enable-expert-parallel: num_experts \(6\) is not "
                                          r"divisible by --tensor-parallel-size 4; use a size"):
        parallel.check_divisible(mc, 4)
