"""Detection of the quantization method from config.json / --quantization, and the start-up
errors that name what is not supported."""
from __future__ import annotations

import pytest

from minserve.config import ConfigError
from minserve.models.quant import get_quant_config


def test_full_precision_has_no_quant_config():
    assert get_quant_config(None) is None
    assert get_quant_config({}) is None


@pytest.mark.parametrize("cfg,want", [
    ({"quant_method": "awq", "bits": 4, "group_size": 128, "version": "gemm",
      "zero_point": True}, "awq int4 group 128"),
    ({"quant_method": "gptq", "bits": 8, "group_size": -1, "desc_act": True},
     "gptq int8 per-channel"),
    ({"quant_method": "fp8", "activation_scheme": "dynamic", "weight_block_size": [128, 128]},
     "fp8 e4m3 block [128, 128] weight scales, dynamic activations"),
    ({"quant_method": "fp8", "activation_scheme": "static"},
     "fp8 e4m3 per-tensor weight scales, static activations"),
    ({"quant_method": "compressed-tensors", "format": "pack-quantized", "config_groups": {
        "group_0": {"targets": ["Linear"], "weights": {"num_bits": 4, "type": "int",
                    "symmetric": True, "strategy": "group", "group_size": 128}}}},
     "compressed-tensors pack-quantized (compressed-tensors int4 group 128)"),
])
def test_detected_from_quantization_config(cfg, want):
    assert get_quant_config(cfg).describe() == want


def test_gptq_zero_offset_follows_checkpoint_format():
    assert get_quant_config({"quant_method": "gptq", "bits": 4}).zeros_offset_by_one
    assert not get_quant_config({"quant_method": "gptq", "bits": 4,
                                 "checkpoint_format": "gptq_v2"}).zeros_offset_by_one


def test_fp8_override_quantizes_a_16_bit_checkpoint():
    config = get_quant_config(None, "fp8")
    assert not config.serialized
    assert "dynamic" in config.describe()


@pytest.mark.parametrize("cfg,override,message", [
    ({"quant_method": "bitsandbytes"}, None, "quant_method 'bitsandbytes' is not supported"),
    ({"quant_method": "gptq", "bits": 3}, None, "GPTQ with 3 bits is not supported"),
    ({"quant_method": "gptq", "bits": 4, "group_size": 48}, None,
     "GPTQ group_size 48 is not supported"),
    ({"quant_method": "awq", "bits": 4, "version": "gemv"}, None,
     "AWQ version 'gemv' is not supported"),
    ({"quant_method": "awq", "bits": 8}, None, "AWQ with 8 bits is not supported"),
    ({"quant_method": "fp8", "fmt": "e5m2"}, None, "FP8 format 'e5m2' is not supported"),
    ({"quant_method": "compressed-tensors", "format": "marlin-24", "config_groups": {
        "g": {"weights": {"num_bits": 4, "type": "int"}}}}, None,
     "compressed-tensors format 'marlin-24' is not supported"),
    ({"quant_method": "compressed-tensors", "format": "pack-quantized", "config_groups": {
        "g": {"weights": {"num_bits": 2, "type": "int", "strategy": "group",
                          "group_size": 128}}}}, None, "int2 weights are not supported"),
    (None, "awq", "--quantization awq needs a awq checkpoint"),
    (None, "bitsandbytes", "--quantization 'bitsandbytes' is not supported"),
    ({"quant_method": "gptq", "bits": 4}, "awq", "does not match the checkpoint's"),
])
def test_refusals_name_what_is_unsupported(cfg, override, message):
    with pytest.raises(ConfigError, match=message.replace("[", r"\[").replace("(", r"\(")):
        get_quant_config(cfg, override)
