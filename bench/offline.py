"""Offline throughput: the workload nano-vllm publishes (seed 0, 256 requests, prompt token ids
random of length U[100, 1024], max_tokens U[100, 1024], ignore_eos, temperature 0.6); prints
output tokens per second over wall time. Run small on CPU, full size on a GPU:

    python bench/offline.py --num-requests 16 --max-input-len 128 --max-output-len 64
    python bench/offline.py --model Qwen/Qwen3-0.6B --load-format dummy        # GPU
"""
from __future__ import annotations

import argparse
import json
import time
from random import randint, seed


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default=None, help="folder, .gguf or hub id (default: built-in)")
    ap.add_argument("--num-requests", type=int, default=256)
    ap.add_argument("--min-input-len", type=int, default=100)
    ap.add_argument("--max-input-len", type=int, default=1024)
    ap.add_argument("--min-output-len", type=int, default=100)
    ap.add_argument("--max-output-len", type=int, default=1024)
    ap.add_argument("--load-format", default="auto")
    ap.add_argument("--max-model-len", type=int, default=4096)
    ap.add_argument("--max-num-seqs", type=int, default=256)
    ap.add_argument("--max-num-batched-tokens", type=int, default=None)
    ap.add_argument("--kv-cache-memory", type=int, default=None, help="bytes")
    ap.add_argument("--dtype", default="auto")
    ap.add_argument("--enforce-eager", action="store_true")
    args = ap.parse_args()

    from minserve import LLM, SamplingParams

    llm = LLM(args.model, load_format=args.load_format, max_model_len=args.max_model_len,
              max_num_seqs=args.max_num_seqs, max_num_batched_tokens=args.max_num_batched_tokens,
              kv_cache_memory=args.kv_cache_memory, dtype=args.dtype,
              enforce_eager=args.enforce_eager)
    vocab = llm.engine.model_config.vocab_size
    seed(0)
    min_in = min(args.min_input_len, args.max_input_len)
    min_out = min(args.min_output_len, args.max_output_len)
    max_id = min(10000, vocab - 1)
    prompts = [[randint(0, max_id) for _ in range(randint(min_in, args.max_input_len))]
               for _ in range(args.num_requests)]
    params = [SamplingParams(temperature=0.6, ignore_eos=True,
                             max_tokens=randint(min_out, args.max_output_len))
              for _ in range(args.num_requests)]

    llm.generate(["Benchmark: "], SamplingParams(max_tokens=4), use_tqdm=False)   # warm-up
    t = time.perf_counter()
    outs = llm.generate(prompts, params, use_tqdm=False)
    elapsed = time.perf_counter() - t
    num_out = sum(len(o.outputs[0].token_ids) for o in outs)
    assert num_out == sum(p.max_tokens for p in params), "ignore_eos requests ended early"
    num_in = sum(len(p) for p in prompts)
    print(json.dumps({
        "model": args.model or "default", "device": str(llm.engine.device),
        "num_requests": args.num_requests, "input_tokens": num_in, "output_tokens": num_out,
        "elapsed_s": round(elapsed, 2), "output_tok_s": round(num_out / elapsed, 1),
        "total_tok_s": round((num_in + num_out) / elapsed, 1),
        "num_kv_blocks": llm.engine.num_kv_blocks,
    }))


if __name__ == "__main__":
    main()
