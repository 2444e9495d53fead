"""The one way to build a model: an EngineConfig in, a loaded model out. Resolves the device, the
dtype, the checkpoint folder (a .gguf kept in its blocks or dequantized) and its registry row;
loads the weights (quantized, or random with --load-format dummy), the LoRA slots and the vision
tower where it belongs. The engine's rank 0, its tensor-parallel ranks and the embedding models
(and their ranks) all build here, so every rank builds alike. Never schedules a request."""
from __future__ import annotations

import dataclasses
import json
import logging
import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from minserve import env
from minserve.config import DTYPE_NAMES, ConfigError, EngineConfig, ModelConfig
from minserve.engine.runner import ModelRunner
from minserve.engine.workers import join_group
from minserve.models import parallel
from minserve.models.registry import ARCHITECTURES, Architecture, lookup

logger = logging.getLogger("minserve.engine")
DTYPES = {name: getattr(torch, canonical) for name, canonical in DTYPE_NAMES.items()}

# Step sizes on CPU: a step holds every stream back until it ends, so it should stay short,
# about 0.5 s on 2 cores for the default model. From the idle figures (SmolLM2-135M float32: a
# 2,000-token prompt in one step took 14 s, an 8,000-token one 183 s) a chunk of q prompt tokens
# at context c costs about q * 1.7 ms + q * (c + q/2) * 5.3 us. So: 128 prompt tokens per
# request per step (~0.25 s at the start; half the 256-token budget stays for other requests,
# so a new arrival starts at the next step), and 48k (query, context) pairs per chunk (~0.25 s
# of attention at any context). bench/stall.py measures it (bench/RESULTS.md).
CPU_BATCHING = (256, 128, 48 * 1024)
# rows of one fan-out (n > 1, beam search) per step: a CPU step's cost grows with its rows
DEFAULT_FANOUT_ROWS = {"cpu": 8, "cuda": 64}


@dataclass
class ModelSource:
    """A checkpoint before anything is built: its folder, config.json and registry row."""
    folder: str
    hf_config: dict[str, Any]
    arch: Architecture
    model_config: Any          # ModelConfig, or the model class's own config_class
    task: str = "generate"     # what it is built for: generate, or embed (pooling)


@dataclass
class LoadedModel:
    model: torch.nn.Module
    dtype: torch.dtype


# ---- device, dtype, folder ------------------------------------------------------------------
def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError("--device cuda was asked for but CUDA is not available")
    return torch.device(name)


def rank_device(device: torch.device, local_rank: int) -> torch.device:
    return torch.device("cuda", local_rank) if device.type == "cuda" else device


def resolve_dtype(name: str, device: torch.device, source: ModelSource | None = None
                  ) -> torch.dtype:
    """--dtype; auto: float32 on a CPU (bf16 matmuls are slow there), bf16 on a GPU (half the
    memory traffic), except that a pooling model follows vLLM's rule: a bf16 checkpoint stays
    bf16, a fp32/fp16 one runs in fp16."""
    if name != "auto":
        return DTYPES[name]
    if device.type != "cuda":
        return torch.float32
    if source is None or source.task == "generate":
        return torch.bfloat16
    return torch.bfloat16 if source.hf_config.get("torch_dtype") == "bfloat16" else torch.float16


def set_cpu_threads(device: torch.device) -> None:
    """On CPU, one torch intra-op thread per CPU this process may use (cgroup quota included),
    unless OMP_NUM_THREADS says otherwise."""
    from minserve.cpu_threads import num_torch_threads

    num = num_torch_threads() if device.type == "cpu" else None
    if num is not None and num != torch.get_num_threads():
        torch.set_num_threads(num)


def find_model(config: EngineConfig, device: torch.device, task: str = "generate"
               ) -> ModelSource:
    """--model -> its folder, config.json and registry row (ConfigError when no row serves
    the task). Every rank resolves a .gguf the same way, so all serve the same weights."""
    from minserve.models.loader import is_gguf, resolve_model

    quantized = is_gguf(config.model) and not _gguf_dequantize(config, device)
    folder = resolve_model(config.model, config.revision, gguf_quantized=quantized)
    with open(os.path.join(folder, "config.json")) as f:
        hf = json.load(f)
    default = "LlamaForCausalLM" if task == "generate" else "BertModel"
    arch = lookup((hf.get("architectures") or [default])[0], task)
    model_config = getattr(arch.model_class(), "config_class", ModelConfig).from_dict(hf)
    if task != "generate" and isinstance(model_config, ModelConfig):
        model_config.tie_word_embeddings = True    # a pooling decoder builds no LM head
    if getattr(model_config, "moe", None) is not None:
        model_config.moe.expert_parallel = config.enable_expert_parallel
    return ModelSource(folder, hf, arch, model_config, task)


