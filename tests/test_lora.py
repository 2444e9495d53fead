"""Multi-LoRA in the engine on tiny random models, against peft on the same adapters: logits for
whole prefill, decode, chunked prefill and a prefix hit; a mixed batch (base + three adapters,
rsLoRA, different ranks) equal to each request alone, in one forward per step; --max-loras 1 with
three adapters; prefix-cache isolation; runtime load/unload; every refusal of an adapter."""
from __future__ import annotations

import os

import pytest
import torch

from minserve.config import ConfigError, EngineConfig, LoRAConfig, LoRAModule
from minserve.engine.engine import Engine
from minserve.engine.request import EngineRequest
from minserve.lora.adapter import LoRAError
from minserve.sampling_params import SamplingParams
from tests.lora_adapters import edit_config, load_peft, make_adapter

pytest.importorskip("peft")

PROMPT = [(i * 37) % 500 + 3 for i in range(41)]
SHORT = [5, 17, 99, 3, 250]
N = 6
GREEDY = SamplingParams(temperature=0, max_tokens=N, ignore_eos=True, logprobs=0)


@pytest.fixture(scope="module")
def adapters(tmp_path_factory, tiny_model_dir):
    d = tmp_path_factory.mktemp("loras")
    return {
        "a8": make_adapter(tiny_model_dir, str(d / "a8"), r=8, seed=1),
        "rs16": make_adapter(tiny_model_dir, str(d / "rs16"), r=16, alpha=8, use_rslora=True,
                             seed=2),
        "qv4": make_adapter(tiny_model_dir, str(d / "qv4"), r=4, targets=["q_proj", "v_proj"],
                            seed=3, scale=0.6),
    }


def peft_greedy(model, prompt: list[int], n: int = N) -> tuple[list[int], list[float]]:
    seq, lps = list(prompt), []
    with torch.no_grad():
        for _ in range(n):
            logits = model(torch.tensor([seq])).logits[0, -1].float()
            tok = int(logits.argmax())
            lps.append(float(torch.log_softmax(logits, -1)[tok]))
            seq.append(tok)
    return seq[len(prompt):], lps


@pytest.fixture(scope="module")
def reference(tiny_model_dir, adapters):
    import transformers

    base = transformers.AutoModelForCausalLM.from_pretrained(tiny_model_dir,
                                                             dtype=torch.float32).eval()
    ref = {None: {tuple(p): peft_greedy(base, p) for p in (PROMPT, SHORT)}}
    for name, path in adapters.items():
        model = load_peft(tiny_model_dir, path)
        ref[name] = {tuple(p): peft_greedy(model, p) for p in (PROMPT, SHORT)}
    return ref


def make_engine(model_dir, adapters, names=("a8", "rs16", "qv4"), **kw) -> Engine:
    lora_kw = {k: kw.pop(k) for k in ("max_loras", "max_cpu_loras", "max_lora_rank") if k in kw}
    lora_kw.setdefault("max_loras", 4)
    kw.setdefault("kv_cache_memory", 4 << 20)
    modules = [LoRAModule(n, adapters[n]) for n in names]
    return Engine(EngineConfig(model=model_dir, lora=LoRAConfig(modules, **lora_kw), **kw))


def run(engine: Engine, reqs: list[tuple[str, list[int], str | None]],
        params: SamplingParams = GREEDY, on_step=None) -> dict[str, tuple[list[int], list]]:
    for rid, prompt, adapter in reqs:
        engine.add_request(EngineRequest(rid, prompt, params, adapter_name=adapter))
    out: dict[str, tuple[list[int], list]] = {rid: ([], []) for rid, _, _ in reqs}
    cached = {}
    while engine.has_unfinished_requests():
        for o in engine.step():
            out[o.request_id][0].extend(o.new_token_ids)
            out[o.request_id][1].extend(lp.logprob for lp in o.logprobs or [])
            cached[o.request_id] = o.num_cached_tokens
        if on_step is not None:
            on_step(engine)
    run.cached = cached
    return out


def assert_matches(got, want):
    assert got[0] == want[0]
    torch.testing.assert_close(torch.tensor(got[1]), torch.tensor(want[1]), atol=2e-4, rtol=0)


