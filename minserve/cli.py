"""`python -m minserve [serve] [MODEL] [flags]`: vLLM's flag names -> EngineConfig/ServerConfig,
then launch.py starts the server (`python -m minserve run-batch` is batch/offline.py's, on these
flags). Does not import torch."""
from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json
import logging
import re
import sys
from typing import Any

from minserve import __version__, env, models_dir
from minserve.config import (
    DEFAULT_MODEL_NAME,
    KV_CACHE_DTYPES,
    QUANTIZATION_METHODS,
    ConfigError,
    EngineConfig,
    LoRAConfig,
    LoRAModule,
)
from minserve.embeddings.models import DEFAULT_EMBEDDING_MODEL, resolve_task
from minserve.reasoning import REASONING_PARSERS
from minserve.structured import StructuredOutputError, request_options
from minserve.tool_parsers.registry import TOOL_PARSERS

logger = logging.getLogger("minserve")
LOG_LEVELS = ("critical", "error", "warning", "info", "debug", "trace")


def _size(text: str) -> int:
    """'4096', '4k' (4000), '4K' (4096), '1M', '8GiB' -> int. As vLLM's human_readable_int:
    a lowercase suffix is decimal, an uppercase one binary; 'iB'/'B' (bytes) is binary."""
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([kKmMgGtT]?)(i?[bB]?)\s*", text)
    if m is None:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number (suffixes k, M, G allowed)")
    binary = m.group(2).isupper() or m.group(3).lower().startswith("i") or m.group(3) == "B"
    base = 1024 if binary else 1000
    scale = {"": 1, "k": base, "m": base**2, "g": base**3, "t": base**4}[m.group(2).lower()]
    return int(float(m.group(1)) * scale)


def _origins(text: str) -> list[str]:
    text = text.strip()
    if text.startswith("["):
        value = json.loads(text)
        if not isinstance(value, list):
            raise argparse.ArgumentTypeError("--allowed-origins must be a JSON list")
        return [str(v) for v in value]
    return [o.strip() for o in text.split(",") if o.strip()]


def _lora_module(text: str) -> LoRAModule:
    """`name=path` or JSON {"name", "path", "base_model_name"} (vLLM's two spellings)."""
    if text.lstrip().startswith("{"):
        try:
            d = json.loads(text)
        except json.JSONDecodeError as e:
            raise argparse.ArgumentTypeError(f"--lora-modules: bad JSON {text!r}: {e}") from None
        if not isinstance(d, dict) or not isinstance(d.get("name"), str) \
                or not isinstance(d.get("path"), str) or set(d) - {"name", "path",
                                                                   "base_model_name"}:
            raise argparse.ArgumentTypeError(
                f'--lora-modules: {text!r} must be {{"name": str, "path": str, '
                '"base_model_name": str (optional)}')
        return LoRAModule(d["name"], d["path"], d.get("base_model_name"))
    name, sep, path = text.partition("=")
    if not sep or not name or not path:
        raise argparse.ArgumentTypeError(f"--lora-modules: {text!r} is not name=path or JSON")
    return LoRAModule(name, path)


def _split_lora_modules(argv: list[str]) -> list[str]:
    """`--lora-modules a=x b=y MODEL` -> `--lora-modules=a=x --lora-modules=b=y MODEL`: the list
    after the flag ends at the first item that is neither name=path nor JSON, so a positional
    model after it is not swallowed (a plain nargs="+" would take it as a module)."""
    out: list[str] = []
    i = 0
    while i < len(argv):
        arg = argv[i]
        i += 1
        if arg != "--lora-modules":
            out.append(arg)
            continue
        start = i
        while i < len(argv) and not argv[i].startswith("-") and (
                "=" in argv[i] or argv[i].lstrip().startswith("{")):
            out.append(f"--lora-modules={argv[i]}")
            i += 1
        if i == start:
            out.append(arg)   # argparse reports the missing value
    return out


# vLLM's StructuredOutputsConfig keys: only disable_any_whitespace and
# disable_additional_properties change what minserve generates (structured.request_options reads
# them, as it reads a request's own); llguidance is the one backend, the rest are accepted.
_SO_KEYS = {"disable_any_whitespace", "disable_additional_properties", "backend",
            "disable_fallback", "reasoning_parser", "enable_in_reasoning"}


