"""Images through the server: the OpenAI SDK against a real `python -m minserve` serving a tiny
LLaVA (the guide's base64 snippet, its URL snippet against a loopback image server with
--allow-private-media-urls, two images under --limit-mm-per-prompt image=2), and in-process apps
for every failure's 400 (unreachable, timeout, too large, not an image, bad base64, domain not
allowed, private address, decompression bomb, file://, over the image limit, text-only model),
and for other streams flowing while an image fetch hangs."""
from __future__ import annotations

import asyncio
import base64
import io
import struct
import zlib

import openai
import pytest

from minserve.config import EngineConfig
from minserve.server import ServerConfig, create_app
from tests.asgi import call, lifespan
from tests.media_server import MediaServer
from tests.serving import start_server, stop_server
from tests.tiny_vlm import make_tiny_vlm, random_image

CHAT = "/v1/chat/completions"


@pytest.fixture(scope="module")
def llava_dir(tmp_path_factory) -> str:
    return make_tiny_vlm(str(tmp_path_factory.mktemp("llava")), "LlavaForConditionalGeneration")


@pytest.fixture(scope="module")
def media():
    server = MediaServer(max_bytes=1 << 18)
    yield server
    server.stop()


def _jpeg_b64(seed: int = 0) -> str:
    buf = io.BytesIO()
    random_image(80, 60, seed).save(buf, format="JPEG")
    return base64.b64encode(buf.getvalue()).decode()


def _bomb_b64() -> str:
    """A PNG of a few hundred bytes whose header claims 100000 x 100000 pixels."""
    def chunk(kind: bytes, body: bytes) -> bytes:
        return (struct.pack(">I", len(body)) + kind + body
                + struct.pack(">I", zlib.crc32(kind + body) & 0xFFFFFFFF))
    png = (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", 100000, 100000, 8, 0,
                                                             0, 0, 0))
           + chunk(b"IDAT", zlib.compress(b"\0" * 1024)) + chunk(b"IEND", b""))
    return base64.b64encode(png).decode()


def _messages(*urls: str, text: str = "What's in this image?") -> list[dict]:
    return [{"role": "user", "content": [
        {"type": "text", "text": text},
        *({"type": "image_url", "image_url": {"url": u, "detail": "low"}} for u in urls)]}]


# ---------------------------------------------------------------- the OpenAI SDK, real server

@pytest.fixture(scope="module")
def client(llava_dir):
    proc, url = start_server(["serve", llava_dir, "--served-model-name", "llava",
                              "--kv-cache-memory", "8MiB", "--max-model-len", "512",
                              "--limit-mm-per-prompt", "image=2", "--allow-private-media-urls"])
    yield openai.OpenAI(base_url=url + "/v1", api_key="none", max_retries=0)
    code, out = stop_server(proc)
    assert code == 0, out


def test_sdk_base64_and_url_snippets(client, media):
    b64 = client.chat.completions.create(
        model="llava", max_tokens=5, temperature=0,
        messages=_messages(f"data:image/jpeg;base64,{_jpeg_b64()}"))
    assert b64.choices[0].message.content is not None
    text_only = client.chat.completions.create(
        model="llava", max_tokens=5, temperature=0, messages=_messages())
    # 16 image tokens (56 / 14 squared) count as prompt tokens, as in vLLM, beside the newline
    # the template writes after <image>
    assert b64.usage.prompt_tokens == text_only.usage.prompt_tokens + 16 + 1
    by_url = client.chat.completions.create(
        model="llava", max_tokens=5, temperature=0, messages=_messages(media.url("/img.png")))
    assert by_url.usage.prompt_tokens == b64.usage.prompt_tokens
    stream = client.chat.completions.create(
        model="llava", max_tokens=5, temperature=0, stream=True,
        messages=_messages(media.url("/img.png")))
    assert "".join(c.choices[0].delta.content or "" for c in stream if c.choices) == \
        by_url.choices[0].message.content


def test_sdk_two_images_within_the_limit(client, media):
    two = client.chat.completions.create(
        model="llava", max_tokens=3, messages=_messages(media.url("/img.png"),
                                                        media.url("/img2.png")))
    assert two.usage.prompt_tokens > 32
    with pytest.raises(openai.BadRequestError, match="At most 2 image"):
        client.chat.completions.create(model="llava", max_tokens=3, messages=_messages(
            *[media.url("/img.png")] * 3))


# ---------------------------------------------------------------- in-process apps

