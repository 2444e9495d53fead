"""Tensor-parallel workers over torch.distributed. Rank 0 is the Engine (it keeps the scheduler
and samples); before each step it broadcasts the StepInputs as int64 tensors, and every other
rank runs the same forward on its shards. Starts the local worker processes, runs a node other
than the head (workers only, no HTTP), stops them all. Never unpickles what another rank sent.

Ranks are laid out node after node: with tp = 4 and nnodes = 2, node 0 runs ranks 0 (the
head) and 1, node 1 ranks 2 and 3 (cuda:local_rank on a GPU).

The plan on the wire (one header broadcast, then one payload broadcast, both on the cpu group):
    header  [R, T, S, P, B, has_prompt_logprobs, has_images, A, L, D]  (R = -1: stop)
    payload num_scheduled_tokens[R] | num_computed_tokens[R] | token_ids[T] | sample_rows[S] |
            prompt-logprob rows[P] | their counts[P] | block table lengths[R] | block ids[B] |
            LoRA slot per row[A: R or 0] | the LoRA slot loads as UTF-8 JSON bytes[L] |
            drafts per row[D: R or 0] (speculative decoding: the rows sample at 1 + k tokens;
            the drafter itself runs on rank 0 only)
A step with images, and every step of an M-RoPE model, then broadcasts rank 0's image-merged
embeddings and positions on the device group (ModelRunner.share_from_head): the vision encoder
and the requests' images stay on rank 0.
"""
from __future__ import annotations

import json
import logging
import multiprocessing
import os
import signal
import socket
import threading
from collections.abc import Callable
from typing import Any, TypeVar

import torch

from minserve.config import ConfigError, EngineConfig, ModelConfig
from minserve.engine.runner import ModelRunner, PromptLogprobInputs, StepInputs
from minserve.env import step_timeout_s
from minserve.models import parallel

logger = logging.getLogger("minserve.workers")
T = TypeVar("T")

_HEADER_LEN = 13
_STOP = -1
_DEFAULT_MULTI_NODE_PORT = 29500   # torchrun's


# ---- the step plan as plain int64 tensors ----------------------------------------------------
def encode_step(step: StepInputs) -> tuple[torch.Tensor, torch.Tensor]:
    plp = step.prompt_logprobs
    plp_rows, plp_counts = (plp.rows, plp.counts) if plp is not None else ([], [])
    tables = step.block_tables
    block_ids = [b for table in tables for b in table]
    slots = list(step.adapter_slots or [])
    loads = list(json.dumps(step.lora_loads).encode()) if step.lora_loads else []
    drafts = list(step.num_draft_tokens or [])
    states, saves, restores = (list(x or []) for x in (step.state_slots, step.state_saves,
                                                        step.state_restores))
    header = [len(step.num_scheduled_tokens), len(step.token_ids), len(step.sample_rows),
              len(plp_rows), len(block_ids), int(plp is not None), int(bool(step.mm_inputs)),
              len(slots), len(loads), len(drafts), len(states), len(saves), len(restores)]
    payload = (list(step.num_scheduled_tokens) + list(step.num_computed_tokens)
               + list(step.token_ids) + list(step.sample_rows) + plp_rows + plp_counts
               + [len(t) for t in tables] + block_ids + slots + loads + drafts + states + saves
               + restores)
    return (torch.tensor(header, dtype=torch.int64), torch.tensor(payload, dtype=torch.int64))


