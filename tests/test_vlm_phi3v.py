"""Phi-3.5-vision (Phi3VForCausalLM) against the hub's remote code, through the committed reference
(tests/data/phi3v_tiny.json, made outside the repo; tests/tiny_phi3v.py writes the same model):
our chat rendering and processor give the reference's prompt ids (HD crops 1x1, 2x1 and 1x2), the
engine its last-prompt logits on a whole prefill and on chunks that cut the images, and its
greedy tokens through the scheduler's chunks, for one prompt with two images and for two
different images; LLM under tensor parallel 2 gives them too; the server answers
--limit-mm-per-prompt, video parts and misnumbered image tags with 400s."""
from __future__ import annotations

import pytest
import torch

from minserve import LLM, SamplingParams
from minserve.config import EngineConfig
from minserve.engine.engine import Engine
from minserve.server import ServerConfig, create_app
from tests.tiny_phi3v import load_data, make_tiny_phi3v
from tests.tiny_vlm import random_image
from tests.vlm_steps import block_ids, check_image_limit, generate, run_chunk, vlm_request

CASES = load_data()["cases"]
ARGS = dict(kv_cache_memory=16 << 20, max_num_seqs=4, max_model_len=1024)


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return make_tiny_phi3v(str(tmp_path_factory.mktemp("phi3v")))


@pytest.fixture(scope="module")
def engine(folder):
    # prompts run in 64-token chunks through the scheduler (generate below)
    return Engine(EngineConfig(model=folder, max_num_batched_tokens=1024,
                               long_prefill_token_threshold=64, **ARGS))


def _request(engine, case):
    req = vlm_request(engine, [random_image(*im) for im in case["images"]], case["text"])
    image = engine.info.image_processor.image_token_id
    # the reference marks image k's tokens with -k
    assert req.prompt_token_ids == [i if i >= 0 else image for i in case["input_ids"]]
    return req


@pytest.mark.parametrize("index", range(len(CASES)))
def test_reference_prompt_logits_and_greedy_tokens(engine, index):
    case = CASES[index]
    req = _request(engine, case)
    n = len(req.prompt_token_ids)
    ref = torch.tensor(case["last_logits"])
    whole = run_chunk(engine, req, 0, n, block_ids(n))[-1]
    torch.testing.assert_close(whole, ref, atol=1e-4, rtol=0)
    first = req.mm_items[0]
    cuts = [0, first.offset + 100, first.offset + first.length - 5, n]
    table = block_ids(n, first=80)
    chunks = [run_chunk(engine, req, a, b, table) for a, b in zip(cuts[:-1], cuts[1:])]
    torch.testing.assert_close(chunks[-1][-1], ref, atol=1e-4, rtol=0)
    assert generate(engine, req, f"g{index}", len(case["greedy"])) == case["greedy"]


def test_two_images_give_different_outputs():
    one, two = CASES[1], CASES[2]
    assert one["text"] == two["text"] and one["images"] != two["images"]
    assert one["greedy"] != two["greedy"]


def test_tensor_parallel_2_gives_the_reference_tokens(folder):
    case = CASES[0]
    sp = SamplingParams(temperature=0, max_tokens=len(case["greedy"]), ignore_eos=True)
    prompt = {"prompt": case["prompt"],
              "multi_modal_data": {"image": [random_image(*im) for im in case["images"]]}}
    two = LLM(folder, tensor_parallel_size=2, max_num_batched_tokens=256, **ARGS)
    try:
        got = two.generate([prompt], sp, use_tqdm=False)[0].outputs[0].token_ids
    finally:
        two.engine.shutdown()
    assert list(got) == case["greedy"]


def test_limit_video_and_tag_errors_are_400s(folder):
    app = create_app(EngineConfig(model=folder, limit_mm_per_prompt={"image": 1}, **ARGS),
                     ServerConfig(served_model_names=["tiny"]))
    (tags,) = check_image_limit(app, ("/v1/completions", {"model": "tiny", "max_tokens": 2,
                                                          "prompt": "<|image_2|> hi"}))
    assert tags.status == 400 and "<|image_1|>" in tags.json()["error"]["message"]


def test_images_are_numbered_across_the_conversation():
    from minserve.chat import ImageParts, normalize_messages

    image = {"type": "image_url", "image_url": {"url": "data:image/png;base64,AAAA"}}
    messages = [{"role": "user", "content": [image, image, {"type": "text", "text": "a"}]},
                {"role": "assistant", "content": "b"},
                {"role": "user", "content": [{"type": "text", "text": "c"}, image]}]
    out = normalize_messages(messages, "string", ImageParts("<|image_{n}|>"))
    assert [m["content"] for m in out] == ["<|image_1|>\n<|image_2|>\na", "b", "<|image_3|>\nc"]


def test_an_unsupported_layout_is_a_start_up_error():
    from minserve.config import ConfigError
    from minserve.models.vision.phi3v import vision_settings

    config = load_data()["config"]
    assert vision_settings(config)[1] == -2
    for key, value in (("hd_transform_order", "glb_sub"), ("use_hd_transform", False)):
        with pytest.raises(ConfigError, match="Phi-3-vision layout is not supported"):
            vision_settings({**config, "embd_layer": {**config["embd_layer"], key: value}})


def test_hd_transform_sizes_match_the_reference(engine):
    from PIL import Image

    from minserve.models.vision.phi3v_processor import hd_size

    rows = load_data()["hd_sizes"]
    assert [list(hd_size(w, h, n, 336)[2:]) for w, h, n, _, _ in rows] == [r[3:] for r in rows]
    proc = engine.info.image_processor          # num_crops 2
    for w, h, _, pw, ph in (r for r in rows if r[2] == proc.num_crops):
        out = proc.process(Image.new("RGB", (w, h)))      # sizes only: a blank image
        crops = (ph // 336) * (pw // 336)
        assert out.data["crop_grid"].tolist() == [ph // 336, pw // 336]
        assert out.data["pixel_values"].shape == (1 + crops, 3, 336, 336)
        assert len(out.token_ids) == (crops + 1) * 144 + 1 + (ph // 336 + 1) * 12
        assert proc.num_image_tokens(w, h) == len(out.token_ids)
