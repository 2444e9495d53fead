"""A tiny Phi-3.5-vision (Phi3VForCausalLM) written as a hub-style folder. transformers has no
class for it (the hub's remote code), so its reference tokens were taken once, outside the repo,
against that remote code (see the "command" of tests/data/phi3v_tiny.json); this module writes the
same model those runs saw: the committed config, the tests' tokenizer, and weights drawn per
tensor name (a generator seeded by the name), not by a model class's init order."""
from __future__ import annotations

import json
import os
import zlib

import torch

from tests.tiny_vlm import make_vlm_tokenizer

DATA = os.path.join(os.path.dirname(__file__), "data", "phi3v_tiny.json")
BOS, EOS, IMAGE = "<|endoftext|>", "<|im_end|>", "<image>"
# Phi-3.5-vision's own chat template (string content with <|image_N|> tags)
TEMPLATE = ("{% for message in messages %}{{'<|' + message['role'] + '|>' + '\n' + "
            "message['content'] + '<|end|>\n' }}{% endfor %}{% if add_generation_prompt and "
            "messages[-1]['role'] != 'assistant' %}{{- '<|assistant|>\n' -}}{% endif %}")


def load_data() -> dict:
    with open(DATA) as f:
        return json.load(f)


def checkpoint_shapes(config: dict) -> dict[str, tuple[int, ...]]:
    """The hub checkpoint's tensor names and shapes: a Phi-3 language model, the CLIP tower under
    model.vision_embed_tokens.img_processor, the separators and the two-layer projection."""
    import transformers

    text = {k: v for k, v in config.items() if k not in ("rope_scaling", "img_processor",
                                                         "embd_layer", "architectures")}
    vision = config["img_processor"]["vision_config"]
    with torch.device("meta"):
        lm = transformers.Phi3ForCausalLM(transformers.Phi3Config(**text, pad_token_id=0))
        clip = transformers.CLIPVisionModel(transformers.CLIPVisionConfig(
            **vision, image_size=336, patch_size=14, hidden_act="quick_gelu"))
    shapes = {name: tuple(p.shape) for name, p in lm.state_dict().items()}
    prefix = "model.vision_embed_tokens."
    shapes.update({f"{prefix}img_processor.{name}": tuple(p.shape)
                   for name, p in clip.state_dict().items() if "position_ids" not in name})
    dim, hidden = 4 * vision["hidden_size"], config["hidden_size"]
    shapes.update({f"{prefix}glb_GN": (1, 1, dim), f"{prefix}sub_GN": (1, 1, 1, dim),
                   f"{prefix}img_projection.0.weight": (hidden, dim),
                   f"{prefix}img_projection.0.bias": (hidden,),
                   f"{prefix}img_projection.2.weight": (hidden, hidden),
                   f"{prefix}img_projection.2.bias": (hidden,)})
    return shapes


def draw(name: str, shape: tuple[int, ...]) -> torch.Tensor:
    """A tensor from a generator seeded by its name: norms near 1, matrices N(0, 0.15) (greedy
    choices well apart, as tests/tiny.py scales its models), the rest N(0, 0.05)."""
    gen = torch.Generator().manual_seed(zlib.crc32(name.encode()))
    x = torch.randn(shape, generator=gen)
    if "norm" in name and name.endswith("weight"):
        return 1.0 + 0.1 * x
    return x * (0.15 if len(shape) > 1 else 0.05)


def make_tiny_phi3v(folder: str) -> str:
    from safetensors.torch import save_file

    os.makedirs(folder, exist_ok=True)
    data = load_data()
    ids = make_vlm_tokenizer(folder)
    path = os.path.join(folder, "tokenizer.json")
    with open(path) as f:
        tok = json.load(f)
    # Phi-3's tokenizer puts <s> before every text it encodes (<|endoftext|> stands in for it)
    tok["post_processor"] = {"type": "TemplateProcessing",
                             "single": [{"SpecialToken": {"id": BOS, "type_id": 0}},
                                        {"Sequence": {"id": "A", "type_id": 0}}],
                             "pair": [{"Sequence": {"id": "A", "type_id": 0}},
                                      {"Sequence": {"id": "B", "type_id": 1}}],
                             "special_tokens": {BOS: {"id": BOS, "ids": [ids[BOS]],
                                                      "tokens": [BOS]}}}
    with open(path, "w") as f:
        json.dump(tok, f)
    vocab = len(tok["model"]["vocab"]) + sum(t["content"] not in tok["model"]["vocab"]
                                            for t in tok["added_tokens"])
    config = {**data["config"], "vocab_size": vocab, "bos_token_id": ids[BOS],
              "eos_token_id": ids[EOS], "image_token_id": ids[IMAGE]}
    files = {"config.json": config,
             "preprocessor_config.json": data["preprocessor_config"],
             "generation_config.json": {"eos_token_id": [ids[EOS]]},
             "tokenizer_config.json": {"bos_token": BOS, "eos_token": EOS,
                                       "pad_token": BOS, "unk_token": None,
                                       "chat_template": TEMPLATE, "model_max_length": 4096,
                                       "tokenizer_class": "PreTrainedTokenizerFast"}}
    for name, content in files.items():
        with open(os.path.join(folder, name), "w") as f:
            json.dump(content, f, indent=2)
    weights = {name: draw(name, shape) for name, shape in checkpoint_shapes(config).items()}
    save_file(weights, os.path.join(folder, "model.safetensors"))
    return folder
