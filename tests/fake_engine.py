"""A stand-in Engine with the real Engine's interface: one scripted token per request per step,
block accounting (to check that aborts free blocks) and failure injection (the thread dying)."""
from __future__ import annotations

import time

from minserve.engine.request import EngineInfo, FinishReason, Logprob, RequestOutput

BLOCK_SIZE = 4


class FakeEngine:
    def __init__(self, tokenizer, *, text: str = " hello world, this is a fake engine talking.",
                 max_model_len: int = 256, num_kv_blocks: int = 512, step_delay: float = 0.002,
                 fail_at_step: int | None = None, fail_min_running: int = 0) -> None:
        self.info = EngineInfo(tokenizer, tokenizer.vocab_size, max_model_len,
                               num_kv_blocks=num_kv_blocks, block_size=BLOCK_SIZE)
        self.script = tokenizer.encode(text, add_special_tokens=False)
        self.step_delay = step_delay
        self.fail_at_step = fail_at_step
        self.fail_min_running = fail_min_running  # steps count toward the failure from then on
        self.failing_steps = 0
        self.num_steps = 0
        self.running: dict[str, dict] = {}
        self.pending_aborts: list[str] = []
        self.priorities: dict[str, int] = {}

    def add_request(self, request) -> None:
        prompt = request.prompt_token_ids
        if len(prompt) >= self.info.max_model_len:
            raise ValueError(f"prompt of {len(prompt)} tokens is too long")
        for i, sid in enumerate(request.sample_ids()):  # the n fan-out, as the real engine's
            self.priorities[sid] = request.priority
            self.running[sid] = {"prompt": list(prompt), "out": [],
                                 "params": request.sampling, "shift": i}

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
                "kv_cache_usage": self.num_used_blocks / self.info.num_kv_blocks,
                "prefix_cache_queries": 0, "prefix_cache_hits": 0}

    def step(self) -> list[RequestOutput]:
        self.num_steps += 1
        self.failing_steps += len(self.running) >= self.fail_min_running
        if self.fail_at_step is not None and self.failing_steps >= self.fail_at_step:
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
    """An App over a FakeEngine using the tiny model's real tokenizer; app.chat._engine is the
    FakeEngine once started."""
    from minserve.server import ServerConfig, create_app
    from minserve.tokenizer import Tokenizer

    tokenizer = Tokenizer.from_folder(model_dir)
    cfg = ServerConfig(**{"served_model_names": ["tiny"], **(server or {})})
    return create_app(None, cfg, lambda _config: FakeEngine(tokenizer, **engine_kwargs))
