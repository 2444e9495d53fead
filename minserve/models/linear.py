"""Linear and embedding layers with vLLM's names and loading contract. A linear layer's
quant_method creates its parameters (create_weights) and runs its matmul (apply); every parameter
carries weight_loader(param, loaded_weight, shard_id=None), which copies this rank's part of a
checkpoint tensor into it. tp_rank/tp_size slice the weights; the row-parallel layers and the
embedding all-reduce their partial sums (models/parallel.py; nothing with one rank).

Column-parallel layers split the output rows, row-parallel ones the input columns (tp_size = 2):

    ColumnParallelLinear  W [out, in]  rank r holds rows  [r * out/2, (r+1) * out/2)
    RowParallelLinear     W [out, in]  rank r holds cols  [r * in/2, (r+1) * in/2); the ranks'
                                       outputs sum to the full output (all-reduce)
    QKVParallelLinear     rank r holds q heads [r * H/2, ...) and kv heads [r * K/2, ...); with
                          more ranks than kv heads, each kv head is copied to tp_size / K ranks
"""
from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from minserve import kernels
from minserve.config import ConfigError
from minserve.kernels import LoRAMapping
from minserve.models import parallel


def default_weight_loader(param: nn.Parameter, loaded_weight: torch.Tensor) -> None:
    """The whole tensor, for parameters no layer slices (norms, position embeddings)."""
    _copy(param.data, loaded_weight)


def _copy(dst: torch.Tensor, src: torch.Tensor) -> None:
    if dst.shape != src.shape:
        raise ConfigError(f"checkpoint shape {tuple(src.shape)} != model shape {tuple(dst.shape)}")
    dst.copy_(src)


def _narrow(loaded_weight: torch.Tensor, dim: int, rank: int, size: int,
            num_ranks: int) -> torch.Tensor:
    """Rank `rank`'s `size` rows along `dim` of a checkpoint tensor split num_ranks ways."""
    if loaded_weight.shape[dim] != size * num_ranks:
        raise ConfigError(f"checkpoint tensor has {loaded_weight.shape[dim]} rows along dim {dim}, "
                          f"the model expects {size * num_ranks}")
    return loaded_weight.narrow(dim, rank * size, size)


def _divide(total: int, tp_size: int, what: str) -> int:
    if total % tp_size:
        raise ConfigError(f"{what} ({total}) is not divisible by tensor_parallel_size {tp_size}")
    return total // tp_size


class UnquantizedLinearMethod:
    """One dense weight [sum(output_sizes), input_size] multiplied by kernels.linear (the layer
    keeps whatever packed copy of the weight the device's path wants).

    A quantized method (the quantization issue) registers its own parameters (qweight, scales,
    zeros, ...) the same way: each with `output_dim`/`input_dim` (the dims that tensor parallelism
    and q|k|v stacking slice; None for neither) and the layer's weight_loader, so its
    checkpoint tensors load shard by shard through the same code as `weight`."""

    def create_weights(self, layer: LinearBase, input_size: int, output_sizes: list[int]) -> None:
        weight = nn.Parameter(torch.empty(sum(output_sizes), input_size), requires_grad=False)
        weight.output_dim, weight.input_dim, weight.weight_loader = 0, 1, layer.weight_loader
        layer.register_parameter("weight", weight)

    def apply(self, layer: LinearBase, x: torch.Tensor,
              bias: torch.Tensor | None = None) -> torch.Tensor:
        return kernels.linear(x, layer.weight, bias, layer)


class LinearBase(nn.Module):
    """input_size and output_sizes are this rank's part (the subclasses divide by tp_size)."""

    split_dim = "output_dim"   # the parameter attribute naming the dim that tp_size splits
    lora_slots = None          # a LoRASlots (minserve/lora/layers.py) when LoRA is on

    def __init__(self, input_size: int, output_sizes: list[int], bias: bool,
                 quant_method: Any = None, tp_rank: int = 0, tp_size: int = 1) -> None:
        super().__init__()
        self.tp_rank, self.tp_size = tp_rank, tp_size
        self.output_sizes = output_sizes
        self.quant_method = quant_method or UnquantizedLinearMethod()
        self.quant_method.create_weights(self, input_size, output_sizes)
        if bias:
            self.bias = nn.Parameter(torch.empty(sum(output_sizes)), requires_grad=False)
            self.bias.output_dim, self.bias.input_dim = 0, None
            self.bias.weight_loader = self.weight_loader
        else:
            self.register_parameter("bias", None)

    def forward(self, x: torch.Tensor, lora_mapping: LoRAMapping | None = None) -> torch.Tensor:
        """x [T, IN] -> [T, N]; with the step's lora_mapping, plus each token's LoRA delta."""
        out = self.quant_method.apply(self, x, self.bias)
        if lora_mapping is not None:
            self._add_lora(x, out, lora_mapping)
        return out

    def _add_lora(self, x: torch.Tensor, out: torch.Tensor, lora_mapping: LoRAMapping) -> None:
        if self.lora_slots is not None:
            kernels.lora_add(x, self.lora_slots.lora_a, self.lora_slots.lora_bt, lora_mapping,
                             out)

    def checkpoint_part(self, index: int) -> tuple[int, int]:
        """(part, number of parts) of checkpoint shard `index` (its position among
        output_sizes) that this rank holds along split_dim (quantized layers slice by it)."""
        return self.tp_rank, self.tp_size

    def weight_loader(self, param: nn.Parameter, loaded_weight: torch.Tensor,
                      shard_id: Any = None) -> None:
        """This rank's part along split_dim (a parameter without that dim loads whole)."""
        dim = getattr(param, self.split_dim, None)
        if dim is not None and self.tp_size > 1:
            loaded_weight = _narrow(loaded_weight, dim, self.tp_rank, param.shape[dim],
                                    self.tp_size)
        _copy(param.data, loaded_weight)


