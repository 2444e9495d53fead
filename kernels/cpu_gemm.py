"""Dense float32 linears on CPU through oneDNN with a prepacked weight, for more than one row,
and the output layer on the native int8 kernel when its weight is exactly 8-bit. The dispatch
(dispatch.py linear, logits) calls these on CPU; each returns None where it does not apply.

Why oneDNN: torch's CPU F.linear calls MKL's sgemm, and on AMD CPUs (AVX2 EPYC) MKL's small-M
GEMM scales almost linearly with the number of rows: a batch-16 decode step spent 3.7x the matmul
time of a batch-1 step on weights that are read once either way. oneDNN picks its kernel by ISA,
not vendor; with the weight reordered once into its blocked layout it took half MKL's CPU time
at 2-16 rows (bench/RESULTS.md, "Batched decode on AVX2"). One row (a lone decode) stays on MKL,
whose GEMV was ~25% faster. MINSERVE_CPU_ONEDNN=0 (minserve/env.py) uses F.linear always.

The packed copy lives beside the weight (so loaders, LoRA and state_dict still see the plain
one) and is redone when the weight changes in place (its version counter moves): the cost is a
second copy of each dense linear weight in host memory.
"""
from __future__ import annotations

import torch
from minserve.kernels import cpu_native
from minserve.kernels.cpu_native import CpuIntWeight

from minserve import env

PACK_BATCH_HINT = 16        # oneDNN picks the blocked layout for about this many rows


def available() -> bool:
    return (env.CPU_ONEDNN and torch.backends.mkldnn.is_available()
            and hasattr(torch.ops.mkldnn, "_reorder_linear_weight"))


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
           owner: object) -> torch.Tensor | None:
    """F.linear(x, weight, bias) through oneDNN; `owner` (the layer) keeps the packed weight
    between calls. None for what F.linear does better: one row, other dtypes, no oneDNN."""
    if (x.dtype != torch.float32 or weight.dtype != torch.float32 or x.dim() != 2
            or x.shape[0] < 2 or not available()):
        return None
    # An inference tensor (a model loaded under inference_mode) has no version counter.
    version = -1 if weight.is_inference() else weight._version
    key = (weight.data_ptr(), version, tuple(weight.shape))
    cached = getattr(owner, "_onednn_weight", None)
    if cached is None or cached[0] != key:
        with torch.no_grad():
            packed = torch.ops.mkldnn._reorder_linear_weight(weight.detach(), PACK_BATCH_HINT)
        cached = (key, packed)
        owner._onednn_weight = cached
    rows = x.shape[0]
    padded = bucket_rows(rows)
    if padded != rows:    # one oneDNN primitive per (shape, bucket), not per row count
        x = torch.cat([x, x.new_zeros(padded - rows, x.shape[1])])
        return torch.ops.mkldnn._linear_pointwise(x, cached[1], bias, "none", [], "")[:rows]
    return torch.ops.mkldnn._linear_pointwise(x, cached[1], bias, "none", [], "")


def bucket_rows(rows: int) -> int:
    """The row count a linear of `rows` rows runs at: 2, 4, then multiples of 4 to 16, of 8 to
    64, of 32 to 256, of 128 beyond. oneDNN JIT-compiles and caches a primitive for every row
    count it sees (~0.6 MiB each for the default model, up to 1,024 of them, tens of ms to
    build): unbucketed, a mixed load of prefill chunks and batch sizes grew RSS by ~600 MiB
    (bench/RESULTS.md, "Memory"). Padding rows costs little where the weight's bytes, read once
    for all rows, are the time."""
    if rows <= 4:
        return 2 if rows <= 2 else 4
    step = 4 if rows <= 16 else 8 if rows <= 64 else 32 if rows <= 256 else 128
    return -(-rows // step) * step


def int8_weight(weight: torch.Tensor, owner: object) -> CpuIntWeight | None:
    """The output layer's weight as the native 8-bit layout when it is exactly 8-bit (a GGUF Q8_0
    embedding, dequantized at load: cpu_native.int8_exact), else None. The int kernel reads a
    quarter of the bytes: at one decode row the fp32 output layer of the default model was
    ~11 ms of a ~40 ms step. Checked once per weight, on the first call; `owner` keeps it."""
    if weight.dtype != torch.float32 or not cpu_native.available():
        return None
    key = (weight.data_ptr(), tuple(weight.shape))
    cached = getattr(owner, "_int8_logits", None)
    if cached is None or cached[0] != key:
        with torch.no_grad():
            cached = (key, cpu_native.int8_exact(weight.detach()))
        owner._int8_logits = cached
    return cached[1]
