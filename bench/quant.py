"""Quantized linear layers against the dense one, layer by layer (the issue's GPU targets are
per token: int4 at batch 1 at most 0.45x of bf16's time, FP8 throughput 1.3x bf16's):

    python bench/quant.py                      # CUDA: Llama-3-8B's linear shapes, bf16 base
    python bench/quant.py --device cpu         # CPU: SmolLM2-135M's shapes, fp32 base

For each shape (N x K) and batch M: the dense matmul, the int4 and int8 GEMMs (group 128; 32 where
K is not a multiple of 128),
FP8 (torch._scaled_mm where the GPU has fp8 tensor cores, else the Triton kernel), each as
median ms and as the weight bytes it streams per ms. One JSON line per measurement.
"""
from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

LLAMA3_8B = [(6144, 4096), (4096, 4096), (28672, 4096), (4096, 14336)]   # qkv, o, gate_up, down
SMOLLM2 = [(960, 576), (576, 576), (3072, 576), (576, 1536)]


def median_ms(fn, iters: int, cuda: bool) -> float:
    fn()
    times = []
    for _ in range(iters):
        if cuda:
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        fn()
        if cuda:
            torch.cuda.synchronize()
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--batches", default="1,16,256")
    ap.add_argument("--iters", type=int, default=50)
    args = ap.parse_args()

    from minserve.kernels.fp8_gemm import fp8_quantize_weight
    from minserve.kernels.quant_gemm import IntWeight, pack_int

    from minserve import kernels

    dev = torch.device(args.device)
    cuda = dev.type == "cuda"
    dtype = torch.bfloat16 if cuda else torch.float32
    shapes = LLAMA3_8B if cuda else SMOLLM2
    for n, k in shapes:
        dense = torch.randn(n, k, device=dev, dtype=dtype) * 0.02
        layers = {"dense": (dense.numel() * dense.element_size(),
                            lambda x, w=dense: torch.nn.functional.linear(x, w))}
        group = 128 if k % 128 == 0 else 32       # SmolLM2's 576 = 18 x 32 (its GGUF blocks)
        for bits in (4, 8):
            q = torch.randint(0, 2 ** bits, (k, n), device=dev)
            s = torch.full((k // group, n), 1e-3, device=dev, dtype=torch.float32)
            w = IntWeight(pack_int(q, bits), s, -s * 2 ** (bits - 1), bits, group)
            layers[f"int{bits}"] = (w.nbytes(), lambda x, w=w: kernels.int_gemm(x, w))
        f8 = fp8_quantize_weight(dense)
        layers["fp8"] = (f8.nbytes(), lambda x, w=f8: kernels.fp8_gemm(x, w))
        for m in map(int, args.batches.split(",")):
            x = torch.randn(m, k, device=dev, dtype=dtype)
            base = None
            for name, (nbytes, fn) in layers.items():
                ms = median_ms(lambda fn=fn, x=x: fn(x), args.iters, cuda)
                base = base or ms
                print(json.dumps({"shape": f"{n}x{k}", "M": m, "layer": name,
                                  "ms": round(ms, 4), "vs_dense": round(ms / base, 3),
                                  "weight_GBps": round(nbytes / ms / 1e6, 1)}), flush=True)


if __name__ == "__main__":
    main()
