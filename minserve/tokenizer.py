"""Tokenizer: a `tokenizers` tokenizer.json plus the HF side files (special tokens, chat
template, generation defaults, exact token bytes). No torch, no transformers at run time. The
streaming side (incremental detokenizer, stop strings) is detokenizer.py."""
from __future__ import annotations

import json
import os
import re
from functools import cached_property, lru_cache
from typing import Any

from tokenizers import Tokenizer as HFTokenizer

from minserve.chat import load_chat_template, render_chat_template
from minserve.config import GENERATION_SAMPLING_KEYS, ConfigError, read_json
from minserve.tekken import SPECIAL_NAMES, bytes_to_unicode, load_tekken

_BYTE_TOKEN = re.compile(r"^<0x([0-9A-Fa-f]{2})>$")


@lru_cache(maxsize=1)
@lru_cache(maxsize=1)
def _byte_decoder() -> dict[str, int]:
    """The table above, inverted: the printable stand-in char -> the raw byte."""
    return {c: b for b, c in bytes_to_unicode().items()}


def _token_content(value: Any) -> str | None:
    """tokenizer_config's bos_token & co: a string, an AddedToken dict, or null."""
    if isinstance(value, dict):
        value = value.get("content")
    return value if isinstance(value, str) else None


def _id_list(value: Any) -> list[int]:
    if isinstance(value, int):
        return [value]
    if isinstance(value, list):
        return [v for v in value if isinstance(v, int)]
    return []


def load_generation_config(folder: str) -> dict[str, Any]:
    """generation_config.json -> {"eos_token_id": [ids...]} plus whichever of
    GENERATION_SAMPLING_KEYS it sets (HF names; the caller maps max_new_tokens to max_tokens)."""
    if os.path.isfile(os.path.join(folder, "generation_config.json")):
        data = read_json(folder, "generation_config.json")
    else:  # transformers derives one from config.json then; only its eos ids matter here
        data = {"eos_token_id": read_json(folder, "config.json").get("eos_token_id")}
    out: dict[str, Any] = {"eos_token_id": _id_list(data.get("eos_token_id"))}
    for key in GENERATION_SAMPLING_KEYS:
        if data.get(key) is not None:
            out[key] = data[key]
    return out


def _decoder_kind(decoder: Any) -> str:
    """How raw token strings map to bytes: "byte_level" (GPT-2), "sentencepiece" (▁ and <0xAB>
    byte-fallback tokens) or "other" (fall back to decoding the single token)."""
    if not isinstance(decoder, dict):
        return "other"
    kinds = [decoder.get("type")]
    kinds += [d.get("type") for d in decoder.get("decoders") or [] if isinstance(d, dict)]
    if "ByteLevel" in kinds:
        return "byte_level"
    if "ByteFallback" in kinds or "Metaspace" in kinds or "Replace" in kinds:
        return "sentencepiece"
    return "other"


