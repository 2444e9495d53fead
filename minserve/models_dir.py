"""--models-dir: every HF model folder (a config.json inside) and every .gguf file in DIR is a
servable model of the pool (minserve/pool.py), named by its folder or file name; a folder whose
architecture embeds (embeddings.models.is_embedding_model, as --task auto tells) is an embedding
or cross-encoder model for /v1/embeddings, /v1/score and /v1/rerank. DIR's optional
`minserve-models.json` sets per-model engine flags, keyed by model name:

    {"coder": {"max_model_len": 4096, "quantization": "fp8"},
     "chat":  {"lora_modules": {"sql": "/adapters/sql"}, "max_lora_rank": 16}}

Keys are EngineConfig's (vLLM's flag names with underscores) from SETTINGS; anything else is a
start-up error naming the key. PoolSpec is the pool's bounds: --max-loaded-models,
--models-memory, --keep-alive, --model-wait-timeout and whether sleep mode parks models."""
from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass
from typing import Any

from minserve.config import ConfigError, EngineConfig, LoRAConfig, LoRAModule
from minserve.embeddings.models import is_embedding_model

SETTINGS_FILE = "minserve-models.json"
SETTINGS_MAX_BYTES = 1 << 20
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".gguf", ".pt")
# per-model engine flags a settings file may set (the rest are the server's, for every model)
SETTINGS = {"max_model_len", "quantization", "dtype", "kv_cache_memory", "max_num_seqs",
            "gpu_memory_utilization", "load_format", "tensor_parallel_size", "revision",
            "enable_prefix_caching", "max_num_batched_tokens", "seed", "tokenizer",
            "gguf_dequantize", "kv_cache_dtype"}
LORA_SETTINGS = {"lora_modules", "max_loras", "max_lora_rank", "max_cpu_loras"}


@dataclass
class ModelSpec:
    name: str
    config: EngineConfig
    size_bytes: int        # its weights' files (+ its --kv-cache-memory): the budget's estimate
    task: str = "generate"  # "embed": an embedding or cross-encoder model (is_embedding_model)


@dataclass
class PoolSpec:
    models: list[ModelSpec]
    max_loaded: int = 1 << 30           # --max-loaded-models (default: no count bound)
    memory_bytes: int | None = None     # --models-memory (None: no byte bound)
    keep_alive_s: float | None = None   # --keep-alive (None: never unload an idle model)
    wait_timeout_s: float = 60.0        # --model-wait-timeout: then a 503 with Retry-After
    park: bool = False                  # --enable-sleep-mode: evicted models are parked


def discover(models_dir: str, base: EngineConfig) -> list[ModelSpec]:
    """The models in DIR (sorted by name), each with the server's flags and its settings."""
    if not os.path.isdir(models_dir):
        raise ConfigError(f"--models-dir {models_dir}: not a directory")
    settings = read_settings(models_dir)
    found: dict[str, str] = {}
    for entry in sorted(os.listdir(models_dir)):
        path = os.path.join(models_dir, entry)
        if os.path.isdir(path) and os.path.isfile(os.path.join(path, "config.json")):
            found[entry] = path
        elif entry.endswith(".gguf") and os.path.isfile(path):
            found[entry[:-len(".gguf")]] = path
    unknown = sorted(set(settings) - set(found))
    if unknown:
        raise ConfigError(f"{SETTINGS_FILE} sets {', '.join(unknown)}, which --models-dir "
                          f"{models_dir} does not hold (models: {', '.join(found) or 'none'})")
    return [_spec(name, path, base, settings.get(name, {})) for name, path in found.items()]


def _spec(name: str, path: str, base: EngineConfig, settings: dict[str, Any]) -> ModelSpec:
    task = _task(path)
    if task == "embed" and "max_model_len" not in settings:
        # the server's --max-model-len is the chat models'; an encoder keeps its own positions
        base = dataclasses.replace(base, max_model_len=None)
    config = model_config(base, path, settings, name)
    return ModelSpec(name, config, estimate_bytes(path, config), task)


def _task(path: str) -> str:
    try:
        return "embed" if os.path.isdir(path) and is_embedding_model(path) else "generate"
    except (OSError, ValueError):    # a broken config.json: the load fails, naming it
        return "generate"


def read_settings(models_dir: str) -> dict[str, dict[str, Any]]:
    path = os.path.join(models_dir, SETTINGS_FILE)
    if not os.path.exists(path):
        return {}
    if os.path.getsize(path) > SETTINGS_MAX_BYTES:
        raise ConfigError(f"{path} is over {SETTINGS_MAX_BYTES >> 20} MiB")
    try:
        with open(path, encoding="utf-8") as f:
            settings = json.load(f)
    except (OSError, ValueError) as e:
        raise ConfigError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(settings, dict) or not all(isinstance(v, dict) for v in settings.values()):
        raise ConfigError(f"{path}: must be an object of model name -> object of engine flags")
    return settings


