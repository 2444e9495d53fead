"""Image URLs -> bytes, bounded: data: (base64), http(s) through the standard library's urllib in
a worker thread, file:// only under --allowed-local-media-path. Every fetch has a deadline
(VLLM_IMAGE_FETCH_TIMEOUT, default 5 s), a byte cap and a redirect limit; hosts can be limited
to --allowed-media-domains; and unless --allow-private-media-urls is given, a URL whose host
resolves to a loopback, private, link-local or otherwise non-global address is refused. That
check runs on the address actually connected to, at every redirect hop, so a DNS answer that
changes between check and use (rebinding) cannot slip through. Environment proxies are not used.
Every failure is a MediaError saying what went wrong; nothing here decodes images."""
from __future__ import annotations

import asyncio
import base64
import binascii
import functools
import http.client
import ipaddress
import os
import socket
import ssl
import time
import urllib.error
import urllib.parse
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

from minserve.env import DEFAULT_IMAGE_FETCH_TIMEOUT_S as DEFAULT_FETCH_TIMEOUT
from minserve.env import image_fetch_timeout_s
from minserve.multimodal.image import MediaError

DEFAULT_MAX_MEDIA_BYTES = 20 << 20
MAX_REDIRECTS = 3
_CHUNK = 1 << 16


@dataclass(frozen=True)
class MediaPolicy:
    """Where images may come from, and how much of them."""
    allowed_local_media_path: str | None = None     # file:// URLs only below this folder
    allowed_media_domains: frozenset[str] | None = None   # None: any host
    allow_private_addresses: bool = False          # --allow-private-media-urls
    timeout: float = DEFAULT_FETCH_TIMEOUT
    max_bytes: int = DEFAULT_MAX_MEDIA_BYTES
    max_redirects: int = MAX_REDIRECTS

    @classmethod
    def from_config(cls, config: Any) -> MediaPolicy:
        """The policy an EngineConfig's media flags describe (the server's and LLM's; the
        engine never fetches); None (an engine made by a factory): the defaults. EngineConfig
        has checked that the local folder exists."""
        if config is None:
            return cls.create()
        return cls.create(config.allowed_local_media_path, config.allowed_media_domains,
                          config.allow_private_media_urls)

    @classmethod
    def create(cls, allowed_local_media_path: str | None = None,
               allowed_media_domains: list[str] | None = None,
               allow_private_addresses: bool = False, max_bytes: int | None = None,
               timeout: float | None = None) -> MediaPolicy:
        local = os.path.realpath(allowed_local_media_path) if allowed_local_media_path else None
        domains = None
        if allowed_media_domains:
            domains = frozenset(d.strip().lower().rstrip(".") for d in allowed_media_domains
                                if d.strip())
        return cls(local, domains, allow_private_addresses,
                   image_fetch_timeout_s() if timeout is None else timeout,
                   DEFAULT_MAX_MEDIA_BYTES if max_bytes is None else max_bytes)


# ---------------------------------------------------------------- one URL, synchronously

def fetch_media(url: str, policy: MediaPolicy) -> bytes:
    """The bytes behind an image URL (data:, http(s)://, file://), or a MediaError."""
    if not isinstance(url, str) or not url:
        raise MediaError("the image URL must be a non-empty string")
    scheme = url.split(":", 1)[0].lower() if ":" in url else ""
    if scheme == "data":
        return _data_url(url, policy)
    if scheme in ("http", "https"):
        return _http(url, policy)
    if scheme == "file":
        return _file(url, policy)
    raise MediaError(f"image URL scheme {scheme or url[:20]!r} is not supported; use http(s)://, "
                     "data:image/...;base64, or file:// (with --allowed-local-media-path)")


def _data_url(url: str, policy: MediaPolicy) -> bytes:
    header, sep, payload = url[5:].partition(",")
    if not sep:
        raise MediaError("a data: URL needs a comma between its header and its data")
    if not header.lower().endswith(";base64"):
        raise MediaError("only base64 data: URLs are supported (data:image/png;base64,...)")
    if len(payload) > policy.max_bytes * 4 // 3 + 4:
        raise MediaError(f"image is too large: more than {policy.max_bytes} bytes")
    try:
        return base64.b64decode(payload, validate=True)
    except (binascii.Error, ValueError) as e:
        raise MediaError(f"the data: URL is not valid base64 ({e})") from None


