"""Tiny random vision-language models written as real HF folders by transformers (config.json,
safetensors, a tokenizer with each model's image tokens, preprocessor/processor configs and a chat
template shaped like the real checkpoint's), so tests go through our loader and processors."""
from __future__ import annotations

import json
import os

import numpy as np
import torch

from tests.tiny import CORPUS, scale_up_weights

VLM_SPECIALS = (["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<image>", "<|vision_start|>",
                 "<|image_pad|>", "<|vision_end|>", "<|video_pad|>", "<fake_token_around_image>",
                 "<global-img>", "<end_of_utterance>", "<bos>", "<start_of_turn>",
                 "<end_of_turn>", "<start_of_image>", "<end_of_image>", "<image_soft_token>"]
                + [f"<row_{i}_col_{j}>" for i in range(1, 7) for j in range(1, 7)])

ARCHS = ["LlavaForConditionalGeneration", "Qwen2VLForConditionalGeneration",
         "Qwen2_5_VLForConditionalGeneration", "Idefics3ForConditionalGeneration"]

# Chat templates with each family's shape: content parts of type "image" become the model's
# image placeholder (llava-hf, Qwen2-VL and SmolVLM templates all read parts this way).
_PARTS = ("{% if message['content'] is string %}{{ message['content'] }}{% else %}"
          "{% for part in message['content'] %}{% if part['type'] == 'image' %}{{ IMAGE }}"
          "{% elif part['type'] == 'text' %}{{ part['text'] }}{% endif %}{% endfor %}"
          "{% endif %}")
TEMPLATES = {
    "LlavaForConditionalGeneration":
        "{% for message in messages %}{{ message['role'].upper() + ': ' }}"
        + _PARTS.replace("IMAGE", "'<image>\n'") + "{{ '\n' }}{% endfor %}"
        "{% if add_generation_prompt %}{{ 'ASSISTANT:' }}{% endif %}",
    "Qwen2VLForConditionalGeneration":
        "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' }}"
        + _PARTS.replace("IMAGE", "'<|vision_start|><|image_pad|><|vision_end|>'")
        + "{{ '<|im_end|>\n' }}{% endfor %}"
        "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}",
    "Idefics3ForConditionalGeneration":
        "{% for message in messages %}{{ message['role'] | capitalize + ':' }}"
        + _PARTS.replace("IMAGE", "'<image>'") + "{{ '<end_of_utterance>\n' }}{% endfor %}"
        "{% if add_generation_prompt %}{{ 'Assistant:' }}{% endif %}",
}
TEMPLATES["Qwen2_5_VLForConditionalGeneration"] = TEMPLATES["Qwen2VLForConditionalGeneration"]
TEMPLATES["Qwen3VLForConditionalGeneration"] = TEMPLATES["Qwen2VLForConditionalGeneration"]
# NOTE: Gemma's own template writes "user\n" right before an image, which transformers'
# processor expands to "\n\n\n<start_of_image>..." and tokenizes whole; ours expands by tokens
# (a newline run there may tokenize apart): the tiny template keeps text before the image.
TEMPLATES["Gemma3ForConditionalGeneration"] = (
    "{{ bos_token }}{% for message in messages %}{{ '<start_of_turn>' + message['role'] + ': ' }}"
    + _PARTS.replace("IMAGE", "'<start_of_image>'") + "{{ '<end_of_turn>\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<start_of_turn>model\n' }}{% endif %}")
TEMPLATES["Mistral3ForConditionalGeneration"] = (
    "{{ bos_token }}{% for message in messages %}{% if message['role'] == 'user' %}"
    "{{ '[INST]' }}" + _PARTS.replace("IMAGE", "'[IMG]'") + "{{ '[/INST]' }}"
    "{% else %}{{ message['content'] + eos_token }}{% endif %}{% endfor %}")

TEXT = {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
        "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 1024,
        "rms_norm_eps": 1e-6, "tie_word_embeddings": False}
# Qwen2-VL: images from 4 to 16 language-model tokens (28x28 pixels each).
QWEN_PIXELS = {"min_pixels": 28 * 28 * 4, "max_pixels": 28 * 28 * 16}
# Idefics3: 32-pixel tiles of 4 tokens, images up to 2x2 tiles plus the global one.
IDEFICS3_TILE, IDEFICS3_LONGEST = 32, 64


