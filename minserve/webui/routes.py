"""GET / and /ui: the chat page, one HTML, one CSS and one JS file read from package data and
served with a strict Content-Security-Policy. The page needs no key; every API call it makes
does. --no-webui turns the routes off (404, as for any unknown path). Torch-free."""
from __future__ import annotations

import functools
from importlib import resources
from typing import Any

from minserve.http import Http, OpenAIError

# NOTE: model output reaches the page as text only (app.js never parses HTML); this policy is
# the second wall: no inline script or style, no eval, no requests but to this server.
CSP = (b"default-src 'none'; script-src 'self'; style-src 'self'; img-src data:; "
       b"connect-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'")
CONTENT_TYPES = {"index.html": b"text/html; charset=utf-8", "app.css": b"text/css; charset=utf-8",
                 "app.js": b"text/javascript; charset=utf-8"}


@functools.cache
def asset(name: str) -> bytes:
    return resources.files(__package__).joinpath(name).read_bytes()


def _serve(name: str) -> Any:
    async def handler(app: Any, http: Http) -> None:
        if not app.cfg.enable_webui:
            raise OpenAIError(404, f"Not Found: {http.scope['method']} {http.path}",
                              type="NotFoundError")
        await http.send_body(200, asset(name), [
            (b"content-type", CONTENT_TYPES[name]), (b"content-security-policy", CSP),
            (b"x-content-type-options", b"nosniff"), (b"referrer-policy", b"no-referrer"),
            (b"cache-control", b"no-cache")])
    return handler


# The page links its files relatively (ui/app.js), so it works below a --root-path too.
ROUTES = {"/": {"GET": _serve("index.html")}, "/ui": {"GET": _serve("index.html")},
          "/ui/app.css": {"GET": _serve("app.css")}, "/ui/app.js": {"GET": _serve("app.js")}}
