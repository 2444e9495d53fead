"""THE table of architectures: one row per HF `architectures` name with its model class, task,
image processor, GGUF name and capabilities. Every other module asks here; classes are imported
only when asked for. Torch-free; never builds or loads a model."""
from __future__ import annotations

import importlib
from dataclasses import dataclass

from minserve.config import ConfigError

_DENSE = ("awq", "gptq", "compressed-tensors", "fp8")   # formats a checkpoint's linears carry


@dataclass(frozen=True)
class Architecture:
    """model and processor are "module:Class" under minserve.models."""
    name: str
    model: str
    task: str = "generate"          # generate | embed | score | draft (a speculative head)
    processor: str | None = None    # image processor: a vision-language model (vision tower)
    gguf_name: str | None = None    # llama.cpp's general.architecture, when a .gguf converts
    gguf_permuted_qk: bool = False  # llama.cpp stores this family's Q/K rows permuted
    can_embed: bool = False         # a generate model that pools too (sentence-transformers)
    lora: bool = False
    tensor_parallel: bool = False
    quantization: tuple[str, ...] = ()   # --quantization / quant_method values it loads
    max_images: int = 0     # --limit-mm-per-prompt's default: the images one prompt may hold
    why_not: str = ""       # said when a task it does not serve is asked of it
    # speculative decoding (engine/spec/): hands its layers' states to an EAGLE-3 head
    # (set_aux_hidden_state_layers); the row of the head of its multi-token-prediction layers
    eagle3: bool = False
    mtp_head: str | None = None

    @property
    def has_vision(self) -> bool:
        return self.processor is not None

    def model_class(self) -> type:
        return _import(self.model)

    def processor_class(self) -> type | None:
        return None if self.processor is None else _import(self.processor)


def _text(name: str, gguf_name: str | None, permuted: bool = False, lora: bool = True
          ) -> Architecture:
    """A Llama-family decoder: one class, with config flags (sliding window, qkv bias, q/k norm,
    NoPE layers, LongRoPE, partial rotary) that ModelConfig reads from config.json."""
    return Architecture(name, "llama:LlamaForCausalLM", gguf_name=gguf_name,
                        gguf_permuted_qk=permuted, can_embed=True, lora=lora,
                        tensor_parallel=True, eagle3=True,
                        quantization=(*_DENSE, "gguf") if gguf_name else _DENSE)


def _moe(name: str, model: str, gguf_name: str | None) -> Architecture:
    """A mixture-of-experts decoder (models/moe.py): LoRA on attention and dense layers only."""
    return Architecture(name, model, gguf_name=gguf_name, lora=True, tensor_parallel=True,
                        quantization=(*_DENSE, "gguf"))


def _base(name: str) -> Architecture:
    """A Llama-family base model (no LM head): an embedding checkpoint, last-token pooled."""
    return Architecture(name, "llama:LlamaForCausalLM", "embed", tensor_parallel=True,
                        quantization=_DENSE)


def _vision(name: str, module: str, processor: str, max_images: int = 8,
            lora: bool = True) -> Architecture:
    """A vision tower and projector around a language model (models/vision/)."""
    return Architecture(name, f"vision.{module}:{name}",
                        processor=f"vision.{module}_processor:{processor}",
                        lora=lora, tensor_parallel=True, quantization=_DENSE,
                        max_images=max_images)


_HYBRID_NO_EMBED = ("a hybrid linear-attention model does not pool: its Gated DeltaNet layers "
                    "need the chat engine's state slots, which the embedding path does not keep")

