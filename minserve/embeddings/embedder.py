"""Embedder: an embedding model (BERT/XLM-R encoder, or a Llama-family decoder with last-token
pooling) + its tokenizer + pooling, behind embed(inputs) -> (float32 vectors, num_prompt_tokens).
Synchronous and single-threaded; service.py batches concurrent callers onto it."""
from __future__ import annotations

import dataclasses
import itertools
import os
from functools import cached_property
from typing import Any

import numpy as np
import torch

from minserve.config import ConfigError, EngineConfig, ModelConfig, read_json
from minserve.embeddings.decoder import DecoderForward, ShardedDecoder, check_shardable
from minserve.embeddings.models import _progress, resolve_embedding_model
from minserve.embeddings.pooling import (
    check_dimensions,
    finish_vectors,
    load_pooling_config,
    pool_packed,
    pool_padded,
)
from minserve.embeddings.protocol import EmbeddingsRequestError
from minserve.engine.builder import build_model, find_model, resolve_device, resolve_dtype
from minserve.models.cross_encoder import score_activation
from minserve.protocol import prompt_chars_limit
from minserve.value_text import value_text

# Texts are tokenized this many at a time, each group checked before the next: an over-long
# input is refused after at most one group's work (2,048 inputs of ~5,000 tokens each took
# 10.7 s and +1.2 GB to tokenize, only to be refused).
_ENCODE_GROUP = 64


class _EmbeddingTokenizer:
    """tokenizers.Tokenizer with tokenizer.json's own padding/truncation switched off (all-MiniLM's
    pads and cuts to 128; sentence-transformers ignores that too) and truncation that keeps the
    special tokens: cut the content, then add the specials."""

    def __init__(self, folder: str) -> None:
        from tokenizers import Tokenizer

        path = os.path.join(folder, "tokenizer.json")
        if not os.path.isfile(path):
            raise ConfigError(f"{folder} has no tokenizer.json (a fast tokenizer is required)")
        self.backend = Tokenizer.from_file(path)
        self.backend.no_padding()
        self.backend.no_truncation()
        tc = read_json(folder, "tokenizer_config.json")
        # transformers rebuilds the post-processor as "[bos] $A [eos]" when tokenizer_config sets
        # add_bos_token/add_eos_token (Llama tokenizers); minserve.tokenizer does the same.
        self.manual = "add_bos_token" in tc or "add_eos_token" in tc
        self.prefix = self._special(tc, "bos_token") if tc.get("add_bos_token") else []
        self.suffix = self._special(tc, "eos_token") if tc.get("add_eos_token") else []
        self.num_added = (len(self.prefix) + len(self.suffix) if self.manual
                          else self.backend.num_special_tokens_to_add(False))

    def _special(self, tc: dict[str, Any], key: str) -> list[int]:
        token = tc.get(key)
        token = token.get("content") if isinstance(token, dict) else token
        tid = self.backend.token_to_id(token) if isinstance(token, str) else None
        return [] if tid is None else [tid]

    @cached_property
    def max_token_chars(self) -> int:
        """The longest vocabulary string: at least as many characters as any token stands for
        (its "##"/"Ġ"/"▁" markers only make it longer), so a text of C characters needs at
        least C / this many tokens."""
        return max(map(len, self.backend.get_vocab()), default=1) or 1

    def encode_batch(self, texts: list[str], max_len: int | None) -> list[list[int]]:
        out = []
        for enc in self.backend.encode_batch(texts, add_special_tokens=False):
            if max_len is not None and len(enc) + self.num_added > max_len:
                enc.truncate(max_len - self.num_added)
            if self.manual:
                out.append(self.prefix + enc.ids + self.suffix)
            else:
                out.append(self.backend.post_process(enc).ids)
        return out

    def encode_pairs(self, pairs: list[tuple[str, str]], max_len: int | None
                     ) -> list[tuple[list[int], list[int]]]:
        """(text, text) pairs -> (ids, token type ids) through the tokenizer's pair template
        ([CLS] a [SEP] b [SEP]; <s> a </s></s> b </s>). Over max_len, the longer text loses
        tokens first (transformers' "longest_first"); the special tokens always stay."""
        flat = self.backend.encode_batch([t for p in pairs for t in p], add_special_tokens=False)
        budget = None if max_len is None else max_len - self.backend.num_special_tokens_to_add(True)
        out = []
        for a, b in zip(flat[::2], flat[1::2], strict=True):
            if budget is not None and len(a) + len(b) > budget:
                len_a, len_b = _longest_first(len(a), len(b), max(budget, 0))
                a.truncate(len_a)
                b.truncate(len_b)
            enc = self.backend.post_process(a, b)
            out.append((enc.ids, enc.type_ids))
        return out


