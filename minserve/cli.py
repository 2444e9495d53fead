"""`python -m minserve [serve] [MODEL] [flags]`: vLLM's flag names -> EngineConfig/ServerConfig,
then granian in-process (embedded server, ASGI interface, one worker) with graceful SIGTERM/SIGINT.
Does not import torch itself; the engine thread does."""
from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import pathlib
import re
import signal
import socket
import sys

from minserve import __version__
from minserve.config import DEFAULT_MODEL_NAME, ConfigError, EngineConfig
from minserve.embeddings.models import DEFAULT_EMBEDDING_MODEL, resolve_task
from minserve.reasoning import REASONING_PARSERS
from minserve.tool_parsers.registry import TOOL_PARSERS

logger = logging.getLogger("minserve")

API_KEY_ENVS = ("VLLM_API_KEY", "MINSERVE_API_KEY")
LOG_LEVELS = ("critical", "error", "warning", "info", "debug", "trace")


# Connections: at most MAX_CONNECTIONS open at once (granian's backpressure: past it, new ones
# wait in the listen backlog until a slot frees), each needing a file descriptor, so the limit
# also stays FD_RESERVE below the open-files limit, which is raised to its hard maximum.
MAX_CONNECTIONS = 8192
FD_RESERVE = 512
BACKLOG = 4096  # the kernel caps it at net.core.somaxconn


def connection_limit() -> int:
    """Raise RLIMIT_NOFILE's soft limit to the hard one; -> the connections to allow."""
    try:
        import resource
    except ImportError:  # not on POSIX
        return 1024
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = MAX_CONNECTIONS + FD_RESERVE
    if soft != resource.RLIM_INFINITY and soft < want:
        new = want if hard == resource.RLIM_INFINITY else min(want, hard)
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (new, hard))
            soft = new
        except (ValueError, OSError):
            pass
    if soft == resource.RLIM_INFINITY:
        return MAX_CONNECTIONS
    limit = min(MAX_CONNECTIONS, soft - FD_RESERVE)
    if limit < 1024:
        logger.warning("the open-files limit (%d) allows only %d connections; raise it "
                       "(ulimit -n) to serve more clients", soft, max(limit, 64))
    return max(limit, 64)


def check_port_free(host: str, port: int) -> None:
    """granian always binds with SO_REUSEPORT, so a second server on a port in use would start
    and silently take half its connections: bind once without it first (SystemExit if taken)."""
    if port == 0:
        return
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # TIME_WAIT leftovers are fine
        try:
            s.bind((host, port))
        except OSError as e:
            raise SystemExit(f"minserve: cannot listen on {host}:{port}: {e.strerror} (another "
                             "server is there? pass --reuse-port to share the port with it "
                             "on purpose)") from None


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


def _path(text: str | None) -> pathlib.Path | None:
    return pathlib.Path(text) if text else None


