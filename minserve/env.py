"""Every environment variable minserve reads, read here and nowhere else (modules may still write
the OpenMP ones for libgomp: cpu_threads.py). Imports nothing heavy (no torch): kernels/, the CLI
and cpu_threads.py all use it. Their table is the README's "Environment variables".
The switches that pick code paths (MINSERVE_CPU_NATIVE, MINSERVE_CPU_ONEDNN,
MINSERVE_CPU_EXACT_ACTIVATIONS, MINSERVE_NO_TRITON,
MINSERVE_IMPORT_TRITON, TRITON_INTERPRET) are read once, when this module is first imported. The
others are read when used: a program that embeds minserve (or a test) may set them after import.
"""
from __future__ import annotations

import os

CPU_NATIVE: bool = os.environ.get("MINSERVE_CPU_NATIVE", "1") != "0"
CPU_ONEDNN: bool = os.environ.get("MINSERVE_CPU_ONEDNN", "1") != "0"
# 1: the native CPU int kernels keep a decode row's activations in fp32 (for checking the int8
# activation path against them: kernels/cpu_native.py).
CPU_EXACT_ACTIVATIONS: bool = os.environ.get("MINSERVE_CPU_EXACT_ACTIVATIONS", "") == "1"
NO_TRITON: bool = os.environ.get("MINSERVE_NO_TRITON", "") == "1"
IMPORT_TRITON: bool = (os.environ.get("MINSERVE_IMPORT_TRITON") == "1"
                       or os.environ.get("TRITON_INTERPRET") == "1")

API_KEY_ENVS = ("VLLM_API_KEY", "MINSERVE_API_KEY")
DEFAULT_IMAGE_FETCH_TIMEOUT_S = 5.0
DEFAULT_STEP_TIMEOUT_S = 300.0


def cache_dir() -> str:
    """Where minserve keeps the default model, converted weights and native kernel builds."""
    return os.environ.get("MINSERVE_CACHE") or os.path.join(
        os.path.expanduser("~"), ".cache", "minserve")


def api_key() -> str | None:
    return next((os.environ[e] for e in API_KEY_ENVS if os.environ.get(e)), None)


def allow_runtime_lora() -> bool:
    return os.environ.get("VLLM_ALLOW_RUNTIME_LORA_UPDATING", "").lower() in ("true", "1")


def allow_long_max_model_len() -> bool:
    """vLLM's switch for a --max-model-len longer than the model was trained for."""
    return os.environ.get("VLLM_ALLOW_LONG_MAX_MODEL_LEN", "").strip().lower() in ("1", "true")


def image_fetch_timeout_s() -> float:
    """ValueError naming the variable when it is not a positive number."""
    raw = os.environ.get("VLLM_IMAGE_FETCH_TIMEOUT")
    if not raw:
        return DEFAULT_IMAGE_FETCH_TIMEOUT_S
    try:
        value = float(raw)
    except ValueError:
        raise ValueError(f"VLLM_IMAGE_FETCH_TIMEOUT must be a number of seconds, "
                         f"got {raw!r}") from None
    if not value > 0:
        raise ValueError("VLLM_IMAGE_FETCH_TIMEOUT must be positive")
    return value


def step_timeout_s() -> float:
    """How long a tensor-parallel step may take before the head gives up on its workers."""
    return float(os.environ.get("MINSERVE_STEP_TIMEOUT") or DEFAULT_STEP_TIMEOUT_S)


def c_compiler() -> str | None:
    """$CC, or None for the one on PATH."""
    return os.environ.get("CC") or None


def omp_num_threads_set() -> bool:
    return bool(os.environ.get("OMP_NUM_THREADS"))


def omp_wait_policy_set() -> bool:
    return bool({"GOMP_SPINCOUNT", "OMP_WAIT_POLICY"} & set(os.environ))
