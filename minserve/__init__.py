"""minserve: a small, fast LLM server that speaks the OpenAI API.

Module map (the README's file map and request flow say more):
- front door: cli, launch (flags, granian) -> server (the ASGI app; http for framing and errors,
  token_routes, model_routes, webui/) -> serving (parse -> typed events, the one path) -> protocol,
  request_fields, sampling_params (requests built once) -> output (events -> OpenAI JSON/SSE).
  responses, messages and blocks put the other APIs on that path; batch/ (Batch API, run-batch)
  and llm (LLM) consume it too. pool (models loaded on demand, LRU eviction, parking), models_dir
  (--models-dir, its settings file, the pool's flags) and pool_routes (load/unload, sleep mode).
- text: chat (messages, templates), tokenizer, tekken, detokenizer, structured,
  structured_limits, regex_dialect, tool_parsers/, reasoning, harmony (gpt-oss).
- engine/: async_engine (the thread) -> engine (step) -> scheduler, kv_cache, runner, sampler;
  request, waiting, fairness, builder (the one model builder), workers (tensor parallel), beam,
  encoder_cache, heap, sleep (sleep mode's weights); spec/ (speculative decoding).
- models/: registry (one row per architecture), llama, gemma3, gemma4, moe, qwen_moe, mixtral,
  gpt_oss, eagle3, bert, cross_encoder, layers, linear, parallel, loader, gguf; quant/; vision/
  (towers, wrappers, their processors). kernels/ picks each op's device path. Beside them:
  embeddings/, lora/, multimodal/ (fetch, image, inputs).
- config, hf_config (config.json's family settings), env (every environment variable), metrics,
  errors, value_text, cpu_threads, pypi, shutdown, healthcheck.
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
