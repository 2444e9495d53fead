"""Memory bounds (issue 19.8): the CPU KV cache is sized for what the configuration can use and
committed lazily; caches keyed by request content stay at their caps."""
from __future__ import annotations

import re
import sys

import pytest
import torch

from minserve.config import EngineConfig
from minserve.engine import runner
from minserve.engine.engine import Engine


def resident_mib() -> float:
    with open("/proc/self/status") as f:
        return int(re.search(r"VmRSS:\s+(\d+)", f.read()).group(1)) / 1024


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self/status")
def test_lazy_zeros_commits_only_written_pages():
    before = resident_mib()
    t = runner.lazy_zeros((64, 1024, 1024), torch.float32)     # 256 MiB
    assert resident_mib() - before < 32
    assert t.dtype == torch.float32 and t.shape == (64, 1024, 1024)
    assert not t[::7, ::61].any()                 # reads as zeros (reading commits nothing)
    t[3] = 1.5                                    # one 4 MiB slab
    grown = resident_mib() - before
    assert 3 < grown < 64
    assert t.sum().item() == 1.5 * 1024 * 1024
    for dtype in (torch.bfloat16, torch.float8_e4m3fn):
        z = runner.lazy_zeros((3, 5, 2), dtype)
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
    mc, r = eng.model_config, eng.runner
    return 2 * mc.num_hidden_layers * r.block_size * r.num_kv_heads * mc.head_dim * \
        r.kv_dtype.itemsize


def _default_budget(eng: Engine) -> int:
    one_seq = _block_bytes(eng) * eng.runner.max_blocks_per_seq
    return min(runner.DEFAULT_CPU_KV_CACHE_BYTES, max(runner.MIN_CPU_KV_CACHE_BYTES, one_seq))
