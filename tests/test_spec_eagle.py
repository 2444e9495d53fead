"""EAGLE-3 speculative decoding with a tiny head written in the published layout (config.json
with LlamaForCausalLMEagle3 and draft_vocab_size; safetensors with fc, midlayer.*, norm,
lm_head, d2t and t2d, no embed_tokens: the target's are shared). Exact (greedy and seeded
sampling equal no speculation); the head's first draft equals a plain-torch reference computed
from transformers' hidden states of the target; a head whose proposals are known is accepted
every time through d2t, and rejected every time when d2t maps them elsewhere."""
from __future__ import annotations

import json
import os

import pytest
import torch
from safetensors.torch import load_file, save_file

from minserve.config import ConfigError
from minserve.engine.request import EngineRequest
from minserve.sampling_params import SamplingParams
from tests.test_spec import PROMPTS, all_toks, generate, make_engine

H, DRAFT_V, V = 64, 128, 512
HEADS, KV_HEADS, HEAD_DIM, INTER = 4, 2, 16, 128
GREEDY = SamplingParams(temperature=0, max_tokens=16, ignore_eos=True)


def write_head(folder: str, seed: int = 0, d2t_first: int | None = None,
               zero_lm_head: bool = False) -> str:
    """A random EAGLE-3 head as SpecForge saves one; d2t maps draft id i to i + d2t[i]."""
    os.makedirs(folder, exist_ok=True)
    g = torch.Generator().manual_seed(seed)

    def w(*shape: int, scale: float = 0.15) -> torch.Tensor:
        return torch.randn(*shape, generator=g) * scale

    def norm() -> torch.Tensor:
        return 1.0 + 0.1 * torch.randn(H, generator=g)

    d2t = torch.randint(0, V - DRAFT_V, (DRAFT_V,), generator=g)
    if d2t_first is not None:
        d2t[0] = d2t_first
    t2d = torch.zeros(V, dtype=torch.bool)
    t2d[torch.arange(DRAFT_V) + d2t] = True
    tensors = {
        "fc.weight": w(H, 3 * H), "norm.weight": norm(),
        "lm_head.weight": torch.zeros(DRAFT_V, H) if zero_lm_head else w(DRAFT_V, H),
        "midlayer.input_layernorm.weight": norm(), "midlayer.hidden_norm.weight": norm(),
        "midlayer.post_attention_layernorm.weight": norm(),
        "midlayer.self_attn.q_proj.weight": w(HEADS * HEAD_DIM, 2 * H),
        "midlayer.self_attn.k_proj.weight": w(KV_HEADS * HEAD_DIM, 2 * H),
        "midlayer.self_attn.v_proj.weight": w(KV_HEADS * HEAD_DIM, 2 * H),
        "midlayer.self_attn.o_proj.weight": w(H, HEADS * HEAD_DIM),
        "midlayer.mlp.gate_proj.weight": w(INTER, H), "midlayer.mlp.up_proj.weight": w(INTER, H),
        "midlayer.mlp.down_proj.weight": w(H, INTER),
        "d2t": d2t, "t2d": t2d,
    }
    save_file(tensors, os.path.join(folder, "model.safetensors"))
    config = {"architectures": ["LlamaForCausalLMEagle3"], "model_type": "llama",
              "hidden_size": H, "intermediate_size": INTER, "num_attention_heads": HEADS,
              "num_key_value_heads": KV_HEADS, "num_hidden_layers": 1, "vocab_size": V,
              "draft_vocab_size": DRAFT_V, "rms_norm_eps": 1e-6, "rope_theta": 10000.0,
              "max_position_embeddings": 1024, "tie_word_embeddings": False,
              "torch_dtype": "float32"}
    with open(os.path.join(folder, "config.json"), "w") as f:
        json.dump(config, f)
    return folder


@pytest.fixture(scope="module")
def target(tiny_model_factory):
    # 4 layers: the head reads the default layers (2, 4 // 2, 4 - 3)
    return tiny_model_factory("LlamaForCausalLM", num_hidden_layers=4)


@pytest.fixture(scope="module")
def head(tmp_path_factory):
    return write_head(str(tmp_path_factory.mktemp("eagle3")))


def eagle(folder: str, **kw) -> dict:
    return {"method": "eagle3", "model": folder, "num_speculative_tokens": 3,
            "disable_by_batch_size": 64, "min_acceptance_rate": 0, **kw}


def test_exact_with_a_random_head(target, head):
    eng = make_engine(target, eagle(head), max_num_batched_tokens=16)
    plain = make_engine(target, max_num_batched_tokens=16)
    params = [GREEDY, SamplingParams(temperature=0.9, seed=3, n=2, max_tokens=12,
                                     ignore_eos=True, top_k=30), GREEDY]
    assert all_toks(generate(eng, PROMPTS, params)) == all_toks(generate(plain, PROMPTS, params))
    assert eng.stats()["spec_num_draft_tokens"] > 0
    assert eng.kv_cache.num_free_blocks == eng.kv_cache.num_blocks


