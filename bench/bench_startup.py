"""Start-up: every command on a two-tensor file, where start-up is all a command costs, against
the interpreter's own start and `import torch`; and the two large-file ratios start-up decides
(`inspect` of a 1.37 GB file against `import torch`, `convert` of it against `cp`).

    python bench/bench_startup.py [--runs 9] [--workdir bench/out] [--installed VENV]

The package is byte-compiled first (common.byte_compile), as `pip install` does. By default every
case runs on this checkout's interpreter, with the editable install `make` makes (its finder is
imported by every interpreter start there, `python -c pass` included). `--installed VENV` runs them
all on VENV's interpreter instead, with this checkout installed there as a user installs it (`pip
install .`, not editable; VENV is made with torch==2.13.0 first if missing, and the package is
reinstalled from this checkout at each run).
`merge --average --dry-run` is merge's start-up without its arithmetic (numpy is imported by the
first tensor computed). Prints Markdown tables of medians and ratios (docs/performance.md)."""

from __future__ import annotations

import os
import subprocess
import sys

from common import CLI, REPO, build, measure, options, print_tables, warm

TINY = """
import sys, torch
from safetensors.torch import save_file
d = {"a.weight": torch.ones(2), "b.weight": torch.zeros(2)}
torch.save(d, sys.argv[1]); save_file(d, sys.argv[2]); save_file(d, sys.argv[3])
"""


def installed(venv: str) -> str:
    """The interpreter of `venv`, with this checkout installed in it as `pip install .` installs it."""
    python = os.path.join(venv, "bin", "python")
    if not os.path.exists(python):
        subprocess.run([sys.executable, "-m", "venv", venv], check=True)
        subprocess.run([python, "-m", "pip", "install", "-q", "torch==2.13.0"], check=True)
    subprocess.run([python, "-m", "pip", "install", "-q", "--force-reinstall", "--no-deps", REPO], check=True)
    subprocess.run([python, "-m", "pip", "install", "-q", REPO], check=True)  # its dependencies, once
    return python


def main() -> None:
    args, out = options(runs=9, more=lambda p: p.add_argument("--installed", metavar="VENV"))
    python = installed(args.installed) if args.installed else sys.executable
    cli = [python, "-m", "ckptsurgery"] if args.installed else CLI
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
        "merge --average --dry-run": ["merge", tiny_st, tiny_other, "--average", "-o", o_st, "-q", "--dry-run"],
        "diff": ["diff", tiny_st, tiny_other, "-q"],
    }
    cases = {
        "python -c pass": [python, "-c", "pass"],
        "python -c 'import numpy'": [python, "-c", "import numpy"],
        "python -c 'import torch'": [python, "-c", "import torch"],
        **{name: cli + argv for name, argv in commands.items()},
        "inspect --json big.safetensors": cli + ["inspect", st, "--json"],
        "cp big.pth": ["cp", pth, out("copy.pth")],
        "convert big.pth -> .safetensors": cli + ["convert", pth, "-o", out("conv.safetensors"), "-q"],
    }
    # diff exits 1 on different files: the two tiny files are equal, so it exits 0 like the rest
    warm(pth, st, tiny_pth, tiny_st)
    med, peak = measure(cases, args.runs, [o_st, o_pth, out("copy.pth"), out("conv.safetensors")])
    print(f"{args.runs} runs each, alternating, medians\n")
    slowest = max(commands, key=lambda name: med[name])
    # merge --average imports numpy for its arithmetic: what is left once numpy's own import is taken out
    no_numpy = max((name for name in commands if name != "merge --average"), key=lambda name: med[name])
    numpy_import = med["python -c 'import numpy'"] - med["python -c pass"]
    print_tables(cases, med, peak, [
        (f"slowest command on a tiny file ({slowest}), s", med[slowest], "<= 0.1"),
        (f"slowest but merge --average ({no_numpy}), s", med[no_numpy], "<= 0.1"),
        ("merge --average less numpy's import, s", med["merge --average"] - numpy_import, "<= 0.1"),
        ("inspect --json big.safetensors / import torch",
         med["inspect --json big.safetensors"] / med["python -c 'import torch'"], "<= 0.05"),
        ("convert big.pth -> .safetensors / cp", med["convert big.pth -> .safetensors"] / med["cp big.pth"], "<= 1.2"),
    ])


if __name__ == "__main__":
    main()
