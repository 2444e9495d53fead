"""The few dataclasses every layer reads: the model's shape (from HF config.json) and the engine's
knobs (named as vLLM's flags). Never imports torch, so the server can read them too."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from typing import Any

from minserve.env import cache_dir  # noqa: F401  (its home is env.py; callers import it here)
from minserve.errors import ConfigError     # raised here; most callers import it from here
from minserve.hf_config import MoeConfig, layer_types, moe_config, no_rope_layers, text_config

def read_json(folder: str, name: str) -> dict[str, Any]:
    """A model folder's JSON side file as a dict: {} when it is missing or holds no object."""
    path = os.path.join(folder, name)
    if not os.path.isfile(path):
        return {}
    with open(path, encoding="utf-8") as f:
        data = json.load(f)
    return data if isinstance(data, dict) else {}


# The model served when none is named (models/loader.py fetches it; the CLI reports its name).
DEFAULT_MODEL_NAME = "SmolLM2-135M-Instruct"

# generation_config.json keys that become default sampling parameters (vLLM's choice).
GENERATION_SAMPLING_KEYS = (
    "temperature", "top_p", "top_k", "repetition_penalty", "min_p", "max_new_tokens",
)


def check_generation_overrides(value: object) -> dict:
    """--override-generation-config's value: a dict of GENERATION_SAMPLING_KEYS to numbers."""
    flag = "--override-generation-config"
    if not isinstance(value, dict):
        raise ConfigError(f"{flag} must be a JSON object, e.g. '{{\"temperature\": 0.5}}'")
    unknown = sorted(set(value) - set(GENERATION_SAMPLING_KEYS))
    if unknown:
        raise ConfigError(f"{flag}: unknown key(s) {', '.join(map(str, unknown))} (known: "
                          f"{', '.join(GENERATION_SAMPLING_KEYS)})")
    for key, v in value.items():
        whole = key in ("top_k", "max_new_tokens")
        if isinstance(v, bool) or not isinstance(v, int if whole else (int, float)) or v < 0:
            raise ConfigError(f"{flag}: {key} must be a non-negative "
                              f"{'integer' if whole else 'number'}, got {v!r}")
    return value


