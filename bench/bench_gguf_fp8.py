"""GGUF and FP8 inputs (issue 21 §4, part): GGUF → safetensors of F16 tensors ≤ 1.3× cp; Q8_0/Q4_K
dequantization ≤ 1.0× the time of gguf.quants.dequantize on the same tensors and ≤ 64 MB + one chunk
of memory; FP8 dequantize of a 2 GB shard ≤ 2× cp's time, memory flat.

Inputs, built once in WORKDIR (bench/out/, git-ignored), sizes scaled by --size (default 1.0):
- f16.gguf: ~1.06 GB of F16 tensors shaped like a small Llama (hidden 2048, ffn 5632, vocab 32000,
  9 blocks: token_embd + per block attn_q/k/v/output, ffn_gate/up/down, two norms), GGUFWriter.
- q8_0.gguf: ~255 MB of Q8_0 tensors (4096-wide matrices, 4096x4096 and 11008x4096 rows), quantized
  by gguf.quants.quantize from random float32 arrays.
- q4_k.gguf: ~200 MB of Q4_K tensors of the same shapes. gguf (0.x) has no Q4_K quantizer
  (quantize raises NotImplementedError), so the blocks are random bytes with d/dmin set to small
  finite float16 values: valid blocks whose dequantization costs what any Q4_K block's does.
- fp8.safetensors: ~2.0 GB DeepSeek-V3-style shard: 10 blocks of q/k/v/o (4096x4096) and
  gate/up (11008x4096), down (4096x11008) float8_e4m3fn weights, each with a float32
  X.weight_scale_inv [ceil(M/128), ceil(N/128)].

Cases (common.measure: alternating within each round, medians of --runs, peak RssAnon):
- `cp f16.gguf` vs `ckptsurgery convert f16.gguf -o out.safetensors`
- reference: a script that opens the file with gguf's GGUFReader and runs gguf.quants.dequantize on
  every tensor, writing nothing, vs `ckptsurgery convert qN.gguf -o out.safetensors` (which also
  writes the float32 output), for Q8_0 and Q4_K
- `cp fp8.safetensors` vs `ckptsurgery convert fp8.safetensors -o out.safetensors --dequantize`
  (bf16 output, twice the input's bytes), and the floor of any writer of that output: a script
  writing as many bytes (zeros, nothing computed)

Run: .venv/bin/python bench/bench_gguf_fp8.py --runs 3 [--workdir DIR] [--size 1.0] [--only gguf|fp8]
Large outputs are removed at the end; the inputs are kept."""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time

from common import CLI, HERE, measure, print_tables, warm

BUILD_F16 = """
import sys, numpy as np, gguf
path, size = sys.argv[1], float(sys.argv[2])
rng = np.random.default_rng(0)
h, ff, vocab, blocks = 2048, 5632, 32000, max(1, round(9 * size))
w = gguf.GGUFWriter(path, "llama")
w.add_block_count(blocks)
def t(name, *shape):
    w.add_tensor(name, (0.02 * rng.standard_normal(shape, dtype=np.float32)).astype(np.float16))
t("token_embd.weight", vocab, h)
for i in range(blocks):
    p = f"blk.{i}."
    for n in ("attn_q", "attn_k", "attn_v", "attn_output"):
        t(p + n + ".weight", h, h)
    t(p + "ffn_gate.weight", ff, h); t(p + "ffn_up.weight", ff, h); t(p + "ffn_down.weight", h, ff)
    w.add_tensor(p + "attn_norm.weight", np.ones(h, np.float16)); w.add_tensor(p + "ffn_norm.weight", np.ones(h, np.float16))
w.add_tensor("output_norm.weight", np.ones(h, np.float16))
w.write_header_to_file(); w.write_kv_data_to_file(); w.write_tensors_to_file(); w.close()
"""

