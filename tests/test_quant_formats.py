"""Each checkpoint format's repacking into the int GEMM layout, checked against the producer's own
dequantization: compressed-tensors' and gguf-py's code where they install, and for AWQ/GPTQ the
packers in tests/quant_packers.py, themselves checked on hand-computed words."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from minserve.kernels.quant_gemm import dequantize_int, int_gemm_ref, pack_int, unpack_int

from minserve.config import ConfigError
from minserve.models.quant.awq import awq_to_int, unpack_awq
from minserve.models.quant.gptq import gptq_to_int
from tests.quant_packers import dequantize_groups, pack_awq, pack_gptq, quantize_groups


def test_pack_int_layout_hand_checked():
    # Column 0 holds rows 0..7 = 0..7, column 1 holds 15, 0, 0, ...: word = nibbles little end
    # first, so rows 0..7 read 0x76543210 and row 0 = 15 alone reads 0x0000000F.
    q = torch.zeros(8, 2, dtype=torch.int32)
    q[:, 0] = torch.arange(8)
    q[0, 1] = 15
    words = pack_int(q, 4)
    assert words.tolist() == [[0x76543210, 0xF]]
    q8 = torch.tensor([[1], [2], [3], [255]])
    assert pack_int(q8, 8).tolist() == [[0xFF030201 - 2 ** 32]]
    assert torch.equal(unpack_int(words, 4), q)


def test_awq_packer_hand_checked():
    # One row of columns 0..7 with values = column index: AWQ order puts columns 0,2,4,6,1,3,5,7
    # in nibbles 0..7, so the word reads (high nibble first) 7 5 3 1 6 4 2 0.
    intweight = torch.arange(8, dtype=torch.int32)[:, None]          # [N=8, K=1]
    qweight, _ = pack_awq(intweight, torch.zeros(1, 8, dtype=torch.int32))
    assert qweight.tolist() == [[0x75316420]]
    assert unpack_awq(qweight).tolist() == [list(range(8))]


def test_gptq_packer_hand_checked():
    intweight = torch.arange(8, dtype=torch.int32)[None, :]          # [N=1, K=8]
    zeros = torch.full((1, 8), 8, dtype=torch.int32)                 # sym 4-bit: z = 8
    qweight, qzeros = pack_gptq(intweight.expand(8, 8), zeros, 4, v1=True)
    assert qweight[0].tolist() == [0x76543210] * 8
    assert qzeros.tolist() == [[0x77777777]]                         # v1 stores z - 1 = 7
    _, qzeros_v2 = pack_gptq(intweight.expand(8, 8), zeros, 4, v1=False)
    assert qzeros_v2.tolist() == [[0x88888888 - 2 ** 32]]


@pytest.mark.parametrize("group_size", [32, 64, 128])
def test_awq_matches_producer(group_size):
    torch.manual_seed(group_size)
    n, k = 48, 256
    w = torch.randn(n, k)
    intweight, scales, zeros, g_idx = quantize_groups(w, 4, group_size, sym=False)
    qweight, qzeros = pack_awq(intweight, zeros)
    got = awq_to_int(qweight, qzeros, scales, group_size)
    want = dequantize_groups(intweight, scales, zeros, g_idx)
    torch.testing.assert_close(dequantize_int(got, torch.float16).float(), want, rtol=0, atol=0)


@pytest.mark.parametrize("bits,group_size,sym,desc_act,v1", [
    (4, 128, True, False, True), (4, 32, False, True, True), (8, 64, True, True, False),
    (8, 128, False, False, True), (4, 64, False, False, False),
])
def test_gptq_matches_producer(bits, group_size, sym, desc_act, v1):
    torch.manual_seed(bits * group_size)
    n, k = 64, 256
    w = torch.randn(n, k)
    g_idx = None
    if desc_act:   # GPTQ act-order: rows quantized in a shuffled order, g_idx = rank // G
        order = torch.randperm(k)
        g_idx = torch.empty(k, dtype=torch.long)
        g_idx[order] = torch.arange(k) // group_size
    intweight, scales, zeros, g_idx = quantize_groups(w, bits, group_size, sym, g_idx)
    if v1:
        zeros = zeros.clamp(min=1)   # AutoGPTQ v1 cannot store z = 0 (z - 1 wraps); see packer
    qweight, qzeros = pack_gptq(intweight, zeros, bits, v1=v1)
    got = gptq_to_int(qweight, qzeros, scales, g_idx, bits, group_size, zeros_offset_by_one=v1)
    assert (got.perm is not None) == desc_act
    want = dequantize_groups(intweight, scales, zeros, g_idx)
    torch.testing.assert_close(dequantize_int(got, torch.float16).float(), want, rtol=0, atol=0)
    x = torch.randn(3, k)
    torch.testing.assert_close(int_gemm_ref(x, got), x @ want.t(), rtol=0, atol=3e-2)


def test_gptq_ragged_act_order_is_refused():
    g_idx = torch.tensor([0, 0, 0, 1, 1, 2, 3, 3])                     # groups of 3, 2, 1, 2
    with pytest.raises(ConfigError, match="not all of size 2"):
        gptq_to_int(torch.zeros(1, 8, dtype=torch.int32), torch.zeros(4, 1, dtype=torch.int32),
                    torch.ones(4, 8).half(), g_idx, 4, 2, True)


# ---- compressed-tensors: its own compressor writes, its own decompressor is the reference ----

@pytest.mark.parametrize("bits,strategy,group_size,sym", [
    (4, "group", 32, True), (4, "group", 128, False), (8, "channel", None, True),
    (8, "group", 64, False), (4, "channel", None, False),
])
def test_compressed_tensors_pack_quantized_matches_library(bits, strategy, group_size, sym):
    ct = pytest.importorskip("compressed_tensors")
    from compressed_tensors.compressors.pack_quantized.base import PackedQuantizationCompressor
    from compressed_tensors.quantization import QuantizationArgs, QuantizationScheme

    from minserve.models.quant.compressed_tensors import pack_quantized_to_int

    assert ct
    torch.manual_seed(bits + (group_size or 0))
    n, k = 40, 256
    args = QuantizationArgs(num_bits=bits, type="int", symmetric=sym, strategy=strategy,
                            group_size=group_size)
    scheme = QuantizationScheme(targets=["Linear"], weights=args)
    num_groups = k // group_size if group_size else 1
    half = 2 ** (bits - 1)
    state = {"weight": torch.randn(n, k).half(),
             "weight_scale": (torch.rand(n, num_groups) * 2 / half + 1e-3).half()}
    if not sym:
        state["weight_zero_point"] = torch.randint(-half // 2, half // 2, (n, num_groups),
                                                   dtype=torch.int8)
    packed = PackedQuantizationCompressor.compress(state, scheme)
    want = PackedQuantizationCompressor.decompress(packed, scheme)["weight"].float()
    got = pack_quantized_to_int(packed["weight_packed"], packed["weight_scale"],
                                packed.get("weight_zero_point"), None, bits, group_size or k)
    torch.testing.assert_close(dequantize_int(got, torch.float16).float(), want, rtol=0, atol=0)


@pytest.mark.parametrize("strategy", ["tensor", "channel", "block"])
def test_compressed_tensors_fp8_matches_library(strategy):
    pytest.importorskip("compressed_tensors")
    from compressed_tensors.compressors.naive_quantized.base import FloatQuantizationCompressor
    from compressed_tensors.quantization import QuantizationArgs, QuantizationScheme
    from minserve.kernels.fp8_gemm import dequantize_fp8

    from minserve.models.quant.fp8 import shard_to_fp8

    torch.manual_seed(3)
    n, k = 256, 384
    kwargs = {"block_structure": [128, 128]} if strategy == "block" else {}
    weights = QuantizationArgs(num_bits=8, type="float", symmetric=True, strategy=strategy,
                               **kwargs)
    acts = QuantizationArgs(num_bits=8, type="float", symmetric=True, strategy="token",
                            dynamic=True)
    scheme = QuantizationScheme(targets=["Linear"], weights=weights, input_activations=acts)
    shape = {"tensor": (1,), "channel": (n, 1), "block": (n // 128, k // 128)}[strategy]
    w = torch.randn(n, k).bfloat16()
    state = {"weight": w, "weight_scale": torch.rand(shape) * 0.01 + 1e-3}
    packed = FloatQuantizationCompressor.compress(state, scheme)
    want = FloatQuantizationCompressor.decompress(packed, scheme)["weight"].float()
    shard = dict(packed)
    block = (128, 128) if strategy == "block" else None
    if block:
        shard["weight_scale_inv"] = shard["weight_scale"]
    got = dequantize_fp8(shard_to_fp8(shard, block, static_input=False))
    torch.testing.assert_close(got, want.to(got.dtype), rtol=0, atol=0)


# ---- GGUF: gguf-py quantizes (where it can) and dequantizes: our repack must equal it ----

def _gguf_blocks(type_name: str, n: int, k: int) -> np.ndarray:
    from gguf import GGML_QUANT_SIZES, GGMLQuantizationType
    from gguf.quants import quantize

    qtype = GGMLQuantizationType[type_name]
    rng = np.random.default_rng(k)
    if type_name in ("Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0"):
        return quantize(rng.standard_normal((n, k)).astype(np.float32), qtype)
    # gguf-py cannot quantize K-quants: random block bytes are valid blocks once the fp16
    # super-scales are set to finite values.
    block, size = GGML_QUANT_SIZES[qtype]
    raw = rng.integers(0, 256, (n, k // block, size), dtype=np.uint8)
    d_offsets = {"Q4_K": (0, 2), "Q5_K": (0, 2), "Q6_K": (208,)}[type_name]
    for off in d_offsets:
        d = (rng.random((n, k // block)) * 0.01 + 1e-4).astype(np.float16)
        raw[:, :, off:off + 2] = d.view(np.uint8).reshape(n, k // block, 2)
    return raw.reshape(n, -1)


@pytest.mark.parametrize("type_name", ["Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0", "Q4_K", "Q5_K",
                                       "Q6_K"])
def test_gguf_repack_equals_gguf_dequantize(type_name):
    from gguf import GGMLQuantizationType
    from gguf.quants import dequantize

    from minserve.kernels.gguf_blocks import dequantize_ref, to_int_weight
    from minserve.models.quant.gguf import gguf_to_int

    n, k = 24, 512
    raw = _gguf_blocks(type_name, n, k)
    want = torch.from_numpy(dequantize(raw, GGMLQuantizationType[type_name]).reshape(n, k))
    got = gguf_to_int(torch.from_numpy(raw), int(GGMLQuantizationType[type_name]), k)
    assert got.type_name == type_name and got.blocks.shape == raw.shape
    torch.testing.assert_close(dequantize_ref(got), want.float(), rtol=0, atol=0)
    repacked = to_int_weight(got)
    assert repacked.bits == (4 if type_name in ("Q4_0", "Q4_1", "Q4_K") else 8)
    torch.testing.assert_close(dequantize_int(repacked), want.float(), rtol=0, atol=0)


def test_gguf_unsupported_type_names_it():
    from gguf import GGMLQuantizationType

    from minserve.models.quant.gguf import gguf_to_int

    raw = torch.zeros(2, 110, dtype=torch.uint8)
    with pytest.raises(ConfigError, match="Q3_K cannot be served quantized"):
        gguf_to_int(raw, int(GGMLQuantizationType.Q3_K), 256)


@pytest.mark.parametrize("n,k,group,act_order", [(48, 256, 32, False), (32, 128, 64, True),
                                                 (64, 512, 128, False), (16, 512, 256, False)])
def test_cpu_int4_kernel_matches_reference(n, k, group, act_order):
    """torch's CPU int4 GEMM (bf16 activations) against the exact reference, M = 1 and 100."""
    from minserve.kernels.quant_gemm import (
        IntWeight,
        cpu_int4_gemm,
        cpu_int4_supported,
        to_cpu_int4,
    )

    torch.manual_seed(n + k)
    q = torch.randint(0, 16, (k, n))
    w = IntWeight(pack_int(q, 4), torch.rand(k // group, n) * 0.05 + 0.01,
                  torch.randn(k // group, n) * 0.1, 4, group,
                  torch.randperm(k) if act_order else None)
    assert cpu_int4_supported(w)
    packed = to_cpu_int4(w)
    assert packed.nbytes() < w.nbytes()
    for m in (1, 100):
        x = torch.randn(m, k)
        want = int_gemm_ref(x, w)
        torch.testing.assert_close(cpu_int4_gemm(x, packed), want, rtol=0,
                                   atol=1e-2 * float(want.abs().max()))
