"""Mistral's Tekken tokenizer (tekken.json, the mistral_common format) as a `tokenizers` BPE, for a
model folder that ships tekken.json and no tokenizer.json. Torch-free; reads one local file.

tekken.json holds the regex that splits text into words, the byte strings of the vocabulary by
rank (tiktoken style: a word's pieces merge lowest rank first) and the special tokens. Ids:

    0 .. num_special - 1          the special tokens (<unk>, <s>, </s>, [INST], ... [IMG] ...),
                                  padded with <SPECIAL_i> up to default_num_special_tokens
    num_special + rank            vocabulary token `rank`, for rank < default_vocab_size - num_special

As a BPE, each token of rank r (longer than a byte) is the merge of every split into two tokens
of the vocabulary, merged at priority r; a word that is itself a token is taken whole
(ignore_merges), as tiktoken does."""
from __future__ import annotations

import base64
import json
import os
from typing import Any

from tokenizers import AddedToken, Regex, Tokenizer, decoders, pre_tokenizers, processors
from tokenizers.models import BPE

from minserve.config import ConfigError

MAX_TEKKEN_BYTES = 64 << 20     # the real files are ~15 MiB
# what transformers' converter names them too; tokenizer_config.json, when present, wins
SPECIAL_NAMES = {"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>", "pad_token": "<pad>"}


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's byte -> printable stand-in character table (the byte-level BPE alphabet)."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + \
        list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return {b: chr(c) for b, c in zip(bs, cs, strict=True)}


def load_tekken(path: str) -> Tokenizer:
    """tekken.json -> a Tokenizer that encodes (with add_special_tokens, <s> first, as
    mistral_common does) and decodes as Mistral's does. A malformed file is a ConfigError."""
    if os.path.getsize(path) > MAX_TEKKEN_BYTES:
        raise ConfigError(f"{path} is larger than {MAX_TEKKEN_BYTES >> 20} MiB; not a tekken.json")
    with open(path, encoding="utf-8") as f:
        data = json.load(f)
    try:
        specials, ranks, pattern = _read(data)
    except (KeyError, TypeError, ValueError) as e:
        raise ConfigError(f"{path} is not a tekken.json this version reads ({e!r}); save a "
                          "tokenizer.json beside it with transformers") from None
    num_special = len(specials)
    byte_chars = _byte_chars()
    vocab = {token: i for i, token in enumerate(specials)}
    for rank, piece in enumerate(ranks):
        vocab["".join(byte_chars[b] for b in piece)] = num_special + rank
    tok = Tokenizer(BPE(vocab, _merges(ranks, byte_chars), fuse_unk=False, ignore_merges=True))
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(pattern), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens([AddedToken(s, special=True, normalized=False) for s in specials])
    bos = SPECIAL_NAMES["bos_token"]
    if bos in vocab:
        tok.post_processor = processors.TemplateProcessing(
            single=f"{bos} $A", pair=f"{bos} $A $B", special_tokens=[(bos, vocab[bos])])
    return tok


def _read(data: dict[str, Any]) -> tuple[list[str], list[bytes], str]:
    """(special token strings by id, vocabulary byte strings by rank, the split regex)."""
    config = data["config"]
    entries = sorted(data["special_tokens"], key=lambda e: int(e["rank"]))
    if [int(e["rank"]) for e in entries] != list(range(len(entries))):
        raise ValueError("special token ranks are not 0, 1, 2, ...")
    specials = [str(e["token_str"]) for e in entries]
    num_special = int(config.get("default_num_special_tokens") or len(specials))
    specials += [f"<SPECIAL_{i}>" for i in range(len(specials), num_special)]
    vocab = sorted(data["vocab"], key=lambda e: int(e["rank"]))
    size = config.get("default_vocab_size")
    if size is not None:
        vocab = vocab[:int(size) - num_special]
    return specials, [base64.b64decode(e["token_bytes"]) for e in vocab], str(config["pattern"])


def _merges(ranks: list[bytes], byte_chars: list[str]) -> list[tuple[str, str]]:
    """Every (left, right) split of each token into two tokens, in the token's rank order (ties:
    by the pieces' ranks), spelled in the byte-level alphabet."""
    rank_of = {piece: r for r, piece in enumerate(ranks)}
    merges = []
    for piece in ranks:
        splits = [(rank_of[piece[:i]], rank_of[piece[i:]]) for i in range(1, len(piece))
                  if piece[:i] in rank_of and piece[i:] in rank_of]
        merges += sorted(splits)

    def spelled(rank: int) -> str:
        return "".join(byte_chars[b] for b in ranks[rank])

    return [(spelled(left), spelled(right)) for left, right in merges]


def _byte_chars() -> list[str]:
    """byte -> its stand-in character in the byte-level BPE alphabet (GPT-2's table)."""
    table = bytes_to_unicode()
    return [table[b] for b in range(256)]