def _origins(text: str) -> list[str]:
    text = text.strip()
    if text.startswith("["):
        value = json.loads(text)
        if not isinstance(value, list):
            raise argparse.ArgumentTypeError("--allowed-origins must be a JSON list")
        return [str(v) for v in value]
    return [o.strip() for o in text.split(",") if o.strip()]


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
    a("--api-key", default=None, help="require `Authorization: Bearer KEY` on /v1 and tokenize "
      f"routes (also read from {' or '.join(API_KEY_ENVS)})")
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
    a("--enable-prefix-caching", action=argparse.BooleanOptionalAction, default=True)
    a("--block-size", type=int, default=16)
    a("--chat-template", default=None, help="a jinja2 chat template file or its text")
    a("--generation-config", default="auto",
      help="auto (sampling defaults from the model's generation_config.json), vllm (none), or a "
           "folder")
    a("--load-format", default="auto", choices=["auto", "safetensors", "gguf", "dummy"])
    a("--seed", type=int, default=0)
    a("--enforce-eager", action="store_true",
      help="accepted for vLLM compatibility; changes nothing yet: minserve does not capture "
           "CUDA graphs, so it always runs eagerly")
    a("--disable-log-requests", action="store_true", help="do not log each request (default)")
    a("--enable-log-requests", action="store_true", help="log each request's size and params")
    a("--log-level", "--uvicorn-log-level", dest="log_level", default="info", choices=LOG_LEVELS)
    a("--allowed-origins", type=_origins, default=["*"],
      help='CORS origins, a JSON list or comma-separated (default ["*"])')
    a("--root-path", default="", help="path prefix when behind a path-based proxy")
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
           "(default 999); more is a 400")
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
      help='allow tool_choice "auto" (needs --tool-call-parser); "required" and a named '
           "function work without it")
    a("--tool-call-parser", default=None, choices=sorted(TOOL_PARSERS),
      help="the model's tool-call format, for tool_choice \"auto\"")
    a("--reasoning-parser", default=None, choices=sorted(REASONING_PARSERS),
      help="split the model's <think> text into reasoning_content")
    a("--tensor-parallel-size", "-tp", type=int, default=1,
      help="shard the model over N ranks (N-1 worker processes; gloo on CPU, NCCL on GPUs)")
    a("--distributed-executor-backend", default="mp",
      help="mp (worker processes; the only one supported)")
    a("--nnodes", type=int, default=1, help="nodes the ranks span (torchrun's meaning)")
    a("--node-rank", type=int, default=0,
      help="this node's rank; nodes other than 0 run workers only, with no HTTP server")
    a("--master-addr", default="127.0.0.1", help="the head node's address (rank 0)")
    a("--master-port", type=int, default=None,
      help="the head's torch.distributed port (default: a free port on one node, 29500 on "
           "several)")
    a("--task", default="auto", choices=["auto", "generate", "embed", "embedding"],
      help="embed: serve MODEL as an embedding model on /v1/embeddings (auto: from its "
           "architecture)")
    a("--runner", default="auto", choices=["auto", "generate", "pooling"],
      help="vLLM's newer spelling of --task: pooling = embed")
    a("--responses-store-size", type=int, default=1000,
      help="how many /v1/responses are kept for previous_response_id and GET (oldest evicted "
           "first)")
    a("--embedding-model", default=None,
      help="also serve this embedding model (a folder, or all-minilm-l6-v2, fetched once) on "
           "/v1/embeddings next to the chat model")
    return p


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] == "serve":  # `minserve serve MODEL` as `vllm serve MODEL`
        argv = argv[1:]
    parser = build_parser()
    args, unknown = parser.parse_known_args(argv)
    if unknown:
        flags = " ".join(unknown)
        parser.error(f"unsupported argument(s): {flags} -- minserve does not implement these "
                     "(vLLM flags not listed in --help are not supported)")
    if args.model_tag and args.model and args.model_tag != args.model:
        parser.error(f"two models given: {args.model_tag!r} and --model {args.model!r}")
    args.model = args.model or args.model_tag
    if args.enable_auto_tool_choice and not args.tool_call_parser:
        parser.error("--enable-auto-tool-choice needs --tool-call-parser "
                     f"({', '.join(sorted(TOOL_PARSERS))})")
    if args.responses_store_size < 0:
        parser.error("--responses-store-size must be >= 0")
    if not args.timeout_keep_alive > 0:
        parser.error(f"--timeout-keep-alive {args.timeout_keep_alive}: must be > 0")
    if not 0 <= args.port <= 65535:
        parser.error(f"--port {args.port}: must be in 0..65535")
    if bool(args.ssl_keyfile) != bool(args.ssl_certfile):
        parser.error("--ssl-keyfile and --ssl-certfile go together")
    try:
        args.task = resolve_task(args.task, args.runner, args.model, args.embedding_model)
    except ValueError as e:
        parser.error(str(e))
    if args.task == "embed":
        args.model = args.model or DEFAULT_EMBEDDING_MODEL
    if args.tensor_parallel_size > 1 and (args.task == "embed" or args.embedding_model):
        parser.error("--tensor-parallel-size > 1 shards the chat model only; serve embedding "
                     "models with 1")
    try:
        args.engine_config = engine_config(args)
    except ConfigError as e:
        parser.error(str(e))
    return args


def engine_config(args: argparse.Namespace) -> EngineConfig:
    return EngineConfig(
        model=args.model, tokenizer=args.tokenizer, revision=args.revision,
        served_model_name=args.served_model_name, dtype=args.dtype, device=args.device,
        max_model_len=args.max_model_len, gpu_memory_utilization=args.gpu_memory_utilization,
        kv_cache_memory=args.kv_cache_memory, max_num_seqs=args.max_num_seqs,
        max_num_batched_tokens=args.max_num_batched_tokens,
        long_prefill_token_threshold=args.long_prefill_token_threshold,
        max_chunk_attention=args.max_chunk_attention,
        enable_prefix_caching=args.enable_prefix_caching, block_size=args.block_size,
        load_format=args.load_format, seed=args.seed, enforce_eager=args.enforce_eager,
        chat_template=args.chat_template, generation_config=args.generation_config,
        tensor_parallel_size=args.tensor_parallel_size,
        distributed_executor_backend=args.distributed_executor_backend, nnodes=args.nnodes,
        node_rank=args.node_rank, master_addr=args.master_addr, master_port=args.master_port,
        limit_mm_per_prompt=args.limit_mm_per_prompt,
        allowed_local_media_path=args.allowed_local_media_path,
        allowed_media_domains=args.allowed_media_domains,
        allow_private_media_urls=args.allow_private_media_urls)


