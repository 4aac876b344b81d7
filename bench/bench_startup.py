"""Start-up: every command on a two-tensor file, where start-up is all a command costs, against
the interpreter's own start and `import torch`; and the two large-file ratios start-up decides
(`inspect` of a 1.37 GB file against `import torch`, `convert` of it against `cp`).

    python bench/bench_startup.py [--runs 9] [--workdir bench/out]

The package is byte-compiled first (common.byte_compile), as `pip install` does.
Prints Markdown tables of medians and ratios (the figures in docs/performance.md)."""

from __future__ import annotations

import os
import subprocess
import sys

from common import CLI, build, measure, options, print_tables, warm

TINY = """
import sys, torch
from safetensors.torch import save_file
d = {"a.weight": torch.ones(2), "b.weight": torch.zeros(2)}
torch.save(d, sys.argv[1]); save_file(d, sys.argv[2]); save_file(d, sys.argv[3])
"""


def main() -> None:
    args, out = options(runs=9)
    pth, st = out("big.pth"), out("big.safetensors")
    build(pth, st)
    tiny_pth, tiny_st, tiny_other = out("tiny.pth"), out("tiny.safetensors"), out("tiny2.safetensors")
    subprocess.run([sys.executable, "-c", TINY, tiny_pth, tiny_st, tiny_other], check=True)
    o_st, o_pth = out("o.safetensors"), out("o.pth")
    commands = {
        "--version": ["--version"],
        "inspect --json tiny.safetensors": ["inspect", tiny_st, "--json"],
        "inspect tiny.pth": ["inspect", tiny_pth],
        "convert tiny.pth -> .safetensors": ["convert", tiny_pth, "-o", o_st, "-q"],
        "convert tiny.safetensors -> .pth": ["convert", tiny_st, "-o", o_pth, "-q"],
        "filter --keep": ["filter", tiny_st, "--keep", "a.*", "-o", o_st, "-q"],
        "drop": ["drop", tiny_pth, "a.weight", "-o", o_pth, "-q"],
        "rename --add-prefix": ["rename", tiny_st, "--add-prefix", "m.", "-o", o_st, "-q"],
        "merge (union)": ["merge", tiny_st, tiny_pth, "--on-conflict", "first", "-o", o_st, "-q"],
        "merge --average": ["merge", tiny_st, tiny_other, "--average", "-o", o_st, "-q"],
        "diff": ["diff", tiny_st, tiny_other, "-q"],
    }
    cases = {
        "python -c pass": [sys.executable, "-c", "pass"],
        "python -c 'import numpy'": [sys.executable, "-c", "import numpy"],
        "python -c 'import torch'": [sys.executable, "-c", "import torch"],
        **{name: CLI + argv for name, argv in commands.items()},
        "inspect --json big.safetensors": CLI + ["inspect", st, "--json"],
        "cp big.pth": ["cp", pth, out("copy.pth")],
        "convert big.pth -> .safetensors": CLI + ["convert", pth, "-o", out("conv.safetensors"), "-q"],
    }
    # diff exits 1 on different files: the two tiny files are equal, so it exits 0 like the rest
    warm(pth, st, tiny_pth, tiny_st)
    med, peak = measure(cases, args.runs, [o_st, o_pth, out("copy.pth"), out("conv.safetensors")])
    print(f"{args.runs} runs each, alternating, medians\n")
    slowest = max(commands, key=lambda name: med[name])
    print_tables(cases, med, peak, [
        (f"slowest command on a tiny file ({slowest}), s", med[slowest], "<= 0.1"),
        ("inspect --json big.safetensors / import torch",
         med["inspect --json big.safetensors"] / med["python -c 'import torch'"], "<= 0.05"),
        ("convert big.pth -> .safetensors / cp", med["convert big.pth -> .safetensors"] / med["cp big.pth"], "<= 1.2"),
    ])


if __name__ == "__main__":
    main()
