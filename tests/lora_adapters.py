"""Random LoRA adapters for tiny models, written by peft in its own layout (adapter_config.json +
adapter_model.safetensors), and peft as the reference (the adapted model, or its merged weights
saved as a plain HF folder). peft and transformers are test dependencies only."""
from __future__ import annotations

import json
import os
import shutil

import torch

ALL = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def load_peft(base_dir: str, adapter_dir: str):
    import peft
    import transformers

    base = transformers.AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
    return peft.PeftModel.from_pretrained(base, adapter_dir).eval()


def make_adapter(base_dir: str, out_dir: str, r: int = 8, alpha: int = 16,
                 targets: list[str] | str | None = None, use_rslora: bool = False,
                 seed: int = 0, scale: float = 0.3) -> str:
    """A LoRA with random A and B (B is zero in a fresh peft adapter: no effect to test)."""
    import peft
    import transformers

    base = transformers.AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
    cfg = peft.LoraConfig(r=r, lora_alpha=alpha, target_modules=targets or ALL,
                          use_rslora=use_rslora, init_lora_weights=False, lora_dropout=0.0)
    model = peft.get_peft_model(base, cfg)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_" in name:
                p.copy_(torch.randn(p.shape, generator=gen) * scale)
    model.save_pretrained(out_dir)
    return out_dir


def merged_model(base_dir: str, adapter_dir: str, out_dir: str) -> str:
    """The base model with the adapter merged into its weights, as a plain HF folder."""
    model = load_peft(base_dir, adapter_dir).merge_and_unload()
    model.save_pretrained(out_dir, safe_serialization=True)
    for f in os.listdir(base_dir):
        if f.startswith(("tokenizer", "generation_config")):
            shutil.copy(os.path.join(base_dir, f), out_dir)
    return out_dir


def edit_config(adapter_dir: str, **changes) -> None:
    path = os.path.join(adapter_dir, "adapter_config.json")
    with open(path) as f:
        cfg = json.load(f)
    cfg.update(changes)
    with open(path, "w") as f:
        json.dump(cfg, f)
