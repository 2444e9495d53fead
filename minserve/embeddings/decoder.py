"""The forward of a decoder embedding model (a Llama-family model without its LM head): one
flat batch of token rows through the serving path (paged attention over a cache for this batch
alone) to the last hidden states. Under tensor parallelism (--task embed -tp N) the rows go to
the other ranks as a step plan (engine/workers.py: the same wire format, the same processes and
failure path as the chat engine), each rank runs the same forward on its shards, and rank 0
pools; the hidden states after the final norm are whole on every rank (all-reduced)."""
from __future__ import annotations

import itertools
from typing import Any

import torch

from minserve.config import ConfigError, EngineConfig, ModelConfig
from minserve.engine.builder import ModelSource, build_model, join_as_worker, rank_device
from minserve.engine.runner import StepInputs
from minserve.engine.workers import Workers
from minserve.models import parallel
from minserve.models.registry import Architecture

BLOCK_SIZE = 16


class DecoderForward:
    """rows -> hidden states [T, H] (rows packed back to back). Also a tensor-parallel rank's
    runner for engine/workers.py's loop: prepare_inputs (the step's rows), run_model, sample
    (nothing: rank 0 pools)."""

    def __init__(self, model: torch.nn.Module, model_config: ModelConfig, device: torch.device,
                 dtype: torch.dtype) -> None:
        self.model, self.model_config, self.device, self.dtype = model, model_config, device, dtype
        self.num_kv_heads = parallel.num_local_kv_heads(model_config.num_key_value_heads,
                                                        parallel.tp_size())

    @torch.inference_mode()
    def hidden(self, rows: list[list[int]]) -> torch.Tensor:
        from minserve.kernels import AttnMetadata

        lens = [len(r) for r in rows]
        qsl = [0, *itertools.accumulate(lens)]
        dev, bs, mc = self.device, BLOCK_SIZE, self.model_config
        input_ids = torch.tensor([t for r in rows for t in r], dtype=torch.long, device=dev)
        positions = torch.cat([torch.arange(n) for n in lens]).to(dev)
        # Row r owns the consecutive blocks from first[r]. Layers run one after another and
        # each reads back only what it has just written, so all of them share one layer's cache.
        first = [0, *itertools.accumulate(-(-n // bs) for n in lens)]
        kv = torch.zeros(2, first[-1], bs, self.num_kv_heads, mc.head_dim, dtype=self.dtype,
                         device=dev)                                      # [2, NB, BS, K, D]
        self.model.set_kv_caches([(kv[0], kv[1])] * mc.num_hidden_layers)
        table = torch.tensor(first[:-1])[:, None] + torch.arange(-(-max(lens) // bs))
        attn = AttnMetadata(
            query_start_loc=torch.tensor(qsl, dtype=torch.int32, device=dev),
            seq_lens=torch.tensor(lens, dtype=torch.int32, device=dev),
            block_table=table.clamp(max=first[-1] - 1).to(dev, torch.int32),
            slot_mapping=(positions + torch.tensor(first[:-1]).repeat_interleave(
                torch.tensor(lens)).to(dev) * bs),
            max_query_len=max(lens), max_seq_len=max(lens),
            query_start_loc_host=qsl, seq_lens_host=lens)
        return self.model(input_ids, positions, attn)

    # ---- a rank's side of engine/workers.py's loop
    def prepare_inputs(self, step: StepInputs) -> list[list[int]]:
        rows, pos = [], 0
        for n in step.num_scheduled_tokens:
            rows.append(step.token_ids[pos:pos + n])
            pos += n
        return rows

    def share_from_head(self, rows: list[list[int]], has_images: bool) -> None:
        return None   # text rows only: the step plan holds everything

    def run_model(self, rows: list[list[int]]) -> torch.Tensor:
        return self.hidden(rows)

    def sample(self, *_: Any) -> None:
        return None


def rows_step(rows: list[list[int]]) -> StepInputs:
    """The rows as a step plan (no KV blocks: each forward has a cache of its own)."""
    return StepInputs([t for r in rows for t in r], [len(r) for r in rows], [0] * len(rows),
                      [[] for _ in rows], [], None)


class ShardedDecoder:
    """Rank 0 of a tensor-parallel decoder embedding model: the other ranks' processes, and
    each forward's rows broadcast to them before this rank runs its own shards."""

    def __init__(self, config: EngineConfig, source: ModelSource, device: torch.device) -> None:
        """config: with the device type and dtype this rank resolved, which the ranks take."""
        self.device = rank_device(device, 0)
        self.workers = Workers(config, source.model_config, self.device, load_worker)
        try:
            built = build_model(config, source, self.device)
        except BaseException:
            self.workers.shutdown()
            raise
        self.local = DecoderForward(built.model, source.model_config, self.device, built.dtype)

    def hidden(self, rows: list[list[int]]) -> torch.Tensor:
        return self.workers.run(rows_step(rows), lambda: self.local.hidden(rows))

    def shutdown(self) -> None:
        self.workers.shutdown()


def load_worker(config: EngineConfig, rank: int, local_rank: int, port: int) -> DecoderForward:
    """A rank > 0 (in its own process): joins the group, builds its shards."""
    source, device = join_as_worker(config, rank, local_rank, port, task="embed")
    built = build_model(config, source, device)
    return DecoderForward(built.model, source.model_config, device, built.dtype)


def check_shardable(arch: Architecture, tensor_parallel_size: int, is_decoder: bool,
                    model_name: str, beside_tensor_parallel: bool) -> None:
    """Encoders are not sharded (they are small). Beside a sharded chat model, this process is
    rank 0 of the chat model's group: a decoder built here would take the chat model's shard
    layout (models/llama.py reads the process's rank), so only encoders run there, whole."""
    if tensor_parallel_size > 1 and not arch.tensor_parallel:
        raise ConfigError(f"--tensor-parallel-size {tensor_parallel_size}: {model_name} is an "
                          "encoder (BERT-style) embedding model, which is not sharded; serve it "
                          "with --tensor-parallel-size 1")
    if beside_tensor_parallel and is_decoder:
        raise ConfigError(f"--embedding-model {model_name} is a decoder model: beside a chat "
                          "model with --tensor-parallel-size > 1 only encoder (BERT-style) "
                          "embedding models are served; serve it with its own `--task embed` "
                          "server (which shards it with --tensor-parallel-size)")