def _generation_overrides(text: str) -> Any:
    """--override-generation-config '{"temperature": 0.5, "max_new_tokens": 256}' (vLLM's flag):
    sampling defaults set over (or, with --generation-config vllm, instead of) the model's.
    Only parsed here; EngineConfig checks the keys and values (for LLM() too)."""
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        raise argparse.ArgumentTypeError('must be a JSON object, e.g. \'{"temperature": 0.5}\'') \
            from None


def _speculative_config(text: str) -> Any:
    """--speculative-config '{"method": "ngram", "num_speculative_tokens": 4}' (vLLM's flag).
    Only parsed here; SpeculativeConfig checks the keys and values (for LLM() too)."""
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        raise argparse.ArgumentTypeError(
            'must be a JSON object, e.g. \'{"method": "ngram", "num_speculative_tokens": 4}\'') \
            from None


def _structured_outputs_config(text: str) -> dict[str, bool]:
    """--structured-outputs-config '{"disable_any_whitespace": true}' -> spec options."""
    try:
        value = json.loads(text)
    except json.JSONDecodeError:
        raise argparse.ArgumentTypeError("must be a JSON object, e.g. "
                                         '\'{"disable_any_whitespace": true}\'') from None
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError("must be a JSON object")
    unknown = sorted(set(value) - _SO_KEYS)
    if unknown:
        raise argparse.ArgumentTypeError(f"unknown key(s) {', '.join(unknown)} (known: "
                                         f"{', '.join(sorted(_SO_KEYS))})")
    try:
        return request_options(value)
    except StructuredOutputError as e:
        raise argparse.ArgumentTypeError(str(e).replace("structured_outputs.", "")) from None