@pytest.mark.parametrize("adapter", ["a8", "rs16", "qv4"])
def test_prefill_and_decode_match_peft(tiny_model_dir, adapters, reference, adapter):
    engine = make_engine(tiny_model_dir, adapters)
    got = run(engine, [("r", PROMPT, adapter)])
    assert_matches(got["r"], reference[adapter][tuple(PROMPT)])
    assert got["r"][0] != reference[None][tuple(PROMPT)][0]


def test_chunked_prefill_and_prefix_hit_match_peft(tiny_model_dir, adapters, reference):
    engine = make_engine(tiny_model_dir, adapters, max_num_batched_tokens=16,
                         enable_prefix_caching=True)
    want = reference["a8"][tuple(PROMPT)]
    assert_matches(run(engine, [("chunked", PROMPT, "a8")])["chunked"], want)
    assert_matches(run(engine, [("hit", PROMPT, "a8")])["hit"], want)
    assert run.cached["hit"] >= 32


def test_prefix_cache_is_not_shared_across_adapters(tiny_model_dir, adapters, reference):
    engine = make_engine(tiny_model_dir, adapters)
    run(engine, [("first", PROMPT, "a8")])
    for rid, adapter in [("other", "rs16"), ("base", None)]:
        got = run(engine, [(rid, PROMPT, adapter)])
        assert run.cached[rid] == 0
        assert_matches(got[rid], reference[adapter][tuple(PROMPT)])
    run(engine, [("again", PROMPT, "a8")])
    assert run.cached["again"] >= 32


def test_mixed_batch_is_one_forward_and_equals_each_alone(tiny_model_dir, adapters, reference):
    engine = make_engine(tiny_model_dir, adapters)
    forwards = []
    engine.runner.model.register_forward_hook(lambda *a: forwards.append(1))
    reqs = [("base", PROMPT, None), ("a8", SHORT, "a8"), ("rs16", PROMPT, "rs16"),
            ("qv4", SHORT, "qv4"), ("a8-long", PROMPT, "a8")]
    steps = []
    got = run(engine, reqs, on_step=lambda e: steps.append(1))
    assert len(forwards) == len(steps) == N   # every step ran all five rows in one forward
    for rid, prompt, adapter in reqs:
        assert_matches(got[rid], reference[adapter][tuple(prompt)])


def test_max_loras_1_runs_one_adapter_per_step(tiny_model_dir, adapters, reference):
    engine = make_engine(tiny_model_dir, adapters, max_loras=1, max_cpu_loras=1)
    seen = []

    def on_step(e):
        seen.append({r.adapter_name for r in e.scheduler.running} - {None})

    reqs = [(f"{a}-{i}", SHORT if i else PROMPT, a) for i in range(2)
            for a in ("a8", "rs16", "qv4")] + [("base", SHORT, None)]
    got = run(engine, reqs, on_step=on_step)
    assert all(len(s) <= 1 for s in seen)
    assert {a for s in seen for a in s} == {"a8", "rs16", "qv4"}
    for rid, prompt, adapter in reqs:
        assert_matches(got[rid], reference[adapter][tuple(prompt)])


def test_runtime_load_and_unload_while_running(tiny_model_dir, adapters, reference):
    engine = make_engine(tiny_model_dir, adapters, names=())
    with pytest.raises(ValueError, match="does not exist"):
        engine.add_request(EngineRequest("x", SHORT, GREEDY, adapter_name="a8"))
    engine.add_lora("a8", adapters["a8"])
    with pytest.raises(LoRAError, match="already been loaded"):
        engine.add_lora("a8", adapters["rs16"])
    engine.add_request(EngineRequest("running", PROMPT, GREEDY, adapter_name="a8"))
    tokens = [t for o in engine.step() for t in o.new_token_ids]
    engine.remove_lora("a8")   # the running request keeps its adapter until it finishes
    with pytest.raises(ValueError, match="does not exist"):
        engine.add_request(EngineRequest("late", SHORT, GREEDY, adapter_name="a8"))
    with pytest.raises(LoRAError, match="is being unloaded"):
        engine.add_lora("a8", adapters["a8"])
    while engine.has_unfinished_requests():
        tokens += [t for o in engine.step() for t in o.new_token_ids]
    assert tokens == reference["a8"][tuple(PROMPT)][0]
    assert not engine.lora.retired and "a8" not in engine.lora.cpu
    with pytest.raises(LoRAError, match="is not loaded"):
        engine.remove_lora("a8")
    engine.add_lora("a8", adapters["a8"])   # the name is free again
    assert engine.list_loras() == {"a8": adapters["a8"]}


