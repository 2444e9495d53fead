"""Cross-encoders and scores: tiny random BertForSequenceClassification /
XLMRobertaForSequenceClassification against transformers (same weights, same pair tokenization),
the activation rule, pair truncation, bi-encoder cosine scores, and the real all-MiniLM-L6-v2
ranking an obviously relevant document first. transformers is the reference only."""
from __future__ import annotations

import json
import os

import numpy as np
import pytest
import torch

from minserve.config import ConfigError
from minserve.embeddings.embedder import Embedder, _longest_first
from minserve.embeddings.protocol import EmbeddingsRequestError
from minserve.embeddings.scoring import finish_scores, prepare_scores
from tests.test_embeddings import minilm  # noqa: F401 (a fixture)
from tests.tiny import WORDS, make_tiny_encoder, widen_init


def score_pairs(emb, pairs, truncate_prompt_tokens=None):
    """The service's three steps in one call: (scores, num_prompt_tokens)."""
    labels = [f"pair[{i}]" for i in range(len(pairs))]
    prepared = prepare_scores(emb, pairs, labels, truncate_prompt_tokens)
    pooled = emb.pool_token_ids(prepared.token_lists, prepared.token_type_lists)
    return finish_scores(emb, prepared, pooled), prepared.num_prompt_tokens

QUERY = "a man is eating food"
DOCS = ["a man is eating a piece of bread", "a man is riding a horse", "hello world",
        "the machine learning horse is eating bread"]


def _write_pair_tokenizer(path: str, kind: str) -> int:
    """WordPiece tokenizer.json with BERT's or XLM-R's single *and* pair templates."""
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors

    if kind == "bert":
        specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]"]
        single, pair = "[CLS] $A [SEP]", "[CLS] $A [SEP] $B:1 [SEP]:1"
        used = ["[CLS]", "[SEP]"]
    else:
        specials = ["<s>", "<pad>", "</s>", "<unk>"]
        single, pair = "<s> $A </s>", "<s> $A </s> </s> $B </s>"
        used = ["<s>", "</s>"]
    vocab = {t: i for i, t in enumerate(specials + list("abcdefghijklmnopqrstuvwxyz") + WORDS)}
    unk = [s for s in specials if "unk" in s.lower()][0]
    tok = Tokenizer(models.WordPiece(vocab, unk_token=unk))
    tok.normalizer = normalizers.BertNormalizer(lowercase=True)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok.post_processor = processors.TemplateProcessing(
        single=single, pair=pair, special_tokens=[(s, vocab[s]) for s in used])
    tok.save(path)
    return len(vocab)


def make_tiny_cross_encoder(folder: str, kind: str = "bert", **config_extra):
    """A random 2-layer cross-encoder saved with save_pretrained -> (folder, HF model)."""
    import transformers

    os.makedirs(folder, exist_ok=True)
    vocab_size = _write_pair_tokenizer(os.path.join(folder, "tokenizer.json"), kind)
    if kind == "bert":
        cfg_cls = transformers.BertConfig
        model_cls = transformers.BertForSequenceClassification
        extra = {"type_vocab_size": 2, "pad_token_id": 0, "max_position_embeddings": 64}
    else:
        cfg_cls = transformers.XLMRobertaConfig
        model_cls = transformers.XLMRobertaForSequenceClassification
        extra = {"type_vocab_size": 1, "pad_token_id": 1, "max_position_embeddings": 66}
    cfg = cfg_cls(vocab_size=vocab_size, hidden_size=64, num_hidden_layers=2,
                  num_attention_heads=4, intermediate_size=128,
                  **{"num_labels": 1, **extra, **config_extra})
    torch.manual_seed(0)
    model = widen_init(model_cls(cfg).eval())
    model.save_pretrained(folder, safe_serialization=True)
    with open(os.path.join(folder, "tokenizer_config.json"), "w") as f:
        json.dump({"model_max_length": 512}, f)
    return folder, model


def _hf_logits(folder: str, model, pairs: list[tuple[str, str]], max_length: int | None = None):
    from transformers import PreTrainedTokenizerFast

    tok = PreTrainedTokenizerFast(tokenizer_file=os.path.join(folder, "tokenizer.json"),
                                  pad_token="<pad>" if "roberta" in model.config.model_type
                                  else "[PAD]")
    # as BertTokenizerFast does (the generic class leaves segment ids out unless asked)
    segments = model.config.type_vocab_size > 1
    batch = tok([a for a, _ in pairs], [b for _, b in pairs], padding=True,
                truncation=max_length is not None, max_length=max_length, return_tensors="pt",
                return_token_type_ids=segments)
    with torch.no_grad():
        return model(**batch).logits[:, 0], batch["attention_mask"].sum(1).tolist()


