"""RMSNorm, optionally fused with the residual add that precedes it in every decoder layer.
Plain-torch reference (HF Llama numerics) and a Triton kernel of one program per row."""

from __future__ import annotations

import torch

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU-only installs: the reference still works, the kernel is never called
    triton = tl = None

_jit = triton.jit if triton is not None else (lambda fn: fn)


def rmsnorm_ref(
    x: torch.Tensor,  # [..., N]
    weight: torch.Tensor,  # [N]
    eps: float,
    residual: torch.Tensor | None = None,  # [..., N], same dtype as x
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """residual None -> norm(x); else h = x + residual, returns (norm(h), h) (h is the next
    residual). Sums and the mean of squares run in fp32; h is rounded to x.dtype first, as HF
    does."""
    h = x if residual is None else (x.float() + residual.float()).to(x.dtype)
    hf = h.float()
    y = hf * torch.rsqrt(hf.pow(2).mean(-1, keepdim=True) + eps)
    out = (y * weight.float()).to(x.dtype)
    return out if residual is None else (out, h)


@_jit
def _rmsnorm_kernel(
    out_ptr,
    new_residual_ptr,
    x_ptr,
    residual_ptr,
    weight_ptr,
    eps,
    stride_x,
    stride_r,
    stride_o,
    stride_nr,
    N: tl.constexpr,
    BLOCK_N: tl.constexpr,
    HAS_RESIDUAL: tl.constexpr,
):
    """Grid (num_rows,): one program normalizes one row of N <= BLOCK_N elements."""
    row = tl.program_id(0).to(tl.int64)
    offs = tl.arange(0, BLOCK_N)
    mask = offs < N
    x = tl.load(x_ptr + row * stride_x + offs, mask=mask, other=0.0)
    if HAS_RESIDUAL:
        r = tl.load(residual_ptr + row * stride_r + offs, mask=mask, other=0.0)
        x = (x.to(tl.float32) + r.to(tl.float32)).to(x.dtype)
        tl.store(new_residual_ptr + row * stride_nr + offs, x, mask=mask)
    h = x.to(tl.float32)
    rstd = 1.0 / tl.sqrt(tl.sum(h * h, axis=0) / N + eps)
    w = tl.load(weight_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    tl.store(
        out_ptr + row * stride_o + offs, (h * rstd * w).to(out_ptr.dtype.element_ty), mask=mask
    )


def rmsnorm_triton(
    x: torch.Tensor,
    weight: torch.Tensor,
    eps: float,
    residual: torch.Tensor | None = None,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    n = x.shape[-1]
    x2 = x.reshape(-1, n)
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    out = torch.empty(x2.shape, dtype=x.dtype, device=x.device)
    r2 = new_residual = x2  # placeholders when there is no residual
    if residual is not None:
        r2 = residual.reshape(-1, n)
        if r2.stride(-1) != 1:
            r2 = r2.contiguous()
        new_residual = torch.empty_like(out)
    block_n = triton.next_power_of_2(n)
    _rmsnorm_kernel[(x2.shape[0],)](
        out,
        new_residual,
        x2,
        r2,
        weight,
        eps,
        x2.stride(0),
        r2.stride(0),
        out.stride(0),
        new_residual.stride(0),
        N=n,
        BLOCK_N=block_n,
        HAS_RESIDUAL=residual is not None,
        num_warps=min(16, max(1, block_n // 512)),
    )
    if residual is None:
        return out.view(x.shape)
    return out.view(x.shape), new_residual.view(x.shape)
