"""LLM.embed() and LLM.score()'s work: prompts in the offline API's forms -> vLLM-shaped outputs,
through one Embedder (no server, no worker thread)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any


@dataclass
class EmbeddingOutput:
    embedding: list[float]


@dataclass
class EmbeddingRequestOutput:
    """vLLM's shape: .prompt, .prompt_token_ids, .outputs.embedding."""
    prompt: str | None
    prompt_token_ids: list[int]
    outputs: EmbeddingOutput


def embed_prompts(embedder: Any, prompts: Any, truncate_prompt_tokens: int | None = None,
                  dimensions: int | None = None) -> list[EmbeddingRequestOutput]:
    """A string, a token-id list, a {"prompt"} / {"prompt_token_ids"} dict, or a list of those
    -> one output per prompt, in order (the Embedder sorts by length and batches inside)."""
    if isinstance(prompts, (str, dict)) or (
            isinstance(prompts, list) and prompts and isinstance(prompts[0], int)):
        prompts = [prompts]
    texts: list[str | None] = []
    inputs: list[str | list[int]] = []
    for p in prompts:
        if isinstance(p, dict):
            p = p["prompt_token_ids"] if "prompt_token_ids" in p else p["prompt"]
        texts.append(p if isinstance(p, str) else None)
        inputs.append(p)
    token_lists = embedder.prepare(inputs, truncate_prompt_tokens, dimensions)
    vectors = embedder.finish(embedder.pool_token_ids(token_lists), dimensions)
    return [EmbeddingRequestOutput(t, ids, EmbeddingOutput(v.tolist()))
            for t, ids, v in zip(texts, token_lists, vectors, strict=True)]


@dataclass
class ScoringOutput:
    score: float


@dataclass
class ScoringRequestOutput:
    """vLLM's shape: .prompt_token_ids (the pair's tokens for a cross-encoder), .outputs.score."""
    prompt_token_ids: list[int]
    outputs: ScoringOutput


def score_prompts(embedder: Any, data_1: Any, data_2: Any,
                  truncate_prompt_tokens: int | None = None) -> list[ScoringRequestOutput]:
    """text_1/text_2 as /v1/score takes them (one to one, one to many, pairwise), parsed by the
    same code; one output per pair, in order."""
    from minserve.embeddings.score_protocol import parse_score_request
    from minserve.embeddings.scoring import finish_scores, prepare_scores

    req = parse_score_request({"text_1": data_1, "text_2": data_2,
                               "truncate_prompt_tokens": truncate_prompt_tokens})
    prepared = prepare_scores(embedder, req.pairs, req.labels, req.truncate_prompt_tokens)
    pooled = embedder.pool_token_ids(prepared.token_lists, prepared.token_type_lists)
    scores = finish_scores(embedder, prepared, pooled)
    if prepared.pair_rows is None:
        ids = prepared.token_lists
    else:
        ids = [prepared.token_lists[i] + prepared.token_lists[j] for i, j in prepared.pair_rows]
    return [ScoringRequestOutput(t, ScoringOutput(s)) for t, s in zip(ids, scores, strict=True)]
