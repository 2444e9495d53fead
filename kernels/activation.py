"""SiLU-and-multiply for the gated MLP: out = silu(gate) * up, with gate and up the two halves
of the fused gate_up projection. Plain-torch reference and a Triton kernel; nothing else."""
from __future__ import annotations

import torch
import torch.nn.functional as F

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU-only installs: the reference still works, the kernel is never called
    triton = tl = None

_jit = triton.jit if triton is not None else (lambda fn: fn)


def silu_and_mul_ref(x: torch.Tensor) -> torch.Tensor:
    """x [..., 2I] = [gate | up] -> [..., I], computed in fp32, rounded once."""
    gate, up = x.chunk(2, dim=-1)
    return (F.silu(gate.float()) * up.float()).to(x.dtype)


@_jit
def _silu_and_mul_kernel(out_ptr, x_ptr, stride_x, stride_o, I: tl.constexpr,  # noqa: E741 (the intermediate size)
                         BLOCK: tl.constexpr):
    """Grid (num_rows, cdiv(I, BLOCK))."""
    row = tl.program_id(0).to(tl.int64)
    offs = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < I
    gate = tl.load(x_ptr + row * stride_x + offs, mask=mask, other=0.0).to(tl.float32)
    up = tl.load(x_ptr + row * stride_x + I + offs, mask=mask, other=0.0).to(tl.float32)
    out = gate / (1.0 + tl.exp(-gate)) * up
    tl.store(out_ptr + row * stride_o + offs, out.to(out_ptr.dtype.element_ty), mask=mask)


def silu_and_mul_triton(x: torch.Tensor) -> torch.Tensor:
    inter = x.shape[-1] // 2
    x2 = x.reshape(-1, x.shape[-1])
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    out = torch.empty(x2.shape[0], inter, dtype=x.dtype, device=x.device)
    block = min(1024, triton.next_power_of_2(inter))
    _silu_and_mul_kernel[(x2.shape[0], triton.cdiv(inter, block))](
        out, x2, x2.stride(0), out.stride(0), I=inter, BLOCK=block)
    return out.view(*x.shape[:-1], inter)
