"""Read one LoRA adapter in the PEFT layout (adapter_config.json + adapter_model.safetensors) and
check it against the base model: rank, target modules, shapes, unsupported variants. The result
holds, per fused base layer (qkv_proj, gate_up_proj, ...), each slice's A [r, in] and B [out, r]
with the scale folded into B. Never unpickles anything (adapter_model.bin is refused). Reading is
bounded (config size and nesting, safetensors header size, each tensor's shape checked before
its data is read); a hub id is fetched only when downloads are allowed; and every path that is
not a usable adapter folder gets the same words, so the error tells nothing of what exists."""
from __future__ import annotations

import json
import math
import os
import re
from dataclasses import dataclass, field

import torch

from minserve.config import ConfigError, ModelConfig

MAX_CONFIG_BYTES = 1 << 20
MAX_HEADER_BYTES = 8 << 20    # a safetensors header (a 70B model's adapter needs ~200 KB)
# HF projection -> (parent module, fused module in minserve, slice index in the fused layer);
# index None: the checkpoint's module is the fused one (Phi-3's qkv_proj and gate_up_proj), whose
# one A serves every slice and whose B splits into the slices' rows (FUSED_PARTS)
TARGETS = {
    "q_proj": ("self_attn", "qkv_proj", 0), "k_proj": ("self_attn", "qkv_proj", 1),
    "v_proj": ("self_attn", "qkv_proj", 2), "o_proj": ("self_attn", "o_proj", 0),
    "gate_proj": ("mlp", "gate_up_proj", 0), "up_proj": ("mlp", "gate_up_proj", 1),
    "down_proj": ("mlp", "down_proj", 0),
    "qkv_proj": ("self_attn", "qkv_proj", None), "gate_up_proj": ("mlp", "gate_up_proj", None),
}
FUSED_SLICES = {"qkv_proj": 3, "o_proj": 1, "gate_up_proj": 2, "down_proj": 1}
FUSED_PARTS = {"qkv_proj": ("q_proj", "k_proj", "v_proj"), "gate_up_proj": ("gate_proj", "up_proj")}
# config fields of PEFT variants minserve does not run: refused when set to anything but these
_VARIANTS = {"use_dora": (False, None), "rank_pattern": ({}, None), "alpha_pattern": ({}, None),
             "lora_bias": (False, None), "fan_in_fan_out": (False, None),
             "layer_replication": (None,), "use_qalora": (False, None),
             "megatron_config": (None,), "trainable_token_indices": (None,),
             "target_parameters": (None, []), "alora_invocation_tokens": (None,),
             "use_bdlora": (None, False), "arrow_config": (None,), "velora_config": (None,),
             "monteclora_config": (None,), "kasa_config": (None,)}
# an adapter on a mixture-of-experts block: peft's target_parameters (the experts' fused
# [E, ...] weights) or per-expert / shared-expert modules
_EXPERT_KEY = re.compile(r"\.mlp\.(?:experts|shared_expert)\b")
_NO_EXPERTS = ("minserve runs LoRA on the attention and dense MLP layers only, not on a "
               "mixture-of-experts block; train the adapter without the experts")
_KEY = re.compile(r"(?:base_model\.model\.)?(model\.layers\.(\d+)\.(\w+)\.(\w+))"
                  r"\.lora_([AB])(?:\.default)?\.weight")


class LoRAError(ConfigError):
    """An adapter minserve cannot serve: a start-up error, or a 400 on the load route."""


@dataclass
class LoRAWeights:
    """One loaded adapter: weights[fused module name][slice] = (A [r, in], B*scale [out, r]);
    folder: where it was read from (a hub id's local snapshot), to read it again."""
    name: str
    weights: dict[str, list[tuple[torch.Tensor, torch.Tensor] | None]] = field(
        default_factory=dict)
    folder: str = ""


def unusable(path: str, allow_downloads: bool) -> LoRAError:
    """The one error for a path that is not a usable adapter folder, whatever is (or is not)
    there: a missing folder, a missing or unreadable config, no safetensors."""
    hint = "" if allow_downloads else " (a hub id needs --allow-lora-downloads)"
    return LoRAError(f"LoRA adapter {path!r}: not a usable PEFT LoRA adapter: give a folder "
                     "holding adapter_config.json and adapter_model.safetensors (.bin pickles "
                     f"are never loaded){hint}")


def slice_shapes(mc: ModelConfig, leaf: str, layer: int = 0) -> tuple[int, int]:
    """(in_features, out_features) of one HF projection of a layer in the full (unsharded)
    model; a config whose layers differ (Gemma 4) says per layer (projection_shapes)."""
    per_layer = getattr(mc, "projection_shapes", None)
    if per_layer is not None:
        shapes = per_layer(layer)
        if leaf not in shapes:
            raise LoRAError(f"adapter_model.safetensors: layer {layer} of the base model has no "
                            f"{leaf} to adapt")
        return shapes[leaf]
    q, kv, h, i = (mc.num_attention_heads * mc.head_dim, mc.num_key_value_heads * mc.head_dim,
                   mc.hidden_size, mc.intermediate_size)
    # gated attention (models/qwen3_next.py): q_proj's rows are each head's query and gate
    q_rows = 2 * q if getattr(mc, "attn_output_gate", False) else q
    return {"q_proj": (h, q_rows), "k_proj": (h, kv), "v_proj": (h, kv), "o_proj": (q, h),
            "gate_proj": (h, i), "up_proj": (h, i), "down_proj": (i, h),
            "qkv_proj": (h, q + 2 * kv), "gate_up_proj": (h, 2 * i)}[leaf]