def _gguf_dequantize(config: EngineConfig, device: torch.device) -> bool:
    """GGUF: serve the quantized blocks, or dequantize at load (--gguf-dequantize). By default
    served quantized: the weights' bytes are the decode time, on a GPU and, with the native CPU
    kernel (kernels/cpu_native.py), on a CPU. Without that kernel a CPU dequantizes, since dense
    float32 matmuls measured faster than torch's int ones."""
    if config.gguf_dequantize is not None:
        return config.gguf_dequantize
    from minserve import kernels

    return config.quantization != "gguf" and not kernels.int_gemm_fast(device)


# ---- limits ---------------------------------------------------------------------------------
def default_batching(device: torch.device) -> tuple[int, int, int]:
    """(max_num_batched_tokens, long_prefill_token_threshold, max_chunk_attention) when
    not given. GPU: vLLM's server defaults (8192 tokens on a GPU of >= 70 GiB that is not an
    A100, else 2048; no per-request caps)."""
    if device.type != "cuda":
        return CPU_BATCHING
    props = torch.cuda.get_device_properties(device)
    big = props.total_memory >= 70 << 30 and "a100" not in props.name.lower()
    return (8192 if big else 2048), 0, 0


def check_long_max_model_len(max_model_len: int, max_position_embeddings: int) -> None:
    """A context past the model's training length: refused, or with VLLM_ALLOW_LONG_MAX_MODEL_LEN
    served with a warning, as vLLM does. Every model here places positions by RoPE, computed
    for any position (layers.RotaryEmbedding), so nothing indexes out of range; the output
    past the training length is the user's risk."""
    what = (f"--max-model-len {max_model_len} is longer than the model's "
            f"max_position_embeddings ({max_position_embeddings})")
    if not env.allow_long_max_model_len():
        raise ConfigError(f"{what}; lower it, or set VLLM_ALLOW_LONG_MAX_MODEL_LEN=1 to serve "
                          "positions the model was not trained on")
    logger.warning("%s; served because VLLM_ALLOW_LONG_MAX_MODEL_LEN is set: positions past "
                   "%d were never trained, so outputs there may degrade", what,
                   max_position_embeddings)


def resolve_limits(config: EngineConfig, mc: ModelConfig, device: torch.device) -> EngineConfig:
    """The config with max_model_len, the batching caps and the images per prompt (the model's
    registry row) filled in for this model and device."""
    max_model_len = config.max_model_len or mc.max_position_embeddings
    if max_model_len > mc.max_position_embeddings and not mc.rope_scaling:
        check_long_max_model_len(max_model_len, mc.max_position_embeddings)
    tokens, threshold, attention = default_batching(device)
    max_batched = config.max_num_batched_tokens or tokens
    # a model whose image tokens attend both ways runs each image's tokens in one step
    arch = ARCHITECTURES.get(getattr(mc, "architecture", ""))
    whole_image = arch is not None and arch.has_vision and getattr(
        arch.model_class(), "whole_image_tokens", None)
    need = whole_image(mc) if whole_image else 0
    if max_batched < need:
        if config.max_num_batched_tokens is not None:
            raise ConfigError(f"--max-num-batched-tokens {max_batched} is below {need}: "
                              f"{mc.architecture} runs an image's {need} tokens in one step "
                              "(they attend to each other both ways); raise it")
        max_batched = need
    if max_batched < config.block_size:
        raise ConfigError("--max-num-batched-tokens must be at least --block-size")

    def given(value: int | None, default: int) -> int:
        return default if value is None else value

    mm_limits = config.limit_mm_per_prompt or {}
    if "image" not in mm_limits:
        arch = ARCHITECTURES.get(mc.architecture)
        mm_limits = {**mm_limits, "image": arch.max_images if arch is not None else 0}
    return dataclasses.replace(
        config, max_model_len=max_model_len, max_num_batched_tokens=max_batched,
        long_prefill_token_threshold=given(config.long_prefill_token_threshold, threshold),
        max_chunk_attention=given(config.max_chunk_attention, attention),
        max_fanout_rows=given(config.max_fanout_rows, DEFAULT_FANOUT_ROWS.get(device.type, 64)),
        limit_mm_per_prompt=mm_limits)