class ReplicatedLinear(LinearBase):
    """The whole weight on every rank."""

    def __init__(self, input_size: int, output_size: int, bias: bool = True,
                 quant_method: Any = None) -> None:
        super().__init__(input_size, [output_size], bias, quant_method)


class ColumnParallelLinear(LinearBase):
    """Y = X W^T with W's output rows split across ranks; each rank returns its slice of Y."""

    def __init__(self, input_size: int, output_size: int, bias: bool = True,
                 quant_method: Any = None, tp_rank: int = 0, tp_size: int = 1) -> None:
        super().__init__(input_size, [_divide(output_size, tp_size, "output size")], bias,
                         quant_method, tp_rank, tp_size)


class MergedColumnParallelLinear(LinearBase):
    """Several column-parallel projections of one input in one matmul (gate|up), stacked along
    the output dim; checkpoint shard i (an int) fills the i-th block of each rank's rows."""

    def __init__(self, input_size: int, output_sizes: list[int], bias: bool = True,
                 quant_method: Any = None, tp_rank: int = 0, tp_size: int = 1) -> None:
        super().__init__(input_size, [_divide(s, tp_size, "output size") for s in output_sizes],
                         bias, quant_method, tp_rank, tp_size)

    def weight_loader(self, param: nn.Parameter, loaded_weight: torch.Tensor,
                      shard_id: Any = None) -> None:
        """shard_id None: a checkpoint that stores the projections fused (Phi-3's qkv_proj and
        gate_up_proj), split here into its shards along the output dim."""
        if shard_id is None:
            self._load_fused(param, loaded_weight)
            return
        self._load_shard(param, loaded_weight, shard_id, self.tp_rank, self.tp_size)

    def checkpoint_sizes(self) -> list[int]:
        """Each shard's rows in the checkpoint (all ranks' together)."""
        return [size * self.checkpoint_part(i)[1] for i, size in enumerate(self.output_sizes)]

    def _load_fused(self, param: nn.Parameter, loaded_weight: torch.Tensor) -> None:
        dim, sizes = getattr(param, "output_dim", None), self.checkpoint_sizes()
        if dim is None or loaded_weight.shape[dim] != sum(sizes):
            raise ConfigError(f"a fused checkpoint tensor {tuple(loaded_weight.shape)} does not "
                              f"split into this layer's shards {sizes}")
        for index, part in enumerate(loaded_weight.split(sizes, dim)):
            self._load_shard(param, part, index, *self.checkpoint_part(index))

    def _load_shard(self, param: nn.Parameter, loaded_weight: torch.Tensor, index: int,
                    shard_rank: int, num_shard_ranks: int) -> None:
        """Block `index` of this rank's rows <- part shard_rank of the checkpoint's shard."""
        dim = param.output_dim
        offset, size = sum(self.output_sizes[:index]), self.output_sizes[index]
        _copy(param.data.narrow(dim, offset, size),
              _narrow(loaded_weight, dim, shard_rank, size, num_shard_ranks))


