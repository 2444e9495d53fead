"""Helpers for the vision-language model tests: a chat prompt with images made into the
EngineRequest the server would make, prompt positions run as one step of the engine's runner
(on top of what earlier steps cached), and greedy generation through the whole engine."""
from __future__ import annotations

import torch

from minserve.chat import ImageParts
from minserve.engine.engine import Engine
from minserve.engine.request import EngineRequest
from minserve.engine.runner import StepInputs
from minserve.multimodal.inputs import expand_prompt
from minserve.sampling_params import SamplingParams

BLOCK = 16


def vlm_request(engine: Engine, images: list, text: str = "describe these") -> EngineRequest:
    """One user turn (the images, then the text) through the chat template and the processor."""
    proc = engine.info.image_processor
    content = [{"type": "image_pil", "image_pil": im} for im in images]
    content.append({"type": "text", "text": text})
    rendered = engine.info.tokenizer.apply_chat_template([{"role": "user", "content": content}],
                                                         images=ImageParts(proc.placeholder))
    own = proc.encode_text(rendered)     # Phi-3-vision tokenizes around its image tags
    ids = own if own is not None else engine.info.tokenizer.encode(rendered,
                                                                   add_special_tokens=False)
    mm = expand_prompt(ids, images, proc)
    # the prompt's length is checked from the images' sizes before any is decoded (issue 36)
    assert [proc.num_image_tokens(*im.size) for im in images] == [i.length for i in mm.items]
    return EngineRequest("r", mm.prompt_token_ids, SamplingParams(max_tokens=4), mm_items=mm.items,
                         mrope_positions=mm.mrope_positions,
                         mrope_position_delta=mm.mrope_position_delta)


@torch.inference_mode()
def run_chunk(engine: Engine, req: EngineRequest, start: int, end: int, block_ids: list[int]
              ) -> torch.Tensor:
    """Logits of prompt positions [start, end) run as one step on top of the cached [0, start)."""
    runner = engine.runner
    ids = req.prompt_token_ids
    mm = [(0, item) for item in req.mm_items
          if item.offset < end and start < item.offset + item.length]
    step = StepInputs(ids[start:end], [end - start], [start], [block_ids], [], None,
                      mm_inputs=mm,
                      mrope=[(req.mrope_positions, req.mrope_position_delta)]
                      if runner.uses_mrope else None)
    inputs = runner.prepare_inputs(step)
    if step.mm_inputs:
        runner.place_images(step, inputs)
    return runner.model.compute_logits(runner.run_model(inputs))


def block_ids(num_tokens: int, first: int = 0) -> list[int]:
    return list(range(first, first + -(-num_tokens // BLOCK)))


def generate(engine: Engine, req: EngineRequest, request_id: str, max_tokens: int = 3
             ) -> list[int]:
    """Greedy tokens for req through the engine's scheduler and runner."""
    req.request_id = request_id
    req.sampling = SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True)
    engine.add_request(req)
    tokens = []
    while engine.has_unfinished_requests():
        for out in engine.step():
            tokens += out.new_token_ids
    return tokens


def hf_inputs(arch: str, hf, req: EngineRequest) -> dict:
    """transformers' model inputs for req (our processor's pixels: test_vision_processing.py
    checks them against transformers' processors)."""
    import numpy as np

    ids = torch.tensor([req.prompt_token_ids])
    pv = [torch.from_numpy(item.data["pixel_values"]) for item in req.mm_items]
    if arch.startswith("Qwen"):
        grids = torch.tensor(np.concatenate([i.data["image_grid_thw"] for i in req.mm_items]))
        return {"input_ids": ids, "pixel_values": torch.cat(pv), "image_grid_thw": grids,
                "mm_token_type_ids": (ids == hf.config.image_token_id).int()}
    if arch.startswith("Gemma3"):     # token types mark the image tokens (both-ways attention)
        return {"input_ids": ids, "pixel_values": torch.stack(pv),
                "token_type_ids": (ids == hf.config.image_token_id).long()}
    if arch.startswith("Mistral3"):    # one batch, each image at the top left of its own
        sizes = torch.tensor([list(x.shape[1:]) for x in pv])
        batch = torch.zeros(len(pv), 3, *sizes.max(0).values.tolist())
        for x, out in zip(pv, batch):
            out[:, :x.shape[1], :x.shape[2]] = x
        return {"input_ids": ids, "pixel_values": batch, "image_sizes": sizes}
    raise ValueError(arch)


@torch.inference_mode()
def hf_greedy(arch: str, hf, req: EngineRequest, max_tokens: int) -> list[int]:
    """transformers' greedy continuation of req."""
    inputs = hf_inputs(arch, hf, req)
    out = hf.generate(**inputs, max_new_tokens=max_tokens, do_sample=False, min_new_tokens=0,
                      eos_token_id=None, pad_token_id=0)
    return out[0, inputs["input_ids"].shape[1]:].tolist()


def check_image_limit(app, *more: tuple[str, dict]) -> list:
    """Through the server, whose --limit-mm-per-prompt is 1 image: a chat turn with one image is
    answered, one with two and one with a video part get their 400s (checked here); then each
    (path, body) of `more` is posted, and its responses returned."""
    import asyncio

    from tests.asgi import call, lifespan

    url = {"url": "data:image/png;base64,iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAIAAACQd1PeAAAADElEQV"
                  "R4nGP4z8AAAAMBAQDJ/pLvAAAAAElFTkSuQmCC"}

    def chat(*parts: dict) -> tuple[str, dict]:
        return "/v1/chat/completions", {"model": "tiny", "max_tokens": 2, "messages": [
            {"role": "user", "content": [{"type": "text", "text": "look"}, *parts]}]}

    calls = [chat({"type": "image_url", "image_url": url}),
             chat(*[{"type": "image_url", "image_url": url}] * 2),
             chat({"type": "video_url", "video_url": {"url": "x.mp4"}}), *more]

    async def main():
        async with lifespan(app):
            return [await call(app, "POST", path, body) for path, body in calls]

    one, two, video, *rest = asyncio.run(main())
    assert one.status == 200, one.body
    assert two.status == 400 and "At most 1 image" in two.json()["error"]["message"]
    assert video.status == 400
    err = video.json()["error"]
    assert err["param"] == "messages[0].content[1]" and "video_url" in err["message"]
    return rest
