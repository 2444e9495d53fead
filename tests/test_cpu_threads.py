"""CPU threading defaults: the OpenMP wait policy minserve sets, and the thread count it picks
(affinity capped by a cgroup quota), with the user's settings winning."""
from __future__ import annotations

import os
import subprocess
import sys

from minserve import cpu_threads


def _fresh_python(code: str, **env: str) -> str:
    clean = {k: v for k, v in os.environ.items()
             if k not in ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT", "OMP_NUM_THREADS")}
    return subprocess.run([sys.executable, "-c", code], env={**clean, **env}, check=True,
                          capture_output=True, text=True).stdout.strip()


def test_importing_minserve_sets_a_short_spin_before_torch_loads():
    code = ("import os, minserve, torch; print(os.environ.get('GOMP_SPINCOUNT'), "
            "os.environ.get('OMP_WAIT_POLICY'), torch.get_num_threads() >= 1)")
    assert _fresh_python(code) == "10000 None True"


def test_the_users_omp_settings_win():
    code = ("import os, minserve; "
            "print(os.environ.get('OMP_WAIT_POLICY'), os.environ.get('GOMP_SPINCOUNT'))")
    assert _fresh_python(code, OMP_WAIT_POLICY="PASSIVE") == "PASSIVE None"
    assert _fresh_python(code, OMP_WAIT_POLICY="ACTIVE") == "ACTIVE None"
    assert _fresh_python(code, GOMP_SPINCOUNT="300000") == "None 300000"


def test_num_torch_threads_leaves_an_explicit_omp_num_threads_alone(monkeypatch):
    monkeypatch.setenv("OMP_NUM_THREADS", "3")
    assert cpu_threads.num_torch_threads() is None
    monkeypatch.delenv("OMP_NUM_THREADS")
    assert cpu_threads.num_torch_threads() == cpu_threads.usable_cpus() >= 1


def test_cgroup_quota_caps_the_affinity_mask(monkeypatch, tmp_path):
    v2 = tmp_path / "cpu.max"
    monkeypatch.setattr(cpu_threads, "CGROUP_CPU_FILES", ((str(v2), None),))
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(64)))
    v2.write_text("max 100000\n")
    assert cpu_threads.usable_cpus() == 64
    v2.write_text("150000 100000\n")          # 1.5 CPUs -> 2 threads
    assert cpu_threads.usable_cpus() == 2
    v2.write_text("garbage\n")
    assert cpu_threads.usable_cpus() == 64


def test_cgroup_v1_quota_and_period_files(monkeypatch, tmp_path):
    quota, period = tmp_path / "cfs_quota_us", tmp_path / "cfs_period_us"
    monkeypatch.setattr(cpu_threads, "CGROUP_CPU_FILES",
                        ((str(tmp_path / "missing"), None), (str(quota), str(period))))
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1, 2, 3})
    quota.write_text("-1\n")
    period.write_text("100000\n")
    assert cpu_threads.usable_cpus() == 4
    quota.write_text("100000\n")
    assert cpu_threads.usable_cpus() == 1
