"""The offline API: LLM.generate / LLM.chat over the tiny model (text, token ids, stop strings,
n > 1, logprobs, progress bar)."""
from __future__ import annotations

import pytest

from minserve import LLM, SamplingParams


@pytest.fixture(scope="module")
def llm(tiny_model_dir):
    return LLM(tiny_model_dir, kv_cache_memory=4 << 20)


def test_generate_text_and_token_prompts(llm):
    tok = llm.get_tokenizer()
    params = SamplingParams(temperature=0, max_tokens=6, ignore_eos=True)
    text_out, ids_out, dict_out = llm.generate(
        ["Hello world", tok.encode("Hello world"), {"prompt_token_ids": tok.encode("Hello world")}],
        params)
    assert text_out.prompt == "Hello world" and ids_out.prompt is None
    assert text_out.prompt_token_ids == ids_out.prompt_token_ids
    c = text_out.outputs[0]
    assert len(c.token_ids) == 6 and c.finish_reason == "length"
    assert c.token_ids == ids_out.outputs[0].token_ids == dict_out.outputs[0].token_ids
    assert c.text == tok.decode(c.token_ids)
    single = llm.generate("Hello world", params)   # one prompt, not in a list
    assert len(single) == 1 and single[0].outputs[0].token_ids == c.token_ids


def test_stop_strings_cut_the_text(llm):
    tok = llm.get_tokenizer()
    base = llm.generate("The quick brown", SamplingParams(temperature=0, max_tokens=12,
                                                         ignore_eos=True))[0].outputs[0]
    assert len(base.text) > 4
    stop = base.text[2:4]
    out = llm.generate("The quick brown", SamplingParams(temperature=0, max_tokens=12,
                                                        ignore_eos=True, stop=[stop]))[0]
    c = out.outputs[0]
    assert c.finish_reason == "stop" and c.stop_reason == stop
    assert c.text == base.text[:base.text.index(stop)]
    assert len(c.token_ids) < 12
    kept = llm.generate("The quick brown", SamplingParams(
        temperature=0, max_tokens=12, ignore_eos=True, stop=[stop],
        include_stop_str_in_output=True))[0].outputs[0]
    assert kept.text == base.text[:base.text.index(stop) + len(stop)]
    assert tok is not None and not llm.engine.has_unfinished_requests()
    assert llm.engine.stats()["kv_cache_usage"] == 0.0


def test_n_samples_and_logprobs(llm):
    out = llm.generate([[5, 6, 7, 8] * 5], SamplingParams(n=3, temperature=1.0, seed=1,
                                                          max_tokens=5, logprobs=2,
                                                          ignore_eos=True))[0]
    assert [c.index for c in out.outputs] == [0, 1, 2]
    for c in out.outputs:
        assert len(c.token_ids) == 5 and len(c.logprobs) == 5
        assert c.cumulative_logprob == pytest.approx(sum(lp.logprob for lp in c.logprobs))
        assert all(len(lp.top) == 2 for lp in c.logprobs)
    again = llm.generate([[5, 6, 7, 8] * 5], SamplingParams(n=3, temperature=1.0, seed=1,
                                                            max_tokens=5, ignore_eos=True))[0]
    assert [c.token_ids for c in again.outputs] == [c.token_ids for c in out.outputs]


def test_chat_and_per_prompt_params(llm, capsys):
    convs = [[{"role": "user", "content": "hi"}], [{"role": "user", "content": "Paris?"}]]
    outs = llm.chat(convs, [SamplingParams(temperature=0, max_tokens=2, ignore_eos=True),
                            SamplingParams(temperature=0, max_tokens=3, ignore_eos=True)],
                    use_tqdm=True)
    assert [len(o.outputs[0].token_ids) for o in outs] == [2, 3]
    assert outs[0].prompt.startswith("<|im_start|>user\nhi<|im_end|>")
    assert outs[0].prompt.endswith("<|im_start|>assistant\n")
    assert "Processed prompts: 2/2" in capsys.readouterr().err
    with pytest.raises(ValueError, match="one per prompt"):
        llm.generate(["a", "b"], [SamplingParams()])


def test_too_long_prompt_raises_and_leaves_engine_clean(llm):
    with pytest.raises(ValueError, match="maximum context length"):
        llm.generate(["ok", [1] * (llm.engine.info.max_model_len + 1)],
                     SamplingParams(max_tokens=2))
    assert not llm.engine.has_unfinished_requests()


def test_prompt_length_is_checked_where_requests_are_built(llm):
    """One length check (protocol.check_length), where every front door builds its request:
    LLM's are refused before they reach the engine (which no longer checks again)."""
    max_len = llm.engine.info.max_model_len
    with pytest.raises(ValueError, match="maximum context length"):
        llm.generate([[1] * max_len], SamplingParams())
    with pytest.raises(ValueError, match="maximum context length"):
        llm.generate([[1] * 10], SamplingParams(max_tokens=max_len))
    with pytest.raises(ValueError, match="empty"):
        llm.generate([[]], SamplingParams())
    assert not llm.engine.has_unfinished_requests()


def test_embed_with_an_embedding_model(tmp_path, llm):
    """LLM(embedding folder) is detected as an embedding LLM: embed() gives the Embedder's
    vectors for strings, token ids and dicts, with dimensions; generate() says to use embed()."""
    import numpy as np

    from minserve.embeddings.embedder import Embedder
    from tests.tiny import make_tiny_encoder

    folder, _ = make_tiny_encoder(str(tmp_path / "bert"), "bert", is_matryoshka=True)
    emb_llm = LLM(folder, dtype="float32")
    texts = ["a man eats food", "hello"]
    out = emb_llm.embed(texts)
    want, _ = Embedder(folder).embed(texts)
    assert [o.prompt for o in out] == texts
    np.testing.assert_allclose(np.array([o.outputs.embedding for o in out]), np.stack(want),
                               atol=1e-6)
    ids = out[0].prompt_token_ids
    by_ids = emb_llm.embed([ids, {"prompt_token_ids": ids}, {"prompt": texts[0]}])
    for o in by_ids:
        np.testing.assert_allclose(o.outputs.embedding, out[0].outputs.embedding, atol=1e-6)
    assert by_ids[0].prompt is None and by_ids[0].prompt_token_ids == ids
    short = emb_llm.embed("hello", dimensions=8)[0].outputs.embedding
    assert len(short) == 8 and abs(np.linalg.norm(short) - 1) < 1e-5
    with pytest.raises(ValueError, match="embedding model"):
        emb_llm.generate("hi")
    with pytest.raises(ValueError, match="needs an embedding model"):
        llm.embed("hi")
    with pytest.raises(TypeError, match="kv_cache_memory"):
        LLM(folder, kv_cache_memory=1 << 20)
    with pytest.raises(ValueError, match="contradict"):
        LLM(folder, task="embed", runner="generate")


@pytest.mark.parametrize("kwargs,word", [
    ({"temperature": -1}, "temperature"), ({"top_p": 0}, "top_p"), ({"min_p": 2}, "min_p"),
    ({"n": 0}, "n must"), ({"max_tokens": 0}, "max_tokens"),
    ({"repetition_penalty": 0}, "repetition_penalty"),
    ({"min_tokens": 5, "max_tokens": 2}, "min_tokens"), ({"min_tokens": -1}, "min_tokens"),
])
def test_sampling_params_refuse_bad_values(kwargs, word):
    with pytest.raises(ValueError, match=word):
        SamplingParams(**kwargs)