# ---- the build ------------------------------------------------------------------------------
def build_model(config: EngineConfig, source: ModelSource, device: torch.device
                ) -> LoadedModel:
    """This rank's model: weights (sharded when this process is a tensor-parallel rank) and its
    quantization (the runner adds the LoRA slots: ModelRunner owns its LoRAManager)."""
    from minserve.models.loader import load_model

    arch = source.arch
    if config.lora is not None and not arch.lora:
        raise ConfigError(f"{arch.name} takes no LoRA adapters; start without --enable-lora")
    if config.tensor_parallel_size > 1 and not arch.tensor_parallel:
        raise ConfigError(f"{arch.name} is not sharded; serve it with --tensor-parallel-size 1")
    set_cpu_threads(device)
    if isinstance(source.model_config, ModelConfig) and config.max_model_len is not None:
        source.model_config.max_model_len = config.max_model_len   # (LongRoPE's factor choice)
    dtype = resolve_dtype(config.dtype, device, source)
    torch.manual_seed(config.seed)
    model = load_model(source.folder, source.model_config, device, dtype, config.load_format,
                       quantization=config.quantization)
    return LoadedModel(model, dtype)


def build_runner(config: EngineConfig, source: ModelSource, device: torch.device,
                 image_processor: Any = None,
                 make_drafter: Callable[[torch.nn.Module], Any] | None = None) -> ModelRunner:
    """This rank's model and runner (KV cache share included), as every rank builds them. Rank 0
    serves the --lora-modules (the other ranks load what its step plans say) and, on a GPU,
    sizes the KV cache with its largest image batch encoded. make_drafter (rank 0's,
    speculative decoding: engine/spec/drafter.py, which builds through this module, hence a
    callable): the drafter over the target model, built whole, the KV cache sized for both."""
    built = build_model(config, source, device)
    drafter = make_drafter(built.model) if make_drafter is not None else None
    runner = ModelRunner(built.model, source.model_config, config, device, built.dtype,
                         profile_images=profile_images(image_processor, config, device),
                         extra_kv_bytes_per_block=drafter.bytes_per_block if drafter else 0)
    if drafter is not None:
        drafter.bind(runner)
    if runner.lora_manager is not None and parallel.tp_rank() == 0:
        for module in config.lora.lora_modules:
            runner.lora_manager.add(module.name, module.path)
    if config.tensor_parallel_size > 1:
        # every rank's first forward (lazy imports) runs now, not under the step timeout
        runner.dummy_run(config.block_size, 1)
    return runner


def image_processor(source: ModelSource, tokenizer: Any) -> Any:
    """The model's image processor (models/vision/), or None for a text-only model."""
    cls = source.arch.processor_class()
    return None if cls is None else cls(source.folder, source.hf_config, tokenizer)


def profile_images(processor: Any, config: EngineConfig, device: torch.device
                   ) -> list[dict[str, Any]]:
    """The largest batch of images one step can encode, for the KV-cache profile run: the
    largest image the processor makes, as many times as --limit-mm-per-prompt allows across
    max_num_seqs prompts, but no more than a step's token budget can reach."""
    if processor is None or config.image_limit == 0 or device.type != "cuda" \
            or config.kv_cache_memory is not None:
        return []    # only the CUDA profile run uses them
    from PIL import Image

    largest = processor.process(Image.new("RGB", processor.largest_image_size()))
    per_step = config.max_num_batched_tokens // max(largest.num_embeds, 1) + 1
    return [largest.data] * min(config.image_limit * config.max_num_seqs, per_step)


# ---- a tensor-parallel rank > 0, in its own process -----------------------------------------
def join_as_worker(config: EngineConfig, rank: int, local_rank: int, port: int,
                   task: str = "generate") -> tuple[ModelSource, torch.device]:
    """This rank's device and checkpoint (found as rank 0 found it), then its place in the
    group; the model is built after, since its layers shard by the process's rank."""
    device = rank_device(resolve_device(config.device), local_rank)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    source = find_model(config, device, task)
    parallel.check_divisible(source.model_config, config.tensor_parallel_size)
    join_group(config, rank, port, device)
    return source, device


def load_worker_runner(config: EngineConfig, rank: int, local_rank: int, port: int
                       ) -> ModelRunner:
    """A chat model's rank > 0 (engine/workers.py runs its steps)."""
    source, device = join_as_worker(config, rank, local_rank, port)
    config = resolve_limits(config, source.model_config, device)
    return build_runner(config, source, device)
