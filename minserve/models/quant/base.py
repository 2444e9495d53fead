"""What every quantization method shares: the config base (which layers it quantizes, how it
names itself in the start-up log), start-up errors, and the weight-only int linear method that
AWQ, GPTQ, compressed-tensors int and GGUF feed: checkpoint tensors are stashed shard by shard
as they load, then each shard is repacked into the int GEMM layout (kernels/quant_gemm.py), and
kernels.prepare_int_weight picks the layout the device runs."""
from __future__ import annotations

from typing import Any

import torch
from torch import nn

from minserve import kernels
from minserve.config import ConfigError
from minserve.kernels.quant_gemm import IntWeight

SUPPORTED_GROUP_SIZES = (-1, 16, 32, 64, 128, 256)


def config_error(message: str) -> ConfigError:
    return ConfigError(f"quantization: {message}")


def check_group_size(method: str, group_size: int) -> None:
    if group_size not in SUPPORTED_GROUP_SIZES:
        raise config_error(f"{method} group_size {group_size} is not supported (supported: "
                           f"{', '.join(map(str, SUPPORTED_GROUP_SIZES))}; -1 = per channel)")


def prefix_matches(prefix: str, patterns: list[str]) -> bool:
    """HF-style module lists: 'lm_head' or 'model.layers.0.mlp' match the prefix or a parent;
    compressed-tensors' 're:<regex>' entries are full regexes."""
    import re

    for pattern in patterns:
        if pattern.startswith("re:"):
            if re.fullmatch(pattern[3:], prefix):
                return True
        elif prefix == pattern or prefix.startswith(pattern + ".") or prefix.endswith(
                "." + pattern) or f".{pattern}." in f".{prefix}.":
            return True
    return False


class QuantConfig:
    """One checkpoint's quantization: built from config.json's quantization_config (or the GGUF
    tensor types, or --quantization). Decides per linear layer which method runs it."""

    name = "none"

    def __init__(self, *, skip_modules: list[str] | None = None) -> None:
        self.skip_modules = skip_modules or []

    def describe(self) -> str:
        return self.name

    def get_linear_method(self, prefix: str) -> LinearMethod | None:
        """None: the layer stays unquantized (listed in modules_to_not_convert / ignore)."""
        raise NotImplementedError


class LinearMethod:
    """create_weights registers the checkpoint's tensors on the layer; each carries
    weight_loader(param, loaded, shard_id). process_weights_after_loading turns them into the
    kernel's form; apply runs the layer."""

    def create_weights(self, layer: nn.Module, input_size: int, output_sizes: list[int]) -> None:
        raise NotImplementedError

    def process_weights_after_loading(self, layer: nn.Module, dtype: torch.dtype) -> None:
        """After every checkpoint tensor of the layer arrived; dtype: the model's."""
        raise NotImplementedError

    def apply(self, layer: nn.Module, x: torch.Tensor,
              bias: torch.Tensor | None = None) -> torch.Tensor:
        raise NotImplementedError


def shard_index(shard_id: Any) -> int:
    """The loader's shard ids (None, "q"/"k"/"v", 0/1) -> the position among output_sizes."""
    if shard_id is None:
        return 0
    return "qkv".index(shard_id) if isinstance(shard_id, str) else int(shard_id)


class ShardStash:
    """Checkpoint tensors of one layer, by name and shard, until the layer is complete. The
    tensors keep the checkpoint's own (packed) shapes: each format unpacks a whole shard at
    once. On one rank each tensor is copied as it arrives; under tensor parallelism the
    memory-mapped view is kept until take(), which copies only this rank's slice (sharding.py),
    since a slice can need another tensor of the shard (GGUF's block size is in weight_type)."""

    def __init__(self, names: tuple[str, ...], num_shards: int,
                 optional: tuple[str, ...] = (), sharded: bool = False) -> None:
        self.names, self.optional, self.sharded = names, optional, sharded
        self.tensors: list[dict[str, torch.Tensor]] = [{} for _ in range(num_shards)]
        self.fused: dict[str, torch.Tensor] = {}   # a checkpoint's fused tensors, split at take()
        self.device = torch.device("cpu")

    def register(self, layer: nn.Module) -> None:
        for name in self.names:
            # Placeholder parameter: what the loader looks up and calls weight_loader on. The
            # real tensors are kept in the stash, since their shapes depend on the format.
            param = nn.Parameter(torch.empty(0), requires_grad=False)
            param.weight_loader = self.load  # type: ignore[attr-defined]
            param.stash_name = name          # type: ignore[attr-defined]
            param.is_optional = name in self.optional  # type: ignore[attr-defined]
            layer.register_parameter(name, param)

    def load(self, param: nn.Parameter, loaded: torch.Tensor, shard_id: Any = None) -> None:
        if shard_id is None and len(self.tensors) > 1:     # fused in the checkpoint (Phi-3)
            self.device = param.device
            self.fused[param.stash_name] = loaded if self.sharded else loaded.to(param.device,
                                                                                 copy=True)
            return
        index = shard_index(shard_id)
        if not 0 <= index < len(self.tensors):
            raise config_error(f"unexpected shard {shard_id!r} for {param.stash_name}")
        self.device = param.device
        self.tensors[index][param.stash_name] = (
            loaded if self.sharded else loaded.to(param.device, copy=True))

    def take(self, layer: nn.Module, layouts: Any = None) -> list[dict[str, torch.Tensor]]:
        """Every shard's tensors (this rank's slices, by `layouts`: sharding.Layouts); drops
        the placeholders and the stash from the layer."""
        from minserve.models.quant.sharding import narrow_shard, split_fused

        if self.fused:
            for index, part in enumerate(split_fused(layer, self.fused, layouts)):
                self.tensors[index].update(part)
        for index, shard in enumerate(self.tensors):
            missing = [n for n in self.names if n not in shard and n not in self.optional]
            if missing:
                raise config_error(f"checkpoint lacks {', '.join(missing)} for shard {index}")
        for name in self.names:
            delattr(layer, name)
        del layer.stash
        if not self.sharded:
            return self.tensors
        return [{name: t.to(self.device, copy=True)
                 for name, t in narrow_shard(layer, index, shard, layouts).items()}
                for index, shard in enumerate(self.tensors)]


