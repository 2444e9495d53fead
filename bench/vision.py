"""Images per second through each vision encoder (tower + projector, dummy weights), on the real
checkpoints' vision shapes: LLaVA-1.5-7B's CLIP-L/336, Qwen2-VL-7B's and Qwen2.5-VL-7B's ViTs,
SmolVLM-256M's SigLIP. One image size for all (resized/tiled as each processor would).

    python bench/vision.py --image 640x480 --batch 4 --iters 3 [--device cuda --dtype bfloat16]

--max-layers K builds each tower K layers deep (the time per image grows about linearly with
depth): the full towers take minutes per image on a small CPU.
"""
from __future__ import annotations

import argparse
import math
import statistics
import time

import torch

from minserve.models.loader import init_dummy_weights
from minserve.models.vision.idefics3 import Idefics3Connector
from minserve.models.vision.idefics3_processor import (
    _rescale_to_max_len,
    _scale_below,
    _to_tile_multiple,
)
from minserve.models.vision.llava import LlavaMultiModalProjector
from minserve.models.vision.qwen2_vl_processor import smart_resize
from minserve.models.vision.qwen_vit import QwenVisionTower
from minserve.models.vision.siglip import SiglipVisionTower

CLIP_L_336 = {"hidden_size": 1024, "intermediate_size": 4096, "num_hidden_layers": 24,
              "num_attention_heads": 16, "image_size": 336, "patch_size": 14}
QWEN2_VL_7B = {"depth": 32, "embed_dim": 1280, "hidden_size": 3584, "num_heads": 16,
               "mlp_ratio": 4, "patch_size": 14, "spatial_merge_size": 2,
               "temporal_patch_size": 2}
QWEN2_5_VL_7B = {"depth": 32, "hidden_size": 1280, "out_hidden_size": 3584,
                 "intermediate_size": 3420, "num_heads": 16, "patch_size": 14,
                 "spatial_merge_size": 2, "temporal_patch_size": 2, "window_size": 112,
                 "fullatt_block_indexes": [7, 15, 23, 31], "hidden_act": "silu"}
SMOLVLM_256M = {"hidden_size": 768, "intermediate_size": 3072, "num_hidden_layers": 12,
                "num_attention_heads": 12, "image_size": 512, "patch_size": 16}


MAX_LAYERS = 1 << 30


def _depth(cfg: dict, key: str) -> dict:
    out = {**cfg, key: min(cfg[key], MAX_LAYERS)}
    if "fullatt_block_indexes" in cfg:
        out["fullatt_block_indexes"] = [i for i in cfg["fullatt_block_indexes"] if i < out[key]]
    return out


class Llava(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        from minserve.models.vision.clip import CLIPVisionTower

        self.layer = min(23, MAX_LAYERS)                  # vision_feature_layer -2
        self.tower = CLIPVisionTower(CLIP_L_336, self.layer)
        self.proj = LlavaMultiModalProjector(1024, 4096, "gelu", True)

    def inputs(self, w: int, h: int, b: int) -> tuple:
        return (torch.randn(b, 3, 336, 336),)

    def forward(self, px: torch.Tensor) -> torch.Tensor:
        return self.proj(self.tower(px, [self.layer])[0][:, 1:])


class Qwen(torch.nn.Module):
    def __init__(self, v2_5: bool) -> None:
        super().__init__()
        self.tower = QwenVisionTower(_depth(QWEN2_5_VL_7B if v2_5 else QWEN2_VL_7B, "depth"),
                                     v2_5)

    def inputs(self, w: int, h: int, b: int) -> tuple:
        rh, rw = smart_resize(h, w, 28, 56 * 56, 28 * 28 * 1280)
        grid = (1, rh // 14, rw // 14)
        return torch.randn(b * grid[1] * grid[2], 3 * 2 * 14 * 14), [grid] * b

    def forward(self, px: torch.Tensor, grids: list) -> torch.Tensor:
        return self.tower(px, grids)


class SmolVLM(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.tower = SiglipVisionTower(_depth(SMOLVLM_256M, "num_hidden_layers"))
        self.connector = Idefics3Connector(768, 576, 4)

    def inputs(self, w: int, h: int, b: int) -> tuple:
        rh, rw = _to_tile_multiple(*_scale_below(*_rescale_to_max_len(h, w, 2048), 4096), 512)
        tiles = math.ceil(rh / 512) * math.ceil(rw / 512) + (1 if rh > 512 or rw > 512 else 0)
        return (torch.randn(b * tiles, 3, 512, 512),)

    def forward(self, px: torch.Tensor) -> torch.Tensor:
        return self.connector(self.tower(px))


def bench(name: str, make, args: argparse.Namespace) -> None:
    device, dtype = torch.device(args.device), getattr(torch, args.dtype)
    with torch.device("meta"):
        model = make()
    model = model.to_empty(device=device).to(dtype)
    init_dummy_weights(model)
    w, h = (int(x) for x in args.image.lower().split("x"))
    inputs = [x.to(device, dtype) if isinstance(x, torch.Tensor) else x
              for x in model.inputs(w, h, args.batch)]
    times = []
    with torch.inference_mode():
        for i in range(args.iters + 1):
            if device.type == "cuda":
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            model(*inputs)
            if device.type == "cuda":
                torch.cuda.synchronize()
            if i:                      # the first call warms up
                times.append(time.perf_counter() - t0)
    med = statistics.median(times)
    print(f"{name:<16} batch {args.batch:>3}  {med * 1000:9.1f} ms  "
          f"{args.batch / med:8.2f} images/s")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--image", default="640x480", metavar="WIDTHxHEIGHT")
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--iters", type=int, default=3)
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="float32")
    p.add_argument("--only", default=None, help="llava, qwen2-vl, qwen2.5-vl or smolvlm")
    p.add_argument("--max-layers", type=int, default=None, help="cap each tower's depth")
    args = p.parse_args()
    global MAX_LAYERS
    MAX_LAYERS = args.max_layers or MAX_LAYERS
    torch.manual_seed(0)
    for name, make in (("llava-1.5-7b", Llava), ("qwen2-vl-7b", lambda: Qwen(False)),
                       ("qwen2.5-vl-7b", lambda: Qwen(True)), ("smolvlm-256m", SmolVLM)):
        if args.only is None or name.startswith(args.only):
            bench(name, make, args)


if __name__ == "__main__":
    main()