def _longest_first(len_a: int, len_b: int, budget: int) -> tuple[int, int]:
    """The lengths the tokenizers library's "longest_first" pair truncation keeps (what
    transformers' fast tokenizers, and so sentence-transformers, do): the shorter text stays
    whole if the longer can still have the rest; otherwise they split the budget, the second
    text taking the odd token."""
    if len_a + len_b <= budget:
        return len_a, len_b
    short = min(len_a, len_b)
    keep_short, keep_long = short, (max(short, budget - short) if short <= budget else short)
    if keep_short + keep_long > budget:
        keep_short, keep_long = budget // 2, budget // 2 + budget % 2
    if len_a > len_b:            # a is the longer one
        return min(len_a, keep_long), min(len_b, keep_short)
    return min(len_a, keep_short), min(len_b, keep_long)


class Embedder:
    """Embedder("all-minilm-l6-v2").embed(["a", "b"]) -> ([np.float32 vector, ...], num_tokens).

    max_batch_tokens bounds one forward's padded token count (encoders) or packed token count
    (decoders); lists are sorted by length and split. For encoders, max_padding also bounds the
    padded share of a forward (default 0.1 on CPU, where compute grows with padded tokens; 1.0,
    i.e. off, on GPU, where fewer larger launches pay more). matryoshka=True/False overrides the
    model's `dimensions` support (see pooling.py for the rule)."""

    def __init__(self, model: str = "all-minilm-l6-v2", dtype: str = "auto", device: str = "auto",
                 max_batch_tokens: int = 16384, *, max_padding: float | None = None,
                 max_model_len: int | None = None,
                 matryoshka: bool | None = None, served_model_name: str | None = None,
                 tensor_parallel_size: int = 1, beside_tensor_parallel: bool = False) -> None:
        self.model_path = resolve_embedding_model(model)
        self.model_name = served_model_name or model
        dev = resolve_device(device)
        config = EngineConfig(model=self.model_path, dtype=dtype, device=device,
                              tensor_parallel_size=tensor_parallel_size)
        source = find_model(config, dev, task="embed")
        hf = source.hf_config
        self.is_cross_encoder = source.arch.task == "score"
        self.is_decoder = isinstance(source.model_config, ModelConfig)
        # cross-encoders: "sigmoid" | "identity" on their logit (scoring.py); None otherwise
        self.score_activation = score_activation(hf) if self.is_cross_encoder else None
        self.device, self.dtype = dev, resolve_dtype(dtype, dev, source)
        self.max_batch_tokens = max_batch_tokens
        self.max_padding = (max_padding if max_padding is not None
                            else (0.1 if self.device.type == "cpu" else 1.0))
        self.pooling = load_pooling_config(self.model_path, hf, decoder=self.is_decoder,
                                           matryoshka=matryoshka)
        check_shardable(source.arch, tensor_parallel_size, self.is_decoder, self.model_name,
                        beside_tensor_parallel)
        cfg = self.model_config = source.model_config   # .architecture, for the server log
        self.sharded: ShardedDecoder | None = None
        if self.is_decoder and tensor_parallel_size > 1:
            # the ranks take the device type and dtype this rank resolved
            config = dataclasses.replace(config, device=dev.type,
                                         dtype=str(self.dtype).removeprefix("torch."))
            self.sharded = ShardedDecoder(config, source, dev)
            self.device, self.decoder = self.sharded.device, self.sharded.local
            self.model = self.decoder.model
        else:
            self.model = build_model(config, source, dev).model
            self.decoder = DecoderForward(self.model, cfg, dev, self.dtype) \
                if self.is_decoder else None
        self.vocab_size = cfg.vocab_size
        if self.is_decoder:
            self.dimension = cfg.hidden_size
            position_limit, self.pad_token_id = cfg.max_position_embeddings, 0
        else:
            # a cross-encoder's "vector" is its row of label logits
            self.dimension = self.model.num_labels if self.is_cross_encoder else cfg.hidden_size
            position_limit, self.pad_token_id = cfg.max_tokens, cfg.pad_token_id
            if self.is_cross_encoder and self.dimension != 1:
                raise ConfigError(f"{self.model_name} has {self.dimension} labels: a reranker "
                                  "(one relevance logit per pair) needs num_labels = 1")
        limit = min(position_limit, self.pooling.max_seq_length or position_limit)
        if max_model_len is not None and max_model_len > position_limit:
            raise ConfigError(f"max_model_len={max_model_len} exceeds the {position_limit} "
                              f"positions of {self.model_name}")
        self.max_model_len = max_model_len or limit
        self.tokenizer = _EmbeddingTokenizer(self.model_path)
        _progress(f"embedding model {self.model_name}: {source.arch.name}, {self._kind()}, "
                  f"max_model_len {self.max_model_len}, {self.dtype} on {self.device}")

    def _kind(self) -> str:
        if self.is_cross_encoder:
            return f"cross-encoder, {self.dimension} label(s), {self.score_activation} score"
        return (f"dim {self.dimension}, {self.pooling.mode} pooling ({self.pooling.source}), "
                f"normalize={self.pooling.normalize}")

    def shutdown(self) -> None:
        """Stop the tensor-parallel ranks (a no-op on one process)."""
        if self.sharded is not None:
            self.sharded.shutdown()
            self.sharded = None

    # ------------------------------------------------------------------ public API

    def embed(self, inputs: list[str | list[int]] | str, truncate_prompt_tokens: int | None = None,
              dimensions: int | None = None) -> tuple[list[np.ndarray], int]:
        """Strings are tokenized (with the model's special tokens); token-id lists are used as
        given. Returns one float32 vector per input, in order, and the prompt token count."""
        if isinstance(inputs, str):
            inputs = [inputs]
        token_lists = self.prepare(inputs, truncate_prompt_tokens, dimensions)
        pooled = self.pool_token_ids(token_lists)
        return self.finish(pooled, dimensions), sum(len(t) for t in token_lists)

    def prepare(self, inputs: list[str | list[int]], truncate_prompt_tokens: int | None = None,
                dimensions: int | None = None) -> list[list[int]]:
        """One request's checks against this model (`dimensions`, lengths, token ids) and its
        token ids; EmbeddingsRequestError (a 400) before any forward runs."""
        if self.is_cross_encoder:
            raise EmbeddingsRequestError(
                f"{self.model_name} is a cross-encoder: it scores text pairs on /v1/score and "
                "/v1/rerank, and makes no embeddings", param="model")
        check_dimensions(dimensions, self.dimension, self.pooling, self.model_name)
        return self.tokenize(inputs, truncate_prompt_tokens)

    def tokenize(self, inputs: list[str | list[int]],
                 truncate_prompt_tokens: int | None = None) -> list[list[int]]:
        """Inputs -> token ids within max_model_len. Over-long inputs raise EmbeddingsRequestError
        (a ValueError) unless truncate_prompt_tokens asks to keep the first k tokens (-1: k =
        max_model_len; for text the special tokens are kept and count towards k)."""
        limit = self.truncation_limit(truncate_prompt_tokens)
        texts = [(i, x) for i, x in enumerate(inputs) if isinstance(x, str)]
        out: list[list[int] | None] = [None] * len(inputs)
        for i, x in enumerate(inputs):
            if not isinstance(x, str):
                out[i] = self._check_token_ids(i, x)[:limit]  # [:None] keeps all
                self._check_length(i, out[i])
        if limit is None:  # a text too long to fit whatever it tokenizes to: refused untouched
            max_chars = prompt_chars_limit(self.max_model_len, self.tokenizer.max_token_chars)
            for i, text in texts:
                if len(text) > max_chars:
                    raise EmbeddingsRequestError(
                        f"This model's maximum context length is {self.max_model_len} tokens. "
                        f"However, input[{i}] has {len(text)} characters, far more than fit. "
                        "Shorten the input, or set truncate_prompt_tokens (-1 truncates to the "
                        "maximum).", param="input")
        for start in range(0, len(texts), _ENCODE_GROUP):
            group = texts[start:start + _ENCODE_GROUP]
            encoded = self.tokenizer.encode_batch([t for _, t in group], limit)
            for (i, _), ids in zip(group, encoded, strict=True):
                self._check_length(i, ids)
                out[i] = ids
        return out  # type: ignore[return-value]

    def _check_length(self, i: int, ids: list[int]) -> None:
        if not ids:
            raise EmbeddingsRequestError(f"input[{i}] has no tokens", param="input")
        if len(ids) > self.max_model_len:
            raise EmbeddingsRequestError(
                f"This model's maximum context length is {self.max_model_len} tokens. However, "
                f"input[{i}] has {len(ids)} tokens. Shorten the input, or set "
                "truncate_prompt_tokens (-1 truncates to the maximum).", param="input")

    def truncation_limit(self, k: int | None) -> int | None:
        if k is None:
            return None
        if isinstance(k, bool) or not isinstance(k, int) or (k < 1 and k != -1):
            raise EmbeddingsRequestError("truncate_prompt_tokens must be a positive integer or -1",
                                         param="truncate_prompt_tokens")
        if k > self.max_model_len:
            raise EmbeddingsRequestError(
                f"truncate_prompt_tokens={k} is larger than max_model_len={self.max_model_len}",
                param="truncate_prompt_tokens")
        k = self.max_model_len if k == -1 else k
        if k <= self.tokenizer.num_added:
            raise EmbeddingsRequestError(
                f"truncate_prompt_tokens={k} leaves no room for text next to the model's "
                f"{self.tokenizer.num_added} special tokens", param="truncate_prompt_tokens")
        return k

    def _check_token_ids(self, i: int, ids: Any) -> list[int]:
        if not isinstance(ids, list) or not ids:
            raise EmbeddingsRequestError(f"input[{i}] must be a non-empty string or token id list",
                                         param="input")
        for t in ids:
            if isinstance(t, bool) or not isinstance(t, int) or not 0 <= t < self.vocab_size:
                raise EmbeddingsRequestError(
                    f"input[{i}] holds token id {value_text(t)}, outside the vocabulary [0, "
                    f"{self.vocab_size})", param="input")
        return ids

    @torch.inference_mode()
    def pool_token_ids(self, token_lists: list[list[int]],
                       token_type_lists: list[list[int]] | None = None) -> torch.Tensor:
        """Pooled (not yet normalized) float32 [N, dim] on the CPU, in input order (for a
        cross-encoder: its logits [N, num_labels], token_type_lists marking each pair's second
        text). Inputs are sorted longest first so each forward pads little, and split to fit
        max_batch_tokens."""
        n = len(token_lists)
        out = torch.empty(n, self.dimension, dtype=torch.float32)
        order = sorted(range(n), key=lambda i: -len(token_lists[i]))
        start = 0
        while start < n:
            longest = len(token_lists[order[start]])
            if self.is_decoder:    # packed: the budget counts real tokens
                end, total = start + 1, longest
                while end < n and total + len(token_lists[order[end]]) <= self.max_batch_tokens:
                    total += len(token_lists[order[end]])
                    end += 1
            else:                  # padded: every row costs the longest row
                end = _padded_chunk_end(order, token_lists, start, self.max_batch_tokens,
                                        self.max_padding)
            batch = order[start:end]
            rows = [token_lists[i] for i in batch]
            if self.is_decoder:
                pooled = self._forward_decoder(rows)
            else:
                types = None if token_type_lists is None else [token_type_lists[i] for i in batch]
                pooled = self._forward_encoder(rows, types)
            out[torch.tensor(batch)] = pooled.cpu()
            start = end
        return out

    def finish(self, pooled: torch.Tensor, dimensions: int | None) -> list[np.ndarray]:
        """Matryoshka truncation + normalization -> one float32 numpy vector per row."""
        vectors = finish_vectors(pooled, dimensions, self.pooling.normalize)
        return list(vectors.numpy())

    # ------------------------------------------------------------------ forwards

    def _forward_encoder(self, rows: list[list[int]],
                         types: list[list[int]] | None = None) -> torch.Tensor:
        width = max(len(r) for r in rows)
        pad = self.pad_token_id
        ids = torch.tensor([r + [pad] * (width - len(r)) for r in rows], dtype=torch.long)
        mask = torch.tensor([[1] * len(r) + [0] * (width - len(r)) for r in rows], dtype=torch.long)
        ids, mask = ids.to(self.device), mask.to(self.device)
        if self.is_cross_encoder:
            type_ids = None if types is None else torch.tensor(
                [t + [0] * (width - len(t)) for t in types], dtype=torch.long, device=self.device)
            return self.model(ids, mask, type_ids)
        hidden = self.model(ids, mask)
        return pool_padded(hidden, mask, self.pooling.mode)

    def _forward_decoder(self, rows: list[list[int]]) -> torch.Tensor:
        hidden = (self.sharded or self.decoder).hidden(rows)
        return pool_packed(hidden, [0, *itertools.accumulate(map(len, rows))], self.pooling.mode)


def _padded_chunk_end(order: list[int], token_lists: list[list[int]], start: int,
                      max_batch_tokens: int, max_padding: float) -> int:
    """End of the padded forward that starts at order[start] (rows sorted longest first): add
    rows while the padded size fits max_batch_tokens and padding stays within max_padding of it.
    Mixed lengths (a 7-token query beside a 160-token passage) otherwise spend most of a batched
    forward on padding: measured 1.5x slower than batch-1 calls on a CPU (bench/RESULTS.md)."""
    longest = len(token_lists[order[start]])
    end, real = start + 1, longest
    while end < len(order):
        rows, nxt = end - start + 1, len(token_lists[order[end]])
        if rows * longest > max_batch_tokens or real + nxt < (1 - max_padding) * rows * longest:
            break
        real += nxt
        end += 1
    return end
