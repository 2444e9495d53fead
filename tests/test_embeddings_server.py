"""Embeddings over HTTP: the official openai SDK against real `python -m minserve` processes (a tiny
chat model + a tiny BERT embedder in one server; a tiny embedder alone with --runner pooling), the
in-process ASGI app in embed-only mode, and the CLI's task detection."""
from __future__ import annotations

import asyncio
import json
import os

import numpy as np
import openai
import pytest

from minserve.embeddings.embedder import Embedder
from tests.serving import serving, wait_until
from tests.tiny import make_tiny_encoder


@pytest.fixture(scope="module")
def tiny_bert(tmp_path_factory) -> str:
    # is_matryoshka: `dimensions` below 64 is allowed for this one (config.json flag)
    folder, _ = make_tiny_encoder(str(tmp_path_factory.mktemp("emb") / "bert"), "bert",
                                  is_matryoshka=True)
    return folder


@pytest.fixture(scope="module")
def both(tiny_model_dir, tiny_bert):
    with serving(["serve", tiny_model_dir, "--served-model-name", "tiny",
                  "--embedding-model", tiny_bert, "--kv-cache-memory", "8MiB",
                  "--max-model-len", "256"]) as url:
        yield openai.OpenAI(base_url=url + "/v1", api_key="x", max_retries=0), url


def test_sdk_chat_and_embedding_model_in_one_server(both, tiny_bert):
    client, _ = both
    assert [m.id for m in client.models.list().data] == ["tiny", tiny_bert]
    texts = ["Hello world", "Machine learning is fascinating"]
    floats = client.embeddings.create(model=tiny_bert, input=texts, encoding_format="float")
    # without encoding_format the SDK asks for base64 and decodes it with numpy
    decoded = client.embeddings.create(model=tiny_bert, input=texts, user="u1")
    assert [d.index for d in floats.data] == [0, 1] and floats.model == tiny_bert
    want, num_tokens = Embedder(tiny_bert).embed(texts)
    for f, b, w in zip(floats.data, decoded.data, want, strict=True):
        assert len(f.embedding) == 64
        np.testing.assert_array_equal(np.array(f.embedding, dtype=np.float32), w)
        np.testing.assert_array_equal(np.array(b.embedding, dtype=np.float32), w)
    assert floats.usage.prompt_tokens == num_tokens == floats.usage.total_tokens
    short = client.embeddings.create(model=tiny_bert, input="a man", dimensions=16)
    assert len(short.data[0].embedding) == 16
    assert abs(np.linalg.norm(short.data[0].embedding) - 1) < 1e-5
    ids = client.embeddings.create(model=tiny_bert, input=[[2, 40, 41, 3], [2, 42, 3]],
                                   encoding_format="float")
    one = client.embeddings.create(model=tiny_bert, input=[2, 40, 41, 3], encoding_format="float")
    assert ids.usage.prompt_tokens == 7
    np.testing.assert_allclose(ids.data[0].embedding, one.data[0].embedding, atol=1e-6)


def test_sdk_cross_route_and_input_errors(both, tiny_bert):
    client, _ = both
    with pytest.raises(openai.BadRequestError, match="is an embedding model.*`tiny`"):
        client.chat.completions.create(model=tiny_bert,
                                       messages=[{"role": "user", "content": "hi"}])
    with pytest.raises(openai.BadRequestError, match="is an embedding model"):
        client.completions.create(model=tiny_bert, prompt="hi", max_tokens=2)
    with pytest.raises(openai.BadRequestError, match=f"`tiny` is a chat model.*`{tiny_bert}`"):
        client.embeddings.create(model="tiny", input="hi")
    with pytest.raises(openai.NotFoundError):
        client.embeddings.create(model="nope", input="hi")
    long_text = " ".join(["horse"] * 60)          # 62 tokens > 40 positions
    with pytest.raises(openai.BadRequestError, match="maximum context length is 40"):
        client.embeddings.create(model=tiny_bert, input=[long_text])
    cut = client.embeddings.create(model=tiny_bert, input=[long_text],
                                   extra_body={"truncate_prompt_tokens": -1})
    assert cut.usage.prompt_tokens == 40
    for bad in ("", [], [""]):
        with pytest.raises(openai.BadRequestError, match="empty"):
            client.embeddings.create(model=tiny_bert, input=bad)
    with pytest.raises(openai.BadRequestError, match="larger than"):
        client.embeddings.create(model=tiny_bert, input="hi", dimensions=65)
    # the chat model still answers by its own name
    out = client.completions.create(model="tiny", prompt="hi", max_tokens=2)
    assert out.usage.completion_tokens == 2


