"""What a vision-language model's image preprocessing shares, in numpy + Pillow, computed the way
transformers' PIL ("slow") image processors compute it: Pillow resizes uint8 images with the
checkpoint's filter, then rescale and normalize run in float32 on channel-first arrays. And the
contract every model's processor keeps: one image -> the encoder's input arrays plus the tokens
its one placeholder token becomes. Torch-free (the server runs it in a worker thread); each
family's processor is its *_processor.py, beside its model file."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
from PIL import Image

from minserve.config import ConfigError

# transformers' OPENAI_CLIP / IMAGENET_STANDARD constants
CLIP_MEAN, CLIP_STD = (0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711)
STANDARD_MEAN, STANDARD_STD = (0.5, 0.5, 0.5), (0.5, 0.5, 0.5)
_RESAMPLE = {0: Image.Resampling.NEAREST, 1: Image.Resampling.LANCZOS,
             2: Image.Resampling.BILINEAR, 3: Image.Resampling.BICUBIC,
             4: Image.Resampling.BOX, 5: Image.Resampling.HAMMING}


@dataclass(slots=True)
class ProcessedImage:
    data: dict[str, np.ndarray]     # the encoder's inputs (pixel_values, image_grid_thw, ...)
    token_ids: list[int]            # what the image's placeholder token in the prompt becomes
    num_embeds: int                 # how many of token_ids are image_token_id (get embeddings)


class ImageProcessor:
    """One model's preprocessing. Subclasses set these in __init__ and implement process()."""
    placeholder: str            # what a string-content chat template gets for each image part
    placeholder_token_id: int   # the prompt token that stands for one image before expansion
    image_token_id: int         # the token whose positions receive image embeddings
    uses_mrope = False

    def process(self, image: Image.Image) -> ProcessedImage:
        raise NotImplementedError

    def encode_text(self, text: str) -> list[int] | None:
        """A prompt's token ids, for a model whose processor tokenizes prompts its own way
        (Phi-3-vision: image tags in the text); None: the tokenizer's encode()."""
        return None

    def num_image_tokens(self, width: int, height: int) -> int:
        """len(process(image).token_ids) for an image of this size, without the image: the
        prompt's length is checked before anything is decoded."""
        raise NotImplementedError

    def mrope_positions(self, num_tokens: int, items: list[Any]) -> tuple[np.ndarray, int]:
        """M-RoPE models: ([3, num_tokens] positions, delta) of a prompt holding these items."""
        raise NotImplementedError

    def read_normalization(self, pp: dict[str, Any], mean: Any, std: Any) -> None:
        """preprocessor_config.json's rescale/normalize settings (with the model's defaults)."""
        self.do_rescale = pp.get("do_rescale", True)
        self.do_normalize = pp.get("do_normalize", True)
        self.scale = float(pp.get("rescale_factor", 1 / 255))
        self.mean, self.std = pp.get("image_mean", mean), pp.get("image_std", std)

    def normalize(self, image: np.ndarray) -> np.ndarray:
        return rescale_normalize(image, self.scale, self.mean, self.std, self.do_rescale,
                                 self.do_normalize)

    def largest_image_size(self) -> tuple[int, int]:
        """(width, height) of an input whose embeddings are the largest this model makes (the KV
        profile run encodes such images)."""
        raise NotImplementedError


def resample_filter(code: Any, default: int) -> Image.Resampling:
    code = default if code is None else code
    if code not in _RESAMPLE:
        raise ConfigError(f"preprocessor resample {code!r} is not a Pillow filter number")
    return _RESAMPLE[code]


def token_id(tokenizer: Any, token: str) -> int:
    i = tokenizer.backend.token_to_id(token)
    if i is None:
        raise ConfigError(f"the tokenizer has no {token!r} token, which this model's image "
                          "prompts need")
    return i


def to_chw(image: Image.Image) -> np.ndarray:
    """RGB Pillow image -> uint8 [3, H, W]."""
    return np.asarray(image, dtype=np.uint8).transpose(2, 0, 1)


def resized_chw(image: Image.Image, height: int, width: int, resample: Image.Resampling
                ) -> np.ndarray:
    """resize(to_chw(image), ...), the same pixels, resized by Pillow before the array is made:
    a 49-megapixel image is not copied into numpy at full size first (PERF: memory)."""
    if image.size != (width, height):
        image = image.resize((width, height), resample=resample)
    return to_chw(image)


def resize(image: np.ndarray, height: int, width: int, resample: Image.Resampling
           ) -> np.ndarray:
    """uint8 [C, H, W] -> uint8 [C, height, width] through Pillow (transformers' np_resize)."""
    if image.shape[1:] == (height, width):
        # NOTE: Pillow itself returns a copy when the size does not change, whatever the filter
        return image
    pil = Image.fromarray(image.transpose(1, 2, 0))
    return to_chw(pil.resize((width, height), resample=resample))


def rescale_normalize(image: np.ndarray, scale: float, mean: Any, std: Any,
                      do_rescale: bool = True, do_normalize: bool = True) -> np.ndarray:
    """[C, H, W] -> float32: x * scale (computed in float64, as transformers), then (x - mean) /
    std in float32."""
    out = (image.astype(np.float64) * scale).astype(np.float32) if do_rescale \
        else image.astype(np.float32)
    if do_normalize:
        mean = np.asarray(mean, dtype=np.float32)[:, None, None]
        std = np.asarray(std, dtype=np.float32)[:, None, None]
        out = (out - mean) / std
    return out


def center_crop(image: np.ndarray, height: int, width: int) -> np.ndarray:
    """[C, H, W] center crop, zero-padding an image smaller than the crop (transformers')."""
    _, h, w = image.shape
    top, left = (h - height) // 2, (w - width) // 2
    if top >= 0 and left >= 0 and top + height <= h and left + width <= w:
        return image[:, top:top + height, left:left + width]
    new_h, new_w = max(height, h), max(width, w)
    padded = np.zeros((image.shape[0], new_h, new_w), dtype=image.dtype)
    top_pad, left_pad = -(-(new_h - h) // 2), -(-(new_w - w) // 2)
    padded[:, top_pad:top_pad + h, left_pad:left_pad + w] = image
    top, left = top + top_pad, left + left_pad
    return padded[:, max(0, top):min(new_h, top + height), max(0, left):min(new_w, left + width)]
