"""Engine end to end on a tiny random Llama, checked against transformers on the same weights:
greedy tokens, batching, chunked prefill, prefix hits, preemption, aborts, stop conditions,
n > 1 block sharing, logprobs."""
from __future__ import annotations

import pytest
import torch

from minserve.config import EngineConfig
from minserve.engine.engine import Engine
from minserve.engine.request import EngineRequest, FinishReason
from minserve.sampling_params import SamplingParams

PROMPTS = [
    [5, 17, 99, 3, 250],
    list(range(40, 63)),                       # 23 tokens: crosses a block boundary
    [(i * 37) % 500 + 3 for i in range(41)],   # 41 tokens
]
MAX_TOKENS = 8
GREEDY = SamplingParams(temperature=0, max_tokens=MAX_TOKENS, ignore_eos=True)


@pytest.fixture(scope="module")
def hf_model(tiny_model_dir):
    import transformers

    return transformers.AutoModelForCausalLM.from_pretrained(
        tiny_model_dir, dtype=torch.float32).eval()


def hf_greedy(hf_model, prompt: list[int], n: int) -> tuple[list[int], list[torch.Tensor]]:
    """Step-by-step greedy with the full sequence each time; returns tokens and log-softmaxes."""
    seq, lps = list(prompt), []
    with torch.no_grad():
        for _ in range(n):
            logits = hf_model(torch.tensor([seq])).logits[0, -1].float()
            lps.append(torch.log_softmax(logits, -1))
            seq.append(int(logits.argmax()))
    return seq[len(prompt):], lps


@pytest.fixture(scope="module")
def reference(hf_model):
    return [hf_greedy(hf_model, p, MAX_TOKENS)[0] for p in PROMPTS]


def make_engine(model_dir: str, **kw) -> Engine:
    kw.setdefault("kv_cache_memory", 4 << 20)
    return Engine(EngineConfig(model=model_dir, **kw))


@pytest.fixture(scope="module")
def engine(tiny_model_dir):
    return make_engine(tiny_model_dir)


def generate(engine: Engine, prompts, params, ids=None) -> dict[str, list]:
    ids = ids or [f"q{i}" for i in range(len(prompts))]
    ps = params if isinstance(params, list) else [params] * len(prompts)
    for rid, p, sp in zip(ids, prompts, ps, strict=True):
        engine.add_request(EngineRequest(rid, p, sp))
    outs: dict[str, list] = {}   # by sample id: n > 1 fans out into rid-0, rid-1, ...
    while engine.has_unfinished_requests():
        for o in engine.step():
            outs.setdefault(o.request_id, []).append(o)
    return outs


def toks(outs) -> list[int]:
    return [t for o in outs for t in o.new_token_ids]


def test_greedy_matches_transformers_batched_and_alone(engine, reference):
    outs = generate(engine, PROMPTS, GREEDY)
    assert [toks(outs[f"q{i}"]) for i in range(3)] == reference
    for i, p in enumerate(PROMPTS):        # one at a time
        assert toks(generate(engine, [p], GREEDY)["q0"]) == reference[i]
    assert engine.stats()["kv_cache_usage"] == 0.0


def test_chunked_prefill_matches(tiny_model_dir, reference):
    eng = make_engine(tiny_model_dir, max_num_batched_tokens=16)
    planned = []
    orig = eng.scheduler.schedule

    def schedule():
        plan = orig()
        planned.append(plan.total_num_scheduled_tokens)
        return plan

    eng.scheduler.schedule = schedule
    outs = generate(eng, PROMPTS, GREEDY)
    assert [toks(outs[f"q{i}"]) for i in range(3)] == reference
    assert max(planned) <= 16 and planned[:4] == [16] * 4   # 69 prompt tokens, chunked


def test_prefix_cache_hits_give_same_output(tiny_model_dir, hf_model):
    eng = make_engine(tiny_model_dir)
    base = PROMPTS[2]
    generate(eng, [base], GREEDY)
    hits0 = eng.stats()["prefix_cache_hits"]
    prompt = base[:35] + [7, 8, 9]
    outs = generate(eng, [prompt], GREEDY)
    assert eng.stats()["prefix_cache_hits"] - hits0 == 32
    assert outs["q0"][0].num_cached_tokens == 32
    assert toks(outs["q0"]) == hf_greedy(hf_model, prompt, MAX_TOKENS)[0]


def record_preempted(eng) -> list[str]:
    """The ids of the requests the engine's scheduler preempts from now on, in order."""
    preempted: list[str] = []
    orig = eng.scheduler.schedule

    def schedule():
        plan = orig()
        preempted.extend(r.request_id for r in plan.preempted)
        return plan

    eng.scheduler.schedule = schedule
    return preempted


