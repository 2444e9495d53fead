"""Tiny random models written as real HF folders (config.json, safetensors, tokenizer.json,
tokenizer_config.json, generation_config.json), so tests go through the real loader. transformers
is a test dependency only: it writes the weights and is the reference our logits are checked
against."""
from __future__ import annotations

import json
import os

import numpy as np
import torch

CHATML = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
CORPUS = [
    "The quick brown fox jumps over the lazy dog. " * 4,
    "What is the capital of France? Paris is the capital of France.",
    "Hello world! Machine learning is fascinating; tokens, blocks and caches.",
    "def add(a, b):\n    return a + b\n# numbers 0123456789 and {\"json\": [1, 2.5, true, null]}",
    "Ünïcödé tëxt, 日本語のテキスト, emoji 🙂🚀 and Ελληνικά.",
]

BASE = {
    "vocab_size": 512,
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "max_position_embeddings": 1024,
    "rms_norm_eps": 1e-6,
    "rope_theta": 10000.0,
    "tie_word_embeddings": False,
}
ARCH_EXTRAS = {
    "LlamaForCausalLM": {},
    "MistralForCausalLM": {"sliding_window": 24},
    "Qwen2ForCausalLM": {"tie_word_embeddings": True},
    "Qwen3ForCausalLM": {"head_dim": 32},
    # NoPE on every second layer (the real interval, 4, would leave 2 layers all RoPE)
    "SmolLM3ForCausalLM": {"pad_token_id": 0, "no_rope_layer_interval": 2},
    "Phi3ForCausalLM": {"pad_token_id": 0},
    # a local layer (window 24, below the 40-token prompts) then a global one, each with its own
    # rope base; head_dim 32 != hidden / heads; query_pre_attn_scalar != head_dim
    "Gemma3ForCausalLM": {"pad_token_id": 0, "head_dim": 32, "sliding_window": 24,
                          "layer_types": ["sliding_attention", "full_attention"],
                          "query_pre_attn_scalar": 24, "final_logit_softcapping": 30.0,
                          "rope_parameters": {
                              "sliding_attention": {"rope_type": "default", "rope_theta": 100.0},
                              "full_attention": {"rope_type": "linear", "factor": 2.0,
                                                 "rope_theta": 10000.0}},
                          "tie_word_embeddings": True},
    # Gemma 2: local then global layers (window 24), one rope base, attention logits capped at
    # 2 (below the tiny model's logits, so the cap changes its tokens)
    "Gemma2ForCausalLM": {"pad_token_id": 0, "head_dim": 32, "sliding_window": 24,
                          "query_pre_attn_scalar": 24, "attn_logit_softcapping": 2.0,
                          "final_logit_softcapping": 30.0, "tie_word_embeddings": True},
    # 4 layers: local, global, then two that read layers 0 and 1's caches (with double-wide
    # MLPs); global layers with head_dim 32 and one kv head where v = k; per-layer inputs
    "Gemma4ForCausalLM": {"pad_token_id": 0, "num_hidden_layers": 4, "head_dim": 16,
                          "global_head_dim": 32, "num_global_key_value_heads": 1,
                          "attention_k_eq_v": True, "num_kv_shared_layers": 2,
                          "use_double_wide_mlp": True, "sliding_window": 24,
                          "hidden_size_per_layer_input": 8, "vocab_size_per_layer_input": 512,
                          "layer_types": ["sliding_attention", "full_attention"] * 2,
                          "final_logit_softcapping": 30.0},
}
# the config class when it is not the architecture's name with "Config" (a text-only class)
CONFIG_CLASSES = {"Gemma3ForCausalLM": "Gemma3TextConfig", "Gemma4ForCausalLM": "Gemma4TextConfig",
                  "Qwen3_5ForCausalLM": "Qwen3_5TextConfig",
                  "Qwen3_5MoeForCausalLM": "Qwen3_5MoeTextConfig"}


