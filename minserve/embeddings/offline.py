"""LLM.embed()'s work: prompts in the offline API's forms -> vLLM-shaped embedding outputs,
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