@pytest.fixture(scope="module", params=["bert", "xlmr"])
def cross(request, tmp_path_factory):
    folder, ref = make_tiny_cross_encoder(str(tmp_path_factory.mktemp(request.param) / "ce"),
                                          request.param)
    return folder, ref, request.param


def test_cross_encoder_logits_match_transformers(cross):
    from tests.paged_runner import load_pooling_model

    folder, ref, kind = cross
    pairs = [(QUERY, d) for d in DOCS] + [("horse", "a man is riding a horse . " * 3)]
    want, lens = _hf_logits(folder, ref, pairs)
    # the raw model on the same ids, one padded batch (different lengths: masks are exercised)
    emb = Embedder(folder, max_padding=1.0)
    assert emb.is_cross_encoder and emb.score_activation == "sigmoid"
    encoded = emb.tokenizer.encode_pairs(pairs, None)
    assert [len(ids) for ids, _ in encoded] == lens
    if kind == "bert":   # the second text is segment 1, as BERT was trained
        ids, types = encoded[0]
        assert types[0] == 0 and types[-1] == 1 and ids[0] == 2 and ids[-1] == 3
    got = emb.pool_token_ids([ids for ids, _ in encoded], [t for _, t in encoded])[:, 0]
    torch.testing.assert_close(got, want, atol=2e-5, rtol=1e-5)
    assert want.std() > 0.1     # the pairs really differ
    model = load_pooling_model(folder)
    assert model.num_labels == 1
    scores, num_tokens = score_pairs(emb, pairs)
    np.testing.assert_allclose(scores, torch.sigmoid(want).numpy(), atol=1e-5)
    assert num_tokens == sum(lens)
    # one by one equals batched (padding never changes a pair's score)
    one = [score_pairs(emb, [p])[0][0] for p in pairs]
    np.testing.assert_allclose(one, scores, atol=1e-5)


def test_pair_truncation_matches_transformers_longest_first(cross):
    folder, ref, _ = cross
    emb = Embedder(folder)
    pairs = [("horse " * 40, "bread " * 5), ("a man", "eating food " * 30),
             ("horse " * 30, "bread " * 30)]
    with pytest.raises(EmbeddingsRequestError, match="maximum context length.*pair"):
        score_pairs(emb, pairs)
    want, lens = _hf_logits(folder, ref, pairs, max_length=20)
    scores, num_tokens = score_pairs(emb, pairs, truncate_prompt_tokens=20)
    assert num_tokens == sum(lens) == 60
    np.testing.assert_allclose(scores, torch.sigmoid(want).numpy(), atol=1e-5)
    with pytest.raises(EmbeddingsRequestError, match="no room"):
        score_pairs(emb, pairs, truncate_prompt_tokens=4)


def test_longest_first_is_the_tokenizers_rule(tmp_path):
    """Every pair of lengths against the tokenizers library's own longest_first truncation."""
    from tokenizers import Tokenizer

    path = str(tmp_path / "tokenizer.json")
    _write_pair_tokenizer(path, "bert")
    tok = Tokenizer.from_file(path)
    horse, bread = tok.token_to_id("horse"), tok.token_to_id("bread")
    for max_length in (9, 20):
        tok.enable_truncation(max_length, strategy="longest_first")
        for len_a in range(1, 24):
            for len_b in range(1, 24):
                ids = tok.encode("horse " * len_a, "bread " * len_b).ids
                want = (ids.count(horse), ids.count(bread))
                assert _longest_first(len_a, len_b, max_length - 3) == want, (len_a, len_b)


def test_activation_rule_and_refusals(tmp_path):
    from minserve.models.cross_encoder import score_activation

    assert score_activation({"num_labels": 1}) == "sigmoid"
    assert score_activation({"sbert_ce_default_activation_function":
                             "torch.nn.modules.linear.Identity"}) == "identity"
    assert score_activation({"sentence_transformers": {
        "activation_fn": "torch.nn.modules.activation.Sigmoid"}}) == "sigmoid"
    with pytest.raises(ConfigError, match="not supported"):
        score_activation({"sbert_ce_default_activation_function": "os.system"})
    # ms-marco MiniLM cross-encoders ship Identity: raw logits are their scores
    folder, ref = make_tiny_cross_encoder(
        str(tmp_path / "id"), "bert",
        sbert_ce_default_activation_function="torch.nn.modules.linear.Identity")
    emb = Embedder(folder)
    want, _ = _hf_logits(folder, ref, [(QUERY, DOCS[0])])
    assert score_pairs(emb, [(QUERY, DOCS[0])])[0][0] == pytest.approx(float(want[0]), abs=1e-5)
    with pytest.raises(EmbeddingsRequestError, match="cross-encoder"):
        emb.embed(["a man"])
    three, _ = make_tiny_cross_encoder(str(tmp_path / "nli"), "bert", num_labels=3)
    with pytest.raises(ConfigError, match="num_labels = 1"):
        Embedder(three)


