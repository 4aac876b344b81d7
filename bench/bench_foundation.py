"""Benchmarks for the foundation: inspect and convert on a ~1.3 GB checkpoint of many tensors
(none over ~70 MB), timed against baselines run alternately in the same session, with peak
anonymous memory (RssAnon) sampled from /proc.

    python bench/bench_foundation.py [--runs 5] [--workdir bench/out]

Prints a Markdown table of medians and ratios (the figures in docs/performance.md)."""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
CLI = [sys.executable, "-m", "ckptsurgery"]


def build(workdir: str) -> tuple[str, str]:
    """A transformer-shaped fp32 checkpoint: 26 blocks of 12 tensors plus embeddings, ~1.3 GB."""
    pth, st = os.path.join(workdir, "big.pth"), os.path.join(workdir, "big.safetensors")
    if os.path.exists(pth) and os.path.exists(st):
        return pth, st
    code = f"""
import torch
from safetensors.torch import save_file
torch.manual_seed(0)
d, sd = 1024, {{}}
sd["embed.weight"] = torch.randn(16000, d)
for i in range(26):
    p = f"blocks.{{i}}."
    for name in ("q", "k", "v", "o"):
        sd[p + f"attn.{{name}}.weight"] = torch.randn(d, d)
        sd[p + f"attn.{{name}}.bias"] = torch.randn(d)
    sd[p + "mlp.up.weight"] = torch.randn(4 * d, d)
    sd[p + "mlp.down.weight"] = torch.randn(d, 4 * d)
    sd[p + "norm1.weight"] = torch.ones(d)
    sd[p + "norm2.weight"] = torch.ones(d)
torch.save(sd, {pth!r})
save_file(sd, {st!r})
"""
    subprocess.run([sys.executable, "-c", code], check=True)
    return pth, st


def run(command: list[str]) -> tuple[float, int]:
    """Wall time and peak RssAnon (bytes) of one command, sampled every 2 ms."""
    start = time.perf_counter()
    proc = subprocess.Popen(command, stdout=subprocess.DEVNULL)
    peak = 0
    status = f"/proc/{proc.pid}/status"
    while proc.poll() is None:
        try:
            with open(status) as f:
                for line in f:
                    if line.startswith("RssAnon:"):
                        peak = max(peak, int(line.split()[1]) * 1024)
        except (FileNotFoundError, ProcessLookupError):
            pass
        time.sleep(0.002)
    elapsed = time.perf_counter() - start
    if proc.returncode != 0:
        raise SystemExit(f"failed ({proc.returncode}): {' '.join(command)}")
    return elapsed, peak


def shell(script: str) -> list[str]:
    return ["bash", "-c", script]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--workdir", default=os.path.join(HERE, "out"))
    args = parser.parse_args()
    os.makedirs(args.workdir, exist_ok=True)
    pth, st = build(args.workdir)
    out = lambda name: os.path.join(args.workdir, name)  # noqa: E731
    naive = ("import sys, torch; from safetensors.torch import save_file; "
             "save_file(torch.load(sys.argv[1], weights_only=True), sys.argv[2])")
    cases = {
        "import torch": [sys.executable, "-c", "import torch"],
        "inspect --json big.pth": CLI + ["inspect", pth, "--json"],
        "inspect --json big.safetensors": CLI + ["inspect", st, "--json"],
        "cp big.pth": ["cp", pth, out("copy.pth")],
        "convert big.pth -> .safetensors": CLI + ["convert", pth, "-o", out("conv.safetensors"), "-q"],
        "import torch + cp big.safetensors": shell(f"{sys.executable} -c 'import torch' && cp {st} {out('copy.st')}"),
        "convert big.safetensors -> .pth": CLI + ["convert", st, "-o", out("conv.pth"), "-q"],
        "naive torch.load + save_file": [sys.executable, "-c", naive, pth, out("naive.safetensors")],
    }
    outputs = [out(n) for n in ("copy.pth", "conv.safetensors", "copy.st", "conv.pth", "naive.safetensors")]
    for path in (pth, st):  # warm the page cache so every case reads from memory alike
        subprocess.run(["cat", path], stdout=subprocess.DEVNULL, check=True)
    times: dict[str, list[float]] = {k: [] for k in cases}
    peaks: dict[str, list[int]] = {k: [] for k in cases}
    for _ in range(args.runs):  # alternate the cases within each round: noise hits all alike
        for name, command in cases.items():
            for path in outputs:
                if os.path.exists(path):
                    os.unlink(path)
            elapsed, peak = run(command)
            times[name].append(elapsed)
            peaks[name].append(peak)
    med = {k: statistics.median(v) for k, v in times.items()}
    size = os.path.getsize(pth) / 1e9
    print(f"checkpoint: {size:.2f} GB, 26x12+1 tensors; {args.runs} runs each, medians\n")
    print("| case | median wall (s) | peak RssAnon (MB) |")
    print("|---|---:|---:|")
    for name in cases:
        print(f"| {name} | {med[name]:.3f} | {max(peaks[name]) / 1e6:.0f} |")
    print("\n| ratio | value | target |")
    print("|---|---:|---:|")
    ratios = [
        ("inspect .pth / import torch", med["inspect --json big.pth"] / med["import torch"], "< 0.20"),
        ("inspect .safetensors / import torch", med["inspect --json big.safetensors"] / med["import torch"], "< 0.20"),
        ("convert -> .safetensors / cp", med["convert big.pth -> .safetensors"] / med["cp big.pth"], "< 1.6"),
        ("convert -> .pth / (import torch + cp)",
         med["convert big.safetensors -> .pth"] / med["import torch + cp big.safetensors"], "< 1.6"),
    ]
    for name, value, target in ratios:
        print(f"| {name} | {value:.2f} | {target} |")
    shutil.rmtree(args.workdir) if os.environ.get("BENCH_CLEAN") else None


if __name__ == "__main__":
    main()