class QKVParallelLinear(MergedColumnParallelLinear):
    """q|k|v projections stacked as [H*D | K*D | K*D] rows per rank; shard ids "q", "k", "v".
    shard_ids: the projections this layer holds, when fewer (Gemma 4: "qk" where v is k, "q"
    where a layer reads another layer's KV cache); the loader expects only those."""

    def __init__(self, hidden_size: int, head_size: int, total_num_heads: int,
                 total_num_kv_heads: int, bias: bool = True, quant_method: Any = None,
                 tp_rank: int = 0, tp_size: int = 1, shard_ids: str = "qkv") -> None:
        self.shard_ids = shard_ids
        self.num_heads = _divide(total_num_heads, tp_size, "number of attention heads")
        if tp_size >= total_num_kv_heads:
            self.num_kv_heads = 1
            self.num_kv_head_replicas = _divide(tp_size, total_num_kv_heads,
                                                "tensor_parallel_size over kv heads")
        else:
            self.num_kv_heads = _divide(total_num_kv_heads, tp_size, "number of kv heads")
            self.num_kv_head_replicas = 1
        q, kv = self.num_heads * head_size, self.num_kv_heads * head_size
        LinearBase.__init__(self, hidden_size, [q, kv, kv][:len(shard_ids)], bias, quant_method,
                            tp_rank, tp_size)

    def weight_loader(self, param: nn.Parameter, loaded_weight: torch.Tensor,
                      shard_id: Any = None) -> None:
        if shard_id is None:           # q|k|v fused in the checkpoint (Phi-3)
            self._load_fused(param, loaded_weight)
            return
        if shard_id not in tuple(self.shard_ids):
            raise ConfigError(f"qkv shard id must be one of {', '.join(self.shard_ids)}, got "
                              f"{shard_id!r}")
        index = self.shard_ids.index(shard_id)
        self._load_shard(param, loaded_weight, index, *self.checkpoint_part(index))

    def checkpoint_part(self, index: int) -> tuple[int, int]:
        """k and v: with more ranks than kv heads, num_kv_head_replicas ranks share a part."""
        if index == 0:
            return self.tp_rank, self.tp_size
        replicas = self.num_kv_head_replicas
        return self.tp_rank // replicas, self.tp_size // replicas


class RowParallelLinear(LinearBase):
    """Y = X W^T with W's input columns split across ranks: rank r takes X's r-th column slice
    and returns a partial sum of Y. Rank 0 alone adds the bias, so the partial sums add up."""

    def __init__(self, input_size: int, output_size: int, bias: bool = True,
                 quant_method: Any = None, tp_rank: int = 0, tp_size: int = 1) -> None:
        super().__init__(_divide(input_size, tp_size, "input size"), [output_size], bias,
                         quant_method, tp_rank, tp_size)

    split_dim = "input_dim"

    def forward(self, x: torch.Tensor, lora_mapping: LoRAMapping | None = None) -> torch.Tensor:
        out = self.quant_method.apply(self, x, self.bias if self.tp_rank == 0 else None)
        if lora_mapping is not None:   # a partial sum like the base output's: reduced with it
            self._add_lora(x, out, lora_mapping)
        return parallel.all_reduce(out) if self.tp_size > 1 else out


class VocabParallelEmbedding(nn.Module):
    """An embedding table [V, D] whose rows are split across ranks: rank r holds token ids
    [r * ceil(V / tp), ...) and embeds the others as zeros, so the ranks' outputs sum to the
    full lookup. The rows past V on the last rank are zero padding."""

    def __init__(self, num_embeddings: int, embedding_dim: int, tp_rank: int = 0,
                 tp_size: int = 1) -> None:
        super().__init__()
        self.num_embeddings, self.tp_size = num_embeddings, tp_size
        per_rank = -(-num_embeddings // tp_size)
        self.vocab_start = min(tp_rank * per_rank, num_embeddings)
        self.vocab_end = min(self.vocab_start + per_rank, num_embeddings)
        # NOTE: torch.empty, not nn.Embedding: its normal_() init on the meta device imports
        # torch._dynamo (seconds, and a second importer of triton; see kernels/jit.py).
        self.weight = nn.Parameter(torch.empty(per_rank, embedding_dim), requires_grad=False)
        self.weight.weight_loader = self.weight_loader

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        if self.tp_size == 1:
            return F.embedding(input_ids, self.weight)
        mine = (input_ids >= self.vocab_start) & (input_ids < self.vocab_end)
        out = F.embedding((input_ids - self.vocab_start) * mine, self.weight)
        return parallel.all_reduce(out * mine.unsqueeze(-1))

    def weight_loader(self, param: nn.Parameter, loaded_weight: torch.Tensor,
                      shard_id: Any = None) -> None:
        if loaded_weight.shape[0] != self.num_embeddings:
            raise ConfigError(f"checkpoint has {loaded_weight.shape[0]} embedding rows, the model "
                              f"expects {self.num_embeddings}")
        rows = loaded_weight[self.vocab_start:self.vocab_end]
        _copy(param.data[:rows.shape[0]], rows)
        param.data[rows.shape[0]:].zero_()


class ParallelLMHead(VocabParallelEmbedding):
    """The output projection: the same vocab-split weight, multiplied by the model's
    compute_logits (rank r's logits are columns [vocab_start, vocab_end), which
    parallel.gather_vocab puts together on rank 0)."""
