"""How an embedding model turns per-token hidden states into one vector: the pooling mode and
normalization (read from sentence-transformers files, else per-architecture defaults), pooling over
a right-padded batch, and the `dimensions` rule (Matryoshka truncation + renormalization).

The `dimensions` rule (checked by check_dimensions, raised as EmbeddingsRequestError -> HTTP 400):
  * omitted, or equal to the model's full dimension: always fine;
  * < 1 or above the full dimension: error;
  * smaller than the full dimension: allowed only for Matryoshka models, i.e. config.json says
    `"is_matryoshka": true` or lists `"matryoshka_dimensions"` (then it must be one of them), or
    the model is a decoder-only embedding model (Qwen3-Embedding is trained that way), or the
    operator forces it (Embedder(matryoshka=True), as vLLM's --hf-overrides '{"is_matryoshka":
    true}'). Truncated vectors are L2-renormalized when the model normalizes.
"""
from __future__ import annotations

import itertools
import json
import os
from dataclasses import dataclass
from typing import Any

import torch

from minserve.config import ConfigError, read_json
from minserve.embeddings.protocol import EmbeddingsRequestError
from minserve.value_text import value_text

POOLING_MODES = ("mean", "cls", "lasttoken", "max", "mean_sqrt_len")
# sentence-transformers 1_Pooling/config.json flag -> our mode name
_ST_FLAGS = {
    "pooling_mode_mean_tokens": "mean",
    "pooling_mode_cls_token": "cls",
    "pooling_mode_lasttoken": "lasttoken",
    "pooling_mode_max_tokens": "max",
    "pooling_mode_mean_sqrt_len_tokens": "mean_sqrt_len",
    "pooling_mode_weightedmean_tokens": "weightedmean",
}
_ST_KNOWN_MODULES = ("Transformer", "Pooling", "Normalize")


@dataclass
class PoolingConfig:
    mode: str                   # one of POOLING_MODES
    normalize: bool             # L2-normalize the pooled vector
    matryoshka: bool            # `dimensions` below the full size is allowed
    matryoshka_dimensions: list[int] | None = None
    max_seq_length: int | None = None  # sentence_bert_config.json, when present
    source: str = "default"     # "sentence-transformers" or "default", for the startup log


def _read_json(path: str) -> Any:
    with open(path) as f:
        return json.load(f)


def _st_pooling_mode(cfg: dict[str, Any], path: str) -> str:
    if isinstance(cfg.get("pooling_mode"), str):      # newer single-key spelling
        spelled = cfg["pooling_mode"]
        mode = {"mean_tokens": "mean", "cls_token": "cls"}.get(spelled, spelled)
        modes = [mode]
    else:
        modes = [_ST_FLAGS[k] for k in _ST_FLAGS if cfg.get(k)]
    if len(modes) != 1 or modes[0] not in POOLING_MODES:
        raise ConfigError(f"{path}: pooling {modes or 'none'} is not supported "
                          f"(exactly one of {', '.join(POOLING_MODES)})")
    return modes[0]


def load_pooling_config(
    folder: str, hf_config: dict[str, Any], *, decoder: bool, matryoshka: bool | None = None,
) -> PoolingConfig:
    """Pooling for the model in `folder`. Defaults without sentence-transformers files: encoders
    pool the CLS token, decoder-only models the last token; both normalize (vLLM's defaults)."""
    mode, normalize, source = ("lasttoken" if decoder else "cls"), True, "default"
    modules_path = os.path.join(folder, "modules.json")
    if os.path.exists(modules_path):
        source, normalize = "sentence-transformers", False
        for module in _read_json(modules_path):
            kind = module.get("type", "").rsplit(".", 1)[-1]
            if kind not in _ST_KNOWN_MODULES:
                raise ConfigError(f"{modules_path}: sentence-transformers module {kind!r} is not "
                                  f"supported (only {', '.join(_ST_KNOWN_MODULES)})")
            if kind == "Normalize":
                normalize = True
            elif kind == "Pooling":
                pool_path = os.path.join(folder, module.get("path", ""), "config.json")
                mode = _st_pooling_mode(_read_json(pool_path), pool_path)
    max_seq_length = read_json(folder, "sentence_bert_config.json").get("max_seq_length")
    dims = hf_config.get("matryoshka_dimensions")
    if matryoshka is None:
        matryoshka = bool(hf_config.get("is_matryoshka")) or bool(dims) or decoder
    return PoolingConfig(mode=mode, normalize=normalize, matryoshka=matryoshka,
                         matryoshka_dimensions=list(dims) if dims else None,
                         max_seq_length=max_seq_length, source=source)