def make_vlm_tokenizer(folder: str) -> dict[str, int]:
    """A small byte-level BPE with every family's image tokens; returns special -> id."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=VLM_SPECIALS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    tok.train_from_iterator(CORPUS * 3 + ["USER: ASSISTANT: User: Assistant:\n\n"] * 3,
                            trainer=trainer)
    path = os.path.join(folder, "tokenizer.json")
    tok.save(path)
    return {t: tok.token_to_id(t) for t in VLM_SPECIALS}


# Tekken's split regex and the first of its special tokens, in its order ([IMG] is 10)
TEKKEN_PATTERN = (r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+|"
                  r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*|"
                  r"\p{N}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+")
TEKKEN_SPECIALS = ["<unk>", "<s>", "</s>", "[INST]", "[/INST]", "[AVAILABLE_TOOLS]",
                   "[/AVAILABLE_TOOLS]", "[TOOL_RESULTS]", "[/TOOL_RESULTS]", "[TOOL_CALLS]",
                   "[IMG]", "<pad>", "[IMG_BREAK]", "[IMG_END]", "[PREFIX]", "[MIDDLE]",
                   "[SUFFIX]", "[SYSTEM_PROMPT]", "[/SYSTEM_PROMPT]", "[TOOL_CONTENT]"]
TEKKEN_NUM_SPECIAL = 24    # padded with <SPECIAL_i>, as the real file pads to 1000


def make_tekken(folder: str, vocab_size: int = 400) -> dict[str, int]:
    """A small tekken.json (Mistral's tokenizer format): a byte-level BPE trained on the corpus
    with Tekken's split regex, its tokens written by rank as base64 bytes. -> special -> id."""
    import base64

    from tokenizers import Regex, Tokenizer, models, pre_tokenizers, trainers

    from minserve.tokenizer import bytes_to_unicode

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(TEKKEN_PATTERN), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    trainer = trainers.BpeTrainer(vocab_size=vocab_size - TEKKEN_NUM_SPECIAL,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    tok.train_from_iterator(CORPUS * 3 + ["USER: ASSISTANT: describe the picture\n"] * 3,
                            trainer=trainer)
    to_byte = {c: b for b, c in bytes_to_unicode().items()}
    by_id = sorted(tok.get_vocab().items(), key=lambda kv: kv[1])
    vocab = [{"rank": rank, "token_bytes": base64.b64encode(bytes(to_byte[c] for c in token))
              .decode(), "token_str": None} for rank, (token, _) in enumerate(by_id)]
    data = {"config": {"pattern": TEKKEN_PATTERN, "num_vocab_tokens": len(vocab),
                       "default_vocab_size": TEKKEN_NUM_SPECIAL + len(vocab),
                       "default_num_special_tokens": TEKKEN_NUM_SPECIAL, "version": "v7"},
            "vocab": vocab,
            "special_tokens": [{"rank": i, "token_str": t, "is_control": True}
                               for i, t in enumerate(TEKKEN_SPECIALS)]}
    with open(os.path.join(folder, "tekken.json"), "w") as f:
        json.dump(data, f)
    return {t: i for i, t in enumerate(TEKKEN_SPECIALS)}


def _config(arch: str, ids: dict[str, int], vocab: int) -> object:
    import transformers

    if arch == "Mistral3ForConditionalGeneration":
        # a sliding window shorter than the image prompts; 4x4-pixel patches, 2x2 merged
        text = {**TEXT, "vocab_size": vocab, "bos_token_id": ids["<s>"], "head_dim": 16,
                "eos_token_id": ids["</s>"], "sliding_window": 32, "model_type": "mistral"}
        vision = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 3,
                  "num_attention_heads": 4, "image_size": 64, "patch_size": 4,
                  "hidden_act": "silu", "head_dim": 8}
        return transformers.Mistral3Config(text_config=text, vision_config=vision,
                                           image_token_index=ids["[IMG]"], spatial_merge_size=2,
                                           vision_feature_layer=-1, tie_word_embeddings=False)
    text = {**TEXT, "vocab_size": vocab, "bos_token_id": ids["<|endoftext|>"],
            "eos_token_id": ids["<|im_end|>"]}
    if arch == "Gemma3ForConditionalGeneration":
        # a sliding layer whose window (12) is shorter than an image's 16 tokens, then a global
        # one; 8x8 patches pooled to 4x4 tokens
        text = {**text, "head_dim": 16, "sliding_window": 12, "query_pre_attn_scalar": 16,
                "bos_token_id": ids["<bos>"], "eos_token_id": ids["<end_of_turn>"],
                "layer_types": ["sliding_attention", "full_attention"]}
        vision = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
                  "num_attention_heads": 4, "image_size": 56, "patch_size": 7}
        return transformers.Gemma3Config(text_config=text, vision_config=vision,
                                         mm_tokens_per_image=16,
                                         boi_token_index=ids["<start_of_image>"],
                                         eoi_token_index=ids["<end_of_image>"],
                                         image_token_index=ids["<image_soft_token>"])
    if arch == "LlavaForConditionalGeneration":
        vision = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 3,
                  "num_attention_heads": 4, "image_size": 56, "patch_size": 14}
        return transformers.LlavaConfig(vision_config=vision, text_config=text,
                                        image_token_index=ids["<image>"])
    if arch.startswith("Qwen"):
        text["rope_parameters"] = {"rope_type": "default", "rope_theta": 10000.0,
                                   "mrope_section": [2, 3, 3]}
        qwen_ids = {"image_token_id": ids["<|image_pad|>"],
                    "video_token_id": ids["<|video_pad|>"],
                    "vision_start_token_id": ids["<|vision_start|>"],
                    "vision_end_token_id": ids["<|vision_end|>"]}
        if arch == "Qwen3VLForConditionalGeneration":
            # DeepStack into both language-model layers; a 4x4 position table resampled
            text["rope_parameters"]["mrope_interleaved"] = True
            vision = {"depth": 3, "hidden_size": 32, "intermediate_size": 48, "num_heads": 4,
                      "patch_size": 16, "spatial_merge_size": 2, "temporal_patch_size": 2,
                      "out_hidden_size": 64, "num_position_embeddings": 16,
                      "deepstack_visual_indexes": [0, 2]}
            return transformers.Qwen3VLConfig(text_config={**text, "head_dim": 16},
                                              vision_config=vision, **qwen_ids)
        if arch == "Qwen2VLForConditionalGeneration":
            vision = {"depth": 2, "embed_dim": 32, "hidden_size": 64, "num_heads": 4,
                      "mlp_ratio": 2, "patch_size": 14, "spatial_merge_size": 2,
                      "temporal_patch_size": 2}
            return transformers.Qwen2VLConfig(text_config=text, vision_config=vision, **qwen_ids)
        # window 56 pixels = 2x2 merged tokens: several windows per image, ragged at the edges
        vision = {"depth": 3, "hidden_size": 32, "out_hidden_size": 64, "intermediate_size": 48,
                  "num_heads": 4, "patch_size": 14, "spatial_merge_size": 2,
                  "temporal_patch_size": 2, "window_size": 56, "fullatt_block_indexes": [1]}
        return transformers.Qwen2_5_VLConfig(text_config=text, vision_config=vision, **qwen_ids)
    vision = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
              "num_attention_heads": 4, "image_size": IDEFICS3_TILE, "patch_size": 8}
    return transformers.Idefics3Config(text_config={**text, "model_type": "llama"},
                                       vision_config=vision, scale_factor=2,
                                       image_token_id=ids["<image>"])


