"""The vision-language models against transformers on tiny random checkpoints, through our loader,
processors and the engine's runner (encoder cache, embedding merge, M-RoPE positions): logits for
text with two images on whole prefill, on a chunked prefill that cuts an image's tokens, and on a
prefix-cache hit that ends inside an image; a different image changes the logits; and through the
scheduler, the same text with another image shares no KV blocks."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from minserve.config import EngineConfig
from minserve.engine.engine import Engine
from minserve.engine.request import EngineRequest
from minserve.sampling_params import SamplingParams
from tests.tiny_vlm import ARCHS, make_tiny_vlm, random_image
from tests.vlm_steps import BLOCK, block_ids, generate, run_chunk, vlm_request

ATOL = 2e-4


@pytest.fixture(scope="module", params=ARCHS, ids=["llava", "qwen2vl", "qwen25vl", "idefics3"])
def setup(request, tmp_path_factory):
    import transformers

    arch = request.param
    folder = make_tiny_vlm(str(tmp_path_factory.mktemp(arch[:8])), arch)
    engine = Engine(EngineConfig(model=folder, kv_cache_memory=8 << 20, max_num_seqs=4,
                                 max_num_batched_tokens=512, max_model_len=512))
    hf = transformers.AutoModelForImageTextToText.from_pretrained(
        folder, dtype=torch.float32, attn_implementation="eager").eval()
    return arch, engine, hf


@torch.inference_mode()
def _hf_logits(arch: str, hf, req: EngineRequest) -> torch.Tensor:
    ids = torch.tensor([req.prompt_token_ids])
    pv = [torch.from_numpy(item.data["pixel_values"]) for item in req.mm_items]
    if arch.startswith("Llava"):
        out = hf(input_ids=ids, pixel_values=torch.stack(pv))
    elif arch.startswith("Qwen"):
        grids = torch.tensor(np.concatenate([i.data["image_grid_thw"] for i in req.mm_items]))
        out = hf(input_ids=ids, pixel_values=torch.cat(pv), image_grid_thw=grids,
                 mm_token_type_ids=(ids == hf.config.image_token_id).int())
    else:
        out = hf(input_ids=ids, pixel_values=torch.cat(pv)[None])
    return out.logits[0].float()


def test_whole_and_chunked_prefill_match_transformers(setup):
    arch, engine, hf = setup
    images = [random_image(70, 50, 1), random_image(120, 100, 2)]
    req = vlm_request(engine, images)
    ref = _hf_logits(arch, hf, req)
    n = len(req.prompt_token_ids)
    cache = engine.runner.encoder_cache
    cache.entries.clear()
    cache.num_rows = cache.num_encoded = 0
    whole = run_chunk(engine, req, 0, n, block_ids(n))
    torch.testing.assert_close(whole, ref, atol=ATOL, rtol=0)
    assert cache.num_encoded == 2
    # Chunks cut inside each image's tokens; the encoder does not run again.
    first, second = req.mm_items
    cuts = [0, first.offset + first.length // 2, second.offset + 3, n]
    table = block_ids(n, first=10)
    chunks = [run_chunk(engine, req, a, b, table)
              for a, b in zip(cuts[:-1], cuts[1:], strict=True)]
    torch.testing.assert_close(torch.cat(chunks), ref, atol=ATOL, rtol=0)
    assert cache.num_encoded == 2
    # A prefix hit that ends inside the second image: the rest runs on the shared blocks with
    # the image encoded afresh (its cache entry evicted), and again from the cache.
    hit = (second.offset + second.length - 1) // BLOCK * BLOCK
    assert 0 < hit < n
    shared = table[:hit // BLOCK] + block_ids(n - hit, first=30)
    cache.entries.clear()
    cache.num_rows = 0
    rest = run_chunk(engine, req, hit, n, shared)
    torch.testing.assert_close(rest, ref[hit:], atol=ATOL, rtol=0)
    assert cache.num_encoded == 2 + sum(i.offset + i.length > hit for i in req.mm_items)


def test_other_image_changes_logits(setup):
    arch, engine, hf = setup
    a = vlm_request(engine, [random_image(64, 64, 3)])
    b = vlm_request(engine, [random_image(64, 64, 4)])
    assert len(a.prompt_token_ids) == len(b.prompt_token_ids)
    n = len(a.prompt_token_ids)
    la = run_chunk(engine, a, 0, n, block_ids(n))
    lb = run_chunk(engine, b, 0, n, block_ids(n, 40))
    assert (la[-1] - lb[-1]).abs().max() > 1e-3
    torch.testing.assert_close(lb, _hf_logits(arch, hf, b), atol=ATOL, rtol=0)


def test_prefix_cache_keys_on_the_image(setup):
    arch, engine, hf = setup
    same = random_image(64, 64, 5)
    first = generate(engine, vlm_request(engine, [same], "a long enough text " * 4), "p1")
    hits = engine.kv_cache.prefix_cache_hits
    other = generate(engine, vlm_request(engine, [random_image(64, 64, 6)],
                                      "a long enough text " * 4), "p2")
    assert engine.kv_cache.prefix_cache_hits == hits        # another image: no block shared
    again = generate(engine, vlm_request(engine, [same], "a long enough text " * 4), "p3")
    assert engine.kv_cache.prefix_cache_hits > hits          # the same image: blocks shared
    assert again == first and len(other) == 3
    # greedy tokens equal transformers' argmax on the first step
    ref = _hf_logits(arch, hf, vlm_request(engine, [same], "a long enough text " * 4))
    assert first[0] == int(ref[-1].argmax())


def test_llm_generate_and_chat_with_images(setup, tmp_path):
    import base64
    import io

    from minserve.llm import LLM

    arch, engine, hf = setup
    if not arch.startswith("Llava"):
        pytest.skip("one architecture is enough for the offline API")
    llm = LLM.__new__(LLM)
    llm.engine, llm.embedder = engine, None
    llm._ids = iter(range(10**6))
    image = random_image(60, 40, 7)
    params = SamplingParams(max_tokens=4, temperature=0.0)
    prompt = "USER: <image>\ndescribe these\nASSISTANT:"
    by_generate = llm.generate({"prompt": prompt, "multi_modal_data": {"image": image}}, params)
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    url = "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()
    by_chat = llm.chat([{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": url}},
        {"type": "text", "text": "describe these"}]}], params)
    assert by_chat[0].outputs[0].token_ids == by_generate[0].outputs[0].token_ids
    assert by_chat[0].prompt_token_ids == by_generate[0].prompt_token_ids
    assert len(by_generate[0].prompt_token_ids) > 16
    with pytest.raises(ValueError, match="0 image placeholder"):
        llm.generate({"prompt": "describe", "multi_modal_data": {"image": image}}, params)
    with pytest.raises(ValueError, match="At most 1 image"):   # LLaVA-1.5's default limit
        llm.generate({"prompt": prompt, "multi_modal_data": {"image": [image, image]}}, params)
    with pytest.raises(ValueError, match="images only"):
        llm.generate({"prompt": prompt, "multi_modal_data": {"video": image}}, params)
    with pytest.raises(ValueError, match="PIL"):
        llm.generate({"prompt": prompt, "multi_modal_data": {"image": "not an image"}}, params)


def test_profile_run_encodes_the_largest_image_batch(setup, monkeypatch):
    import dataclasses

    from PIL import Image

    from minserve.engine.builder import profile_images

    arch, engine, hf = setup
    runner, proc = engine.runner, engine.info.image_processor
    images = profile_images(proc, dataclasses.replace(engine.config, kv_cache_memory=None),
                             torch.device("cuda"))   # the device only sizes the batch
    largest = proc.process(Image.new("RGB", proc.largest_image_size()))
    # the images per prompt default to the model's registry row (1 for LLaVA-1.5, else 8)
    assert engine.config.image_limit == (1 if arch.startswith("Llava") else 8)
    assert len(images) == min(engine.config.image_limit * 4, 512 // largest.num_embeds + 1)
    batches = []
    real = runner.model.encode_images
    monkeypatch.setattr(runner.model, "encode_images",
                        lambda xs: batches.append(len(xs)) or real(xs))
    runner.profile_images = images
    try:
        runner._kv_cache(1)
        runner.dummy_run(64, 2)
    finally:
        runner.profile_images = []
        runner._kv_cache(runner.num_blocks)
    assert batches == [len(images)]
