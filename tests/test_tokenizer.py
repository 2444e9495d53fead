"""Tokenizer side files, token bytes, the incremental detokenizer on multi-byte text, and stop
strings across chunk boundaries. Tokenizers are built in the test; transformers is the reference."""
from __future__ import annotations

import json
import os
import random

import pytest

from minserve.chat import ChatTemplateError
from minserve.config import ConfigError
from minserve.detokenizer import IncrementalDetokenizer, StopChecker
from minserve.tokenizer import Tokenizer, load_generation_config
from tests.tiny import CHATML, make_tokenizer_json

TEXTS = [
    "Hello world! The quick brown fox.",
    "Ünïcödé tëxt, café naïve résumé",
    "日本語のテキスト and 中文",
    "emoji 🙂🚀 👩‍👩‍👧 family",
    "mixed: é日🙂\n\ttabs\u00a0nbsp Ελληνικά",
]


def _write(folder: str, name: str, data: dict | str) -> None:
    with open(os.path.join(folder, name), "w", encoding="utf-8") as f:
        f.write(data if isinstance(data, str) else json.dumps(data))


@pytest.fixture(scope="module")
def bpe_dir(tmp_path_factory) -> str:
    """GPT-2-style byte-level BPE with ChatML special tokens (the tiny models' tokenizer)."""
    folder = str(tmp_path_factory.mktemp("bpe"))
    make_tokenizer_json(os.path.join(folder, "tokenizer.json"))
    _write(folder, "tokenizer_config.json", {
        "bos_token": None, "eos_token": "<|im_end|>", "pad_token": "<|endoftext|>",
        "add_bos_token": False, "chat_template": CHATML,
        "tokenizer_class": "PreTrainedTokenizerFast"})
    _write(folder, "generation_config.json", {"eos_token_id": [2, 0], "temperature": 0.6,
                                               "top_p": 0.9, "do_sample": True})
    return folder


@pytest.fixture(scope="module")
def tok(bpe_dir) -> Tokenizer:
    return Tokenizer.from_folder(bpe_dir)


@pytest.fixture(scope="module")
def sp_tok(tmp_path_factory) -> Tokenizer:
    """A sentencepiece-style tokenizer: ▁ for spaces, <0xAB> byte-fallback tokens."""
    from tokenizers import Tokenizer as HFTokenizer
    from tokenizers import decoders, models, normalizers

    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2}
    for b in range(256):
        vocab[f"<0x{b:02X}>"] = len(vocab)
    for piece in ["▁", *"abcdefghijklmnopqrstuvwxyz", "▁w", "▁wo", "▁wor", "▁worl", "▁world",
                  "ll", "he", "hell", "hello", "▁hello"]:
        vocab[piece] = len(vocab)
    merges = [("▁", "w"), ("▁w", "o"), ("▁wo", "r"), ("▁wor", "l"), ("▁worl", "d"),
              ("l", "l"), ("h", "e"), ("he", "ll"), ("hell", "o"), ("▁", "hello")]
    backend = HFTokenizer(models.BPE(vocab=vocab, merges=merges, byte_fallback=True,
                                     unk_token="<unk>"))
    backend.normalizer = normalizers.Sequence(
        [normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    backend.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(),
                                         decoders.Fuse(), decoders.Strip(" ", 1, 0)])
    backend.add_special_tokens(["<s>", "</s>"])
    folder = str(tmp_path_factory.mktemp("sp"))
    backend.save(os.path.join(folder, "tokenizer.json"))
    _write(folder, "tokenizer_config.json", {
        "bos_token": {"content": "<s>", "special": True}, "eos_token": "</s>",
        "add_bos_token": True, "tokenizer_class": "PreTrainedTokenizerFast"})
    return Tokenizer.from_folder(folder)


def _stream(tok: Tokenizer, prompt: list[int], chunks: list[list[int]], **kw) -> list[str]:
    detok = IncrementalDetokenizer(tok, prompt, **kw)
    deltas = [detok.push(c) for c in chunks]
    deltas.append(detok.flush())
    return deltas


# ---------------------------------------------------------------- side files


def test_special_tokens_and_generation_config(tok, bpe_dir):
    assert tok.eos_token == "<|im_end|>" and tok.eos_token_id == 2
    assert tok.bos_token is None and tok.bos_token_id is None
    assert tok.eos_token_ids == {0, 2}
    assert {0, 1, 2} <= tok.all_special_ids
    assert tok.vocab_size == 400 and tok.chat_template == CHATML
    cfg = load_generation_config(bpe_dir)
    assert cfg == {"eos_token_id": [2, 0], "temperature": 0.6, "top_p": 0.9}
    assert load_generation_config("/nonexistent") == {"eos_token_id": []}


