"""`python -m minserve -tp 3` on the real default model (SmolLM2-135M has 9 heads and 3 kv heads,
so 2 ranks cannot split it: -tp 3 is its smallest split): the seed guide's chat answer through
the OpenAI SDK, 16 concurrent streams equal to -tp 1 at temperature 0, a worker killed
mid-stream (errors, exit non-zero, no process left), and two "nodes" on loopback (tiny model,
-tp 2) serving and stopping together. The servers start once for the module."""
from __future__ import annotations

import asyncio
import os
import signal
import socket
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor

import openai
import pytest

from tests.serving import alive, children, free_port, start_server, stop_server, wait_until

pytestmark = pytest.mark.slow
ARGS = ["--kv-cache-memory", "64MiB", "--max-model-len", "1024", "--max-num-seqs", "16"]
CAPITAL = [{"role": "user", "content": "What is the capital of France?"}]


def workers(pid: int) -> list[int]:
    """pid's tensor-parallel worker processes (not multiprocessing's resource tracker); with
    --engine-process, the engine process's."""
    out = []
    for child in children(pid):
        try:
            with open(f"/proc/{child}/cmdline", "rb") as f:
                if b"spawn_main" not in f.read():
                    continue
            with open(f"/proc/{child}/comm", "rb") as f:
                out += workers(child) if f.read().strip() == b"minserve-engine" else [child]
        except OSError:
            pass
    return out


@pytest.fixture(scope="module")
def servers():
    with ThreadPoolExecutor(2) as pool:
        one, two = pool.map(lambda extra: start_server([*ARGS, *extra], timeout=900),
                            [[], ["--tensor-parallel-size", "3"]])
    yield one, two
    for proc, _ in (one, two):
        if proc.poll() is None:
            stop_server(proc)


def _client(url: str):
    return openai.OpenAI(base_url=url + "/v1", api_key="none", max_retries=0)


def test_default_model_refuses_tp2_with_the_numbers():
    p = subprocess.run([sys.executable, "-m", "minserve", *ARGS, "-tp", "2"], capture_output=True,
                       text=True, timeout=300)
    assert p.returncode == 1 and "num_attention_heads (9)" in p.stderr


def test_chat_answers_paris_with_tp3(servers):
    (_, _), (proc, url) = servers
    assert len(workers(proc.pid)) == 2          # ranks 1 and 2
    c = _client(url)
    model = c.models.list().data[0].id
    r = c.chat.completions.create(model=model, max_tokens=24, temperature=0, messages=CAPITAL)
    assert "Paris" in r.choices[0].message.content


def test_16_concurrent_streams_equal_tp1(servers):
    (_, url1), (_, url2) = servers
    questions = [f"Name {k} things about the number {i}." for i in range(8) for k in (2, 3)]

    async def stream_all(url: str) -> list[str]:
        c = openai.AsyncOpenAI(base_url=url + "/v1", api_key="none", max_retries=0)
        model = (await c.models.list()).data[0].id

        async def one(q: str) -> str:
            s = await c.chat.completions.create(model=model, max_tokens=12, temperature=0,
                                                stream=True,
                                                messages=[{"role": "user", "content": q}])
            return "".join([ch.choices[0].delta.content or "" async for ch in s
                            if ch.choices])
        return await asyncio.gather(*(one(q) for q in questions))

    a, b = asyncio.run(stream_all(url1)), asyncio.run(stream_all(url2))
    assert all(a) and a == b


def test_worker_killed_mid_stream_fails_clients_and_leaves_no_process(servers):
    (_, _), (proc, url) = servers
    worker, other = workers(proc.pid)
    c = _client(url)
    model = c.models.list().data[0].id
    got = []
    with pytest.raises(openai.APIError):
        stream = c.completions.create(model=model, prompt="Once upon a time", max_tokens=900,
                                      stream=True, extra_body={"ignore_eos": True})
        for chunk in stream:
            got.append(chunk)
            if len(got) == 2:
                os.kill(worker, signal.SIGKILL)
    assert len(got) >= 2
    assert proc.wait(timeout=120) != 0             # the CLI exits non-zero
    asyncio.run(wait_until(lambda: not alive(worker) and not alive(other), 60, "workers gone"))
    assert not children(proc.pid)


def test_two_nodes_serve_together_and_stop_together(tiny_model_dir):
    port = free_port()
    multi = ["--tensor-parallel-size", "2", "--nnodes", "2", "--master-addr", "127.0.0.1",
             "--master-port", str(port)]
    tiny = [tiny_model_dir, "--kv-cache-memory", "8MiB", "--max-model-len", "512"]
    node1 = subprocess.Popen([sys.executable, "-m", "minserve", *tiny, *multi, "--node-rank", "1"],
                             stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        head, url = start_server([*tiny, *multi, "--node-rank", "0"], timeout=900)
        assert not workers(head.pid)                 # its one rank is the head itself
        [rank1] = workers(node1.pid)
        c = _client(url)
        model = c.models.list().data[0].id
        r = c.chat.completions.create(model=model, max_tokens=8, temperature=0,
                                      messages=CAPITAL, extra_body={"ignore_eos": True})
        assert r.usage.completion_tokens == 8
        code, out = stop_server(head)
        assert code == 0, out
        assert node1.wait(timeout=120) == 0
        assert not alive(rank1)
    finally:
        if node1.poll() is None:
            node1.kill()
        node1.communicate(timeout=60)


def test_head_killed_with_sigkill_leaves_no_worker_shm_or_port(tiny_model_dir):
    """SIGKILL gives the head no chance to clean up: its workers notice the parent pipe's EOF
    and exit; the HTTP and rendezvous ports are free again and /dev/shm holds nothing of it."""
    master, shm_before = free_port(), set(os.listdir("/dev/shm"))
    head, url = start_server([tiny_model_dir, "--kv-cache-memory", "8MiB", "--max-model-len",
                              "512", "-tp", "2", "--master-port", str(master)], timeout=900)
    ranks = workers(head.pid)
    others = [p for p in children(head.pid) if p not in ranks]   # the resource tracker
    assert len(ranks) == 1
    shm_made = set(os.listdir("/dev/shm")) - shm_before
    head.kill()
    head.wait(timeout=60)
    asyncio.run(wait_until(lambda: not any(alive(p) for p in ranks + others), 60,
                           "the head's worker and helper processes to exit"))
    asyncio.run(wait_until(lambda: not shm_made & set(os.listdir("/dev/shm")), 60,
                           "the head's /dev/shm entries to go"))
    port = int(url.rsplit(":", 1)[1])
    for p in (port, master):
        with socket.socket() as s:          # nothing listens there any more
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            s.bind(("127.0.0.1", p))
