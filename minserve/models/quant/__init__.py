"""Quantized checkpoints: which method a model needs (config.json's quantization_config, the
GGUF tensor types, or --quantization) and the start-up errors for what is not supported. One
module per method; each gives its linear layers a quant_method (create_weights / apply)."""
from __future__ import annotations

from typing import Any

from minserve.config import QUANTIZATION_METHODS as METHODS
from minserve.models.quant.base import QuantConfig, config_error

# The quant_method spellings checkpoints use besides vLLM's --quantization names.
_ALIASES = {"compressed_tensors": "compressed-tensors", "awq_marlin": "awq",
            "gptq_marlin": "gptq"}


def _normalise(method: str) -> str:
    method = str(method).lower()
    return _ALIASES.get(method, method)


def get_quant_config(quantization_config: dict[str, Any] | None,
                     override: str | None = None) -> QuantConfig | None:
    """The checkpoint's quantization (None: full precision). `override` is --quantization."""
    method = _normalise(quantization_config["quant_method"]) if quantization_config and \
        quantization_config.get("quant_method") else None
    if override is not None:
        wanted = _normalise(override)
        if wanted not in METHODS:
            raise config_error(f"--quantization {override!r} is not supported (supported: "
                               f"{', '.join(METHODS)})")
        if method is not None and method != wanted:
            raise config_error(f"--quantization {wanted} does not match the checkpoint's "
                               f"quantization_config quant_method {method!r}")
        if method is None and wanted != "fp8":
            raise config_error(f"--quantization {wanted} needs a {wanted} checkpoint; this one "
                               "has no quantization_config (only fp8 quantizes a 16-bit "
                               "checkpoint at load)")
        method = wanted
    if method is None:
        return None
    cfg = quantization_config or {}
    if method == "awq":
        from minserve.models.quant.awq import AwqConfig
        return AwqConfig.from_config(cfg)
    if method == "gptq":
        from minserve.models.quant.gptq import GptqConfig
        return GptqConfig.from_config(cfg)
    if method == "compressed-tensors":
        from minserve.models.quant.compressed_tensors import CompressedTensorsConfig
        return CompressedTensorsConfig.from_config(cfg)
    if method == "fp8":
        from minserve.models.quant.fp8 import Fp8Config
        return Fp8Config.from_config(quantization_config)
    if method == "mxfp4":
        from minserve.models.quant.mxfp4 import Mxfp4Config
        return Mxfp4Config.from_config(cfg)
    if method == "gguf":
        from minserve.models.quant.gguf import GgufConfig
        return GgufConfig(type_names=list(cfg.get("types") or []))
    raise config_error(f"quant_method {method!r} is not supported (supported: "
                       f"{', '.join(METHODS)})")


__all__ = ["METHODS", "QuantConfig", "get_quant_config"]