@dataclass
class ModelConfig:
    architecture: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    rope_scaling: dict[str, Any] | None = None
    max_position_embeddings: int = 2048
    tie_word_embeddings: bool = False
    attention_bias: bool = False  # Qwen2: bias on q/k/v
    qk_norm: bool = False  # Qwen3: RMSNorm on q and k per head
    sliding_window: int | None = None  # Mistral
    # Per-layer switches (None: every layer alike): "sliding_attention" / "full_attention" per
    # layer (a window applies to sliding layers only), and SmolLM3's NoPE layers (0: no RoPE).
    layer_types: list[str] | None = None
    no_rope_layers: list[int] | None = None
    partial_rotary_factor: float = 1.0   # Phi-4-mini: RoPE on the first part of each head
    # The engine's context length, set by the builder before the model is built (Phi-3's
    # LongRoPE picks its short or long factors by it, as vLLM does); None: the model's own.
    max_model_len: int | None = None
    eos_token_ids: list[int] = field(default_factory=list)
    quantization_config: dict[str, Any] | None = None  # config.json's, as written
    # The parsed method (a models.quant QuantConfig), set by the loader before the model is
    # built; each linear layer asks it for its quant_method.
    quant_config: Any = None
    # Vision-language models: the whole config.json (the wrapper reads vision_config and its
    # projector settings from it) and Qwen2-VL's M-RoPE split.
    hf_config: dict[str, Any] = field(default_factory=dict)
    mrope_section: list[int] | None = None
    moe: MoeConfig | None = None   # a mixture-of-experts model's experts

    @property
    def rotary_dim(self) -> int:
        """The leading dims of each head that RoPE rotates (all but for a partial rotary)."""
        return int(self.head_dim * self.partial_rotary_factor)

    def is_sliding(self, layer: int) -> bool:
        return self.sliding_window is not None and (
            self.layer_types is None or self.layer_types[layer] == "sliding_attention")

    @classmethod
    def from_dict(cls, top: dict[str, Any]) -> ModelConfig:
        archs = top.get("architectures") or ["LlamaForCausalLM"]
        arch = archs[0]
        # NOTE: a vision-language wrapper (a vision_config beside the language model) keeps the
        # language model's settings in text_config (Qwen2-VL also at the top level).
        is_wrapper = "vision_config" in top
        d = text_config(top, arch) if is_wrapper else top
        num_heads = int(d["num_attention_heads"])
        hidden = int(d["hidden_size"])
        eos = d.get("eos_token_id")
        eos_ids = [] if eos is None else ([eos] if isinstance(eos, int) else list(eos))
        sliding = d.get("sliding_window")
        if (arch.startswith(("Qwen2", "Qwen3Moe", "SmolLM3"))
                and not d.get("use_sliding_window", False)):
            sliding = None  # these configs carry a sliding_window they do not use
        # transformers >= 5 writes rope settings as one "rope_parameters" dict; older configs
        # carry rope_theta and rope_scaling at the top level.
        rope_params = d.get("rope_parameters") or {}
        rope_theta = d.get("rope_theta", rope_params.get("rope_theta", 10000.0))
        rope_scaling = d.get("rope_scaling")
        if rope_scaling is None and rope_params.get("rope_type", "default") != "default":
            rope_scaling = rope_params
        # Qwen2-VL: {"type": "mrope", "mrope_section": [...]} is plain rope over 3 position rows.
        scaling = rope_scaling or {}
        mrope_section = scaling.get("mrope_section") or rope_params.get("mrope_section")
        if mrope_section is not None and scaling.get("rope_type", scaling.get("type")) in (
                None, "mrope", "default"):
            rope_scaling = None
        if rope_scaling is not None and "original_max_position_embeddings" in d:
            # Phi-3 keeps its pretraining context beside rope_scaling, not in it
            rope_scaling = {"original_max_position_embeddings":
                            d["original_max_position_embeddings"], **rope_scaling}
        num_layers = int(d["num_hidden_layers"])
        return cls(
            architecture=arch, vocab_size=int(d["vocab_size"]), hidden_size=hidden,
            intermediate_size=int(d["intermediate_size"]),
            num_hidden_layers=num_layers,
            num_attention_heads=num_heads,
            num_key_value_heads=int(d.get("num_key_value_heads") or num_heads),
            head_dim=int(d.get("head_dim") or hidden // num_heads),
            rms_norm_eps=float(d.get("rms_norm_eps", 1e-6)),
            rope_theta=float(rope_theta), rope_scaling=rope_scaling,
            max_position_embeddings=int(d.get("max_position_embeddings", 2048)),
            tie_word_embeddings=bool(d.get("tie_word_embeddings", False)),
            attention_bias=bool(d.get("attention_bias", arch.startswith("Qwen2"))),
            qk_norm=arch.startswith("Qwen3"),
            sliding_window=int(sliding) if sliding else None,
            layer_types=layer_types(d, arch, num_layers, bool(sliding)),
            no_rope_layers=no_rope_layers(d, num_layers),
            partial_rotary_factor=float(d.get("partial_rotary_factor")
                                        or rope_params.get("partial_rotary_factor") or 1.0),
            eos_token_ids=eos_ids,
            quantization_config=top.get("quantization_config") or d.get("quantization_config"),
            hf_config=top if is_wrapper else {},
            mrope_section=list(mrope_section) if mrope_section else None,
            moe=moe_config(d, arch),
        )


# --dtype spellings (vLLM's and common short ones) -> the torch dtype's name; engine.py maps them.
DTYPE_NAMES = {"bfloat16": "bfloat16", "bf16": "bfloat16", "float16": "float16",
               "half": "float16", "fp16": "float16", "float32": "float32", "float": "float32",
               "fp32": "float32"}


# --quantization names (vLLM's); the methods live in minserve/models/quant/.
QUANTIZATION_METHODS = ("awq", "gptq", "compressed-tensors", "fp8", "gguf", "mxfp4")
KV_CACHE_DTYPES = ("auto", "fp8", "fp8_e4m3")


@dataclass
class EngineConfig:
    """Engine arguments; the names are vLLM's (`--max-model-len` -> max_model_len)."""

    model: str | None = None  # folder, .gguf, hub id; None = the embedded default model
    tokenizer: str | None = None
    served_model_name: list[str] | None = None
    dtype: str = "auto"  # auto: bf16 on GPU, fp32 on CPU
    device: str = "auto"  # auto: cuda if available
    max_model_len: int | None = None  # default: the model's max_position_embeddings
    gpu_memory_utilization: float = 0.9
    kv_cache_memory: int | None = None  # bytes; CPU default below
    max_num_seqs: int = 256
    max_num_batched_tokens: int | None = None  # default: builder.default_batching(device)
    long_prefill_token_threshold: int | None = None  # per-request prefill chunk cap (ditto)
    max_chunk_attention: int | None = None  # prefill (query, context) pairs (ditto)
    # rows of one n > 1 / beam-search request per step (0: no cap; default: builder, per device)
    max_fanout_rows: int | None = None
    enable_prefix_caching: bool = True
    block_size: int = 16
    load_format: str = "auto"  # auto | safetensors | gguf | dummy
    seed: int = 0
    enforce_eager: bool = False
    chat_template: str | None = None  # a file path or the template text
    generation_config: str = "auto"  # auto | vllm | a folder
    override_generation_config: dict | None = None  # HF keys set over generation_config
    skip_tokenizer_init: bool = False  # no tokenizer: token ids in and out only (vLLM's flag)
    revision: str | None = None
    quantization: str | None = None  # None: from the checkpoint (quantization_config, GGUF)
    kv_cache_dtype: str = "auto"  # auto: the model dtype; fp8 (= fp8_e4m3)
    # GGUF files: serve the linear weights from their quantized blocks (False) or dequantize
    # them at load (True); None picks per device (see README: measured on CPU)
    gguf_dequantize: bool | None = None
    # tensor parallelism (engine/workers.py); nnodes..master_port mean what they mean to torchrun
    tensor_parallel_size: int = 1
    distributed_executor_backend: str = "mp"
    nnodes: int = 1
    node_rank: int = 0
    master_addr: str = "127.0.0.1"
    master_port: int | None = None   # default: a free port with one node, 29500 with several
    # Vision-language models. limit_mm_per_prompt: at most this many items of a modality in one
    # prompt ({"image": N}; None: the model's registry row, resolved by the builder). Images come
    # from http(s) and data: URLs; file:// ones only from below allowed_local_media_path; hosts
    # only from allowed_media_domains when set; URLs resolving to loopback/private/link-local
    # addresses only with allow_private_media_urls (--allow-private-media-urls). Decoded pixels:
    # one request's images together, and every request's decodes at once (None: 100 megapixels
    # each; multimodal/budget.py).
    limit_mm_per_prompt: dict[str, int] | None = None
    allowed_local_media_path: str | None = None
    allowed_media_domains: list[str] | None = None
    allow_private_media_urls: bool = False
    max_image_pixels_per_request: int | None = None
    max_image_pixels_in_flight: int | None = None
    lora: LoRAConfig | None = None   # --enable-lora (None: LoRA off)
    # mixture-of-experts models under -tp: whole experts per rank, not a slice of each
    enable_expert_parallel: bool = False
    # --speculative-config (None: off); LLM(speculative_config={...}) passes the dict
    speculative_config: SpeculativeConfig | None = None

    def __post_init__(self) -> None:
        if isinstance(self.speculative_config, dict):
            self.speculative_config = SpeculativeConfig.from_dict(self.speculative_config)
        if self.block_size <= 0 or self.block_size % 8:
            raise ConfigError(
                f"--block-size must be a positive multiple of 8, got {self.block_size}"
            )
        if not 0.0 < self.gpu_memory_utilization <= 1.0:
            raise ConfigError("--gpu-memory-utilization must be in (0, 1]")
        if self.max_num_seqs < 1:
            raise ConfigError("--max-num-seqs must be >= 1")
        for flag, value in (("--long-prefill-token-threshold", self.long_prefill_token_threshold),
                            ("--max-chunk-attention", self.max_chunk_attention),
                            ("--max-fanout-rows", self.max_fanout_rows)):
            if value is not None and value < 0:
                raise ConfigError(f"{flag} must be >= 0 (0: no cap), got {value}")
        if self.dtype != "auto" and self.dtype not in DTYPE_NAMES:
            raise ConfigError(
                f"--dtype {self.dtype!r} is not one of auto, bfloat16, float16, float32"
            )
        if self.quantization is not None and self.quantization not in QUANTIZATION_METHODS:
            raise ConfigError(f"--quantization {self.quantization!r} is not supported "
                              f"(supported: {', '.join(QUANTIZATION_METHODS)})")
        if self.kv_cache_dtype not in KV_CACHE_DTYPES:
            raise ConfigError(f"--kv-cache-dtype {self.kv_cache_dtype!r} is not supported "
                              f"(supported: {', '.join(KV_CACHE_DTYPES)})")
        if self.gguf_dequantize and self.quantization == "gguf":
            raise ConfigError("--quantization gguf serves the GGUF blocks; it contradicts "
                              "--gguf-dequantize")
        if self.override_generation_config is not None:
            check_generation_overrides(self.override_generation_config)
        tp, nnodes = self.tensor_parallel_size, self.nnodes
        if tp < 1:
            raise ConfigError(f"--tensor-parallel-size must be >= 1, got {tp}")
        if self.distributed_executor_backend != "mp":
            raise ConfigError(f"--distributed-executor-backend {self.distributed_executor_backend!r}"
                              " is not supported; minserve runs its workers as processes (mp)")
        if nnodes < 1 or tp % nnodes:
            raise ConfigError(f"--nnodes {nnodes} must divide --tensor-parallel-size {tp} (each "
                              "node runs the same number of ranks)")
        if not 0 <= self.node_rank < nnodes:
            raise ConfigError(f"--node-rank {self.node_rank} must be in 0..{nnodes - 1}")
        if self.master_port is not None and not 0 < self.master_port < 65536:
            raise ConfigError(f"--master-port {self.master_port} must be in 1..65535")
        if self.load_format not in ("auto", "safetensors", "gguf", "dummy"):
            raise ConfigError(
                f"--load-format {self.load_format!r} is not one of auto, safetensors, gguf, dummy"
            )
        for flag, value in (("--max-image-pixels-per-request", self.max_image_pixels_per_request),
                            ("--max-image-pixels-in-flight", self.max_image_pixels_in_flight)):
            if value is not None and value < 1:
                raise ConfigError(f"{flag} must be >= 1, got {value}")
        local = self.allowed_local_media_path
        if local and not os.path.isdir(os.path.realpath(local)):
            raise ConfigError(f"--allowed-local-media-path {local!r} is not an existing folder")
        if self.limit_mm_per_prompt is not None:
            limits = self.limit_mm_per_prompt
            if not isinstance(limits, dict) or any(
                    not isinstance(v, int) or isinstance(v, bool) or v < 0
                    for v in limits.values()):
                raise ConfigError("--limit-mm-per-prompt must map modalities to counts >= 0, "
                                  'e.g. image=2 or {"image": 2}')
            unknown = set(limits) - set(MODALITIES)
            if unknown:
                raise ConfigError(f"--limit-mm-per-prompt: unknown modality "
                                  f"{', '.join(sorted(unknown))} (known: {', '.join(MODALITIES)})")

    @property
    def image_limit(self) -> int:
        return (self.limit_mm_per_prompt or {}).get("image", DEFAULT_MM_LIMIT)


# Modalities --limit-mm-per-prompt names (vLLM's); minserve's models take images only.
MODALITIES = ("image", "video", "audio")
DEFAULT_MM_LIMIT = 1     # before the model's row is known (vLLM's default for most models)


# vLLM's allowed --max-lora-rank values
LORA_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)


