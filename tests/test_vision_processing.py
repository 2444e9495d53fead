"""Our image preprocessing (numpy + Pillow) against transformers' PIL image processors and
processors on the tiny models' configs: pixel values, the expanded prompt tokens (so placeholder
counts are exact) and Qwen2-VL's M-RoPE positions, over sizes and aspect ratios."""
from __future__ import annotations

import json
import os
import types

import numpy as np
import pytest

from minserve.models.registry import lookup
from minserve.multimodal.image import MediaError
from minserve.multimodal.inputs import expand_prompt
from minserve.tokenizer import Tokenizer
from tests.tiny_vlm import make_tiny_vlm, random_image

SIZES = [(56, 56), (100, 37), (37, 100), (640, 480), (480, 640), (20, 20), (1000, 150),
         (150, 1000), (33, 77), (257, 255)]
TEXT = {"LlavaForConditionalGeneration": "USER: <image>\nwhat is it?",
        "Qwen2VLForConditionalGeneration":
            "<|im_start|>user\n<|vision_start|><|image_pad|><|vision_end|>what is it?",
        "Qwen3VLForConditionalGeneration":
            "<|im_start|>user\n<|vision_start|><|image_pad|><|vision_end|>what is it?",
        "Idefics3ForConditionalGeneration": "User:<image>what is it?",
        "Mistral3ForConditionalGeneration": "[INST][IMG]what is it?[/INST]",
        "Gemma3ForConditionalGeneration": "<bos><start_of_turn>user: <start_of_image>what?"}


@pytest.fixture(scope="module", params=list(TEXT))
def setup(request, tmp_path_factory):
    arch = request.param
    folder = make_tiny_vlm(str(tmp_path_factory.mktemp(arch[:8])), arch)
    with open(os.path.join(folder, "config.json")) as f:
        hf_config = json.load(f)
    tokenizer = Tokenizer.from_folder(folder)
    ours = lookup(arch).processor_class()(folder, hf_config, tokenizer)
    return arch, folder, hf_config, tokenizer, ours


def _hf_tokenizer(folder: str):
    from transformers import PreTrainedTokenizerFast

    if os.path.isfile(os.path.join(folder, "tekken.json")):
        from transformers.integrations.mistral.tokenizer import MistralConverter

        return PreTrainedTokenizerFast(
            tokenizer_object=MistralConverter(os.path.join(folder, "tekken.json")).converted())
    return PreTrainedTokenizerFast(tokenizer_file=os.path.join(folder, "tokenizer.json"))


def _pp(folder: str) -> dict:
    with open(os.path.join(folder, "preprocessor_config.json")) as f:
        return {k: v for k, v in json.load(f).items() if k != "image_processor_type"}


