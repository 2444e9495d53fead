"""Requantize an F32/F16 GGUF (as llama.cpp's convert_hf_to_gguf.py writes it) to Q4_0/Q4_1/
Q5_0/Q5_1/Q8_0 with the gguf package's numpy quantizers, for the llama.cpp side-by-side without
building llama-quantize. Every 2-D weight whose rows are a multiple of the block size is
quantized (token_embd and output too, as `llama-quantize --pure` does); norms stay F32; every
metadata field is copied, with general.file_type set to the new type.

    python convert_hf_to_gguf.py MODEL_DIR --outtype f32 --outfile /tmp/m-f32.gguf
    python bench/gguf_quantize.py /tmp/m-f32.gguf /tmp/m-q4_1.gguf --type Q4_1
"""
from __future__ import annotations

import argparse

import numpy as np

FILE_TYPES = {"Q4_0": 2, "Q4_1": 3, "Q8_0": 7, "Q5_0": 8, "Q5_1": 9}   # llama_ftype


def main() -> None:
    import gguf

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("src")
    ap.add_argument("dst")
    ap.add_argument("--type", default="Q4_1", choices=sorted(FILE_TYPES))
    args = ap.parse_args()
    qtype = getattr(gguf.GGMLQuantizationType, args.type)
    block = gguf.GGML_QUANT_SIZES[qtype][0]

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
            writer.add_tensor(t.name, gguf.quants.quantize(data, qtype), raw_dtype=qtype)
        else:
            writer.add_tensor(t.name, data.astype(np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


if __name__ == "__main__":
    main()