def test_reloading_other_weights_under_one_name_never_hits_the_old_blocks(
        tiny_model_dir, adapters, reference):
    """The prefix root is the adapter's load, not its name: unload a8, load rs16's weights as
    "a8", the same prompt computes afresh (no cached token) and gives rs16's output."""
    engine = make_engine(tiny_model_dir, adapters, names=("a8",))
    assert_matches(run(engine, [("old", PROMPT, "a8")])["old"], reference["a8"][tuple(PROMPT)])
    assert_matches(run(engine, [("hit", PROMPT, "a8")])["hit"], reference["a8"][tuple(PROMPT)])
    assert run.cached["hit"] >= 32          # the prompt's blocks are in the cache under a8
    engine.remove_lora("a8")                # nothing runs with it: the name is free at once
    engine.add_lora("a8", adapters["rs16"])
    got = run(engine, [("new", PROMPT, "a8")])
    assert run.cached["new"] == 0
    assert_matches(got["new"], reference["rs16"][tuple(PROMPT)])
    assert_matches(run(engine, [("again", PROMPT, "a8")])["again"],
                   reference["rs16"][tuple(PROMPT)])
    assert run.cached["again"] >= 32        # the new load's blocks are shared as usual


def test_host_lru_reloads_evicted_adapters(tiny_model_dir, adapters, reference):
    engine = make_engine(tiny_model_dir, adapters, max_loras=1, max_cpu_loras=1)
    assert list(engine.lora.cpu) == ["qv4"]   # the last one added; the others were evicted
    for name in ("a8", "rs16", "a8"):
        got = run(engine, [("r", SHORT, name)])
        assert_matches(got["r"], reference[name][tuple(SHORT)])
        assert list(engine.lora.cpu) == [name]


# ---- refusals --------------------------------------------------------------------------------
@pytest.fixture()
def adapter_copy(tmp_path, adapters):
    import shutil

    def copy(name="a8"):
        dst = tmp_path / f"copy-{name}"
        shutil.copytree(adapters[name], dst)
        return str(dst)
    return copy


@pytest.fixture(scope="module")
def lora_engine(tiny_model_dir, adapters):
    return make_engine(tiny_model_dir, adapters, names=())


@pytest.mark.parametrize("changes,match", [
    ({"r": 32}, r"r=32 is greater than --max-lora-rank 16"),
    ({"target_modules": ["q_proj", "c_attn"]}, r"target_modules names 'c_attn'"),
    ({"target_modules": r".*\.attn\.c_proj"}, r"matches no module"),
    ({"modules_to_save": ["lm_head"]}, r"modules_to_save"),
    ({"use_dora": True}, r"use_dora=True is not supported"),
    ({"rank_pattern": {"q_proj": 4}}, r"rank_pattern"),
    ({"bias": "all"}, r"bias='all'"),
    ({"peft_type": "IA3"}, r"peft_type 'IA3'"),
])
def test_config_refusals_name_the_field(lora_engine, adapter_copy, changes, match):
    path = adapter_copy()
    edit_config(path, **changes)
    with pytest.raises(LoRAError, match=match):
        lora_engine.add_lora("bad", path)
    assert not lora_engine.lora.has("bad")


def test_file_refusals(lora_engine, adapter_copy, tmp_path, tiny_model_factory):
    path = adapter_copy()
    os.rename(os.path.join(path, "adapter_model.safetensors"),
              os.path.join(path, "adapter_model.bin"))
    bad_json = adapter_copy("rs16")
    with open(os.path.join(bad_json, "adapter_config.json"), "w") as f:
        f.write("{not json")
    # Issue 36: one text for every unusable path (it was an oracle for what exists)
    for unusable_path in (path, str(tmp_path / "missing"), str(tmp_path), bad_json):
        with pytest.raises(LoRAError) as e:
            lora_engine.add_lora("bad", unusable_path)
        assert str(e.value) == (
            f"LoRA adapter {unusable_path!r}: not a usable PEFT LoRA adapter: give a folder "
            "holding adapter_config.json and adapter_model.safetensors (.bin pickles are never "
            "loaded) (a hub id needs --allow-lora-downloads)")
    other_base = tiny_model_factory(intermediate_size=96)
    wrong = make_adapter(other_base, str(tmp_path / "wrong"), r=8)
    with pytest.raises(LoRAError, match=r"mlp\.(gate|up|down)_proj: lora_[AB] .* does not fit"):
        lora_engine.add_lora("bad", wrong)