def _hf_reference(arch: str, folder: str, hf_config: dict, text: str, image):
    """(input_ids, pixel_values, extra) from transformers for one image."""
    if arch == "LlavaForConditionalGeneration":
        from transformers import LlavaProcessor
        from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

        with open(os.path.join(folder, "processor_config.json")) as f:
            proc_cfg = json.load(f)
        proc = LlavaProcessor(image_processor=CLIPImageProcessorPil(**_pp(folder)),
                              tokenizer=_hf_tokenizer(folder), **proc_cfg)
        out = proc(images=[image], text=[text])
        return out["input_ids"][0], np.asarray(out["pixel_values"][0]), None
    if arch.startswith("Qwen"):
        # Qwen2VLProcessor wants a video processor (torchvision): expand as it does instead.
        from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import (
            Qwen2VLImageProcessorPil,
        )

        out = Qwen2VLImageProcessorPil(**_pp(folder))(images=[image])
        grid = np.asarray(out["image_grid_thw"])
        n = int(grid.prod()) // 4
        text = text.replace("<|image_pad|>", "<|image_pad|>" * n)
        ids = _hf_tokenizer(folder)(text)["input_ids"]
        return ids, np.asarray(out["pixel_values"]), grid
    if arch.startswith("Gemma3"):
        from transformers import Gemma3Processor
        from transformers.models.gemma3.image_processing_pil_gemma3 import (
            Gemma3ImageProcessorPil,
        )

        tok = _hf_tokenizer(folder)
        tok.boi_token, tok.eoi_token, tok.image_token = ("<start_of_image>", "<end_of_image>",
                                                         "<image_soft_token>")
        tok.boi_token_id, tok.image_token_id = (tok.convert_tokens_to_ids(t) for t in (
            "<start_of_image>", "<image_soft_token>"))
        pp = {k: v for k, v in _pp(folder).items() if v is not None}
        proc = Gemma3Processor(image_processor=Gemma3ImageProcessorPil(**pp), tokenizer=tok,
                               image_seq_length=16)
        out = proc(images=[image], text=[text])
        return out["input_ids"][0], np.asarray(out["pixel_values"][0]), None
    if arch.startswith("Mistral3"):
        # PixtralProcessor wants torchvision: resize as its image processor does (patch *
        # spatial merge) and expand as it does
        from transformers.models.pixtral.image_processing_pil_pixtral import (
            PixtralImageProcessorPil,
        )

        pp = {**_pp(folder), "patch_size": {"height": 8, "width": 8}}
        out = PixtralImageProcessorPil(**pp)(images=[image])
        h, w = (int(x) // 8 for x in out["image_sizes"][0])
        expanded = (("[IMG]" * w + "[IMG_BREAK]") * h)[:-len("[IMG_BREAK]")] + "[IMG_END]"
        ids = _hf_tokenizer(folder)(text.replace("[IMG]", expanded))["input_ids"]
        return ids, np.asarray(out["pixel_values"][0]), None
    from transformers import Idefics3Processor
    from transformers.models.idefics3.image_processing_pil_idefics3 import (
        Idefics3ImageProcessorPil,
    )

    proc = Idefics3Processor(image_processor=Idefics3ImageProcessorPil(**_pp(folder)),
                             tokenizer=_hf_tokenizer(folder), image_seq_len=4)
    out = proc(images=[[image]], text=[text])
    return out["input_ids"][0], np.asarray(out["pixel_values"][0]), None


@pytest.mark.parametrize("size", SIZES, ids=[f"{w}x{h}" for w, h in SIZES])
def test_matches_transformers(setup, size):
    arch, folder, hf_config, tokenizer, ours = setup
    image = random_image(*size, seed=size[0] * 7 + size[1])
    text = TEXT[arch]
    ref_ids, ref_pixels, ref_grid = _hf_reference(arch, folder, hf_config, text, image)
    prompt = expand_prompt(tokenizer.encode(text, add_special_tokens=False), [image], ours)
    assert prompt.prompt_token_ids == list(ref_ids)
    (placed,) = prompt.items
    # the prompt's length is checked from the size alone, before decoding (issue 36)
    assert ours.num_image_tokens(*size) == placed.length
    assert placed.num_embeds == sum(t == ours.image_token_id for t in ref_ids)
    pixels = placed.data["pixel_values"]
    assert pixels.dtype == np.float32 and pixels.shape == ref_pixels.shape
    np.testing.assert_allclose(pixels, ref_pixels, atol=1e-5, rtol=0)
    if ref_grid is not None:
        np.testing.assert_array_equal(placed.data["image_grid_thw"], ref_grid)
        _check_mrope(hf_config, prompt, ours)


def _check_mrope(hf_config: dict, prompt, ours) -> None:
    """Our positions against transformers' Qwen2VLModel.get_rope_index."""
    import torch
    from transformers import Qwen2VLConfig
    from transformers.models.qwen2_vl.modeling_qwen2_vl import Qwen2VLModel

    model = Qwen2VLModel
    if hf_config["architectures"][0].startswith("Qwen3"):
        from transformers import Qwen3VLConfig
        from transformers.models.qwen3_vl.modeling_qwen3_vl import Qwen3VLModel

        model, config = Qwen3VLModel, Qwen3VLConfig(**hf_config)
    else:
        config = Qwen2VLConfig(**hf_config)
    ns = types.SimpleNamespace(config=config)
    ns.get_vision_position_ids = lambda *a, **k: model.get_vision_position_ids(ns, *a, **k)
    ids = torch.tensor([prompt.prompt_token_ids])
    types_ = (ids == ours.image_token_id).int()
    grids = torch.tensor(np.concatenate([p.data["image_grid_thw"] for p in prompt.items]))
    ref, delta = model.get_rope_index(ns, ids, types_, image_grid_thw=grids)
    np.testing.assert_array_equal(prompt.mrope_positions, ref[:, 0].numpy())
    assert prompt.mrope_position_delta == int(delta)


def test_two_images_and_placeholder_count(setup):
    arch, folder, hf_config, tokenizer, ours = setup
    one = TEXT[arch]
    text = one + " and " + one.split(":", 1)[-1] if arch.startswith("Idefics") else one + one
    ids = tokenizer.encode(text, add_special_tokens=False)
    images = [random_image(90, 60, 1), random_image(40, 70, 2)]
    prompt = expand_prompt(ids, images, ours)
    a, b = prompt.items
    assert a.offset + a.length <= b.offset
    for p in prompt.items:
        span = prompt.prompt_token_ids[p.offset:p.offset + p.length]
        assert sum(t == ours.image_token_id for t in span) == p.num_embeds
    assert a.content_hash != b.content_hash
    with pytest.raises(MediaError, match="2 image placeholder"):
        expand_prompt(ids, images[:1], ours)
    if ours.uses_mrope:
        _check_mrope(hf_config, prompt, ours)


def test_qwen_refuses_extreme_aspect_ratio(tmp_path):
    arch = "Qwen2VLForConditionalGeneration"
    folder = make_tiny_vlm(str(tmp_path), arch)
    with open(os.path.join(folder, "config.json")) as f:
        proc = lookup(arch).processor_class()(folder, json.load(f), Tokenizer.from_folder(folder))
    with pytest.raises(MediaError, match="aspect ratio"):
        proc.process(random_image(3000, 10))


def test_image_path_stays_torch_free():
    """The server runs fetching, decoding and preprocessing: none of it may import torch."""
    import subprocess
    import sys

    code = ("import sys, minserve.server, minserve.multimodal.inputs, minserve.multimodal.fetch, "
            "minserve.models.registry, minserve.models.vision.llava_processor, "
            "minserve.models.vision.qwen2_vl_processor, minserve.models.vision.idefics3_processor"
            "; assert 'torch' not in sys.modules, 'torch imported'")
    subprocess.run([sys.executable, "-c", code], check=True)
