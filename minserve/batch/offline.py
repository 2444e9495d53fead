"""`python -m minserve run-batch -i IN -o OUT [serve flags]`, as `vllm run-batch`: every line of
an OpenAI batch file through the same app a server runs (in this process, no listener), all at
once under continuous batching; output lines in input order. A bad line gets an error line and the
run goes on. -o is written to a temporary file and renamed at the end (`-` streams to stdout);
-i `-` reads stdin."""
from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import os
import shutil
import sys
import tempfile
import time
from typing import Any, BinaryIO

import orjson

from minserve.batch.lines import BatchLine, error_line, is_success, iter_lines, line_usage
from minserve.batch.runner import LineRunner

logger = logging.getLogger("minserve.batch")


def build_parser() -> argparse.ArgumentParser:
    from minserve.cli import build_parser as serve_parser

    p = serve_parser()
    p.prog = "python -m minserve run-batch"
    p.description = ("Run an OpenAI batch file (JSONL: custom_id, method, url, body) through "
                     "the model offline. Takes every serve flag (the model, engine limits, ...).")
    p.add_argument("-i", "--input-file", required=True,
                   help="the batch input file, or - for stdin")
    p.add_argument("-o", "--output-file", required=True,
                   help="where the output lines go (written whole at the end), or - for stdout")
    p.add_argument("--output-tmp-dir", default=None,
                   help="folder for the output while it is written (default: -o's folder, so "
                        "the final rename stays on one filesystem)")
    # --enable-metrics (the server's flag, kept): here it serves Prometheus metrics on
    # --url:--port while the batch runs
    p.add_argument("--url", default="0.0.0.0", help="metrics address (with --enable-metrics)")
    return p