# Q8_0 quantized by gguf; Q4_K as random blocks (gguf has no Q4_K quantizer) with finite small d/dmin
BUILD_QUANT = """
import sys, numpy as np, gguf
from gguf import quants
path, kind, size = sys.argv[1], sys.argv[2], float(sys.argv[3])
qt = gguf.GGMLQuantizationType[kind]
block, type_size = gguf.GGML_QUANT_SIZES[qt]
rng = np.random.default_rng(1)
w = gguf.GGUFWriter(path, "llama")
shapes = [(4096, 4096), (11008, 4096)]
target = (255e6 if kind == "Q8_0" else 200e6) * size
total, i = 0, 0
while total < target:
    rows, cols = shapes[i % 2]
    if kind == "Q8_0":
        q = np.concatenate([quants.quantize(0.02 * rng.standard_normal((min(1024, rows - r), cols), dtype=np.float32), qt)
                            for r in range(0, rows, 1024)])
    else:
        q = rng.integers(0, 256, (rows, cols // block * type_size), dtype=np.uint8)
        b = q.reshape(rows, -1, type_size)
        d = (rng.random((rows, b.shape[1], 2), dtype=np.float32) * 1e-3 + 1e-4).astype(np.float16)
        b[:, :, :4] = d.view(np.uint8)
    w.add_tensor(f"blk.{i}.w.weight", q, raw_dtype=qt)
    total += q.nbytes
    i += 1
w.write_header_to_file(); w.write_kv_data_to_file(); w.write_tensors_to_file(); w.close()
"""

BUILD_FP8 = """
import sys, math, torch
from safetensors.torch import save_file
path, size = sys.argv[1], float(sys.argv[2])
torch.manual_seed(2)
sd = {}
shapes = {"self_attn.q_proj": (4096, 4096), "self_attn.k_proj": (4096, 4096), "self_attn.v_proj": (4096, 4096),
          "self_attn.o_proj": (4096, 4096), "mlp.gate_proj": (11008, 4096), "mlp.up_proj": (11008, 4096),
          "mlp.down_proj": (4096, 11008)}
for i in range(max(1, round(10 * size))):
    for name, (m, n) in shapes.items():
        p = f"model.layers.{i}.{name}."
        sd[p + "weight"] = (torch.randn(m, n) * 100).clamp(-448, 448).to(torch.float8_e4m3fn)
        sd[p + "weight_scale_inv"] = torch.rand(math.ceil(m / 128), math.ceil(n / 128)) * 1e-3 + 1e-5
    sd[f"model.layers.{i}.input_layernorm.weight"] = torch.ones(4096, dtype=torch.bfloat16)
save_file(sd, path)
"""

# the reference: gguf's own reader and dequantizer over every tensor, nothing written
REFERENCE = """
import sys
from gguf import GGUFReader
from gguf.quants import dequantize
n = 0
for t in GGUFReader(sys.argv[1]).tensors:
    n += dequantize(t.data, t.tensor_type).size
print(n)
"""


# FP8's floor: as many bytes as the dequantized output, written in 16 MB pieces
WRITE = """
import sys
path, n = sys.argv[1], int(sys.argv[2])
piece = bytearray(16 << 20)
with open(path, "wb") as f:
    while n > 0:
        f.write(memoryview(piece)[: min(n, len(piece))])
        n -= len(piece)
"""


