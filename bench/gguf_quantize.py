"""Requantize an F32/F16 GGUF (as llama.cpp's convert_hf_to_gguf.py writes it) to Q4_0/Q4_1/
Q5_0/Q5_1/Q8_0 with the gguf package's numpy quantizers, for the llama.cpp side-by-side without
building llama-quantize. Every 2-D weight whose rows are a multiple of the block size is
quantized (token_embd and output too, as `llama-quantize --pure` does); norms stay F32; every
metadata field is copied, with general.file_type set to the new type.

Q4_K_M: gguf-py cannot quantize K-quants, so this file has its own plain round-to-nearest Q4_K
and Q6_K (min/max per sub-block, no search: llama.cpp's quantizer picks better scales, so the
file is as large and as fast as llama-quantize's but a little less accurate). The mix is
llama.cpp's in outline: Q6_K for attn_v, ffn_down and output, Q4_K elsewhere, and where a
tensor's rows are not a multiple of 256 (the default model's 576) Q5_0 for Q4_K and Q8_0 for
Q6_K, as llama-quantize falls back.

    python convert_hf_to_gguf.py MODEL_DIR --outtype f32 --outfile /tmp/m-f32.gguf
    python bench/gguf_quantize.py /tmp/m-f32.gguf /tmp/m-q4_1.gguf --type Q4_1
"""
from __future__ import annotations

import argparse

import numpy as np

FILE_TYPES = {"Q4_0": 2, "Q4_1": 3, "Q8_0": 7, "Q5_0": 8, "Q5_1": 9, "Q4_K_M": 15}  # llama_ftype
Q6_K_TENSORS = ("attn_v.weight", "ffn_down.weight", "output.weight")


def _f16_bytes(a: np.ndarray) -> np.ndarray:
    return a.astype(np.float16).view(np.uint8).reshape(*a.shape, 2)


def quantize_q4_k(w: np.ndarray) -> np.ndarray:
    """[N, K] float32 (K % 256 == 0) -> [N, K / 256 * 144] uint8 Q4_K blocks:
    w = d * sc * q - dmin * m per 32 values, q 4 bits, sc and m 6 bits."""
    n, k = w.shape
    x = w.reshape(-1, 8, 32).astype(np.float32)                       # [blocks, 8 subs, 32]
    lo, hi = np.minimum(x.min(-1), 0), x.max(-1)
    scale, offset = (hi - lo) / 15, -lo                               # offset >= 0
    d, dmin = scale.max(-1) / 63, offset.max(-1) / 63                 # [blocks]
    d16, dmin16 = (a.astype(np.float16).astype(np.float32) for a in (d, dmin))
    sc = np.clip(np.round(scale / np.where(d16 > 0, d16, 1)[:, None]), 0, 63)
    mn = np.clip(np.round(offset / np.where(dmin16 > 0, dmin16, 1)[:, None]), 0, 63)
    sc, mn = sc.astype(np.uint8), mn.astype(np.uint8)
    s_eff, m_eff = d16[:, None] * sc, dmin16[:, None] * mn
    q = np.round((x + m_eff[..., None]) / np.where(s_eff > 0, s_eff, 1)[..., None])
    q = np.clip(q, 0, 15).astype(np.uint8)                            # [blocks, 8, 32]
    scales = np.empty((x.shape[0], 12), dtype=np.uint8)
    scales[:, 0:4] = sc[:, :4] | ((sc[:, 4:] >> 4) << 6)
    scales[:, 4:8] = mn[:, :4] | ((mn[:, 4:] >> 4) << 6)
    scales[:, 8:12] = (sc[:, 4:] & 0x0F) | ((mn[:, 4:] & 0x0F) << 4)
    qs = (q[:, 0::2] | (q[:, 1::2] << 4)).reshape(-1, 128)          # chunk j: subs 2j, 2j + 1
    out = np.concatenate([_f16_bytes(d16), _f16_bytes(dmin16), scales, qs], axis=1)
    return out.reshape(n, -1)


