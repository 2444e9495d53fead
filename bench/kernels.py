"""Paged-attention kernel against the device's own ceilings (needs a CUDA GPU):

    python bench/kernels.py            # Llama-3-8B attention shape: 32 q heads, 8 kv heads, D 128

- decode (one query token per request), batch 1/32/128 at contexts 512/2k/8k: achieved bytes/s
  (the K/V cache read plus q and out) against a measured device-to-device copy;
- prefill (one causal request of 512/2k/8k tokens): FLOP/s against a large bf16 matmul;
- the same shapes through torch's scaled_dot_product_attention on contiguous K/V, for comparison.
Prints one JSON line per measurement.
"""
from __future__ import annotations

import argparse
import json
from functools import partial

import torch


def timed_ms(fn, iters: int) -> float:
    """Mean milliseconds per call, by CUDA events around `iters` calls after a warm-up."""
    fn()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(iters):
        fn()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / iters


def copy_bandwidth(dev) -> float:
    """Bytes/s of a 1 GiB device-to-device copy (read + write counted)."""
    src = torch.empty(1 << 29, dtype=torch.float16, device=dev)
    dst = torch.empty_like(src)
    ms = timed_ms(lambda: dst.copy_(src), 20)
    return 2 * src.numel() * src.element_size() / (ms / 1e3)


def matmul_flops(dev) -> float:
    a = torch.randn(8192, 8192, dtype=torch.bfloat16, device=dev)
    b = torch.randn(8192, 8192, dtype=torch.bfloat16, device=dev)
    ms = timed_ms(lambda: a @ b, 20)
    return 2 * 8192 ** 3 / (ms / 1e3)


def paged_batch(query_lens, seq_lens, heads, kv_heads, head_dim, block_size, dtype, dev):
    """q, caches and metadata; each request's blocks are a shuffled, non-contiguous set."""
    from minserve.kernels import AttnMetadata

    qsl = [0]
    for n in query_lens:
        qsl.append(qsl[-1] + n)
    max_blocks = -(-max(seq_lens) // block_size)
    num_blocks = len(seq_lens) * max_blocks
    k_cache = torch.randn(num_blocks, block_size, kv_heads, head_dim, dtype=dtype, device=dev)
    v_cache = torch.randn_like(k_cache)
    table = torch.randperm(num_blocks, device=dev).view(len(seq_lens), max_blocks)
    attn = AttnMetadata(
        query_start_loc=torch.tensor(qsl, dtype=torch.int32, device=dev),
        seq_lens=torch.tensor(seq_lens, dtype=torch.int32, device=dev),
        block_table=table.to(torch.int32),
        slot_mapping=torch.full((qsl[-1],), -1, dtype=torch.int64, device=dev),
        max_query_len=max(query_lens), max_seq_len=max(seq_lens),
        query_start_loc_host=qsl, seq_lens_host=list(seq_lens))
    q = torch.randn(qsl[-1], heads, head_dim, dtype=dtype, device=dev)
    return q, k_cache, v_cache, attn


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--heads", type=int, default=32)
    ap.add_argument("--kv-heads", type=int, default=8)
    ap.add_argument("--head-dim", type=int, default=128)
    ap.add_argument("--block-size", type=int, default=16)
    ap.add_argument("--iters", type=int, default=50)
    args = ap.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("bench/kernels.py needs a CUDA GPU (the kernels are measured, not "
                         "interpreted); on CPU run tests/test_kernels.py instead")
    from minserve.kernels.attention import paged_attention_triton
    sdpa = torch.nn.functional.scaled_dot_product_attention

    dev, dtype = torch.device("cuda"), torch.bfloat16
    h, kh, d = args.heads, args.kv_heads, args.head_dim
    scale = d ** -0.5
    bw, peak = copy_bandwidth(dev), matmul_flops(dev)
    print(json.dumps({"device": torch.cuda.get_device_name(), "copy_GBps": round(bw / 1e9),
                      "bf16_matmul_TFLOPs": round(peak / 1e12, 1)}))
    elem = torch.finfo(dtype).bits // 8

    for batch in (1, 32, 128):
        for ctx in (512, 2048, 8192):
            q, kc, vc, attn = paged_batch([1] * batch, [ctx] * batch, h, kh, d,
                                          args.block_size, dtype, dev)
            out = torch.empty_like(q)
            ms = timed_ms(partial(paged_attention_triton, q, kc, vc, attn, scale, out=out),
                          args.iters)
            nbytes = (2 * batch * ctx * kh * d + 2 * batch * h * d) * elem
            # torch SDPA on contiguous K/V of the same sizes (no paging, no block table)
            qs = torch.randn(batch, h, 1, d, dtype=dtype, device=dev)
            ks = torch.randn(batch, kh, ctx, d, dtype=dtype, device=dev)
            vs = torch.randn_like(ks)
            sdpa_ms = timed_ms(partial(sdpa, qs, ks, vs, enable_gqa=True), args.iters)
            print(json.dumps({"phase": "decode", "batch": batch, "context": ctx,
                              "ms": round(ms, 4), "GBps": round(nbytes / (ms / 1e3) / 1e9),
                              "of_copy_bw": round(nbytes / (ms / 1e3) / bw, 3),
                              "sdpa_ms": round(sdpa_ms, 4)}))
            del q, kc, vc, ks, vs

    for n in (512, 2048, 8192):
        q, kc, vc, attn = paged_batch([n], [n], h, kh, d, args.block_size, dtype, dev)
        out = torch.empty_like(q)
        ms = timed_ms(partial(paged_attention_triton, q, kc, vc, attn, scale, out=out),
                      max(5, args.iters // 5))
        flops = 4 * h * d * n * n / 2          # QK^T and PV, causal half
        qs = torch.randn(1, h, n, d, dtype=dtype, device=dev)
        ks = torch.randn(1, kh, n, d, dtype=dtype, device=dev)
        vs = torch.randn_like(ks)
        sdpa_ms = timed_ms(partial(sdpa, qs, ks, vs, is_causal=True, enable_gqa=True),
                           max(5, args.iters // 5))
        print(json.dumps({"phase": "prefill", "tokens": n, "ms": round(ms, 4),
                          "TFLOPs": round(flops / (ms / 1e3) / 1e12, 1),
                          "of_matmul": round(flops / (ms / 1e3) / peak, 3),
                          "sdpa_ms": round(sdpa_ms, 4)}))


if __name__ == "__main__":
    main()
