"""Image URLs -> bytes, bounded: data: (base64), http(s) through the standard library's urllib in
a worker thread, file:// only under --allowed-local-media-path. Every fetch has a wall-clock
deadline (VLLM_IMAGE_FETCH_TIMEOUT, default 5 s) that also frees its thread: at the deadline its
sockets are shut down, so a host that drips a byte at a time cannot hold a fetch thread. At most
MAX_FETCHES_PER_HOST fetches run per host, a byte cap and a redirect limit hold; hosts can be
limited to --allowed-media-domains; and unless --allow-private-media-urls is given, a URL whose
host resolves to a loopback, private, link-local or otherwise non-global address (or an IPv6
address embedding one: NAT64, 6to4, Teredo) is refused. That check runs on the address actually
connected to, at every redirect hop, so a DNS answer that changes between check and use
(rebinding) cannot slip through. Environment proxies are not used. Every failure is a MediaError
saying what went wrong; nothing here decodes images."""
from __future__ import annotations

import asyncio
import base64
import binascii
import contextlib
import functools
import http.client
import ipaddress
import os
import socket
import ssl
import threading
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
DEFAULT_MAX_REQUEST_PIXELS = 100_000_000    # decoded pixels of one request's images together
MAX_REDIRECTS = 3
MAX_FETCHES_PER_HOST = 4     # of the 16 fetch threads: a slow host cannot take them all
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
    max_request_pixels: int = DEFAULT_MAX_REQUEST_PIXELS   # --max-image-pixels-per-request

    @classmethod
    def from_config(cls, config: Any) -> MediaPolicy:
        """The policy an EngineConfig's media flags describe (the server's and LLM's; the
        engine never fetches); None (an engine made by a factory): the defaults. EngineConfig
        has checked that the local folder exists."""
        if config is None:
            return cls.create()
        return cls.create(config.allowed_local_media_path, config.allowed_media_domains,
                          config.allow_private_media_urls,
                          max_request_pixels=config.max_image_pixels_per_request)

    @classmethod
    def create(cls, allowed_local_media_path: str | None = None,
               allowed_media_domains: list[str] | None = None,
               allow_private_addresses: bool = False, max_bytes: int | None = None,
               timeout: float | None = None, max_request_pixels: int | None = None
               ) -> MediaPolicy:
        local = os.path.realpath(allowed_local_media_path) if allowed_local_media_path else None
        domains = None
        if allowed_media_domains:
            domains = frozenset(d.strip().lower().rstrip(".") for d in allowed_media_domains
                                if d.strip())
        return cls(local, domains, allow_private_addresses,
                   image_fetch_timeout_s() if timeout is None else timeout,
                   DEFAULT_MAX_MEDIA_BYTES if max_bytes is None else max_bytes,
                   max_request_pixels=max_request_pixels or DEFAULT_MAX_REQUEST_PIXELS)


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


class _Deadline:
    """One fetch's wall-clock deadline. At it, every socket the fetch opened is shut down: a
    read blocked on a host that sends a byte every 2 s (each receive within the socket timeout)
    returns at once, and the fetch thread is free again."""

    def __init__(self, timeout: float) -> None:
        self.at = time.monotonic() + timeout
        self.expired = False
        self._sockets: list[socket.socket] = []
        self._lock = threading.Lock()
        self._timer = threading.Timer(timeout, self._expire)
        self._timer.daemon = True
        self._timer.start()

    def check(self) -> None:
        if self.expired or time.monotonic() >= self.at:
            raise TimeoutError

    def watch(self, sock: socket.socket) -> None:
        with self._lock:
            self.check()
            self._sockets.append(sock)

    def _expire(self) -> None:
        with self._lock:
            self.expired = True
            for sock in self._sockets:
                with contextlib.suppress(OSError):
                    sock.shutdown(socket.SHUT_RDWR)

    def cancel(self) -> None:
        self._timer.cancel()


def _http(url: str, policy: MediaPolicy) -> bytes:
    _check_url(url, policy)
    deadline = _Deadline(policy.timeout)
    try:
        return _read(url, policy, deadline)
    except MediaError:
        raise
    except urllib.error.HTTPError as e:
        raise MediaError(f"fetching the image URL failed: HTTP {e.code} {e.reason}") from None
    except (urllib.error.URLError, http.client.HTTPException, OSError) as e:
        reason = e.reason if isinstance(e, urllib.error.URLError) else e
        if isinstance(reason, MediaError):
            raise reason from None
        if deadline.expired or isinstance(reason, (TimeoutError, socket.timeout)):
            raise MediaError(f"fetching the image URL timed out after {policy.timeout:g} s") \
                from None
        if isinstance(e, urllib.error.URLError):
            raise MediaError(f"the image URL is unreachable ({_reason(reason)})") from None
        raise MediaError(f"fetching the image URL failed ({_reason(e)})") from None
    finally:
        deadline.cancel()