def _processor_files(arch: str) -> dict[str, dict]:
    if arch == "LlavaForConditionalGeneration":
        return {"preprocessor_config.json": {
                    "image_processor_type": "CLIPImageProcessor", "size": {"shortest_edge": 56},
                    "crop_size": {"height": 56, "width": 56}, "do_center_crop": True,
                    "resample": 3},
                "processor_config.json": {"patch_size": 14, "num_additional_image_tokens": 1,
                                          "vision_feature_select_strategy": "default"}}
    if arch.startswith("Qwen2"):
        return {"preprocessor_config.json": {"image_processor_type": "Qwen2VLImageProcessor",
                                             **QWEN_PIXELS, "patch_size": 14, "merge_size": 2,
                                             "temporal_patch_size": 2}}
    if arch == "Mistral3ForConditionalGeneration":
        return {"preprocessor_config.json": {
                    "image_processor_type": "PixtralImageProcessor",
                    "patch_size": {"height": 4, "width": 4}, "size": {"longest_edge": 48},
                    "resample": 3},
                "processor_config.json": {"patch_size": 4, "spatial_merge_size": 2}}
    if arch == "Gemma3ForConditionalGeneration":
        return {"preprocessor_config.json": {
                    "image_processor_type": "Gemma3ImageProcessor", "do_pan_and_scan": None,
                    "size": {"height": 56, "width": 56}, "resample": 2,
                    "image_mean": [0.5] * 3, "image_std": [0.5] * 3},
                "processor_config.json": {"image_seq_length": 16}}
    if arch.startswith("Qwen3"):
        return {"preprocessor_config.json": {
            "image_processor_type": "Qwen2VLImageProcessor", "patch_size": 16, "merge_size": 2,
            "temporal_patch_size": 2, "image_mean": [0.5] * 3, "image_std": [0.5] * 3,
            "size": {"shortest_edge": 32 * 32 * 4, "longest_edge": 32 * 32 * 16}}}
    return {"preprocessor_config.json": {
                "image_processor_type": "Idefics3ImageProcessor", "do_image_splitting": True,
                "size": {"longest_edge": IDEFICS3_LONGEST},
                "max_image_size": {"longest_edge": IDEFICS3_TILE}, "resample": 1},
            "processor_config.json": {"image_seq_len": 4}}