def decode_step(header: list[int], payload: torch.Tensor) -> StepInputs:
    """A worker's StepInputs: no sampling tensors (rank 0 samples), the prompt-logprob rows and
    counts only (they decide which logits rows exist, which the vocab gather must agree on), no
    images and M-RoPE placeholders (rank 0 broadcasts both: ModelRunner.share_from_head)."""
    R, T, S, P, _, has_plp, _, A, L, D, N, V, X = header
    values, pos = payload.tolist(), 0

    def take(n: int) -> list[int]:
        nonlocal pos
        pos += n
        return values[pos - n:pos]

    counts, computed, token_ids, sample_rows = take(R), take(R), take(T), take(S)
    plp_rows, plp_counts, lens = take(P), take(P), take(R)
    tables = [take(n) for n in lens]
    slots, loads, drafts, states = take(A) or None, take(L), take(D) or None, take(N) or None
    saves, restores = take(V), take(X)
    plp = PromptLogprobInputs(plp_rows, plp_counts, [], []) if has_plp else None
    return StepInputs(token_ids, counts, computed, tables, sample_rows, None, plp,
                      mrope=[(None, 0)] * R, adapter_slots=slots,
                      lora_loads=json.loads(bytes(loads).decode()) if loads else None,
                      num_draft_tokens=drafts, state_slots=states, state_saves=saves,
                      state_restores=restores)


def payload_len(header: list[int]) -> int:
    """The payload's length encode_step wrote under this header (what a worker receives)."""
    R, T, S, P, B = header[:5]
    return 3 * R + T + S + 2 * P + B + sum(header[7:_HEADER_LEN])


def _recv_step() -> tuple[StepInputs, bool] | None:
    """The next step and whether it has images; None: stop."""
    header = torch.empty(_HEADER_LEN, dtype=torch.int64)
    parallel.broadcast_from_head(header)
    h = header.tolist()
    if h[0] == _STOP:
        return None
    payload = torch.empty(payload_len(h), dtype=torch.int64)
    parallel.broadcast_from_head(payload)
    return decode_step(h, payload), bool(h[6])


# ---- rank layout -----------------------------------------------------------------------------
def _ranks_per_node(config: EngineConfig) -> int:
    return config.tensor_parallel_size // config.nnodes


def _master_port(config: EngineConfig) -> int:
    if config.master_port is not None:
        return config.master_port
    if config.nnodes > 1:
        return _DEFAULT_MULTI_NODE_PORT
    with socket.socket() as s:   # one node: any free loopback port
        s.bind((config.master_addr, 0))
        return s.getsockname()[1]


def join_group(config: EngineConfig, rank: int, port: int, device: torch.device) -> None:
    parallel.init(rank, config.tensor_parallel_size, config.master_addr, port, device,
                  step_timeout_s())


# ---- the head (rank 0) -----------------------------------------------------------------------
class Workers:
    """The head's side: the local worker processes, and the broadcast of each step's plan."""

    def __init__(self, config: EngineConfig, model_config: ModelConfig, device: torch.device,
                 load_runner: Callable[..., ModelRunner]) -> None:
        """load_runner(config, rank, local_rank, port): a worker's runner (builder.py's
        load_worker_runner, or an embedding model's), passed in: this module imports neither."""
        parallel.check_divisible(model_config, config.tensor_parallel_size)
        self._timeout_s = step_timeout_s()
        port = _master_port(config)
        self._procs, self._pipes = _spawn_local(config, port, range(1, _ranks_per_node(config)),
                                                load_runner)
        try:
            join_group(config, 0, port, device)
        except BaseException:
            self.kill()
            raise

    def run(self, step: StepInputs, run_head: Callable[[], T]) -> T:
        """Broadcast the step, then run rank 0's part of it. A rank that died or timed out fails
        the step, and the local workers are killed: the others may be stuck in a collective."""
        try:
            dead = [p for p in self._procs if p.exitcode is not None]
            if dead:
                raise RuntimeError(f"tensor-parallel worker {dead[0].name} exited "
                                   f"(code {dead[0].exitcode})")
            header, payload = encode_step(step)
            parallel.broadcast_from_head(header, self._timeout_s)
            parallel.broadcast_from_head(payload, self._timeout_s)
            return run_head()
        except BaseException:
            self.kill()
            raise

    def shutdown(self) -> None:
        """Tell every rank (other nodes' too) to stop, then wait for the local ones."""
        try:
            if not any(p.exitcode is not None for p in self._procs):
                parallel.broadcast_from_head(torch.tensor([_STOP] + [0] * (_HEADER_LEN - 1)),
                                             self._timeout_s)
        except Exception:  # a rank already gone: the kill below does the rest
            logger.warning("could not tell the workers to stop; killing them")
        for p in self._procs:
            p.join(10)
        self.kill()
        try:
            parallel.destroy()
        except Exception:   # a group whose peers died may not tear down cleanly
            logger.warning("torch.distributed teardown failed", exc_info=True)

    def kill(self) -> None:
        """SIGKILL the local workers (after a failed step: they may be stuck in a collective)."""
        for p in self._procs:
            if p.exitcode is None:
                p.kill()
            p.join(5)
        for w in self._pipes:
            w.close()
        self._pipes = []