def test_generation_config_falls_back_to_config_json(tmp_path):
    folder = str(tmp_path)
    make_tokenizer_json(os.path.join(folder, "tokenizer.json"))
    _write(folder, "config.json", {"bos_token_id": 0, "eos_token_id": [2, 1]})
    t = Tokenizer.from_folder(folder)  # no tokenizer_config.json either
    assert load_generation_config(folder) == {"eos_token_id": [2, 1]}
    assert t.eos_token_id == 2 and t.eos_token == "<|im_end|>" and t.eos_token_ids == {1, 2}
    assert t.bos_token_id == 0 and t.bos_token == "<|endoftext|>"
    assert t.chat_template is None
    _write(folder, "tokenizer_config.json", {"bos_token": None, "eos_token": "<|im_end|>"})
    t = Tokenizer.from_folder(folder)  # an explicit null bos stays none
    assert t.bos_token is None and t.bos_token_id is None and t.eos_token_ids == {1, 2}


def test_matches_transformers_encode_decode(tok, bpe_dir, sp_tok):
    transformers = pytest.importorskip("transformers")
    ref = transformers.AutoTokenizer.from_pretrained(bpe_dir)
    for text in [*TEXTS, "<|im_start|>user\nhi<|im_end|>"]:
        ids = tok.encode(text)
        assert ids == ref.encode(text)
        assert tok.decode(ids) == ref.decode(ids, skip_special_tokens=True)
        assert tok.decode(ids, False) == ref.decode(ids, skip_special_tokens=False)
    # add_bos_token from tokenizer_config is honoured like transformers does.
    assert sp_tok.encode("hello world")[0] == sp_tok.bos_token_id == 1
    assert sp_tok.encode("hello world", add_special_tokens=False)[0] != 1


def test_add_bos_token(tmp_path):
    """A post-processor in tokenizer.json decides (as transformers 5 does); without one,
    tokenizer_config's add_bos_token does (a GGUF's add_bos_token, transformers 4's Llama)."""
    transformers = pytest.importorskip("transformers")
    from tokenizers import Tokenizer as HFTokenizer
    from tokenizers import processors

    folder = str(tmp_path)
    path = os.path.join(folder, "tokenizer.json")
    make_tokenizer_json(path)
    _write(folder, "tokenizer_config.json", {
        "bos_token": "<|endoftext|>", "eos_token": "<|im_end|>", "add_bos_token": True,
        "tokenizer_class": "PreTrainedTokenizerFast"})
    ours = Tokenizer.from_folder(folder)
    plain = HFTokenizer.from_file(path)
    for text in TEXTS:
        assert ours.encode(text) == [0, *plain.encode(text).ids]
        assert ours.encode(text, add_special_tokens=False) == plain.encode(text).ids

    plain.post_processor = processors.TemplateProcessing(
        single="<|im_start|> $A", special_tokens=[("<|im_start|>", 1)])
    plain.save(path)
    _write(folder, "tokenizer_config.json", {
        "bos_token": "<|im_start|>", "add_bos_token": False,
        "tokenizer_class": "PreTrainedTokenizerFast"})
    ours = Tokenizer.from_folder(folder)
    ref = transformers.AutoTokenizer.from_pretrained(folder)
    for text in TEXTS:
        assert ours.encode(text) == ref.encode(text) and ours.encode(text)[0] == 1
        assert ours.encode(text, add_special_tokens=False) == \
            ref.encode(text, add_special_tokens=False)


def test_chat_template_sources(tmp_path, bpe_dir):
    folder = str(tmp_path)
    make_tokenizer_json(os.path.join(folder, "tokenizer.json"))
    named = [{"name": "default", "template": "D{{ messages[0]['content'] }}"},
             {"name": "tool_use", "template": "T{{ tools | length }}"}]
    _write(folder, "tokenizer_config.json", {"eos_token": "<|im_end|>", "chat_template": named})
    t = Tokenizer.from_folder(folder)
    msgs = [{"role": "user", "content": "x"}]
    assert t.apply_chat_template(msgs) == "Dx"
    assert t.apply_chat_template(msgs, tools=[{"type": "function"}]) == "T1"
    _write(folder, "chat_template.jinja", "J{{ messages | length }}")
    assert Tokenizer.from_folder(folder).apply_chat_template(msgs) == "J1"
    # --chat-template: a path or the text itself.
    _write(folder, "mine.jinja", "P{{ eos_token }}")
    assert Tokenizer.from_folder(folder, os.path.join(folder, "mine.jinja")) \
        .apply_chat_template(msgs) == "P<|im_end|>"
    assert Tokenizer.from_folder(folder, "I{{ add_generation_prompt }}") \
        .apply_chat_template(msgs, tools=[{"type": "function"}]) == "ITrue"  # not "tool_use"
    with pytest.raises(ChatTemplateError, match="neither an existing file"):
        Tokenizer.from_folder(folder, "no/such/file.jinja")
    os.remove(os.path.join(folder, "chat_template.jinja"))
    _write(folder, "tokenizer_config.json", {"eos_token": "<|im_end|>"})
    with pytest.raises(ChatTemplateError, match="--chat-template"):
        Tokenizer.from_folder(folder).apply_chat_template(msgs)