def _file(url: str, policy: MediaPolicy) -> bytes:
    root = policy.allowed_local_media_path
    if root is None:
        raise MediaError("file:// image URLs are refused: the server was not started with "
                         "--allowed-local-media-path")
    parsed = urllib.parse.urlparse(url)
    if parsed.netloc not in ("", "localhost"):
        raise MediaError("file:// image URLs must name a local path (file:///path)")
    path = os.path.realpath(urllib.request.url2pathname(parsed.path))
    if os.path.commonpath([root, path]) != root:
        raise MediaError("the file:// image URL is outside --allowed-local-media-path")
    try:
        with open(path, "rb") as f:
            data = f.read(policy.max_bytes + 1)
    except OSError as e:
        raise MediaError(f"cannot read the file:// image ({e.strerror or e})") from None
    if len(data) > policy.max_bytes:
        raise MediaError(f"image is too large: more than {policy.max_bytes} bytes")
    return data


def _check_url(url: str, policy: MediaPolicy) -> None:
    parsed = urllib.parse.urlparse(url)
    if parsed.scheme.lower() not in ("http", "https"):
        raise MediaError(f"image URL scheme {parsed.scheme!r} is not allowed here (http, https)")
    host = (parsed.hostname or "").lower().rstrip(".")
    if not host:
        raise MediaError("the image URL has no host")
    if policy.allowed_media_domains is not None and host not in policy.allowed_media_domains:
        raise MediaError(f"image URL host {host!r} is not in --allowed-media-domains")


def _http(url: str, policy: MediaPolicy) -> bytes:
    _check_url(url, policy)
    deadline = time.monotonic() + policy.timeout
    request = urllib.request.Request(url, headers={"User-Agent": "minserve",
                                                   "Accept": "image/*"})
    try:
        with _opener(policy).open(request, timeout=policy.timeout) as response:
            length = response.headers.get("Content-Length")
            if length is not None and length.isdigit() and int(length) > policy.max_bytes:
                raise MediaError(f"image is too large: {length} bytes, the limit is "
                                 f"{policy.max_bytes}")
            chunks, total = [], 0
            while chunk := response.read(_CHUNK):
                total += len(chunk)
                if total > policy.max_bytes:
                    raise MediaError(f"image is too large: more than {policy.max_bytes} bytes")
                if time.monotonic() > deadline:
                    raise TimeoutError
                chunks.append(chunk)
            return b"".join(chunks)
    except urllib.error.HTTPError as e:
        raise MediaError(f"fetching the image URL failed: HTTP {e.code} {e.reason}") from None
    except TimeoutError:
        raise MediaError(f"fetching the image URL timed out after {policy.timeout:g} s") from None
    except urllib.error.URLError as e:
        reason = e.reason
        if isinstance(reason, MediaError):
            raise reason from None
        if isinstance(reason, (TimeoutError, socket.timeout)):
            raise MediaError(f"fetching the image URL timed out after {policy.timeout:g} s") \
                from None
        raise MediaError(f"the image URL is unreachable ({_reason(reason)})") from None
    except (http.client.HTTPException, ConnectionError, ssl.SSLError, OSError) as e:
        raise MediaError(f"fetching the image URL failed ({_reason(e)})") from None


def _reason(e: object) -> str:
    if isinstance(e, socket.gaierror):
        return "the host name could not be resolved"
    return f"{type(e).__name__}: {e}" if isinstance(e, BaseException) else str(e)


# ---------------------------------------------------------------- the guarded urllib opener

_NAT64 = ipaddress.ip_network("64:ff9b::/96")             # RFC 6052 well-known prefix
_NAT64_LOCAL = ipaddress.ip_network("64:ff9b:1::/48")     # RFC 8215 local use: never public
_IPV4_COMPATIBLE = ipaddress.ip_network("::/96")          # deprecated ::a.b.c.d


def _embedded_ipv4(ip: ipaddress.IPv6Address) -> list[ipaddress.IPv4Address] | None:
    """The IPv4 addresses an IPv6 address carries to (mapped, NAT64, IPv4-compatible, 6to4,
    Teredo server and client), or None. On a NAT64 network 64:ff9b::a9fe:a9fe *is*
    169.254.169.254, so the embedded address is the one to judge."""
    if ip.ipv4_mapped is not None:
        return [ip.ipv4_mapped]
    if ip in _NAT64 or ip in _IPV4_COMPATIBLE:
        return [ipaddress.IPv4Address(int(ip) & 0xFFFFFFFF)]
    if ip.sixtofour is not None:
        return [ip.sixtofour]
    if ip.teredo is not None:
        return list(ip.teredo)
    return None


def _is_public(ip: ipaddress.IPv4Address | ipaddress.IPv6Address) -> bool:
    if isinstance(ip, ipaddress.IPv6Address):
        if ip in _NAT64_LOCAL:
            return False
        embedded = _embedded_ipv4(ip)
        if embedded is not None:
            return all(_is_public(v4) for v4 in embedded)
    return ip.is_global and not ip.is_multicast