def test_bi_encoder_scores_are_cosines(tmp_path):
    folder, _ = make_tiny_encoder(str(tmp_path / "bert"), "bert")
    emb = Embedder(folder)
    pairs = [(QUERY, d) for d in DOCS]
    scores, num_tokens = score_pairs(emb, pairs)
    vectors, _ = emb.embed([QUERY, *DOCS])
    q = vectors[0] / np.linalg.norm(vectors[0])
    want = [float(q @ (v / np.linalg.norm(v))) for v in vectors[1:]]
    np.testing.assert_allclose(scores, want, atol=1e-5)
    # the query is embedded once, not once per document
    assert num_tokens == sum(len(t) for t in emb.tokenize([QUERY, *DOCS]))


@pytest.mark.slow
def test_default_embedding_model_ranks_the_relevant_document_first(minilm):  # noqa: F811
    docs = ["The Eiffel Tower is in Paris, the capital of France.",
            "Photosynthesis turns sunlight, water and carbon dioxide into sugar.",
            "The stock market fell sharply on Monday.",
            "A recipe for chocolate chip cookies."]
    cases = {"Which city is the Eiffel Tower in?": 0, "How do plants make food from light?": 1,
             "How do I bake cookies?": 3, "What happened to stocks this week?": 2}
    for query, best in cases.items():
        scores, _ = score_pairs(minilm, [(query, d) for d in docs])
        assert int(np.argmax(scores)) == best, (query, scores)
        assert max(scores) > sorted(scores)[-2] + 0.1, (query, scores)


# ---------------------------------------------------------------------------------------------
# the routes: /v1/score, /score, /v1/rerank, /rerank, /v2/rerank through the ASGI app
# ---------------------------------------------------------------------------------------------

def _pooling_app(folder: str, chat_model: str | None = None, **server):
    from minserve.config import EngineConfig
    from minserve.embeddings.service import EmbeddingService
    from minserve.server import ServerConfig, create_app

    cfg = ServerConfig(served_model_names=["tiny"] if chat_model else [],
                       embedding_model_names=["rr"], **server)
    engine = None if chat_model is None else EngineConfig(model=chat_model, max_model_len=256,
                                                          kv_cache_memory=4 << 20)
    return create_app(engine, cfg, embedding=EmbeddingService.lazy(folder, served_model_name="rr"))


def _run(app, fn):
    import asyncio

    from tests.asgi import lifespan

    async def main():
        async with lifespan(app):
            await app.embedding.wait_ready(timeout=120)
            return await fn(app)
    return asyncio.run(main())