class _Progress:
    """A line on stderr at every 10% and at least every few seconds (a log line, not an
    animation: run-batch output usually lands in a log file)."""

    def __init__(self, total: int) -> None:
        self.total = total
        self.done = self.num_failed = self.num_output_tokens = 0
        self.start = self.last = time.monotonic()

    def update(self, ok: bool, num_output_tokens: int) -> None:
        self.done += 1
        self.num_failed += not ok
        self.num_output_tokens += num_output_tokens
        now = time.monotonic()
        step = max(self.total // 10, 1)
        if now - self.last >= 5.0 or self.done % step == 0 or self.done == self.total:
            self.last = now
            elapsed = max(now - self.start, 1e-9)
            sys.stderr.write(f"Processed lines: {self.done}/{self.total} ({self.num_failed} "
                             f"failed) {elapsed:.1f}s, {self.done / elapsed:.2f} lines/s, "
                             f"{self.num_output_tokens / elapsed:.1f} output tok/s\n")
            sys.stderr.flush()


class _OrderedWriter:
    """Writes output lines in input order as they complete; out-of-order ones wait in memory
    (bounded in practice by how far a slow line lags behind the ones in flight)."""

    def __init__(self, out: BinaryIO) -> None:
        self.out = out
        self.next_index = 0
        self.pending: dict[int, bytes] = {}

    def add(self, index: int, data: bytes) -> None:
        self.pending[index] = data
        while self.next_index in self.pending:
            self.out.write(self.pending.pop(self.next_index) + b"\n")
            self.next_index += 1


def _count_lines(path: str) -> int:
    with open(path, "rb") as f:
        return sum(1 for raw in f if raw.strip())


async def run_batch(args: argparse.Namespace, input_path: str, out: BinaryIO) -> int:
    """Every line of input_path -> out, in order. -> exit status (1: the model could not
    answer some lines, which then carry an error)."""
    from minserve.cli import server_config
    from minserve.embeddings.service import service_from_cli
    from minserve.server import create_app

    app = create_app(None if args.task == "embed" else args.engine_config, server_config(args),
                     embedding=service_from_cli(args))
    total = _count_lines(input_path)
    progress = _Progress(total)
    writer = _OrderedWriter(out)
    if args.enable_metrics:
        from prometheus_client import start_http_server
        start_http_server(args.port, args.url, registry=app.metrics.registry)
    await app.startup()   # the app serves the lines in this process, without a listener
    try:
        for service in app.services:
            try:
                await service.wait_ready()
            except Exception as e:  # noqa: BLE001 - the model failed to load: said below
                logger.error("the model failed to load: %s", e)
                return 1
        runner = LineRunner(app, 2 * args.max_num_seqs)

        async def on_result(line: BatchLine, result: dict[str, Any]) -> None:
            writer.add(line.index, orjson.dumps(result))
            progress.update(is_success(result), line_usage(result)[1])

        t0 = time.monotonic()
        with open(input_path, "rb") as f:
            await runner.run(iter_lines(f), on_result)
        elapsed = time.monotonic() - t0
        reason = next((s.dead_reason for s in app.services if not s.is_healthy), None)
    finally:
        await app.shutdown()
    num_unanswered = 0
    if writer.next_index < total or writer.pending:   # the engine stopped answering
        with open(input_path, "rb") as f:
            for line in iter_lines(f):
                if line.index >= writer.next_index and line.index not in writer.pending:
                    num_unanswered += 1
                    writer.add(line.index, orjson.dumps(error_line(line.custom_id, {
                        "code": "engine_failed", "line": line.line_no,
                        "message": f"the engine could not run this request: {reason}"})))
    sys.stderr.write(f"run-batch: {total} lines in {elapsed:.1f}s: "
                     f"{progress.done - progress.num_failed} succeeded, {progress.num_failed} "
                     f"failed{f', {num_unanswered} not run' if num_unanswered else ''}; "
                     f"{progress.num_output_tokens / max(elapsed, 1e-9):.1f} output tok/s\n")
    return 1 if num_unanswered else 0


@contextlib.contextmanager
def _input(path: str):
    """A local path, or - (stdin, spooled to a temporary file: the lines are read twice)."""
    if path != "-":
        if not os.path.isfile(path):
            raise SystemExit(f"run-batch: -i {path!r}: no such file")
        yield path
        return
    with tempfile.NamedTemporaryFile(prefix="minserve-run-batch-", suffix=".jsonl") as tmp:
        shutil.copyfileobj(sys.stdin.buffer, tmp)
        tmp.flush()
        yield tmp.name


def main(argv: list[str]) -> None:
    from minserve.cli import parse_args

    args = parse_args(argv, build_parser())
    level = "DEBUG" if args.log_level == "trace" else args.log_level.upper()
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    with _input(args.input_file) as input_path:
        if args.output_file == "-":
            code = asyncio.run(run_batch(args, input_path, sys.stdout.buffer))
            sys.stdout.flush()
            sys.exit(code)
        final = os.path.abspath(args.output_file)
        folder = os.path.abspath(args.output_tmp_dir or os.path.dirname(final))
        os.makedirs(folder, exist_ok=True)
        fd, temp = tempfile.mkstemp(prefix=".run-batch-", suffix=".jsonl", dir=folder)
        staged = temp
        try:
            with os.fdopen(fd, "wb") as out:
                code = asyncio.run(run_batch(args, input_path, out))
                out.flush()
                os.fsync(out.fileno())
            if folder != os.path.dirname(final):   # the rename must stay on one filesystem
                fd, staged = tempfile.mkstemp(prefix=".run-batch-", suffix=".jsonl",
                                              dir=os.path.dirname(final))
                with os.fdopen(fd, "wb") as dst, open(temp, "rb") as src:
                    shutil.copyfileobj(src, dst, 1 << 20)
                    dst.flush()
                    os.fsync(dst.fileno())
            # NOTE: the rename is the commit: a run killed before it leaves -o as it was
            os.replace(staged, final)
        finally:
            for path in {temp, staged}:
                with contextlib.suppress(FileNotFoundError):
                    os.remove(path)
    sys.stderr.write(f"run-batch: wrote {final}\n")
    sys.exit(code)
