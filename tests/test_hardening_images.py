"""Issue 36, findings 1 and 2, on a tiny LLaVA. 1: thirty small PNGs that each decode to 49
megapixels took the server to 6 GB; now a request's images are measured from their headers
(the per-request pixel budget and the prompt's length are checked before any decode), decoded
one at a time within the server's in-flight budget, and --limit-mm-per-prompt defaults to what
the model takes. 2: a host that drips one byte at a time held every fetch thread; now the
deadline cuts the connection, one host gets at most MAX_FETCHES_PER_HOST fetches, and data:
images never go through the fetch threads."""
from __future__ import annotations

import asyncio
import base64
import io
import struct
import threading
import zlib
from concurrent.futures import ThreadPoolExecutor

import pytest

from minserve.config import EngineConfig
from minserve.multimodal import fetch, inputs
from minserve.multimodal.fetch import MediaPolicy, fetch_media
from minserve.multimodal.image import MediaError, decode_image, probe_image
from minserve.server import ServerConfig, create_app
from tests.asgi import call
from tests.media_server import DripServer, MediaServer
from tests.serving import run, wait_until
from tests.tiny_vlm import make_tiny_vlm, random_image

CHAT = "/v1/chat/completions"


@pytest.fixture(scope="module")
def llava_dir(tmp_path_factory) -> str:
    return make_tiny_vlm(str(tmp_path_factory.mktemp("llava")), "LlavaForConditionalGeneration")


@pytest.fixture
def drip():
    server = DripServer()
    yield server
    server.stop()


def bomb_png(side: int = 7000) -> bytes:
    """A 1-bit PNG of side x side black pixels: ~6 KB that decodes to side^2 RGB pixels (the
    issue's image: 49 megapixels, under the 50-megapixel per-image cap)."""
    def chunk(kind: bytes, body: bytes) -> bytes:
        return (struct.pack(">I", len(body)) + kind + body
                + struct.pack(">I", zlib.crc32(kind + body) & 0xFFFFFFFF))
    row = b"\0" * (1 + (side + 7) // 8)
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", side, side, 1, 0, 0,
                                                             0, 0))
            + chunk(b"IDAT", zlib.compress(row * side, 9)) + chunk(b"IEND", b""))


def _data_url(data: bytes, kind: str = "png") -> str:
    return f"data:image/{kind};base64,{base64.b64encode(data).decode()}"


def _png(width: int = 80, height: int = 60, seed: int = 0) -> bytes:
    buf = io.BytesIO()
    random_image(width, height, seed).save(buf, format="PNG")
    return buf.getvalue()


def _body(*urls: str, text: str = "What's in these?") -> dict:
    return {"model": "tiny", "max_tokens": 2, "messages": [{"role": "user", "content": [
        {"type": "text", "text": text},
        *({"type": "image_url", "image_url": {"url": u}} for u in urls)]}]}


def _app(model: str, max_model_len: int = 512, **engine):
    cfg = EngineConfig(model=model, kv_cache_memory=8 << 20, max_model_len=max_model_len,
                       **engine)
    return create_app(cfg, ServerConfig(served_model_names=["tiny"]))


@pytest.fixture
def decodes(monkeypatch):
    """Every image decode: (its part, decodes running at once when it started)."""
    seen, running, lock = [], [0], threading.Lock()
    real = inputs.decode

    def decode(image, processor):
        with lock:
            running[0] += 1
            seen.append((image.ref.param, running[0]))
        try:
            return real(image, processor)
        finally:
            with lock:
                running[0] -= 1

    monkeypatch.setattr(inputs, "decode", decode)
    return seen


# ---------------------------------------------------------------- finding 1: decode budget

def test_probe_reads_the_size_from_the_header(monkeypatch):
    from PIL import ImageFile

    def no_decode(self):
        raise AssertionError("probe_image decoded the pixels")
    with monkeypatch.context() as m:   # a PNG's EXIF lookup used to decode the whole image
        m.setattr(ImageFile.ImageFile, "load", no_decode)
        assert probe_image(bomb_png()) == (7000, 7000)
        assert probe_image(_png(80, 60)) == (80, 60)
    buf = io.BytesIO()
    exif = random_image(80, 60).getexif()
    exif[0x0112] = 8
    random_image(80, 60).save(buf, format="PNG", exif=exif)   # eXIf before the pixels
    assert probe_image(buf.getvalue()) == (60, 80)
    assert decode_image(buf.getvalue()).size == (60, 80)
    assert probe_image(_png(80, 60)) == (80, 60)
    buf = io.BytesIO()
    exif = random_image(80, 60).getexif()
    exif[0x0112] = 6                       # rotated a quarter: decoded as 60 x 80
    random_image(80, 60).save(buf, format="JPEG", exif=exif)
    assert probe_image(buf.getvalue()) == (60, 80)


def test_thirty_bomb_images_refused_before_any_decode(llava_dir, decodes):
    """The issue's request: 30 x 49 megapixels in a 236 KB body. Even with the image count
    allowed, the request's budget refuses it from the headers; nothing is decoded."""
    url = _data_url(bomb_png())

    async def fn(app):
        return await call(app, "POST", CHAT, _body(*[url] * 30))

    res = run(_app(llava_dir, limit_mm_per_prompt={"image": 30}), fn)
    assert res.status == 400, res.body
    msg = res.json()["error"]["message"]
    assert "1470000000 pixels (4410000000 bytes as RGB)" in msg
    assert "at most 100000000 pixels (300000000 bytes)" in msg
    assert "--max-image-pixels-per-request" in msg
    assert decodes == []


