"""Native CPU kernels for decode: the weight-only int4/int8 GEMM (cpu_int_gemm.c) and its GGUF
twin reading the file's blocks (cpu_gguf.c), paged decode attention (cpu_attention.c), a layer's
small fused ops (cpu_layer_ops.c) and the MXFP4 GEMM (cpu_mxfp4.c; its wrapper is
kernels/mxfp4.py), compiled once per machine with the system C compiler (`cc`, or $CC) into one
library and called through ctypes.

Why native code: a decode step on CPU is bound by reading the weights. The int layout reads 4.5
or 8.5 bits a value instead of fp32's 32, but torch's own CPU int kernels and torch.compile's
C++ were no faster than the fp32 matmul (bench/RESULTS.md, "Native CPU decode kernels"). The .so is
built with -march=native into the cache ($MINSERVE_CACHE/native, keyed by the source, the
compiler and the CPU's flags) and links the OpenMP runtime torch already loaded (libgomp.so.1),
so both share one thread pool. Without a compiler, or with MINSERVE_CPU_NATIVE=0, available()
is False and int weights stay on the torch paths of kernels/quant_gemm.py (minserve/env.py reads
the variables).

Rows: up to MAX_ROWS (a decode step) run the native kernel; more (a prefill chunk) dequantize
the weight natively into a scratch fp32 tensor and run one sgemm, where the FLOPs are the time.
Up to FEW_ROWS rows (int_gemm: 2 x FEW_ROWS, so that a speculative verification row's tokens see
what a decode sees) the kernel quantizes the activations to int8 in blocks of 32 once per call
(as llama.cpp does: quantize_rows_ref is the reference) and runs integer dot products; a merged
linear (q/k/v, gate/up) is one call, so one quantization serves all its projections.
MINSERVE_CPU_EXACT_ACTIVATIONS=1 keeps them fp32 (for checking; tests/test_cpu_native.py bounds
the difference).
"""
from __future__ import annotations

import ctypes
import hashlib
import logging
import os
import platform
import shutil
import subprocess
import tempfile
import threading
from dataclasses import dataclass

import torch

from minserve import env
from minserve.kernels.gguf_blocks import GgufBlockWeight, block_gemm_ref
from minserve.kernels.quant_gemm import IntWeight, unpack_int

log = logging.getLogger("minserve")

SOURCES = [os.path.join(os.path.dirname(os.path.abspath(__file__)), name)
           for name in ("cpu_int_gemm.c", "cpu_int_rows.c", "cpu_gguf.c", "cpu_attention.c",
                        "cpu_layer_ops.c", "cpu_mxfp4.c")]
MAX_ROWS = 64              # the native kernel beat dequantize + sgemm up to here (bench/RESULTS.md)
FEW_ROWS = 4               # cpu_int_gemm.c: up to here rows run on int8 activations
Q8_BLOCK = 32              # values per activation scale
CHUNK = 32                 # the layout's unit (cpu_int_gemm.c); K and the group size divide by it
COMPILE_TIMEOUT_S = 120

_lock = threading.Lock()
_state: dict[str, object] = {}


@dataclass(slots=True)
class CpuIntWeight:
    """An IntWeight in cpu_int_gemm.c's row-major layout (see there); made once at load."""
    q: torch.Tensor                 # uint8 [N, K] (8 bits) or [N, K // 2] (4 bits)
    scales: torch.Tensor            # float32 [N, K // G]
    bias: torch.Tensor              # float32 [N, K // G]
    bits: int
    group_size: int
    perm: torch.Tensor | None = None  # as IntWeight.perm: x's columns are read in this order

    @property
    def in_features(self) -> int:
        return self.q.shape[1] * (8 // self.bits)

    @property
    def out_features(self) -> int:
        return self.q.shape[0]

    def nbytes(self) -> int:
        tensors = [self.q, self.scales, self.bias] + ([self.perm] if self.perm is not None else [])
        return sum(t.numel() * t.element_size() for t in tensors)


@dataclass(slots=True)
class CpuIntExperts:
    """A mixture-of-experts projection: every local expert's CpuIntWeight (no act-order) with a
    leading expert dim, so one moe_int_gemm call runs all the routed experts."""
    q: torch.Tensor                 # uint8 [E, N, K * bits / 8]
    scales: torch.Tensor            # float32 [E, N, K // G]
    bias: torch.Tensor              # float32 [E, N, K // G]
    bits: int
    group_size: int

    @property
    def num_experts(self) -> int:
        return self.q.shape[0]

    def expert(self, e: int) -> CpuIntWeight:
        return CpuIntWeight(self.q[e], self.scales[e], self.bias[e], self.bits, self.group_size)

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.q, self.scales, self.bias))


