"""BERT-family encoders (BertModel: all-MiniLM, bge-*; XLMRobertaModel/RobertaModel: bge-m3,
multilingual-e5) in plain torch over a right-padded batch, and the checkpoint names they load
from (through loader.py, as every model does). Returns per-token hidden states only; pooling and
normalization live in embeddings/pooling.py."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from minserve.config import ConfigError
from minserve.models.linear import ColumnParallelLinear, QKVParallelLinear, RowParallelLinear
from minserve.models.linear import VocabParallelEmbedding as Embedding

_ACTIVATIONS = {
    "gelu": lambda x: F.gelu(x),                      # exact erf, as HF's "gelu"
    "gelu_new": lambda x: F.gelu(x, approximate="tanh"),
    "gelu_pytorch_tanh": lambda x: F.gelu(x, approximate="tanh"),
    "relu": F.relu,
    "silu": F.silu,
}


@dataclass
class EncoderConfig:
    architecture: str
    vocab_size: int
    hidden_size: int
    num_hidden_layers: int
    num_attention_heads: int
    intermediate_size: int
    hidden_act: str = "gelu"
    max_position_embeddings: int = 512
    type_vocab_size: int = 2
    layer_norm_eps: float = 1e-12
    pad_token_id: int = 0
    # RoBERTa numbers positions from pad_token_id + 1 (fairseq); BERT from 0.
    roberta_positions: bool = False
    num_labels: int = 2      # a cross-encoder's logits per pair

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> EncoderConfig:
        arch = (d.get("architectures") or ["BertModel"])[0]
        pos_type = d.get("position_embedding_type", "absolute")
        if pos_type != "absolute":
            raise ConfigError(
                f"position_embedding_type={pos_type!r} is not supported (absolute only)")
        act = d.get("hidden_act", "gelu")
        if act not in _ACTIVATIONS:
            raise ConfigError(f"hidden_act={act!r} is not supported ({sorted(_ACTIVATIONS)})")
        if d["hidden_size"] % d["num_attention_heads"]:
            raise ConfigError("hidden_size must be a multiple of num_attention_heads")
        return cls(
            architecture=arch, vocab_size=int(d["vocab_size"]),
            hidden_size=int(d["hidden_size"]), num_hidden_layers=int(d["num_hidden_layers"]),
            num_attention_heads=int(d["num_attention_heads"]),
            intermediate_size=int(d["intermediate_size"]), hidden_act=act,
            max_position_embeddings=int(d.get("max_position_embeddings", 512)),
            type_vocab_size=int(d.get("type_vocab_size", 2)),
            layer_norm_eps=float(d.get("layer_norm_eps", 1e-12)),
            pad_token_id=int(d.get("pad_token_id") or 0), roberta_positions="Roberta" in arch,
            num_labels=num_labels(d))

    @property
    def max_tokens(self) -> int:
        """Longest input the position table can hold (RoBERTa loses pad_token_id + 1 slots)."""
        if self.roberta_positions:
            return self.max_position_embeddings - self.pad_token_id - 1
        return self.max_position_embeddings


def num_labels(hf: dict[str, Any]) -> int:
    if "num_labels" in hf:
        return int(hf["num_labels"])
    return len(hf.get("id2label") or {0: "LABEL_0", 1: "LABEL_1"})   # transformers' default: 2


class BertEmbeddings(nn.Module):
    def __init__(self, cfg: EncoderConfig):
        super().__init__()
        self.word_embeddings = Embedding(cfg.vocab_size, cfg.hidden_size)
        self.position_embeddings = Embedding(cfg.max_position_embeddings, cfg.hidden_size)
        self.token_type_embeddings = Embedding(cfg.type_vocab_size, cfg.hidden_size)
        self.LayerNorm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.roberta_positions = cfg.roberta_positions
        self.pad_token_id = cfg.pad_token_id

    def forward(self, input_ids: torch.Tensor, token_type_ids: torch.Tensor | None) -> torch.Tensor:
        if self.roberta_positions:
            # fairseq make_positions, as HF: pad tokens sit at pad_token_id, the rest count up
            # from pad_token_id + 1 (keyed on the token id, not on the attention mask).
            not_pad = input_ids.ne(self.pad_token_id).int()
            positions = torch.cumsum(not_pad, dim=1) * not_pad + self.pad_token_id
        else:
            positions = torch.arange(input_ids.shape[1], device=input_ids.device)[None, :]
        if token_type_ids is None:
            # every input is a single segment: type 0 is the same row for all tokens
            type_emb = self.token_type_embeddings.weight[0]
        else:
            type_emb = self.token_type_embeddings(token_type_ids)
        x = self.word_embeddings(input_ids) + self.position_embeddings(positions) + type_emb
        return self.LayerNorm(x)


class BertLayer(nn.Module):
    """Post-LN: x = LN(x + attn(x)); x = LN(x + ffn(x)). q/k/v are fused into one matmul."""

    def __init__(self, cfg: EncoderConfig):
        super().__init__()
        h = cfg.hidden_size
        self.num_heads = cfg.num_attention_heads
        self.head_dim = h // cfg.num_attention_heads
        self.qkv_proj = QKVParallelLinear(h, self.head_dim, self.num_heads, self.num_heads)
        self.attn_out = RowParallelLinear(h, h)
        self.attn_norm = nn.LayerNorm(h, eps=cfg.layer_norm_eps)
        self.ffn_in = ColumnParallelLinear(h, cfg.intermediate_size)
        self.ffn_out = RowParallelLinear(cfg.intermediate_size, h)
        self.ffn_norm = nn.LayerNorm(h, eps=cfg.layer_norm_eps)
        self.act = _ACTIVATIONS[cfg.hidden_act]

    def forward(self, x: torch.Tensor, attn_bias: torch.Tensor | None) -> torch.Tensor:
        b, seq_len, h = x.shape
        qkv = self.qkv_proj(x).view(b, seq_len, 3, self.num_heads, self.head_dim)
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)          # each [B, H, L, D]
        o = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_bias)
        o = o.transpose(1, 2).reshape(b, seq_len, h)
        x = self.attn_norm(x + self.attn_out(o))
        return self.ffn_norm(x + self.ffn_out(self.act(self.ffn_in(x))))


class BertModel(nn.Module):
    """forward(input_ids [B, L], attention_mask [B, L] (1 = token, 0 = right padding)) ->
    hidden [B, L, hidden]. Rows of padding positions hold garbage; pooling masks them out."""

    config_class = EncoderConfig
    # HF's attention.self.query/key/value (after map_weight_name) -> the fused q|k|v projection.
    packed_modules_mapping = {"query": ("qkv_proj", "q"), "key": ("qkv_proj", "k"),
                              "value": ("qkv_proj", "v")}

    def __init__(self, cfg: EncoderConfig):
        super().__init__()
        self.config = cfg
        self.embeddings = BertEmbeddings(cfg)
        self.layers = nn.ModuleList(BertLayer(cfg) for _ in range(cfg.num_hidden_layers))

    def forward(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor,
        token_type_ids: torch.Tensor | None = None,
    ) -> torch.Tensor:
        x = self.embeddings(input_ids, token_type_ids)
        attn_bias = None
        if not bool(attention_mask.all()):
            # additive key mask [B, 1, 1, L]: padded keys get the dtype's min (not -inf, so a
            # fully padded row cannot turn into NaN)
            attn_bias = torch.zeros(attention_mask.shape, dtype=x.dtype, device=x.device)
            attn_bias.masked_fill_(attention_mask == 0, torch.finfo(x.dtype).min)
            attn_bias = attn_bias[:, None, None, :]
        for layer in self.layers:
            x = layer(x, attn_bias)
        return x

    def map_weight_name(self, name: str) -> str | None:
        return _rename(name)


class XLMRobertaModel(BertModel):
    """Same layers; differs only in position numbering (EncoderConfig.roberta_positions)."""


# HF checkpoint name (after the encoder.layer.N. prefix) -> our per-layer module name.
_LAYER_RENAMES = {
    "attention.self.query": "query",      # these three: packed_modules_mapping -> qkv_proj
    "attention.self.key": "key", "attention.self.value": "value",
    "attention.output.dense": "attn_out", "attention.output.LayerNorm": "attn_norm",
    "intermediate.dense": "ffn_in", "output.dense": "ffn_out", "output.LayerNorm": "ffn_norm",
}
_PREFIXES = ("bert.", "roberta.", "model.")
_SKIP = ("pooler.", "cls.", "lm_head.", "embeddings.position_ids", "embeddings.token_type_ids")


def _rename(name: str) -> str | None:
    """HF name -> our name, or None for weights we drop (pooler, MLM head, buffers)."""
    for p in _PREFIXES:
        if name.startswith(p):
            name = name[len(p):]
            break
    if name.startswith(_SKIP):
        return None
    name = name.replace(".gamma", ".weight").replace(".beta", ".bias")  # pre-2019 checkpoints
    if name.startswith("encoder.layer."):
        idx, rest = name[len("encoder.layer."):].split(".", 1)
        module, param = rest.rsplit(".", 1)
        if module not in _LAYER_RENAMES:
            raise ConfigError(f"unexpected encoder weight {name}")
        return f"layers.{idx}.{_LAYER_RENAMES[module]}.{param}"
    return name