def test_missing_tokenizer_json(tmp_path):
    with pytest.raises(ConfigError, match="tokenizer.json"):
        Tokenizer.from_folder(str(tmp_path))


# ---------------------------------------------------------------- tokens and bytes


def test_token_bytes_byte_level(tok):
    for text in TEXTS:
        ids = tok.encode(text)
        assert b"".join(tok.token_bytes(i) for i in ids) == text.encode("utf-8")
    split = [i for i in tok.encode("🙂") if len(tok.token_bytes(i)) < 4]
    assert split, "the emoji should span several tokens for this test to mean something"
    assert tok.token_bytes(tok.eos_token_id) == b"<|im_end|>"
    table = tok.all_token_bytes()
    assert len(table) == tok.vocab_size and len(set(table)) == tok.vocab_size
    ids = tok.encode(" world")
    assert tok.convert_ids_to_tokens(ids)[0].startswith("Ġ")
    assert tok.token_bytes(ids[0]).startswith(b" ")


def test_token_bytes_sentencepiece(sp_tok):
    ids = sp_tok.encode("hello world 日", add_special_tokens=False)
    tokens = sp_tok.convert_ids_to_tokens(ids)
    assert tokens[:2] == ["▁hello", "▁world"] and "<0xE6>" in tokens
    assert b"".join(sp_tok.token_bytes(i) for i in ids) == " hello world 日".encode()
    assert sp_tok.token_bytes(sp_tok.backend.token_to_id("<0xE6>")) == b"\xe6"
    assert sp_tok.decode(ids) == "hello world 日"


# ---------------------------------------------------------------- incremental detokenization


@pytest.mark.parametrize("text", TEXTS)
def test_detok_every_split_matches_full_decode(tok, text):
    prompt = tok.encode("<|im_start|>assistant\n")
    ids = tok.encode(text)
    full = tok.decode(ids)
    assert full == text
    one_by_one = _stream(tok, prompt, [[i] for i in ids])
    assert "".join(one_by_one) == full
    assert all("\ufffd" not in d for d in one_by_one)
    for k in range(len(ids) + 1):
        deltas = _stream(tok, prompt, [ids[:k], ids[k:]])
        assert "".join(deltas) == full and all("\ufffd" not in d for d in deltas)


def test_detok_emits_complete_chars_early(tok):
    ids = tok.encode(" 日本語")
    deltas = _stream(tok, [], [[i] for i in ids])
    # Complete characters come out as soon as their last byte arrives, not at the end.
    assert sum(1 for d in deltas if d) >= 2, deltas


def test_detok_special_tokens(tok):
    ids = tok.encode("<|im_start|>user\nhé 🙂<|im_end|>")
    for skip in (True, False):
        for spaces in (True, False):
            deltas = _stream(tok, [], [[i] for i in ids], skip_special_tokens=skip,
                             spaces_between_special_tokens=spaces)
            assert "".join(deltas) == tok.decode(ids, skip_special_tokens=skip)
    assert "".join(_stream(tok, [], [[i] for i in ids])) == "user\nhé 🙂"
    kept = "".join(_stream(tok, [], [[i] for i in ids], skip_special_tokens=False))
    assert kept == "<|im_start|>user\nhé 🙂<|im_end|>"


def test_detok_random_ids_match_full_decode(tok):
    rng = random.Random(0)
    for _ in range(30):
        ids = [rng.randrange(3, tok.vocab_size) for _ in range(rng.randrange(1, 40))]
        deltas = _stream(tok, tok.encode("Hi"), [[i] for i in ids])
        assert "".join(deltas) == tok.decode(ids)


def test_detok_prompt_ending_mid_character(tok):
    ids = tok.encode("ab 🙂🚀 cd")
    for k in range(1, len(ids)):
        deltas = _stream(tok, ids[:k], [[i] for i in ids[k:]])
        assert "".join(deltas) == tok.decode(ids[k:])


