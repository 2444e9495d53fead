"""One tensor-parallel rank for the tp tests:
`python tests/tp_ranks.py RANK WORLD PORT OUT FOLDER...` joins the gloo group, runs STEPS through
each folder's sharded model on a hand-built paged cache, and (rank 0) saves the gathered logits
to OUT/<n>.pt for the test to compare with one process (spawn_ranks starts both ranks once and
reads them back; assert_steps_match compares). FOLDER::METHOD loads with --quantization METHOD
(options: load_spec). MINSERVE_TEST_REFERENCE_INT=1 keeps int4 layers on the plain-torch
reference GEMM (as test_quant_models.py's fixture does)."""
from __future__ import annotations

import os
import subprocess
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from minserve.models import parallel  # noqa: E402
from tests.paged_runner import PagedRunner, load_ours  # noqa: E402

# (request id, new token ids) per step: two chunked prefills, then a chunk beside a decode,
# then decodes of both (20 + 13 tokens cross the 16-token block edges)
STEPS = [
    [("a", list(range(3, 13))), ("b", list(range(40, 60)))],
    [("a", list(range(100, 113))), ("b", [7])],
    [("a", [9]), ("b", [11])],
    [("a", [300]), ("b", [301])],
]


def load_spec(spec: str):
    """FOLDER, FOLDER::QUANTIZATION, FOLDER::ep or FOLDER::QUANTIZATION+ep (a mixture of
    experts under --enable-expert-parallel) -> the model, as on one process."""
    folder, _, options = spec.partition("::")
    options = options.split("+") if options else []
    quantization = next((o for o in options if o != "ep"), None)
    return load_ours(folder, quantization=quantization, expert_parallel="ep" in options)


def run_steps(model) -> list[torch.Tensor]:
    """Every step's logits, [sum of query lens, V] each (empty on a rank > 0)."""
    runner = PagedRunner(model, block_size=16, num_blocks=16, seed=3)
    out = []
    for batch in STEPS:
        logits = runner.step(batch)
        if logits:
            out.append(torch.cat(logits))
    return out


def spawn_ranks(specs: list[str], out_dir: str, timeout: float = 600,
                env: dict[str, str] | None = None) -> list[list[torch.Tensor]]:
    """Both ranks of a 2-process gloo group (this script, started once for all the specs) run
    every spec in turn; rank 0's logits per spec, in order. A rank that fails or outlives
    `timeout` fails the caller, and neither rank is left running."""
    from tests.serving import free_port

    port, script = str(free_port()), os.path.abspath(__file__)
    procs = [subprocess.Popen([sys.executable, script, str(r), "2", port, str(out_dir), *specs],
                              env=env) for r in range(2)]
    try:
        codes = [p.wait(timeout=timeout) for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    assert codes == [0, 0], f"tp ranks exited with {codes}"
    return [torch.load(os.path.join(out_dir, f"{i}.pt"), weights_only=True)
            for i in range(len(specs))]


def assert_steps_match(ours: list[torch.Tensor], theirs: list[torch.Tensor],
                       atol: float = 2e-4, rtol: float = 1e-4) -> None:
    """One process's run_steps logits against the gathered sharded ones, step by step: close,
    and the same argmax token in every row."""
    assert len(ours) == len(theirs) == len(STEPS)
    for a, b in zip(ours, theirs, strict=True):
        torch.testing.assert_close(b, a, atol=atol, rtol=rtol)
        assert torch.equal(a.argmax(-1), b.argmax(-1))


def main() -> None:
    rank, world, port, out_dir, *folders = sys.argv[1:]
    if os.environ.get("MINSERVE_TEST_REFERENCE_INT") == "1":
        import minserve.kernels.dispatch as dispatch

        dispatch.cpu_int4_supported = lambda w: False
    parallel.init(int(rank), int(world), "127.0.0.1", int(port), torch.device("cpu"), 120)
    for i, folder in enumerate(folders):
        logits = run_steps(load_spec(folder))
        if int(rank) == 0:
            torch.save(logits, os.path.join(out_dir, f"{i}.pt"))
    parallel.destroy()


if __name__ == "__main__":
    main()
