"""Helpers the server tests share: wait_until() (poll a condition, never sleep-then-assert), an
App over the tiny model driven in-process (real_app/run), a real `python -m minserve`
subprocess on a free port (start_server/stop_server/serving), the SDK test modules' one server
fixture (sdk_server) and a Prometheus metric read from a running server (metric)."""
from __future__ import annotations

import asyncio
import contextlib
import os
import re
import signal
import socket
import ssl
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from minserve.config import EngineConfig
from minserve.server import ServerConfig, create_app
from tests.asgi import lifespan


async def wait_until(cond: Callable[[], Any], timeout: float = 30.0, what: str = "") -> None:
    """Poll cond() until it is true, yielding to the event loop between tries; an
    AssertionError after `timeout` seconds. From sync code: asyncio.run(wait_until(...))."""
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what or cond}")
        await asyncio.sleep(0.01)


def real_app(model_dir: str, **server: Any):
    cfg = EngineConfig(model=model_dir, kv_cache_memory=4 << 20, max_model_len=512)
    return create_app(cfg, ServerConfig(**{"served_model_names": ["tiny", "alias"], **server}))


def run(app: Any, fn: Callable[[Any], Any]) -> Any:
    """asyncio.run(fn(app)) inside the app's lifespan, once its models are ready."""
    async def main():
        async with lifespan(app):
            return await fn(app)
    return asyncio.run(main())


KEY = "test-key"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(args: list[str], timeout: float = 120, scheme: str = "http"
                 ) -> tuple[subprocess.Popen, str]:
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "minserve", *args, "--port", str(port)],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    url = f"{scheme}://127.0.0.1:{port}"
    # a test's self-signed certificate: check liveness, not trust
    context = ssl._create_unverified_context() if scheme == "https" else None
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited: {proc.stdout.read()}")
        try:
            with urllib.request.urlopen(url + "/health", timeout=1, context=context) as r:
                if r.status == 200:
                    return proc, url
        except OSError:
            pass
        time.sleep(0.2)
    proc.kill()
    raise RuntimeError("server did not become healthy")


def stop_server(proc: subprocess.Popen) -> tuple[int, str]:
    proc.send_signal(signal.SIGTERM)
    try:
        out, _ = proc.communicate(timeout=60)
    except subprocess.TimeoutExpired:
        proc.kill()
        out, _ = proc.communicate()
    return proc.returncode, out


def sdk_server(*args: str) -> Any:
    """The server fixture of an SDK test module (`server = sdk_server(...flags)`): one real
    `python -m minserve serve` of the tiny model (served as "tiny", 8 MiB of KV cache, batch
    storage in a temporary folder) with the module's flags, started once for the module. Yields
    its URL; stopped with SIGTERM, it must exit 0 having logged its KV cache and readiness."""
    @pytest.fixture(scope="module")
    def server(tiny_model_dir: str, tmp_path_factory: Any) -> Iterator[str]:
        storage = tmp_path_factory.mktemp("batch-storage")
        proc, url = start_server(["serve", tiny_model_dir, "--served-model-name", "tiny",
                                  "--kv-cache-memory", "8MiB",
                                  "--batch-storage-path", str(storage), *args])
        yield url
        code, out = stop_server(proc)
        assert code == 0, out
        assert "KV cache" in out and "ready" in out
    return server


def metric(url: str, name: str) -> float:
    """A server's Prometheus sample `name` (its first series), 0.0 when absent."""
    text = urllib.request.urlopen(url + "/metrics").read().decode()
    m = re.search(rf"^{re.escape(name)}(?:\{{[^}}]*\}})? (\S+)", text, re.M)
    return float(m[1]) if m else 0.0


@contextlib.contextmanager
def serving(args: list[str], timeout: float = 120, scheme: str = "http") -> Iterator[str]:
    """`with serving(ARGS) as url:` a real `python -m minserve ARGS` for the block; it is stopped
    with SIGTERM afterwards and must then exit 0."""
    proc, url = start_server(args, timeout, scheme)
    try:
        yield url
    finally:
        code, out = stop_server(proc)
    assert code == 0, out


def children(pid: int) -> list[int]:
    """Live (non-zombie) children of pid, from the process table."""
    out = []
    for name in os.listdir("/proc"):
        if name.isdigit():
            try:
                with open(f"/proc/{name}/stat") as f:
                    fields = f.read().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if int(fields[1]) == pid and fields[0] != "Z":
                out.append(int(name))
    return out


def alive(pid: int) -> bool:
    """pid runs (neither gone nor a zombie)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False
