"""Cross-encoders: BertForSequenceClassification (ms-marco MiniLM) and
XLMRobertaForSequenceClassification (BGE rerankers) in plain torch, over models/bert.py's encoder,
loaded by loader.py as every model is. A (query, document) pair goes in as one right-padded
sequence; one logit per label comes out. Turning logits into a relevance score (the activation)
is the caller's job (embeddings/scoring.py)."""
from __future__ import annotations

from typing import Any

import torch
from torch import nn

from minserve.config import ConfigError
from minserve.models.bert import BertModel, EncoderConfig, XLMRobertaModel, num_labels

# sentence-transformers' CrossEncoder names its activation by its torch class; these are the two
# its rerankers use. Unknown names are refused rather than guessed.
_ACTIVATIONS = {
    "torch.nn.modules.linear.Identity": "identity",
    "torch.nn.modules.activation.Sigmoid": "sigmoid",
    "torch.nn.Identity": "identity",
    "torch.nn.Sigmoid": "sigmoid",
}


def score_activation(hf: dict[str, Any]) -> str:
    """"sigmoid" or "identity", as sentence-transformers' CrossEncoder.predict applies it: the
    config's own choice (sbert_ce_default_activation_function, or sentence_transformers.
    activation_fn in newer saves), else sigmoid for one label (vLLM's rule too)."""
    st = hf.get("sentence_transformers")
    name = hf.get("sbert_ce_default_activation_function") or (
        st.get("activation_fn") if isinstance(st, dict) else None)
    if name is None:
        return "sigmoid" if num_labels(hf) == 1 else "identity"
    if name not in _ACTIVATIONS:
        raise ConfigError(f"cross-encoder activation {name!r} is not supported "
                          f"({', '.join(sorted(set(_ACTIVATIONS)))})")
    return _ACTIVATIONS[name]


class _BertHead(nn.Module):
    """BERT: tanh(pooler(hidden[CLS])) -> classifier."""

    def __init__(self, hidden: int, labels: int) -> None:
        super().__init__()
        self.pooler = nn.Linear(hidden, hidden)
        self.classifier = nn.Linear(hidden, labels)

    def forward(self, cls: torch.Tensor) -> torch.Tensor:
        return self.classifier(torch.tanh(self.pooler(cls)))


class _RobertaHead(nn.Module):
    """RoBERTa's RobertaClassificationHead: out_proj(tanh(dense(hidden[<s>])))."""

    def __init__(self, hidden: int, labels: int) -> None:
        super().__init__()
        self.dense = nn.Linear(hidden, hidden)
        self.out_proj = nn.Linear(hidden, labels)

    def forward(self, cls: torch.Tensor) -> torch.Tensor:
        return self.out_proj(torch.tanh(self.dense(cls)))


class CrossEncoder(nn.Module):
    """forward(input_ids [B, L], attention_mask [B, L], token_type_ids [B, L] | None) ->
    logits [B, num_labels] (float32)."""

    config_class = EncoderConfig
    packed_modules_mapping = BertModel.packed_modules_mapping

    def __init__(self, cfg: EncoderConfig) -> None:
        super().__init__()
        self.config = cfg
        self.num_labels = labels = cfg.num_labels
        self.encoder = (XLMRobertaModel if cfg.roberta_positions else BertModel)(cfg)
        head = _RobertaHead if cfg.roberta_positions else _BertHead
        self.head = head(cfg.hidden_size, labels)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                token_type_ids: torch.Tensor | None = None) -> torch.Tensor:
        if self.config.type_vocab_size < 2:
            token_type_ids = None   # XLM-R has one segment type: every token is type 0
        hidden = self.encoder(input_ids, attention_mask, token_type_ids)
        return self.head(hidden[:, 0]).float()

    def map_weight_name(self, name: str) -> str | None:
        head = _head_name(name)
        if head is not None:
            return head
        ours = self.encoder.map_weight_name(name)   # the encoder's own names
        return None if ours is None else "encoder." + ours


def _head_name(name: str) -> str | None:
    """HF head tensor name -> ours under `head.`, or None for an encoder tensor."""
    for prefix in ("bert.", "roberta."):
        if name.startswith(prefix + "pooler.dense."):
            return "head.pooler." + name[len(prefix + "pooler.dense."):]
    if name.startswith("classifier."):
        rest = name[len("classifier."):]
        if rest.startswith(("dense.", "out_proj.")):     # RobertaClassificationHead
            return "head." + rest
        return "head.classifier." + rest                 # BERT: one Linear
    return None

