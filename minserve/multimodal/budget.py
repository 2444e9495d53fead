"""What decoding images may cost: a request's images together (checked from their headers,
before any is decoded; --max-image-pixels-per-request) and every request's decodes at once (the
server's PixelBudget, --max-image-pixels-in-flight). A decoded pixel is 3 bytes (RGB), which the
400s say next to the pixel counts. Torch-free; nothing here decodes."""
from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator

from minserve.multimodal.image import MediaError

RGB_BYTES = 3
DEFAULT_MAX_PIXELS_IN_FLIGHT = 100_000_000    # two images at the 50-megapixel cap
WAIT_S = 60.0       # longest a decode waits for room before the request is answered 503


class DecodeBusy(MediaError):
    """Other requests' images held the server's decode budget for WAIT_S: a 503."""
    status = 503


def check_request_pixels(sizes: list[tuple[int, int]], max_pixels: int) -> None:
    """Refuse a request whose images together decode to more than max_pixels."""
    total = sum(w * h for w, h in sizes)
    if total > max_pixels:
        raise MediaError(
            f"the {len(sizes)} image(s) of this request decode to {total} pixels "
            f"({total * RGB_BYTES} bytes as RGB); at most {max_pixels} pixels "
            f"({max_pixels * RGB_BYTES} bytes) are decoded for one request "
            "(--max-image-pixels-per-request)", "messages")


class PixelBudget:
    """Decoded pixels in flight across the server: `async with budget.reserve(n)` waits until
    n more fit (one image at the per-image cap always fits an empty budget). Event-loop side."""

    def __init__(self, max_pixels: int = DEFAULT_MAX_PIXELS_IN_FLIGHT) -> None:
        self.max_pixels = max_pixels
        self.num_pixels = 0      # reserved now
        self._changed: asyncio.Condition | None = None

    @contextlib.asynccontextmanager
    async def reserve(self, num_pixels: int, wait_s: float = WAIT_S) -> AsyncIterator[None]:
        num_pixels = min(num_pixels, self.max_pixels)   # alone, any image may decode
        if self._changed is None:
            self._changed = asyncio.Condition()
        changed = self._changed
        async with changed:
            try:
                await asyncio.wait_for(changed.wait_for(
                    lambda: self.num_pixels + num_pixels <= self.max_pixels), wait_s)
            except asyncio.TimeoutError:
                raise DecodeBusy(f"the server is decoding other requests' images (its budget "
                                 f"of {self.max_pixels} pixels, --max-image-pixels-in-flight, "
                                 f"stayed full for {wait_s:g} s); try again") from None
            self.num_pixels += num_pixels
        try:
            yield
        finally:
            async with changed:
                self.num_pixels -= num_pixels
                changed.notify_all()
