"""A stand-in Engine with the real Engine's interface: one scripted token per request per step,
block accounting (to check that aborts free blocks) and failure injection (the thread dying)."""
from __future__ import annotations

import time
from types import SimpleNamespace

from minserve.engine.request import FinishReason, Logprob, RequestOutput

BLOCK_SIZE = 4


class FakeEngine:
    def __init__(self, tokenizer, *, text: str = " hello world, this is a fake engine talking.",
                 max_model_len: int = 256, num_kv_blocks: int = 512, step_delay: float = 0.002,
                 fail_at_step: int | None = None) -> None:
        self.tokenizer = tokenizer
        self.script = tokenizer.encode(text, add_special_tokens=False)
        self.max_model_len = max_model_len
        self.model_config = SimpleNamespace(vocab_size=tokenizer.vocab_size)
        self.generation_defaults: dict = {}
        self.num_kv_blocks = num_kv_blocks
        self.step_delay = step_delay
        self.fail_at_step = fail_at_step
        self.num_steps = 0
        self.running: dict[str, dict] = {}
        self.pending_aborts: list[str] = []
        self.added: list[tuple] = []
        self.priorities: dict[str, int] = {}

    def add_request(self, request_id, prompt_token_ids, params, *, parent_id=None,
                    sample_index=0, arrival_time=None, priority=0) -> None:
        if len(prompt_token_ids) >= self.max_model_len:
            raise ValueError(f"prompt of {len(prompt_token_ids)} tokens is too long")
        self.added.append((request_id, parent_id, sample_index, params))
        self.priorities[request_id] = priority
        self.running[request_id] = {"prompt": list(prompt_token_ids), "out": [], "params": params,
                                    "shift": sample_index}

    def abort_request(self, request_ids) -> None:
        self.pending_aborts.extend(request_ids)

    def has_unfinished_requests(self) -> bool:
        return bool(self.running) or bool(self.pending_aborts)

    @property
    def num_used_blocks(self) -> int:
        return sum(-(-(len(r["prompt"]) + len(r["out"])) // BLOCK_SIZE)
                   for r in self.running.values())

    def stats(self) -> dict:
        return {"num_running": len(self.running), "num_waiting": 0,
                "kv_cache_usage": self.num_used_blocks / self.num_kv_blocks,
                "prefix_cache_queries": 0, "prefix_cache_hits": 0,
                "num_kv_tokens": self.num_kv_blocks * BLOCK_SIZE}

    def step(self) -> list[RequestOutput]:
        self.num_steps += 1
        if self.fail_at_step is not None and self.num_steps >= self.fail_at_step:
            raise RuntimeError("injected engine failure")
        for rid in self.pending_aborts:
            self.running.pop(rid, None)
        self.pending_aborts.clear()
        time.sleep(self.step_delay)
        outs = []
        for rid, r in list(self.running.items()):
            p = r["params"]
            tok = self.script[(len(r["out"]) + r["shift"]) % len(self.script)]
            r["out"].append(tok)
            lps = None
            if p.logprobs is not None:
                top = [(tok, -0.25), (self.script[0], -2.0), (self.script[1], -3.0)]
                lps = [Logprob(tok, -0.25, 1, top[:max(p.logprobs, 0)])]
            done = p.max_tokens is not None and len(r["out"]) >= p.max_tokens
            outs.append(RequestOutput(rid, [tok], FinishReason.LENGTH if done else None,
                                      num_prompt_tokens=len(r["prompt"]), logprobs=lps))
            if done:
                del self.running[rid]
        return outs


def make_fake_app(model_dir: str, *, server: dict | None = None, **engine_kwargs):
    """An App over a FakeEngine using the tiny model's real tokenizer; app.engine.engine is the
    FakeEngine once started."""
    from minserve.server import ServerConfig, create_app
    from minserve.tokenizer import Tokenizer

    tokenizer = Tokenizer.from_folder(model_dir)
    cfg = ServerConfig(**{"served_model_names": ["tiny"], **(server or {})})
    return create_app(None, cfg, lambda _config: FakeEngine(tokenizer, **engine_kwargs))
