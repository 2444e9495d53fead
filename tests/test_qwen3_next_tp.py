"""Hybrid models under tensor parallelism on CPU (gloo, two processes, started once): the key and
value heads of the Gated DeltaNet layers (with their conv channels and states) and the attention
heads split over the ranks give one process's logits, for Qwen3-Next's fused per-key-head
projections and Qwen3.5's split ones; a step's state slots cross to the workers."""
from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

from minserve.engine.runner import StepInputs
from minserve.engine.workers import decode_step, encode_step, payload_len
from tests.paged_runner import load_ours
from tests.serving import free_port
from tests.test_qwen3_next import VARIANTS
from tests.tiny import make_tiny_model
from tests.tp_ranks import run_steps

HERE = os.path.dirname(os.path.abspath(__file__))
NAMES = ["qwen3next-moe", "qwen3.5-dense"]


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("hybrid-tp")
    return [make_tiny_model(str(root / name), VARIANTS[name][0], **VARIANTS[name][1])
            for name in NAMES]


@pytest.fixture(scope="module")
def sharded_logits(folders, tmp_path_factory):
    out = tmp_path_factory.mktemp("hybrid-tp-out")
    port = free_port()
    procs = [subprocess.Popen([sys.executable, os.path.join(HERE, "tp_ranks.py"), str(r), "2",
                               str(port), str(out), *folders]) for r in range(2)]
    for p in procs:
        assert p.wait(timeout=600) == 0
    return [torch.load(out / f"{i}.pt", weights_only=True) for i in range(len(folders))]


@pytest.mark.parametrize("index", range(len(NAMES)), ids=NAMES)
def test_sharded_logits_match_one_process(index, folders, sharded_logits):
    ours = run_steps(load_ours(folders[index]))
    theirs = sharded_logits[index]
    assert len(ours) == len(theirs) == 4
    for a, b in zip(ours, theirs, strict=True):
        torch.testing.assert_close(b, a, atol=3e-4, rtol=1e-4)
        assert torch.equal(a.argmax(-1), b.argmax(-1))


def test_state_slots_cross_to_the_workers():
    step = StepInputs([5, 6, 7], [2, 1], [0, 9], [[3], [4, 1]], [0, 1], None,
                      state_slots=[4, 0], state_saves=[4, 9, 0, 10], state_restores=[11, 0])
    header, payload = encode_step(step)
    assert payload_len(header.tolist()) == len(payload)     # what a worker receives
    got = decode_step(header.tolist(), payload)
    assert got.state_slots == [4, 0] and got.block_tables == [[3], [4, 1]]
    assert got.state_saves == [4, 9, 0, 10] and got.state_restores == [11, 0]
    plain = decode_step(*(lambda h, p: (h.tolist(), p))(*encode_step(
        StepInputs([5], [1], [0], [[3]], [0], None))))
    assert plain.state_slots is None
