"""SamplingParams: what one request asks of the sampler. Plain Python (no torch) so the server's
protocol layer can build it; the engine's sampler turns a batch of them into tensors. Frozen: once
built (protocol.py, or an LLM caller) nothing changes it; a variant is dataclasses.replace()."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True)
class SamplingParams:
    n: int = 1
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0                     # 0 or -1: off
    min_p: float = 0.0
    seed: int | None = None
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    logit_bias: dict[int, float] | None = None
    min_tokens: int = 0
    max_tokens: int | None = 16        # None: up to max_model_len
    stop: list[str] = field(default_factory=list)
    stop_token_ids: list[int] = field(default_factory=list)
    ignore_eos: bool = False
    logprobs: int | None = None        # top-k alternatives per sampled token (0 = sampled only)
    prompt_logprobs: int | None = None
    logprob_token_ids: list[int] | None = None  # logprobs of these ids too, at every position
    # beam search (engine/beam.py): n beams; vLLM's length_penalty and early_stopping
    use_beam_search: bool = False
    length_penalty: float = 1.0
    early_stopping: bool | str = False   # True, False or "never"
    skip_special_tokens: bool = True
    spaces_between_special_tokens: bool = True
    include_stop_str_in_output: bool = False
    # A structured-output constraint, e.g. {"json": schema} | {"regex": ...} | {"choice": [...]}
    # | {"grammar": ...} | {"json_object": True}; compiled by minserve/structured.py.
    structured: dict[str, Any] | None = None

    def __post_init__(self) -> None:
        if isinstance(self.stop, str):
            object.__setattr__(self, "stop", [self.stop])   # frozen: normalized once, here
        if self.top_k < 0:
            object.__setattr__(self, "top_k", 0)
        if self.temperature < 0:
            raise ValueError("temperature must be >= 0")
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError("top_p must be in (0, 1]")
        if not 0.0 <= self.min_p <= 1.0:
            raise ValueError("min_p must be in [0, 1]")
        if self.n < 1:
            raise ValueError("n must be >= 1")
        if self.max_tokens is not None and self.max_tokens < 1:
            raise ValueError("max_tokens must be >= 1")
        if self.repetition_penalty <= 0:
            raise ValueError("repetition_penalty must be > 0")
        if self.min_tokens < 0 or (self.max_tokens is not None
                                   and self.min_tokens > self.max_tokens):
            raise ValueError(f"min_tokens must be in [0, max_tokens], got {self.min_tokens}")

    @property
    def is_greedy(self) -> bool:
        return self.temperature < 1e-5
