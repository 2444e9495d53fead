"""Test helpers for the model tests: load our model and transformers' reference from one folder,
a hand-rolled paged runner (block tables, slot mapping, AttnMetadata built by hand) so the
models are tested without the engine, and the logits checks the model tests share (whole
prefill, token-by-token decode, chunked prefill against transformers)."""
from __future__ import annotations

import json
import os
import random

import torch
from minserve.kernels import AttnMetadata

from minserve.config import ModelConfig
from minserve.models.loader import load_model
from minserve.models.registry import lookup


def load_ours(folder: str, dtype: torch.dtype = torch.float32, load_format: str = "auto",
              quantization: str | None = None, expert_parallel: bool = False):
    with open(os.path.join(folder, "config.json")) as f:
        hf = json.load(f)
    # the model class's own config class, as the builder reads it (gpt-oss: GptOssConfig)
    arch = lookup((hf.get("architectures") or ["LlamaForCausalLM"])[0])
    config = getattr(arch.model_class(), "config_class", ModelConfig).from_dict(hf)
    if expert_parallel:      # --enable-expert-parallel (a mixture-of-experts model)
        config.moe.expert_parallel = True
    return load_model(folder, config, "cpu", dtype, load_format, quantization=quantization)


def load_pooling_model(folder: str) -> torch.nn.Module:
    """An embedding or scoring model (an encoder, a cross-encoder), float32 on the CPU, built as
    the Embedder builds it."""
    from minserve.config import EngineConfig
    from minserve.engine.builder import build_model, find_model

    config, cpu = EngineConfig(model=folder, device="cpu", dtype="float32"), torch.device("cpu")
    return build_model(config, find_model(config, cpu, task="embed"), cpu).model


def load_hf(folder: str, dtype: torch.dtype = torch.float32):
    import transformers

    return transformers.AutoModelForCausalLM.from_pretrained(
        folder, dtype=dtype, attn_implementation="eager").eval()


@torch.inference_mode()
def hf_logits(hf_model, token_ids: list[int]) -> torch.Tensor:
    return hf_model(torch.tensor([token_ids])).logits[0].float()


class PagedRunner:
    """Owns a KV cache for `model` and runs steps of (request id, new token ids) pairs.
    Blocks are handed out in shuffled order so block tables are never contiguous."""

    def __init__(self, model, block_size: int = 16, num_blocks: int = 64, seed: int = 0) -> None:
        cfg = model.config
        dtype = model.model.embed_tokens.weight.dtype
        self.model, self.block_size = model, block_size
        layout = getattr(model, "kv_cache_layout", None)
        layout = layout() if layout else [(model.model.layers[0].self_attn.num_kv_heads,
                                           cfg.head_dim)] * cfg.num_hidden_layers   # this rank's
        # hybrid models: one recurrent state slot per request id (engine/state_cache.py)
        self.state_slots: dict[str, int] | None = None
        if hasattr(model, "state_cache_shapes"):
            from minserve.engine.state_cache import allocate_state_caches

            self.states = allocate_state_caches(model, num_blocks, dtype, torch.device("cpu"))
            self.state_slots = {}
        model.set_kv_caches([(torch.zeros(num_blocks, block_size, k, d, dtype=dtype),
                              torch.zeros(num_blocks, block_size, k, d, dtype=dtype))
                             for k, d in layout])
        self.free_blocks = list(range(num_blocks))
        random.Random(seed).shuffle(self.free_blocks)
        self.block_tables: dict[str, list[int]] = {}
        self.num_computed: dict[str, int] = {}

    @torch.inference_mode()
    def step(self, batch: list[tuple[str, list[int]]]) -> list[torch.Tensor]:
        """Run one step; returns each request's logits for every token it ran ([Q, V])."""
        query_lens, context_lens, tables, input_ids = [], [], [], []
        for req_id, new_ids in batch:
            ctx = self.num_computed.get(req_id, 0)
            table = self.block_tables.setdefault(req_id, [])
            while len(table) * self.block_size < ctx + len(new_ids):
                table.append(self.free_blocks.pop())
            query_lens.append(len(new_ids))
            context_lens.append(ctx)
            tables.append(table)
            input_ids.extend(new_ids)
            self.num_computed[req_id] = ctx + len(new_ids)
        attn, positions = attn_metadata(query_lens, context_lens, tables, self.block_size)
        if self.state_slots is not None:
            fresh = [req_id for req_id, _ in batch if req_id not in self.state_slots]
            for req_id in fresh:
                self.state_slots[req_id] = len(self.state_slots)
            self.states.reset([self.state_slots[r] for r in fresh])
            attn.state_slots_host = [self.state_slots[req_id] for req_id, _ in batch]
            attn.state_slots = torch.tensor(attn.state_slots_host, dtype=torch.int64)
        hidden = self.model(torch.tensor(input_ids), positions, attn)
        logits = self.model.compute_logits(hidden)   # None on a tensor-parallel rank > 0
        return [] if logits is None else list(logits.split(query_lens))


