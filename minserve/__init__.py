"""minserve: a small, fast LLM server that speaks the OpenAI API.

Module map: cli (flags) -> server (ASGI app, routes; http.py for the plumbing) -> protocol
(OpenAI bodies; chat.py checks messages and renders templates) -> engine/async_engine
(thread bridge) -> engine/engine (step = schedule, run, update) -> engine/scheduler, kv_cache,
runner, sampler -> models/ (torch model code, loader) -> kernels/ (Triton + torch references).
Back out: output (per-sample detokenizer and stop strings, shared with llm; parsers -> OpenAI
JSON). Beside it: embeddings/ (/v1/embeddings, LLM.embed), structured (llguidance),
tool_parsers/, reasoning.
"""
from __future__ import annotations

__version__ = "0.1.0"

from minserve.cpu_threads import set_omp_defaults

set_omp_defaults()     # before anything imports torch: libgomp reads its settings once, at load

from minserve.sampling_params import SamplingParams  # noqa: E402

__all__ = ["LLM", "SamplingParams", "__version__"]


def __getattr__(name: str):  # LLM pulls in torch; import it only when asked for
    if name == "LLM":
        from minserve.llm import LLM
        return LLM
    raise AttributeError(name)
