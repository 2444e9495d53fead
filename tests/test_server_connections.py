"""Connection-level behaviour of a real `python -m minserve` (granian): idle connections neither
lock clients out nor live forever. One server for the module."""
from __future__ import annotations

import resource
import socket
import urllib.request

import pytest

from tests.test_openai_sdk import serving

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