def model_config(base: EngineConfig, path: str, settings: dict[str, Any], name: str
                 ) -> EngineConfig:
    bad = sorted(set(settings) - SETTINGS - LORA_SETTINGS)
    if bad:
        raise ConfigError(f"{SETTINGS_FILE}: model {name}: unknown setting(s) {', '.join(bad)} "
                          f"(allowed: {', '.join(sorted(SETTINGS | LORA_SETTINGS))})")
    plain = {k: v for k, v in settings.items() if k in SETTINGS}
    lora = {k: v for k, v in settings.items() if k in LORA_SETTINGS}
    try:
        if lora:
            modules = lora.pop("lora_modules", {})
            if not isinstance(modules, dict):
                raise ConfigError("lora_modules must be an object of adapter name -> path")
            lora["lora_modules"] = [LoRAModule(n, p, base_model_name=name)
                                    for n, p in modules.items()]
            plain["lora"] = LoRAConfig(**lora)
        return dataclasses.replace(base, model=path, served_model_name=[name], **plain)
    except (TypeError, ValueError) as e:     # ConfigError is a ValueError
        raise ConfigError(f"{SETTINGS_FILE}: model {name}: {e}") from None


def estimate_bytes(path: str, config: EngineConfig) -> int:
    """Weights' files on disk plus a fixed KV cache: what loading it is counted as."""
    if os.path.isfile(path):
        weights = os.path.getsize(path)
    else:
        weights = sum(os.path.getsize(os.path.join(path, f)) for f in os.listdir(path)
                      if f.endswith(WEIGHT_SUFFIXES))
    return weights + int(config.kv_cache_memory or 0)


def _meminfo(key: str) -> int | None:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith(key + ":"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def host_available_bytes() -> int:
    return _meminfo("MemAvailable") or 0


def memory_budget(value: float | None, device: str) -> int | None:
    """--models-memory: GiB (> 1) or a fraction of the device's memory (<= 1); None: 90% of
    it ("what fits", by the estimate above)."""
    if value is not None and value <= 0:
        raise ConfigError(f"--models-memory must be > 0, got {value}")
    if value is not None and value > 1:
        return int(value * (1 << 30))
    total = _device_total(device)
    if total is None:
        return None
    return int(total * (value if value is not None else 0.9))


def _device_total(device: str) -> int | None:
    if device != "cpu":
        import torch   # the engine imports it anyway; here only for the GPU's size

        if torch.cuda.is_available() and device in ("auto", "cuda") or device.startswith("cuda"):
            return torch.cuda.get_device_properties(0).total_memory
    return _meminfo("MemTotal")


# ---- the flags (cli.py adds them; launch.py builds the pool from them) ----
def add_flags(a: Any) -> None:
    a("--models-dir", default=None, metavar="DIR",
      help="serve every model folder and .gguf file in DIR, loaded on demand and named by its "
           f"folder or file name (per-model flags: DIR/{SETTINGS_FILE}); --model adds one more")
    a("--max-loaded-models", type=int, default=None,
      help="--models-dir: models resident at once (default: as many as --models-memory holds)")
    a("--models-memory", type=float, default=None,
      help="--models-dir: the memory loaded models may take, in GiB (> 1) or as a fraction of "
           "the device's (<= 1); default 0.9 of it, estimated from the weights' files")
    a("--keep-alive", type=float, default=None, metavar="SECONDS",
      help="--models-dir: unload a model idle this long (default: never)")
    a("--model-wait-timeout", type=float, default=60.0, metavar="SECONDS",
      help="--models-dir: how long a request waits for its model (room, then its load) before "
           "a 503 with Retry-After")
    a("--enable-sleep-mode", action="store_true",
      help="POST /sleep?level=1|2, /wake_up, GET /is_sleeping (vLLM's); with --models-dir, "
           "evicted models are parked (weights in host memory) on a GPU")


def spec_from_args(args: Any, base: EngineConfig) -> PoolSpec | None:
    """The pool the flags ask for, or None without --models-dir (ConfigError: a bad flag)."""
    if args.models_dir is None:
        return None
    if args.max_loaded_models is not None and args.max_loaded_models < 1:
        raise ConfigError(f"--max-loaded-models must be >= 1, got {args.max_loaded_models}")
    if args.keep_alive is not None and args.keep_alive <= 0:
        raise ConfigError(f"--keep-alive must be > 0 seconds, got {args.keep_alive}")
    models = discover(args.models_dir, base)
    if not models:
        raise ConfigError(f"--models-dir {args.models_dir} holds no model folder (with a "
                          "config.json) and no .gguf file")
    return PoolSpec(models, max_loaded=args.max_loaded_models or PoolSpec.max_loaded,
                    memory_bytes=memory_budget(args.models_memory, args.device),
                    keep_alive_s=args.keep_alive, wait_timeout_s=args.model_wait_timeout,
                    park=args.enable_sleep_mode)
