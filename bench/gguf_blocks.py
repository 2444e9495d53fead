"""GGUF weights on CPU: the native block kernel (kernels/cpu_gguf.c, the file's bytes) against
the same weight repacked into the int layout (cpu_int_gemm.c, more bytes, a simpler inner loop),
at decode row counts, each on int8 and on exact fp32 activations (kernels/cpu_native.py), the
four sides alternating within each round; prints every round and the medians (microseconds per
call) with the load average. kernels/dispatch.py's CPU_REPACKED_GGUF says which layout each type
is served in; retake this on an idle machine before changing it.

    python bench/gguf_blocks.py --rounds 7 --rows 1 4 --shape 4608 576   # default model gate|up
"""
from __future__ import annotations

import argparse
import os
import statistics
import time

import numpy as np
import torch


def random_blocks(type_name: str, n: int, k: int) -> np.ndarray:
    """Valid random rows of blocks: gguf-py quantizes the 32-blocks; K-quants get random bytes
    with finite fp16 super-scales (gguf-py cannot quantize them)."""
    from gguf import GGML_QUANT_SIZES, GGMLQuantizationType
    from gguf.quants import quantize

    qtype = GGMLQuantizationType[type_name]
    rng = np.random.default_rng(0)
    if not type_name.endswith("_K"):
        return quantize((rng.standard_normal((n, k)) * 0.05).astype(np.float32), qtype)
    block, size = GGML_QUANT_SIZES[qtype]
    raw = rng.integers(0, 256, (n, k // block, size), dtype=np.uint8)
    scale = np.full((n, k // block), 1e-3, dtype=np.float16).view(np.uint8).reshape(n, -1, 2)
    for off in ((208,) if type_name == "Q6_K" else (0, 2)):
        raw[:, :, off:off + 2] = scale
    return raw.reshape(n, -1)


def per_call_us(fn, calls: int) -> float:
    start = time.perf_counter()
    for _ in range(calls):
        fn()
    return (time.perf_counter() - start) / calls * 1e6


def on(activations: str, fn):
    """fn run with the int kernels' activations set (env.CPU_EXACT_ACTIVATIONS)."""
    from minserve import env

    def run():
        env.CPU_EXACT_ACTIVATIONS = activations == "exact"
        return fn()
    return run


def main() -> None:
    from minserve.kernels import cpu_native
    from minserve.kernels.gguf_blocks import GgufBlockWeight, to_int_weight

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--types", nargs="+",
                    default=["Q4_0", "Q4_1", "Q5_0", "Q8_0", "Q4_K", "Q5_K", "Q6_K"])
    ap.add_argument("--shape", nargs=2, type=int, default=[4608, 768], metavar=("N", "K"),
                    help="K must divide by 256 for the K-quants")
    ap.add_argument("--rows", nargs="+", type=int, default=[1, 4])
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--calls", type=int, default=50)
    ap.add_argument("--threads", type=int, default=0, help="0: torch's default")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if not cpu_native.available():
        raise SystemExit("the native CPU kernels did not build (see the log)")
    n, k = args.shape
    print(f"threads {torch.get_num_threads()}, load average {os.getloadavg()}, [N, K] = [{n}, {k}]")
    for type_name in args.types:
        blocks = GgufBlockWeight(torch.from_numpy(random_blocks(type_name, n, k)), type_name, k)
        repacked = cpu_native.to_cpu_int(to_int_weight(blocks))
        for rows in args.rows:
            x = torch.randn(rows, k)
            sides = {f"{layout}-{act}": on(act, fn) for act in ("int8", "exact")
                     for layout, fn in (("blocks", lambda: cpu_native.block_gemm(x, blocks)),
                                        ("repacked", lambda: cpu_native.int_gemm(x, repacked)))}
            times: dict[str, list[float]] = {side: [] for side in sides}
            for _ in range(args.rounds):
                for side, fn in sides.items():
                    fn()
                    times[side].append(per_call_us(fn, args.calls))
            rounds = "; ".join(f"{s} " + " ".join(f"{t:.0f}" for t in v) for s, v in times.items())
            med = {s: statistics.median(v) for s, v in times.items()}
            print(f"{type_name} rows {rows}: bytes blocks {blocks.nbytes()} repacked "
                  f"{repacked.nbytes()}; median us " + " ".join(f"{s} {t:.0f}" for s, t in
                                                                 med.items())
                  + f" (int8: blocks/repacked {med['blocks-int8'] / med['repacked-int8']:.2f}, "
                  f"exact/int8 blocks {med['blocks-exact'] / med['blocks-int8']:.2f} repacked "
                  f"{med['repacked-exact'] / med['repacked-int8']:.2f}); rounds: {rounds}")


if __name__ == "__main__":
    main()
