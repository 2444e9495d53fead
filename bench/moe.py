"""Mixture-of-experts decode on CPU (issue 30, "Measure"). Two parts, one process:

1. Decode step of a Qwen3-30B-A3B-shaped model (hidden 2048, 128 experts, top-8, expert
   intermediate 768, 32 q / 4 kv heads; --layers of its 48, random GPTQ int4 g128 weights via
   --load-format dummy, the router in float) at each --batch: the median engine.step() over
   --steps all-decode steps, against the memory-bandwidth bound
       bound = (dense bytes + bytes of the distinct experts the step routed to) / copy bandwidth
   with the routed experts counted from the step's own routing and the copy bandwidth (STREAM
   convention: 2 x bytes / time of a 256 MiB copy) measured in the same run, just before.
   fraction = bound / measured step (1.0: the step streams its weights at copy speed).
2. One MoE layer of the same shape, its int4 experts as the model holds them: the fused path
   (kernels.fused_experts: pairs grouped by expert, one native grouped GEMM per projection)
   against a naive per-expert loop (each routed expert's rows through its own GEMM call, as
   transformers loops), alternating in each round on the same inputs and routing, a fresh
   routing per call so experts come from memory, not cache. Prints every round, the medians and
   the fused path's fraction of its bound (the distinct routed experts' bytes / copy bandwidth).

The Triton path is checked for correctness under the interpreter by tests/test_moe_kernels.py;
it has no CPU timing. Commands (figures in bench/RESULTS.md):

    python bench/moe.py                                   # --layers 4 --batch 1 16
    python bench/moe.py --layers 48 --rounds 5            # the whole depth (~17 GB of weights)
    python bench/moe.py --threads 1                       # a loaded shared machine
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

QWEN3_30B_A3B = {
    "architectures": ["Qwen3MoeForCausalLM"], "model_type": "qwen3_moe",
    "vocab_size": 151936, "hidden_size": 2048, "intermediate_size": 6144,
    "moe_intermediate_size": 768, "num_experts": 128, "num_experts_per_tok": 8,
    "norm_topk_prob": True, "decoder_sparse_step": 1, "mlp_only_layers": [],
    "num_attention_heads": 32, "num_key_value_heads": 4, "head_dim": 128,
    "rms_norm_eps": 1e-6, "rope_theta": 1000000.0, "max_position_embeddings": 40960,
    "tie_word_embeddings": False, "bos_token_id": 151643, "eos_token_id": 151645,
    "torch_dtype": "bfloat16",
    "quantization_config": {"quant_method": "gptq", "bits": 4, "group_size": 128,
                            "desc_act": False, "sym": True},
}


def copy_bandwidth(rounds: int = 7) -> float:
    """Bytes/s of a 256 MiB float32 copy, counted as read + write (STREAM's copy)."""
    import torch

    src = torch.ones(64 << 20)
    dst = torch.empty_like(src)
    times = []
    for _ in range(rounds):
        t0 = time.perf_counter()
        dst.copy_(src)
        times.append(time.perf_counter() - t0)
    return 2 * src.numel() * 4 / statistics.median(times)


def write_config(layers: int) -> str:
    from offline import byte_level_tokenizer

    folder = tempfile.mkdtemp(prefix="minserve-bench-moe-")
    with open(os.path.join(folder, "config.json"), "w") as f:
        json.dump({**QWEN3_30B_A3B, "num_hidden_layers": layers}, f)
    byte_level_tokenizer(folder)
    return folder


class RoutedExperts:
    """Counts the distinct experts each MoE layer's routing picks (wraps kernels.select_experts,
    which models/moe.py looks up at call time)."""

    def __init__(self) -> None:
        from minserve import kernels

        self.kernels, self.original = kernels, kernels.select_experts
        self.distinct: list[int] = []
        kernels.select_experts = self._select

    def _select(self, logits, top_k, router):
        weights, ids = self.original(logits, top_k, router)
        self.distinct.append(int(ids.unique().numel()))
        return weights, ids

    def take(self) -> list[int]:
        out, self.distinct = self.distinct, []
        return out

    def close(self) -> None:
        self.kernels.select_experts = self.original


def decode_steps(args: argparse.Namespace) -> object:
    from minserve import LLM, SamplingParams
    from minserve.engine.request import EngineRequest
    from minserve.models.moe import FusedMoE
    from minserve.models.quant.loading import weight_bytes

    llm = LLM(write_config(args.layers), load_format="dummy", dtype=args.dtype,
              max_model_len=512, max_num_seqs=max(args.batch), kv_cache_memory=256 << 20)
    engine = llm.engine
    model = engine.runner.model
    moes = [m for m in model.modules() if isinstance(m, FusedMoE)]
    expert_bytes = moes[0].nbytes() / moes[0].weights.num_experts     # one expert, both projs
    embed = model.model.embed_tokens.weight
    # every weight but the experts and the embedding table (one row per token is read)
    dense = weight_bytes(model) - sum(m.nbytes() for m in moes) \
        - embed.numel() * embed.element_size()
    print(f"# {args.layers} layers, dense {dense / 2**20:.0f} MiB, one expert "
          f"{expert_bytes / 2**20:.2f} MiB, all experts "
          f"{sum(m.nbytes() for m in moes) / 2**30:.2f} GiB, {engine.dtype}", flush=True)
    routed = RoutedExperts()
    for batch in args.batch:
        for i in range(batch):
            engine.add_request(EngineRequest(
                f"b{batch}-{i}", [(i * 31 + j * 7) % 200 + 3 for j in range(args.input_len)],
                SamplingParams(temperature=0, ignore_eos=True, max_tokens=args.steps + 3)))
        while engine.scheduler.num_waiting or any(
                r.num_computed_tokens < r.num_prompt_tokens for r in engine.scheduler.running):
            engine.step()
        engine.step()                                  # the first all-decode step: warm-up
        bandwidth = copy_bandwidth()
        routed.take()
        steps, bounds = [], []
        for _ in range(args.steps):
            t0 = time.perf_counter()
            engine.step()
            steps.append(time.perf_counter() - t0)
            bounds.append((dense + sum(routed.take()) * expert_bytes) / bandwidth)
        step, bound = statistics.median(steps), statistics.median(bounds)
        print(json.dumps({
            "part": "decode_step", "layers": args.layers, "batch": batch,
            "median_step_ms": round(step * 1e3, 2),
            "steps_ms": [round(s * 1e3, 1) for s in steps],
            "copy_GBps": round(bandwidth / 1e9, 2), "bound_ms": round(bound * 1e3, 2),
            "fraction_of_bound": round(bound / step, 3), "tok_s": round(batch / step, 2),
            "load": round(os.getloadavg()[0], 2)}), flush=True)
        while engine.has_unfinished_requests():
            engine.step()
    routed.close()
    return moes[0]


def naive_experts(x, w, topk_weights, topk_ids):
    """transformers' loop: every expert that got a token runs its rows through its own GEMMs."""
    import torch
    from minserve.kernels.dispatch import expert_gemm, silu_and_mul

    out = torch.zeros_like(x)
    for e in range(w.num_experts):
        tokens, slots = torch.nonzero(topk_ids == e, as_tuple=True)
        if tokens.numel() == 0:
            continue
        h = expert_gemm(x[tokens], w.w13.expert(e))
        y = expert_gemm(silu_and_mul(h), w.w2.expert(e))
        out.index_add_(0, tokens, y * topk_weights[tokens, slots, None])
    return out


def fused_vs_naive(moe: object, args: argparse.Namespace) -> None:
    import torch

    from minserve import kernels

    w, gen = moe.weights, torch.Generator().manual_seed(0)
    expert_bytes, bandwidth = w.nbytes() / w.num_experts, copy_bandwidth()
    hidden = moe.gate.weight.shape[1]
    print(f"# one MoE layer: {type(w.w13).__name__}, {w.num_experts} experts, "
          f"{w.nbytes() / 2**20:.0f} MiB", flush=True)
    for batch in args.batch:
        rounds, distinct = {"fused": [], "naive": []}, []
        for r in range(args.rounds):
            calls = []
            for _ in range(args.calls):
                x = torch.randn(batch, hidden, generator=gen)
                logits = torch.randn(batch, w.num_experts, generator=gen)
                calls.append((x, *kernels.select_experts(logits, moe.top_k, moe.router)))
                distinct.append(int(calls[-1][2].unique().numel()))
            sides = (("fused", kernels.fused_experts), ("naive", naive_experts))
            for name, fn in sides if r % 2 == 0 else sides[::-1]:
                t0 = time.perf_counter()
                for x, weights, ids in calls:
                    fn(x, w, weights, ids)
                rounds[name].append((time.perf_counter() - t0) / args.calls * 1e3)
            x, weights, ids = calls[0]
            torch.testing.assert_close(kernels.fused_experts(x, w, weights, ids),
                                       naive_experts(x, w, weights, ids), atol=1e-3, rtol=1e-3)
        fused, naive = (statistics.median(rounds[k]) for k in ("fused", "naive"))
        bound_ms = statistics.mean(distinct) * expert_bytes / bandwidth * 1e3
        print(json.dumps({
            "part": "moe_layer", "batch": batch, "fused_ms": round(fused, 3),
            "naive_ms": round(naive, 3), "naive_over_fused": round(naive / fused, 2),
            "copy_GBps": round(bandwidth / 1e9, 2), "bound_ms": round(bound_ms, 3),
            "fused_fraction_of_bound": round(bound_ms / fused, 3),
            "rounds_fused_ms": [round(t, 3) for t in rounds["fused"]],
            "rounds_naive_ms": [round(t, 3) for t in rounds["naive"]],
            "load": round(os.getloadavg()[0], 2)}), flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--layers", type=int, default=4, help="of Qwen3-30B-A3B's 48")
    ap.add_argument("--batch", type=int, nargs="+", default=[1, 16])
    ap.add_argument("--steps", type=int, default=10, help="timed decode steps per batch")
    ap.add_argument("--input-len", type=int, default=32)
    ap.add_argument("--rounds", type=int, default=5, help="alternating fused/naive rounds")
    ap.add_argument("--calls", type=int, default=20, help="layer calls per round and side")
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--threads", type=int, default=None,
                    help="OMP_NUM_THREADS (default: the engine's); on a loaded machine 1 avoids "
                         "OpenMP barriers waiting on descheduled threads")
    args = ap.parse_args()
    if args.threads is not None:
        os.environ["OMP_NUM_THREADS"] = str(args.threads)    # before torch is imported
    import torch

    print(f"# torch {torch.__version__}, {torch.get_num_threads()} threads, "
          f"load {os.getloadavg()[0]:.2f}", flush=True)
    moe = decode_steps(args)
    fused_vs_naive(moe, args)


if __name__ == "__main__":
    main()