def attn_metadata(query_lens: list[int], context_lens: list[int], block_tables: list[list[int]],
                  block_size: int) -> tuple[AttnMetadata, torch.Tensor]:
    """(AttnMetadata, positions) for a step where request r runs query_lens[r] new tokens after
    context_lens[r] cached ones."""
    qsl, seq_lens = [0], [c + q for c, q in zip(context_lens, query_lens, strict=True)]
    positions, slots = [], []
    for q, ctx, table in zip(query_lens, context_lens, block_tables, strict=True):
        qsl.append(qsl[-1] + q)
        positions += range(ctx, ctx + q)
        slots += [table[p // block_size] * block_size + p % block_size for p in range(ctx, ctx + q)]
    width = max(len(t) for t in block_tables)
    attn = AttnMetadata(
        query_start_loc=torch.tensor(qsl, dtype=torch.int32),
        seq_lens=torch.tensor(seq_lens, dtype=torch.int32),
        block_table=torch.tensor([t + [0] * (width - len(t)) for t in block_tables],
                                 dtype=torch.int32),
        slot_mapping=torch.tensor(slots, dtype=torch.int64),
        max_query_len=max(query_lens), max_seq_len=max(seq_lens),
        query_start_loc_host=qsl, seq_lens_host=seq_lens)
    return attn, torch.tensor(positions, dtype=torch.int64)


def prefill_without_cache(model, prompts: list[list[int]]) -> list[torch.Tensor]:
    """Fresh prompts all in one step, as the KV-sizing profile run does (on a fresh cache)."""
    runner = PagedRunner(model, block_size=16, num_blocks=sum(-(-len(p) // 16) for p in prompts))
    return runner.step([(str(i), p) for i, p in enumerate(prompts)])


def random_prompt(n: int, seed: int, low: int = 3, high: int = 500) -> list[int]:
    rng = random.Random(seed)
    return [rng.randrange(low, high) for _ in range(n)]


def check_prefill(ours, hf, prompt: list[int], atol: float) -> None:
    """The whole prompt in one step, through the paged cache and through the profiling path (no
    cache), gives transformers' logits."""
    ref = hf_logits(hf, prompt)
    (paged,) = PagedRunner(ours, block_size=16).step([("a", prompt)])
    torch.testing.assert_close(paged, ref, atol=atol, rtol=0)
    (no_cache,) = prefill_without_cache(ours, [prompt])
    torch.testing.assert_close(no_cache, ref, atol=atol, rtol=0)


def check_decode(ours, hf, prompt: list[int], block_size: int, atol: float,
                 first: int = 3) -> None:
    """`first` tokens as a prefill, then one token a step: transformers' logits for the whole
    prompt, row by row."""
    runner = PagedRunner(ours, block_size=block_size)
    got = [runner.step([("a", prompt[:first])])[0]]
    got += [runner.step([("a", [tok])])[0] for tok in prompt[first:]]
    torch.testing.assert_close(torch.cat(got), hf_logits(hf, prompt), atol=atol, rtol=0)


def check_chunks(ours, hf, prompt: list[int], block_size: int, atol: float,
                 sizes: tuple[int, ...] = (5, 16, 11, 1, 12)) -> None:
    """The prompt in chunks of `sizes` (they start and end mid-block): transformers' logits."""
    assert sum(sizes) == len(prompt)
    runner, got, start = PagedRunner(ours, block_size=block_size), [], 0
    for size in sizes:
        got.append(runner.step([("a", prompt[start:start + size])])[0])
        start += size
    torch.testing.assert_close(torch.cat(got), hf_logits(hf, prompt), atol=atol, rtol=0)