def test_detok_sentencepiece_keeps_leading_space(sp_tok):
    prompt = sp_tok.encode("hello")
    out = sp_tok.encode("world 日本", add_special_tokens=False)  # "▁world▁<0xE6>..."
    deltas = _stream(sp_tok, prompt, [[i] for i in out])
    full = sp_tok.decode(prompt + out)
    assert "".join(deltas) == full[len(sp_tok.decode(prompt)):] == " world 日本"
    assert all("\ufffd" not in d for d in deltas)


def test_detok_windows_stay_small(tok):
    """Each token decodes a few ids, never the whole sequence (that would be quadratic)."""
    detok = IncrementalDetokenizer(tok, tok.encode("Hi"))
    sizes: list[int] = []
    decode = detok._decode
    detok._decode = lambda ids, **kw: (sizes.append(len(ids)), decode(ids, **kw))[1]
    ids = tok.encode(" ".join(TEXTS) * 20)
    assert "".join(detok.push([i]) for i in ids) == tok.decode(ids)
    assert max(sizes) <= 12 and len(sizes) <= 2 * len(ids) + 2


# ---------------------------------------------------------------- stop strings


def _run_stop(chunks: list[str], stop: list[str], include: bool = False):
    checker = StopChecker(stop, include_stop_str_in_output=include)
    emitted, hit = [], None
    for c in chunks:
        text, h = checker.push(c)
        emitted.append(text)
        if h is not None:
            hit = h
            break
    if hit is None:
        emitted.append(checker.flush())
    return emitted, hit


def test_stop_across_chunks_with_hold_back():
    checker = StopChecker(["STOP"])
    assert checker.push("Hello wo") == ("Hello wo", None)
    assert checker.push("rld! ST") == ("rld! ", None)  # "ST" could start STOP: held
    assert checker.push("OP here") == ("", "STOP")
    assert checker.push("more") == ("", None) and checker.flush() == ""
    emitted, hit = _run_stop(["Hello wo", "rld! ST", "OP here"], ["STOP"], include=True)
    assert "".join(emitted) == "Hello world! STOP" and hit == "STOP"


def test_stop_held_tail_released():
    checker = StopChecker(["STOP"])
    assert checker.push("abc S") == ("abc ", None)
    assert checker.push("T") == ("", None)
    assert checker.push("ART") == ("START", None)
    assert checker.push("x ST") == ("x ", None)
    assert checker.flush() == "ST"


def test_stop_earliest_wins_and_no_stops():
    emitted, hit = _run_stop(["one two three"], ["three", "two"])
    assert "".join(emitted) == "one " and hit == "two"
    assert StopChecker([]).push("anything") == ("anything", None)
    assert StopChecker("\n").push("a\nb") == ("a", "\n")


@pytest.mark.parametrize("include", [False, True])
@pytest.mark.parametrize("stops,alphabet", [
    (["</s>", "ab", "\n\n", "日本"], ["a", "b", "<", "/", "s", ">", "\n", "x", "日", "本", " "]),
    # self-overlapping stop strings: the partial-match automaton must fall back correctly
    (["aab", "abac", "aaaa", "abab"], ["a", "b", "c", "x"]),
])
def test_stop_every_split_equals_whole_text(include, stops, alphabet):
    rng = random.Random(1)
    for _ in range(400):
        text = "".join(rng.choice(alphabet) for _ in range(rng.randrange(0, 25)))
        found = [(text.find(s), -len(s), s) for s in stops if s in text]
        if found:
            at, _, s = min(found)
            expected, expected_hit = text[:at + (len(s) if include else 0)], s
        else:
            expected, expected_hit = text, None
        cuts = sorted(rng.sample(range(len(text) + 1), min(3, len(text) + 1)))
        chunks = [text[i:j] for i, j in zip([0, *cuts], [*cuts, len(text)], strict=True)]
        emitted, hit = _run_stop(chunks, stops, include)
        assert ("".join(emitted), hit) == (expected, expected_hit), (text, chunks)


def test_long_stop_string_is_linear():
    """A 100k-character stop string (a request may carry one): hold-back stays right and cheap
    (the set of all its prefixes would need about 5 GB)."""
    stop = "x" * 99_999 + "y"
    checker = StopChecker([stop])
    assert checker.push("ab" + "x" * 50_000) == ("ab", None)   # all x's may start the stop
    assert checker.push("x" * 49_999) == ("", None)
    assert checker.push("xz") == ("x" * 100_000 + "z", None)  # 100,001 x's then z: released
    assert checker.push("x" * 99_999 + "y!") == ("", stop)


