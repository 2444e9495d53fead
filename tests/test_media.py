"""Getting images safely: decoding (formats, first GIF frame, EXIF orientation, alpha over white,
corrupt data, decompression bombs) and fetching (data: URLs, http against a loopback server with
the private-address guard on and off, timeouts, size caps, redirect limits and re-checks, domain
allowlists, file:// under --allowed-local-media-path). Each failure is a MediaError saying why."""
from __future__ import annotations

import asyncio
import base64
import io
import os
import struct
import warnings
import zlib

import numpy as np
import pytest
from PIL import Image

from minserve.multimodal import fetch
from minserve.multimodal.fetch import MediaPolicy, fetch_media
from minserve.multimodal.image import MediaError, decode_image, image_hash
from tests.media_server import MediaServer, png_bytes
from tests.tiny_vlm import random_image


def _encode(image: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format=fmt, **kw)
    return buf.getvalue()


# ---------------------------------------------------------------- decoding

@pytest.mark.parametrize("fmt", ["PNG", "JPEG", "WEBP", "GIF", "BMP"])
def test_formats_decode_to_rgb(fmt):
    image = decode_image(_encode(random_image(30, 20), fmt))
    assert image.mode == "RGB" and image.size == (30, 20)


def test_gif_first_frame():
    red, blue = Image.new("RGB", (8, 8), (255, 0, 0)), Image.new("RGB", (8, 8), (0, 0, 255))
    data = _encode(red, "GIF", save_all=True, append_images=[blue])
    assert decode_image(data).getpixel((0, 0)) == (255, 0, 0)


def test_exif_orientation_applied():
    image = random_image(40, 20)
    exif = Image.Exif()
    exif[0x0112] = 6          # "rotate 90 CW to view"
    out = decode_image(_encode(image, "JPEG", exif=exif.tobytes(), quality=95))
    assert out.size == (20, 40)


def test_alpha_and_palette_over_white():
    rgba = Image.new("RGBA", (4, 4), (10, 20, 30, 0))        # fully transparent
    assert decode_image(_encode(rgba, "PNG")).getpixel((0, 0)) == (255, 255, 255)
    half = Image.new("LA", (4, 4), (0, 128))
    assert decode_image(_encode(half, "PNG")).getpixel((0, 0)) == (127, 127, 127)
    pal = Image.new("P", (4, 4), 0)
    pal.putpalette([200, 100, 50] * 256)
    pal.info["transparency"] = 0
    assert decode_image(_encode(pal, "PNG", transparency=0)).getpixel((0, 0)) == (255, 255, 255)
    gray = Image.new("L", (4, 4), 77)
    assert decode_image(_encode(gray, "PNG")).getpixel((0, 0)) == (77, 77, 77)


def test_not_an_image_and_corrupt():
    with pytest.raises(MediaError, match="not an image"):
        decode_image(b"hello world")
    data = _encode(random_image(64, 64), "PNG")
    with pytest.raises(MediaError, match="could not be decoded"):
        decode_image(data[: len(data) // 2])


def _png_header_only(width: int, height: int) -> bytes:
    """A tiny PNG whose header claims width x height (a decompression bomb's shape)."""
    def chunk(kind: bytes, body: bytes) -> bytes:
        return (struct.pack(">I", len(body)) + kind + body
                + struct.pack(">I", zlib.crc32(kind + body) & 0xFFFFFFFF))
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr)
            + chunk(b"IDAT", zlib.compress(b"\0" * 1024)) + chunk(b"IEND", b""))


@pytest.mark.parametrize("side", [8000, 100_000])
def test_decompression_bomb(side):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        with pytest.raises(MediaError, match="too large"):
            decode_image(_png_header_only(side, side))
    with pytest.raises(MediaError, match="too large"):
        decode_image(_png_header_only(300, 300), max_pixels=300 * 299)


def test_hash_follows_pixels():
    a = random_image(16, 16, 1)
    assert image_hash(a) == image_hash(decode_image(_encode(a, "PNG")))
    assert image_hash(a) != image_hash(random_image(16, 16, 2))


