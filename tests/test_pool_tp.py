"""A pooled tensor-parallel model (-tp 2 from the pool's settings file): its worker processes
start on load and are gone once it is evicted (no child process, no new shared-memory file); it
answers as the same folder served by one process; while resident it is the only model loaded
(the process's tensor-parallel state is one). One spawn of the ranks for the module."""
from __future__ import annotations

import json
import os
import shutil

from tests.asgi import call
from tests.serving import run, wait_until
from tests.test_pool import BODY, pool_app, statuses
from tests.test_tp_server import workers
from tests.tiny import make_tiny_model


def _shm() -> set[str]:
    return set(os.listdir("/dev/shm")) if os.path.isdir("/dev/shm") else set()


def test_tp2_model_starts_and_stops_its_workers(tmp_path):
    make_tiny_model(str(tmp_path / "tp"))
    shutil.copytree(tmp_path / "tp", tmp_path / "whole")
    (tmp_path / "minserve-models.json").write_text(json.dumps({"tp": {"tensor_parallel_size": 2}}))
    pid = os.getpid()

    async def fn(app):
        r = {"before": workers(pid), "shm": _shm()}
        r["tp"] = await call(app, "POST", "/v1/completions", {**BODY, "model": "tp"})
        r["loaded"] = workers(pid)
        # max_loaded is 2, but the tp model is resident alone: it is evicted to make room
        r["whole"] = await call(app, "POST", "/v1/completions", {**BODY, "model": "whole"})
        r["models"] = await call(app, "GET", "/v1/models")
        await wait_until(lambda: workers(pid) == r["before"], 60, "the tp workers to exit")
        r["shm_after"] = _shm()
        return r

    r = run(pool_app(str(tmp_path), max_loaded=2), fn)
    assert len(r["loaded"]) == len(r["before"]) + 1
    assert r["tp"].status == r["whole"].status == 200
    assert r["tp"].json()["choices"][0]["text"] == r["whole"].json()["choices"][0]["text"]
    assert statuses(r["models"]) == {"tp": "unloaded", "whole": "loaded"}
    assert r["shm_after"] <= r["shm"]