def reference_first_draft(target: str, head: str, prompt: list[int]) -> int:
    """The head's draft after the prompt, from scratch: transformers' target states at every
    prompt position, the head's layer in plain torch over them and the next tokens."""
    import transformers

    hf = transformers.AutoModelForCausalLM.from_pretrained(target, dtype=torch.float32).eval()
    with torch.no_grad():
        out = hf(torch.tensor([prompt]), output_hidden_states=True)
    first = int(out.logits[0, -1].argmax())
    aux = torch.cat([out.hidden_states[i][0] for i in (2, 2, 1)], dim=-1)    # [P, 3H]
    w = load_file(os.path.join(head, "model.safetensors"))
    m = {k.removeprefix("midlayer."): v for k, v in w.items()}

    def rms(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6) * weight

    P = len(prompt)
    h = aux @ w["fc.weight"].T
    emb = hf.model.embed_tokens.weight[torch.tensor(prompt[1:] + [first])].detach()
    x = torch.cat([rms(emb, m["input_layernorm.weight"]), rms(h, m["hidden_norm.weight"])], -1)
    q = (x @ m["self_attn.q_proj.weight"].T).view(P, HEADS, HEAD_DIM)
    k = (x @ m["self_attn.k_proj.weight"].T).view(P, KV_HEADS, HEAD_DIM)
    v = (x @ m["self_attn.v_proj.weight"].T).view(P, KV_HEADS, HEAD_DIM)
    inv = 1.0 / 10000.0 ** (torch.arange(0, HEAD_DIM, 2).float() / HEAD_DIM)
    ang = torch.arange(P).float()[:, None] * inv[None]
    cos, sin = torch.cat([ang.cos()] * 2, -1)[:, None], torch.cat([ang.sin()] * 2, -1)[:, None]

    def rope(t: torch.Tensor) -> torch.Tensor:
        half = torch.cat([-t[..., HEAD_DIM // 2:], t[..., :HEAD_DIM // 2]], -1)
        return t * cos + half * sin

    q, k = rope(q), rope(k).repeat_interleave(HEADS // KV_HEADS, 1)
    v = v.repeat_interleave(HEADS // KV_HEADS, 1)
    att = torch.einsum("qhd,khd->hqk", q, k) / HEAD_DIM ** 0.5
    att = att.masked_fill(torch.ones(P, P).triu(1).bool(), float("-inf")).softmax(-1)
    a = torch.einsum("hqk,khd->qhd", att, v).reshape(P, H) @ m["self_attn.o_proj.weight"].T
    residual = a + h
    y = rms(residual, m["post_attention_layernorm.weight"])
    y = (torch.nn.functional.silu(y @ m["mlp.gate_proj.weight"].T) * (y @ m["mlp.up_proj.weight"].T)
         ) @ m["mlp.down_proj.weight"].T
    logits = rms(y + residual, w["norm.weight"])[-1] @ w["lm_head.weight"].T
    draft = int(logits.argmax())
    return draft + int(w["d2t"][draft])


def test_the_first_draft_is_the_heads(target, head):
    eng = make_engine(target, eagle(head))
    prompt = PROMPTS[2][:21]
    eng.add_request(EngineRequest("r", prompt, GREEDY))
    eng.step()    # the prompt in one step, then the head drafts
    (request,) = eng.scheduler.running
    assert request.spec_token_ids and \
        request.spec_token_ids[0] == reference_first_draft(target, head, prompt)


@pytest.fixture(scope="module")
def zero_target(target, tmp_path_factory):
    """The target with a zero final norm: every logit 0, so it always picks token 0."""
    import shutil

    folder = str(tmp_path_factory.mktemp("zero-norm"))
    shutil.copytree(target, folder, dirs_exist_ok=True)
    path = os.path.join(folder, "model.safetensors")
    w = load_file(path)
    w["model.norm.weight"] = torch.zeros_like(w["model.norm.weight"])
    save_file(w, path, metadata={"format": "pt"})
    return folder


@pytest.mark.parametrize("d2t_first, accepted", [(0, True), (5, False)])
def test_known_proposals_through_d2t(zero_target, tmp_path, d2t_first, accepted):
    # a zero lm_head drafts draft id 0 every time, which d2t maps to target id d2t[0]
    folder = write_head(str(tmp_path / "head"), d2t_first=d2t_first, zero_lm_head=True)
    eng = make_engine(zero_target, eagle(folder))
    outs = all_toks(generate(eng, PROMPTS[:2], GREEDY))
    assert outs == {"q0": [0] * 16, "q1": [0] * 16}
    s = eng.stats()
    assert s["spec_num_draft_tokens"] > 0
    assert s["spec_num_accepted_tokens"] == (s["spec_num_draft_tokens"] if accepted else 0)


def test_a_plain_model_named_as_eagle3_is_refused(target, tiny_model_dir, head):
    with pytest.raises(ConfigError, match="EAGLE-3 head was expected"):
        make_engine(target, eagle(tiny_model_dir))
    with pytest.raises(ConfigError, match='"method": "eagle3"'):
        make_engine(target, {"model": head, "num_speculative_tokens": 2})
    with pytest.raises(ConfigError, match="reads layers"):
        make_engine(tiny_model_dir, eagle(head))     # a 2-layer target has no layer 2