def make_tokenizer_json(path: str, vocab_size: int = 400) -> None:
    """A small byte-level BPE (GPT-2 style) with ChatML special tokens."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False,
    )
    tok.train_from_iterator(CORPUS * 3, trainer=trainer)
    tok.save(path)


@torch.no_grad()
def scale_up_weights(model: torch.nn.Module) -> None:
    """Random init of transformers is N(0, 0.02): logits are nearly flat. Scale up so greedy
    choices are well separated and float32 comparisons are meaningful."""
    for name, p in model.named_parameters():
        if ("norm" in name or "ln_q" in name) and type(model).__name__.startswith(
                ("Gemma2", "Gemma3")):
            p.copy_(0.1 * torch.randn_like(p))      # Gemma's norms scale by 1 + w
        elif "norm" in name or "ln_q" in name or name.endswith(("router.scale",
                                                                   "per_expert_scale")):
            p.copy_(1.0 + 0.1 * torch.randn_like(p))
        elif p.dim() > 1:
            p.normal_(0.0, 0.15)
        else:
            p.normal_(0.0, 0.05)
    for name, b in model.named_buffers():
        if name.endswith("layer_scalar"):       # Gemma 4's per-layer scale (a saved buffer)
            b.uniform_(0.5, 1.5)


def make_tiny_model(path: str, arch: str = "LlamaForCausalLM", seed: int = 0, **overrides) -> str:
    """Write a tiny random model of `arch` into the folder `path` and return it."""
    import transformers

    os.makedirs(path, exist_ok=True)
    tok_path = os.path.join(path, "tokenizer.json")
    make_tokenizer_json(tok_path)
    with open(tok_path) as f:
        vocab = json.load(f)["model"]["vocab"]
    specials = {t: vocab[t] for t in SPECIAL_TOKENS if t in vocab}
    if len(specials) != len(SPECIAL_TOKENS):  # added tokens live outside model.vocab
        with open(tok_path) as f:
            added = {t["content"]: t["id"] for t in json.load(f)["added_tokens"]}
        specials = {t: added[t] for t in SPECIAL_TOKENS}
    eos_id, endoftext_id = specials["<|im_end|>"], specials["<|endoftext|>"]

    cfg = {**BASE, **ARCH_EXTRAS.get(arch, {}), **overrides}
    cfg.update(bos_token_id=endoftext_id, eos_token_id=eos_id)
    config_cls = getattr(transformers, CONFIG_CLASSES.get(arch, arch.replace("ForCausalLM",
                                                                             "Config")))
    model_cls = getattr(transformers, arch)
    torch.manual_seed(seed)
    model = model_cls(config_cls(**cfg)).to(torch.float32).eval()
    scale_up_weights(model)
    model.save_pretrained(path, safe_serialization=True)

    tok_cfg = {
        "bos_token": None,
        "eos_token": "<|im_end|>",
        "pad_token": "<|endoftext|>",
        "unk_token": None,
        "add_bos_token": False,
        "chat_template": CHATML,
        "model_max_length": cfg["max_position_embeddings"],
        "tokenizer_class": "PreTrainedTokenizerFast",
    }
    with open(os.path.join(path, "tokenizer_config.json"), "w") as f:
        json.dump(tok_cfg, f, indent=2)
    with open(os.path.join(path, "generation_config.json"), "w") as f:
        json.dump({"eos_token_id": [eos_id, endoftext_id], "bos_token_id": endoftext_id}, f)
    return path


# GGUF files, written as llama.cpp's convert_hf_to_gguf.py writes them

def _llama_cpp_permute(w: np.ndarray, num_heads: int) -> np.ndarray:
    """convert_hf_to_gguf.py LlamaModel.permute: interleave each head's two rotary halves."""
    return (w.reshape(num_heads, 2, w.shape[0] // num_heads // 2, *w.shape[1:])
            .swapaxes(1, 2).reshape(w.shape))


_GGUF_NAMES = {
    "input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm",
    "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
    "self_attn.o_proj": "attn_output", "self_attn.q_norm": "attn_q_norm",
    "self_attn.k_norm": "attn_k_norm", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
    "mlp.down_proj": "ffn_down",
}


_GGUF_NAMES.update({
    "mlp.gate": "ffn_gate_inp", "block_sparse_moe.gate": "ffn_gate_inp",
    "mlp.experts.gate_proj": "ffn_gate_exps", "mlp.experts.up_proj": "ffn_up_exps",
    "mlp.experts.down_proj": "ffn_down_exps", "mlp.shared_expert.gate_proj": "ffn_gate_shexp",
    "mlp.shared_expert.up_proj": "ffn_up_shexp", "mlp.shared_expert.down_proj": "ffn_down_shexp",
    "mlp.shared_expert_gate": "ffn_gate_inp_shexp"})
_MIXTRAL_EXPERTS = {"w1": "gate_proj", "w3": "up_proj", "w2": "down_proj"}


def _stack_experts(tensors: dict) -> dict:
    """Each layer's per-expert projections -> one [E, N, K] tensor (mlp.experts.gate_proj...),
    as llama.cpp stores them; Qwen2-MoE's [1, H] shared-expert gate -> [H]."""
    import re

    import numpy as np

    out, experts = {}, {}
    for name, data in tensors.items():
        m = re.fullmatch(r"(model\.layers\.\d+)\.(?:mlp|block_sparse_moe)\.experts\.(\d+)\."
                         r"(\w+)\.weight", name)
        if m is None:
            out[name] = data.reshape(-1) if name.endswith("shared_expert_gate.weight") else data
            continue
        proj = _MIXTRAL_EXPERTS.get(m.group(3), m.group(3))
        experts.setdefault(f"{m.group(1)}.mlp.experts.{proj}.weight", {})[int(m.group(2))] = data
    for name, by_expert in experts.items():
        out[name] = np.stack([by_expert[e] for e in sorted(by_expert)])
    return out


# llama.cpp's names that differ per architecture, and Gemma's norms stored as 1 + w
_GGUF_ARCH_NAMES = {
    "gemma3": {"input_layernorm": "attn_norm", "post_attention_layernorm": "post_attention_norm",
               "pre_feedforward_layernorm": "ffn_norm",
               "post_feedforward_layernorm": "post_ffw_norm"},
    "phi3": {"self_attn.qkv_proj": "attn_qkv", "mlp.gate_up_proj": "ffn_up"},
}
_GGUF_PERMUTED = ("llama", "smollm3")


def _gguf_arch_metadata(w, cfg: dict, gguf_arch: str) -> None:
    """What convert_hf_to_gguf.py writes beyond the Llama keys for gemma3 and phi3."""
    import gguf

    rope = cfg.get("rope_parameters") or {}
    if gguf_arch == "gemma3":
        w.add_rope_freq_base_swa(rope["sliding_attention"]["rope_theta"])
        w.add_sliding_window_pattern([t == "sliding_attention" for t in cfg["layer_types"]])
        if cfg.get("final_logit_softcapping"):
            w.add_final_logit_softcapping(cfg["final_logit_softcapping"])
        if rope["full_attention"].get("rope_type") == "linear":
            w.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
            w.add_rope_scaling_factor(rope["full_attention"]["factor"])
    if gguf_arch == "phi3":
        head_dim = cfg["hidden_size"] // cfg["num_attention_heads"]
        w.add_rope_dimension_count(int(head_dim * rope.get("partial_rotary_factor", 1.0)))
        w.add_rope_scaling_orig_ctx_len(cfg["original_max_position_embeddings"])


def write_gguf(hf_folder: str, path: str, gguf_arch: str, qtype: str = "F32",
               qtypes: dict[str, str] | None = None, tokenizer_model: str = "gpt2") -> None:
    """qtype for every 2-D tensor; qtypes overrides it per GGUF module ("attn_v": "Q6_K").
    K-quants get random blocks of the tensor's spread (gguf-py cannot quantize them).
    tokenizer_model "llama" labels the vocab SentencePiece, as Gemma's and Phi-3's GGUFs are."""
    import gguf
    from safetensors.numpy import load_file

    with open(os.path.join(hf_folder, "config.json")) as f:
        cfg = json.load(f)
    with open(os.path.join(hf_folder, "tokenizer.json")) as f:
        tok = json.load(f)
    w = gguf.GGUFWriter(path, gguf_arch)
    heads, kv_heads = cfg["num_attention_heads"], cfg["num_key_value_heads"]
    head_dim = cfg.get("head_dim") or cfg["hidden_size"] // heads
    w.add_context_length(cfg["max_position_embeddings"])
    w.add_embedding_length(cfg["hidden_size"])
    w.add_block_count(cfg["num_hidden_layers"])
    w.add_feed_forward_length(cfg["intermediate_size"])
    w.add_head_count(heads)
    w.add_head_count_kv(kv_heads)
    rope = cfg["rope_parameters"]
    w.add_rope_freq_base(rope["full_attention"]["rope_theta"] if "full_attention" in rope
                         else rope["rope_theta"])
    w.add_layer_norm_rms_eps(cfg["rms_norm_eps"])
    if gguf_arch != "phi3":
        w.add_rope_dimension_count(head_dim)
    _gguf_arch_metadata(w, cfg, gguf_arch)
    w.add_key_length(head_dim)
    w.add_value_length(head_dim)
    w.add_vocab_size(cfg["vocab_size"])
    if cfg.get("sliding_window"):
        w.add_sliding_window(cfg["sliding_window"])
    num_experts = cfg.get("num_experts") or cfg.get("num_local_experts")
    if num_experts:     # as convert_hf_to_gguf.py writes a MoE's settings
        w.add_expert_count(num_experts)
        w.add_expert_used_count(cfg["num_experts_per_tok"])
        if cfg.get("moe_intermediate_size"):
            w.add_expert_feed_forward_length(cfg["moe_intermediate_size"])
        if cfg.get("shared_expert_intermediate_size"):
            w.add_expert_shared_feed_forward_length(cfg["shared_expert_intermediate_size"])
    # Tokenizer: the vocab in id order, added tokens marked CONTROL, merges as "a b" strings.
    vocab = dict(tok["model"]["vocab"])
    vocab.update({t["content"]: t["id"] for t in tok["added_tokens"]})
    tokens = [t for t, _ in sorted(vocab.items(), key=lambda kv: kv[1])]
    specials = {t["content"] for t in tok["added_tokens"]}
    w.add_tokenizer_model(tokenizer_model)
    w.add_tokenizer_pre("default")
    w.add_token_list(tokens)
    w.add_token_types([3 if t in specials else 1 for t in tokens])
    w.add_token_merges([m if isinstance(m, str) else " ".join(m) for m in tok["model"]["merges"]])
    w.add_bos_token_id(cfg["bos_token_id"])
    w.add_eos_token_id(cfg["eos_token_id"])
    w.add_add_bos_token(False)
    w.add_chat_template("{{ messages[0]['content'] }}")

    tensors = {}
    for path_ in sorted(os.listdir(hf_folder)):
        if path_.endswith(".safetensors"):
            tensors.update(load_file(os.path.join(hf_folder, path_)))
    if gguf_arch == "phi3" and rope.get("rope_type") == "longrope":
        for kind in ("long", "short"):
            w.add_tensor(f"rope_factors_{kind}.weight",
                         np.array(rope[f"{kind}_factor"], dtype=np.float32))
    names = {**_GGUF_NAMES, **_GGUF_ARCH_NAMES.get(gguf_arch, {})}
    tensors = _stack_experts(tensors)
    for name, data in tensors.items():
        data = data.astype(np.float32)
        if name == "model.embed_tokens.weight":
            gname = "token_embd.weight"
        elif name == "model.norm.weight":
            gname = "output_norm.weight"
        elif name == "lm_head.weight":
            gname = "output.weight"
        else:
            _, _, layer, rest = name.split(".", 3)
            module, suffix = rest.rsplit(".", 1)
            gname = f"blk.{layer}.{names[module]}.{suffix}"
            if gguf_arch in _GGUF_PERMUTED and module == "self_attn.q_proj":
                data = _llama_cpp_permute(data, heads)
            elif gguf_arch in _GGUF_PERMUTED and module == "self_attn.k_proj":
                data = _llama_cpp_permute(data, kv_heads)
        if gguf_arch == "gemma3" and name.endswith("norm.weight"):
            data = data + 1.0
        tensor_qtype = (qtypes or {}).get(gname.split(".")[-2], qtype)
        if gname.split(".")[-2] in ("ffn_gate_inp", "ffn_gate_inp_shexp"):
            tensor_qtype = "F32"              # llama.cpp keeps the routers in float
        quant = getattr(gguf.GGMLQuantizationType, tensor_qtype)
        if data.ndim >= 2 and tensor_qtype.endswith("_K"):
            from tests.quant_packers import k_quant_blocks

            rows = int(np.prod(data.shape[:-1]))
            blocks = k_quant_blocks((rows, data.shape[-1]), tensor_qtype, float(data.std()),
                                    len(gname))
            blocks = blocks.reshape(*data.shape[:-1], blocks.shape[-1])
            w.add_tensor(gname, blocks, raw_shape=blocks.shape, raw_dtype=quant)
        elif data.ndim >= 2 and quant != gguf.GGMLQuantizationType.F32:
            w.add_tensor(gname, gguf.quants.quantize(data, quant), raw_dtype=quant)
        else:
            w.add_tensor(gname, data)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


# ---------------------------------------------------------------- tiny encoders (embeddings)
WORDS = ["the", "a", "man", "is", "eating", "food", "bread", "riding", "horse", "piece", "of",
         "hello", "world", "machine", "learning", "fascinating", "##s", "##ing", ".", ",", "!"]


def write_wordpiece(path: str, specials: list[str], template: str) -> int:
    """A small WordPiece tokenizer.json whose post-processor adds `template`'s specials."""
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors

    vocab = {t: i for i, t in enumerate(specials + list("abcdefghijklmnopqrstuvwxyz") + WORDS)}
    unk = [s for s in specials if "unk" in s.lower()][0]
    tok = Tokenizer(models.WordPiece(vocab, unk_token=unk))
    tok.normalizer = normalizers.BertNormalizer(lowercase=True)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    first, last = template.split(" $A ")
    tok.post_processor = processors.TemplateProcessing(
        single=template, special_tokens=[(first, vocab[first]), (last, vocab[last])])
    tok.save(path)
    return len(vocab)


def write_st_files(folder: str, mode: str | None, normalize: bool) -> None:
    """sentence-transformers modules.json (+ 1_Pooling config); mode None = no ST files."""
    if mode is None:
        return
    st = "sentence_transformers.models."
    modules = [{"idx": 0, "name": "0", "path": "", "type": st + "Transformer"},
               {"idx": 1, "name": "1", "path": "1_Pooling", "type": st + "Pooling"}]
    if normalize:
        modules.append({"idx": 2, "name": "2", "path": "2_Normalize",
                        "type": "sentence_transformers.models.Normalize"})
    with open(os.path.join(folder, "modules.json"), "w") as f:
        json.dump(modules, f)
    os.makedirs(os.path.join(folder, "1_Pooling"), exist_ok=True)
    flags = {"pooling_mode_cls_token": mode == "cls", "pooling_mode_mean_tokens": mode == "mean",
             "pooling_mode_lasttoken": mode == "lasttoken", "pooling_mode_max_tokens": False}
    with open(os.path.join(folder, "1_Pooling", "config.json"), "w") as f:
        json.dump(flags, f)


def widen_init(model: torch.nn.Module) -> torch.nn.Module:
    """transformers' N(0, 0.02) init makes every token look alike; widen it."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() > 1:
                p.normal_(0.0, 0.2)
            elif "LayerNorm.weight" not in name:
                p.normal_(0.0, 0.1)
    return model


def make_tiny_encoder(folder: str, kind: str = "bert", st_mode: str | None = "mean",
                      normalize: bool = True, **config_extra) -> tuple[str, torch.nn.Module]:
    """A random 2-layer BERT or XLM-R saved with save_pretrained; returns (folder, HF model)."""
    import transformers

    os.makedirs(folder, exist_ok=True)
    if kind == "bert":
        specials, template, pad = ["[PAD]", "[UNK]", "[CLS]", "[SEP]"], "[CLS] $A [SEP]", 0
        cfg_cls, model_cls = transformers.BertConfig, transformers.BertModel
    else:
        specials, template, pad = ["<s>", "<pad>", "</s>", "<unk>"], "<s> $A </s>", 1
        cfg_cls, model_cls = transformers.XLMRobertaConfig, transformers.XLMRobertaModel
    vocab_size = write_wordpiece(os.path.join(folder, "tokenizer.json"), specials, template)
    cfg = cfg_cls(vocab_size=vocab_size, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                  intermediate_size=128, max_position_embeddings=40 if kind == "bert" else 42,
                  type_vocab_size=2 if kind == "bert" else 1, pad_token_id=pad, **config_extra)
    torch.manual_seed(0)
    model = widen_init(model_cls(cfg, add_pooling_layer=True).eval())
    model.save_pretrained(folder, safe_serialization=True)
    with open(os.path.join(folder, "tokenizer_config.json"), "w") as f:
        json.dump({"model_max_length": 512}, f)
    write_st_files(folder, st_mode, normalize)
    return folder, model