def check_dimensions(dimensions: int | None, full_dim: int, cfg: PoolingConfig,
                     model_name: str) -> None:
    """Raise EmbeddingsRequestError (400) when `dimensions` breaks the rule in the module doc."""
    if dimensions is None or dimensions == full_dim:
        return
    if isinstance(dimensions, bool) or not isinstance(dimensions, int) or dimensions < 1:
        raise EmbeddingsRequestError(
            f"dimensions must be a positive integer, got {value_text(dimensions)}",
                                     param="dimensions")
    if dimensions > full_dim:
        raise EmbeddingsRequestError(
            f"dimensions={dimensions} is larger than the {full_dim} dimensions of {model_name}",
            param="dimensions")
    if not cfg.matryoshka:
        raise EmbeddingsRequestError(
            f"Model {model_name} does not support matryoshka representation, so dimensions must be "
            f"{full_dim} or omitted (got {dimensions})", param="dimensions")
    if cfg.matryoshka_dimensions and dimensions not in cfg.matryoshka_dimensions:
        raise EmbeddingsRequestError(
            f"dimensions={dimensions} is not one of {model_name}'s matryoshka dimensions "
            f"{cfg.matryoshka_dimensions}", param="dimensions")


def pool_padded(hidden: torch.Tensor, attention_mask: torch.Tensor, mode: str) -> torch.Tensor:
    """hidden [B, L, H] over right-padded rows, attention_mask [B, L] (1 = token) -> [B, H] fp32:
    the rows' tokens packed back to back, then pool_packed."""
    lengths = attention_mask.sum(dim=1).tolist()
    return pool_packed(hidden[attention_mask.bool()], [0, *itertools.accumulate(lengths)], mode)


def finish_vectors(pooled: torch.Tensor, dimensions: int | None, normalize: bool) -> torch.Tensor:
    """Matryoshka truncation, then the model's normalization (so truncated vectors are unit)."""
    if dimensions is not None:
        pooled = pooled[:, :dimensions]
    if normalize:
        pooled = torch.nn.functional.normalize(pooled, p=2.0, dim=-1)
    return pooled


def pool_packed(hidden: torch.Tensor, query_start_loc: list[int], mode: str) -> torch.Tensor:
    """hidden [T, H] of sequences packed back to back (query_start_loc [R+1], host list) ->
    [R, H] fp32. Used for decoder-only models, whose forward takes one flat batch."""
    starts = torch.tensor(query_start_loc[:-1], device=hidden.device)
    ends = torch.tensor(query_start_loc[1:], device=hidden.device)
    if mode == "lasttoken":
        return hidden[ends - 1].float()
    if mode == "cls":
        return hidden[starts].float()
    lengths = ends - starts
    seq_ids = torch.repeat_interleave(torch.arange(len(lengths), device=hidden.device), lengths)
    if mode == "max":
        out = torch.full((len(lengths), hidden.shape[1]), float("-inf"), device=hidden.device)
        return out.index_reduce_(0, seq_ids, hidden.float(), "amax")
    summed = torch.zeros(len(lengths), hidden.shape[1], device=hidden.device)
    summed.index_add_(0, seq_ids, hidden.float())
    denom = lengths.to(torch.float32).unsqueeze(-1)
    if mode == "mean":
        return summed / denom
    if mode == "mean_sqrt_len":
        return summed / denom.sqrt()
    raise ValueError(f"unknown pooling mode {mode!r}")
