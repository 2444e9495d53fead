"""The official openai SDK against a real server: `python -m minserve` (granian in-process) on a
free port, tiny model. The real default model is one @slow test at the end."""
from __future__ import annotations

import asyncio
import http.client
import os
import socket
import subprocess
import sys
import urllib.request

import openai
import orjson
import pytest

from tests.serving import KEY, free_port, metric, sdk_server, serving, wait_until


server = sdk_server("--api-key", KEY, "--max-model-len", "512", "--max-num-seqs", "64")


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server + "/v1", api_key=KEY, max_retries=0)


def test_models_and_auth(client, server):
    assert [m.id for m in client.models.list().data] == ["tiny"]
    bad = openai.OpenAI(base_url=server + "/v1", api_key="wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        bad.models.list()


def test_chat_usage_and_errors(client):
    r = client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "Hi"}],
                                       max_tokens=8, temperature=0, extra_body={"ignore_eos": True})
    assert r.object == "chat.completion" and r.choices[0].message.role == "assistant"
    assert r.choices[0].finish_reason == "length"
    assert r.usage.completion_tokens == 8 and r.usage.prompt_tokens > 0
    assert r.usage.total_tokens == r.usage.prompt_tokens + 8
    assert r.usage.prompt_tokens_details is None  # vLLM: only with --enable-prompt-tokens-details
    with pytest.raises(openai.BadRequestError, match="temperature"):
        client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "x"}],
                                       temperature=-1)
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="gpt-4", messages=[{"role": "user", "content": "x"}])
    with pytest.raises(openai.BadRequestError, match="maximum context length is 512"):
        client.completions.create(model="tiny", prompt="hi", max_tokens=600)


def test_completions_batch_n_stop_logprobs(client):
    r = client.completions.create(model="tiny", prompt=["The quick", "Hello world"], n=2,
                                  max_tokens=5, temperature=0, logprobs=2,
                                  extra_body={"ignore_eos": True})
    assert [c.index for c in r.choices] == [0, 1, 2, 3]
    assert r.choices[0].text == r.choices[1].text and r.choices[2].text == r.choices[3].text
    lp = r.choices[0].logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.text_offset) == 5
    assert all(len(t) <= 3 for t in lp.top_logprobs)
    assert r.usage.completion_tokens == 20
    free = client.completions.create(model="tiny", prompt="The quick", max_tokens=16,
                                     temperature=0, extra_body={"ignore_eos": True})
    text = free.choices[0].text
    stop = text[5:8]
    cut = client.completions.create(model="tiny", prompt="The quick", max_tokens=16,
                                    temperature=0, stop=[stop], extra_body={"ignore_eos": True})
    assert cut.choices[0].text == text[:text.index(stop)]
    assert cut.choices[0].finish_reason == "stop"
    chat = client.chat.completions.create(model="tiny", messages=[{"role": "user",
                                                                   "content": "Hi"}],
                                          max_tokens=3, logprobs=True, top_logprobs=3)
    content = chat.choices[0].logprobs.content
    assert len(content) == 3 and all(len(t.top_logprobs) == 3 for t in content)
    assert all(isinstance(t.bytes, list) and t.logprob <= 0 for t in content)


def test_seed_reproducibility(client):
    def once(seed):
        return client.completions.create(model="tiny", prompt="Hello", max_tokens=12,
                                         temperature=1.0, seed=seed,
                                         extra_body={"ignore_eos": True}).choices[0].text
    a, b, c = once(42), once(42), once(43)
    assert a == b and a != c


def test_streaming_chat_with_usage(client):
    stream = client.chat.completions.create(
        model="tiny", messages=[{"role": "user", "content": "Tell me"}], max_tokens=10,
        temperature=0, stream=True, stream_options={"include_usage": True},
        extra_body={"ignore_eos": True})
    chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant"
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 10
    assert chunks[-2].choices[0].finish_reason == "length"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    full = client.chat.completions.create(
        model="tiny", messages=[{"role": "user", "content": "Tell me"}], max_tokens=10,
        temperature=0, extra_body={"ignore_eos": True})
    assert text == full.choices[0].message.content


def test_32_concurrent_streams_no_leaked_blocks(client, server):
    prompts = [f"Request number {i}: tell me" for i in range(32)]
    want = [client.completions.create(model="tiny", prompt=p, max_tokens=12, temperature=0,
                                      extra_body={"ignore_eos": True}).choices[0].text
            for p in prompts[:4]]

    async def main():
        aclient = openai.AsyncOpenAI(base_url=server + "/v1", api_key=KEY, max_retries=0)

        async def one(p):
            s = await aclient.completions.create(model="tiny", prompt=p, max_tokens=12,
                                                 temperature=0, stream=True,
                                                 extra_body={"ignore_eos": True})
            return "".join([c.choices[0].text async for c in s if c.choices])
        return await asyncio.gather(*[one(p) for p in prompts])

    got = asyncio.run(main())
    assert got[:4] == want and all(got)
    idle = ("vllm:kv_cache_usage_perc", "vllm:num_requests_running")
    asyncio.run(wait_until(lambda: [metric(server, m) for m in idle] == [0.0, 0.0], 5,
                           "no request running and no KV blocks in use"))