def test_startup_refusal_is_a_config_error(tiny_model_dir, adapter_copy):
    path = adapter_copy()
    edit_config(path, r=64)
    with pytest.raises(ConfigError, match="--max-lora-rank"):
        Engine(EngineConfig(model=tiny_model_dir, kv_cache_memory=4 << 20,
                            lora=LoRAConfig([LoRAModule("x", path)])))


@pytest.mark.parametrize("kw,match", [
    ({"max_loras": 0}, "--max-loras"), ({"max_lora_rank": 12}, "--max-lora-rank 12"),
    ({"max_loras": 2, "max_cpu_loras": 1}, "--max-cpu-loras"),
    ({"lora_dtype": "int3"}, "--lora-dtype"),
    ({"lora_modules": [LoRAModule("a", "x"), LoRAModule("a", "y")]}, "given twice"),
])
def test_lora_config_errors_name_the_flag(kw, match):
    with pytest.raises(ConfigError, match=match):
        LoRAConfig(**kw)


# Phi-3's checkpoint (and so its adapters) holds qkv_proj and gate_up_proj fused
PHI3_TARGETS = ["qkv_proj", "o_proj", "gate_up_proj", "down_proj"]


@pytest.mark.parametrize("arch,targets", [
    ("MistralForCausalLM", None), ("Qwen2ForCausalLM", None), ("Qwen3ForCausalLM", None),
    ("Phi3ForCausalLM", PHI3_TARGETS), ("Gemma3ForCausalLM", None),
    ("Gemma2ForCausalLM", ["q_proj", "v_proj", "gate_proj", "down_proj"]),
    # per-layer shapes: global layers' own head size (k = v there), KV-sharing layers without
    # k/v and with double-wide MLPs
    ("Gemma4ForCausalLM", None)])
def test_other_architectures_match_peft(tiny_model_factory, tmp_path, arch, targets):
    base = tiny_model_factory(arch)
    path = make_adapter(base, str(tmp_path / "ad"), r=8, seed=5, targets=targets)
    engine = Engine(EngineConfig(model=base, kv_cache_memory=4 << 20,
                                 lora=LoRAConfig([LoRAModule("ad", path)])))
    got = run(engine, [("r", PROMPT, "ad")])
    assert_matches(got["r"], peft_greedy(load_peft(base, path), PROMPT))


def test_llm_lora_request_per_prompt_and_for_all(tiny_model_dir, adapters, reference):
    from minserve.llm import LLM, LoRARequest

    llm = LLM(tiny_model_dir, enable_lora=True, max_loras=2, kv_cache_memory=4 << 20)
    params = SamplingParams(temperature=0, max_tokens=N, ignore_eos=True)
    a8, qv4 = LoRARequest("a8", 1, adapters["a8"]), LoRARequest("qv4", 2, adapters["qv4"])
    outs = llm.generate([PROMPT, SHORT, SHORT], params, lora_request=[a8, None, qv4])
    assert [o.outputs[0].token_ids for o in outs] == [
        reference["a8"][tuple(PROMPT)][0], reference[None][tuple(SHORT)][0],
        reference["qv4"][tuple(SHORT)][0]]
    outs = llm.generate([PROMPT, SHORT], params, lora_request=a8)
    assert [o.outputs[0].token_ids for o in outs] == [reference["a8"][tuple(p)][0]
                                                      for p in (PROMPT, SHORT)]
    with pytest.raises(ValueError, match="one per prompt"):
        llm.generate([SHORT], params, lora_request=[a8, qv4])
    with pytest.raises(TypeError, match="enable_lora"):
        LLM(tiny_model_dir, max_loras=2)


def test_scheduler_keeps_max_loras_per_step_with_a_fake_runner():
    from tests.test_scheduler import fake_token, make, new_req

    sched, runner = make(budget=24)
    sched.config.max_loras = 2
    names = ["a", "b", "c", None]
    for i in range(16):
        req = new_req(f"r{i}", [7 + i, 8, 9, 10, 11][: 2 + i % 4], max_tokens=3 + i % 3)
        req.adapter_name = names[i % 4]
        sched.add(req)
    done, steps = {}, 0
    while sched.has_unfinished_requests():
        plan = sched.schedule()
        assert len({r.adapter_name for r in plan.requests} - {None}) <= 2
        for o in sched.update(plan, runner.execute(plan) if not plan.is_empty else []):
            if o.finished:
                done[o.request_id] = o.finish_reason
        steps += 1
        assert steps < 1000
    assert len(done) == 16 and fake_token  # every request completed, none failed
    assert all(reason.value == "length" for reason in done.values())


