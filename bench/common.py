"""Shared by the benchmarks: building large checkpoints, timing commands, sampling memory."""

from __future__ import annotations

import os
import statistics
import subprocess
import sys
import time

CLI = [sys.executable, "-m", "ckptsurgery"]
HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)


def byte_compile(tree: str) -> None:
    """Byte-compile a tree's package, as `pip install` does: where PYTHONDONTWRITEBYTECODE is set
    (as on the machines these figures come from) every run would compile from source instead —
    tens of milliseconds, and more for a revision's worktree than for this checkout."""
    subprocess.run([sys.executable, "-m", "compileall", "-q", os.path.join(tree, "ckptsurgery")], check=True,
                   stdout=subprocess.DEVNULL)


byte_compile(REPO)


def tree_cli(tree: str) -> list[str]:
    """The command line of the ckptsurgery in `tree` (this checkout, or a revision's worktree).
    -P: `python -m` would otherwise put the working folder (this checkout, when run from it)
    first on sys.path, before PYTHONPATH, and both sides would run the same code."""
    byte_compile(tree)
    return ["env", f"PYTHONPATH={tree}", sys.executable, "-P", "-m", "ckptsurgery"]


def revision_tree(rev: str, workdir: str) -> str:
    """A git worktree of `rev` at WORKDIR/rev-REV, made if missing."""
    base = os.path.join(workdir, f"rev-{rev}")
    if not os.path.isdir(base):
        subprocess.run(["git", "-C", REPO, "worktree", "add", "--detach", "-f", base, rev], check=True)
    return base


def options(runs: int = 3, more=None):
    """(parsed --runs/--workdir, out(name) -> a path in the work folder, created). `more(parser)`
    adds a benchmark's own options."""
    import argparse

    parser = argparse.ArgumentParser()
    parser.add_argument("--runs", type=int, default=runs)
    parser.add_argument("--workdir", default=os.path.join(HERE, "out"))
    if more is not None:
        more(parser)
    args = parser.parse_args()
    os.makedirs(args.workdir, exist_ok=True)
    return args, lambda name: os.path.join(args.workdir, name)


def build(pth: str | None, st: str | None, blocks: int = 26, seed: int = 0, classes: int = 16000) -> None:
    """A transformer-shaped fp32 state dict: an embedding (classes x 1024) and `blocks` blocks of
    12 tensors (the largest 16.8 MB); 26 blocks make ~1.37 GB, 9 make ~0.45 GB."""
    if all(p is None or os.path.exists(p) for p in (pth, st)):
        return
    code = f"""
import torch
from safetensors.torch import save_file
torch.manual_seed({seed})
d, sd = 1024, {{}}
sd["embed.weight"] = torch.randn({classes}, d)
for i in range({blocks}):
    p = f"blocks.{{i}}."
    for name in ("q", "k", "v", "o"):
        sd[p + f"attn.{{name}}.weight"] = torch.randn(d, d)
        sd[p + f"attn.{{name}}.bias"] = torch.randn(d)
    sd[p + "mlp.up.weight"] = torch.randn(4 * d, d)
    sd[p + "mlp.down.weight"] = torch.randn(d, 4 * d)
    sd[p + "norm1.weight"] = torch.ones(d)
    sd[p + "norm2.weight"] = torch.ones(d)
"""
    if pth is not None:
        code += f"torch.save(sd, {pth!r})\n"
    if st is not None:
        code += f"save_file(sd, {st!r})\n"
    subprocess.run([sys.executable, "-c", code], check=True)


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


def measure(cases: dict[str, list[str]], runs: int, outputs: list[str]) -> tuple[dict, dict]:
    """Run every case once per round, `runs` rounds, alternating cases within a round so that the
    machine's noise falls on all alike; outputs are removed and the disk synced before each run
    (neither timed); a folder among `outputs` is emptied. Median times, max peaks."""
    times: dict[str, list[float]] = {k: [] for k in cases}
    peaks: dict[str, list[int]] = {k: [] for k in cases}
    for _ in range(runs):
        for name, command in cases.items():
            for path in outputs:
                if os.path.isdir(path):
                    for entry in os.listdir(path):
                        os.unlink(os.path.join(path, entry))
                elif os.path.exists(path):
                    os.unlink(path)
            os.sync()  # start each run with no dirty pages of the last one still being written back
            elapsed, peak = run(command)
            times[name].append(elapsed)
            peaks[name].append(peak)
    return {k: statistics.median(v) for k, v in times.items()}, {k: max(v) for k, v in peaks.items()}


def warm(*paths: str) -> None:
    """Read inputs once so every case finds them in the page cache alike."""
    for path in paths:
        subprocess.run(["cat", path], stdout=subprocess.DEVNULL, check=True)


def print_tables(cases, med, peak, ratios) -> None:
    print("| case | median wall (s) | peak RssAnon (MB) |")
    print("|---|---:|---:|")
    for name in cases:
        print(f"| {name} | {med[name]:.3f} | {peak[name] / 1e6:.0f} |")
    print("\n| ratio | value | target |")
    print("|---|---:|---:|")
    for name, value, target in ratios:
        print(f"| {name} | {value:.3f} | {target} |")
