"""Test-side writers of the AWQ and GPTQ checkpoint formats, following the producers' own
packing code (AutoAWQ WQLinear_GEMM.from_linear, AutoGPTQ QuantLinear.pack: the loops, not
vectorised, so a reader can hold them against the source), plus the group-wise round-to-nearest
quantizer both start from. Never imported by minserve."""
from __future__ import annotations

import torch

AWQ_ORDER_MAP = [0, 2, 4, 6, 1, 3, 5, 7]


def quantize_groups(w: torch.Tensor, bits: int, group_size: int, sym: bool,
                    g_idx: torch.Tensor | None = None
                    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Dense [N, K] -> (intweight [N, K], scales [G, N] fp16, zeros [G, N] int, g_idx [K]) with
    w ~ (intweight - zeros[g]) * scales[g], g = g_idx[k] (min/max round-to-nearest)."""
    n, k = w.shape
    if g_idx is None:
        g_idx = torch.arange(k) // group_size
    num_groups = int(g_idx.max()) + 1
    maxq = 2 ** bits - 1
    scales = torch.empty(num_groups, n)
    zeros = torch.empty(num_groups, n)
    for g in range(num_groups):
        cols = w[:, g_idx == g]
        lo, hi = cols.min(1).values.clamp(max=0), cols.max(1).values.clamp(min=0)
        if sym:
            hi = torch.maximum(lo.abs(), hi)
            scales[g] = (2 * hi / maxq).clamp(min=1e-5)
            zeros[g] = (maxq + 1) // 2
        else:
            scales[g] = ((hi - lo) / maxq).clamp(min=1e-5)
            zeros[g] = torch.round(-lo / scales[g])
    scales = scales.half()
    intweight = torch.empty(n, k, dtype=torch.int32)
    for col in range(k):
        g = g_idx[col]
        intweight[:, col] = torch.clamp(torch.round(w[:, col] / scales[g].float() + zeros[g]),
                                        0, maxq).to(torch.int32)
    return intweight, scales, zeros.to(torch.int32), g_idx.to(torch.int32)


def pack_awq(intweight: torch.Tensor, zeros: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """AutoAWQ from_linear: intweight [N, K] -> qweight [K, N // 8]; zeros [G, N] -> [G, N // 8]."""
    iw = intweight.t().contiguous()                                   # [K, N]
    qweight = torch.zeros(iw.shape[0], iw.shape[1] // 8, dtype=torch.int32)
    for col in range(iw.shape[1] // 8):
        for i in range(8):
            qweight[:, col] |= iw[:, col * 8 + AWQ_ORDER_MAP[i]] << (i * 4)
    qzeros = torch.zeros(zeros.shape[0], zeros.shape[1] // 8, dtype=torch.int32)
    for col in range(zeros.shape[1] // 8):
        for i in range(8):
            qzeros[:, col] |= zeros[:, col * 8 + AWQ_ORDER_MAP[i]] << (i * 4)
    return qweight, qzeros


def pack_gptq(intweight: torch.Tensor, zeros: torch.Tensor, bits: int, v1: bool = True
              ) -> tuple[torch.Tensor, torch.Tensor]:
    """AutoGPTQ QuantLinear.pack: intweight [N, K] -> qweight [K // P, N] (uint32 math, stored
    int32); zeros [G, N] (minus one in the v1 format) -> qzeros [G, N // P]."""
    per_word = 32 // bits
    iw = intweight.t().contiguous().to(torch.int64)                   # [K, N]
    qweight = torch.zeros(iw.shape[0] // per_word, iw.shape[1], dtype=torch.int64)
    for row in range(qweight.shape[0]):
        for j in range(per_word):
            qweight[row] |= iw[row * per_word + j] << (bits * j)
    z = zeros.to(torch.int64) - (1 if v1 else 0)
    z = z & (2 ** bits - 1)  # AutoGPTQ packs through uint32: a -1 zero wraps to all ones
    qzeros = torch.zeros(z.shape[0], z.shape[1] // per_word, dtype=torch.int64)
    for col in range(qzeros.shape[1]):
        for j in range(per_word):
            qzeros[:, col] |= z[:, col * per_word + j] << (bits * j)
    as_int32 = lambda t: (t - (t >= 2 ** 31).to(torch.int64) * 2 ** 32).to(torch.int32)  # noqa: E731
    return as_int32(qweight), as_int32(qzeros)


def dequantize_groups(intweight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor,
                      g_idx: torch.Tensor) -> torch.Tensor:
    """The producers' dequantization, (q - z[g]) * s[g], in fp16 as their torch paths do."""
    g = g_idx.long()
    return ((intweight - zeros[g].t()).half() * scales[g].t()).float()


# ---- whole tiny models: a quantized checkpoint folder and its producer-dequantized twin ------

LINEAR_NAMES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj",
                "qkv_proj", "gate_up_proj",   # (Phi-3 checkpoints keep these two fused)
                "per_layer_input_gate", "per_layer_projection", "per_layer_model_projection")


def _is_linear(name: str) -> bool:
    return name.endswith(".weight") and name.rsplit(".", 2)[-2] in LINEAR_NAMES


def quantize_model_folder(src: str, dst: str, ref: str, method: str, **opts) -> None:
    """Write `dst` (src's linear weights in `method`'s checkpoint format, quantization_config in
    config.json) and `ref` (the same model with those weights as the producer dequantizes them,
    dense). Everything else (norms, embeddings, tokenizer) is copied unchanged."""
    import json
    import os
    import shutil

    from safetensors.torch import load_file, save_file

    tensors = {}
    for f in sorted(os.listdir(src)):
        if f.endswith(".safetensors"):
            tensors.update(load_file(os.path.join(src, f)))
    out, dense = {}, {}
    for name, w in tensors.items():
        if not _is_linear(name):
            out[name] = dense[name] = w
            continue
        prefix = name.removesuffix(".weight")
        packed, dequantized = QUANTIZERS[method](w.float(), **opts)
        out.update({f"{prefix}.{k}": v for k, v in packed.items()})
        dense[name] = dequantized.to(w.dtype)
    for folder, state in ((dst, out), (ref, dense)):
        os.makedirs(folder, exist_ok=True)
        for f in os.listdir(src):
            if not f.endswith(".safetensors"):
                shutil.copy(os.path.join(src, f), os.path.join(folder, f))
        save_file(state, os.path.join(folder, "model.safetensors"))
    with open(os.path.join(dst, "config.json")) as f:
        config = json.load(f)
    config["quantization_config"] = QUANT_CONFIGS[method](**opts)
    with open(os.path.join(dst, "config.json"), "w") as f:
        json.dump(config, f, indent=2)


def _awq(w, group_size=32, **_):
    intweight, scales, zeros, g_idx = quantize_groups(w, 4, group_size, sym=False)
    qweight, qzeros = pack_awq(intweight, zeros)
    return ({"qweight": qweight, "qzeros": qzeros, "scales": scales},
            dequantize_groups(intweight, scales, zeros, g_idx))


def _gptq(w, bits=4, group_size=32, desc_act=False, sym=True, v1=True, **_):
    k = w.shape[1]
    g_idx = None
    if desc_act:
        gen = torch.Generator().manual_seed(k)
        g_idx = torch.empty(k, dtype=torch.long)
        g_idx[torch.randperm(k, generator=gen)] = torch.arange(k) // group_size
    intweight, scales, zeros, g_idx = quantize_groups(w, bits, group_size, sym, g_idx)
    if v1:
        zeros = zeros.clamp(min=1)
    qweight, qzeros = pack_gptq(intweight, zeros, bits, v1=v1)
    return ({"qweight": qweight, "qzeros": qzeros, "scales": scales, "g_idx": g_idx},
            dequantize_groups(intweight, scales, zeros, g_idx))


def _ct_int(w, bits=4, group_size=32, sym=True, **_):
    from compressed_tensors.compressors.pack_quantized.base import PackedQuantizationCompressor
    from compressed_tensors.quantization import QuantizationArgs, QuantizationScheme

    strategy = "group" if group_size else "channel"
    args = QuantizationArgs(num_bits=bits, type="int", symmetric=sym, strategy=strategy,
                            group_size=group_size)
    scheme = QuantizationScheme(targets=["Linear"], weights=args)
    n, k = w.shape
    g = group_size or k
    cols = w.view(n, k // g, g)
    half = 2 ** (bits - 1)
    if sym:
        scale, zp = cols.abs().amax(-1) / (half - 0.5), None
    else:
        lo, hi = cols.amin(-1), cols.amax(-1)
        scale = (hi - lo) / (2 * half - 1)
        zp = torch.clamp(torch.round(-half - lo / scale), -half, half - 1).to(torch.int8)
    state = {"weight": w.half(), "weight_scale": scale.clamp(min=1e-4).half()}
    if zp is not None:
        state["weight_zero_point"] = zp
    packed = PackedQuantizationCompressor.compress(state, scheme)
    dequantized = PackedQuantizationCompressor.decompress(packed, scheme)["weight"].float()
    return packed, dequantized


def _ct_fp8(w, strategy="channel", **_):
    from compressed_tensors.compressors.naive_quantized.base import FloatQuantizationCompressor
    from compressed_tensors.quantization import QuantizationArgs, QuantizationScheme

    weights = QuantizationArgs(num_bits=8, type="float", symmetric=True, strategy=strategy)
    acts = QuantizationArgs(num_bits=8, type="float", symmetric=True, strategy="token",
                            dynamic=True)
    scheme = QuantizationScheme(targets=["Linear"], weights=weights, input_activations=acts)
    amax = w.abs().amax(1, keepdim=True) if strategy == "channel" else w.abs().amax().view(1)
    packed = FloatQuantizationCompressor.compress(
        {"weight": w.bfloat16(), "weight_scale": (amax / 448).float()}, scheme)
    return packed, FloatQuantizationCompressor.decompress(packed, scheme)["weight"].float()


def _fp8_block(w, block=(32, 32), **_):
    """vLLM/DeepSeek block FP8: weight e4m3 and weight_scale_inv [ceil(N/BN), ceil(K/BK)]."""
    n, k = w.shape
    bn, bk = block
    sn, sk = -(-n // bn), -(-k // bk)
    padded = torch.zeros(sn * bn, sk * bk)
    padded[:n, :k] = w
    amax = padded.view(sn, bn, sk, bk).abs().amax(dim=(1, 3)).clamp(min=1e-6)
    scale = amax / 448
    full = scale.repeat_interleave(bn, 0)[:n].repeat_interleave(bk, 1)[:, :k]
    weight = (w / full).to(torch.float8_e4m3fn)
    return ({"weight": weight, "weight_scale_inv": scale.float()}, weight.float() * full)


QUANTIZERS = {"awq": _awq, "gptq": _gptq, "ct-int": _ct_int, "ct-fp8": _ct_fp8,
              "fp8-block": _fp8_block}
QUANT_CONFIGS = {
    "awq": lambda group_size=32, **_: {"quant_method": "awq", "bits": 4, "group_size": group_size,
                                      "version": "gemm", "zero_point": True},
    "gptq": lambda bits=4, group_size=32, desc_act=False, sym=True, v1=True, **_: {
        "quant_method": "gptq", "bits": bits, "group_size": group_size, "desc_act": desc_act,
        "sym": sym, "checkpoint_format": "gptq" if v1 else "gptq_v2"},
    "ct-int": lambda bits=4, group_size=32, sym=True, **_: {
        "quant_method": "compressed-tensors", "format": "pack-quantized", "ignore": ["lm_head"],
        "config_groups": {"group_0": {"targets": ["Linear"], "weights": {
            "num_bits": bits, "type": "int", "symmetric": sym,
            "strategy": "group" if group_size else "channel", "group_size": group_size}}}},
    "ct-fp8": lambda strategy="channel", **_: {
        "quant_method": "compressed-tensors", "format": "float-quantized", "ignore": ["lm_head"],
        "config_groups": {"group_0": {"targets": ["Linear"],
                                      "weights": {"num_bits": 8, "type": "float",
                                                  "strategy": strategy, "symmetric": True},
                                      "input_activations": {"num_bits": 8, "type": "float",
                                                            "strategy": "token",
                                                            "dynamic": True}}}},
    "fp8-block": lambda block=(32, 32), **_: {"quant_method": "fp8", "fmt": "e4m3",
                                             "activation_scheme": "dynamic",
                                             "weight_block_size": list(block)},
}


def k_quant_blocks(shape: tuple[int, int], type_name: str, std: float, seed: int = 0):
    """Random Q4_K/Q5_K/Q6_K rows [N, K / 256 * block bytes] uint8 whose values have about
    `std` spread (gguf-py cannot quantize K-quants; any bytes with finite super-scales are valid
    blocks, and gguf-py's dequantize says what they hold)."""
    import numpy as np
    from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

    n, k = shape
    block, size = GGML_QUANT_SIZES[GGMLQuantizationType[type_name]]
    rng = np.random.default_rng(seed)
    raw = rng.integers(0, 256, (n, k // block, size), dtype=np.uint8)
    if type_name == "Q6_K":      # w = d * sc * (q - 32): q - 32 ~ U(-32, 32), sc int8
        raw[:, :, 192:208] = rng.integers(8, 24, (n, k // block, 16), dtype=np.uint8)
        d = np.full((n, k // block), std / (16 * 18), dtype=np.float16)
        raw[:, :, 208:210] = d.view(np.uint8).reshape(n, k // block, 2)
    else:                        # w = d * sc * q - dmin * m, 6-bit sc/m, q up to 15 or 31
        top = 15 if type_name == "Q4_K" else 31
        d = np.full((n, k // block), 2 * std / (32 * top), dtype=np.float16)
        raw[:, :, 0:2] = d.view(np.uint8).reshape(n, k // block, 2)
        raw[:, :, 2:4] = d.view(np.uint8).reshape(n, k // block, 2)   # dmin = d: centred-ish
    return raw.reshape(n, -1)