def test_kernel_refs_equal_a_per_token_loop():
    """The references (every active adapter for every token, each token keeping its own)
    against the definition, one token at a time: out[t] += (x[t] @ A[s]^T) @ B[s]^T."""
    from minserve.kernels import lora as k

    torch.manual_seed(0)
    for slots in ([2, 2, 2, -1, 0, 2, 0], [1, 1, 1], [-1, 3, -1], [0, 1, 2, 3, -1, 1]):
        mapping = k.lora_mapping(torch.tensor(slots).numpy(), torch.device("cpu"))
        x, a, b = torch.randn(len(slots), 24), torch.randn(4, 8, 24), torch.randn(4, 40, 8)
        y = torch.empty(len(slots), 8)
        k.lora_shrink_ref(x, a, mapping, y)
        out = torch.randn(len(slots), 50)
        want = out.clone()
        k.lora_expand_ref(y, b, mapping, out[:, 5:45])
        for t, s in enumerate(slots):
            if s >= 0:
                want[t, 5:45] += (x[t] @ a[s].t()) @ b[s].t()
        torch.testing.assert_close(out, want, atol=1e-4, rtol=1e-5)


@pytest.mark.parametrize("slots", [
    [2, 2, 2, -1, 0, 2, 0], [1, 1, 1], [-1, 3, -1], [0, 1, 2, 3, -1, 1],
    [3] * 40 + [-1] * 5 + [1] * 20,                    # many tokens: contiguous runs (views)
    [i % 3 for i in range(50)] + [-1, 2]])             # many tokens: gathered runs
def test_fused_cpu_path_equals_the_references(slots):
    """lora_fused_cpu (the onehot form for few tokens, runs per adapter for more: views or
    gathered rows) against lora_shrink_ref + one lora_expand_ref per slice."""
    from minserve.kernels import lora as k

    torch.manual_seed(0)
    sizes, rank = [40, 8, 8], 8
    mapping = k.lora_mapping(torch.tensor(slots).numpy(), torch.device("cpu"))
    x = torch.randn(len(slots), 24)
    a = torch.randn(4, len(sizes) * rank, 24)
    bs = [torch.randn(4, n, rank) for n in sizes]
    out = torch.randn(len(slots), sum(sizes))
    want = out.clone()
    y = torch.empty(len(slots), len(sizes) * rank)
    k.lora_shrink_ref(x, a, mapping, y)
    col = 0
    for i, b in enumerate(bs):
        k.lora_expand_ref(y[:, i * rank:(i + 1) * rank], b, mapping, want[:, col:col + sizes[i]])
        col += sizes[i]
    k.lora_fused_cpu(x, a, [b.transpose(1, 2).contiguous() for b in bs], mapping, out)
    torch.testing.assert_close(out, want, atol=1e-4, rtol=1e-5)


def test_a_linear_adds_the_delta_of_the_mapping_it_is_given():
    """The step's LoRA mapping is an argument of the forward, not state the layer keeps: the same
    layer gives the base output without one, and each token its own adapter's delta with one."""
    import numpy as np

    from minserve.kernels.lora import lora_mapping
    from minserve.lora.layers import LoRASlots
    from minserve.models.linear import MergedColumnParallelLinear

    torch.manual_seed(0)
    cpu = torch.device("cpu")
    layer = MergedColumnParallelLinear(16, [8, 6], bias=False)
    layer.weight.data.normal_()
    slots = LoRASlots(layer, 16, num_slots=2, max_rank=4, dtype=torch.float32, device=cpu)
    ab = [(torch.randn(3, 16), torch.randn(8, 3)), (torch.randn(3, 16), torch.randn(6, 3))]
    slots.set_slot(1, ab)
    x = torch.randn(3, 16)
    base = x @ layer.weight.t()
    want = base.clone()
    for t in (0, 2):
        want[t] += torch.cat([(x[t] @ a.t()) @ b.t() for a, b in ab])
    torch.testing.assert_close(layer(x), base)
    torch.testing.assert_close(layer(x, lora_mapping(np.array([1, -1, 1]), cpu)), want)
    torch.testing.assert_close(layer(x), base)     # nothing of the last call stays behind