@pytest.mark.slow
def test_default_model_chat_end_to_end():
    env_port_args = ["--kv-cache-memory", "64MiB", "--max-model-len", "2048"]
    with serving(env_port_args, timeout=900) as url:
        c = openai.OpenAI(base_url=url + "/v1", api_key="none", max_retries=0)
        model = c.models.list().data[0].id
        r = c.chat.completions.create(model=model, max_tokens=24, temperature=0, messages=[
            {"role": "user", "content": "What is the capital of France?"}])
        assert "Paris" in r.choices[0].message.content


def test_bad_flags_exit_with_message():
    for args, word in ((["--speculative-model", "x"], "unsupported"),
                       (["--quantization", "bitsandbytes"], "invalid choice: 'bitsandbytes'"),
                       (["--distributed-executor-backend", "ray"], "(mp)")):
        p = subprocess.run([sys.executable, "-m", "minserve", *args], capture_output=True,
                           text=True, timeout=60, env={**os.environ})
        assert p.returncode == 2 and word in p.stderr


def test_client_disconnect_through_granian_aborts(server):
    """granian reports a closed socket only through receive(): the request must be aborted and
    its blocks freed, not generated to the end for nobody."""
    aborted = 'vllm:request_success_total{finished_reason="abort",model_name="tiny"}'
    before = metric(server, aborted)
    generated_before = metric(server, "vllm:request_generation_tokens_sum")
    port = int(server.rsplit(":", 1)[1])
    body = orjson.dumps({"model": "tiny", "prompt": "Hello " * 30, "max_tokens": 300,
                         "ignore_eos": True, "stream": True})
    s = socket.create_connection(("127.0.0.1", port), timeout=30)
    s.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: t\r\nContent-Type: application/json\r\n"
              b"Authorization: Bearer " + KEY.encode() + b"\r\nContent-Length: %d\r\n\r\n%s"
              % (len(body), body))
    buf = b""
    while buf.count(b"data: ") < 3:
        chunk = s.recv(65536)
        assert chunk, buf  # the server closed the connection early
        buf += chunk
    s.close()
    # the server counts the abort at once; the engine frees the blocks at its next step
    asyncio.run(wait_until(lambda: metric(server, aborted) == before + 1 and metric(
        server, "vllm:num_requests_running") == metric(server, "vllm:kv_cache_usage_perc") == 0,
        30, "the abort counted and its blocks freed"))
    assert metric(server, aborted) == before + 1
    assert metric(server, "vllm:num_requests_running") == 0
    assert metric(server, "vllm:kv_cache_usage_perc") == 0
    generated = metric(server, "vllm:request_generation_tokens_sum") - generated_before
    assert 3 <= generated < 400, generated  # stopped early, not run to max_tokens


def test_container_healthcheck_against_the_running_server(server, tiny_model_dir):
    """minserve.healthcheck, given the server's command line as PID 1's, reports it healthy;
    pointed at a port nobody serves, unhealthy (exit status 1, not a traceback)."""
    from minserve.healthcheck import check, server_argv

    port = server.rsplit(":", 1)[1]
    cmdline = b"\0".join(x.encode() for x in [sys.executable, "-m", "minserve", "serve",
                                                tiny_model_dir, "--port", port])
    assert check(server_argv(cmdline)) == 0
    assert check(["--port", str(free_port())], timeout=2) == 1


def test_https_with_ssl_flags(tiny_model_dir, tmp_path):
    """--ssl-certfile/--ssl-keyfile: the SDK talks TLS to it, the container healthcheck finds it
    over https, and plain http on the same port gets no answer."""
    import shutil

    import httpx2 as httpx  # the openai SDK's HTTP client

    from minserve.healthcheck import check

    if shutil.which("openssl") is None:
        pytest.skip("openssl is needed to make a test certificate")
    cert, key = str(tmp_path / "cert.pem"), str(tmp_path / "key.pem")
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1",
                    "-subj", "/CN=127.0.0.1", "-keyout", key, "-out", cert],
                   check=True, capture_output=True)
    args = ["serve", tiny_model_dir, "--served-model-name", "tiny", "--kv-cache-memory", "8MiB",
            "--max-model-len", "256", "--ssl-certfile", cert, "--ssl-keyfile", key]
    with serving(args, scheme="https") as url:
        client = openai.OpenAI(base_url=url + "/v1", api_key="x", max_retries=0,
                               http_client=httpx.Client(verify=False))
        out = client.completions.create(model="tiny", prompt="Hi", max_tokens=3)
        assert out.usage.completion_tokens == 3
        port = url.rsplit(":", 1)[1]
        assert check([*args, "--port", port]) == 0
        with pytest.raises((OSError, http.client.HTTPException)):   # a TLS alert, not HTTP
            urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=5)