def _guarded_connection(policy: MediaPolicy, address: tuple[str, int],
                        timeout: float | None = None, source_address: object = None
                        ) -> socket.socket:
    """socket.create_connection that resolves the host itself and connects only to addresses
    the policy allows (the address checked is the address used)."""
    host, port = address
    infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    refused, last_error = [], None
    for family, socktype, proto, _, sockaddr in infos:
        ip = ipaddress.ip_address(sockaddr[0].split("%", 1)[0])
        if not policy.allow_private_addresses and not _is_public(ip):
            refused.append(str(ip))
            continue
        sock = socket.socket(family, socktype, proto)
        try:
            sock.settimeout(timeout)
            sock.connect(sockaddr)
            return sock
        except OSError as e:
            sock.close()
            last_error = e
    if last_error is not None:
        raise last_error
    raise MediaError(f"the image URL's host {host!r} resolves to a loopback, private or "
                     f"link-local address ({', '.join(refused)}); such URLs are refused unless "
                     "the server runs with --allow-private-media-urls")


class _Guarded:
    """Mixed into http.client's connections: they connect through _guarded_connection."""

    def __init__(self, *args: object, policy: MediaPolicy, **kwargs: object) -> None:
        super().__init__(*args, **kwargs)
        self._create_connection = functools.partial(_guarded_connection, policy)


class _GuardedHTTPConnection(_Guarded, http.client.HTTPConnection):
    pass


class _GuardedHTTPSConnection(_Guarded, http.client.HTTPSConnection):
    pass


class _HTTPHandler(urllib.request.HTTPHandler):
    def __init__(self, policy: MediaPolicy) -> None:
        super().__init__()
        self.policy = policy

    def http_open(self, req: urllib.request.Request) -> http.client.HTTPResponse:
        return self.do_open(functools.partial(_GuardedHTTPConnection, policy=self.policy), req)


class _HTTPSHandler(urllib.request.HTTPSHandler):
    def __init__(self, policy: MediaPolicy) -> None:
        super().__init__(context=ssl.create_default_context())
        self.policy = policy

    def https_open(self, req: urllib.request.Request) -> http.client.HTTPResponse:
        return self.do_open(functools.partial(_GuardedHTTPSConnection, policy=self.policy), req,
                            context=self._context)


class _RedirectHandler(urllib.request.HTTPRedirectHandler):
    def __init__(self, policy: MediaPolicy) -> None:
        super().__init__()
        self.policy = policy
        self.max_redirections = policy.max_redirects
        self.max_repeats = policy.max_redirects

    def redirect_request(self, req, fp, code, msg, headers, newurl):  # noqa: ANN001, ANN201
        newurl = urllib.parse.urljoin(req.full_url, newurl)
        _check_url(newurl, self.policy)        # scheme and domain of every hop
        redirects = len(getattr(req, "redirect_dict", {}))
        if redirects >= self.policy.max_redirects:
            raise MediaError(f"the image URL redirects more than {self.policy.max_redirects} "
                             "times")
        return super().redirect_request(req, fp, code, msg, headers, newurl)


def _opener(policy: MediaPolicy) -> urllib.request.OpenerDirector:
    """Only these handlers: no proxies from the environment, no file:/ftp:/data: follow-ups."""
    opener = urllib.request.OpenerDirector()
    for handler in (_HTTPHandler(policy), _HTTPSHandler(policy), _RedirectHandler(policy),
                    urllib.request.HTTPErrorProcessor(), urllib.request.HTTPDefaultErrorHandler(),
                    urllib.request.UnknownHandler()):
        opener.add_handler(handler)
    return opener


# ---------------------------------------------------------------- many URLs, asynchronously

# Fetches wait on the network, not the CPU: their own threads, so a slow host never holds up the
# threads that tokenize other requests.
_FETCH_THREADS = ThreadPoolExecutor(max_workers=16, thread_name_prefix="minserve-fetch")


async def fetch_async(url: str, policy: MediaPolicy) -> bytes:
    """fetch_media in a fetch thread. The deadline is kept here too, so a request never waits
    past it even while a thread is still stuck (in a slow DNS lookup, say)."""
    future = asyncio.get_running_loop().run_in_executor(_FETCH_THREADS, fetch_media, url, policy)
    try:
        return await asyncio.wait_for(future, policy.timeout + 1.0)
    except asyncio.TimeoutError:
        raise MediaError(f"fetching the image URL timed out after {policy.timeout:g} s") from None

