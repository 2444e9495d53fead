"""The Gated DeltaNet Triton kernels (kernels/gdn.py) against their recurrent references, run by
tests/test_gdn.py in ONE child process started with TRITON_INTERPRET=1 (see tests/test_kernels.py
for why). Mixed rows: decodes, short and long prefill chunks, in shuffled state slots, some
continuing from non-zero states; grouped value heads; a head dim that is not a power of two.
    TRITON_INTERPRET=1 python tests/gdn_kernel_checks.py 'gdn[Hk=2,Hv=4,Dk=16,Dv=24]'"""
from __future__ import annotations

import json
import sys
import traceback

import torch
from minserve.kernels import gdn

CHECKS: dict[str, object] = {}
ROWS = [1, 6, 1, 11]           # tokens per row: decodes between prefill chunks


def check(name: str):
    def register(fn):
        CHECKS[name] = fn
        return fn
    return register


def mixed_rows(lens: list[int], num_slots: int, seed: int):
    """(query_start_loc list, slots list): each row gets a distinct shuffled slot."""
    gen = torch.Generator().manual_seed(seed)
    slots = torch.randperm(num_slots, generator=gen)[:len(lens)].tolist()
    qsl = [0]
    for n in lens:
        qsl.append(qsl[-1] + n)
    return qsl, slots


def gdn_inputs(T: int, Hk: int, Hv: int, Dk: int, Dv: int, seed: int, dtype=torch.float32):
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(T, Hk, Dk, generator=gen).to(dtype)
    k = torch.randn(T, Hk, Dk, generator=gen).to(dtype)
    v = torch.randn(T, Hv, Dv, generator=gen).to(dtype)
    g = -torch.rand(T, Hv, generator=gen) * 2          # log decay <= 0
    beta = torch.rand(T, Hv, generator=gen)
    return q, k, v, g, beta


def reference_rows(fn, qsl, slots, states, *per_token):
    """Run a one-row reference over every row, on a copy of the states."""
    states = states.clone()
    outs = [fn(*(x[qsl[r]:qsl[r + 1]] for x in per_token), states[slots[r]])
            for r in range(len(slots))]
    return torch.cat(outs), states


def _gdn(Hk: int, Hv: int, Dk: int, Dv: int):
    def run():
        qsl, slots = mixed_rows(ROWS, 8, Hk * 31 + Dv)
        q, k, v, g, beta = gdn_inputs(qsl[-1], Hk, Hv, Dk, Dv, Dk)
        states = torch.randn(8, Hv, Dk, Dv) * 0.1
        ref, ref_states = reference_rows(gdn.gated_delta_rule_ref, qsl, slots, states,
                                         q, k, v, g, beta)
        got_states = states.clone()
        got = gdn.gated_delta_rule_triton(q, k, v, g, beta, got_states, torch.tensor(slots),
                                          torch.tensor(qsl, dtype=torch.int32))
        torch.testing.assert_close(got, ref, atol=2e-4, rtol=1e-4)
        torch.testing.assert_close(got_states, ref_states, atol=2e-4, rtol=1e-4)
    return run


def _conv(C: int, K: int, dtype: torch.dtype):
    def run():
        qsl, slots = mixed_rows(ROWS + [2], 9, C + K)
        gen = torch.Generator().manual_seed(C)
        x = torch.randn(qsl[-1], C, generator=gen).to(dtype)
        w = torch.randn(C, K, generator=gen).to(dtype)
        states = torch.randn(9, C, K - 1, generator=gen).to(dtype)
        ref, ref_states = reference_rows(lambda xr, s: gdn.causal_conv1d_ref(xr, w, s),
                                         qsl, slots, states, x)
        got_states = states.clone()
        got = gdn.causal_conv1d_triton(x, w, got_states, torch.tensor(slots),
                                       torch.tensor(qsl, dtype=torch.int32))
        tol = 2e-5 if dtype == torch.float32 else 2e-2
        torch.testing.assert_close(got, ref, atol=tol, rtol=tol)
        torch.testing.assert_close(got_states, ref_states, atol=tol, rtol=tol)
    return run


for _hk, _hv, _dk, _dv in [(2, 2, 16, 16), (2, 4, 16, 24), (1, 3, 32, 8)]:
    check(f"gdn[Hk={_hk},Hv={_hv},Dk={_dk},Dv={_dv}]")(_gdn(_hk, _hv, _dk, _dv))
for _c, _k, _dt in [(40, 4, torch.float32), (130, 4, torch.float16), (16, 2, torch.float32)]:
    check(f"conv1d[C={_c},K={_k},{str(_dt)[6:]}]")(_conv(_c, _k, _dt))


def main(names: list[str]) -> None:
    results = {}
    for name in names or list(CHECKS):
        try:
            CHECKS[name]()
            results[name] = None
        except Exception:   # noqa: BLE001 (each failure is reported by its own test)
            results[name] = traceback.format_exc()[-3000:]
    print("RESULTS " + json.dumps(results))


if __name__ == "__main__":
    main(sys.argv[1:])
