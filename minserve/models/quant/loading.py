"""The loader's side of quantization: finish each quantized layer once its checkpoint tensors
are in (repack into the kernel layout), random quantized weights for load_format="dummy", and
the weights' memory for the start-up log. Reads no checkpoint itself."""
from __future__ import annotations

import torch
from torch import nn

from minserve import kernels
from minserve.kernels.fp8_gemm import FP8_MAX, Fp8Weight
from minserve.kernels.quant_gemm import IntWeight, pack_int


def quantized_layers(model: nn.Module) -> list[nn.Module]:
    return [m for m in model.modules()
            if hasattr(getattr(m, "quant_method", None), "process_weights_after_loading")]


@torch.no_grad()
def finish_loading(model: nn.Module, dtype: torch.dtype) -> None:
    for layer in quantized_layers(model):
        layer.quant_method.process_weights_after_loading(layer, dtype)


@torch.no_grad()
def init_dummy_quantized(model: nn.Module, seed: int = 0) -> None:
    """Random weights in each quantized layer's kernel layout, generated on its device: int
    layers get int4 values with group-128 scales (int8 for int8 configs), FP8 layers e4m3 with
    per-channel scales; both sized so outputs stay O(1) like the dense dummy weights."""
    for i, layer in enumerate(quantized_layers(model)):
        params = list(layer.parameters(recurse=False))
        device = params[0].device if params else torch.device("cpu")
        gen = torch.Generator(device=device).manual_seed(seed + i)
        k, n = layer.quant_input_size, sum(layer.quant_output_sizes)
        for name in list(layer.stash.names):
            delattr(layer, name)
        del layer.stash
        if hasattr(layer, "parts"):
            bits = getattr(layer.quant_method.config, "bits", 4) or 4
            group = getattr(layer.quant_method.config, "group_size", 128) or 128
            group = k if group == -1 or k % group else group
            q = torch.randint(0, 2 ** bits, (k, n), device=device, generator=gen)
            scale = torch.full((k // group, n), 0.04 / 2 ** (bits - 3), device=device)
            layer.parts = [kernels.prepare_int_weight(
                IntWeight(pack_int(q, bits), scale, -scale * 2 ** (bits - 1), bits, group))]
        else:
            w = torch.randn(n, k, device=device, generator=gen) * 0.02
            scale = w.abs().amax(1, keepdim=True) / FP8_MAX
            layer.fp8_weight = Fp8Weight((w / scale).to(torch.float8_e4m3fn), scale, (1, k))


def weight_bytes(model: nn.Module) -> int:
    """Bytes of every parameter, buffer and kernel-layout weight the model holds."""
    total = sum(t.numel() * t.element_size() for t in model.parameters())
    total += sum(t.numel() * t.element_size() for t in model.buffers())
    for layer in quantized_layers(model):
        for part in getattr(layer, "parts", []):
            total += part.numel() * part.element_size() if isinstance(part, torch.Tensor) \
                else part.nbytes()
        if getattr(layer, "fp8_weight", None) is not None:
            total += layer.fp8_weight.nbytes()
    # mixture-of-experts layers keep their experts stacked outside any parameter
    total += sum(m.nbytes() for m in model.modules() if hasattr(m, "finish_loading"))
    return total
