"""Mistral's tekken.json through `tokenizers` (minserve/tekken.py): the same ids as transformers'
own Tekken converter on a tiny tekken.json (words, digits, unicode, whitespace runs, special
tokens written in the text), decode back to the text, <s> first only with special tokens, and
the Tokenizer of a folder that has tekken.json alone."""
from __future__ import annotations

import json
import os

import pytest

from minserve.config import ConfigError
from minserve.tekken import load_tekken
from minserve.tokenizer import Tokenizer
from tests.tiny_vlm import TEKKEN_NUM_SPECIAL, make_tekken

TEXTS = ["The quick brown fox jumps over the lazy dog.", "Ünïcödé tëxt, 日本語のテキスト 🙂🚀",
         "def add(a, b):\n    return a + b\n\n\n  x", "12345 numbers 0.5 and 1,000",
         "  leading spaces\r\n\ttabs  ", "[INST]describe[IMG][IMG_BREAK][IMG_END][/INST]ok</s>",
         "CamelCaseWords and UPPER lower MiXeD", ""]


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> str:
    path = str(tmp_path_factory.mktemp("tekken"))
    make_tekken(path)
    return path


def test_same_ids_as_transformers_converter(folder):
    from transformers.integrations.mistral.tokenizer import MistralConverter

    path = os.path.join(folder, "tekken.json")
    ours, ref = load_tekken(path), MistralConverter(path).converted()
    assert ours.get_vocab() == ref.get_vocab()
    for text in TEXTS:
        ids = ours.encode(text, add_special_tokens=False).ids
        assert ids == ref.encode(text, add_special_tokens=False).ids, text
        assert ours.decode(ids, skip_special_tokens=False) == text
    assert ours.encode("hi").ids[0] == 1 and ours.encode("hi", add_special_tokens=False).ids[0] != 1


def test_folder_with_tekken_only(folder):
    tok = Tokenizer.from_folder(folder)
    assert (tok.bos_token, tok.bos_token_id, tok.eos_token, tok.eos_token_id) == ("<s>", 1,
                                                                                 "</s>", 2)
    assert tok.encode("[INST]hi[/INST]", add_special_tokens=False)[0] == 3
    assert tok.vocab_size == 400 and f"<SPECIAL_{TEKKEN_NUM_SPECIAL - 1}>" in \
        tok.backend.get_vocab()
    assert b"".join(tok.token_bytes(i) for i in tok.encode("Ünï 日本", False)) == \
        "Ünï 日本".encode()


def test_malformed_tekken_is_a_config_error(tmp_path):
    (tmp_path / "tekken.json").write_text(json.dumps({"config": {}, "vocab": []}))
    with pytest.raises(ConfigError, match="not a tekken.json"):
        Tokenizer.from_folder(str(tmp_path))
    os.remove(tmp_path / "tekken.json")
    with pytest.raises(ConfigError, match="no tokenizer.json"):
        Tokenizer.from_folder(str(tmp_path))
