"""Relevance scores of text pairs, for /v1/score, /v1/rerank and LLM.score: a cross-encoder runs
each pair as one sequence and its logit goes through the model's activation; a bi-encoder embeds
each distinct text once and scores the cosine of the two vectors. prepare_scores (checks, tokens)
and finish_scores (numbers) bracket Embedder.pool_token_ids, so the service can batch one round's
score and embedding requests into the same forwards."""
from __future__ import annotations

from dataclasses import dataclass

import torch

from minserve.embeddings.protocol import EmbeddingsRequestError


@dataclass
class PreparedScores:
    """What one scoring request runs: token rows for pool_token_ids and how to read them back."""
    token_lists: list[list[int]]
    token_type_lists: list[list[int]] | None   # cross-encoder: one row per pair, with segments
    pair_rows: list[tuple[int, int]] | None    # bi-encoder: the rows of each pair's two texts

    @property
    def num_prompt_tokens(self) -> int:
        return sum(len(t) for t in self.token_lists)


def _too_long(emb, what: str, num_tokens: int) -> EmbeddingsRequestError:
    return EmbeddingsRequestError(
        f"This model's maximum context length is {emb.max_model_len} tokens. However, {what} "
        f"has {num_tokens} tokens. Shorten it, or set truncate_prompt_tokens (-1 truncates to "
        "the maximum).", param="truncate_prompt_tokens")


def prepare_scores(emb, pairs: list[tuple[str, str]], labels: list[str],
                   truncate_prompt_tokens: int | None = None) -> PreparedScores:
    """Pairs of texts (labels name each pair in errors, e.g. "documents[3] with the query")
    -> token rows; EmbeddingsRequestError (a 400) before anything runs."""
    limit = emb.truncation_limit(truncate_prompt_tokens)
    if emb.is_cross_encoder:
        if limit is not None and limit - emb.tokenizer.backend.num_special_tokens_to_add(True) < 2:
            raise EmbeddingsRequestError(
                f"truncate_prompt_tokens={truncate_prompt_tokens} leaves no room for two texts "
                "next to the pair's special tokens", param="truncate_prompt_tokens")
        encoded = emb.tokenizer.encode_pairs(pairs, limit)
        for label, (ids, _) in zip(labels, encoded, strict=True):
            if len(ids) > emb.max_model_len:
                raise _too_long(emb, f"the pair {label}", len(ids))
        return PreparedScores([ids for ids, _ in encoded], [t for _, t in encoded], None)
    texts = list(dict.fromkeys(t for p in pairs for t in p))     # each distinct text once
    row = {t: i for i, t in enumerate(texts)}
    token_lists = emb.tokenizer.encode_batch(texts, limit)
    for text, ids in zip(texts, token_lists, strict=True):
        if len(ids) > emb.max_model_len:
            label = next(f"the {'first' if text == a else 'second'} text of {lab}"
                         for (a, b), lab in zip(pairs, labels, strict=True) if text in (a, b))
            raise _too_long(emb, label, len(ids))
    return PreparedScores(token_lists, None, [(row[a], row[b]) for a, b in pairs])


def finish_scores(emb, prepared: PreparedScores, pooled: torch.Tensor) -> list[float]:
    """pooled: pool_token_ids' rows for prepared.token_lists -> one float score per pair."""
    if prepared.pair_rows is None:
        logits = pooled[:, 0]
        return (torch.sigmoid(logits) if emb.score_activation == "sigmoid" else logits).tolist()
    a = pooled[[i for i, _ in prepared.pair_rows]]
    b = pooled[[j for _, j in prepared.pair_rows]]
    return torch.nn.functional.cosine_similarity(a, b, dim=-1).tolist()