class Tokenizer:
    """A model's tokenizer with the special tokens, chat template and generation defaults that HF
    keeps beside tokenizer.json. decode() does no clean_up_tokenization_spaces (vLLM's
    incremental path does none either, and transformers ignores it for BPE)."""

    def __init__(self, backend: HFTokenizer, tokenizer_config: dict, *, decoder_kind: str,
                 chat_templates: dict[str, str], generation_config: dict,
                 model_config: dict | None = None) -> None:
        self.backend = backend
        self.folder: str | None = None  # set by from_folder
        self.tokenizer_config = tokenizer_config
        self.generation_config = generation_config
        self.chat_templates = chat_templates
        self.chat_template: str | None = chat_templates.get("default")
        self._decoder_kind = decoder_kind
        self._bytes_cache: dict[int, bytes] = {}
        model_config = model_config or {}

        added = backend.get_added_tokens_decoder()  # {id: AddedToken}
        self.bos_token = _token_content(tokenizer_config.get("bos_token"))
        self.eos_token = _token_content(tokenizer_config.get("eos_token"))
        self.pad_token = _token_content(tokenizer_config.get("pad_token"))
        self.unk_token = _token_content(tokenizer_config.get("unk_token"))
        # config.json's ids stand in only where tokenizer_config says nothing (an explicit null
        # means "none", as in transformers).
        bos_fallback = model_config.get("bos_token_id") \
            if "bos_token" not in tokenizer_config else None
        eos_fallback = (_id_list(model_config.get("eos_token_id")) or [None])[0] \
            if "eos_token" not in tokenizer_config else None
        self.bos_token_id = self._special_id(self.bos_token, bos_fallback)
        self.eos_token_id = self._special_id(self.eos_token, eos_fallback)
        if self.bos_token is None and self.bos_token_id is not None:
            self.bos_token = backend.id_to_token(self.bos_token_id)
        if self.eos_token is None and self.eos_token_id is not None:
            self.eos_token = backend.id_to_token(self.eos_token_id)
        self.eos_token_ids: set[int] = set(generation_config.get("eos_token_id") or [])
        if self.eos_token_id is not None:
            self.eos_token_ids.add(self.eos_token_id)
        named = (self.bos_token, self.eos_token, self.pad_token, self.unk_token)
        self.all_special_ids: set[int] = {i for i, t in added.items() if t.special}
        self.all_special_ids |= {i for t in named if t is not None
                                 and (i := backend.token_to_id(t)) is not None}
        self.added_token_contents: dict[int, str] = {i: t.content for i, t in added.items()}

        # NOTE: a post-processor in tokenizer.json decides whether bos/eos are added (as in
        # transformers 5, which then ignores add_bos_token). Without one, tokenizer_config's
        # add_bos_token/add_eos_token decide (what transformers 4's Llama tokenizer and a GGUF's
        # tokenizer.ggml.add_bos_token mean); we add those tokens ourselves.
        self._manual_specials = backend.post_processor is None
        self.add_bos_token = bool(tokenizer_config.get("add_bos_token")) and \
            self.bos_token_id is not None
        self.add_eos_token = bool(tokenizer_config.get("add_eos_token")) and \
            self.eos_token_id is not None

    @classmethod
    def from_folder(cls, folder: str, chat_template: str | None = None) -> Tokenizer:
        """Load tokenizer.json, tokenizer_config.json, chat_template.jinja, generation_config.json
        (and config.json for bos/eos ids as a last resort). `chat_template` overrides the
        model's: a file path or the template text."""
        path = os.path.join(folder, "tokenizer.json")
        tokenizer_config = read_json(folder, "tokenizer_config.json")
        if os.path.isfile(path):
            with open(path, encoding="utf-8") as f:
                text = f.read()
            backend = HFTokenizer.from_str(text)
            decoder_kind = _decoder_kind(json.loads(text).get("decoder"))
        elif os.path.isfile(os.path.join(folder, "tekken.json")):   # Mistral's own format
            backend = load_tekken(os.path.join(folder, "tekken.json"))
            decoder_kind = "byte_level"
            tokenizer_config = {**SPECIAL_NAMES, **tokenizer_config}
        else:
            raise ConfigError(
                f"{folder} has no tokenizer.json; minserve needs a fast (tokenizers) tokenizer "
                "(or Mistral's tekken.json): pass --tokenizer with the model's HF folder (a "
                "SentencePiece GGUF needs it), or save one with transformers: "
                "AutoTokenizer.from_pretrained(...).save_pretrained()")
        templates = _find_chat_templates(folder, tokenizer_config)
        if chat_template is not None:  # an explicit template replaces every named one
            templates = {"default": load_chat_template(chat_template)}
        tokenizer = cls(backend, tokenizer_config, decoder_kind=decoder_kind,
                        chat_templates=templates,
                        generation_config=load_generation_config(folder),
                        model_config=read_json(folder, "config.json"))
        tokenizer.folder = folder
        return tokenizer

    def _special_id(self, token: str | None, fallback: Any) -> int | None:
        if token is not None and (i := self.backend.token_to_id(token)) is not None:
            return i
        return fallback if isinstance(fallback, int) else None

    @property
    def vocab_size(self) -> int:
        return self.backend.get_vocab_size(with_added_tokens=True)

    def __len__(self) -> int:
        return self.vocab_size

    # ------------------------------------------------------------ encode / decode

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        if len(text) > 4096:
            # tokenizers' encode() holds the GIL throughout, encode_batch() releases it: a long
            # prompt tokenized in the server's worker thread must not freeze the event loop.
            return self.encode_batch([text], add_special_tokens)[0]
        if not self._manual_specials:
            return self.backend.encode(text, add_special_tokens=add_special_tokens).ids
        ids = self.backend.encode(text, add_special_tokens=False).ids
        return self._add_specials(ids) if add_special_tokens else ids

    def encode_batch(self, texts: list[str], add_special_tokens: bool = True) -> list[list[int]]:
        if not self._manual_specials:
            return [e.ids for e in self.backend.encode_batch(
                texts, add_special_tokens=add_special_tokens)]
        out = [e.ids for e in self.backend.encode_batch(texts, add_special_tokens=False)]
        return [self._add_specials(ids) for ids in out] if add_special_tokens else out

    def _add_specials(self, ids: list[int]) -> list[int]:
        if self.add_bos_token:
            ids = [self.bos_token_id, *ids]
        if self.add_eos_token:
            ids = [*ids, self.eos_token_id]
        return ids

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        return self.backend.decode(ids, skip_special_tokens=skip_special_tokens)

    def convert_ids_to_tokens(self, ids: list[int]) -> list[str]:
        """Raw vocabulary strings ("Ġworld", "▁world", "<0x0A>"); "" for an unknown id."""
        to_token = self.backend.id_to_token
        return [to_token(i) or "" for i in ids]

    @cached_property
    def max_token_bytes(self) -> int:
        """The longest token's byte length: a text of B UTF-8 bytes needs at least B / this many
        tokens, so a huge prompt can be refused before seconds go into tokenizing it."""
        return max(map(len, self.all_token_bytes()), default=1) or 1

    def token_bytes(self, token_id: int) -> bytes:
        """The exact bytes one token stands for (OpenAI logprobs' "bytes"): a partial UTF-8
        character stays partial here, where decode() would show U+FFFD."""
        cached = self._bytes_cache.get(token_id)
        if cached is not None:
            return cached
        token = self.backend.id_to_token(token_id)
        if token is None:
            out = b""
        elif token_id in self.added_token_contents:
            out = self.added_token_contents[token_id].encode("utf-8")
        elif self._decoder_kind == "byte_level":
            table = _byte_decoder()
            if all(c in table for c in token):
                out = bytes(table[c] for c in token)
            else:
                out = token.encode("utf-8")
        elif self._decoder_kind == "sentencepiece":
            m = _BYTE_TOKEN.match(token)
            out = bytes([int(m.group(1), 16)]) if m else token.replace("▁", " ").encode("utf-8")
        else:
            out = self.decode([token_id], skip_special_tokens=False).encode("utf-8")
        self._bytes_cache[token_id] = out
        return out

    def all_token_bytes(self) -> list[bytes]:
        """token_bytes for every id, e.g. for building a structured-output token trie."""
        return [self.token_bytes(i) for i in range(self.vocab_size)]

    # ------------------------------------------------------------ chat

    def apply_chat_template(
        self, messages: list, *, add_generation_prompt: bool = True,
        continue_final_message: bool = False, tools: list[dict] | None = None,
        chat_template: str | None = None, chat_template_kwargs: dict[str, Any] | None = None,
        images: Any = None, **template_kwargs: Any,
    ) -> str:
        """Render a conversation to the prompt text. Encode the result with
        add_special_tokens=False: templates write bos_token themselves. No template: a
        ChatTemplateError that says to pass --chat-template."""
        template = chat_template
        if template is None:
            # transformers picks the "tool_use" named template when tools are given.
            template = (self.chat_templates.get("tool_use") if tools else None) \
                or self.chat_template
        for name, value in (("pad_token", self.pad_token), ("unk_token", self.unk_token)):
            if value is not None:
                template_kwargs.setdefault(name, value)
        return render_chat_template(
            template, messages, add_generation_prompt=add_generation_prompt,
            continue_final_message=continue_final_message, tools=tools,
            bos_token=self.bos_token, eos_token=self.eos_token,
            chat_template_kwargs=chat_template_kwargs, images=images, **template_kwargs)


def _find_chat_templates(folder: str, tokenizer_config: dict) -> dict[str, str]:
    """{"default": ..., other names...}. chat_template.jinja wins over tokenizer_config.json (as
    in transformers, which now saves templates there); chat_template.json is the processor form."""
    templates: dict[str, str] = {}
    raw = tokenizer_config.get("chat_template")
    if raw is None:
        raw = read_json(folder, "chat_template.json").get("chat_template")
    if isinstance(raw, str):
        templates["default"] = raw
    elif isinstance(raw, list):  # [{"name": "default", "template": ...}, {"name": "tool_use"...}]
        for entry in raw:
            if isinstance(entry, dict) and isinstance(entry.get("template"), str):
                templates[str(entry.get("name", "default"))] = entry["template"]
    jinja_path = os.path.join(folder, "chat_template.jinja")
    if os.path.isfile(jinja_path):
        with open(jinja_path, encoding="utf-8") as f:
            templates["default"] = f.read()
    return templates
