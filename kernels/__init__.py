"""minserve.kernels: the one place that picks a device path for each op (dispatch.py).

NOTE: this folder is installed as the package `minserve.kernels` (pyproject's package-dir), but
from a checkout (`python -m pytest`, `python -m minserve`, a script run in the repo root) the root
is on sys.path and a bare `import kernels` lands here. That name belongs to Hugging Face's
`kernels` distribution, which transformers (>= 5.25) and peft import. So, imported under any name
but ours, this module hands the name over to the installed distribution elsewhere on sys.path,
or fails as if the folder were not there."""
from __future__ import annotations

if __name__ != "minserve.kernels":
    import importlib.machinery
    import importlib.util
    import os
    import sys

    _root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    _path = [p for p in sys.path if os.path.abspath(p or os.curdir) != _root]
    _spec = importlib.machinery.PathFinder.find_spec(__name__, _path)
    if _spec is None or _spec.loader is None:
        raise ModuleNotFoundError(f"No module named {__name__!r}", name=__name__)
    _module = importlib.util.module_from_spec(_spec)
    sys.modules[__name__] = _module      # the import statement returns what sys.modules holds
    _spec.loader.exec_module(_module)
else:
    from minserve.kernels.dispatch import (  # noqa: F401
        AttnMetadata,
        CpuIntWeight,
        ExpertWeights,
        Fp8Weight,
        causal_conv1d,
        IntWeight,
        LoRAMapping,
        fp8_gemm,
        fused_experts,
        gated_delta_rule,
        gelu_tanh_and_mul,
        int_gemm,
        int_gemm_fast,
        linear,
        logits,
        lora_add,
        mxfp4_gemm,
        mxfp4_supported,
        paged_attention,
        prepare_int_weight,
        rms_norm,
        select_experts,
        silu_and_mul,
        stack_experts,
        store_kv,
        swiglu_oai,
        triton_enabled,
    )
