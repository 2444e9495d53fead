"""CPU cost of the LoRA delta per LoRA-wrapped linear of the default model's shapes
(SmolLM2-135M: qkv 576 -> 576|192|192, gate_up 576 -> 1536|1536, o 576 -> 576, down 1536 -> 576),
4 slots of rank 16, one thread, process CPU time (steadier than wall time on a shared box):
the base linears, the references (lora_shrink_ref, then lora_expand_ref per slice: the CPU path
before lora_fused_cpu) and lora_fused_cpu, summed over the four layers of one decoder layer.

    python bench/lora_layers.py [--reps 300]
"""
from __future__ import annotations

import argparse
import time

import numpy as np
import torch
import torch.nn.functional as F

from minserve.kernels import lora

LAYERS = [("qkv", 576, [576, 192, 192]), ("gate_up", 576, [1536, 1536]), ("o", 576, [576]),
          ("down", 1536, [576])]
STEPS = [("decode 16, one adapter", [0] * 16),
         ("decode 16, four mixed", [i % 4 for i in range(16)]),
         ("prefill 64, one adapter", [0] * 64),
         ("prefill 64, four runs of 16", [i // 16 for i in range(64)])]
RANK, SLOTS = 16, 4


def cpu_us(fn, reps: int) -> float:
    for _ in range(10):
        fn()
    t = time.process_time()
    for _ in range(reps):
        fn()
    return (time.process_time() - t) / reps * 1e6


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--reps", type=int, default=300)
    args = p.parse_args()
    torch.set_num_threads(1)
    torch.manual_seed(0)
    totals = {name: [0.0, 0.0, 0.0] for name, _ in STEPS}
    for _, in_features, sizes in LAYERS:
        a = torch.randn(SLOTS, len(sizes) * RANK, in_features) * 0.02
        bs = [torch.randn(SLOTS, n, RANK) * 0.02 for n in sizes]
        bts = [b.transpose(1, 2).contiguous() for b in bs]
        w = torch.randn(sum(sizes), in_features)
        for name, slots in STEPS:
            x = torch.randn(len(slots), in_features)
            out = x @ w.t()
            m = lora.lora_mapping(np.array(slots), torch.device("cpu"))

            def refs(x=x, out=out, m=m, a=a, bs=bs, sizes=sizes):
                y = torch.empty(x.shape[0], a.shape[1])
                lora.lora_shrink_ref(x, a, m, y)
                col = 0
                for i, b in enumerate(bs):
                    lora.lora_expand_ref(y[:, i * RANK:(i + 1) * RANK], b, m,
                                         out[:, col:col + sizes[i]])
                    col += sizes[i]

            t = totals[name]
            t[0] += cpu_us(lambda x=x, w=w: F.linear(x, w), args.reps)
            t[1] += cpu_us(refs, args.reps)
            t[2] += cpu_us(lambda x=x, a=a, bts=bts, m=m, out=out:
                           lora.lora_fused_cpu(x, a, bts, m, out), args.reps)
    print("| step | base linears us | references us | lora_fused_cpu us | refs / base "
          "| fused / base |")
    print("|---|---:|---:|---:|---:|---:|")
    for name, (base, refs, fused) in totals.items():
        print(f"| {name} | {base:.0f} | {refs:.0f} | {fused:.0f} | {refs / base:.2f} "
              f"| {fused / base:.2f} |")


if __name__ == "__main__":
    main()
