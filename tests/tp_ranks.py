"""One tensor-parallel rank for test_tp.py: `python tests/tp_ranks.py RANK WORLD PORT OUT FOLDER...`
joins the gloo group, runs STEPS through each folder's sharded model on a hand-built paged cache,
and (rank 0) saves the gathered logits to OUT/<n>.pt for the test to compare with one process.
FOLDER::METHOD loads with --quantization METHOD (options: load_spec). MINSERVE_TEST_REFERENCE_INT=1
keeps int4 layers on the plain-torch reference GEMM (as test_quant_models.py's fixture does)."""
from __future__ import annotations

import os
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
