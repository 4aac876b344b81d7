"""Cost per key: checkpoints of 20 000 and 200 000 small tensors (as mixture-of-experts models
have), in .safetensors and .pth; each command timed on both sizes and the cost per key taken as
the slope between them, so that start-up cancels out.

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
    sizes = (20_000, 200_000)
    for n in sizes:
        if not os.path.exists(out(f"keys{n}.pth")):
            subprocess.run([sys.executable, "-c", BUILD, str(n), out(f"keys{n}.safetensors"), out(f"keys{n}.pth")],
                           check=True)
    commands = {
        "inspect --json": lambda src, n: ["inspect", src, "--json"],
        "inspect (table)": lambda src, n: ["inspect", src],
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
    print("| command | format | 20k (s) | 200k (s) | per key (µs) |")
    print("|---|---|---:|---:|---:|")
    for fmt in ("safetensors", "pth"):
        for name in commands:
            small, big = med[f"{name} .{fmt} {sizes[0]}"], med[f"{name} .{fmt} {sizes[1]}"]
            slope = (big - small) / (sizes[1] - sizes[0]) * 1e6
            print(f"| {name} | .{fmt} | {small:.2f} | {big:.2f} | {slope:.0f} |")


if __name__ == "__main__":
    main()
