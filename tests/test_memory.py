"""Memory bounds (issue 19.8): the CPU KV cache is sized for what the configuration can use and
committed lazily; caches keyed by request content stay at their caps."""
from __future__ import annotations

import re
import sys

import pytest
import torch

from minserve.config import EngineConfig
from minserve.engine import runner, state_cache
from minserve.engine.engine import Engine


def resident_mib() -> float:
    with open("/proc/self/status") as f:
        return int(re.search(r"VmRSS:\s+(\d+)", f.read()).group(1)) / 1024


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self/status")
def test_lazy_zeros_commits_only_written_pages():
    before = resident_mib()
    t = state_cache.lazy_zeros((64, 1024, 1024), torch.float32)     # 256 MiB
    assert resident_mib() - before < 32
    assert t.dtype == torch.float32 and t.shape == (64, 1024, 1024)
    assert not t[::7, ::61].any()                 # reads as zeros (reading commits nothing)
    t[3] = 1.5                                    # one 4 MiB slab
    grown = resident_mib() - before
    assert 3 < grown < 64
    assert t.sum().item() == 1.5 * 1024 * 1024
    for dtype in (torch.bfloat16, torch.float8_e4m3fn):
        z = state_cache.lazy_zeros((3, 5, 2), dtype)
        assert z.dtype == dtype and not z.float().any()


def test_cpu_kv_cache_default_size(tiny_model_dir):
    eng = Engine(EngineConfig(model=tiny_model_dir, max_num_seqs=2))
    r = eng.runner
    # the tiny model's blocks are small: max_num_seqs full-length sequences bound the default
    assert eng.info.num_kv_blocks == 2 * r.max_blocks_per_seq
    eng = Engine(EngineConfig(model=tiny_model_dir))
    assert eng.info.num_kv_blocks == min(256 * eng.runner.max_blocks_per_seq,
                            _default_budget(eng) // _block_bytes(eng))
    # --kv-cache-memory still sets it exactly
    eng = Engine(EngineConfig(model=tiny_model_dir, kv_cache_memory=7 * _block_bytes(eng)))
    assert eng.info.num_kv_blocks == 7


def _block_bytes(eng: Engine) -> int:
    r = eng.runner
    return 2 * r.block_size * sum(k * d for k, d in r.kv_layout) * r.kv_dtype.itemsize


def _default_budget(eng: Engine) -> int:
    one_seq = _block_bytes(eng) * eng.runner.max_blocks_per_seq
    return min(runner.DEFAULT_CPU_KV_CACHE_BYTES, max(runner.MIN_CPU_KV_CACHE_BYTES, one_seq))


# ---- caches keyed by request content stay at their caps (LRU)
@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    from tests.test_structured import _Tok
    from tests.tiny import make_tokenizer_json
    from tokenizers import Tokenizer

    path = str(tmp_path_factory.mktemp("tok") / "tokenizer.json")
    make_tokenizer_json(path)
    return _Tok(Tokenizer.from_file(path))


def test_compiled_grammars_stay_at_their_cap(tok, monkeypatch):
    from collections import OrderedDict

    from minserve import structured as st

    monkeypatch.setattr(st, "_MAX_CACHED_MATCHERS", 3)
    monkeypatch.setattr(st, "_proto_cache", OrderedDict())
    regex = [f"a{i}[0-9]" for i in range(6)]
    for r in regex[:3]:
        st.compile({"regex": r}, tok, 512)
    st.compile({"regex": regex[0]}, tok, 512)           # used again: now the newest
    for r in regex[3:5]:
        st.compile({"regex": r}, tok, 512)
    kept = [key[2] for key in st._proto_cache]
    assert len(kept) == 3
    assert [st.grammar_from_spec({"regex": r}) for r in (regex[0], regex[3], regex[4])] == kept
    for r in regex * 5:                                   # a long run of new grammars
        st.compile({"regex": r + "x"}, tok, 512)
    assert len(st._proto_cache) == 3


def test_chat_template_caches_stay_at_their_cap():
    from minserve import chat

    for fn in (chat.compile_template, chat.detect_content_format):
        cap = fn.cache_info().maxsize
        assert cap is not None and cap <= 64
        for i in range(cap + 10):
            fn(f"{{{{ messages[0]['content'] }}}} {i}")
        assert fn.cache_info().currsize == cap


def test_token_bytes_cache_is_bounded_by_the_vocabulary(tiny_model_dir):
    from minserve.tokenizer import Tokenizer

    t = Tokenizer.from_folder(tiny_model_dir)
    for _ in range(3):
        for i in range(t.vocab_size):
            t.token_bytes(i)
    assert len(t._bytes_cache) <= t.vocab_size


# ---- freed heap memory goes back to the OS when the server goes idle
def test_the_heap_is_trimmed_once_idle_after_work(tiny_model_dir, monkeypatch):
    """After engine work, and (issue 36, finding 8) after requests the HTTP side refuses that
    never reach the engine: a flood of bad requests left RSS 1.2 GB up for good."""
    from minserve.engine import async_engine, heap
    from tests.asgi import call
    from tests.fake_engine import make_fake_app
    from tests.serving import run, wait_until

    assert heap.trim() in (True, False)     # glibc here; elsewhere a no-op
    trims: list[int] = []
    monkeypatch.setattr(async_engine, "HEAP_TRIM_IDLE_S", 0.05)
    monkeypatch.setattr(heap, "trim", lambda: trims.append(1) or True)

    async def settled() -> int:
        """Wait for the trim after the work noted so far; -> trims so far."""
        await wait_until(lambda: trims and not heap._work.is_set(), what="a trim after work")
        return len(trims)

    async def fn(app):
        n = await settled()                    # loading's staging copies
        resp = await call(app, "POST", "/v1/completions", {"prompt": "hi", "max_tokens": 3})
        assert resp.status == 200
        await wait_until(lambda: len(trims) > n, what="a trim after the engine's work")
        n = await settled()
        resp = await call(app, "POST", "/v1/completions", {"prompt": "hi", "max_tokens": -1})
        assert resp.status == 400              # refused before the engine
        await wait_until(lambda: len(trims) > n, what="a trim after a refused request")

    run(make_fake_app(tiny_model_dir), fn)
