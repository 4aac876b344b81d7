"""Benchmarks for the foundation: inspect and convert on a ~1.37 GB checkpoint of many tensors
(none over ~70 MB), timed against baselines run alternately in the same session, with peak
anonymous memory (RssAnon) sampled from /proc.

    python bench/bench_foundation.py [--runs 5] [--workdir bench/out]

Prints Markdown tables of medians and ratios (the figures in docs/performance.md)."""

from __future__ import annotations

import os
import sys

from common import CLI, build, measure, options, print_tables, warm


def main() -> None:
    args, out = options(runs=5)
    pth, st = out("big.pth"), out("big.safetensors")
    build(pth, st)
    naive = ("import sys, torch; from safetensors.torch import save_file; "
             "save_file(torch.load(sys.argv[1], weights_only=True), sys.argv[2])")
    cases = {
        "import torch": [sys.executable, "-c", "import torch"],
        "inspect --json big.pth": CLI + ["inspect", pth, "--json"],
        "inspect --json big.safetensors": CLI + ["inspect", st, "--json"],
        "cp big.pth": ["cp", pth, out("copy.pth")],
        "convert big.pth -> .safetensors": CLI + ["convert", pth, "-o", out("conv.safetensors"), "-q"],
        "import torch + cp big.safetensors": ["bash", "-c", f"{sys.executable} -c 'import torch' && cp {st} {out('copy.st')}"],
        "convert big.safetensors -> .pth": CLI + ["convert", st, "-o", out("conv.pth"), "-q"],
        "naive torch.load + save_file": [sys.executable, "-c", naive, pth, out("naive.safetensors")],
    }
    outputs = [out(n) for n in ("copy.pth", "conv.safetensors", "copy.st", "conv.pth", "naive.safetensors")]
    warm(pth, st)
    med, peak = measure(cases, args.runs, outputs)
    print(f"checkpoint: {os.path.getsize(pth) / 1e9:.2f} GB, 26x12+1 tensors; {args.runs} runs each, medians\n")
    print_tables(cases, med, peak, [
        ("inspect .pth / import torch", med["inspect --json big.pth"] / med["import torch"], "< 0.20"),
        ("inspect .safetensors / import torch", med["inspect --json big.safetensors"] / med["import torch"], "< 0.20"),
        ("convert -> .safetensors / cp", med["convert big.pth -> .safetensors"] / med["cp big.pth"], "< 1.6"),
        ("convert -> .pth / (import torch + cp)",
         med["convert big.safetensors -> .pth"] / med["import torch + cp big.safetensors"], "< 1.6"),
    ])


if __name__ == "__main__":
    main()