ARCHITECTURES = {a.name: a for a in (
    _text("LlamaForCausalLM", "llama", permuted=True),
    _text("MistralForCausalLM", "mistral", permuted=True),
    _text("Qwen2ForCausalLM", "qwen2"),
    _text("Qwen3ForCausalLM", "qwen3"),
    _moe("Qwen3MoeForCausalLM", "qwen_moe:Qwen3MoeForCausalLM", "qwen3moe"),
    _moe("Qwen2MoeForCausalLM", "qwen_moe:Qwen2MoeForCausalLM", "qwen2moe"),
    # llama.cpp converts Mixtral as "llama" with experts (models/gguf.py tells them apart)
    _moe("MixtralForCausalLM", "mixtral:MixtralForCausalLM", None),
    _text("SmolLM3ForCausalLM", "smollm3", permuted=True),
    # Phi-3/Phi-4: checkpoints hold qkv_proj and gate_up_proj fused (so do PEFT adapters: the
    # LoRA loader splits their B into the slices)
    _text("Phi3ForCausalLM", "phi3"),
    Architecture("Gemma3ForCausalLM", "gemma3:Gemma3ForCausalLM", gguf_name="gemma3",
                 lora=True, tensor_parallel=True, quantization=(*_DENSE, "gguf")),
    # Gemma 2: Gemma 3's layers without q/k norms, with attention-logit softcapping
    Architecture("Gemma2ForCausalLM", "gemma3:Gemma3ForCausalLM", lora=True,
                 tensor_parallel=True, quantization=_DENSE),
    Architecture("Gemma4ForCausalLM", "gemma4:Gemma4ForCausalLM", lora=True,
                 tensor_parallel=True, quantization=_DENSE),
    # its text stack only (the vision and audio towers are not built; images get the 400)
    Architecture("Gemma4ForConditionalGeneration", "gemma4:Gemma4ForCausalLM",
                 tensor_parallel=True, quantization=_DENSE),
    # its experts are fused [E, ...] tensors, bf16 or MXFP4 (models/gpt_oss.py loads them)
    Architecture("GptOssForCausalLM", "gpt_oss:GptOssForCausalLM", tensor_parallel=True,
                 quantization=("mxfp4",)),
    # hybrid linear-attention stacks (models/qwen3_next.py): Gated DeltaNet layers keep a
    # recurrent state slot per request (engine/state_cache.py) beside the attention layers' K/V;
    # the ...ForConditionalGeneration checkpoints load their language model only; LoRA on the
    # full-attention and dense MLP projections (the Gated DeltaNet projections take none)
    *(Architecture(name, "qwen3_next:Qwen3NextForCausalLM", tensor_parallel=True,
                   quantization=_DENSE, lora=lora, why_not=_HYBRID_NO_EMBED)
      for name, lora in (("Qwen3NextForCausalLM", True), ("Qwen3_5ForCausalLM", True),
                         ("Qwen3_5MoeForCausalLM", True),
                         # adapters of these name model.language_model.layers: not mapped
                         ("Qwen3_5ForConditionalGeneration", False),
                         ("Qwen3_5MoeForConditionalGeneration", False))),
    _base("LlamaModel"), _base("MistralModel"), _base("Qwen2Model"), _base("Qwen3Model"),
    # max_images: LLaVA-1.5 was trained on one image per prompt; the others take several
    # (vLLM's 999 let one request fetch and decode hundreds: issue 36)
    _vision("LlavaForConditionalGeneration", "llava", "LlavaImageProcessor", 1),
    _vision("Qwen2VLForConditionalGeneration", "qwen2_vl", "Qwen2VLImageProcessor"),
    _vision("Qwen2_5_VLForConditionalGeneration", "qwen2_vl", "Qwen2VLImageProcessor"),
    _vision("Idefics3ForConditionalGeneration", "idefics3", "Idefics3ImageProcessor"),
    _vision("Qwen3VLForConditionalGeneration", "qwen3_vl", "Qwen3VLImageProcessor"),
    _vision("Mistral3ForConditionalGeneration", "mistral3", "Mistral3ImageProcessor"),
    _vision("Gemma3ForConditionalGeneration", "gemma3_vision", "Gemma3ImageProcessor",
            lora=False),
    # Phi-3.5-vision: a Phi-3 language model (fused checkpoint tensors, as Phi3ForCausalLM)
    _vision("Phi3VForCausalLM", "phi3v", "Phi3VImageProcessor", lora=False),
    # BERT-family encoders (models/bert.py) and the cross-encoders over them (/v1/score, rerank)
    *(Architecture(name, f"bert:{cls}", "embed") for name, cls in (
        ("BertModel", "BertModel"), ("BertForMaskedLM", "BertModel"),
        ("XLMRobertaModel", "XLMRobertaModel"), ("XLMRobertaForMaskedLM", "XLMRobertaModel"),
        ("RobertaModel", "XLMRobertaModel"), ("RobertaForMaskedLM", "XLMRobertaModel"))),
    *(Architecture(name, "cross_encoder:CrossEncoder", "score") for name in (
        "BertForSequenceClassification", "XLMRobertaForSequenceClassification",
        "RobertaForSequenceClassification")),
    # EAGLE-3 heads (SpecForge's name, and vLLM's), drafting for a target (engine/spec/)
    *(Architecture(name, "eagle3:Eagle3LlamaForCausalLM", "draft", quantization=_DENSE)
      for name in ("LlamaForCausalLMEagle3", "Eagle3LlamaForCausalLM")),
)}


def lookup(name: str, task: str | None = None) -> Architecture:
    """The row for a config.json architecture; with task, one that serves it ("embed" includes
    a generate model that pools, and a cross-encoder). ConfigError names what is supported."""
    arch = ARCHITECTURES.get(name)
    if arch is not None and (task is None or serves(arch, task)):
        return arch
    wanted = [a.name for a in ARCHITECTURES.values() if task is None or serves(a, task)]
    what = "not supported" if arch is None else f"for {arch.task}, not {task}"
    if arch is not None and arch.why_not:
        what += f" ({arch.why_not})"
    raise ConfigError(f"model architecture {name!r} is {what}; supported"
                      f"{f' for {task}' if task else ''}: {', '.join(wanted)}")


def serves(arch: Architecture, task: str) -> bool:
    if task == "embed":
        return arch.task in ("embed", "score") or arch.can_embed
    return arch.task == task


def lookup_gguf(gguf_name: str | None) -> Architecture:
    """The row a .gguf's general.architecture converts to."""
    for arch in ARCHITECTURES.values():
        if arch.gguf_name is not None and arch.gguf_name == gguf_name:
            return arch
    names = [a.gguf_name for a in ARCHITECTURES.values() if a.gguf_name]
    raise ConfigError(f"GGUF architecture {gguf_name!r} is not supported "
                      f"(supported: {', '.join(names)})")


def _import(path: str) -> type:
    module, _, name = path.partition(":")
    return getattr(importlib.import_module(f"minserve.models.{module}"), name)