def _spawn_local(config: EngineConfig, port: int, local_ranks: range,
                 load_runner: Callable[..., ModelRunner]) -> tuple[list[Any], list[Any]]:
    """One process per local rank, each with the read end of a pipe whose write end only this
    process holds: when this process dies (SIGKILL included) the worker reads EOF and exits."""
    ctx = multiprocessing.get_context("spawn")
    base = config.node_rank * _ranks_per_node(config)
    procs, pipes = [], []
    for local_rank in local_ranks:
        reader, writer = ctx.Pipe(duplex=False)
        p = ctx.Process(target=_worker_main, name=f"minserve-tp{base + local_rank}",
                        args=(config, base + local_rank, local_rank, port, reader, load_runner),
                        daemon=True)
        p.start()
        reader.close()
        procs.append(p)
        pipes.append(writer)
    return procs, pipes


# ---- a worker (rank > 0) ---------------------------------------------------------------------
def _exit_with_parent(reader: Any) -> None:
    try:
        reader.recv()
    except (EOFError, OSError):
        pass
    os._exit(1)


def _worker_main(config: EngineConfig, rank: int, local_rank: int, port: int,
                 reader: Any, load_runner: Callable[..., ModelRunner]) -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)   # Ctrl-C is the head's to handle
    threading.Thread(target=_exit_with_parent, args=(reader,), daemon=True).start()
    logging.basicConfig(level=logging.INFO,
                        format=f"%(asctime)s %(levelname)s rank{rank}: %(message)s")
    try:
        runner = load_runner(config, rank, local_rank, port)
        with torch.inference_mode():
            while (received := _recv_step()) is not None:
                step, has_images = received
                if step.lora_loads:   # the slots rank 0 filled for this step (LoRA)
                    runner.lora_manager.load_slots(step.lora_loads)
                inputs = runner.prepare_inputs(step)
                if has_images:   # the embedding lookup's all-reduce; rank 0 adds the images
                    inputs.inputs_embeds = runner.model.embed_input_ids(inputs.input_ids)
                runner.share_from_head(inputs, has_images)
                runner.sample(runner.run_model(inputs), inputs, step)
    except Exception:
        logger.exception("tensor-parallel rank %d failed", rank)
        os._exit(1)
    parallel.destroy()


def run_node(config: EngineConfig, load_runner: Callable[..., ModelRunner]) -> int:
    """A node other than the head: its ranks only, until the head stops them (exit 0) or a rank
    fails or the head goes away (exit 1). SIGTERM/SIGINT stop the node's workers."""
    if config.node_rank == 0:
        raise ConfigError("node rank 0 is the head: it serves the API")
    procs, pipes = _spawn_local(config, _master_port(config), range(_ranks_per_node(config)),
                                load_runner)
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    from multiprocessing.connection import wait

    pending = list(procs)
    while pending and not stop.is_set():
        for sentinel in wait([p.sentinel for p in pending], timeout=0.5):
            pending = [p for p in pending if p.sentinel != sentinel]
        if any(p.exitcode for p in procs if p.exitcode is not None):
            break
    for p in procs:
        if p.exitcode is None:
            p.terminate()
        p.join(10)
        if p.exitcode is None:
            p.kill()
            p.join()
    for w in pipes:
        w.close()
    return 0 if stop.is_set() or all(p.exitcode == 0 for p in procs) else 1