def _mm_limits(text: str) -> dict[str, int]:
    """--limit-mm-per-prompt: 'image=2' (comma-separated for several) or '{"image": 2}'."""
    text = text.strip()
    try:
        if text.startswith("{"):
            value = json.loads(text)
        else:
            value = {}
            for item in filter(None, (t.strip() for t in text.split(","))):
                name, sep, count = item.partition("=")
                if not sep:
                    raise ValueError(item)
                value[name.strip()] = int(count)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f'--limit-mm-per-prompt {text!r}: use image=N or JSON like {{"image": N}}') from None
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError('--limit-mm-per-prompt JSON must be an object')
    return value


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m minserve",
        description="Serve an LLM over the OpenAI API (vLLM's flag names). "
                    "`python -m minserve` serves the embedded default model on 127.0.0.1:8000.")
    p.add_argument("model_tag", nargs="?", default=None, metavar="MODEL",
                   help="a model folder, a .gguf file or a hub id (same as --model)")
    p.add_argument("--version", action="version", version=f"minserve {__version__}")
    a = p.add_argument
    a("--model", default=None, help="model folder, .gguf or hub id (default: " +
      DEFAULT_MODEL_NAME + ", fetched once into the cache)")
    a("--tokenizer", default=None, help="tokenizer folder (default: the model's)")
    a("--revision", default=None, help="hub revision")
    a("--host", default="127.0.0.1", help="bind address (default 127.0.0.1; 0.0.0.0 for all)")
    a("--port", type=int, default=8000)
    a("--served-model-name", nargs="+", default=None,
      help="the model name(s) the API accepts; the first one is reported")
    a("--api-key", nargs="+", default=None, metavar="KEY",
      help="require `Authorization: Bearer KEY` (any of the keys given) on /v1 and tokenize "
      f"routes (also read from {' or '.join(env.API_KEY_ENVS)}); each key sees only its own batch "
      "files and batches")
    a("--dtype", default="auto", help="auto (bf16 on GPU, fp32 on CPU), bfloat16, float16, float32")
    a("--device", default="auto", help="auto, cuda or cpu")
    a("--max-model-len", type=_size, default=None, help="context length (default: the model's)")
    a("--gpu-memory-utilization", type=float, default=0.9)
    a("--kv-cache-memory", type=_size, default=None,
      help="bytes for the KV cache (overrides --gpu-memory-utilization), e.g. 2GiB")
    a("--max-num-seqs", type=int, default=256)
    a("--max-num-batched-tokens", type=_size, default=None,
      help="tokens per engine step (default: vLLM's 8192 or 2048 on a GPU; 256 on CPU, so "
           "one step stays short)")
    a("--long-prefill-token-threshold", type=_size, default=None,
      help="prompt tokens of one request per step (default: 128 on CPU, none on a GPU; 0: no "
           "cap): a long prompt leaves room in each step for the requests behind it")
    a("--max-chunk-attention", type=_size, default=None,
      help="(query, context) token pairs one request's prompt chunk may compute per step "
           "(default: 48k on CPU, none on a GPU; 0: no cap): late chunks of a long prompt stay "
           "as short as early ones (minserve only)")
    a("--max-fanout-rows", type=int, default=None,
      help="tokens of one n > 1 or beam-search request per step, a decode row being one "
           "(default: 8 on CPU, 64 on a GPU; 0: no cap, and no step held for a new request's "
           "prompt): a large fan-out never keeps other clients waiting (minserve only)")
    a("--enable-prefix-caching", action=argparse.BooleanOptionalAction, default=True)
    a("--block-size", type=int, default=16)
    a("--chat-template", default=None, help="a jinja2 chat template file or its text")
    a("--generation-config", default="auto",
      help="auto (sampling defaults from the model's generation_config.json), vllm (none), or a "
           "folder")
    a("--override-generation-config", type=_generation_overrides, default=None,
      help='JSON sampling defaults over the generation config, e.g. \'{"temperature": 0.5, '
           '"max_new_tokens": 256}\'')
    a("--load-format", default="auto", choices=["auto", "safetensors", "gguf", "dummy"])
    a("--quantization", "-q", default=None, choices=list(QUANTIZATION_METHODS),
      help="the weights' quantization method (default: from config.json's quantization_config "
           "or the GGUF tensor types); fp8 on a 16-bit checkpoint quantizes it at load")
    a("--kv-cache-dtype", default="auto", choices=list(KV_CACHE_DTYPES),
      help="auto: the model dtype; fp8 (fp8_e4m3): e4m3 with scales of 1.0, half the KV bytes "
           "of bf16")
    a("--gguf-dequantize", action=argparse.BooleanOptionalAction, default=None,
      help="GGUF files: dequantize the weights at load instead of serving the quantized blocks "
           "(default: dequantize on CPU, where it measured faster; quantized on GPU)")
    a("--seed", type=int, default=0)
    a("--enforce-eager", action="store_true",
      help="accepted for vLLM compatibility; changes nothing yet: minserve does not capture "
           "CUDA graphs, so it always runs eagerly")
    a("--disable-log-requests", action="store_true", help="do not log each request (default)")
    a("--enable-log-requests", action="store_true", help="log each request's size and params")
    a("--log-level", "--uvicorn-log-level", dest="log_level", default="info", choices=LOG_LEVELS,
      help="minserve's and granian's log level (the start-up and ready lines print at any)")
    a("--engine-process", dest="engine_process", action=argparse.BooleanOptionalAction,
      default=False,
      help="run the engine loop in its own process, so HTTP work never holds up a step "
           "(issue 40; off by default until measured on an idle machine)")
    a("--disable-log-stats", action="store_true",
      help="do not log the throughput/KV-usage line every 10 s while requests run")
    a("--enable-metrics", action="store_true",
      help="accepted for vLLM compatibility: /metrics (Prometheus) is always on")
    a("--allowed-origins", type=_origins, default=["*"],
      help='CORS origins, a JSON list or comma-separated (default ["*"])')
    a("--root-path", default="", help="path prefix when behind a path-based proxy")
    models_dir.add_flags(a)
    a("--webui", dest="enable_webui", action=argparse.BooleanOptionalAction, default=True,
      help="the chat page at / (llama-server's flag names; --no-webui: / is a 404)")
    a("--ssl-keyfile", default=None)
    a("--ssl-certfile", default=None)
    a("--max-request-body-bytes", type=_size, default=32 * 1024 * 1024,
      help="larger request bodies are refused with 413 (default 32MiB)")
    a("--reuse-port", action="store_true",
      help="start even if another process listens on --port (SO_REUSEPORT: the kernel then "
           "splits new connections between the two); without it a port in use is an error")
    a("--timeout-keep-alive", type=float, default=5.0,
      help="seconds a connection may stay idle, between requests or before its first one, and "
           "a client may take to send a request's headers (uvicorn's flag, vLLM's default 5)")
    a("--shutdown-timeout", type=float, default=30.0,
      help="seconds in-flight requests get to finish on SIGTERM/SIGINT; then they are cut "
           "(a stream ends with an error event, a whole response is a 503) and the process "
           "exits (a second signal cuts at once)")
    a("--limit-mm-per-prompt", type=_mm_limits, default=None,
      help='vision models: at most N images in one prompt, as image=N or {"image": N} '
           "(default: what the model takes, 1 for LLaVA-1.5, 8 for Qwen2-VL and Idefics3); "
           "more is a 400")
    a("--max-image-pixels-per-request", type=_size, default=None,
      help="decoded pixels one request's images may have together, checked from their headers "
           "before any is decoded (default 100000000); more is a 400 (minserve only)")
    a("--max-image-pixels-in-flight", type=_size, default=None,
      help="decoded pixels of all requests' images decoding at once; a decode waits for room "
           "(default 100000000: two images at the 50-megapixel cap) (minserve only)")
    a("--allowed-local-media-path", default=None,
      help="serve file:// image URLs from below this folder (refused otherwise)")
    a("--allowed-media-domains", nargs="+", default=None,
      help="fetch image URLs only from these host names (default: any public host)")
    a("--allow-private-media-urls", action="store_true",
      help="allow image URLs whose host resolves to a loopback, private or link-local address "
           "(refused by default: a server-side request forgery guard)")
    a("--trust-remote-code", action="store_true",
      help="accepted for vLLM compatibility; has no effect: minserve never runs code from a "
           "model repository")
    a("--enable-auto-tool-choice", action="store_true",
      help='allow tool_choice "auto"; without --tool-call-parser the format is detected from '
           "the chat template (a template that renders no tools gets minserve's generic "
           'format); "required" and a named function work without it')
    a("--tool-call-parser", default=None, choices=sorted(TOOL_PARSERS),
      help="the model's tool-call format, for tool_choice \"auto\"")
    a("--reasoning-parser", default=None, choices=sorted(REASONING_PARSERS),
      help="split the model's <think> text (openai_gptoss: harmony's analysis channel) into "
           "reasoning_content")
    a("--max-logprobs", type=int, default=20,
      help="most logprobs (alternatives per token) a request may ask for; -1: no limit")
    a("--enable-force-include-usage", action="store_true",
      help="usage on every stream, as if stream_options.include_usage were true")
    a("--enable-prompt-tokens-details", action="store_true",
      help="usage.prompt_tokens_details.cached_tokens (without it: null, as vLLM)")
    a("--enable-tokenizer-info-endpoint", action="store_true",
      help="serve GET /tokenizer_info (the tokenizer's config and chat template)")
    a("--enable-server-load-tracking", action="store_true",
      help="serve GET /load: the number of generation/embedding requests in flight")
    a("--return-tokens-as-token-ids", action="store_true",
      help='logprob tokens as "token_id:N" (a request can ask with return_tokens_as_token_ids)')
    # vLLM flags accepted with vLLM's meaning, where here that meaning holds already
    a("--enable-chunked-prefill", action=argparse.BooleanOptionalAction, default=True,
      help="accepted for vLLM compatibility; changes nothing: prefill is always chunked")
    a("--structured-outputs-config.backend", dest="structured_outputs_backend",
      default="auto", choices=["auto", "guidance"],
      help="structured outputs backend: auto = guidance (llguidance, the only one here)")
    a("--show-hidden-metrics-for-version", default=None,
      help="accepted for vLLM compatibility; changes nothing: no metric is hidden here")
    a("--disable-frontend-multiprocessing", action="store_true",
      help="accepted for vLLM compatibility; changes nothing: the server and engine always "
           "share one process")
    a("--skip-tokenizer-init", action="store_true",
      help="load no tokenizer: prompts as token ids (completions), outputs as token_ids with "
           "empty text; chat, stop strings and structured outputs are refused")
    a("--api-server-count", type=int, default=1,
      help="must be 1: the API server and the engine share one process")
    a("--structured-outputs-config", type=_structured_outputs_config, default={},
      help='JSON, as vLLM: {"disable_any_whitespace": true} (compact JSON), '
           '{"disable_additional_properties": false} (objects without additionalProperties '
           "may hold unlisted keys; by default they hold only the listed ones, as xgrammar)")
    a("--speculative-config", type=_speculative_config, default=None,
      help='speculative decoding, JSON with vLLM\'s keys: {"method": "ngram", '
           '"num_speculative_tokens": 4}, {"model": DRAFT, "num_speculative_tokens": 4}, '
           '{"method": "eagle3", "model": HEAD, ...}, {"method": "mtp"}; disable_by_batch_size, '
           "min_acceptance_rate (see README)")
    a("--tensor-parallel-size", "-tp", type=int, default=1,
      help="shard the model over N ranks (N-1 worker processes; gloo on CPU, NCCL on GPUs)")
    a("--enable-expert-parallel", action="store_true",
      help="mixture-of-experts models under -tp: each rank holds whole experts (num_experts / "
           "N of them) instead of a slice of every expert")
    a("--distributed-executor-backend", default="mp",
      help="mp (worker processes; the only one supported)")
    a("--nnodes", type=int, default=1, help="nodes the ranks span (torchrun's meaning)")
    a("--node-rank", type=int, default=0,
      help="this node's rank; nodes other than 0 run workers only, with no HTTP server")
    a("--master-addr", default="127.0.0.1", help="the head node's address (rank 0)")
    a("--master-port", type=int, default=None,
      help="the head's torch.distributed port (default: a free port on one node, 29500 on "
           "several)")
    a("--task", default="auto", choices=["auto", "generate", "embed", "embedding", "score"],
      help="embed/score: serve MODEL as a pooling model on /v1/embeddings, /v1/score and "
           "/v1/rerank (a cross-encoder scores pairs itself; an embedding model by cosine). "
           "auto: from its architecture")
    a("--runner", default="auto", choices=["auto", "generate", "pooling"],
      help="vLLM's newer spelling of --task: pooling = embed")
    a("--responses-store-size", type=int, default=1000,
      help="how many /v1/responses are kept for previous_response_id and GET (oldest evicted "
           "first)")
    a("--embedding-model", default=None,
      help="also serve this embedding model (a folder, or all-minilm-l6-v2, fetched once) on "
           "/v1/embeddings next to the chat model")
    a("--batch-storage-path", default=None,
      help="where the Batch API keeps its files and state (an SQLite database and a files "
           "folder), created on first use; default: batches/PORT in the minserve cache")
    a("--max-batch-file-size", type=_size, default=200 * 1024 * 1024,
      help="largest batch input file accepted by POST /v1/files (default 200MiB, as OpenAI)")
    a("--max-batch-file-lines", type=int, default=50_000,
      help="most requests in one batch input file (default 50000, as OpenAI)")
    a("--max-batch-storage-per-key", type=_size, default=1 << 30,
      help="bytes of batch files (uploads and outputs) one API key may keep (default 1GiB)")
    a("--max-batch-storage", type=_size, default=2 << 30,
      help="bytes of batch files all keys together may keep (default 2GiB)")
    a("--enable-lora", action="store_true", help="serve LoRA adapters (--lora-modules, or "
      "/v1/load_lora_adapter with VLLM_ALLOW_RUNTIME_LORA_UPDATING=True)")
    a("--lora-modules", action="append", type=_lora_module, default=None,
      metavar="NAME=PATH", help='adapters, name=path (several after one flag) or JSON '
      '{"name": ..., "path": ..., "base_model_name": ...}; requests select one by `model`')
    a("--max-loras", type=int, default=1, help="distinct adapters in one step (default 1)")
    a("--max-lora-rank", type=int, default=16, help="the largest adapter rank (default 16)")
    a("--max-cpu-loras", type=int, default=None,
      help="adapters kept loaded off the device (default --max-loras)")
    a("--lora-dtype", default="auto", help="auto (the model's dtype), bfloat16, float16, float32")
    a("--allow-lora-downloads", action="store_true",
      help="an adapter path (--lora-modules, /v1/load_lora_adapter) may be a Hugging Face hub "
           "id, fetched into the hub cache; without it only local folders load (minserve only)")
    return p