def server_config(args: argparse.Namespace):  # -> ServerConfig (import kept lazy for --help)
    from minserve.server import ServerConfig

    key = args.api_key or next((os.environ[e] for e in API_KEY_ENVS if os.environ.get(e)), None)
    names = args.served_model_name or [args.model or DEFAULT_MODEL_NAME]
    embed_only = args.task == "embed"
    return ServerConfig(
        served_model_names=[] if embed_only else names,
        embedding_model_names=names if embed_only else [m for m in [args.embedding_model] if m],
        api_keys=[key] if key else [], allowed_origins=args.allowed_origins,
        root_path=args.root_path.rstrip("/"), max_body_bytes=args.max_request_body_bytes,
        shutdown_grace_s=args.shutdown_timeout,
        log_requests=args.enable_log_requests and not args.disable_log_requests,
        model_root=args.model or DEFAULT_MODEL_NAME,
        enable_auto_tool_choice=args.enable_auto_tool_choice,
        tool_call_parser=args.tool_call_parser, reasoning_parser=args.reasoning_parser,
        responses_store_size=args.responses_store_size)


async def serve(args: argparse.Namespace) -> int:
    from granian.constants import HTTPModes, Interfaces
    from granian.http import HTTP1Settings
    from granian.log import LogLevels
    from granian.server.embed import Server

    from minserve.embeddings.service import service_from_cli
    from minserve.server import create_app
    from minserve.shutdown import GracefulShutdown

    if not args.reuse_port:
        check_port_free(args.host, args.port)
    app = create_app(None if args.task == "embed" else args.engine_config, server_config(args),
                     embedding=service_from_cli(args))
    scheme = "https" if args.ssl_certfile else "http"
    url = f"{scheme}://{args.host}:{args.port}{args.root_path.rstrip('/')}/v1"
    # NOTE: HTTP/1.1 only, as vLLM's uvicorn: in granian's auto mode a connection that sends
    # nothing waits in HTTP/1-or-2 detection with no timeout, so ~1,030 idle connections used
    # up every connection slot and locked all clients out. In HTTP/1 mode hyper's header read
    # timeout runs from the start and between keep-alive requests: it is the idle timeout.
    server = Server(app, address=args.host, port=args.port, interface=Interfaces.ASGI,
                    log_level=LogLevels(args.log_level if args.log_level != "trace" else "debug"),
                    # granian wants Paths here (a str fails inside its TLS set-up)
                    ssl_cert=_path(args.ssl_certfile), ssl_key=_path(args.ssl_keyfile),
                    http=HTTPModes.http1, websockets=False,
                    http1_settings=HTTP1Settings(
                        header_read_timeout=int(args.timeout_keep_alive * 1000)),
                    backlog=BACKLOG, backpressure=connection_limit())
    exit_code = 0
    primary = app.services[0]  # the chat engine, or the embedding service serving alone

    def on_ready() -> None:
        info = primary.info
        logger.info("loaded %s (%s) max_model_len=%d; KV cache: %d blocks = %s tokens",
                    app.model_name, info.architecture, info.max_model_len, info.num_kv_blocks,
                    info.num_kv_blocks * info.block_size)
        logger.info("ready: OpenAI API at %s (model %r)", url, app.model_name)

    def on_dead(reason: str, force: bool = False) -> None:
        nonlocal exit_code
        # the model never loaded, or a tensor-parallel rank died: exit non-zero
        if force or not primary.is_ready or args.tensor_parallel_size > 1:
            logger.error("engine failed to start: %s", reason)
            exit_code = 1
            server.stop()

    primary.on_ready, primary.on_dead = on_ready, on_dead
    if app.chat is not None and app.embedding is not None:
        # the embedding model failing to load ends the server too (chat alone was not asked for)
        app.embedding.on_dead = lambda reason: on_dead(f"embedding model: {reason}", force=True)
    loop = asyncio.get_running_loop()
    shutdown = GracefulShutdown(server, app, args.port)
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, shutdown.begin)
    logger.info("minserve %s: loading %s; listening on %s (/health is 503 until loaded)",
                __version__, args.model or DEFAULT_MODEL_NAME, url)
    await server.serve()
    return exit_code


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    level = "DEBUG" if args.log_level == "trace" else args.log_level.upper()
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if args.node_rank > 0:   # a node other than the head: workers only, no HTTP server
        from minserve.engine.engine import load_worker_runner
        from minserve.engine.workers import run_node

        logger.info("node %d/%d: tensor-parallel workers of %s:%s", args.node_rank, args.nnodes,
                    args.master_addr, args.engine_config.master_port or 29500)
        sys.exit(run_node(args.engine_config, load_worker_runner))
    sys.exit(asyncio.run(serve(args)))