def test_rerank_and_score_routes_shapes(cross):
    import asyncio

    from tests.asgi import call

    folder, ref, _ = cross
    want = torch.sigmoid(_hf_logits(folder, ref, [(QUERY, d) for d in DOCS])[0]).tolist()
    order = sorted(range(len(DOCS)), key=lambda i: -want[i])

    async def fn(app):
        r = {}
        for path in ("/v1/rerank", "/rerank", "/v2/rerank"):
            r[path] = await call(app, "POST", path, {"model": "rr", "query": QUERY,
                                                     "documents": DOCS})
        r["top"] = await call(app, "POST", "/v1/rerank", {
            "query": QUERY, "documents": [{"text": d} for d in DOCS], "top_n": 2,
            "return_documents": False})
        r["one_to_many"] = await call(app, "POST", "/v1/score", {"text_1": QUERY, "text_2": DOCS})
        r["pairwise"] = await call(app, "POST", "/score", {"text_1": [QUERY, "horse"],
                                                          "text_2": [DOCS[0], DOCS[1]]})
        r["one"] = await call(app, "POST", "/v1/score", {"text_1": QUERY, "text_2": DOCS[2]})
        r["mismatch"] = await call(app, "POST", "/v1/score", {"text_1": ["a", "b"],
                                                              "text_2": ["a", "b", "c"]})
        r["embed"] = await call(app, "POST", "/v1/embeddings", {"input": "a man"})
        r["chat"] = await call(app, "POST", "/v1/chat/completions", {"messages": [
            {"role": "user", "content": "hi"}]})
        r["long"] = await call(app, "POST", "/v1/rerank", {"query": QUERY,
                                                           "documents": ["horse " * 80]})
        r["cut"] = await call(app, "POST", "/v1/rerank", {"query": QUERY, "truncate_prompt_tokens":
                                                          -1, "documents": ["horse " * 80]})
        r["nomodel"] = await call(app, "POST", "/v1/rerank", {"model": "x", "query": "q",
                                                              "documents": ["d"]})
        # concurrent calls coalesce into shared forwards
        rounds = app.embedding.num_rounds
        many = await asyncio.gather(*(call(app, "POST", "/v1/score", {"text_1": QUERY,
                                                                      "text_2": d})
                                      for d in DOCS * 4))
        r["rounds"] = app.embedding.num_rounds - rounds
        r["many"] = many
        return r

    r = _run(_pooling_app(folder), fn)
    for path in ("/v1/rerank", "/rerank", "/v2/rerank"):
        body = r[path].json()
        assert r[path].status == 200 and body["model"] == "rr" and body["id"].startswith("rerank-")
        assert [x["index"] for x in body["results"]] == order
        assert [x["document"]["text"] for x in body["results"]] == [DOCS[i] for i in order]
        np.testing.assert_allclose([x["relevance_score"] for x in body["results"]],
                                   [want[i] for i in order], atol=1e-5)
        assert body["usage"]["total_tokens"] > 0
    top = r["top"].json()["results"]
    assert [x["index"] for x in top] == order[:2] and "document" not in top[0]
    data = r["one_to_many"].json()
    assert data["object"] == "list" and [d["index"] for d in data["data"]] == [0, 1, 2, 3]
    assert all(d["object"] == "score" for d in data["data"])
    np.testing.assert_allclose([d["score"] for d in data["data"]], want, atol=1e-5)
    assert data["usage"]["prompt_tokens"] == data["usage"]["total_tokens"] > 0
    pair = r["pairwise"].json()["data"]
    assert len(pair) == 2 and pair[0]["score"] == pytest.approx(want[0], abs=1e-5)
    assert r["one"].json()["data"][0]["score"] == pytest.approx(want[2], abs=1e-5)
    assert r["mismatch"].status == 400 and r["mismatch"].json()["error"]["param"] == "text_2"
    assert r["embed"].status == 400 and "cross-encoder" in r["embed"].json()["error"]["message"]
    assert r["chat"].status == 400      # no chat model here
    assert r["long"].status == 400
    assert "maximum context length" in r["long"].json()["error"]["message"]
    assert r["cut"].status == 200
    assert r["nomodel"].status == 404
    assert all(m.status == 200 for m in r["many"]) and r["rounds"] < len(r["many"])
    np.testing.assert_allclose([m.json()["data"][0]["score"] for m in r["many"]], want * 4,
                               atol=1e-5)


def test_bi_encoder_rerank_next_to_chat(tiny_model_dir, tmp_path):
    """The scoring model as --embedding-model beside a chat model: both answer."""
    from tests.asgi import call

    folder, _ = make_tiny_encoder(str(tmp_path / "bert"), "bert")

    async def fn(app):
        chat = await call(app, "POST", "/v1/chat/completions", {
            "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2})
        rr = await call(app, "POST", "/v1/rerank", {"query": QUERY, "documents": DOCS})
        wrong = await call(app, "POST", "/v1/rerank", {"model": "tiny", "query": QUERY,
                                                       "documents": DOCS})
        return chat, rr, wrong

    chat, rr, wrong = _run(_pooling_app(folder, tiny_model_dir), fn)
    assert chat.status == 200 and rr.status == 200
    scores, _ = score_pairs(Embedder(folder), [(QUERY, d) for d in DOCS])
    got = {x["index"]: x["relevance_score"] for x in rr.json()["results"]}
    np.testing.assert_allclose([got[i] for i in range(len(DOCS))], scores, atol=1e-5)
    assert wrong.status == 400 and "chat model" in wrong.json()["error"]["message"]


def test_llm_score(cross):
    from minserve import LLM

    folder, ref, _ = cross
    llm = LLM(folder, task="score")
    outs = llm.score(QUERY, DOCS)
    want = torch.sigmoid(_hf_logits(folder, ref, [(QUERY, d) for d in DOCS])[0])
    np.testing.assert_allclose([o.outputs.score for o in outs], want.numpy(), atol=1e-5)
    assert outs[0].prompt_token_ids[0] in (0, 2)       # [CLS] / <s>: the pair's own tokens
    with pytest.raises(EmbeddingsRequestError, match="same length"):
        llm.score(["a", "b"], ["a", "b", "c"])