@pytest.mark.parametrize("which", ["tok", "sp_tok"])
def test_long_text_encoding_and_the_prompt_length_bound(which, request):
    """Texts over 4096 characters go through encode_batch (it releases the GIL): same ids. And
    no text tokenizes to fewer than len(utf8) / max_token_bytes tokens, the bound that lets the
    server refuse a huge prompt before tokenizing it."""
    t = request.getfixturevalue(which)
    rng = random.Random(0)
    words = ["hello", "world", "日本", "é", " ", "  ", "\n", "xyz", "<s>", "ab"]
    for n in (10, 900, 3000):
        text = "".join(rng.choice(words) for _ in range(n))
        for specials in (True, False):
            ids = t.encode(text, add_special_tokens=specials)
            if t._manual_specials:   # bos/eos added by us (tokenizer_config's add_bos_token)
                want = t.backend.encode(text, add_special_tokens=False).ids
                want = t._add_specials(want) if specials else want
            else:
                want = t.backend.encode(text, add_special_tokens=specials).ids
            assert ids == want
            assert len(ids) >= len(text.encode()) / t.max_token_bytes
    assert t.max_token_bytes == max(len(t.token_bytes(i)) for i in range(t.vocab_size))


# ---------------------------------------------------------------- Mistral's Tekken vocabulary

# tekken.json's pre-tokenizer pattern (Mistral Small 3.x, Mistral NeMo)
TEKKEN_PATTERN = (r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+"
                  r"|[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*"
                  r"|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+")


@pytest.fixture(scope="module")
def tekken_dir(tmp_path_factory) -> str:
    """A Mistral 3 folder's tokenizer.json as transformers converts a tekken.json (byte-level
    BPE ranks after the control tokens, the Split + ByteLevel pre-tokenizer, ignore_merges)."""
    import base64

    from transformers.integrations.mistral.tokenizer import MistralConverter

    ranks = [bytes([b]) for b in range(256)]
    for word in ("he", "ll", "hell", "hello", " w", " wo", " wor", " world", "\xc3".encode()):
        if word not in ranks:
            ranks.append(word if isinstance(word, bytes) else word.encode())
    specials = ["<unk>", "<s>", "</s>", "[INST]", "[/INST]"]
    tekken = {"config": {"pattern": TEKKEN_PATTERN, "num_vocab_tokens": len(ranks) + 10,
                         "default_vocab_size": len(ranks) + 10, "default_num_special_tokens": 10},
              "vocab": [{"rank": i, "token_bytes": base64.b64encode(b).decode()}
                        for i, b in enumerate(ranks)],
              "special_tokens": [{"rank": i, "token_str": s, "is_control": True}
                                 for i, s in enumerate(specials)]}
    folder = str(tmp_path_factory.mktemp("tekken"))
    _write(folder, "tekken.json", tekken)
    MistralConverter(os.path.join(folder, "tekken.json")).converted().save(
        os.path.join(folder, "tokenizer.json"))
    os.remove(os.path.join(folder, "tekken.json"))
    _write(folder, "tokenizer_config.json", {
        "bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>", "add_bos_token": True,
        "chat_template": "{{ bos_token }}{% for m in messages %}[INST]{{ m['content'] }}[/INST]"
                         "{% endfor %}",
        "tokenizer_class": "PreTrainedTokenizerFast"})
    return folder


def test_tekken_tokenizer_json(tekken_dir):
    """Encodes as transformers does (its post-processor adds no bos: the chat template does),
    decodes, streams and gives each token's bytes; the control tokens are one id each."""
    transformers = pytest.importorskip("transformers")
    tok = Tokenizer.from_folder(tekken_dir)
    ref = transformers.AutoTokenizer.from_pretrained(tekken_dir)
    assert (tok.bos_token_id, tok.eos_token_id) == (1, 2)
    for text in ["hello world", *TEXTS]:
        ids = tok.encode(text)
        assert ids == ref.encode(text)
        assert tok.decode(ids) == text == ref.decode(ids)
        assert b"".join(tok.token_bytes(i) for i in ids) == text.encode()
        assert "".join(_stream(tok, [1], [[i] for i in ids])) == text
    assert tok.encode("hello world") == [10 + 259, 10 + 263]     # tekken's ranks after 10
    prompt = tok.apply_chat_template([{"role": "user", "content": "hello"}])
    assert tok.encode(prompt, add_special_tokens=False) == [1, 3, 10 + 259, 4]  # <s>[INST]..