def quantize_q6_k(w: np.ndarray) -> np.ndarray:
    """[N, K] float32 (K % 256 == 0) -> [N, K / 256 * 210] uint8 Q6_K blocks:
    w = d * sc * (q - 32) per 16 values, q 6 bits, sc int8."""
    n, k = w.shape
    x = w.reshape(-1, 16, 16).astype(np.float32)                      # [blocks, 16 subs, 16]
    scale = np.abs(x).max(-1) / 31                                    # [blocks, 16]
    d = np.abs(scale).max(-1) / 127
    d16 = d.astype(np.float16).astype(np.float32)
    sc = np.clip(np.round(scale / np.where(d16 > 0, d16, 1)[:, None]), -127, 127).astype(np.int8)
    s_eff = d16[:, None] * sc
    q = np.round(x / np.where(s_eff != 0, s_eff, 1)[..., None]) + 32
    q = np.clip(q, 0, 63).astype(np.uint8).reshape(-1, 2, 4, 32)       # [blocks, half, 4, 32]
    ql = np.concatenate([q[:, :, 0] & 0xF | (q[:, :, 2] & 0xF) << 4,
                         q[:, :, 1] & 0xF | (q[:, :, 3] & 0xF) << 4], axis=2)   # [b, 2, 64]
    high = q >> 4
    qh = high[:, :, 0] | high[:, :, 1] << 2 | high[:, :, 2] << 4 | high[:, :, 3] << 6
    out = np.concatenate([ql.reshape(-1, 128), qh.reshape(-1, 64), sc.view(np.uint8),
                          _f16_bytes(d16)], axis=1)
    return out.reshape(n, -1)


def q4_k_m_type(name: str, k: int) -> str:
    """The type of one 2-D tensor in the Q4_K_M mix (see the module's note)."""
    six = name.endswith(Q6_K_TENSORS)
    if k % 256:
        return "Q8_0" if six else "Q5_0"
    return "Q6_K" if six else "Q4_K"


def quantize_as(data: np.ndarray, type_name: str) -> np.ndarray:
    import gguf

    if type_name == "Q4_K":
        return quantize_q4_k(data)
    if type_name == "Q6_K":
        return quantize_q6_k(data)
    return gguf.quants.quantize(data, getattr(gguf.GGMLQuantizationType, type_name))


def main() -> None:
    import gguf

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("src")
    ap.add_argument("dst")
    ap.add_argument("--type", default="Q4_1", choices=sorted(FILE_TYPES))
    args = ap.parse_args()
    block = 32 if args.type == "Q4_K_M" else gguf.GGML_QUANT_SIZES[
        getattr(gguf.GGMLQuantizationType, args.type)][0]

    reader = gguf.GGUFReader(args.src)
    arch = reader.fields["general.architecture"]
    writer = gguf.GGUFWriter(args.dst, bytes(arch.parts[arch.data[0]]).decode())
    for name, field in reader.fields.items():
        if name.startswith("GGUF.") or name == "general.architecture":
            continue                                  # the writer adds these itself
        if name == "general.file_type":
            writer.add_file_type(FILE_TYPES[args.type])
            continue
        vtype = field.types[0]
        if vtype == gguf.GGUFValueType.ARRAY:
            sub = field.types[-1]
            if sub == gguf.GGUFValueType.STRING:
                value = [bytes(field.parts[i]).decode() for i in field.data]
            else:
                value = [field.parts[i].tolist()[0] for i in field.data]
            writer.add_array(name, value)
        elif vtype == gguf.GGUFValueType.STRING:
            writer.add_string(name, bytes(field.parts[field.data[0]]).decode())
        else:
            writer.add_key_value(name, field.parts[field.data[0]].tolist()[0], vtype)
    for t in reader.tensors:
        data = np.asarray(t.data)
        if t.tensor_type == gguf.GGMLQuantizationType.F16:
            data = data.astype(np.float32)
        elif t.tensor_type != gguf.GGMLQuantizationType.F32:
            raise SystemExit(f"{t.name}: {t.tensor_type.name} input; give an F32 or F16 GGUF")
        if data.ndim == 2 and data.shape[-1] % block == 0:
            type_name = (q4_k_m_type(t.name, data.shape[-1]) if args.type == "Q4_K_M"
                         else args.type)
            qtype = getattr(gguf.GGMLQuantizationType, type_name)
            writer.add_tensor(t.name, quantize_as(data, type_name), raw_dtype=qtype)
        else:
            writer.add_tensor(t.name, data.astype(np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


if __name__ == "__main__":
    main()