def test_image_limit_defaults_to_the_models(llava_dir):
    """--limit-mm-per-prompt unset: LLaVA-1.5 takes one image (was 999)."""
    async def fn(app):
        return await call(app, "POST", CHAT, _body(_data_url(_png()), _data_url(_png(seed=1))))

    res = run(_app(llava_dir), fn)
    assert res.status == 400 and "At most 1 image" in res.json()["error"]["message"]


def test_prompt_length_checked_before_decoding(llava_dir, decodes):
    """A prompt whose images would overflow max_model_len is refused from the images' sizes
    (each LLaVA image is 16 tokens), so no image is decoded for a request that cannot run."""
    async def fn(app):
        text = " ".join(["word"] * 20)
        return (await call(app, "POST", CHAT, _body(_data_url(_png()), text=text)),
                await call(app, "POST", CHAT, {**_body(_data_url(_png())), "max_tokens": 1}))

    too_long, fits = run(_app(llava_dir, max_model_len=48), fn)
    assert too_long.status == 400, too_long.body
    assert "maximum context length is 48 tokens" in too_long.json()["error"]["message"]
    assert fits.status == 200, fits.body
    assert len(decodes) == 1          # only the request that fits was decoded


def test_images_decode_one_at_a_time_within_the_server_budget(llava_dir, decodes):
    """Two requests of two images each, with an in-flight budget of one image: four decodes,
    never two at once, and both requests answered."""
    urls = [_data_url(_png(80, 60, seed)) for seed in range(2)]

    async def fn(app):
        return await asyncio.gather(*(call(app, "POST", CHAT, _body(*urls)) for _ in range(2)))

    results = run(_app(llava_dir, limit_mm_per_prompt={"image": 2},
                       max_image_pixels_in_flight=80 * 60), fn)
    assert [r.status for r in results] == [200, 200], [r.body for r in results]
    assert len(decodes) == 4 and max(n for _, n in decodes) == 1


def test_budget_flags_and_config():
    from minserve.cli import parse_args
    from minserve.config import ConfigError

    args = parse_args(["--max-image-pixels-per-request", "20000000",
                       "--max-image-pixels-in-flight", "60000000"])
    cfg = args.engine_config
    assert (cfg.max_image_pixels_per_request, cfg.max_image_pixels_in_flight) == \
        (20_000_000, 60_000_000)
    assert MediaPolicy.from_config(cfg).max_request_pixels == 20_000_000
    with pytest.raises(ConfigError, match="--max-image-pixels-per-request must be >= 1"):
        EngineConfig(model="x", max_image_pixels_per_request=0)


# ---------------------------------------------------------------- finding 2: slow hosts

def test_deadline_cuts_a_dripping_host(drip):
    """Headers at once, then a byte every 50 ms for 20 s: the fetch ends at its 0.5 s deadline
    and the connection is cut then, not when the host stops dripping."""
    policy = MediaPolicy(allow_private_addresses=True, timeout=0.5)
    with pytest.raises(MediaError, match="timed out after 0.5 s"):
        fetch_media(drip.url(), policy)
    asyncio.run(wait_until(lambda: drip.num_cut == 1, what="the drip cut"))
    assert drip.num_finished == 0


def test_one_host_gets_at_most_its_share_of_fetch_threads(drip):
    """Six fetches from the dripping host: at most MAX_FETCHES_PER_HOST connections at once,
    while a fetch from another host (the media server) is answered meanwhile."""
    media = MediaServer()
    policy = MediaPolicy(allow_private_addresses=True, timeout=2.0)

    async def fn():
        slow = [asyncio.ensure_future(fetch.fetch_async(drip.url(host="localhost"), policy))
                for _ in range(6)]
        await wait_until(lambda: drip.num_open == fetch.MAX_FETCHES_PER_HOST,
                         what="the host's fetches")
        other = await fetch.fetch_async(media.url("/img.png"), policy)
        running = sum(not t.done() for t in slow)
        results = await asyncio.gather(*slow, return_exceptions=True)
        return other, running, results

    try:
        other, running, results = asyncio.run(fn())
    finally:
        media.stop()
    assert other == media.images["/img.png"] and running == 6
    assert drip.max_open == fetch.MAX_FETCHES_PER_HOST
    assert all(isinstance(r, MediaError) and "timed out" in str(r) for r in results)


def test_inline_images_never_wait_for_url_fetches(llava_dir, drip, monkeypatch):
    """Every fetch thread busy with a dripping host: a request with a data: image is still
    answered, and a URL request fails with its own timeout."""
    monkeypatch.setattr(fetch, "_FETCH_THREADS", ThreadPoolExecutor(1))
    monkeypatch.setenv("VLLM_IMAGE_FETCH_TIMEOUT", "30")

    async def fn(app):
        slow = asyncio.ensure_future(call(app, "POST", CHAT, _body(drip.url())))
        await wait_until(lambda: drip.num_open == 1, what="the fetch thread busy")
        inline = await call(app, "POST", CHAT, _body(_data_url(_png())))
        busy = not slow.done()
        drip.stopped.set()                  # the host hangs up: the URL request ends
        return inline, busy, await slow

    inline, busy, slow = run(_app(llava_dir, allow_private_media_urls=True), fn)
    assert inline.status == 200, inline.body
    assert busy and slow.status == 400
