"""Connection-level behaviour of a real `python -m minserve` (granian): idle connections neither
lock clients out nor live forever. One server for the module."""
from __future__ import annotations

import resource
import socket
import urllib.request

import pytest

from tests.serving import serving

NUM_IDLE = 2000


@pytest.fixture(scope="module")
def server(tiny_model_dir):
    with serving(["serve", tiny_model_dir, "--served-model-name", "tiny", "--max-model-len", "256",
                  "--kv-cache-memory", "8MiB", "--timeout-keep-alive", "3"]) as url:
        yield url


def _port(url: str) -> int:
    return int(url.rsplit(":", 1)[1])


def _raise_open_files(need: int) -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != resource.RLIM_INFINITY and soft < need:
        if hard != resource.RLIM_INFINITY and hard < need:
            pytest.skip(f"the open-files limit ({hard}) is below the {need} this test holds")
        resource.setrlimit(resource.RLIMIT_NOFILE, (need, hard))


def test_idle_connections_do_not_lock_out_new_clients(server):
    """2,000 connections that never send a byte (about 1,030 once took every connection slot:
    0 of 150 requests, /health included, got an answer), then new clients; and the server
    closes an idle connection by itself (--timeout-keep-alive)."""
    _raise_open_files(NUM_IDLE + 512)
    idle = []
    try:
        for _ in range(NUM_IDLE):
            idle.append(socket.create_connection(("127.0.0.1", _port(server)), timeout=60))
        answered = 0
        for _ in range(50):
            with urllib.request.urlopen(server + "/health", timeout=60) as r:
                answered += r.status == 200
        assert answered == 50
        idle[-1].settimeout(120)
        assert idle[-1].recv(1) == b""  # closed by the server, not by us
    finally:
        for s in idle:
            s.close()


def test_idle_keep_alive_connection_is_closed_after_a_request(server):
    """Between requests, too: a keep-alive connection left idle is closed by the server."""
    s = socket.create_connection(("127.0.0.1", _port(server)), timeout=120)
    try:
        s.sendall(b"GET /health HTTP/1.1\r\nHost: t\r\n\r\n")
        data = b""
        while b"\r\n\r\n" not in data:
            data += s.recv(4096)
        assert data.startswith(b"HTTP/1.1 200")
        while piece := s.recv(4096):  # whatever is left, then EOF from the server
            data += piece
    finally:
        s.close()


def test_a_second_server_on_the_port_is_refused_unless_asked(server, tiny_model_dir):
    """granian binds with SO_REUSEPORT, so a second server on the same port used to start and
    silently take half the connections. Now it exits at once, saying why; --reuse-port asks
    for the sharing."""
    import subprocess
    import sys

    args = [sys.executable, "-m", "minserve", "serve", tiny_model_dir, "--port",
            str(_port(server)), "--max-model-len", "256", "--kv-cache-memory", "8MiB"]
    refused = subprocess.run(args, capture_output=True, text=True, timeout=300)
    assert refused.returncode != 0 and "--reuse-port" in refused.stderr, refused.stderr
    shared = subprocess.Popen(args + ["--reuse-port"], stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True)
    try:
        for line in shared.stdout:
            if "ready: OpenAI API" in line:
                break
        assert shared.poll() is None  # it started, next to the first
    finally:
        shared.terminate()
        shared.wait(120)
