"""Decoder embedding models under tensor parallelism (CPU, gloo, two processes): the vectors
/v1/embeddings answers with (Embedder, --task embed -tp 2) equal one process's, over packed
batches of several lengths; stopping leaves no rank behind; encoders and a decoder
--embedding-model beside a sharded chat model are start-up errors that say what to do."""
from __future__ import annotations

import asyncio
import os
import shutil
from types import SimpleNamespace

import numpy as np
import pytest

from minserve.config import ConfigError
from minserve.embeddings.embedder import Embedder
from tests.serving import alive, children, wait_until
from tests.tiny import make_tiny_encoder, write_st_files

LENGTHS = [5, 13, 1, 22, 8, 40]


@pytest.fixture(scope="module")
def folder(tiny_model_factory, tmp_path_factory):
    """A Qwen3-Embedding-shaped model (q/k norm, last-token pooling); one kv head, so both
    ranks hold a copy of it."""
    src = tiny_model_factory("Qwen3ForCausalLM", num_key_value_heads=1)
    dst = str(tmp_path_factory.mktemp("tp-emb") / "qwen3-emb")
    shutil.copytree(src, dst)
    write_st_files(dst, "lasttoken", normalize=True)
    return dst


def _rows(vocab_size: int) -> list[list[int]]:
    rng = np.random.default_rng(1)
    return [list(map(int, rng.integers(3, vocab_size, n))) for n in LENGTHS]


def test_sharded_decoder_embeddings_equal_one_process(folder):
    one = Embedder(folder, max_batch_tokens=30)
    two = Embedder(folder, max_batch_tokens=30, tensor_parallel_size=2)
    try:
        assert two.sharded is not None and len(children(os.getpid())) >= 1
        assert any(getattr(m, "tp_size", 1) == 2 for m in two.model.modules())   # shards
        rows = _rows(one.vocab_size)
        (a, na), (b, nb) = one.embed(rows), two.embed(rows)
        assert na == nb == sum(LENGTHS)
        np.testing.assert_allclose(np.stack(b), np.stack(a), atol=2e-5, rtol=1e-5)
        (short,), _ = two.embed([rows[0]], dimensions=8)
        np.testing.assert_allclose(short, one.embed([rows[0]], dimensions=8)[0][0], atol=2e-5)
        worker = two.sharded.workers._procs[0]
    finally:
        two.shutdown()
    assert worker.exitcode == 0 and worker.pid not in children(os.getpid())


def test_what_is_not_sharded_is_a_startup_error_that_says_what_to_do(folder, tmp_path):
    encoder, _ = make_tiny_encoder(str(tmp_path / "bert"))
    with pytest.raises(ConfigError, match="encoder.*--tensor-parallel-size 1"):
        Embedder(encoder, tensor_parallel_size=2)
    with pytest.raises(ConfigError, match="decoder model: beside a chat model"):
        Embedder(folder, beside_tensor_parallel=True)


def test_the_cli_passes_the_split_to_embed_servers_only(monkeypatch):
    from minserve.embeddings import service

    got = []
    monkeypatch.setattr(service.EmbeddingService, "lazy",
                        classmethod(lambda cls, model, **kw: got.append(kw)))
    common = dict(dtype="auto", device="auto", max_model_len=None, served_model_name=None,
                  tensor_parallel_size=2)
    service.service_from_cli(SimpleNamespace(**common, task="embed", model="m",
                                             embedding_model=None))
    service.service_from_cli(SimpleNamespace(**common, task="generate", model="c",
                                             embedding_model="e"))
    assert [(kw["tensor_parallel_size"], kw["beside_tensor_parallel"]) for kw in got] == [
        (2, False), (1, True)]


def test_embed_server_with_tp2_answers_the_one_process_vectors(folder):
    """`python -m minserve MODEL --task embed -tp 2`: /v1/embeddings through the OpenAI SDK."""
    import openai

    from tests.serving import start_server, stop_server

    texts = ["The capital of France is Paris.", "hello", "a b c d e f g h i j k l m n o p"]
    want, _ = Embedder(folder).embed(texts)
    proc, url = start_server([folder, "--task", "embed", "-tp", "2"], timeout=600)
    try:
        client = openai.OpenAI(base_url=url + "/v1", api_key="none", max_retries=0)
        got = client.embeddings.create(model=folder, input=texts)
        np.testing.assert_allclose(np.array([d.embedding for d in got.data]), np.stack(want),
                                   atol=2e-5, rtol=1e-5)
        ranks = children(proc.pid)
        assert ranks
    finally:
        code, out = stop_server(proc)
    assert code == 0, out
    # the rank is reaped before the exit; multiprocessing's resource tracker follows on EOF
    asyncio.run(wait_until(lambda: not [p for p in ranks if alive(p)], 60, "no child left"))