@dataclass
class LoRAModule:
    """One --lora-modules entry: the name requests use as `model`, and its folder or hub id."""
    name: str
    path: str
    base_model_name: str | None = None


@dataclass
class LoRAConfig:
    """--enable-lora and its knobs, vLLM's names and defaults."""
    lora_modules: list[LoRAModule] = field(default_factory=list)
    max_loras: int = 1            # distinct adapters in one step (device slots)
    max_lora_rank: int = 16
    max_cpu_loras: int | None = None   # adapters kept loaded off the device (default max_loras)
    lora_dtype: str = "auto"      # auto: the model's dtype
    allow_downloads: bool = False  # --allow-lora-downloads: an adapter path may be a hub id

    def __post_init__(self) -> None:
        if self.max_loras < 1:
            raise ConfigError(f"--max-loras must be >= 1, got {self.max_loras}")
        if self.max_lora_rank not in LORA_RANKS:
            raise ConfigError(f"--max-lora-rank {self.max_lora_rank} is not one of "
                              f"{', '.join(map(str, LORA_RANKS))}")
        if self.max_cpu_loras is None:
            self.max_cpu_loras = self.max_loras
        elif self.max_cpu_loras < self.max_loras:
            raise ConfigError(f"--max-cpu-loras ({self.max_cpu_loras}) must be >= --max-loras "
                              f"({self.max_loras})")
        if self.lora_dtype != "auto" and self.lora_dtype not in DTYPE_NAMES:
            raise ConfigError(f"--lora-dtype {self.lora_dtype!r} is not one of auto, bfloat16, "
                              "float16, float32")
        names = [m.name for m in self.lora_modules]
        dup = {n for n in names if names.count(n) > 1}
        if dup:
            raise ConfigError(f"--lora-modules: the name {sorted(dup)[0]!r} is given twice")



