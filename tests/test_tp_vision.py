"""Vision-language models under tensor parallelism (CPU, gloo, two processes): the language
model is sharded, the vision encoder runs on rank 0, which broadcasts the image-merged
embeddings (and Qwen2-VL's M-RoPE positions) each step. LLM(tensor_parallel_size=2) gives one
process's greedy tokens for prompts with images, through chunked prefills that cut an image."""
from __future__ import annotations

import os

import pytest

from minserve import LLM, SamplingParams
from tests.serving import children
from tests.tiny_vlm import make_tiny_vlm, random_image

ARGS = dict(kv_cache_memory=8 << 20, max_num_seqs=4, max_num_batched_tokens=24,
            max_model_len=512)


@pytest.mark.parametrize("arch", ["LlavaForConditionalGeneration",
                                  "Qwen2VLForConditionalGeneration",
                                  "Qwen3VLForConditionalGeneration",
                                  "Mistral3ForConditionalGeneration",
                                  "Gemma3ForConditionalGeneration"],
                         ids=["llava", "qwen2vl", "qwen3vl", "mistral3", "gemma3"])
def test_images_at_tp2_give_one_process_tokens(arch, tmp_path):
    folder = make_tiny_vlm(str(tmp_path / arch[:8]), arch)
    convs = [[{"role": "user", "content": [
                {"type": "image_pil", "image_pil": random_image(40 + 8 * i, 36, seed=i)},
                {"type": "text", "text": f"describe picture {i}"}]}] for i in range(2)]
    convs.append([{"role": "user", "content": "no picture here"}])
    sp = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True)
    want = [o.outputs[0].token_ids for o in LLM(folder, **ARGS).chat(convs, sp, use_tqdm=False)]
    two = LLM(folder, tensor_parallel_size=2, **ARGS)
    try:
        got = [o.outputs[0].token_ids for o in two.chat(convs, sp, use_tqdm=False)]
        worker = two.engine.workers._procs[0]
    finally:
        two.engine.shutdown()
    assert got == want
    assert worker.exitcode == 0 and worker.pid not in children(os.getpid())
