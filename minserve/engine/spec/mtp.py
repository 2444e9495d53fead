"""Multi-token prediction ("mtp"): the target's own next-token layers as the drafter. Models that
ship them say so in config.json (DeepSeek-style num_nextn_predict_layers, Qwen3.5's
mtp_num_hidden_layers); their registry row names the head's row (Architecture.mtp_head), a
module that reads its weights from the target's checkpoint and drafts as an EAGLE-3 head does
(drafter.HeadDrafter: a decoder layer over [embedding | the target's final hidden state], with
its own KV cache). The heads come with those architectures; this is where they plug in."""
from __future__ import annotations

import dataclasses
from typing import Any

from minserve.config import ConfigError

MTP_KEYS = ("num_nextn_predict_layers", "mtp_num_hidden_layers", "num_mtp_layers")


def num_mtp_layers(hf_config: dict[str, Any]) -> int:
    """How many MTP layers config.json declares (a wrapper's text_config too); 0: none."""
    for d in (hf_config, hf_config.get("text_config") or {}):
        for key in MTP_KEYS:
            if d.get(key):
                return int(d[key])
    return 0


def mtp_source(target: Any) -> Any:
    """The target's MTP head as a ModelSource over the target's own folder, or a ConfigError
    naming what is missing (checked at start-up, before anything is built)."""
    from minserve.engine.builder import ModelSource
    from minserve.models.registry import lookup

    arch = target.arch
    n = num_mtp_layers(target.hf_config)
    if n == 0:
        raise ConfigError(f'--speculative-config: method "mtp" drafts with the model\'s own '
                          f"multi-token-prediction layers, and {arch.name} has no MTP layers "
                          f"(config.json sets none of {', '.join(MTP_KEYS)}); use \"ngram\", a "
                          'draft "model" or "eagle3"')
    if arch.mtp_head is None:
        raise ConfigError(f"--speculative-config: {arch.name} ships {n} MTP layer(s), but "
                          "minserve does not run them for this architecture yet; use \"ngram\", "
                          'a draft "model" or "eagle3"')
    head = lookup(arch.mtp_head, "draft")
    config = getattr(head.model_class(), "config_class", None)
    if config is None:
        raise ConfigError(f"{head.name}: an MTP head needs a config_class")
    model_config = dataclasses.replace(config.from_dict(target.hf_config),
                                       architecture=head.name)
    return ModelSource(target.folder, target.hf_config, head, model_config, "draft")
