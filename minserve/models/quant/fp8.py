"""FP8 weights: vLLM-style FP8 checkpoints (`quant_method: fp8`: per-tensor `weight_scale`, or
block-wise `weight_scale_inv` with `weight_block_size`, the layout of the Qwen3 and DeepSeek FP8
releases), and `--quantization fp8` on a 16-bit checkpoint: weights quantized at load with one
scale per output channel, activations quantized per token at run time.

    weight            float8_e4m3fn [N, K]
    weight_scale      float32 []                    per tensor (one per checkpoint shard)
    weight_scale_inv  float32 [ceil(N/BN), ceil(K/BK)]  block-wise: w = weight * scale_inv
    input_scale       float32 []                    activation_scheme "static"
"""
from __future__ import annotations

from typing import Any

import torch
from torch import nn

from minserve import kernels
from minserve.kernels.fp8_gemm import FP8_DTYPE, Fp8Weight, fp8_quantize_weight
from minserve.models.quant.base import (
    LinearMethod,
    QuantConfig,
    ShardStash,
    config_error,
    prefix_matches,
)


def merge_fp8(shards: list[Fp8Weight]) -> Fp8Weight:
    """Fused layers: stack shards along N. Per-tensor scales become per-channel (each shard's
    rows keep their own scale: exact); block-wise shards must start on a block boundary."""
    if len(shards) == 1:
        return shards[0]
    weight = torch.cat([s.weight for s in shards], 0)
    k = weight.shape[1]
    input_scales = [s.input_scale for s in shards if s.input_scale is not None]
    # NOTE: one activation scale per fused GEMM: the largest, so no shard's input clips.
    input_scale = torch.stack(input_scales).max() if input_scales else None
    quantize = shards[0].quantize_input
    if all(s.is_block_wise for s in shards):
        block = shards[0].block
        for s in shards:
            if s.block != block or s.weight.shape[0] % block[0]:
                raise config_error(f"fused shards of {[x.weight.shape[0] for x in shards]} rows "
                                   f"do not split on block size {block}")
        return Fp8Weight(weight, torch.cat([s.scale for s in shards], 0), block,
                         input_scale, quantize)
    if any(s.is_block_wise for s in shards):
        raise config_error("a fused layer mixes block-wise and per-tensor FP8 scales")
    rows = [s.scale.float().expand(s.weight.shape[0], 1) if s.scale.numel() == 1
            else s.scale.float().reshape(-1, 1) for s in shards]
    return Fp8Weight(weight, torch.cat(rows, 0).contiguous(), (1, k), input_scale, quantize)


