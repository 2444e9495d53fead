"""An embedding model served alone with `--task embed` behind --api-key, through the official
openai SDK: /v1/embeddings is a /v1 route, so the key is required; /health stays open."""
from __future__ import annotations

import base64
import urllib.request

import numpy as np
import openai
import pytest

from minserve.embeddings.embedder import Embedder
from tests.serving import KEY, serving
from tests.tiny import make_tiny_encoder


def test_sdk_task_embed_with_api_key(tmp_path):
    folder, _ = make_tiny_encoder(str(tmp_path / "bert"), "bert")
    with serving(["serve", folder, "--task", "embed", "--api-key", KEY,
                  "--served-model-name", "emb"]) as url:
        with urllib.request.urlopen(url + "/health", timeout=5) as r:  # no key needed
            assert r.status == 200
        bad = openai.OpenAI(base_url=url + "/v1", api_key="wrong", max_retries=0)
        with pytest.raises(openai.AuthenticationError):
            bad.embeddings.create(model="emb", input="hi")
        with pytest.raises(openai.AuthenticationError):
            bad.models.list()
        client = openai.OpenAI(base_url=url + "/v1", api_key=KEY, max_retries=0)
        assert [m.id for m in client.models.list().data] == ["emb"]
        texts = ["Hello world", "Machine learning is fascinating", "x"]
        floats = client.embeddings.create(model="emb", input=texts, encoding_format="float")
        b64 = client.embeddings.create(model="emb", input=texts, encoding_format="base64")
        want, num_tokens = Embedder(folder).embed(texts)
        for f, b, w in zip(floats.data, b64.data, want, strict=True):
            np.testing.assert_array_equal(np.array(f.embedding, dtype=np.float32), w)
            # asked explicitly, the SDK hands back the raw string: little-endian float32
            np.testing.assert_array_equal(np.frombuffer(base64.b64decode(b.embedding), "<f4"), w)
        assert floats.usage.prompt_tokens == num_tokens
        # no chat model here: generation routes are a 400 that names the embedding model
        with pytest.raises(openai.BadRequestError, match="only the embedding model.*`emb`"):
            client.completions.create(model="emb", prompt="hi", max_tokens=2)
        with pytest.raises(openai.BadRequestError, match="only the embedding model.*`emb`"):
            client.chat.completions.create(model="other",
                                           messages=[{"role": "user", "content": "x"}])
