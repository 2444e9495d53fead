"""Shared fixtures: tiny random models as HF folders (built once per session)."""
from __future__ import annotations

import os
import sys

import pytest

# The checks against dequantized or transformers' logits hold to fp32 summation order, so the
# suite runs the native CPU int kernels on exact fp32 activations (spawned ranks and servers
# inherit the variable); the int8 activation path is checked where a test turns it back on
# (tests/test_cpu_native.py, test_cpu_gguf.py, test_cpu_int8_model.py: env.CPU_EXACT_ACTIVATIONS).
os.environ.setdefault("MINSERVE_CPU_EXACT_ACTIVATIONS", "1")

# Bytecode kept as plain Python keeps it (__pycache__, git-ignored) even where the environment
# sets PYTHONDONTWRITEBYTECODE: otherwise every process the suite starts (servers, tp ranks,
# test_imports.py's fresh import of each module) compiles minserve from source again.
os.environ.pop("PYTHONDONTWRITEBYTECODE", None)
sys.dont_write_bytecode = False

from tests.tiny import make_tiny_model  # noqa: E402  (after the variables: it imports minserve)


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> str:
    return make_tiny_model(str(tmp_path_factory.mktemp("tiny-llama")))


@pytest.fixture(scope="session")
def tiny_model_factory(tmp_path_factory):
    """tiny_model_factory(arch, **overrides) -> folder; cached per (arch, overrides)."""
    made: dict[tuple, str] = {}

    def make(arch: str = "LlamaForCausalLM", **overrides) -> str:
        key = (arch, tuple(sorted(overrides.items())))
        if key not in made:
            path = str(tmp_path_factory.mktemp(arch.lower()))
            made[key] = make_tiny_model(path, arch, **overrides)
        return made[key]

    return make


def pytest_collection_modifyitems(config, items):
    import torch

    if not torch.cuda.is_available():
        skip = pytest.mark.skip(reason="needs CUDA")
        for item in items:
            if "cuda" in item.keywords:
                item.add_marker(skip)


os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
