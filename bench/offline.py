"""Offline throughput: the workload nano-vllm publishes (seed 0, 256 requests, prompt token ids
random of length U[100, 1024], max_tokens U[100, 1024], ignore_eos, temperature 0.6); prints
output tokens per second over wall time. Run small on CPU, full size on a GPU:

    python bench/offline.py --num-requests 16 --max-input-len 128 --max-output-len 64
    python bench/offline.py --num-requests 16 --max-input-len 128 --max-output-len 64 --timers
    python bench/offline.py --model bench/configs/qwen3-0.6b --load-format dummy   # GPU
    python bench/offline.py --model bench/configs/llama-3-8b --load-format dummy   # GPU
    python bench/offline.py --num-requests 16 --max-input-len 128 --max-output-len 64 -tp 2

With -tp N > 1 it also prints the head's time per step in the plan broadcast and in the
collectives (all-reduces after row-parallel layers and the embedding, the logits gather); the
latter includes waiting for the slowest rank.

bench/configs/* hold only config.json (the real models' shapes, random weights). Prompts are
token ids and every request ignores EOS, so the tokenizer only detokenizes the output: without
a tokenizer.json (and no --tokenizer) a 256-token byte-level one stands in; ids outside its
vocab decode to nothing, which keeps detokenization's host cost in the figure.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import sys
import tempfile
import time
from random import randint, seed


def byte_level_tokenizer(folder: str) -> str:
    """Write a byte-level BPE tokenizer with no merges (256 tokens) into `folder`."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    vocab = {ch: i for i, ch in enumerate(sorted(pre_tokenizers.ByteLevel.alphabet()))}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.save(os.path.join(folder, "tokenizer.json"))
    return folder


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default=None, help="folder, .gguf or hub id (default: built-in)")
    ap.add_argument("--num-requests", type=int, default=256)
    ap.add_argument("--min-input-len", type=int, default=100)
    ap.add_argument("--max-input-len", type=int, default=1024)
    ap.add_argument("--min-output-len", type=int, default=100)
    ap.add_argument("--max-output-len", type=int, default=1024)
    ap.add_argument("--load-format", default="auto")
    ap.add_argument("--tokenizer", default=None, help="tokenizer folder (default: the model's)")
    ap.add_argument("--max-model-len", type=int, default=4096)
    ap.add_argument("--max-num-seqs", type=int, default=256)
    ap.add_argument("--max-num-batched-tokens", type=int, default=None)
    ap.add_argument("--kv-cache-memory", type=int, default=None, help="bytes")
    ap.add_argument("--dtype", default="auto")
    ap.add_argument("--enforce-eager", action="store_true")
    ap.add_argument("--quantization", default=None)
    ap.add_argument("--kv-cache-dtype", default="auto")
    ap.add_argument("--gguf-dequantize", action=argparse.BooleanOptionalAction, default=None)
    ap.add_argument("--timers", action="store_true",
                    help="per-phase self times per step (bench/phases.py), printed after the run")
    ap.add_argument("--tensor-parallel-size", "-tp", type=int, default=1)
    args = ap.parse_args()

    from minserve import LLM, SamplingParams
    from minserve.models.quant.loading import weight_bytes

    tokenizer = args.tokenizer
    if (tokenizer is None and args.load_format == "dummy" and args.model
            and not os.path.isfile(os.path.join(args.model, "tokenizer.json"))):
        tokenizer = byte_level_tokenizer(tempfile.mkdtemp(prefix="minserve-bench-tok-"))
    llm = LLM(args.model, tokenizer=tokenizer, load_format=args.load_format,
              max_model_len=args.max_model_len,
              max_num_seqs=args.max_num_seqs, max_num_batched_tokens=args.max_num_batched_tokens,
              kv_cache_memory=args.kv_cache_memory, dtype=args.dtype,
              enforce_eager=args.enforce_eager, quantization=args.quantization,
              kv_cache_dtype=args.kv_cache_dtype, gguf_dequantize=args.gguf_dequantize,
              tensor_parallel_size=args.tensor_parallel_size)
    tp_timers = _time_collectives() if args.tensor_parallel_size > 1 else None
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

    llm.generate([[1, 2, 3, 4]], SamplingParams(max_tokens=4), use_tqdm=False)   # warm-up
    timers = None
    if args.timers:
        sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
        from phases import PhaseTimers

        timers = PhaseTimers()
        timers.install(llm.engine)
    if tp_timers is not None:
        tp_timers.update({k: 0.0 for k in tp_timers})
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
        "num_kv_blocks": llm.engine.info.num_kv_blocks,
        "weight_MiB": round(weight_bytes(llm.engine.runner.model) / 2**20, 1),
        "max_rss_MiB": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
        "quantization": args.quantization, "gguf_dequantize": args.gguf_dequantize,
        "tensor_parallel_size": args.tensor_parallel_size,
        **({} if tp_timers is None else {
            "steps": int(tp_timers["steps"]),
            "ms_per_step": round(1e3 * elapsed / max(tp_timers["steps"], 1), 2),
            "broadcast_ms_per_step": round(1e3 * tp_timers["broadcast"] / tp_timers["steps"], 3),
            "collectives_ms_per_step": round(1e3 * tp_timers["collectives"] / tp_timers["steps"], 3),
            "collectives_per_step": round(tp_timers["num_collectives"] / tp_timers["steps"], 1)}),
    }))
    if timers:
        num_steps = timers.calls["engine step (rest)"]
        print(f"# {num_steps} steps, per step:")
        print(timers.table(max(num_steps, 1)))
    llm.engine.shutdown()


def _time_collectives() -> dict[str, float]:
    """Wrap the head's plan broadcast and collectives with wall-clock timers."""
    from minserve.engine.workers import Workers
    from minserve.models import parallel

    timers = {"steps": 0.0, "broadcast": 0.0, "collectives": 0.0, "num_collectives": 0.0}

    def timed(fn, key, count):
        def wrapper(*a, **kw):
            t0 = time.perf_counter()
            try:
                return fn(*a, **kw)
            finally:
                timers[key] += time.perf_counter() - t0
                timers[count] += 1
        return wrapper

    Workers.broadcast = timed(Workers.broadcast, "broadcast", "steps")
    parallel.all_reduce = timed(parallel.all_reduce, "collectives", "num_collectives")
    parallel.gather_vocab = timed(parallel.gather_vocab, "collectives", "num_collectives")
    return timers


if __name__ == "__main__":
    main()
