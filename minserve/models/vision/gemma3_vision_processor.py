"""Gemma 3 image preprocessing (pan-and-scan off, transformers' default): the image resized to the
tower's size (896x896, bilinear), rescaled and normalized (mean/std 0.5). The placeholder
<start_of_image> becomes transformers' full image sequence: "\\n\\n", <start_of_image>,
mm_tokens_per_image <image_soft_token>s, <end_of_image>, "\\n\\n"."""
from __future__ import annotations

from typing import Any

from PIL import Image

from minserve.config import read_json
from minserve.models.vision.processor import (
    STANDARD_MEAN,
    STANDARD_STD,
    ImageProcessor,
    ProcessedImage,
    resample_filter,
    resize,
    to_chw,
)


class Gemma3ImageProcessor(ImageProcessor):
    def __init__(self, folder: str, hf_config: dict[str, Any], tokenizer: Any) -> None:
        pp = read_json(folder, "preprocessor_config.json")
        if pp.get("do_pan_and_scan"):
            from minserve.config import ConfigError

            raise ConfigError("Gemma 3 pan-and-scan (preprocessor_config do_pan_and_scan) is "
                              "not supported; set it to false")
        side = int(hf_config.get("vision_config", {}).get("image_size", 896))
        size = pp.get("size") or {}
        self.size = (int(size.get("height", side)), int(size.get("width", side)))
        self.read_normalization(pp, STANDARD_MEAN, STANDARD_STD)
        self.resample = resample_filter(pp.get("resample"), 2)
        self.placeholder_token_id = int(hf_config.get("boi_token_index", 255_999))
        self.image_token_id = int(hf_config.get("image_token_index", 262_144))
        end_id = int(hf_config.get("eoi_token_index", 256_000))
        self.placeholder = tokenizer.backend.id_to_token(self.placeholder_token_id) \
            or "<start_of_image>"
        num = int(hf_config.get("mm_tokens_per_image", 256))
        newlines = tokenizer.encode("\n\n", add_special_tokens=False)
        self.token_ids = (newlines + [self.placeholder_token_id] + [self.image_token_id] * num
                          + [end_id] + newlines)
        self.num_embeds = num

    def process(self, image: Image.Image) -> ProcessedImage:
        arr = resize(to_chw(image), *self.size, self.resample)
        return ProcessedImage({"pixel_values": self.normalize(arr)}, list(self.token_ids),
                              self.num_embeds)

    def num_image_tokens(self, width: int, height: int) -> int:
        return len(self.token_ids)      # every image is resized to one size

    def largest_image_size(self) -> tuple[int, int]:
        return self.size[1], self.size[0]