# ---------------------------------------------------------------- data: and file://

def test_data_urls():
    png = png_bytes()
    url = "data:image/png;base64," + base64.b64encode(png).decode()
    assert fetch_media(url, MediaPolicy()) == png
    with pytest.raises(MediaError, match="not valid base64"):
        fetch_media("data:image/png;base64,@@@not-base64@@@", MediaPolicy())
    with pytest.raises(MediaError, match="only base64"):
        fetch_media("data:image/png,rawbytes", MediaPolicy())
    with pytest.raises(MediaError, match="too large"):
        fetch_media(url, MediaPolicy(max_bytes=100))
    with pytest.raises(MediaError, match="scheme"):
        fetch_media("ftp://example.com/x.png", MediaPolicy())


def test_file_urls(tmp_path):
    allowed = tmp_path / "media"
    allowed.mkdir()
    (allowed / "a.png").write_bytes(png_bytes())
    (tmp_path / "secret.png").write_bytes(b"secret")
    os.symlink(tmp_path / "secret.png", allowed / "link.png")
    with pytest.raises(MediaError, match="--allowed-local-media-path"):
        fetch_media(f"file://{allowed}/a.png", MediaPolicy())
    policy = MediaPolicy.create(allowed_local_media_path=str(allowed))
    assert fetch_media(f"file://{allowed}/a.png", policy) == png_bytes()
    for outside in (f"file://{tmp_path}/secret.png", f"file://{allowed}/../secret.png",
                    f"file://{allowed}/link.png"):
        with pytest.raises(MediaError, match="outside"):
            fetch_media(outside, policy)
    with pytest.raises(MediaError, match="cannot read"):
        fetch_media(f"file://{allowed}/missing.png", policy)


# ---------------------------------------------------------------- http(s)

@pytest.fixture(scope="module")
def server():
    s = MediaServer(max_bytes=1 << 18)
    yield s
    s.stop()


OPEN = MediaPolicy(allow_private_addresses=True, timeout=2.0, max_bytes=1 << 18)


def test_private_addresses_refused_by_default(server):
    for host in ("127.0.0.1", "localhost"):
        with pytest.raises(MediaError, match="--allow-private-media-urls"):
            fetch_media(server.url("/img.png", host), MediaPolicy())
    assert fetch_media(server.url("/img.png"), OPEN) == server.images["/img.png"]


def test_is_public():
    import ipaddress

    for ip in ("127.0.0.1", "10.1.2.3", "192.168.0.1", "172.16.5.5", "169.254.169.254", "::1",
               "fe80::1", "fc00::1", "::ffff:127.0.0.1", "0.0.0.0", "100.64.0.1", "224.0.0.1"):
        assert not fetch._is_public(ipaddress.ip_address(ip)), ip
    for ip in ("8.8.8.8", "1.1.1.1", "2606:4700:4700::1111"):
        assert fetch._is_public(ipaddress.ip_address(ip)), ip


def test_embedded_ipv4_judged_by_the_address_it_embeds():
    """Issue 36, finding 9: NAT64 (64:ff9b::/96), 6to4 (2002::/16), Teredo (2001::/32) and
    IPv4-compatible (::/96) addresses reach the IPv4 address inside them."""
    import ipaddress

    private = ("64:ff9b::a9fe:a9fe",      # NAT64 -> 169.254.169.254 (cloud metadata)
               "64:ff9b::7f00:1",         # NAT64 -> 127.0.0.1
               "64:ff9b::a00:1",          # NAT64 -> 10.0.0.1
               "64:ff9b:1::808:808",      # RFC 8215 local-use NAT64 prefix
               "2002:a9fe:a9fe::1",       # 6to4 -> 169.254.169.254
               "2002:c0a8:101::1",        # 6to4 -> 192.168.1.1
               "2001:0:a00:1:0:0:f5ff:fffe",   # Teredo, server and client 10.0.0.1
               "2001:0:808:808:0:0:f5ff:fffe",  # Teredo, public server, client 10.0.0.1
               "::a00:1", "::7f00:1")     # IPv4-compatible
    for ip in private:
        assert not fetch._is_public(ipaddress.ip_address(ip)), ip
    for ip in ("64:ff9b::808:808", "2002:808:808::1", "::808:808",
               "2001:0:808:808:0:0:f7f7:f7f7"):   # Teredo, both 8.8.8.8
        assert fetch._is_public(ipaddress.ip_address(ip)), ip