def supported(w: IntWeight) -> bool:
    k = w.in_features
    return (w.bits in (4, 8) and k % CHUNK == 0 and w.group_size % CHUNK == 0
            and k % w.group_size == 0 and w.qweight.device.type == "cpu")


def to_cpu_int(w: IntWeight) -> CpuIntWeight:
    """IntWeight ([K // P, N] words) -> the native row-major layout (lossless)."""
    q = unpack_int(w.qweight, w.bits).t().to(torch.uint8)                # [N, K]
    if w.bits == 4:
        n, k = q.shape
        halves = q.view(n, k // CHUNK, 2, CHUNK // 2)
        q = (halves[:, :, 0] | (halves[:, :, 1] << 4)).reshape(n, k // 2)
    return CpuIntWeight(q.contiguous(), w.scales.float().t().contiguous(),
                        w.bias.float().t().contiguous(), w.bits, w.group_size, w.perm)


def int8_exact(w: torch.Tensor) -> CpuIntWeight | None:
    """A float32 [N, K] weight whose groups of 32 are exactly d * q (q in -127..127, d the
    group's absmax / 127), as the 8-bit layout; None if any value is not. A GGUF Q8_0 tensor
    dequantized at load is such a weight (its d is absmax / 127 rounded to fp16, and
    127 * d / 127 == d in fp32), so a tied Q8_0 embedding serves the logits from 8.5 bits a
    value again, with the same products."""
    n, k = w.shape
    if w.dtype != torch.float32 or k % CHUNK or w.device.type != "cpu":
        return None
    lib = library()
    if lib is not None:
        w = w.contiguous()
        q, d = torch.empty(n, k, dtype=torch.uint8), torch.empty(n, k // CHUNK)
        if not lib.int8_exact(w.data_ptr(), n, k, q.data_ptr(), d.data_ptr(),
                              torch.get_num_threads()):
            return None
        return CpuIntWeight(q, d, -128 * d, 8, CHUNK)
    groups = w.view(n, k // CHUNK, CHUNK)
    d = groups.abs().amax(-1) / 127                                   # [N, K / 32]
    q = torch.where(d[:, :, None] > 0, groups / d.clamp_min(1e-38)[:, :, None], 0).round()
    if not torch.equal(q * d[:, :, None], groups):
        return None
    q = (q + 128).to(torch.uint8).view(n, k)
    return CpuIntWeight(q, d.contiguous(), (-128 * d).contiguous(), 8, CHUNK)


def dequantize_ref(w: CpuIntWeight) -> torch.Tensor:
    """The plain-torch reference for the layout: [N, K] fp32 in the weight's (sorted) row order."""
    n = w.out_features
    if w.bits == 4:
        chunks = w.q.view(n, -1, CHUNK // 2)
        q = torch.stack([chunks & 0x0F, chunks >> 4], dim=2).reshape(n, -1)
    else:
        q = w.q
    k = q.shape[1]
    groups = q.view(n, k // w.group_size, w.group_size).float()
    return torch.addcmul(w.bias[:, :, None], groups, w.scales[:, :, None]).view(n, k)


def int_gemm_ref(x: torch.Tensor, w: CpuIntWeight) -> torch.Tensor:
    if w.perm is not None:
        x = x.index_select(1, w.perm)
    return torch.nn.functional.linear(x.float(), dequantize_ref(w)).to(x.dtype)


def quantize_rows_ref(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The kernels' int8 activations: x [M, K] float32 -> (q int8 [M, K], d [M, K / 32]), d =
    the block's absmax / 127 and q = round(x * 127 / absmax) (half to even, as the CPU rounds)."""
    m, k = x.shape
    blocks = x.float().reshape(m, k // Q8_BLOCK, Q8_BLOCK)
    amax = blocks.abs().amax(-1, keepdim=True)
    inv = torch.where(amax > 0, 127 / amax, torch.zeros_like(amax))
    q = (blocks * inv).round().to(torch.int8).reshape(m, k)
    return q, (amax / 127).squeeze(-1)


def int8_activations_ref(x: torch.Tensor, rows: int = FEW_ROWS) -> torch.Tensor:
    """x as the int kernels see it at up to `rows` rows (FEW_ROWS; int_gemm: 2 x FEW_ROWS, a
    speculative verification row's tokens): quantized (quantize_rows_ref) and back, or x itself
    with MINSERVE_CPU_EXACT_ACTIVATIONS=1 or more rows."""
    if not _quantize() or x.shape[0] > rows:
        return x
    q, d = quantize_rows_ref(x)
    m, k = x.shape
    return (q.float().view(m, -1, Q8_BLOCK) * d[:, :, None]).view(m, k).to(x.dtype)


def _quantize() -> int:
    return 0 if env.CPU_EXACT_ACTIVATIONS else 1


def available() -> bool:
    return library() is not None


def library() -> ctypes.CDLL | None:
    """The compiled kernel, built on first use; None where it cannot be (logged once)."""
    if "lib" in _state:
        return _state["lib"]  # type: ignore[return-value]
    if not env.CPU_NATIVE or platform.system() != "Linux":
        return None
    with _lock:
        if "lib" not in _state:
            try:
                _state["lib"] = _load(_build())
            except (OSError, subprocess.SubprocessError, RuntimeError) as e:
                log.warning("native CPU kernels unavailable (%s); int weights and decode "
                            "attention use torch", e)
                _state["lib"] = None
    return _state["lib"]  # type: ignore[return-value]


def _cpu_flags() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith(("flags", "Features")):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return ""


def _build() -> str:
    cc = env.c_compiler() or shutil.which("cc") or shutil.which("gcc")
    if cc is None:
        raise RuntimeError("no C compiler (cc) on PATH")
    source = b""
    for path in SOURCES:
        with open(path, "rb") as f:
            source += f.read()
    version = subprocess.run([cc, "--version"], capture_output=True, timeout=30).stdout
    key = hashlib.sha256(source + version + _cpu_flags().encode() + platform.machine().encode())
    out_dir = os.path.join(env.cache_dir(), "native")
    out = os.path.join(out_dir, f"minserve_cpu-{key.hexdigest()[:16]}.so")
    if os.path.isfile(out):
        return out
    os.makedirs(out_dir, exist_ok=True)
    fd, tmp = tempfile.mkstemp(suffix=".so", dir=out_dir)
    os.close(fd)
    # -fno-math-errno lets expf vectorize (glibc's libmvec); it changes no result.
    base = [cc, "-O3", "-std=c11", "-fPIC", "-shared", "-fopenmp", "-fno-math-errno", *SOURCES,
            "-o", tmp, "-lm"]
    try:
        for flags in (["-march=native"], []):     # a compiler without -march=native still builds
            run = subprocess.run(base[:1] + flags + base[1:], capture_output=True,
                                 timeout=COMPILE_TIMEOUT_S)
            if run.returncode == 0:
                os.replace(tmp, out)
                return out
        raise RuntimeError(f"{cc} failed: {run.stderr.decode(errors='replace').strip()[:300]}")
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def _load(path: str) -> ctypes.CDLL:
    lib = ctypes.CDLL(path)
    i64, ptr = ctypes.c_int64, ctypes.c_void_p
    lib.int_gemm.argtypes = [ptr, i64, i64, ptr, ptr, ptr, ctypes.c_int, i64, i64, i64, ptr, i64,
                             ctypes.c_int, ctypes.c_int]
    lib.int_gemm.restype = ctypes.c_int
    lib.moe_int_gemm.argtypes = [ptr, i64, i64, ptr, ptr, ptr, i64, ptr, i64, ptr, ptr, i64,
                                 ctypes.c_int, i64, i64, i64, ptr, i64, ctypes.c_int, ctypes.c_int]
    lib.moe_int_gemm.restype = ctypes.c_int
    lib.quantize_rows_q8.argtypes = [ptr, i64, i64, i64, i64, ptr, ptr, ptr]
    lib.quantize_rows_q8.restype = None
    lib.int_dequantize.argtypes = [ptr, ptr, ptr, ctypes.c_int, i64, i64, i64, ptr, ctypes.c_int]
    lib.int_dequantize.restype = None
    f32 = ctypes.c_float
    lib.rms_norm.argtypes = [ptr, ptr, ptr, ptr, ptr, i64, i64, f32, ctypes.c_int]
    lib.rms_norm.restype = None
    lib.silu_and_mul.argtypes = [ptr, ptr, i64, i64, ctypes.c_int]
    lib.silu_and_mul.restype = None
    lib.gelu_tanh_and_mul.argtypes = [ptr, ptr, i64, i64, ctypes.c_int]
    lib.gelu_tanh_and_mul.restype = None
    lib.store_kv.argtypes = [ptr, i64, ptr, i64, ptr, ptr, ptr, i64, i64, i64]
    lib.store_kv.restype = ctypes.c_int
    lib.block_gemm.argtypes = [ptr, i64, i64, ptr, ctypes.c_int, i64, i64, ptr, i64, ctypes.c_int,
                               ctypes.c_int]
    lib.block_gemm.restype = ctypes.c_int
    lib.block_dequantize.argtypes = [ptr, ctypes.c_int, i64, i64, ptr, ctypes.c_int]
    lib.block_dequantize.restype = None
    lib.int8_exact.argtypes = [ptr, i64, i64, ptr, ptr, ctypes.c_int]
    lib.int8_exact.restype = ctypes.c_int
    lib.decode_attention.argtypes = [ptr, i64, ptr, ptr, ptr, i64, ptr, i64, i64, i64, i64, i64,
                                     ctypes.c_float, ptr, ctypes.c_float, i64, ptr, i64,
                                     ctypes.c_int]
    lib.decode_attention.restype = ctypes.c_int
    lib.mxfp4_gemm.argtypes = [ptr, i64, i64, ptr, ptr, i64, ptr, ctypes.c_int]   # mxfp4.py
    lib.mxfp4_gemm.restype = None
    lib.mxfp4_dequantize.argtypes = [ptr, ptr, i64, i64, ptr, ctypes.c_int]
    lib.mxfp4_dequantize.restype = None
    return lib


def dequantize(w: CpuIntWeight) -> torch.Tensor:
    lib = library()
    if lib is None:
        return dequantize_ref(w)
    n, k = w.out_features, w.in_features
    out = torch.empty(n, k, dtype=torch.float32)
    lib.int_dequantize(w.q.data_ptr(), w.scales.data_ptr(), w.bias.data_ptr(), w.bits, k,
                       w.group_size, n, out.data_ptr(), torch.get_num_threads())
    return out


def int_gemm(x: torch.Tensor, w: CpuIntWeight, bias: torch.Tensor | None = None) -> torch.Tensor:
    """x [M, K] -> [M, N] in x's dtype: the native kernel for up to MAX_ROWS rows, else one
    sgemm on the natively dequantized weight."""
    lib = library()
    if w.perm is not None:
        x = x.index_select(1, w.perm)
    dtype = x.dtype
    if dtype != torch.float32 or not x.is_contiguous():
        x = x.float().contiguous()
    m, k = x.shape
    if lib is None:
        out = int_gemm_ref(x, w)
    elif m > MAX_ROWS:
        out = torch.nn.functional.linear(x, dequantize(w))
    else:
        n = w.q.shape[0]
        out = torch.empty(m, n, dtype=torch.float32)
        if lib.int_gemm(x.data_ptr(), m, k, w.q.data_ptr(), w.scales.data_ptr(),
                        w.bias.data_ptr(), w.bits, k, w.group_size, n, out.data_ptr(), n,
                        _quantize(), torch.get_num_threads()):
            raise MemoryError("cpu_int_gemm: no memory for the per-thread row buffer")
    if dtype != torch.float32:
        out = out.to(dtype)
    return out if bias is None else out + bias


def moe_int_gemm(x: torch.Tensor, w: CpuIntExperts, groups: list[tuple[int, int, int]]
                 ) -> torch.Tensor:
    """x [M, K] (rows sorted by expert) -> [M, N] float32: rows [start, end) of each group
    (expert, start, end) times that expert's weight, in one native call. Groups of more than
    MAX_ROWS rows (a prefill) dequantize their expert and run one sgemm, as int_gemm does."""
    lib = library()
    x = x.float().contiguous()
    m, k = x.shape
    n = w.q.shape[1]
    out = torch.empty(m, n, dtype=torch.float32)
    native = [g for g in groups if g[2] - g[1] <= MAX_ROWS] if lib is not None else []
    for e, start, end in groups:
        if lib is None or end - start > MAX_ROWS:
            out[start:end] = int_gemm(x[start:end], w.expert(e))
    if native:
        experts, starts, ends = torch.tensor(native, dtype=torch.int64).t().contiguous()
        if lib.moe_int_gemm(x.data_ptr(), m, k, starts.data_ptr(), ends.data_ptr(),
                            experts.data_ptr(), len(native), w.q.data_ptr(), w.q.stride(0),
                            w.scales.data_ptr(), w.bias.data_ptr(), w.scales.stride(0), w.bits,
                            k, w.group_size, n, out.data_ptr(), n, _quantize(),
                            torch.get_num_threads()):
            raise MemoryError("cpu_int_gemm: no memory for the grouped GEMM's buffers")
    return out


def block_gemm(x: torch.Tensor, w: GgufBlockWeight,
               bias: torch.Tensor | None = None) -> torch.Tensor:
    """x [M, K] @ a GGUF weight in its blocks -> [M, N] in x's dtype: the native kernel for up
    to MAX_ROWS rows, else one sgemm on the natively dequantized weight; the reference without
    the library."""
    lib = library()
    if lib is None:
        return block_gemm_ref(x, w, bias)
    dtype = x.dtype
    if dtype != torch.float32 or not x.is_contiguous():
        x = x.float().contiguous()
    m, k = x.shape
    n = w.out_features
    if k != w.in_features or not w.blocks.is_contiguous():
        raise ValueError(f"block_gemm: x [{m}, {k}] against a {w.type_name} weight "
                         f"[{n}, {w.in_features}]")
    threads = torch.get_num_threads()
    if m > MAX_ROWS:
        dense = torch.empty(n, k, dtype=torch.float32)
        lib.block_dequantize(w.blocks.data_ptr(), w.type_id, k, n, dense.data_ptr(), threads)
        out = torch.nn.functional.linear(x, dense)
    else:
        out = torch.empty(m, n, dtype=torch.float32)
        if lib.block_gemm(x.data_ptr(), m, k, w.blocks.data_ptr(), w.type_id, k, n,
                          out.data_ptr(), n, _quantize(), threads):
            raise MemoryError("cpu_int_gemm: no memory for the per-thread row buffer")
    if dtype != torch.float32:
        out = out.to(dtype)
    return out if bias is None else out + bias


def decode_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                     block_table: torch.Tensor, seq_lens: torch.Tensor, scale: float,
                     out: torch.Tensor, sliding_window: int | None = None,
                     sinks: torch.Tensor | None = None, softcap: float | None = None) -> bool:
    """out[r] = attention of decode token q[r] ([R, H, D]) over its seq_lens[r] cached keys
    (block_table [R, max_blocks] int32; the last sliding_window of them when set; sinks [H]
    and softcap: attention_ref's). False, with out untouched, where the native kernel does not
    apply (no library, or not float32 contiguous caches): the caller uses torch."""
    lib = library()
    if (lib is None or k_cache.dtype != torch.float32 or v_cache.dtype != torch.float32
            or q.dtype != torch.float32 or out.dtype != torch.float32
            or not (k_cache.is_contiguous() and v_cache.is_contiguous())
            or q.stride(-1) != 1 or q.stride(-2) != q.shape[-1] or out.stride(-1) != 1
            or out.stride(-2) != out.shape[-1] or block_table.stride(-1) != 1):
        return False
    r, h, d = q.shape
    _, bs, kh, _ = k_cache.shape
    block_table = block_table.to(torch.int32)
    seq_lens = seq_lens.to(torch.int32).contiguous()
    if sinks is not None:
        sinks = sinks.to(torch.float32).contiguous()
    if lib.decode_attention(q.data_ptr(), q.stride(0), k_cache.data_ptr(), v_cache.data_ptr(),
                            block_table.data_ptr(), block_table.stride(0), seq_lens.data_ptr(),
                            r, h, kh, d, bs, scale, None if sinks is None else sinks.data_ptr(),
                            softcap or 0.0, sliding_window or 0, out.data_ptr(), out.stride(0),
                            torch.get_num_threads()):
        raise MemoryError("cpu_attention: no memory for the per-thread score buffer")
    return True


def _f32_rows(*tensors: torch.Tensor | None) -> bool:
    return all(t is None or (t.dtype == torch.float32 and t.device.type == "cpu"
                             and t.dim() == 2 and t.is_contiguous()) for t in tensors)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float,
             residual: torch.Tensor | None = None
             ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor] | None:
    """layer_ops.rms_norm_ref ([M, D] float32 rows) in one call; None where it does not apply
    (no library, other dtypes or layouts): the caller runs torch."""
    lib = library()
    if lib is None or not _f32_rows(x, residual) or weight.dtype != torch.float32:
        return None
    m, d = x.shape
    out = torch.empty_like(x)
    res_out = None if residual is None else torch.empty_like(x)
    lib.rms_norm(x.data_ptr(), None if residual is None else residual.data_ptr(),
                 None if res_out is None else res_out.data_ptr(), weight.data_ptr(),
                 out.data_ptr(), m, d, eps, torch.get_num_threads())
    return out if res_out is None else (out, res_out)


def _gated(symbol: str, x: torch.Tensor) -> torch.Tensor | None:
    """[M, 2I] (gate | up) -> [M, I] through the library's gated activation `symbol`, in one
    call; None where it does not apply (no library, other dtypes or layouts)."""
    lib = library()
    if lib is None or not _f32_rows(x):
        return None
    m, two_i = x.shape
    out = torch.empty(m, two_i // 2, dtype=torch.float32)
    getattr(lib, symbol)(x.data_ptr(), out.data_ptr(), m, two_i // 2, torch.get_num_threads())
    return out


def silu_and_mul(x: torch.Tensor) -> torch.Tensor | None:
    """silu(gate) * up (layer_ops.silu_and_mul_ref)."""
    return _gated("silu_and_mul", x)


def gelu_tanh_and_mul(x: torch.Tensor) -> torch.Tensor | None:
    """gelu_tanh(gate) * up (layer_ops.gelu_tanh_and_mul_ref)."""
    return _gated("gelu_tanh_and_mul", x)


def store_kv(k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
             slot_mapping: torch.Tensor) -> bool:
    """k, v [T, K, D] into the float32 caches' slots (slot_mapping [T] int64, -1 skips); False,
    with nothing written, where it does not apply."""
    lib = library()
    if (lib is None or k_cache.dtype != torch.float32 or v_cache.dtype != torch.float32
            or k.dtype != torch.float32 or v.dtype != torch.float32
            or not (k_cache.is_contiguous() and v_cache.is_contiguous())
            or slot_mapping.dtype != torch.int64 or not slot_mapping.is_contiguous()
            or k.device.type != "cpu"):
        return False
    t, kh, d = k.shape
    for x in (k, v):
        if x.stride(2) != 1 or x.stride(1) != d:
            return False
    if k_cache.shape[2:] != (kh, d) or v_cache.shape != k_cache.shape:
        return False
    if lib.store_kv(k.data_ptr(), k.stride(0), v.data_ptr(), v.stride(0), k_cache.data_ptr(),
                    v_cache.data_ptr(), slot_mapping.data_ptr(), t, kh * d,
                    k_cache.shape[0] * k_cache.shape[1]):
        raise IndexError("store_kv: a slot is past the end of the KV cache")
    return True
