"""Tensor-parallel state of this process (rank, size, process groups) and the collectives the
model layers run: all-reduce after row-parallel layers and the vocab-parallel embedding, gather
of the LM head's vocab shards to rank 0. torch.distributed only; starting processes is
engine/workers.py's job. With tp_size 1 nothing here touches torch.distributed."""
from __future__ import annotations

import datetime
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass
class ParallelState:
    tp_rank: int = 0
    tp_size: int = 1
    device_group: object = None   # nccl on GPUs, gloo on CPUs: activations
    cpu_group: object = None      # gloo: the step plan, KV sizing (host tensors)


_STATE = ParallelState()

# NOTE: the step plan waits on the cpu group while a worker is idle, possibly for days; a dead
# head is noticed through the parent pipe or the closed connection, not this timeout.
IDLE_TIMEOUT = datetime.timedelta(days=3650)


def state() -> ParallelState:
    return _STATE


def tp_rank() -> int:
    return _STATE.tp_rank


def tp_size() -> int:
    return _STATE.tp_size


def num_local_kv_heads(num_kv_heads: int, num_ranks: int) -> int:
    """K / tp kv heads per rank, or one replicated head when there are fewer kv heads than ranks
    (QKVParallelLinear's rule; the KV cache is sized by it)."""
    return max(1, num_kv_heads // num_ranks)


def check_divisible(model_config: object, num_ranks: int) -> None:
    """A start-up error, with the numbers, for a model that cannot split num_ranks ways."""
    from minserve.config import ConfigError

    mc = model_config
    for what, n in (("num_attention_heads", mc.num_attention_heads),
                    ("intermediate_size", mc.intermediate_size)):
        if n % num_ranks:
            raise ConfigError(f"{what} ({n}) is not divisible by --tensor-parallel-size "
                              f"{num_ranks}")
    k = mc.num_key_value_heads
    if (k % num_ranks) if k >= num_ranks else (num_ranks % k):
        raise ConfigError(f"num_key_value_heads ({k}) and --tensor-parallel-size {num_ranks}: "
                          "one must divide the other")
    moe = getattr(mc, "moe", None)
    if moe is not None and moe.expert_parallel and moe.num_experts % num_ranks:
        raise ConfigError(f"--enable-expert-parallel: num_experts ({moe.num_experts}) is not "
                          f"divisible by --tensor-parallel-size {num_ranks}; use a size that "
                          "divides it, or shard every expert instead (no --enable-expert-parallel)")
    if moe is not None and not moe.expert_parallel and moe.intermediate_size % num_ranks:
        raise ConfigError(f"moe_intermediate_size ({moe.intermediate_size}) is not divisible by "
                          f"--tensor-parallel-size {num_ranks}; use a size that divides it, or "
                          "--enable-expert-parallel (whole experts per rank)")


def init(rank: int, world_size: int, master_addr: str, master_port: int, device: torch.device,
         step_timeout_s: float) -> None:
    """Join the process group; every rank calls this once before building the model. The device
    group times out after step_timeout_s (a hung rank fails the step); the cpu group does not."""
    backend = "nccl" if device.type == "cuda" else "gloo"
    timeout = datetime.timedelta(seconds=step_timeout_s)
    dist.init_process_group(backend, init_method=f"tcp://{master_addr}:{master_port}",
                            rank=rank, world_size=world_size, timeout=timeout)
    cpu_group = dist.new_group(backend="gloo", timeout=IDLE_TIMEOUT)
    global _STATE
    _STATE = ParallelState(rank, world_size, dist.group.WORLD, cpu_group)


def destroy() -> None:
    global _STATE
    if _STATE.tp_size > 1 and dist.is_initialized():
        dist.destroy_process_group()
    _STATE = ParallelState()


def all_reduce(x: torch.Tensor) -> torch.Tensor:
    """The sum of every rank's x (in place); x itself with one rank."""
    if _STATE.tp_size > 1:
        dist.all_reduce(x, group=_STATE.device_group)
    return x


def gather_vocab(logits: torch.Tensor, vocab_size: int) -> torch.Tensor | None:
    """Every rank's [N, V/tp] logit shard -> [N, V] on rank 0 (the padding past V dropped);
    None on the other ranks, which never sample."""
    if _STATE.tp_size == 1:
        return logits
    logits = logits.contiguous()
    parts = ([torch.empty_like(logits) for _ in range(_STATE.tp_size)]
             if _STATE.tp_rank == 0 else None)
    dist.gather(logits, parts, dst=0, group=_STATE.device_group)
    return torch.cat(parts, dim=-1)[..., :vocab_size] if parts is not None else None


def broadcast_activations(t: torch.Tensor) -> None:
    """Rank 0's device tensor t into every rank's t (same shape and dtype), on the device group."""
    dist.broadcast(t, src=0, group=_STATE.device_group)


def min_across_ranks(value: int) -> int:
    """The smallest rank's value (the KV cache is sized from the smallest rank's memory)."""
    if _STATE.tp_size == 1:
        return value
    t = torch.tensor([value], dtype=torch.int64)
    dist.all_reduce(t, op=dist.ReduceOp.MIN, group=_STATE.cpu_group)
    return int(t.item())


def broadcast_from_head(t: torch.Tensor, timeout_s: float | None = None) -> None:
    """Rank 0's host tensor t into every rank's t (same shape and dtype), on the cpu group.
    timeout_s (the head's): a rank that does not take it in time raises here, since gloo's
    sender waits for the receivers."""
    if timeout_s is None:
        dist.broadcast(t, src=0, group=_STATE.cpu_group)
        return
    work = dist.broadcast(t, src=0, group=_STATE.cpu_group, async_op=True)
    work.wait(timeout=datetime.timedelta(seconds=timeout_s))
