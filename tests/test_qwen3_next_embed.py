"""Embeddings of hybrid linear-attention models are not served: asking for one (--task embed,
--embedding-model, the Embedder) is a start-up error that says why; a chat server serving the
model answers POST /v1/embeddings naming it with a 400, not a 500."""
from __future__ import annotations

import openai
import pytest

from minserve.config import ConfigError
from minserve.embeddings.embedder import Embedder
from minserve.models.registry import lookup
from tests.serving import serving
from tests.test_qwen3_next import VARIANTS
from tests.tiny import make_tiny_model

NAMES = ("Qwen3NextForCausalLM", "Qwen3_5ForCausalLM", "Qwen3_5MoeForCausalLM",
         "Qwen3_5ForConditionalGeneration", "Qwen3_5MoeForConditionalGeneration")


@pytest.mark.parametrize("name", NAMES)
def test_the_embed_task_is_refused_saying_why(name):
    assert lookup(name, "generate").name == name
    with pytest.raises(ConfigError, match=rf"'{name}' is for generate, not embed \(a hybrid "
                                          r"linear-attention model does not pool: .*state slots"):
        lookup(name, "embed")


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    arch, overrides = VARIANTS["qwen3.5-dense"]
    return make_tiny_model(str(tmp_path_factory.mktemp("q35")), arch, **overrides)


def test_embedder_on_a_hybrid_folder_is_a_startup_error(folder):
    with pytest.raises(ConfigError, match="does not pool"):
        Embedder(folder, device="cpu")


def test_a_chat_server_answers_embeddings_with_a_400(folder):
    with serving(["serve", folder, "--served-model-name", "hybrid", "--kv-cache-memory", "4MiB",
                  "--max-model-len", "128"]) as url:
        client = openai.OpenAI(base_url=url + "/v1", api_key="x", max_retries=0)
        with pytest.raises(openai.BadRequestError, match="`hybrid` is a chat model"):
            client.embeddings.create(model="hybrid", input=["Hello world"])
        chat = client.completions.create(model="hybrid", prompt="Hello", max_tokens=3)
        assert chat.choices[0].text is not None      # it still serves completions
