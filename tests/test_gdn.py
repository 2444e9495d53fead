"""Gated DeltaNet kernels (kernels/gdn.py): the Triton kernels in Triton's interpreter (one child
process; tests/gdn_kernel_checks.py) and the CPU paths (chunked prefill rows, batched decode
rows, the conv1d) against the recurrent references on mixed rows; and the reference itself
against transformers' own torch implementation, so the definition is the models'."""
from __future__ import annotations

import json
import os
import pathlib
import subprocess
import sys

import pytest
import torch
from minserve.kernels import gdn
from minserve.kernels.attention import AttnMetadata

from minserve import kernels
from tests.gdn_kernel_checks import CHECKS, gdn_inputs, mixed_rows, reference_rows

REPO = pathlib.Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def interpreter_results() -> dict[str, str | None]:
    pytest.importorskip("triton")
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    proc = subprocess.run([sys.executable, str(REPO / "tests" / "gdn_kernel_checks.py")],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULTS ")]
    if proc.returncode != 0 or not lines:
        pytest.fail(f"GDN kernel checks crashed (rc {proc.returncode}):\n{proc.stderr[-4000:]}")
    return json.loads(lines[-1][len("RESULTS "):])


@pytest.mark.parametrize("name", list(CHECKS))
def test_triton_matches_reference(interpreter_results, name):
    error = interpreter_results.get(name, "check did not run")
    if error is not None:
        pytest.fail(error, pytrace=False)


def _attn(qsl: list[int], slots: list[int]) -> AttnMetadata:
    """Only what the GDN ops read: the rows' token spans and state slots."""
    return AttnMetadata(torch.tensor(qsl, dtype=torch.int32), torch.zeros(0), torch.zeros(0),
                        torch.zeros(0), 0, 0, qsl, [], state_slots=torch.tensor(slots),
                        state_slots_host=slots)


@pytest.mark.parametrize("lens", [[1, 1, 1], [70, 1, 5, 1, 130], [16, 200]])
def test_cpu_rule_matches_reference_on_mixed_rows(lens):
    """Chunked rows (past one and two chunks of 64, ragged), short recurrent rows and batched
    decode rows, each from its own non-zero state: outputs and final states."""
    qsl, slots = mixed_rows(lens, 8, len(lens))
    q, k, v, g, beta = gdn_inputs(qsl[-1], 2, 4, 16, 8, sum(lens))
    states = torch.randn(8, 4, 16, 8) * 0.1
    ref, ref_states = reference_rows(gdn.gated_delta_rule_ref, qsl, slots, states,
                                     q, k, v, g, beta)
    got = kernels.gated_delta_rule(q, k, v, g, beta, states, _attn(qsl, slots))
    torch.testing.assert_close(got, ref, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(states, ref_states, atol=1e-4, rtol=1e-4)


def test_cpu_conv1d_matches_reference_on_mixed_rows():
    qsl, slots = mixed_rows([1, 9, 1, 2, 1], 6, 3)
    x, w = torch.randn(qsl[-1], 24), torch.randn(24, 4)
    states = torch.randn(6, 24, 3)
    ref, ref_states = reference_rows(lambda xr, s: gdn.causal_conv1d_ref(xr, w, s),
                                     qsl, slots, states, x)
    got = kernels.causal_conv1d(x, w, states, _attn(qsl, slots))
    torch.testing.assert_close(got, ref, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(states, ref_states)


def test_chunks_from_saved_states_equal_one_pass():
    """A row split into chunks that continue from the saved state equals the row in one go."""
    q, k, v, g, beta = gdn_inputs(150, 2, 2, 16, 16, 5)
    whole_state = torch.zeros(2, 16, 16)
    whole = gdn.chunk_gated_delta_rule(q, k, v, g, beta, whole_state)
    state, parts, start = torch.zeros(2, 16, 16), [], 0
    for n in (1, 63, 70, 16):
        parts.append(gdn.chunk_gated_delta_rule(*(x[start:start + n] for x in (q, k, v, g, beta)),
                                                state))
        start += n
    torch.testing.assert_close(torch.cat(parts), whole, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(state, whole_state, atol=1e-4, rtol=1e-4)


def test_reference_is_transformers_definition():
    mod = pytest.importorskip("transformers.models.qwen3_next.modeling_qwen3_next")
    q, k, v, g, beta = gdn_inputs(40, 2, 4, 16, 8, 9)
    init = torch.randn(4, 16, 8) * 0.1
    hf_out, hf_state = mod.torch_recurrent_gated_delta_rule(
        q[None], k[None], v[None], g[None], beta[None], initial_state=init[None].clone(),
        output_final_state=True, use_qk_l2norm_in_kernel=True)
    state = init.clone()
    ours = gdn.gated_delta_rule_ref(q, k, v, g, beta, state)
    torch.testing.assert_close(ours, hf_out[0], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(state, hf_state[0], atol=1e-5, rtol=1e-5)
