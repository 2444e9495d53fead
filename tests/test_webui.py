"""The chat page's routes, in-process: GET / and /ui serve the page with its strict
Content-Security-Policy (no key needed, also while the model loads, below a --root-path),
its two files are served, --no-webui makes them 404s as any unknown path, and the page's own
files hold no inline script, no HTML parsing and no eval. The page in a real browser:
test_webui_browser.py."""
from __future__ import annotations

import asyncio
import re
import threading
from importlib import resources

from minserve import cli
from minserve.server import ServerConfig, create_app
from tests.asgi import call, lifespan
from tests.fake_engine import FakeEngine, make_fake_app
from tests.serving import run

PAGE_PATHS = ("/", "/ui")
ASSETS = {"/ui/app.js": "text/javascript", "/ui/app.css": "text/css"}


def _csp(res) -> dict[str, str]:
    """The Content-Security-Policy header as {directive: sources}."""
    parts = (p.strip().split(" ", 1) for p in res.headers["content-security-policy"].split(";"))
    return {p[0]: p[1] if len(p) > 1 else "" for p in parts}


def test_page_and_files_are_served_with_a_strict_policy(tiny_model_dir):
    app = make_fake_app(tiny_model_dir, server={"api_keys": ["k"]})

    async def fn(app):
        pages = [await call(app, "GET", p) for p in PAGE_PATHS]
        assets = {p: await call(app, "GET", p) for p in ASSETS}
        head = await call(app, "HEAD", "/")
        models = await call(app, "GET", "/v1/models")
        return pages, assets, head, models

    pages, assets, head, models = run(app, fn)
    for res in pages:   # the page itself needs no key...
        assert res.status == 200 and res.headers["content-type"].startswith("text/html")
        assert b'<script src="ui/app.js"' in res.body and b"ui/app.css" in res.body
        csp = _csp(res)
        assert csp["default-src"] == "'none'" and csp["script-src"] == "'self'"
        assert csp["connect-src"] == "'self'" and csp["style-src"] == "'self'"
        assert "unsafe" not in res.headers["content-security-policy"]
        assert res.headers["x-content-type-options"] == "nosniff"
    assert models.status == 401    # ...every API call does
    for path, ctype in ASSETS.items():
        res = assets[path]
        assert res.status == 200 and res.headers["content-type"].startswith(ctype)
        assert res.body == resources.files("minserve.webui").joinpath(path[4:]).read_bytes()
    assert head.status == 200 and head.body == b"" and head.headers["content-length"] == str(
        len(pages[0].body))


def test_no_webui_is_404_as_any_unknown_path(tiny_model_dir):
    app = make_fake_app(tiny_model_dir, server={"enable_webui": False})

    async def fn(app):
        return [await call(app, "GET", p) for p in (*PAGE_PATHS, *ASSETS)], \
            await call(app, "GET", "/v1/models")

    gone, models = run(app, fn)
    for res, path in zip(gone, (*PAGE_PATHS, *ASSETS), strict=True):
        assert res.status == 404, path
        assert res.json()["error"] == {"message": f"Not Found: GET {path}",
                                       "type": "NotFoundError", "param": None, "code": 404}
    assert models.status == 200


def test_page_is_served_while_the_model_loads_and_below_a_root_path(tiny_model_dir):
    from minserve.tokenizer import Tokenizer
    tok = Tokenizer.from_folder(tiny_model_dir)
    gate = threading.Event()

    def slow_factory(_cfg):
        gate.wait(30)
        return FakeEngine(tok)

    app = create_app(None, ServerConfig(["tiny"], root_path="/chatbox"), slow_factory)

    async def main():
        async with lifespan(app, wait_ready=False):
            page = await call(app, "GET", "/chatbox/")
            script = await call(app, "GET", "/chatbox/ui/app.js")
            models = await call(app, "GET", "/chatbox/v1/models")
            gate.set()
            await app.chat.wait_ready(10)
            return page, script, models

    page, script, models = asyncio.run(main())
    assert page.status == 200 and b"<title>minserve chat</title>" in page.body
    assert script.status == 200
    assert models.status == 503   # the page shows "loading" and asks again


def test_the_flag_reaches_the_server_config():
    assert cli.server_config(cli.parse_args([])).enable_webui is True
    assert cli.server_config(cli.parse_args(["--no-webui"])).enable_webui is False
    assert cli.server_config(cli.parse_args(["--webui"])).enable_webui is True


def _asset(name: str) -> str:
    return resources.files("minserve.webui").joinpath(name).read_text()


def test_page_files_never_parse_html_or_run_inline_code():
    """The CSP forbids inline code; these are the constructs that would need it, or that would
    turn model output into markup."""
    js = _asset("app.js")
    for banned in ("innerHTML", "outerHTML", "insertAdjacentHTML", "document.write", "eval(",
                   "new Function", "DOMParser", "createContextualFragment", "srcdoc"):
        assert banned not in js, banned
    assert not re.search(r"set(Timeout|Interval)\(\s*['\"`]", js)   # code given as a string
    html = _asset("index.html")
    assert all(re.search(r'\bsrc="[^"]+"', tag) for tag in re.findall(r"<script[^>]*>", html))
    assert not re.search(r"<style|\sstyle=|\son[a-z]+=|javascript:", html, re.I)
    assert not re.search(r"https?://", html + js + _asset("app.css"))   # nothing from outside