def test_http_failures(server):
    cases = [("/missing", "HTTP 404"), ("/big", "too large"), ("/big-chunked", "too large"),
             ("/redirect/2", None), ("/redirect/5", "redirects more than 3"),
             ("/to?file:///etc/passwd", "not allowed"), ("/to?ftp://example.com/", "not allowed")]
    for path, error in cases:
        if error is None:
            assert fetch_media(server.url(path), OPEN) == server.images["/img.png"]
        else:
            with pytest.raises(MediaError, match=error):
                fetch_media(server.url(path), OPEN)
    with pytest.raises(MediaError, match="unreachable"):
        fetch_media("http://127.0.0.1:1/x.png", OPEN)
    with pytest.raises(MediaError, match="unreachable"):
        fetch_media("http://no-such-host.invalid/x.png", OPEN)


def test_never_answering_url_times_out(server):
    with pytest.raises(MediaError, match="timed out after 0.5 s"):
        fetch_media(server.url("/slow"), MediaPolicy(allow_private_addresses=True, timeout=0.5))


def test_domains_checked_at_every_hop(server):
    policy = MediaPolicy.create(allowed_media_domains=["127.0.0.1"], allow_private_addresses=True)
    assert fetch_media(server.url("/img.png"), policy)
    with pytest.raises(MediaError, match="not in --allowed-media-domains"):
        fetch_media(server.url("/img.png", "localhost"), policy)
    hop = server.url("/to?" + server.url("/img.png", "localhost"))
    with pytest.raises(MediaError, match="not in --allowed-media-domains"):
        fetch_media(hop, policy)


def test_redirect_to_private_address_refused(server, monkeypatch):
    # Pretend 127.0.0.1 is a public address: the first hop is allowed, the redirect to another
    # loopback address is refused at connect time.
    monkeypatch.setattr(fetch, "_is_public", lambda ip: str(ip) == "127.0.0.1")
    assert fetch_media(server.url("/img.png"), MediaPolicy())
    hop = server.url("/to?" + server.url("/img.png", "127.0.0.2"))
    with pytest.raises(MediaError, match="127.0.0.2"):
        fetch_media(hop, MediaPolicy())


def test_fetch_all_concurrently_and_first_error(server):
    """load_images (the server's path): every URL fetched at once and measured from its header
    (decoded later); the first failure, in part order, names its part."""
    from minserve.chat import ImageRef
    from minserve.multimodal.inputs import load_images

    refs = [ImageRef(server.url(p), None, f"part{i}") for i, p in enumerate(server.images)]
    got = asyncio.run(load_images(refs, OPEN))
    assert [i.data for i in got] == list(server.images.values())
    assert [(i.width, i.height) for i in got] == [decode_image(b).size
                                                  for b in server.images.values()]
    refs[1] = ImageRef(server.url("/missing"), None, "part1")
    with pytest.raises(MediaError, match="part1: .*HTTP 404") as e:
        asyncio.run(load_images(refs, OPEN))
    assert e.value.param == "part1"


def test_timeout_env(monkeypatch):
    monkeypatch.setenv("VLLM_IMAGE_FETCH_TIMEOUT", "2.5")
    assert MediaPolicy.create().timeout == 2.5
    monkeypatch.setenv("VLLM_IMAGE_FETCH_TIMEOUT", "soon")
    with pytest.raises(ValueError, match="VLLM_IMAGE_FETCH_TIMEOUT"):
        MediaPolicy.create()
    monkeypatch.delenv("VLLM_IMAGE_FETCH_TIMEOUT")
    assert MediaPolicy.create().timeout == 5.0
    assert np.isclose(fetch.DEFAULT_FETCH_TIMEOUT, 5.0)
