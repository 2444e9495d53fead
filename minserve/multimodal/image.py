"""Bytes -> one RGB Pillow image, safely: only the common formats, the pixel count checked from
the header before anything is decoded (decompression bombs), the first frame of an animation,
EXIF orientation applied, transparency composited onto white (as transformers does)."""
from __future__ import annotations

import hashlib
import io

from PIL import Image, UnidentifiedImageError

FORMATS = ("JPEG", "PNG", "WEBP", "GIF", "BMP")
DEFAULT_MAX_IMAGE_PIXELS = 50_000_000   # about 8k x 6k; a bomb's header claims far more
ORIENTATION_TAG = 0x0112                # EXIF: 5-8 turn the image a quarter (width <-> height)
# EXIF orientation -> the turn that shows the image upright (as ImageOps.exif_transpose)
_UPRIGHT = {2: Image.Transpose.FLIP_LEFT_RIGHT, 3: Image.Transpose.ROTATE_180,
            4: Image.Transpose.FLIP_TOP_BOTTOM, 5: Image.Transpose.TRANSPOSE,
            6: Image.Transpose.ROTATE_270, 7: Image.Transpose.TRANSVERSE,
            8: Image.Transpose.ROTATE_90}
_HASH_ROWS_BYTES = 4 << 20              # image_hash reads the pixels in bands of about this


class MediaError(ValueError):
    """A media input that cannot be used; the front doors answer it with a 400 naming `param`
    (the request field, e.g. messages[0].content[1]) when it is known."""

    def __init__(self, message: str, param: str | None = None) -> None:
        super().__init__(message)
        self.param = param


def _open(data: bytes, max_pixels: int) -> Image.Image:
    """The image's header read (size, mode, EXIF), its pixels not decoded yet."""
    try:
        image = Image.open(io.BytesIO(data), formats=FORMATS)
    except UnidentifiedImageError:
        raise MediaError(f"the data is not an image in a supported format "
                         f"({', '.join(FORMATS)})") from None
    except Image.DecompressionBombError as e:
        raise MediaError(f"image is too large: {e}") from None
    _check_size(image, max_pixels)
    return image


def probe_image(data: bytes, max_pixels: int = DEFAULT_MAX_IMAGE_PIXELS) -> tuple[int, int]:
    """(width, height) the decoded image will have (EXIF orientation applied), from its header
    alone: what a request's images will cost is known before any of them is decoded."""
    image = _open(data, max_pixels)
    width, height = image.size
    return (height, width) if _orientation(image) in (5, 6, 7, 8) else (width, height)


def _orientation(image: Image.Image) -> int:
    """The EXIF orientation the header gives. A PNG's eXIf chunk after its pixel data is not
    honoured (browsers ignore it there too): to find it Pillow decodes the whole image, which
    made measuring 30 bomb PNGs cost 30 full decodes (issue 36, finding 1)."""
    if image.format == "PNG" and "exif" not in image.info:
        return 1
    try:
        return image.getexif().get(ORIENTATION_TAG, 1)
    except Exception:  # noqa: BLE001 - a broken EXIF block: the image is shown as stored
        return 1


def decode_image(data: bytes, max_pixels: int = DEFAULT_MAX_IMAGE_PIXELS) -> Image.Image:
    image = _open(data, max_pixels)
    try:
        image.seek(0)      # the first frame of a GIF / animated WebP
        orientation = _orientation(image)   # before load(): the size probe_image told
        image.load()
        upright = _UPRIGHT.get(orientation)
        return to_rgb(image.transpose(upright) if upright is not None else image)
    # NOTE: untrusted bytes reach many code paths inside Pillow's decoders and EXIF parser, each
    # with its own exception types; every one of them means "this image cannot be used".
    except Exception as e:  # noqa: BLE001
        raise MediaError(f"the image could not be decoded ({type(e).__name__}: {e})") from None


def to_rgb(image: Image.Image) -> Image.Image:
    """Any mode -> RGB; alpha (RGBA, LA, a P palette with transparency) over a white background."""
    if image.mode == "RGB":
        return image
    if "A" in image.getbands() or image.info.get("transparency") is not None:
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return image.convert("RGB")


def check_image(image: object, max_pixels: int = DEFAULT_MAX_IMAGE_PIXELS) -> Image.Image:
    """An image handed in as a Pillow object (LLM.generate's multi_modal_data) -> RGB."""
    if not isinstance(image, Image.Image):
        raise MediaError(f"an image must be a PIL.Image.Image, got {type(image).__name__}")
    _check_size(image, max_pixels)
    return to_rgb(image)


def _check_size(image: Image.Image, max_pixels: int) -> None:
    width, height = image.size
    if width * height > max_pixels:
        raise MediaError(f"image is too large: {width}x{height} pixels, the limit is "
                         f"{max_pixels} pixels")
    if width < 1 or height < 1:
        raise MediaError("image has no pixels")


def image_hash(image: Image.Image) -> str:
    """Equal pixels, equal hash: the key of the encoder cache and of the prefix cache's root."""
    h = hashlib.blake2b(digest_size=16)
    h.update(f"{image.mode}:{image.width}x{image.height}:".encode())
    # NOTE: band by band, the same bytes as image.tobytes() without a full-size copy of them
    rows = max(1, _HASH_ROWS_BYTES // max(1, image.width * len(image.getbands())))
    for top in range(0, image.height, rows):
        h.update(image.crop((0, top, image.width, min(top + rows, image.height))).tobytes())
    return h.hexdigest()
