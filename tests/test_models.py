"""Our Llama-family models against transformers' implementation of the same tiny random weights:
whole prefill, token-by-token decode and chunked prefill through the paged cache, mixed batches,
the empty-cache profiling path, rope scaling variants, dtypes, config errors and inputs_embeds;
and the linear layers' weight loading, shard by shard and tensor-parallel (tp_size=2) on CPU."""
from __future__ import annotations

import os

import pytest
import torch

from minserve.config import ConfigError, ModelConfig
from minserve.models.layers import compute_inv_freq
from minserve.models.linear import (
    ColumnParallelLinear,
    MergedColumnParallelLinear,
    ParallelLMHead,
    QKVParallelLinear,
    RowParallelLinear,
    VocabParallelEmbedding,
)
from minserve.models.loader import resolve_model
from minserve.models.registry import lookup
from tests.paged_runner import (
    PagedRunner,
    attn_metadata,
    check_chunks,
    check_decode,
    check_prefill,
    hf_logits,
    load_hf,
    load_ours,
    prefill_without_cache,
    random_prompt,
)
from tests.tiny import make_tiny_model, write_gguf

ATOL = 2e-4  # float32; logits are O(10) with the scaled-up tiny weights

# (id, architecture, config overrides)
VARIANTS = [
    ("llama", "LlamaForCausalLM", {}),
    ("llama-tied", "LlamaForCausalLM", {"tie_word_embeddings": True}),
    ("mistral-sliding24", "MistralForCausalLM", {}),  # window 24 < the 40-token prompts
    ("qwen2-bias", "Qwen2ForCausalLM", {}),
    ("qwen3-qknorm", "Qwen3ForCausalLM", {}),
    ("llama3-rope", "LlamaForCausalLM", {"rope_scaling": {
        "rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
        "original_max_position_embeddings": 64}}),
    ("yarn-rope", "LlamaForCausalLM", {"rope_scaling": {
        "rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 64}}),
    ("linear-rope", "LlamaForCausalLM", {"rope_scaling": {"rope_type": "linear", "factor": 2.0}}),
    # issue 31's text architectures: NoPE layers; fused checkpoint projections with LongRoPE
    # (its short factors here: no prompt passes original_max_position_embeddings;
    # test_text_archs.py takes the long ones) and a partial rotary; local/global layers with the
    # window below the prompts
    ("smollm3-nope", "SmolLM3ForCausalLM", {}),
    ("phi3-longrope-partial", "Phi3ForCausalLM", {
        "partial_rotary_factor": 0.75, "original_max_position_embeddings": 1024,
        "rope_scaling": {"rope_type": "longrope", "short_factor": [1.0, 1.1, 1.2, 1.3, 1.4, 1.5],
                         "long_factor": [1.0, 1.5, 2.0, 2.5, 3.0, 3.5]}}),
    ("gemma3-local-global", "Gemma3ForCausalLM", {}),
    ("gemma4-ple-kvshare", "Gemma4ForCausalLM", {}),
    # The same tiny weights written as GGUF files (Q/K rows permuted as llama.cpp does) and
    # loaded through resolve_model's conversion: the reference stays transformers on the folder.
    ("llama-gguf", "LlamaForCausalLM", {}),
    ("mistral-gguf", "MistralForCausalLM", {}),
    ("qwen2-gguf", "Qwen2ForCausalLM", {}),
    ("qwen3-gguf", "Qwen3ForCausalLM", {}),
]
GGUF_ARCH = {"LlamaForCausalLM": "llama", "MistralForCausalLM": "llama",
             "Qwen2ForCausalLM": "qwen2", "Qwen3ForCausalLM": "qwen3"}
IDS = [v[0] for v in VARIANTS]


@pytest.fixture(scope="module", params=VARIANTS, ids=IDS)
def pair(request, tmp_path_factory):
    """(our model, transformers' model) on the same tiny folder."""
    variant, arch, overrides = request.param
    folder = make_tiny_model(str(tmp_path_factory.mktemp(variant)), arch, **overrides)
    ours_from = folder
    if variant.endswith("-gguf"):
        gguf_path = os.path.join(tmp_path_factory.mktemp(variant + "-file"), "tiny.gguf")
        write_gguf(folder, gguf_path, GGUF_ARCH[arch])
        with pytest.MonkeyPatch.context() as mp:
            mp.setenv("MINSERVE_CACHE", str(tmp_path_factory.mktemp(variant + "-cache")))
            ours_from = resolve_model(gguf_path)
        assert ours_from != folder
    return load_ours(ours_from), load_hf(folder)


def test_prefill_matches_hf(pair):
    check_prefill(*pair, random_prompt(40, 1), ATOL)


@pytest.mark.parametrize("block_size", [16, 4])
def test_decode_token_by_token(pair, block_size):
    check_decode(*pair, random_prompt(37, 2), block_size, ATOL)


@pytest.mark.parametrize("block_size", [16, 4])
def test_chunked_prefill_across_blocks(pair, block_size):
    check_chunks(*pair, random_prompt(45, 3), block_size, ATOL)   # chunks start mid-block


def test_mixed_batch_equals_one_at_a_time(pair):
    """Decodes, a mid-prompt chunk and a fresh prompt in one step, as the scheduler packs them."""
    ours, hf = pair
    prompts = {k: random_prompt(n, seed)
               for k, n, seed in (("a", 30, 4), ("b", 21, 5), ("c", 9, 6), ("d", 33, 7))}
    refs = {k: hf_logits(hf, p) for k, p in prompts.items()}
    runner = PagedRunner(ours, block_size=4, num_blocks=64)
    got: dict[str, list[torch.Tensor]] = {k: [] for k in prompts}
    plan = [
        [("a", 0, 17), ("b", 0, 20)],
        [("a", 17, 18), ("b", 20, 21), ("c", 0, 5)],   # a decodes, b's last token, c starts
        [("c", 5, 9), ("a", 18, 30), ("d", 0, 11)],
        [("d", 11, 12)],
    ]
    for step in plan:
        batch = [(req_id, prompts[req_id][lo:hi]) for req_id, lo, hi in step]
        for (req_id, _), logits in zip(batch, runner.step(batch), strict=True):
            got[req_id].append(logits)
    # "d" finishes alone, one token at a time, while nothing else runs.
    for i in range(12, 33):
        got["d"].append(runner.step([("d", prompts["d"][i:i + 1])])[0])
    for req_id, ref in refs.items():
        torch.testing.assert_close(torch.cat(got[req_id]), ref, atol=ATOL, rtol=0)


def test_profiling_path_batches_requests(pair):
    ours, hf = pair
    prompts = [random_prompt(n, 10 + n) for n in (7, 30, 1)]
    for logits, prompt in zip(prefill_without_cache(ours, prompts), prompts, strict=True):
        torch.testing.assert_close(logits, hf_logits(hf, prompt), atol=ATOL, rtol=0)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_dtypes_track_float32(tiny_model_factory, dtype):
    folder = tiny_model_factory("Qwen3ForCausalLM")
    prompt = random_prompt(20, 8)
    ref = hf_logits(load_hf(folder), prompt)
    model = load_ours(folder, dtype=dtype)
    assert all(p.dtype == dtype for p in model.parameters())
    assert model.model.rotary_emb.inv_freq.dtype == torch.float32
    (got,) = PagedRunner(model, block_size=16).step([("a", prompt)])
    assert got.dtype == torch.float32
    err = (got - ref).abs().max() / ref.abs().max()
    assert err < 0.05, err
    assert (got.argmax(-1) == ref.argmax(-1)).float().mean() > 0.9


def test_tied_flag_is_independent(tiny_model_factory):
    tied = load_ours(tiny_model_factory("LlamaForCausalLM", tie_word_embeddings=True))
    untied = load_ours(tiny_model_factory("Qwen2ForCausalLM", tie_word_embeddings=False))
    assert tied.lm_head is None and untied.lm_head is not None
    assert untied.model.layers[0].self_attn.qkv_proj.bias is not None  # Qwen2 bias stays on


def test_llama3_inv_freq_matches_transformers():
    from transformers import LlamaConfig
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    sc = {"rope_type": "llama3", "factor": 32.0, "low_freq_factor": 1.0,
          "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}
    cfg = LlamaConfig(hidden_size=2048, num_attention_heads=32, rope_theta=500000.0,
                      rope_scaling=sc, max_position_embeddings=131072)
    ref, _ = ROPE_INIT_FUNCTIONS["llama3"](cfg, "cpu")
    ours, scaling = compute_inv_freq(64, 500000.0, sc, 131072)
    torch.testing.assert_close(ours, ref.float())
    assert scaling == 1.0


def test_unsupported_rope_and_arch_raise_config_error():
    with pytest.raises(ConfigError, match="dynamic"):
        compute_inv_freq(16, 10000.0, {"rope_type": "dynamic", "factor": 2.0}, 128)
    with pytest.raises(ConfigError, match="GPT2LMHeadModel.*supported: LlamaForCausalLM, "):
        lookup("GPT2LMHeadModel")
    cfg = ModelConfig.from_dict({"architectures": ["LlamaForCausalLM"], "vocab_size": 8,
                                 "hidden_size": 8, "intermediate_size": 8,
                                 "num_hidden_layers": 1, "num_attention_heads": 2,
                                 "rope_scaling": {"rope_type": "longrope"}})
    with pytest.raises(ConfigError, match="longrope"):
        lookup(cfg.architecture).model_class()(cfg)


# ------------------------------------------------------------------------------------------
# model inputs: inputs_embeds in place of input_ids
# ------------------------------------------------------------------------------------------

@torch.inference_mode()
def test_inputs_embeds_equal_input_ids(tiny_model_factory):
    model = load_ours(tiny_model_factory("Qwen3ForCausalLM"))
    prompts = [random_prompt(13, 20), random_prompt(6, 21)]
    ids = torch.tensor([t for p in prompts for t in p])
    outs = []
    for kwargs in ({"input_ids": ids},
                   {"input_ids": None, "inputs_embeds": model.embed_input_ids(ids)}):
        runner = PagedRunner(model, block_size=4)      # fresh KV caches for each run
        attn, positions = attn_metadata([13, 6], [0, 0], [runner.free_blocks[:4],
                                                          runner.free_blocks[4:6]], 4)
        outs.append(model(positions=positions, attn=attn, **kwargs))
    assert outs[0].shape == (19, 64)
    torch.testing.assert_close(outs[1], outs[0], atol=0, rtol=0)


# ------------------------------------------------------------------------------------------
# linear layers: weight_loader shards, tensor-parallel slices
# ------------------------------------------------------------------------------------------

def _filled(layer, weights: dict[str, torch.Tensor], shards: dict[str, dict] | None = None):
    """Load full checkpoint tensors into `layer` through each parameter's weight_loader."""
    params = dict(layer.named_parameters())
    for name, tensor in weights.items():
        params[name].weight_loader(params[name], tensor)
    for name, by_shard in (shards or {}).items():
        for shard_id, tensor in by_shard.items():
            params[name].weight_loader(params[name], tensor, shard_id)
    return layer


def test_qkv_and_merged_shards_fill_their_rows():
    torch.manual_seed(0)
    q, k, v = torch.randn(8, 6), torch.randn(4, 6), torch.randn(4, 6)
    bq, bk, bv = torch.randn(8), torch.randn(4), torch.randn(4)
    qkv = _filled(QKVParallelLinear(6, 4, 2, 1, bias=True), {},
                  {"weight": {"v": v, "q": q, "k": k}, "bias": {"k": bk, "v": bv, "q": bq}})
    assert torch.equal(qkv.weight, torch.cat([q, k, v])) and torch.equal(qkv.bias,
                                                                          torch.cat([bq, bk, bv]))
    gate, up = torch.randn(5, 6), torch.randn(5, 6)
    merged = _filled(MergedColumnParallelLinear(6, [5, 5], bias=False), {},
                     {"weight": {1: up, 0: gate}})
    assert torch.equal(merged.weight, torch.cat([gate, up]))
    x = torch.randn(3, 6)
    torch.testing.assert_close(merged(x), torch.cat([x @ gate.T, x @ up.T], -1))
    with pytest.raises(ConfigError, match="expects 4"):
        qkv.weight.weight_loader(qkv.weight, torch.randn(5, 6), "k")
    with pytest.raises(ConfigError, match="one of q, k, v"):
        qkv.weight.weight_loader(qkv.weight, q, 0)


class _TransposedMethod:
    """A stand-in for a quantized method: its own parameter layout ([in, out], as AWQ's qweight)
    declared through output_dim/input_dim, loaded by the layers' unchanged weight_loaders."""

    def create_weights(self, layer, input_size, output_sizes):
        w = torch.nn.Parameter(torch.empty(input_size, sum(output_sizes)), requires_grad=False)
        w.output_dim, w.input_dim, w.weight_loader = 1, 0, layer.weight_loader
        layer.register_parameter("weight_t", w)

    def apply(self, layer, x, bias=None):
        out = x @ layer.weight_t
        return out if bias is None else out + bias


@pytest.mark.parametrize("method", [None, _TransposedMethod], ids=["dense", "transposed"])
def test_tp2_slices_compose_to_the_full_layer(method):
    """Rank 0 and rank 1 of tp_size=2 load the same full checkpoint tensors; concatenating
    (column-parallel) or summing (row-parallel) their outputs gives the tp_size=1 layer's."""
    torch.manual_seed(1)
    name = "weight" if method is None else "weight_t"

    def fit(w: torch.Tensor) -> torch.Tensor:       # checkpoint tensors in the method's layout
        return w if method is None else w.T

    def build(cls, *args, **kwargs):
        qm = {} if method is None else {"quant_method": method()}
        return [cls(*args, **kwargs, **qm, **({"tp_rank": r, "tp_size": 2} if r is not None
                                                else {}))
                for r in (None, 0, 1)]

    x = torch.randn(5, 12)
    w, b = torch.randn(10, 12), torch.randn(10)
    full, r0, r1 = (_filled(m, {name: fit(w), "bias": b})
                    for m in build(ColumnParallelLinear, 12, 10))
    torch.testing.assert_close(torch.cat([r0(x), r1(x)], -1), full(x))

    w = torch.randn(7, 12)
    full, r0, r1 = (_filled(m, {name: fit(w), "bias": b[:7]})
                    for m in build(RowParallelLinear, 12, 7))
    torch.testing.assert_close(r0(x[:, :6]) + r1(x[:, 6:]), full(x))

    # gate|up: each rank holds its half of gate, then its half of up
    gate, up = torch.randn(8, 12), torch.randn(8, 12)
    full, r0, r1 = (_filled(m, {}, {name: {0: fit(gate), 1: fit(up)}})
                    for m in build(MergedColumnParallelLinear, 12, [8, 8], bias=False))
    (g0, u0), (g1, u1), (g, u) = (m(x).chunk(2, -1) for m in (r0, r1, full))
    torch.testing.assert_close(torch.cat([g0, g1, u0, u1], -1), torch.cat([g, u], -1))

    # 4 q heads, 2 kv heads -> 2 + 1 per rank; 1 kv head -> copied to both ranks
    for num_kv_heads in (2, 1):
        q, k, v = torch.randn(12, 12), torch.randn(3 * num_kv_heads, 12), torch.randn(
            3 * num_kv_heads, 12)
        full, r0, r1 = (_filled(m, {}, {name: {"q": fit(q), "k": fit(k), "v": fit(v)}})
                        for m in build(QKVParallelLinear, 12, 3, 4, num_kv_heads, bias=False))
        assert r0.num_heads == 2 and r0.num_kv_heads == 1
        split = [r0.output_sizes, r1.output_sizes, full.output_sizes]
        (q0, k0, v0), (q1, k1, v1), (qf, kf, vf) = (
            m(x).split(s, -1) for m, s in zip((r0, r1, full), split, strict=True))
        torch.testing.assert_close(torch.cat([q0, q1], -1), qf)
        if num_kv_heads == 2:
            torch.testing.assert_close(torch.cat([k0, k1], -1), kf)
            torch.testing.assert_close(torch.cat([v0, v1], -1), vf)
        else:
            for got in (k0, k1):
                torch.testing.assert_close(got, kf)
            for got in (v0, v1):
                torch.testing.assert_close(got, vf)


def test_tp2_vocab_split_composes():
    """7 token ids over 2 ranks: rank 0 holds ids 0-3, rank 1 ids 4-6 and a zero pad row."""
    torch.manual_seed(2)
    table, ids, hidden = torch.randn(7, 5), torch.tensor([0, 6, 3, 4, 3]), torch.randn(2, 5)
    full, r0, r1 = (_filled(VocabParallelEmbedding(7, 5, **kw), {"weight": table})
                    for kw in ({}, {"tp_rank": 0, "tp_size": 2}, {"tp_rank": 1, "tp_size": 2}))
    assert (r1.vocab_start, r1.vocab_end) == (4, 7) and not r1.weight[3].any()
    torch.testing.assert_close(r0(ids) + r1(ids), full(ids))
    head = [_filled(ParallelLMHead(7, 5, tp_rank=r, tp_size=2), {"weight": table}) for r in (0, 1)]
    logits = [hidden @ h.weight[:h.vocab_end - h.vocab_start].T for h in head]
    torch.testing.assert_close(torch.cat(logits, -1), hidden @ table.T)
    with pytest.raises(ConfigError, match="expects 7"):
        r0.weight.weight_loader(r0.weight, torch.randn(8, 5))