def build(path: str, code: str, *args: str) -> None:
    if os.path.exists(path):
        return
    start = time.perf_counter()
    subprocess.run([sys.executable, "-c", code, path + ".tmp", *args], check=True)
    os.replace(path + ".tmp", path)
    print(f"built {os.path.basename(path)}: {os.path.getsize(path) / 1e6:.0f} MB in "
          f"{time.perf_counter() - start:.0f} s", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--workdir", default=os.path.join(HERE, "out"))
    parser.add_argument("--size", type=float, default=1.0)
    parser.add_argument("--only", choices=("gguf", "fp8"), help="only the GGUF cases, or only the FP8 ones")
    args = parser.parse_args()
    os.makedirs(args.workdir, exist_ok=True)
    out = lambda name: os.path.join(args.workdir, name)  # noqa: E731
    s = str(args.size)
    suffix = "" if args.size == 1.0 else f"-{args.size:g}"
    f16, q8, q4, fp8 = (out(f"{n}{suffix}.{e}") for n, e in
                        (("f16", "gguf"), ("q8_0", "gguf"), ("q4_k", "gguf"), ("fp8", "safetensors")))
    gguf, fp8s = args.only != "fp8", args.only != "gguf"
    inputs = ([f16, q8, q4] if gguf else []) + ([fp8] if fp8s else [])
    if gguf:
        build(f16, BUILD_F16, s)
        build(q8, BUILD_QUANT, "Q8_0", s)
        build(q4, BUILD_QUANT, "Q4_K", s)
    if fp8s:
        build(fp8, BUILD_FP8, s)
    for p in inputs:
        print(f"{os.path.basename(p)}: {os.path.getsize(p) / 1e6:.0f} MB")
    warm(*inputs)

    copy, result = out("gguf-fp8-copy"), out("gguf-fp8-out.safetensors")
    cases = {}
    if gguf:
        cases.update({
            "cp f16.gguf": ["cp", f16, copy],
            "ckptsurgery convert f16.gguf -o out.safetensors": [*CLI, "convert", f16, "-o", result],
            "gguf.quants.dequantize, every tensor of q8_0.gguf (writes nothing)": [sys.executable, "-c", REFERENCE, q8],
            "ckptsurgery convert q8_0.gguf -o out.safetensors (writes f32)": [*CLI, "convert", q8, "-o", result],
            "gguf.quants.dequantize, every tensor of q4_k.gguf (writes nothing)": [sys.executable, "-c", REFERENCE, q4],
            "ckptsurgery convert q4_k.gguf -o out.safetensors (writes f32)": [*CLI, "convert", q4, "-o", result],
        })
    if fp8s:
        cases.update({
            "cp fp8.safetensors": ["cp", fp8, copy],
            "ckptsurgery convert fp8.safetensors -o out.safetensors --dequantize (bf16)":
                [*CLI, "convert", fp8, "-o", result, "--dequantize"],
            # the floor of any writer of this output: its bytes (twice cp's) written, nothing computed
            "write the bf16 output's bytes (2x the shard) from Python, nothing computed":
                [sys.executable, "-c", WRITE, result, str(2 * os.path.getsize(fp8))],
        })
    med, peak = measure(cases, args.runs, [copy, result])
    names = list(cases)
    chunk = 4 << 20
    mem_goal = 64e6 + chunk
    ratios = []
    checks = []
    if gguf:
        r = med[names[1]] / med[names[0]]
        ratios.append(("convert f16.gguf / cp", r, "≤ 1.3"))
        checks.append(("F16 GGUF ≤ 1.3× cp", r <= 1.3))
        for ref, ours, kind in ((names[2], names[3], "Q8_0"), (names[4], names[5], "Q4_K")):
            r = med[ours] / med[ref]
            ratios.append((f"convert {kind} / gguf.quants.dequantize", r, "≤ 1.0"))
            checks.append((f"{kind} ≤ 1.0× gguf.quants.dequantize", r <= 1.0))
            checks.append((f"{kind} peak {peak[ours] / 1e6:.0f} MB ≤ 64 MB + 4 MiB chunk", peak[ours] <= mem_goal))
    if fp8s:
        cp8, ours8, floor8 = names[-3:]
        ratios.append(("writing the bf16 bytes alone / cp", med[floor8] / med[cp8], "(floor)"))
        r = med[ours8] / med[cp8]
        ratios.append(("convert --dequantize fp8 / cp", r, "≤ 2.0"))
        checks.append(("FP8 dequantize ≤ 2× cp", r <= 2.0))
        print(f"FP8 peak RssAnon {peak[ours8] / 1e6:.0f} MB for a {os.path.getsize(fp8) / 1e6:.0f} MB shard: "
              "'flat' is judged by comparing with another --size (e.g. 0.25), not here")
    print()
    print_tables(cases, med, peak, ratios)
    print()
    for text, ok in checks:
        print(f"- {text}: {'met' if ok else 'NOT met'}")
    for p in (copy, result):
        if os.path.exists(p):
            os.unlink(p)


if __name__ == "__main__":
    main()