def shard_to_fp8(shard: dict[str, torch.Tensor], block: tuple[int, int] | None,
                 static_input: bool, quantize_input: bool = True) -> Fp8Weight:
    weight = shard["weight"]
    if weight.dtype != FP8_DTYPE:
        raise config_error(f"FP8 checkpoint weight has dtype {weight.dtype}, not float8_e4m3fn")
    n, k = weight.shape
    input_scale = shard.get("input_scale") if static_input else None
    if input_scale is not None:
        input_scale = input_scale.float().reshape(-1).max()
    if block is not None:
        scale = shard["weight_scale_inv"].float()
        want = (-(-n // block[0]), -(-k // block[1]))
        if tuple(scale.shape) != want:
            raise config_error(f"weight_scale_inv is {tuple(scale.shape)}, expected {want} for "
                               f"a [{n}, {k}] weight in {list(block)} blocks")
        return Fp8Weight(weight, scale.contiguous(), block, input_scale, quantize_input)
    scale = shard["weight_scale"].float()
    if scale.numel() == 1:
        return Fp8Weight(weight, scale.reshape(1, 1), (n, k), input_scale, quantize_input)
    if scale.numel() == n:
        return Fp8Weight(weight, scale.reshape(n, 1).contiguous(), (1, k), input_scale,
                         quantize_input)
    raise config_error(f"weight_scale of shape {tuple(scale.shape)} fits neither per-tensor nor "
                       f"per-channel scales of a [{n}, {k}] weight")


def fp8_layouts(block: tuple[int, int] | None, block_scale_name: str = "weight_scale_inv"
                ) -> Any:
    """sharding.Layouts of FP8 checkpoint tensors: weight [N, K]; block scales one per
    [BN, BK] block (a rank's features must start on a block); per-channel scales along N;
    per-tensor and input scales whole on every rank."""

    def layouts(name: str, tensor: torch.Tensor, shard: dict[str, torch.Tensor]) -> Any:
        if name == "weight":
            return (0, 1, 1), (1, 1, 1)
        if name == block_scale_name and block is not None:
            return (0, block[0], 1), (1, block[1], 1)
        if name in ("weight_scale", "weight_scale_inv") and tensor.numel() > 1:
            return (0, 1, 1), None
        return None, None

    return layouts


class Fp8Config(QuantConfig):
    name = "fp8"

    def __init__(self, *, serialized: bool, static_input: bool = False,
                 block: tuple[int, int] | None = None, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.serialized, self.static_input, self.block = serialized, static_input, block

    @classmethod
    def from_config(cls, cfg: dict[str, Any] | None) -> Fp8Config:
        if cfg is None or cfg.get("quant_method") != "fp8":   # --quantization fp8, 16-bit ckpt
            return cls(serialized=False)
        fmt = str(cfg.get("fmt", "e4m3"))
        if fmt != "e4m3":
            raise config_error(f"FP8 format {fmt!r} is not supported (only e4m3)")
        scheme = str(cfg.get("activation_scheme", "dynamic"))
        if scheme not in ("dynamic", "static"):
            raise config_error(f"FP8 activation_scheme {scheme!r} is not supported")
        block = cfg.get("weight_block_size")
        if block is not None:
            if len(block) != 2 or min(block) <= 0:
                raise config_error(f"weight_block_size {block} is not two positive ints")
            if scheme == "static":
                raise config_error("block-wise FP8 with static activation scales is not supported")
            block = (int(block[0]), int(block[1]))
        return cls(serialized=True, static_input=scheme == "static", block=block,
                   skip_modules=list(cfg.get("ignored_layers") or
                                     cfg.get("modules_to_not_convert") or []))

    def describe(self) -> str:
        if not self.serialized:
            return "fp8 (dynamic: weights quantized at load, per-channel scales)"
        kind = f"block {list(self.block)}" if self.block else "per-tensor"
        acts = "static" if self.static_input else "dynamic"
        return f"fp8 e4m3 {kind} weight scales, {acts} activations"

    def get_linear_method(self, prefix: str) -> LinearMethod | None:
        if prefix_matches(prefix, self.skip_modules):
            return None
        if not self.serialized:
            return Fp8LinearMethod(("weight",), lambda shard: shard["weight"], fp8_layouts(None))
        names = ("weight", "weight_scale_inv") if self.block else ("weight", "weight_scale")
        if self.static_input:
            names += ("input_scale",)
        return Fp8LinearMethod(names, lambda shard: shard_to_fp8(shard, self.block,
                                                                 self.static_input),
                               fp8_layouts(self.block))


class Fp8LinearMethod(LinearMethod):
    """`convert` turns one shard's tensors into an Fp8Weight, or returns a dense 16-bit weight
    that is quantized here (per channel) after the shards are stacked. `layouts`: where each
    checkpoint tensor runs along N and K (sharding.Layouts)."""

    def __init__(self, names: tuple[str, ...], convert: Any, layouts: Any) -> None:
        self.names, self.convert, self.layouts = names, convert, layouts

    def create_weights(self, layer: nn.Module, input_size: int, output_sizes: list[int]) -> None:
        layer.quant_input_size, layer.quant_output_sizes = input_size, list(output_sizes)
        layer.stash = ShardStash(self.names, len(output_sizes),
                                 sharded=getattr(layer, "tp_size", 1) > 1)
        layer.stash.register(layer)
        layer.fp8_weight = None

    def process_weights_after_loading(self, layer: nn.Module, dtype: torch.dtype) -> None:
        amax = None
        if layer.stash.sharded and layer.split_dim == "input_dim" and self.names == ("weight",):
            # a row shard quantized at load keeps the whole row's scale (one process's)
            amax = torch.cat([s["weight"].abs().amax(1, keepdim=True).float()
                              for s in layer.stash.tensors]).to(layer.stash.device)
        shards = [self.convert(shard) for shard in layer.stash.take(layer, self.layouts)]
        for index, s in enumerate(shards):
            shape = tuple(s.shape if isinstance(s, torch.Tensor) else s.weight.shape)
            if shape != (layer.quant_output_sizes[index], layer.quant_input_size):
                raise config_error(f"shard {index} weight is {shape}, the model expects "
                                   f"[{layer.quant_output_sizes[index]}, {layer.quant_input_size}]")
        if isinstance(shards[0], torch.Tensor):
            layer.fp8_weight = fp8_quantize_weight(torch.cat(shards, 0), amax)
        else:
            layer.fp8_weight = merge_fp8(shards)

    def apply(self, layer: nn.Module, x: torch.Tensor,
              bias: torch.Tensor | None = None) -> torch.Tensor:
        return kernels.fp8_gemm(x, layer.fp8_weight, bias)