def _app(model: str, **engine):
    cfg = EngineConfig(model=model, kv_cache_memory=8 << 20, max_model_len=512, **engine)
    return create_app(cfg, ServerConfig(served_model_names=["tiny"]))


def _run(app, fn):
    async def main():
        async with lifespan(app):
            return await fn(app)
    return asyncio.run(main())


async def _chat(app, *urls: str, stream: bool = False):
    return await call(app, "POST", CHAT, {"model": "tiny", "max_tokens": 3, "stream": stream,
                                          "messages": _messages(*urls)})


def test_every_failure_is_a_400(llava_dir, media, tmp_path, monkeypatch):
    monkeypatch.setenv("VLLM_IMAGE_FETCH_TIMEOUT", "0.5")
    (tmp_path / "a.png").write_bytes(base64.b64decode(_jpeg_b64()))
    cases = {
        "unreachable": ("http://127.0.0.1:1/x.png", "unreachable"),
        "timeout": (media.url("/slow"), "timed out after 0.5 s"),
        "too large": (media.url("/big"), "too large"),
        "not an image": (media.url("/text"), "not an image"),
        "http error": (media.url("/missing"), "HTTP 404"),
        "bad base64": ("data:image/png;base64,%%%", "not valid base64"),
        "bomb": ("data:image/png;base64," + _bomb_b64(), "too large"),
        "domain": (media.url("/img.png", "localhost"), "not in --allowed-media-domains"),
        "file": (f"file://{tmp_path}/a.png", "--allowed-local-media-path"),
        "scheme": ("gopher://example.com/x", "scheme"),
    }

    async def fn(app):
        out = {name: await _chat(app, url) for name, (url, _) in cases.items()}
        out["ok"] = await _chat(app, media.url("/img.png"))
        out["missing url"] = await call(app, "POST", CHAT, {"model": "tiny", "messages": [
            {"role": "user", "content": [{"type": "image_url", "image_url": {}}]}]})
        out["two"] = await _chat(app, media.url("/img.png"), media.url("/img2.png"))
        return out

    app = _app(llava_dir, allow_private_media_urls=True,
               allowed_media_domains=["127.0.0.1", "example.com"],
               limit_mm_per_prompt={"image": 1})
    out = _run(app, fn)
    for name, (_, message) in cases.items():
        assert out[name].status == 400, (name, out[name].body)
        err = out[name].json()["error"]
        assert message in err["message"], (name, err)
        assert err["param"] == "messages[0].content[1]", (name, err)
    assert out["ok"].status == 200
    assert out["missing url"].status == 400 and "url" in out["missing url"].json()["error"][
        "message"]
    assert out["two"].status == 400 and "At most 1 image" in out["two"].json()["error"]["message"]


def test_private_addresses_refused_by_default(llava_dir, media):
    async def fn(app):
        return await _chat(app, media.url("/img.png"))

    res = _run(_app(llava_dir), fn)
    assert res.status == 400 and "--allow-private-media-urls" in res.json()["error"]["message"]


def test_text_only_model_keeps_its_400(tiny_model_dir, media):
    async def fn(app):
        return await _chat(app, "data:image/jpeg;base64," + _jpeg_b64())

    res = _run(_app(tiny_model_dir), fn)
    assert res.status == 400 and "text-only" in res.json()["error"]["message"]


def test_streams_flow_while_an_image_fetch_hangs(llava_dir, media, monkeypatch):
    monkeypatch.setenv("VLLM_IMAGE_FETCH_TIMEOUT", "60")

    async def fn(app):
        seen = media.num_requests
        slow = asyncio.ensure_future(_chat(app, media.url("/slow")))
        while media.num_requests == seen:     # the fetch has reached the image server
            await asyncio.sleep(0.01)
        streamed = await call(app, "POST", CHAT, {"model": "tiny", "max_tokens": 8,
                                                  "stream": True, "messages": _messages()})
        image = await _chat(app, "data:image/jpeg;base64," + _jpeg_b64(3))
        still_waiting = not slow.done()
        media.release.set()                   # the hanging server now closes the connection
        return streamed, image, still_waiting, await slow

    try:
        streamed, image, still_waiting, slow = _run(_app(llava_dir, allow_private_media_urls=True),
                                                    fn)
    finally:
        media.release.set()
    assert streamed.status == 200 and streamed.events()[-1] == "[DONE]"
    assert image.status == 200
    assert still_waiting
    assert slow.status == 400 and "image URL" in slow.json()["error"]["message"]
    media.release.clear()