def test_chat_and_embeddings_concurrently(both, tiny_bert):
    _, url = both

    async def main():
        client = openai.AsyncOpenAI(base_url=url + "/v1", api_key="x", max_retries=0)
        chats = [client.chat.completions.create(
            model="tiny", messages=[{"role": "user", "content": f"hi {i}"}], max_tokens=8)
            for i in range(4)]
        embeds = [client.embeddings.create(model=tiny_bert, input=[f"a man is eating {i}"] * 3)
                  for i in range(12)]
        results = await asyncio.gather(*chats, *embeds)
        await client.close()
        return results

    results = asyncio.run(main())
    assert all(r.choices[0].finish_reason in ("stop", "length") for r in results[:4])
    assert all(len(r.data) == 3 and len(r.data[0].embedding) == 64 for r in results[4:])


def test_sdk_embedding_model_alone_runner_pooling(tiny_bert):
    with serving(["serve", tiny_bert, "--runner", "pooling",
                  "--served-model-name", "emb"]) as url:
        client = openai.OpenAI(base_url=url + "/v1", api_key="x", max_retries=0)
        [card] = client.models.list().data
        assert card.id == "emb" and card.model_extra["max_model_len"] == 40
        out = client.embeddings.create(model="emb", input=["Hello world"], encoding_format="float")
        assert out.model == "emb" and len(out.data[0].embedding) == 64
        with pytest.raises(openai.BadRequestError, match="only the embedding model.*`emb`"):
            client.chat.completions.create(model="emb", messages=[{"role": "user", "content": "x"}])


def test_cli_task_detection(tiny_model_dir, tiny_bert, tmp_path):
    from minserve.cli import parse_args

    assert parse_args(["serve", tiny_bert]).task == "embed"           # BertModel: auto -> embed
    assert parse_args(["serve", tiny_model_dir]).task == "generate"
    assert parse_args(["serve", "all-minilm-l6-v2"]).task == "embed"   # the short name
    assert parse_args(["serve", "--task", "embed"]).model == "all-minilm-l6-v2"
    args = parse_args(["serve", tiny_model_dir, "--embedding-model", "all-minilm-l6-v2"])
    assert (args.task, args.embedding_model) == ("generate", "all-minilm-l6-v2")
    # a causal LM with sentence-transformers files (Qwen3-Embedding's layout) embeds
    qwen = tmp_path / "qwen3-emb"
    qwen.mkdir()
    (qwen / "config.json").write_text(json.dumps({"architectures": ["Qwen3ForCausalLM"]}))
    assert parse_args([str(qwen)]).task == "generate"
    (qwen / "modules.json").write_text("[]")
    assert parse_args([str(qwen)]).task == "embed"
    for bad in (["--task", "generate", "--runner", "pooling"],
                [tiny_bert, "--embedding-model", tiny_bert]):
        with pytest.raises(SystemExit):
            parse_args(bad)


def test_asgi_embed_only_app(tiny_bert):
    """create_app(None, ..., embedding=service): readiness, /v1/models, /tokenize and chat 400."""
    from minserve.embeddings.service import EmbeddingService
    from minserve.server import ServerConfig, create_app
    from tests.asgi import call, lifespan

    service = EmbeddingService.lazy(tiny_bert, served_model_name="emb")
    app = create_app(None, ServerConfig(served_model_names=[], embedding_model_names=["emb"]),
                     embedding=service)

    async def main():
        async with lifespan(app):
            assert (await call(app, "GET", "/health")).status == 200
            models = (await call(app, "GET", "/v1/models")).json()
            r = await call(app, "POST", "/v1/embeddings", {"input": "hi", "model": "emb"})
            tok = await call(app, "POST", "/tokenize", {"prompt": "hi"})
            metrics = (await call(app, "GET", "/metrics")).body.decode()
            return models, r, tok, metrics

    models, r, tok, metrics = asyncio.run(main())
    assert [m["id"] for m in models["data"]] == ["emb"]
    assert r.status == 200 and len(r.json()["data"][0]["embedding"]) == 64
    # the embeddings request is counted as vLLM counts pooling requests
    n = r.json()["usage"]["prompt_tokens"]
    assert f'vllm:prompt_tokens_total{{model_name="emb"}} {float(n)}' in metrics
    assert 'vllm:request_success_total{finished_reason="stop",model_name="emb"} 1.0' in metrics
    assert 'vllm:e2e_request_latency_seconds_count{model_name="emb"} 1.0' in metrics
    assert tok.status == 400 and "only the embedding model" in tok.json()["error"]["message"]
    assert not service.is_ready  # shut down with the lifespan