# ---- speculative decoding (engine/spec/) ------------------------------------------------------
SPEC_METHODS = ("ngram", "draft_model", "eagle3", "mtp")
# vLLM's keys, plus minserve's min_acceptance_rate; any other key is a start-up error
_SPEC_KEYS = ("method", "model", "num_speculative_tokens", "prompt_lookup_max",
              "prompt_lookup_min", "disable_by_batch_size", "min_acceptance_rate", "revision",
              "quantization", "draft_tensor_parallel_size")
MAX_SPECULATIVE_TOKENS = 16


@dataclass
class SpeculativeConfig:
    """--speculative-config JSON, vLLM's keys and rules: ngram (prompt lookup, no model),
    draft_model (a small model with the target's vocabulary), eagle3 (an EAGLE-3 head) and mtp
    (the target's own multi-token-prediction layers). None fields take the engine's defaults
    (engine/spec/policy.py), which the start-up log states."""
    method: str
    num_speculative_tokens: int
    model: str | None = None
    prompt_lookup_max: int | None = None
    prompt_lookup_min: int | None = None
    # no drafts in a step with this many requests running or more (vLLM's; None: the default)
    disable_by_batch_size: int | None = None
    # minserve's: a request whose recent drafts are accepted at a lower rate drafts nothing for
    # a while (backing off, then trying again); 0 never stops; None: the default
    min_acceptance_rate: float | None = None
    revision: str | None = None          # the draft model's
    quantization: str | None = None      # the draft model's (None: from its checkpoint)

    @classmethod
    def from_dict(cls, d: Any) -> SpeculativeConfig:
        flag = "--speculative-config"
        if not isinstance(d, dict):
            raise ConfigError(f'{flag} must be a JSON object, e.g. '
                              '\'{"method": "ngram", "num_speculative_tokens": 4}\'')
        unknown = sorted(set(d) - set(_SPEC_KEYS))
        if unknown:
            raise ConfigError(f"{flag}: unknown key {unknown[0]!r} "
                              f"(known: {', '.join(_SPEC_KEYS)})")
        method, model = d.get("method"), d.get("model")
        if method is None:
            if model in ("ngram", "[ngram]"):   # vLLM's older spelling
                method, model = "ngram", None
            elif model is not None:
                method = "draft_model"
            else:
                raise ConfigError(f'{flag}: give "method" ({", ".join(SPEC_METHODS)}) or a '
                                  'draft "model"')
        if method not in SPEC_METHODS:
            raise ConfigError(f"{flag}: method {method!r} is not supported (supported: "
                              f"{', '.join(SPEC_METHODS)})")
        if method in ("draft_model", "eagle3") and not isinstance(model, str):
            raise ConfigError(f'{flag}: method {method} needs "model" (a folder or hub id)')
        if method in ("ngram", "mtp") and model is not None:
            raise ConfigError(f'{flag}: method {method} takes no "model" (it drafts from '
                              f"{'the request itself' if method == 'ngram' else 'the target'})")
        k = d.get("num_speculative_tokens", 1 if method == "mtp" else None)
        _spec_int(flag, "num_speculative_tokens", k, 1, MAX_SPECULATIVE_TOKENS, needed=True)
        lo, hi = d.get("prompt_lookup_min"), d.get("prompt_lookup_max")
        if method == "ngram":   # vLLM's defaults: 5 and 5, or the one given for both
            lo, hi = (5, 5) if lo is None and hi is None else (
                hi if lo is None else lo, lo if hi is None else hi)
            _spec_int(flag, "prompt_lookup_min", lo, 1, 1024)
            _spec_int(flag, "prompt_lookup_max", hi, lo, 1024)
        elif lo is not None or hi is not None:
            raise ConfigError(f"{flag}: prompt_lookup_min/max are ngram's keys, not {method}'s")
        _spec_int(flag, "disable_by_batch_size", d.get("disable_by_batch_size"), 2, 1 << 20)
        if d.get("draft_tensor_parallel_size", 1) != 1:
            raise ConfigError(f"{flag}: draft_tensor_parallel_size must be 1: the draft runs "
                              "whole on rank 0")
        rate = d.get("min_acceptance_rate")
        if rate is not None and (isinstance(rate, bool) or not isinstance(rate, (int, float))
                                 or not 0.0 <= rate <= 1.0):
            raise ConfigError(f"{flag}: min_acceptance_rate must be a number in [0, 1], "
                              f"got {rate!r}")
        quant = d.get("quantization")
        if quant is not None and quant not in QUANTIZATION_METHODS:
            raise ConfigError(f"{flag}: quantization {quant!r} is not supported (supported: "
                              f"{', '.join(QUANTIZATION_METHODS)})")
        return cls(method, k, model, hi, lo, d.get("disable_by_batch_size"),
                   None if rate is None else float(rate), d.get("revision"), quant)


def _spec_int(flag: str, key: str, value: Any, low: int, high: int, needed: bool = False) -> None:
    if value is None and not needed:
        return
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        raise ConfigError(f"{flag}: {key} must be an integer in [{low}, {high}], got {value!r}")
