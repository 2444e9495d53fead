"""Issue 36, finding 6: runtime LoRA loading. A large adapter's read stalled every generation
(it ran on the engine thread); a hub-id-looking path started a download; a deeply nested
adapter_config.json was a 500 (RecursionError); the error text told a missing folder from a
folder without a config (test_lora.py::test_file_refusals checks the one text)."""
from __future__ import annotations

import json
import os
import threading

import pytest

from minserve.lora import adapter
from minserve.lora.adapter import LoRAError, load_adapter
from minserve.server import ServerConfig, create_app
from minserve.tokenizer import Tokenizer
from tests.asgi import call
from tests.fake_engine import FakeEngine
from tests.serving import run, wait_until


class SlowReadEngine(FakeEngine):
    """An adapter read that blocks until released, recording the thread it ran on."""

    def __init__(self, tokenizer) -> None:
        super().__init__(tokenizer)
        self.release = threading.Event()
        self.read_threads: list[str] = []
        self.added: list[tuple[str, object, str]] = []
        self.step_threads: set[str] = set()

    def read_lora(self, name: str, path: str) -> object:
        self.read_threads.append(threading.current_thread().name)
        assert self.release.wait(60)
        if path.endswith("nested"):
            raise LoRAError("refused")
        return {"weights of": name}

    def add_lora(self, name: str, path: str, weights: object = None) -> None:
        self.added.append((name, weights, threading.current_thread().name))

    def step(self):
        self.step_threads.add(threading.current_thread().name)
        return super().step()


def test_a_slow_adapter_read_never_stalls_generation(tiny_model_dir):
    tokenizer = Tokenizer.from_folder(tiny_model_dir)
    cfg = ServerConfig(served_model_names=["tiny"], allow_runtime_lora=True)
    engines: list[SlowReadEngine] = []
    app = create_app(None, cfg, lambda _c: engines.append(SlowReadEngine(tokenizer))
                     or engines[-1])

    async def fn(app):
        import asyncio
        engine = engines[0]
        load = asyncio.ensure_future(call(app, "POST", "/v1/load_lora_adapter", {
            "lora_name": "big", "lora_path": "/adapters/big"}))
        await wait_until(lambda: engine.read_threads, what="the read to start")
        # the read is blocked: a completion still runs to its end
        r = await call(app, "POST", "/v1/completions", {"model": "tiny", "prompt": "hi",
                                                         "max_tokens": 3})
        assert r.status == 200, r.body
        assert not load.done()
        engine.release.set()
        r = await load
        assert r.status == 200, r.body
        (name, weights, add_thread), = engine.added
        assert (name, weights) == ("big", {"weights of": "big"})
        assert add_thread in engine.step_threads          # handed over on the engine thread
        assert engine.read_threads[0] not in engine.step_threads   # read off it
        refused = await call(app, "POST", "/v1/load_lora_adapter", {
            "lora_name": "x", "lora_path": "/adapters/nested"})
        assert refused.status == 400 and b"refused" in refused.body
    run(app, fn)


def test_a_hub_id_is_not_fetched_without_allow_downloads(monkeypatch):
    fetched = []
    from minserve.models import loader
    monkeypatch.setattr(loader, "_hub_snapshot", lambda *a: fetched.append(a) or "/nowhere")
    with pytest.raises(LoRAError, match="needs --allow-lora-downloads"):
        adapter.resolve_adapter("some-org/some-adapter")
    assert fetched == []
    assert adapter.resolve_adapter("some-org/some-adapter", allow_downloads=True) == "/nowhere"
    assert len(fetched) == 1


def test_a_deeply_nested_config_is_a_clean_refusal(tmp_path):
    folder = tmp_path / "nested"
    folder.mkdir()
    (folder / "adapter_config.json").write_text("[" * 100_000 + "]" * 100_000)
    with pytest.raises(LoRAError, match="not a usable PEFT LoRA adapter"):
        load_adapter("n", str(folder), None, 16, None)
    (folder / "adapter_config.json").write_text(json.dumps({"r": 8}) + " " * (2 << 20))
    with pytest.raises(LoRAError, match="not a usable PEFT LoRA adapter"):
        load_adapter("n", str(folder), None, 16, None)


def test_a_huge_safetensors_header_is_refused_before_it_is_read(tmp_path):
    folder = tmp_path / "big-header"
    folder.mkdir()
    (folder / "adapter_config.json").write_text(json.dumps({
        "peft_type": "LORA", "r": 8, "lora_alpha": 16, "target_modules": ["q_proj"]}))
    with open(folder / "adapter_model.safetensors", "wb") as f:
        f.write((98 << 20).to_bytes(8, "little") + b"{")
    assert os.path.getsize(folder / "adapter_model.safetensors") < 100
    with pytest.raises(LoRAError, match="header is 102760448 bytes"):
        adapter._read_pairs(str(folder / "adapter_model.safetensors"), None, 8)