def resolve_adapter(path: str, allow_downloads: bool = False) -> str:
    """A local folder, or (allow_downloads) a hub id fetched through huggingface-hub like a
    model."""
    local = os.path.expanduser(path) if path else ""
    if local and os.path.isdir(local):
        return local
    if not allow_downloads or path.startswith((".", "/", "~")) or path.count("/") > 1 \
            or not path:
        raise unusable(path, allow_downloads)
    from minserve.models.loader import _hub_snapshot
    try:
        return _hub_snapshot(path, None)
    except ConfigError as e:
        raise LoRAError(str(e)) from None


def read_config(folder: str, max_rank: int, path: str = "", allow_downloads: bool = False
                ) -> dict:
    """adapter_config.json, checked; path: what the caller named (for the error text)."""
    cfg_path = os.path.join(folder, "adapter_config.json")
    try:
        if os.path.getsize(cfg_path) > MAX_CONFIG_BYTES:
            raise ValueError(cfg_path)
        with open(cfg_path, "rb") as f:
            cfg = json.loads(f.read(MAX_CONFIG_BYTES + 1).decode("utf-8"))
    # RecursionError: a config nested thousands of levels deep (it was a 500)
    except (OSError, ValueError, RecursionError):
        raise unusable(path or folder, allow_downloads) from None
    if not isinstance(cfg, dict):
        raise unusable(path or folder, allow_downloads)
    if cfg.get("peft_type", "LORA") != "LORA":
        raise LoRAError(f"adapter_config.json: peft_type {cfg['peft_type']!r} is not supported "
                        "(only LORA)")
    if cfg.get("target_parameters"):    # (before the variants: peft sets rank patterns with it)
        raise LoRAError(f"adapter_config.json: target_parameters={cfg['target_parameters']!r} "
                        f"adapts the experts' weights; {_NO_EXPERTS} (target_modules only)")
    for name, allowed in _VARIANTS.items():
        if cfg.get(name) not in allowed:
            raise LoRAError(f"adapter_config.json: {name}={cfg[name]!r} is not supported "
                            "(plain LoRA only: no DoRA, rank/alpha patterns or other variants)")
    if cfg.get("modules_to_save"):
        raise LoRAError(f"adapter_config.json: modules_to_save={cfg['modules_to_save']!r} is not "
                        "supported (the adapter must not replace whole base-model modules)")
    if cfg.get("bias", "none") != "none":
        raise LoRAError(f"adapter_config.json: bias={cfg['bias']!r} is not supported (only "
                        '"none")')
    r = cfg.get("r")
    if not isinstance(r, int) or isinstance(r, bool) or r < 1:
        raise LoRAError(f"adapter_config.json: r must be a positive integer, got {r!r}")
    if r > max_rank:
        raise LoRAError(f"adapter_config.json: the LoRA rank r={r} is greater than "
                        f"--max-lora-rank {max_rank}")
    alpha = cfg.get("lora_alpha", 8)
    if not isinstance(alpha, (int, float)) or isinstance(alpha, bool):
        raise LoRAError(f"adapter_config.json: lora_alpha must be a number, got {alpha!r}")
    return cfg


def check_targets(target_modules: object, num_layers: int) -> None:
    """target_modules (names, a regex over module names, or "all-linear") must name projections
    the base model has and minserve wraps."""
    if target_modules == "all-linear":
        return
    if isinstance(target_modules, str):
        names = [f"model.layers.{i}.{parent}.{leaf}" for i in range(num_layers)
                 for leaf, (parent, _, _) in TARGETS.items()]
        try:
            if not any(re.fullmatch(target_modules, n) for n in names):
                raise LoRAError(f"adapter_config.json: target_modules {target_modules!r} matches "
                                "no module of the base model")
        except re.error as e:
            raise LoRAError(f"adapter_config.json: target_modules {target_modules!r} is not a "
                            f"valid regex ({e})") from None
        return
    if not isinstance(target_modules, list) or not target_modules:
        raise LoRAError("adapter_config.json: target_modules must be a list of module names or "
                        "a regex")
    for t in target_modules:
        if t not in TARGETS:
            raise LoRAError(f"adapter_config.json: target_modules names {t!r}, which the base "
                            f"model does not have as a LoRA target (supported: "
                            f"{', '.join(TARGETS)})")