def test_embedding_load_failure_is_unhealthy(tmp_path):
    from minserve.embeddings.service import EmbeddingService
    from minserve.server import ServerConfig, create_app
    from tests.asgi import call, lifespan

    os.makedirs(tmp_path / "broken")
    (tmp_path / "broken" / "config.json").write_text('{"architectures": ["BertModel"]}')
    service = EmbeddingService.lazy(str(tmp_path / "broken"))
    app = create_app(None, ServerConfig(served_model_names=[], embedding_model_names=["b"]),
                     embedding=service)

    async def main():
        async with lifespan(app, wait_ready=False):
            await wait_until(lambda: not service.is_healthy, 30, "the broken model to fail")
            return (await call(app, "GET", "/health")).status, \
                await call(app, "POST", "/v1/embeddings", {"input": "hi"})

    health, r = asyncio.run(main())
    assert health == 503 and r.status == 503 and "not healthy" in r.json()["error"]["message"]


def test_chat_keeps_serving_when_the_embedding_model_fails(tiny_model_dir, tmp_path):
    """Readiness is per route: a broken embedding model makes /health and /v1/embeddings 503,
    while completions on the chat model still answer."""
    from minserve.config import EngineConfig
    from minserve.embeddings.service import EmbeddingService
    from minserve.server import ServerConfig, create_app
    from tests.asgi import call, lifespan

    os.makedirs(tmp_path / "broken")
    (tmp_path / "broken" / "config.json").write_text('{"architectures": ["BertModel"]}')
    service = EmbeddingService.lazy(str(tmp_path / "broken"))
    app = create_app(EngineConfig(model=tiny_model_dir, kv_cache_memory=4 << 20,
                                  max_model_len=256),
                     ServerConfig(served_model_names=["tiny"], embedding_model_names=["b"]),
                     embedding=service)

    async def main():
        async with lifespan(app, wait_ready=False):
            await app.chat.wait_ready(timeout=120)
            await wait_until(lambda: not service.is_healthy, 30, "the broken model to fail")
            return ((await call(app, "GET", "/health")).status,
                    await call(app, "POST", "/v1/embeddings", {"input": "hi"}),
                    await call(app, "POST", "/v1/completions", {"prompt": "hi", "max_tokens": 2}))

    health, emb, comp = asyncio.run(main())
    assert health == 503 and emb.status == 503 and "not healthy" in emb.json()["error"]["message"]
    assert comp.status == 200 and comp.json()["usage"]["completion_tokens"] == 2


@pytest.mark.slow
def test_seed_guide_call_on_the_real_model():
    """The seed guide's call, verbatim, against `--task embed` (all-minilm-l6-v2, fetched once)."""
    with serving(["--task", "embed"], timeout=600) as url:
        client = openai.OpenAI(base_url=url + "/v1", api_key="none", max_retries=0)
        model = client.models.list().data[0].id
        r = client.embeddings.create(model=model,
                                     input=["Hello world", "Machine learning is fascinating"])
        vecs = np.array([d.embedding for d in r.data])
        assert vecs.shape == (2, 384)
        np.testing.assert_allclose(np.linalg.norm(vecs, axis=1), 1.0, atol=1e-5)
        floats = client.embeddings.create(model=model, input="Hello world",
                                          encoding_format="float").data[0].embedding
        np.testing.assert_allclose(floats, vecs[0], atol=1e-6)
        a, b, c = (np.array(d.embedding) for d in client.embeddings.create(model=model, input=[
            "A man is eating food.", "A man is eating a piece of bread.",
            "A man is riding a horse."]).data)
        assert a @ b > a @ c
