"""`python -m minserve.healthcheck`: the container's HEALTHCHECK. Exits 0 when the server in this
container answers GET /health with 200, 1 otherwise. Where to ask comes from the server's own
command line (PID 1's: the image's ENTRYPOINT plus the flags given to `podman run`), read with
the CLI's parser, so `--port 9000` or `--ssl-certfile` need no HEALTHCHECK of their own."""
from __future__ import annotations

import ssl
import sys
import urllib.request

from minserve.cli import build_parser


def server_argv(cmdline: bytes) -> list[str]:
    """A /proc/PID/cmdline (NUL-separated) of `... python -m minserve ARGS` -> ARGS. An init
    process in front (tini, `podman run --init`) is skipped; anything else gives []."""
    parts = [p.decode(errors="replace") for p in cmdline.split(b"\0") if p]
    for i in range(len(parts) - 1):
        if parts[i] == "-m" and parts[i + 1] == "minserve":
            return parts[i + 2:]
    return []


def health_url(argv: list[str]) -> str:
    if argv and argv[0] == "serve":
        argv = argv[1:]
    args, _ = build_parser().parse_known_args(argv)
    host = args.host
    if host in ("0.0.0.0", "", "localhost"):   # listening everywhere: ask over loopback
        host = "127.0.0.1"
    elif host == "::":
        host = "::1"
    if ":" in host:
        host = f"[{host}]"
    scheme = "https" if args.ssl_certfile else "http"
    return f"{scheme}://{host}:{args.port}/health"


def check(argv: list[str], timeout: float = 4.0) -> int:
    url = health_url(argv)
    # A container's certificate is often self-signed: the check asks about liveness, not trust.
    context = ssl._create_unverified_context() if url.startswith("https") else None
    try:
        with urllib.request.urlopen(url, timeout=timeout, context=context) as r:
            return 0 if r.status == 200 else 1
    except Exception as e:   # 503 while loading, refused, timed out: all "unhealthy"
        print(f"{url}: {e}", file=sys.stderr)
        return 1


def main() -> int:
    try:
        with open("/proc/1/cmdline", "rb") as f:
            cmdline = f.read()
    except OSError:
        cmdline = b""
    return check(server_argv(cmdline))


if __name__ == "__main__":
    sys.exit(main())
