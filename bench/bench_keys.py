"""Cost per key: checkpoints of 20 000, 110 000 and 200 000 small tensors (as mixture-of-experts
models have), in .safetensors and .pth; each command timed on every size and the cost per key
taken as the slope between 20 000 and 200 000, so that start-up cancels out. The slopes of the two
halves (20k-110k, 110k-200k) show whether the cost grows linearly: equal slopes, linear growth.

    python bench/bench_keys.py [--runs 3] [--workdir bench/out]"""

from __future__ import annotations

import os
import subprocess
import sys

from common import CLI, measure, options

BUILD = """
import sys, torch
from safetensors.torch import save_file
n = int(sys.argv[1])
sd = {f"model.layers.{i // 64}.experts.{i % 64}.w": torch.full((4,), float(i)) for i in range(n)}
save_file(sd, sys.argv[2])
torch.save(sd, sys.argv[3])
"""


def main() -> None:
    args, out = options(runs=3)
    sizes = (20_000, 110_000, 200_000)
    for n in sizes:
        if not os.path.exists(out(f"keys{n}.pth")):
            subprocess.run([sys.executable, "-c", BUILD, str(n), out(f"keys{n}.safetensors"), out(f"keys{n}.pth")],
                           check=True)
    commands = {
        "inspect --json": lambda src, n: ["inspect", src, "--json"],
        "inspect (table)": lambda src, n: ["inspect", src],  # the first 2 000 rows and a summary line
        "inspect --all": lambda src, n: ["inspect", src, "--all"],  # every row
        "rename": lambda src, n: ["rename", src, "--add-prefix", "m", "-o", out(f"r{n}{os.path.splitext(src)[1]}"),
                                  "-q", "--force"],
        "convert": lambda src, n: ["convert", src, "-o", out(f"c{n}" + (".pth" if src.endswith("safetensors")
                                                                      else ".safetensors")), "-q", "--force"],
    }
    cases = {}
    for fmt in ("safetensors", "pth"):
        for name, make in commands.items():
            for n in sizes:
                cases[f"{name} .{fmt} {n}"] = CLI + make(out(f"keys{n}.{fmt}"), n)
    med, _ = measure(cases, args.runs, [])
    print("| command | format | 20k (s) | 110k (s) | 200k (s) | per key (µs) | first half | second half |")
    print("|---|---|---:|---:|---:|---:|---:|---:|")
    for fmt in ("safetensors", "pth"):
        for name in commands:
            times = [med[f"{name} .{fmt} {n}"] for n in sizes]

            def slope(i: int, j: int) -> float:  # µs per key between sizes[i] and sizes[j]
                return (times[j] - times[i]) / (sizes[j] - sizes[i]) * 1e6

            print(f"| {name} | .{fmt} | " + " | ".join(f"{t:.2f}" for t in times)
                  + f" | {slope(0, 2):.0f} | {slope(0, 1):.0f} | {slope(1, 2):.0f} |")


if __name__ == "__main__":
    main()
