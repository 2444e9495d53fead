"""The one model builder and the architecture table: every rank finds and builds a model the
same way (a .gguf included), the vision tower is built where images are encoded only, --dtype
auto's rule, and the registry's rows: their classes, their capabilities enforced, and errors that
say what is supported."""
from __future__ import annotations

import dataclasses
import types

import pytest
import torch

from minserve.config import ConfigError, EngineConfig, LoRAConfig
from minserve.engine import builder
from minserve.engine.builder import ModelSource, build_model, find_model, resolve_dtype
from minserve.models import registry
from minserve.models.registry import ARCHITECTURES, lookup, lookup_gguf
from tests.tiny import make_tiny_encoder, write_gguf
from tests.tiny_vlm import make_tiny_vlm

CPU = torch.device("cpu")


def test_every_row_imports_its_classes():
    for arch in ARCHITECTURES.values():
        assert isinstance(arch.model_class(), type)
        assert arch.has_vision == (arch.processor_class() is not None)
        assert arch.task in ("generate", "embed", "score", "draft")


def test_unknown_or_wrong_task_architectures_say_what_is_supported():
    with pytest.raises(ConfigError, match=r"'GPT2LMHeadModel' is not supported; supported: "
                                          r"LlamaForCausalLM, .*BertModel"):
        lookup("GPT2LMHeadModel")
    with pytest.raises(ConfigError, match=r"'BertModel' is for embed, not generate; supported "
                                          r"for generate: LlamaForCausalLM, .*Idefics3"):
        lookup("BertModel", "generate")
    with pytest.raises(ConfigError, match=r"'LlavaForConditionalGeneration' is for generate, not "
                                          r"embed; supported for embed: .*Qwen3ForCausalLM"):
        lookup("LlavaForConditionalGeneration", "embed")
    assert lookup("Qwen3ForCausalLM", "embed").can_embed      # Qwen3-Embedding's checkpoints
    assert lookup_gguf("qwen2").name == "Qwen2ForCausalLM"
    assert lookup_gguf("llama").gguf_permuted_qk and not lookup_gguf("qwen3").gguf_permuted_qk
    with pytest.raises(ConfigError, match="GGUF architecture 'gpt2' is not supported "
                                          r"\(supported: llama, mistral, qwen2, qwen3, qwen3moe, "
                                          r"qwen2moe, smollm3, phi3, gemma3\)"):
        lookup_gguf("gpt2")


def test_the_engine_refuses_an_embedding_model_naming_its_task(tmp_path):
    from minserve.engine.engine import Engine

    folder, _ = make_tiny_encoder(str(tmp_path / "bert"))
    with pytest.raises(ConfigError, match="'BertModel' is for embed, not generate"):
        Engine(EngineConfig(model=folder))


def test_a_rank_on_another_node_builds_the_gguf_rank_0_serves(tiny_model_factory, tmp_path,
                                                              monkeypatch):
    """A node other than the head gets the user's --model (a .gguf), not rank 0's folder: it
    must convert it as rank 0 did (quantized blocks or dequantized), or the ranks' weights
    differ."""
    path = str(tmp_path / "m.gguf")
    write_gguf(tiny_model_factory("LlamaForCausalLM"), path, "llama", "Q8_0")
    config = EngineConfig(model=path, tensor_parallel_size=2, nnodes=2, node_rank=1,
                          max_model_len=64)
    built = []
    monkeypatch.setattr(builder, "join_group", lambda *a: None)
    monkeypatch.setattr(builder, "build_runner", lambda c, source, device: built.append(source))
    for gguf_dequantize in (None, True, False):
        built.clear()
        cfg = dataclasses.replace(config, gguf_dequantize=gguf_dequantize)
        builder.load_worker_runner(cfg, 1, 0, 0)
        head = find_model(dataclasses.replace(cfg, node_rank=0), CPU)
        assert built[0].folder == head.folder
        assert (built[0].model_config.quantization_config is None) == (
            builder._gguf_dequantize(cfg, CPU))


def test_ranks_above_0_build_a_vision_model_without_its_tower(tmp_path, monkeypatch):
    """The encoder runs on rank 0 alone (it broadcasts the merged embeddings), so the other
    ranks neither build nor load the tower and projector."""
    folder = make_tiny_vlm(str(tmp_path / "llava"), "LlavaForConditionalGeneration")
    config = EngineConfig(model=folder, device="cpu")
    whole = build_model(config, find_model(config, CPU), CPU).model
    import minserve.models.vision.base as base

    monkeypatch.setattr(base, "parallel", types.SimpleNamespace(tp_rank=lambda: 1))
    text_only = build_model(config, find_model(config, CPU), CPU).model
    names = dict(text_only.named_parameters())
    assert not text_only.has_vision and whole.has_vision
    assert not any(n.startswith(("vision_tower.", "multi_modal_projector.")) for n in names)
    lm = {n: p for n, p in whole.named_parameters() if n.startswith("language_model.")}
    assert lm.keys() == names.keys()
    for n, p in lm.items():
        torch.testing.assert_close(names[n], p, rtol=0, atol=0)


def test_capabilities_in_the_row_are_enforced(tiny_model_factory, tmp_path, monkeypatch):
    bert, _ = make_tiny_encoder(str(tmp_path / "bert"))
    config = EngineConfig(model=bert, device="cpu", lora=LoRAConfig())
    with pytest.raises(ConfigError, match="BertModel takes no LoRA adapters"):
        build_model(config, find_model(config, CPU, "embed"), CPU)
    with pytest.raises(ConfigError, match="BertModel is not sharded"):
        config = EngineConfig(model=bert, device="cpu", tensor_parallel_size=2)
        build_model(config, find_model(config, CPU, "embed"), CPU)
    folder = tiny_model_factory("Qwen3ForCausalLM")
    row = dataclasses.replace(ARCHITECTURES["Qwen3ForCausalLM"], quantization=("awq",))
    monkeypatch.setitem(registry.ARCHITECTURES, "Qwen3ForCausalLM", row)
    config = EngineConfig(model=folder, device="cpu", quantization="fp8")
    with pytest.raises(ConfigError, match="Qwen3ForCausalLM does not load fp8 weights "
                                          r"\(it loads: awq\)"):
        build_model(config, find_model(config, CPU), CPU)


def test_dtype_auto_float32_on_cpu_bf16_on_gpu_and_vllms_rule_for_pooling_models():
    cuda = torch.device("cuda")

    def pooling(checkpoint_dtype):
        return ModelSource("f", {"torch_dtype": checkpoint_dtype}, ARCHITECTURES["BertModel"],
                           None, "embed")

    assert resolve_dtype("auto", CPU) == resolve_dtype("auto", CPU, pooling("bfloat16")) \
        == torch.float32
    assert resolve_dtype("auto", cuda) == torch.bfloat16
    assert resolve_dtype("auto", cuda, pooling("bfloat16")) == torch.bfloat16
    assert resolve_dtype("auto", cuda, pooling("float32")) == torch.float16
    assert resolve_dtype("half", cuda, pooling("bfloat16")) == torch.float16


def test_a_missing_local_media_folder_is_a_config_error(tmp_path):
    with pytest.raises(ConfigError, match="--allowed-local-media-path .* is not an existing "
                                          "folder"):
        EngineConfig(allowed_local_media_path=str(tmp_path / "nope"))
    assert EngineConfig(allowed_local_media_path=str(tmp_path)).allowed_local_media_path