def make_tiny_vlm(folder: str, arch: str, seed: int = 0) -> str:
    """Write a tiny random `arch` model (see the module docstring) into `folder`."""
    import transformers

    os.makedirs(folder, exist_ok=True)
    if arch == "Mistral3ForConditionalGeneration":
        # Mistral's own tokenizer file alone (no tokenizer.json, no tokenizer_config.json)
        ids, vocab = make_tekken(folder), 400
        eos, files = ids["</s>"], {}
        with open(os.path.join(folder, "chat_template.jinja"), "w") as f:
            f.write(TEMPLATES[arch])
    else:
        ids = make_vlm_tokenizer(folder)
        with open(os.path.join(folder, "tokenizer.json")) as f:
            tok = json.load(f)
        vocab = len(tok["model"]["vocab"]) + sum(t["content"] not in tok["model"]["vocab"]
                                                for t in tok["added_tokens"])
        gemma = arch.startswith("Gemma3")
        bos, eos_token = ("<bos>", "<end_of_turn>") if gemma else (None, "<|im_end|>")
        eos = ids[eos_token]
        files = {"tokenizer_config.json": {
            "bos_token": bos, "eos_token": eos_token, "pad_token": "<|endoftext|>",
            "unk_token": None, "add_bos_token": False, "chat_template": TEMPLATES[arch],
            "model_max_length": TEXT["max_position_embeddings"],
            "tokenizer_class": "PreTrainedTokenizerFast"}}
    config = _config(arch, ids, vocab)
    torch.manual_seed(seed)
    model = getattr(transformers, arch)(config).to(torch.float32).eval()
    scale_up_weights(model)
    model.save_pretrained(folder, safe_serialization=True)
    files.update(_processor_files(arch))
    files["generation_config.json"] = {"eos_token_id": [eos]}
    for name, content in files.items():
        with open(os.path.join(folder, name), "w") as f:
            json.dump(content, f, indent=2)
    return folder


def random_image(width: int, height: int, seed: int = 0):
    """A noisy RGB Pillow image (smooth gradients plus noise, so every filter tap matters)."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width]
    base = np.stack([x * 255 / max(width - 1, 1), y * 255 / max(height - 1, 1),
                     (x + y) * 127 / max(width + height - 2, 1)], axis=-1)
    pixels = np.clip(base + rng.normal(0, 40, base.shape), 0, 255).astype(np.uint8)
    return Image.fromarray(pixels, "RGB")
