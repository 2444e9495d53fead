"""Starts the server the flags describe: granian in-process (embedded server, ASGI interface, one
worker, HTTP/1.1), the port and open-files checks before it, the ready/dead hooks and the signals.
Does not import torch itself; the engine thread does."""
from __future__ import annotations

import argparse
import asyncio
import logging
import os
import pathlib
import signal
import socket
import sys
from typing import TYPE_CHECKING

from minserve import __version__
from minserve.config import DEFAULT_MODEL_NAME

if TYPE_CHECKING:
    from minserve.server import ServerConfig

logger = logging.getLogger("minserve")
# The start-up lines (loading, ready, the URL) print at any --uvicorn-log-level (cli.main keeps
# this logger at INFO), as vLLM's "Uvicorn running on" does.
startup_logger = logging.getLogger("minserve.startup")

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


def _path(text: str | None) -> pathlib.Path | None:
    return pathlib.Path(text) if text else None


async def serve(args: argparse.Namespace, config: ServerConfig) -> int:
    from granian.constants import HTTPModes, Interfaces
    from granian.http import HTTP1Settings
    from granian.log import LogLevels
    from granian.server.embed import Server

    from minserve.embeddings.service import service_from_cli
    from minserve.server import create_app
    from minserve.shutdown import GracefulShutdown

    if not args.reuse_port:
        check_port_free(args.host, args.port)
    pool = getattr(args, "pool_spec", None)
    pool_only = pool is not None and not args.model
    app = create_app(None if args.task == "embed" or pool_only else args.engine_config, config,
                     embedding=service_from_cli(args), batches=batch_service_from_cli(args),
                     pool=pool)
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
    logging.getLogger("_granian").addFilter(_quiet_granian)
    exit_code = 0
    # the chat engine, or the embedding service serving alone; none for a pool alone
    primary = app.services[0] if app.services else _Ready()

    def on_ready() -> None:
        info = primary.info
        startup_logger.info("loaded %s (%s) max_model_len=%d; KV cache: %d blocks = %s tokens",
                            app.model_name, info.architecture, info.max_model_len,
                            info.num_kv_blocks, info.num_kv_blocks * info.block_size)
        startup_logger.info("ready: OpenAI API at %s (model %r)", url, app.model_name)

    def on_dead(reason: str, force: bool = False) -> None:
        nonlocal exit_code
        # the model never loaded, or a tensor-parallel rank died: exit non-zero
        if force or not primary.is_ready or args.tensor_parallel_size > 1:
            logger.error("engine failed to start: %s", reason)
            exit_code = 1
            if not primary.is_ready and not force:
                # NOTE: nothing was served, so nothing needs a graceful stop; stopping granian
                # while its workers still start died of a Rust panic about once in 13 runs
                # (exit -6). Leave at once, deterministically: exit 1 after the one error line.
                for handler in logging.getLogger().handlers:
                    handler.flush()
                sys.stdout.flush()
                sys.stderr.flush()
                os._exit(1)
            server.stop()

    primary.on_ready, primary.on_dead = on_ready, on_dead
    if app.chat is not None and app.embedding is not None:
        # the embedding model failing to load ends the server too (chat alone was not asked for)
        app.embedding.on_dead = lambda reason: on_dead(f"embedding model: {reason}", force=True)
    loop = asyncio.get_running_loop()
    shutdown = GracefulShutdown(server, app, args.port)
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, shutdown.begin)
    if pool_only:
        startup_logger.info("minserve %s: ready: OpenAI API at %s; models loaded on demand: "
                            "%s", __version__, url, ", ".join(m.name for m in pool.models))
    else:
        startup_logger.info("minserve %s: loading %s; listening on %s (/health is 503 until "
                            "loaded)", __version__, args.model or DEFAULT_MODEL_NAME, url)
    await server.serve()
    return exit_code


class _Ready:
    """A pool alone has no model to wait for at start-up: nothing to report."""
    is_ready, on_ready, on_dead = True, None, None


def batch_service_from_cli(args: argparse.Namespace):  # -> BatchService
    from minserve.batch.service import BatchLimits, BatchService
    from minserve.config import cache_dir

    # per port: two servers on one box keep apart, a restart on the same port resumes
    root = args.batch_storage_path or os.path.join(cache_dir(), "batches", str(args.port))
    return BatchService(os.path.expanduser(root), BatchLimits(
        max_file_bytes=args.max_batch_file_size, max_file_lines=args.max_batch_file_lines,
        max_in_flight=2 * args.max_num_seqs, max_storage_bytes=args.max_batch_storage,
        max_storage_per_key_bytes=args.max_batch_storage_per_key))


def _quiet_granian(record: logging.LogRecord) -> bool:
    """granian's embedded mode warns that it is experimental on every start: not for our users."""
    return "is experimental" not in record.getMessage()
