"""Gated DeltaNet (linear attention) kernels: the causal depthwise conv1d with its state and the
gated delta rule, over a flat batch of rows (a row: one request's tokens this step, a decode's
one token or a prefill chunk), each row continuing from its own state slot.

    x [T, C] | conv_states [S, C, K-1]  -> causal_conv1d  -> [T, C] (silu), states advanced
    q, k [T, Hk, Dk] v [T, Hv, Dv] g, beta [T, Hv] | ssm_states [S, Hv, Dk, Dv] float32
                                        -> gated_delta_rule -> o [T, Hv, Dv], states advanced

Per token t of a row, per value head h (its key head h // (Hv / Hk); q and k L2-normalised,
q scaled by Dk^-0.5):   S <- exp(g_t) S;   S <- S + k_t (beta_t (v_t - S^T k_t))^T;   o_t = S^T q_t

A row touches only its own slot: slots[r] indexes the states, query_start_loc_host[r] its tokens.
A fresh row (no context) starts from zeros, which the caller writes into its slot first.
References (the recurrent forms) sit beside the chunked torch form used for CPU prefill rows and
the Triton kernels for CUDA; kernels/dispatch.py picks."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from minserve.kernels.jit import jit, tl

# Prefill rows shorter than this run the recurrent form on CPU (the chunked form pads to 64).
CHUNK_SIZE = 64
MIN_CHUNKED_LEN = 16


def l2norm(x: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """As FLA (and transformers) normalise q and k: x * rsqrt(sum(x^2) + eps)."""
    return x * torch.rsqrt((x * x).sum(-1, keepdim=True) + eps)


# ---- the causal conv1d ------------------------------------------------------------------------
def causal_conv1d_ref(x: torch.Tensor, weight: torch.Tensor, state: torch.Tensor) -> torch.Tensor:
    """One row: x [L, C], weight [C, K], state [C, K-1] (the K-1 inputs before x; updated in
    place) -> silu(conv) [L, C]."""
    K = weight.shape[1]
    full = torch.cat((state.to(torch.float32), x.t().to(torch.float32)), dim=1)  # [C, K-1+L]
    out = F.conv1d(full[None], weight.float()[:, None, :], groups=weight.shape[0])[0]  # [C, L]
    state.copy_(full[:, full.shape[1] - (K - 1):])
    return F.silu(out).t().to(x.dtype)


def causal_conv1d_torch(x: torch.Tensor, weight: torch.Tensor, conv_states: torch.Tensor,
                        slots: list[int], qsl: list[int]) -> torch.Tensor:
    """All rows: one-token rows as one batched update, longer rows one at a time."""
    out = torch.empty_like(x)
    decode = [r for r in range(len(slots)) if qsl[r + 1] - qsl[r] == 1]
    if decode:
        idx = torch.tensor([slots[r] for r in decode], dtype=torch.long, device=x.device)
        toks = torch.tensor([qsl[r] for r in decode], dtype=torch.long, device=x.device)
        window = torch.cat((conv_states.index_select(0, idx).float(),
                            x.index_select(0, toks).float()[:, :, None]), dim=2)   # [N, C, K]
        out[toks] = F.silu((window * weight.float()).sum(-1)).to(x.dtype)
        conv_states.index_copy_(0, idx, window[:, :, 1:].to(conv_states.dtype))
    for r in range(len(slots)):
        if qsl[r + 1] - qsl[r] > 1:
            out[qsl[r]:qsl[r + 1]] = causal_conv1d_ref(x[qsl[r]:qsl[r + 1]], weight,
                                                       conv_states[slots[r]])
    return out


# ---- the gated delta rule ---------------------------------------------------------------------
def _prepare(q: torch.Tensor, k: torch.Tensor, num_v_heads: int) -> tuple[torch.Tensor, ...]:
    """q, k [L, Hk, Dk] -> float32 [L, Hv, Dk], normalised (q scaled), one per value head."""
    group = num_v_heads // q.shape[1]
    q, k = l2norm(q.float()), l2norm(k.float())
    q = q * q.shape[-1] ** -0.5
    if group > 1:
        q, k = q.repeat_interleave(group, dim=1), k.repeat_interleave(group, dim=1)
    return q, k


def gated_delta_rule_ref(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, g: torch.Tensor,
                         beta: torch.Tensor, state: torch.Tensor) -> torch.Tensor:
    """One row, token by token (the definition): q, k [L, Hk, Dk], v [L, Hv, Dv], g, beta
    [L, Hv], state [Hv, Dk, Dv] float32 (updated in place) -> o [L, Hv, Dv]."""
    q, k = _prepare(q, k, v.shape[1])
    v, g, beta = v.float(), g.float(), beta.float()
    s = state.float()
    out = torch.empty(v.shape, dtype=torch.float32, device=v.device)
    for t in range(v.shape[0]):
        s = s * g[t].exp()[:, None, None]
        delta = (v[t] - torch.einsum("hkv,hk->hv", s, k[t])) * beta[t][:, None]
        s = s + k[t][:, :, None] * delta[:, None, :]
        out[t] = torch.einsum("hkv,hk->hv", s, q[t])
    state.copy_(s)
    return out.to(v.dtype)


def chunk_gated_delta_rule(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, g: torch.Tensor,
                           beta: torch.Tensor, state: torch.Tensor,
                           chunk_size: int = CHUNK_SIZE) -> torch.Tensor:
    """The same as gated_delta_rule_ref, chunk by chunk (the UT transform of DeltaNet: within a
    chunk the delta-rule updates become triangular solves and matmuls; across chunks, one state
    update per chunk). Same arguments and result."""
    L = v.shape[0]
    q, k = _prepare(q, k, v.shape[1])
    # [H, L, D] in float32, padded to whole chunks (padding: g = 0, beta = 0: no effect)
    q, k, v = (x.transpose(0, 1).float() for x in (q, k, v))
    g, beta = g.t().float(), beta.t().float()
    pad = (-L) % chunk_size
    q, k, v = (F.pad(x, (0, 0, 0, pad)) for x in (q, k, v))
    g, beta = F.pad(g, (0, pad)), F.pad(beta, (0, pad))
    H, n = v.shape[0], (L + pad) // chunk_size
    q, k, v = (x.reshape(H, n, chunk_size, x.shape[-1]) for x in (q, k, v))
    g, beta = g.reshape(H, n, chunk_size), beta.reshape(H, n, chunk_size)
    k_beta, v_beta = k * beta[..., None], v * beta[..., None]
    cum = g.cumsum(-1)                                            # [H, n, C]
    upper = torch.ones(chunk_size, chunk_size, dtype=torch.bool, device=v.device).triu(1)
    decay = (cum[..., :, None] - cum[..., None, :]).masked_fill(upper, float("-inf")).exp()
    system = (k_beta @ k.transpose(-1, -2)) * decay               # unit lower triangular
    new_v = torch.linalg.solve_triangular(system, v_beta, upper=False, unitriangular=True)
    k_cum = torch.linalg.solve_triangular(system, k_beta * cum.exp()[..., None], upper=False,
                                          unitriangular=True)
    intra = (q @ k.transpose(-1, -2)) * decay
    q = q * cum.exp()[..., None]
    k = k * (cum[..., -1:] - cum).exp()[..., None]
    chunk_decay = cum[..., -1].exp()[..., None, None]             # [H, n, 1, 1]
    s = state.float()
    out = torch.empty_like(v)
    for i in range(n):
        vi = new_v[:, i] - k_cum[:, i] @ s
        out[:, i] = q[:, i] @ s + intra[:, i] @ vi
        s = s * chunk_decay[:, i] + k[:, i].transpose(-1, -2) @ vi
    state.copy_(s)
    return out.reshape(H, -1, v.shape[-1])[:, :L].transpose(0, 1)


def gated_delta_rule_torch(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, g: torch.Tensor,
                           beta: torch.Tensor, ssm_states: torch.Tensor, slots: list[int],
                           qsl: list[int]) -> torch.Tensor:
    """All rows on the CPU: one-token rows as one batched recurrent update over their gathered
    states, prefill rows chunked (short ones recurrent)."""
    out = torch.empty(v.shape, dtype=v.dtype, device=v.device)
    decode = [r for r in range(len(slots)) if qsl[r + 1] - qsl[r] == 1]
    if decode:
        idx = torch.tensor([slots[r] for r in decode], dtype=torch.long, device=v.device)
        toks = torch.tensor([qsl[r] for r in decode], dtype=torch.long, device=v.device)
        qd, kd = _prepare(q.index_select(0, toks), k.index_select(0, toks), v.shape[1])
        s = ssm_states.index_select(0, idx)                               # [N, Hv, Dk, Dv]
        s = s * g.index_select(0, toks).float().exp()[..., None, None]
        kv = torch.einsum("nhkv,nhk->nhv", s, kd)
        b = beta.index_select(0, toks).float()[..., None]
        delta = (v.index_select(0, toks).float() - kv) * b
        s = s + kd[..., :, None] * delta[..., None, :]
        out[toks] = torch.einsum("nhkv,nhk->nhv", s, qd).to(v.dtype)
        ssm_states.index_copy_(0, idx, s)
    for r in range(len(slots)):
        a, b = qsl[r], qsl[r + 1]
        if b - a > 1:
            fn = chunk_gated_delta_rule if b - a >= MIN_CHUNKED_LEN else gated_delta_rule_ref
            out[a:b] = fn(q[a:b], k[a:b], v[a:b], g[a:b], beta[a:b], ssm_states[slots[r]]
                          ).to(v.dtype)
    return out


# ---- Triton (CUDA; tested in the interpreter) -------------------------------------------------
@jit
def _gdn_recurrent_kernel(q_ptr, k_ptr, v_ptr, g_ptr, beta_ptr, o_ptr, state_ptr, slot_ptr,
                          qsl_ptr, num_k_heads, group, scale, DK: tl.constexpr, DV: tl.constexpr,
                          BK: tl.constexpr, BV: tl.constexpr):
    """One program per (row, value head, DV block): the row's tokens in order, its state block
    [DK, BV] in registers (float32) from the slot and back."""
    r, h, vb = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    num_v_heads = num_k_heads * group
    start = tl.load(qsl_ptr + r)
    end = tl.load(qsl_ptr + r + 1)
    slot = tl.load(slot_ptr + r).to(tl.int64)
    kh = h // group
    offs_k = tl.arange(0, BK)
    offs_v = vb * BV + tl.arange(0, BV)
    mk, mv = offs_k < DK, offs_v < DV
    s_ptrs = state_ptr + ((slot * num_v_heads + h) * DK + offs_k[:, None]) * DV + offs_v[None, :]
    s = tl.load(s_ptrs, mask=mk[:, None] & mv[None, :], other=0.0).to(tl.float32)
    for t in range(start, end):
        qk_off = (t * num_k_heads + kh) * DK + offs_k
        qt = tl.load(q_ptr + qk_off, mask=mk, other=0.0).to(tl.float32)
        kt = tl.load(k_ptr + qk_off, mask=mk, other=0.0).to(tl.float32)
        qt = qt * tl.rsqrt(tl.sum(qt * qt, 0) + 1e-6) * scale
        kt = kt * tl.rsqrt(tl.sum(kt * kt, 0) + 1e-6)
        vt = tl.load(v_ptr + (t * num_v_heads + h) * DV + offs_v, mask=mv, other=0.0
                     ).to(tl.float32)
        gt = tl.load(g_ptr + t * num_v_heads + h).to(tl.float32)
        bt = tl.load(beta_ptr + t * num_v_heads + h).to(tl.float32)
        s = s * tl.exp(gt)
        delta = (vt - tl.sum(s * kt[:, None], 0)) * bt
        s = s + kt[:, None] * delta[None, :]
        ot = tl.sum(s * qt[:, None], 0)
        tl.store(o_ptr + (t * num_v_heads + h) * DV + offs_v, ot.to(o_ptr.dtype.element_ty),
                 mask=mv)
    tl.store(s_ptrs, s, mask=mk[:, None] & mv[None, :])


def gated_delta_rule_triton(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, g: torch.Tensor,
                            beta: torch.Tensor, ssm_states: torch.Tensor, slots: torch.Tensor,
                            query_start_loc: torch.Tensor) -> torch.Tensor:
    """slots [R] int, query_start_loc [R+1] int32 (device tensors); as gated_delta_rule_torch."""
    import triton

    T, Hk, Dk = q.shape
    Hv, Dv = v.shape[1], v.shape[2]
    out = torch.empty_like(v)
    BK = triton.next_power_of_2(Dk)
    BV = min(triton.next_power_of_2(Dv), 32)
    grid = (slots.shape[0], Hv, triton.cdiv(Dv, BV))
    _gdn_recurrent_kernel[grid](q.contiguous(), k.contiguous(), v.contiguous(), g.contiguous(),
                                beta.contiguous(), out, ssm_states, slots, query_start_loc,
                                Hk, Hv // Hk, Dk ** -0.5, DK=Dk, DV=Dv, BK=BK, BV=BV)
    return out


@jit
def _conv1d_kernel(x_ptr, w_ptr, o_ptr, state_ptr, slot_ptr, qsl_ptr, C,
                   K: tl.constexpr, BC: tl.constexpr):
    """One program per (row, channel block): each output reads the K inputs ending at it (the
    first K-1 of a row from its state), then the row's last K-1 inputs become the state."""
    r, cb = tl.program_id(0), tl.program_id(1)
    start = tl.load(qsl_ptr + r)
    end = tl.load(qsl_ptr + r + 1)
    slot = tl.load(slot_ptr + r).to(tl.int64)
    offs = cb * BC + tl.arange(0, BC)
    mask = offs < C
    st = state_ptr + slot * C * (K - 1) + offs * (K - 1)
    for t in range(start, end):
        acc = tl.zeros((BC,), dtype=tl.float32)
        for j in tl.static_range(K):
            # a token index per lane (before `start`: the state's); vector, as the mask wants
            src = tl.zeros((BC,), dtype=tl.int32) + t - (K - 1) + j
            w = tl.load(w_ptr + offs * K + j, mask=mask, other=0.0).to(tl.float32)
            from_x = tl.load(x_ptr + src * C + offs, mask=mask & (src >= start), other=0.0)
            from_s = tl.load(st + (K - 1) + (src - start), mask=mask & (src < start), other=0.0)
            acc += w * (from_x.to(tl.float32) + from_s.to(tl.float32))
        acc = acc / (1.0 + tl.exp(-acc))
        tl.store(o_ptr + t * C + offs, acc.to(o_ptr.dtype.element_ty), mask=mask)
    n = end - start
    for j in tl.static_range(K - 1):       # new state[j] = (state | x)[n + j], j ascending
        src = tl.zeros((BC,), dtype=tl.int32) + n + j - (K - 1)   # < 0: old state, at j + n > j
        from_x = tl.load(x_ptr + (start + src) * C + offs, mask=mask & (src >= 0), other=0.0)
        from_s = tl.load(st + j + n, mask=mask & (src < 0), other=0.0)
        tl.store(st + j, (from_x.to(tl.float32) + from_s.to(tl.float32))
                 .to(state_ptr.dtype.element_ty), mask=mask)


def causal_conv1d_triton(x: torch.Tensor, weight: torch.Tensor, conv_states: torch.Tensor,
                         slots: torch.Tensor, query_start_loc: torch.Tensor) -> torch.Tensor:
    import triton

    T, C = x.shape
    out = torch.empty_like(x)
    BC = 64
    grid = (slots.shape[0], triton.cdiv(C, BC))
    _conv1d_kernel[grid](x.contiguous(), weight.contiguous(), out, conv_states, slots,
                         query_start_loc, C, K=weight.shape[1], BC=BC)
    return out