class IntConfig(QuantConfig):
    """Weight-only int formats: each knows how to repack one shard into an IntWeight."""

    param_names: tuple[str, ...] = ()
    optional_params: tuple[str, ...] = ()

    def __init__(self, *, bits: int, group_size: int, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.bits, self.group_size = bits, group_size

    def describe(self) -> str:
        group = "per-channel" if self.group_size == -1 else f"group {self.group_size}"
        return f"{self.name} int{self.bits} {group}"

    def get_linear_method(self, prefix: str) -> LinearMethod | None:
        if prefix_matches(prefix, self.skip_modules):
            return None
        return IntLinearMethod(self)

    def to_int(self, shard: dict[str, torch.Tensor], in_features: int) -> IntWeight | torch.Tensor:
        """One shard's checkpoint tensors -> IntWeight (or a dense [N, K] tensor)."""
        raise NotImplementedError

    def layouts(self, name: str, tensor: torch.Tensor, shard: dict[str, torch.Tensor]) -> Any:
        """Where `name` runs along N and K (sharding.Layouts), for tensor parallelism."""
        raise NotImplementedError


def merge_parts(parts: list[IntWeight | torch.Tensor]) -> list[IntWeight | torch.Tensor]:
    """Concatenate neighbouring shards along N when they share one layout (the usual case: one
    GEMM for q|k|v); shards of different layouts (GGUF Q4_K beside Q6_K) stay separate."""
    merged: list[IntWeight | torch.Tensor] = []
    for part in parts:
        prev = merged[-1] if merged else None
        if (isinstance(part, IntWeight) and isinstance(prev, IntWeight)
                and (prev.bits, prev.group_size, prev.scales.dtype)
                == (part.bits, part.group_size, part.scales.dtype)
                and _same_perm(prev.perm, part.perm)):
            merged[-1] = IntWeight(torch.cat([prev.qweight, part.qweight], 1),
                                   torch.cat([prev.scales, part.scales], 1),
                                   torch.cat([prev.bias, part.bias], 1),
                                   part.bits, part.group_size, part.perm)
        elif isinstance(part, torch.Tensor) and isinstance(prev, torch.Tensor):
            merged[-1] = torch.cat([prev, part], 0)
        else:
            merged.append(part)
    return merged


def _same_perm(a: torch.Tensor | None, b: torch.Tensor | None) -> bool:
    if a is None or b is None:
        return a is None and b is None
    return torch.equal(a, b)


def part_forward(x: torch.Tensor, part: Any) -> torch.Tensor:
    if isinstance(part, torch.Tensor):
        return torch.nn.functional.linear(x, part)
    if part.in_features != x.shape[-1]:
        # act-order shard padded to whole groups: its pad rows read this zero column
        x = torch.nn.functional.pad(x, (0, 1))
    return kernels.int_gemm(x, part)


class IntLinearMethod(LinearMethod):
    def __init__(self, config: IntConfig) -> None:
        self.config = config

    def create_weights(self, layer: nn.Module, input_size: int, output_sizes: list[int]) -> None:
        layer.quant_input_size, layer.quant_output_sizes = input_size, list(output_sizes)
        layer.stash = ShardStash(self.config.param_names, len(output_sizes),
                                 self.config.optional_params, getattr(layer, "tp_size", 1) > 1)
        layer.stash.register(layer)
        layer.parts = []

    def process_weights_after_loading(self, layer: nn.Module, dtype: torch.dtype) -> None:
        parts = []
        for index, shard in enumerate(layer.stash.take(layer, self.config.layouts)):
            part = self.config.to_int(shard, layer.quant_input_size)
            rows = part.out_features if isinstance(part, IntWeight) else part.shape[0]
            cols = part.in_features if isinstance(part, IntWeight) else part.shape[1]
            if isinstance(part, IntWeight) and part.perm is not None:   # pad rows: not inputs
                cols = int((part.perm < layer.quant_input_size).sum())
            if (rows, cols) != (layer.quant_output_sizes[index], layer.quant_input_size):
                raise config_error(f"shard {index} is [{rows}, {cols}] after unpacking; the "
                                   f"model expects [{layer.quant_output_sizes[index]}, "
                                   f"{layer.quant_input_size}]")
            parts.append(part.to(dtype) if isinstance(part, torch.Tensor) else part)
        layer.parts = [kernels.prepare_int_weight(p) for p in merge_parts(parts)]

    def apply(self, layer: nn.Module, x: torch.Tensor,
              bias: torch.Tensor | None = None) -> torch.Tensor:
        parts = layer.parts
        if len(parts) == 1:
            out = part_forward(x, parts[0])
        else:
            out = torch.cat([part_forward(x, p) for p in parts], dim=-1)
        return out if bias is None else out + bias
