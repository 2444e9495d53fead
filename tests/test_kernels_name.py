"""The repo's top-level kernels/ folder is the package minserve.kernels; it must never stand in for
an installed distribution named `kernels` (Hugging Face's, which transformers >= 5.25 and peft
import), whatever puts the repo root on sys.path: `python -m pytest`, `python -m minserve` or a
script started in the root."""
from __future__ import annotations

import importlib.metadata
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _hf_kernels_installed() -> bool:
    try:
        importlib.metadata.distribution("kernels")
    except importlib.metadata.PackageNotFoundError:
        return False
    return True


def _inside_repo(path: str) -> bool:
    return os.path.commonpath([os.path.abspath(path), ROOT]) == ROOT


def test_root_is_on_sys_path_here():
    # NOTE: the other tests only mean something when the root can shadow: pytest puts it there.
    assert any(os.path.abspath(p or os.curdir) == ROOT for p in sys.path)


def test_bare_import_never_lands_in_the_repo():
    import minserve.kernels  # noqa: F401  (our package first, so both names are live at once)

    if not _hf_kernels_installed():
        with pytest.raises(ModuleNotFoundError):
            import kernels  # noqa: F401
        return
    import kernels

    assert not _inside_repo(kernels.__file__), kernels.__file__
    assert importlib.metadata.version("kernels").split(".")[0] == kernels.__version__.split(".")[0]
    assert "minserve.kernels" in sys.modules
    assert _inside_repo(sys.modules["minserve.kernels"].__file__)


@pytest.mark.parametrize("first", ["kernels", "minserve.kernels"])
def test_fresh_process_started_in_the_root(first):
    """What `python -m minserve` or `python -c` in a checkout sees: sys.path[0] is the root."""
    other = "minserve.kernels" if first == "kernels" else "kernels"
    code = (f"import importlib, sys\n"
            f"a = importlib.import_module({first!r})\n"
            f"try:\n    b = importlib.import_module({other!r})\n"
            f"except ModuleNotFoundError:\n    b = None\n"
            f"m = sys.modules['minserve.kernels']; k = sys.modules.get('kernels')\n"
            f"print(m.__file__); print(k.__file__ if k else '-'); print(hasattr(m, 'paged_attention'))")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True,
                         timeout=300)
    assert out.returncode == 0, out.stderr
    ours, theirs, has_op = out.stdout.split("\n")[:3]
    assert _inside_repo(ours) and has_op == "True"
    if _hf_kernels_installed():
        assert theirs != "-" and not _inside_repo(theirs)
    else:
        assert theirs == "-"


def test_transformers_and_peft_models_beside_minserve_kernels():
    """Both libraries import `kernels` while they build models; minserve's ops keep working."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    from minserve import kernels as ops

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64,
                         num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1)
    model = LlamaForCausalLM(config).eval()
    peft_model = get_peft_model(model, LoraConfig(r=2, target_modules=["q_proj", "v_proj"]))
    ids = torch.tensor([[1, 2, 3, 4]])
    with torch.no_grad():
        logits = peft_model(input_ids=ids).logits
    assert logits.shape == (1, 4, 64) and torch.isfinite(logits).all()

    q = torch.randn(3, 2, 8)
    k_cache = torch.randn(4, 16, 1, 8)
    v_cache = torch.randn(4, 16, 1, 8)
    attn = ops.AttnMetadata(
        query_start_loc=torch.tensor([0, 3], dtype=torch.int32),
        seq_lens=torch.tensor([3], dtype=torch.int32),
        max_query_len=3, max_seq_len=3,
        block_table=torch.tensor([[0]], dtype=torch.int32),
        slot_mapping=torch.tensor([0, 1, 2]), query_start_loc_host=[0, 3], seq_lens_host=[3])
    out = ops.paged_attention(q, k_cache, v_cache, attn, scale=8 ** -0.5)
    assert out.shape == q.shape and torch.isfinite(out).all()