def test_preemption_gives_same_greedy_tokens(tiny_model_dir, hf_model):
    # Prompts of 14, 15 and 30 tokens start in 1 + 1 + 2 blocks of 16 and grow to 2 + 2 + 3:
    # a 5-block cache must preempt on the way.
    prompts = [PROMPTS[2][:14], PROMPTS[1][:15], PROMPTS[2][5:35]]
    eng = make_engine(tiny_model_dir, kv_cache_memory=5 * 8192)
    assert eng.info.num_kv_blocks == 5
    preempted = record_preempted(eng)
    outs = generate(eng, prompts, GREEDY)
    assert preempted and eng.stats()["num_preemptions"] == len(preempted)
    assert [toks(outs[f"q{i}"]) for i in range(3)] == [
        hf_greedy(hf_model, p, MAX_TOKENS)[0] for p in prompts]
    assert eng.kv_cache.num_free_blocks == 5


def test_abort_frees_blocks_at_next_step(engine):
    engine.add_request(EngineRequest("long", PROMPTS[2],
                                     SamplingParams(max_tokens=50, ignore_eos=True)))
    engine.step()
    assert engine.stats()["kv_cache_usage"] > 0
    engine.abort_request("long")
    assert engine.stats()["kv_cache_usage"] > 0        # not before the next step
    outs = engine.step()
    assert [(o.request_id, o.finish_reason) for o in outs] == [("long", FinishReason.ABORT)]
    assert engine.stats()["kv_cache_usage"] == 0.0 and not engine.has_unfinished_requests()


def test_stop_conditions(engine, reference):
    eos = min(engine.info.eos_token_ids)
    ref = reference[1]
    p = PROMPTS[1]
    outs = generate(engine, [p] * 5, [
        SamplingParams(temperature=0, max_tokens=3),
        SamplingParams(temperature=0, max_tokens=8, stop_token_ids=[ref[2]]),
        SamplingParams(temperature=0, max_tokens=8, logit_bias={eos: 100.0}),
        SamplingParams(temperature=0, max_tokens=8, logit_bias={eos: 100.0}, min_tokens=3),
        SamplingParams(temperature=0, max_tokens=4, logit_bias={eos: 100.0}, ignore_eos=True),
    ])
    assert toks(outs["q0"]) == ref[:3] and outs["q0"][-1].finish_reason == FinishReason.LENGTH
    first_stop = ref.index(ref[2])
    assert toks(outs["q1"]) == ref[:first_stop + 1]
    assert outs["q1"][-1].stop_reason == ref[2]
    assert toks(outs["q2"]) == [eos] and outs["q2"][-1].finish_reason == FinishReason.STOP
    assert len(toks(outs["q3"])) == 4 and toks(outs["q3"])[3] == eos
    assert eos not in toks(outs["q3"])[:3]
    assert toks(outs["q4"]) == [eos] * 4


def test_n_siblings_share_blocks_and_seeds(engine):
    p = PROMPTS[2]
    hits0 = engine.stats()["prefix_cache_hits"]
    params = SamplingParams(n=3, temperature=1.0, seed=5, max_tokens=6, ignore_eos=True)
    outs = generate(engine, [p], params, ids=["s"])   # the engine fans n = 3 out
    assert sorted(outs) == ["s-0", "s-1", "s-2"]
    assert engine.stats()["prefix_cache_hits"] - hits0 >= 2 * 32
    # sample i uses seed + i: the same as a lone request with that seed
    alone = generate(engine, [p], SamplingParams(temperature=1.0, seed=6, max_tokens=6,
                                                 ignore_eos=True))
    assert toks(alone["q0"]) == toks(outs["s-1"])
    assert len({tuple(toks(v)) for v in outs.values()}) > 1


def test_logprobs_match_transformers(engine, hf_model):
    p = PROMPTS[1]
    ref_toks, ref_lps = hf_greedy(hf_model, p, 4)
    outs = generate(engine, [p], SamplingParams(temperature=0, max_tokens=4, logprobs=3,
                                                prompt_logprobs=2, ignore_eos=True))
    lps = [lp for o in outs["q0"] for lp in (o.logprobs or [])]
    assert [lp.token_id for lp in lps] == ref_toks
    for lp, ref in zip(lps, ref_lps, strict=True):
        assert lp.logprob == pytest.approx(ref[lp.token_id].item(), abs=1e-4)
        assert lp.rank == 1
        assert [t for t, _ in lp.top] == ref.topk(3).indices.tolist()
    plps = outs["q0"][0].prompt_logprobs
    assert plps is not None and len(plps) == len(p) and plps[0] is None
    with torch.no_grad():
        ref_prompt = torch.log_softmax(hf_model(torch.tensor([p])).logits[0].float(), -1)
    for i in range(1, len(p)):
        assert plps[i].token_id == p[i]
        assert plps[i].logprob == pytest.approx(ref_prompt[i - 1, p[i]].item(), abs=1e-4)
        assert len(plps[i].top) == 2


GGUF_ARCH = {"LlamaForCausalLM": "llama", "MistralForCausalLM": "llama",
             "Qwen2ForCausalLM": "qwen2", "Qwen3ForCausalLM": "qwen3"}


