"""The vision-language architectures of issue 31 against transformers on tiny random checkpoints,
through our loader, processors and the engine: prompt logits with two images on a whole prefill,
on chunks that cut the images (and a prefix hit inside one), greedy tokens through the
scheduler's 16-token chunks for two different images (transformers' tokens; the images change
the logits), and through the server, images within
--limit-mm-per-prompt answered, one over it and a video part each a 400."""
from __future__ import annotations

import pytest
import torch

from minserve.config import EngineConfig
from minserve.engine.engine import Engine
from minserve.server import ServerConfig, create_app
from tests.tiny_vlm import make_tiny_vlm, random_image
from tests.vlm_steps import (
    BLOCK,
    block_ids,
    check_image_limit,
    generate,
    hf_greedy,
    hf_inputs,
    run_chunk,
    vlm_request,
)

ATOL = 2e-4
NEW_ARCHS = {"qwen3vl": "Qwen3VLForConditionalGeneration",
             "mistral3": "Mistral3ForConditionalGeneration",
             "gemma3": "Gemma3ForConditionalGeneration"}


@pytest.fixture(scope="module", params=list(NEW_ARCHS))
def setup(request, tmp_path_factory):
    import transformers

    arch = NEW_ARCHS[request.param]
    folder = make_tiny_vlm(str(tmp_path_factory.mktemp(request.param)), arch)
    # the scheduler runs prompts in chunks of 16 tokens (generate() below), while a test may
    # run a whole prompt as one step of the runner (run_chunk)
    engine = Engine(EngineConfig(model=folder, kv_cache_memory=8 << 20, max_num_seqs=4,
                                 max_num_batched_tokens=512, long_prefill_token_threshold=16,
                                 max_model_len=512))
    hf = transformers.AutoModelForImageTextToText.from_pretrained(
        folder, dtype=torch.float32, attn_implementation="eager").eval()
    return arch, folder, engine, hf


@torch.inference_mode()
def _hf_logits(arch: str, hf, req) -> torch.Tensor:
    return hf(**hf_inputs(arch, hf, req)).logits[0].float()


def test_prefill_logits_whole_chunked_and_after_a_hit(setup):
    arch, _, engine, hf = setup
    req = vlm_request(engine, [random_image(70, 50, 1), random_image(120, 100, 2)])
    ref = _hf_logits(arch, hf, req)
    n = len(req.prompt_token_ids)
    window = engine.runner.model_config.sliding_window
    assert window is None or n > 2 * window          # the prompt slides past the window
    torch.testing.assert_close(run_chunk(engine, req, 0, n, block_ids(n)), ref, atol=ATOL,
                               rtol=0)
    first, second = req.mm_items
    cuts = [0, first.offset + first.length // 2, second.offset + 3, n]
    if engine.runner.bidirectional_images:
        # a chunk never ends inside an image's tokens here (the scheduler's rule): cut just
        # before the first image's tokens and just after the second's
        cuts = [0, first.offset + 1, second.offset + second.length - 1, n]
    table = block_ids(n, first=10)
    chunks = [run_chunk(engine, req, a, b, table) for a, b in zip(cuts[:-1], cuts[1:])]
    torch.testing.assert_close(torch.cat(chunks), ref, atol=ATOL, rtol=0)
    hit = (second.offset + second.length - 1) // BLOCK * BLOCK
    assert second.offset < hit < n
    rest = run_chunk(engine, req, hit, n, table[:hit // BLOCK] + block_ids(n - hit, first=30))
    torch.testing.assert_close(rest, ref[hit:], atol=ATOL, rtol=0)


def test_two_images_give_transformers_greedy_tokens_through_chunks(setup):
    arch, _, engine, hf = setup
    last = []
    for seed in (3, 4):
        req = vlm_request(engine, [random_image(64, 96, seed)], "what is in the picture?")
        n = len(req.prompt_token_ids)
        last.append(run_chunk(engine, req, 0, n, block_ids(n, 50))[-1])
        assert generate(engine, req, f"g{seed}", 6) == hf_greedy(arch, hf, req, 6)
    # the image reaches the output (a tiny random model may still pick the same tokens)
    assert (last[0] - last[1]).abs().max() > 1e-3


def test_limit_and_video_parts_are_400s(setup):
    _, folder, _, _ = setup
    app = create_app(EngineConfig(model=folder, kv_cache_memory=8 << 20, max_model_len=512,
                                  limit_mm_per_prompt={"image": 1}),
                     ServerConfig(served_model_names=["tiny"]))
    check_image_limit(app)