def _read(url: str, policy: MediaPolicy, deadline: _Deadline) -> bytes:
    request = urllib.request.Request(url, headers={"User-Agent": "minserve",
                                                   "Accept": "image/*"})
    with _opener(policy, deadline).open(request, timeout=policy.timeout) as response:
        length = response.headers.get("Content-Length")
        if length is not None and length.isdigit() and int(length) > policy.max_bytes:
            raise MediaError(f"image is too large: {length} bytes, the limit is "
                             f"{policy.max_bytes}")
        chunks, total = [], 0
        # read1: one receive per call, so the deadline is looked at between receives
        while chunk := response.read1(_CHUNK):
            total += len(chunk)
            if total > policy.max_bytes:
                raise MediaError(f"image is too large: more than {policy.max_bytes} bytes")
            deadline.check()
            chunks.append(chunk)
        deadline.check()   # a body cut short by the deadline is not an image
        return b"".join(chunks)


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


def _guarded_connection(policy: MediaPolicy, deadline: _Deadline, address: tuple[str, int],
                        timeout: float | None = None, source_address: object = None
                        ) -> socket.socket:
    """socket.create_connection that resolves the host itself and connects only to addresses
    the policy allows (the address checked is the address used), within the fetch's deadline."""
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
            deadline.watch(sock)
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

    def __init__(self, *args: object, policy: MediaPolicy, deadline: _Deadline,
                 **kwargs: object) -> None:
        super().__init__(*args, **kwargs)
        self._create_connection = functools.partial(_guarded_connection, policy, deadline)


class _GuardedHTTPConnection(_Guarded, http.client.HTTPConnection):
    pass


class _GuardedHTTPSConnection(_Guarded, http.client.HTTPSConnection):
    pass


class _HTTPHandler(urllib.request.HTTPHandler):
    def __init__(self, policy: MediaPolicy, deadline: _Deadline) -> None:
        super().__init__()
        self.policy, self.deadline = policy, deadline

    def http_open(self, req: urllib.request.Request) -> http.client.HTTPResponse:
        return self.do_open(functools.partial(_GuardedHTTPConnection, policy=self.policy,
                                              deadline=self.deadline), req)


class _HTTPSHandler(urllib.request.HTTPSHandler):
    def __init__(self, policy: MediaPolicy, deadline: _Deadline) -> None:
        super().__init__(context=ssl.create_default_context())
        self.policy, self.deadline = policy, deadline

    def https_open(self, req: urllib.request.Request) -> http.client.HTTPResponse:
        return self.do_open(functools.partial(_GuardedHTTPSConnection, policy=self.policy,
                                              deadline=self.deadline), req,
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


def _opener(policy: MediaPolicy, deadline: _Deadline) -> urllib.request.OpenerDirector:
    """Only these handlers: no proxies from the environment, no file:/ftp:/data: follow-ups."""
    opener = urllib.request.OpenerDirector()
    for handler in (_HTTPHandler(policy, deadline), _HTTPSHandler(policy, deadline),
                    _RedirectHandler(policy),
                    urllib.request.HTTPErrorProcessor(), urllib.request.HTTPDefaultErrorHandler(),
                    urllib.request.UnknownHandler()):
        opener.add_handler(handler)
    return opener


# ---------------------------------------------------------------- many URLs, asynchronously

# Fetches wait on the network, not the CPU: their own threads, so a slow host never holds up the
# threads that tokenize other requests.
_FETCH_THREADS = ThreadPoolExecutor(max_workers=16, thread_name_prefix="minserve-fetch")


# host -> [its fetch slots, fetches using or waiting for them] (event-loop side only); an entry
# goes when its last user does, so no semaphore outlives the loop it was used on
_host_slots: dict[str, list] = {}


async def fetch_async(url: str, policy: MediaPolicy) -> bytes:
    """fetch_media in a fetch thread, at most MAX_FETCHES_PER_HOST at once per host. The
    deadline is kept here too (waiting for a slot included), so a request never waits past it
    even while a thread is still stuck (in a slow DNS lookup, say)."""
    host = (urllib.parse.urlparse(url).hostname or "").lower()
    entry = _host_slots.setdefault(host, [asyncio.Semaphore(MAX_FETCHES_PER_HOST), 0])
    entry[1] += 1
    try:
        return await asyncio.wait_for(_fetch_in_slot(entry[0], url, policy), policy.timeout + 1.0)
    except asyncio.TimeoutError:
        raise MediaError(f"fetching the image URL timed out after {policy.timeout:g} s") from None
    finally:
        entry[1] -= 1
        if entry[1] == 0:
            del _host_slots[host]


async def _fetch_in_slot(slot: asyncio.Semaphore, url: str, policy: MediaPolicy) -> bytes:
    async with slot:
        return await asyncio.get_running_loop().run_in_executor(_FETCH_THREADS, fetch_media,
                                                                url, policy)