def _check_not_experts(key: str, mc: ModelConfig) -> None:
    """A tensor on an expert, or on the MLP of a layer whose MLP is a mixture of experts."""
    m = re.search(r"layers\.(\d+)\.mlp\.(\w+)\.lora_", key)
    sparse_layer = (m is not None and mc.moe is not None and m.group(2) in TARGETS
                    and mc.moe.is_sparse(int(m.group(1))))
    if _EXPERT_KEY.search(key) or sparse_layer:
        raise LoRAError(f"adapter_model.safetensors: {key!r} adapts a mixture-of-experts "
                        f"layer; {_NO_EXPERTS}")


def load_adapter(name: str, path: str, mc: ModelConfig, max_rank: int,
                 dtype: torch.dtype, allow_downloads: bool = False) -> LoRAWeights:
    """Read and check an adapter (on the CPU, in dtype). Raises LoRAError naming the problem.
    Touches no shared state: the server runs it in a worker thread, off the engine's."""
    folder = resolve_adapter(path, allow_downloads)
    cfg = read_config(folder, max_rank, path, allow_downloads)
    st_path = os.path.join(folder, "adapter_model.safetensors")
    if not os.path.isfile(st_path):
        raise unusable(path, allow_downloads)
    check_targets(cfg.get("target_modules"), mc.num_hidden_layers)
    r = cfg["r"]
    alpha = cfg.get("lora_alpha", 8)
    scale = alpha / math.sqrt(r) if cfg.get("use_rslora") else alpha / r
    out = LoRAWeights(name, folder=folder)
    pairs = _read_pairs(st_path, mc, r)
    for (module, leaf), ab in pairs.items():
        if set(ab) != {"A", "B"}:
            raise LoRAError(f"adapter_model.safetensors: {module} has lora_{set(ab).pop()} "
                            "without its pair")
        _, fused, index = TARGETS[leaf]
        fused_name = module.rpartition(".")[0] + "." + fused
        slices = out.weights.setdefault(fused_name, [None] * FUSED_SLICES[fused])
        a, b = ab["A"].to(dtype).contiguous(), ab["B"].float() * scale
        if index is None:       # a fused module's B, split into its slices' rows
            layer = int(module.split(".")[2])
            sizes = [slice_shapes(mc, part, layer)[1] for part in FUSED_PARTS[leaf]]
            parts = list(enumerate(b.split(sizes)))
        else:
            parts = [(index, b)]
        for i, part in parts:
            if slices[i] is not None:
                raise LoRAError(f"adapter_model.safetensors: {module} adapts a projection that "
                                "another of its modules adapts too (fused and unfused names)")
            slices[i] = (a, part.to(dtype).contiguous())
    return out


def _read_pairs(st_path: str, mc: ModelConfig, r: int
                ) -> dict[tuple[str, str], dict[str, torch.Tensor]]:
    """(module, projection) -> {"A": tensor, "B": tensor}: each key and shape checked against
    the base model before its data is read, the header's size before the file is opened."""
    from safetensors import SafetensorError, safe_open
    try:
        with open(st_path, "rb") as f:
            header_len = int.from_bytes(f.read(8), "little")
    except OSError as e:
        raise LoRAError(f"adapter_model.safetensors: cannot be read ({e.strerror})") from None
    if header_len > MAX_HEADER_BYTES:
        raise LoRAError(f"adapter_model.safetensors: its header is {header_len} bytes; at most "
                        f"{MAX_HEADER_BYTES} are read (an adapter's is a few hundred KB)")
    pairs: dict[tuple[str, str], dict[str, torch.Tensor]] = {}
    try:
        with safe_open(st_path, framework="pt", device="cpu") as f:
            for key in f.keys():  # noqa: SIM118 (safe_open is not a dict)
                _check_not_experts(key, mc)
                m = _KEY.fullmatch(key)
                if m is None or m.group(4) not in TARGETS or \
                        TARGETS[m.group(4)][0] != m.group(3):
                    raise LoRAError(f"adapter_model.safetensors: tensor {key!r} is not a LoRA "
                                    "A/B weight of a q/k/v/o/gate/up/down projection of the "
                                    "base model")
                if int(m.group(2)) >= mc.num_hidden_layers:
                    raise LoRAError(f"adapter_model.safetensors: {key!r}: the base model has "
                                    f"{mc.num_hidden_layers} layers")
                in_f, out_f = slice_shapes(mc, m.group(4), int(m.group(2)))
                want = (r, in_f) if m.group(5) == "A" else (out_f, r)
                shape = tuple(f.get_slice(key).get_shape())
                if shape != want:
                    raise LoRAError(f"adapter_model.safetensors: {m.group(1)}: lora_"
                                    f"{m.group(5)} {shape} does not fit the base model "
                                    f"(expected {want} for r={r})")
                pairs.setdefault((m.group(1), m.group(4)), {})[m.group(5)] = f.get_tensor(key)
    except SafetensorError as e:
        raise LoRAError(f"adapter_model.safetensors: not a valid safetensors file ({e})") \
            from None
    if not pairs:
        raise LoRAError("adapter_model.safetensors: holds no LoRA weights")
    return pairs