@pytest.mark.parametrize("source", ["folder", "gguf"])
@pytest.mark.parametrize("arch", list(GGUF_ARCH))
def test_every_arch_and_source_through_the_scheduler(tiny_model_factory, tmp_path, monkeypatch,
                                                     arch, source):
    """Through the real scheduler, with chunked prefill, a prefix-cache hit and preemption in
    one run: each sampled token's logprob (a log-softmax of our logits) and top-5 equal
    transformers' on the same weights, for every architecture, from a folder and from GGUF."""
    from minserve.models.loader import resolve_model
    from tests.tiny import write_gguf

    folder = tiny_model_factory(arch)
    model = folder
    if source == "gguf":
        monkeypatch.setenv("MINSERVE_CACHE", str(tmp_path / "cache"))
        write_gguf(folder, str(tmp_path / "tiny.gguf"), GGUF_ARCH[arch])
        model = resolve_model(str(tmp_path / "tiny.gguf"))
    import transformers

    hf = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    # 30 tokens (past Mistral's window of 24), then a prompt sharing its first 16-token block.
    first = PROMPTS[2][:30]
    prompts = [first, first[:20] + [9, 8, 7, 6], PROMPTS[1][:15]]
    head_dim = 32 if arch == "Qwen3ForCausalLM" else 16       # tests/tiny.py's shapes
    block_bytes = 2 * 2 * 2 * head_dim * 16 * 4               # K+V, layers, kv heads, fp32
    eng = make_engine(model, kv_cache_memory=5 * block_bytes, max_num_batched_tokens=16)
    assert eng.info.num_kv_blocks == 5
    preempted = record_preempted(eng)
    params = SamplingParams(temperature=0, max_tokens=MAX_TOKENS, logprobs=5, ignore_eos=True)
    eng.add_request(EngineRequest("q0", prompts[0], params))
    assert eng.step() == []                     # q0's first block is cached before q1 arrives
    outs = generate(eng, prompts[1:], params, ids=["q1", "q2"])   # collects q0's outputs too
    assert preempted, "the 5-block cache should have forced a preemption"
    assert eng.stats()["prefix_cache_hits"] >= 16
    assert eng.kv_cache.num_free_blocks == 5
    for i, p in enumerate(prompts):
        ref_toks, ref_lps = hf_greedy(hf, p, MAX_TOKENS)
        lps = [lp for o in outs[f"q{i}"] for lp in (o.logprobs or [])]
        assert [lp.token_id for lp in lps] == ref_toks
        for lp, ref in zip(lps, ref_lps, strict=True):
            assert lp.logprob == pytest.approx(ref[lp.token_id].item(), abs=2e-4)
            top = ref.topk(5)
            assert [t for t, _ in lp.top] == top.indices.tolist()
            assert [v for _, v in lp.top] == pytest.approx(top.values.tolist(), abs=2e-4)


def test_step_size_defaults_cpu_and_gpu(tiny_model_dir, monkeypatch):
    """CPU: short steps (issue 22.4); GPU: vLLM's server defaults; flags win either way."""
    from types import SimpleNamespace

    from minserve.engine import builder

    eng = make_engine(tiny_model_dir)
    sc = eng.scheduler.config
    assert (sc.max_num_batched_tokens, sc.long_prefill_token_threshold,
            sc.max_chunk_attention) == builder.CPU_BATCHING == (256, 128, 48 * 1024)
    eng = make_engine(tiny_model_dir, max_num_batched_tokens=64, long_prefill_token_threshold=0,
                      max_chunk_attention=0)
    sc = eng.scheduler.config
    assert (sc.max_num_batched_tokens, sc.long_prefill_token_threshold,
            sc.max_chunk_attention) == (64, 0, 0)
    cuda = torch.device("cuda")
    for name, gib, want in [("NVIDIA H100 80GB HBM3", 80, 8192),
                            ("NVIDIA A100-SXM4-80GB", 80, 2048), ("NVIDIA L4", 24, 2048)]:
        monkeypatch.setattr(torch.cuda, "get_device_properties", lambda d, n=name, g=gib:
                            SimpleNamespace(name=n, total_memory=g << 30))
        assert builder.default_batching(cuda) == (want, 0, 0)


def test_profile_run_is_an_ordinary_step(tiny_model_dir, monkeypatch):
    """The KV-sizing run (on CUDA) is one step through execute() on a one-block cache: the paged
    attention that serves, every row sampling with top-k, top-p and logprobs."""
    from minserve import kernels

    runner, seen = make_engine(tiny_model_dir, max_num_batched_tokens=64).runner, []
    real = kernels.paged_attention
    monkeypatch.setattr(kernels, "paged_attention",
                        lambda q, k, *a, **kw: seen.append(k.shape[0]) or real(q, k, *a, **kw))
    runner._kv_cache(1)
    runner.dummy_run(64, 4)
    assert seen and set(seen) == {1}