def parse_args(argv: list[str] | None = None,
               parser: argparse.ArgumentParser | None = None) -> argparse.Namespace:
    """parser: build_parser() with more flags (run-batch's); the checks are the same."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] == "serve":  # `minserve serve MODEL` as `vllm serve MODEL`
        argv = argv[1:]
    parser = parser or build_parser()
    args, unknown = parser.parse_known_args(_split_lora_modules(argv))
    if unknown:
        flags = " ".join(unknown)
        parser.error(f"unsupported argument(s): {flags} -- minserve does not implement these "
                     "(vLLM flags not listed in --help are not supported)")
    if args.model_tag and args.model and args.model_tag != args.model:
        parser.error(f"two models given: {args.model_tag!r} and --model {args.model!r}")
    args.model = args.model or args.model_tag
    if args.responses_store_size < 0:
        parser.error("--responses-store-size must be >= 0")
    if not args.timeout_keep_alive > 0:
        parser.error(f"--timeout-keep-alive {args.timeout_keep_alive}: must be > 0")
    if args.api_server_count != 1:
        parser.error(f"--api-server-count {args.api_server_count}: minserve runs one API server "
                     "in the engine's process (use 1); more need a separate engine process, "
                     "which does not exist yet")
    if args.max_logprobs < -1:
        parser.error(f"--max-logprobs {args.max_logprobs}: must be >= 0, or -1 for no limit")
    if not 0 <= args.port <= 65535:
        parser.error(f"--port {args.port}: must be in 0..65535")
    if min(args.max_batch_file_size, args.max_batch_file_lines, args.max_batch_storage,
           args.max_batch_storage_per_key) < 1:
        parser.error("--max-batch-file-size, --max-batch-file-lines, --max-batch-storage and "
                     "--max-batch-storage-per-key must be positive")
    if bool(args.ssl_keyfile) != bool(args.ssl_certfile):
        parser.error("--ssl-keyfile and --ssl-certfile go together")
    try:
        args.task = resolve_task(args.task, args.runner, args.model, args.embedding_model)
    except ValueError as e:
        parser.error(str(e))
    if args.task == "embed":
        args.model = args.model or DEFAULT_EMBEDDING_MODEL
    if args.lora_modules and not args.enable_lora:
        parser.error("--lora-modules needs --enable-lora")
    if args.enable_lora and args.task == "embed":
        parser.error("--enable-lora serves generation models only, not --task embed")
    if args.tensor_parallel_size > 1 and args.task == "embed" and args.nnodes > 1:
        parser.error("--task embed with --tensor-parallel-size > 1 runs on one node "
                     "(--nnodes 1)")
    try:
        args.engine_config = engine_config(args)
        args.pool_spec = models_dir.spec_from_args(args, args.engine_config)
    except ConfigError as e:
        parser.error(str(e))
    return args


def engine_config(args: argparse.Namespace) -> EngineConfig:
    """EngineConfig's fields are the flags' dests (vLLM's names); LoRA's knobs are one field."""
    names = [f.name for f in dataclasses.fields(EngineConfig) if hasattr(args, f.name)]
    return EngineConfig(
        **{name: getattr(args, name) for name in names},
        lora=LoRAConfig(args.lora_modules or [], args.max_loras, args.max_lora_rank,
                        args.max_cpu_loras, args.lora_dtype, args.allow_lora_downloads)
        if args.enable_lora else None)


def server_config(args: argparse.Namespace):  # -> ServerConfig (import kept lazy for --help)
    """ServerConfig's fields read from the flags of the same names (vLLM's), as engine_config."""
    from minserve.server import ServerConfig

    env_key = env.api_key()
    names = args.served_model_name or [args.model or DEFAULT_MODEL_NAME]
    embed_only = args.task == "embed"
    pool_only = getattr(args, "pool_spec", None) is not None and not args.model
    same = {f.name for f in dataclasses.fields(ServerConfig)} & set(vars(args))
    return ServerConfig(**{name: getattr(args, name) for name in same} | dict(
        served_model_names=[] if embed_only or pool_only else names,
        embedding_model_names=names if embed_only else [m for m in [args.embedding_model] if m],
        api_keys=args.api_key or ([env_key] if env_key else []),
        root_path=args.root_path.rstrip("/"), max_body_bytes=args.max_request_body_bytes,
        shutdown_grace_s=args.shutdown_timeout,
        log_requests=args.enable_log_requests and not args.disable_log_requests,
        model_root=args.model or DEFAULT_MODEL_NAME,
        structured_defaults=args.structured_outputs_config, log_stats=not args.disable_log_stats,
        lora_modules=args.lora_modules or [],
        allow_runtime_lora=args.enable_lora and env.allow_runtime_lora()))


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    level = "DEBUG" if args.log_level == "trace" else args.log_level.upper()
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("minserve.startup").setLevel(min(logging.INFO, logging.getLevelName(level)))
    if args.node_rank > 0:   # a node other than the head: workers only, no HTTP server
        from minserve.engine.builder import load_worker_runner
        from minserve.engine.workers import run_node

        logger.info("node %d/%d: tensor-parallel workers of %s:%s", args.node_rank, args.nnodes,
                    args.master_addr, args.engine_config.master_port or 29500)
        sys.exit(run_node(args.engine_config, load_worker_runner))
    from minserve.launch import serve

    sys.exit(asyncio.run(serve(args, server_config(args))))
