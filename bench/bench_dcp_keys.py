"""Cost per key of a DCP folder (issue 18 §4, item 2): folders of 20 000 and 100 000 one-chunk
tensors of 4 floats (`model.layers.N.experts.M.w`), written by torch's own
`torch.distributed.checkpoint.save` from one process (no process group), then
`inspect --json` and `convert -o x.safetensors` timed on each, and, for reference, inspect --json
of the same tensors saved as one .safetensors (what listing them costs with no .metadata to read).
The cost per key is the slope between the two sizes (start-up cancels out); memory is the peak
RssAnon on the 100 000-key folder less that of inspect on a tiny DCP folder (the interpreter and
its imports), held against the size of the folder's `.metadata`. Goal: inspect --json <= 20 µs per
key, memory <= 2x `.metadata`.

    python bench/bench_dcp_keys.py [--runs 3] [--workdir bench/out] [--rev REV]

With --rev, REV's checkout (a git worktree in bench/out/rev-REV) is timed beside this one."""

from __future__ import annotations

import argparse
import os
import subprocess
import sys

import resource
import statistics

from common import HERE, REPO, revision_tree, run, tree_cli

BUILD = """
import sys, warnings, torch
import torch.distributed.checkpoint as dcp
from safetensors.torch import save_file
n = int(sys.argv[1])
sd = {f"layers.{i // 64}.experts.{i % 64}.w": torch.full((4,), float(i)) for i in range(n)}
with warnings.catch_warnings():
    warnings.simplefilter("ignore")  # "torch.distributed is disabled ... single process"
    dcp.save({"model": sd}, checkpoint_id=sys.argv[2])
save_file(sd, sys.argv[2] + ".safetensors")  # the same tensors: what listing them costs with no .metadata to read
"""

SIZES = (20_000, 100_000)


def folder(workdir: str, n: int) -> str:
    """The DCP folder of `n` keys in `workdir`, built once (a folder is renamed into place only
    when torch's save finished: a killed build leaves nothing that looks complete)."""
    path = os.path.join(workdir, f"dcp_keys{n}")
    if not os.path.isfile(path + ".safetensors"):
        partial = path + ".partial"
        subprocess.run(["rm", "-rf", partial, path, partial + ".safetensors"], check=True)
        subprocess.run([sys.executable, "-c", BUILD, str(n), partial], check=True)
        os.rename(partial, path)
        os.rename(partial + ".safetensors", path + ".safetensors")
    return path


def measure(cases: dict[str, list[str]], runs: int, outputs: list[str]) -> tuple[dict, dict, dict]:
    """common.measure, and the CPU time (user + system) of each run besides its wall time: on a
    machine others share, the CPU time is what a command costs, the wall time what it took.
    Medians of wall and CPU time, max of peak RssAnon."""
    wall: dict[str, list[float]] = {k: [] for k in cases}
    cpu: dict[str, list[float]] = {k: [] for k in cases}
    peaks: dict[str, list[int]] = {k: [] for k in cases}
    for _ in range(runs):
        for name, command in cases.items():
            for path in outputs:
                if os.path.exists(path):
                    os.unlink(path)
            os.sync()
            before = resource.getrusage(resource.RUSAGE_CHILDREN)
            elapsed, peak = run(command)
            after = resource.getrusage(resource.RUSAGE_CHILDREN)
            wall[name].append(elapsed)
            cpu[name].append(after.ru_utime + after.ru_stime - before.ru_utime - before.ru_stime)
            peaks[name].append(peak)
    return ({k: statistics.median(v) for k, v in wall.items()}, {k: statistics.median(v) for k, v in cpu.items()},
            {k: max(v) for k, v in peaks.items()})


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--workdir", default=os.path.join(HERE, "out"))
    parser.add_argument("--rev", help="also time this revision's checkout (a worktree in WORKDIR/rev-REV)")
    args = parser.parse_args()
    os.makedirs(args.workdir, exist_ok=True)
    folders = {n: folder(args.workdir, n) for n in (8, *SIZES)}
    trees = {"this checkout": REPO}
    if args.rev:
        trees[args.rev] = revision_tree(args.rev, args.workdir)
    out = os.path.join(args.workdir, "dcp_keys.safetensors")
    cases = {}
    for label, tree in trees.items():
        cli = tree_cli(tree)
        cases[f"inspect tiny [{label}]"] = cli + ["inspect", folders[8], "--json"]
        for n in SIZES:
            cases[f"inspect {n} [{label}]"] = cli + ["inspect", folders[n], "--json"]
            cases[f"convert {n} [{label}]"] = cli + ["convert", folders[n], "-o", out, "-q", "--force"]
            cases[f"safetensors {n} [{label}]"] = cli + ["inspect", folders[n] + ".safetensors", "--json"]
    for path in folders.values():  # into the page cache, alike for every case
        for name in [os.path.join(path, n) for n in os.listdir(path)] + [path + ".safetensors"]:
            subprocess.run(["cat", name], stdout=subprocess.DEVNULL, check=True)
    med, cpu, peak = measure(cases, args.runs, [out])
    meta = {n: os.path.getsize(os.path.join(folders[n], ".metadata")) for n in SIZES}
    print(f"{args.runs} rounds, medians; .metadata: " + ", ".join(f"{n}: {meta[n] / 1e6:.1f} MB" for n in SIZES)
          + f"; load average at the end {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores")
    print()
    print("| command | checkout | 20k (s) | 100k (s) | per key (µs) | CPU per key (µs) | peak RssAnon 100k (MB) "
          "| less tiny inspect (MB) | / .metadata |")
    print("|---|---|---:|---:|---:|---:|---:|---:|---:|")
    names = {"inspect": "inspect --json", "convert": "convert -> .safetensors",
             "safetensors": "inspect --json, the same tensors in one .safetensors (reference)"}

    def slope(values: dict, command: str, label: str) -> float:  # µs per key between the two sizes
        times = [values[f"{command} {n} [{label}]"] for n in SIZES]
        return (times[1] - times[0]) / (SIZES[1] - SIZES[0]) * 1e6

    for label in trees:
        base = peak[f"inspect tiny [{label}]"]
        for command, name in names.items():
            top = peak[f"{command} {SIZES[1]} [{label}]"]
            print(f"| {name} | {label} | " + " | ".join(f"{med[f'{command} {n} [{label}]']:.2f}" for n in SIZES)
                  + f" | {slope(med, command, label):.0f} | {slope(cpu, command, label):.0f} | {top / 1e6:.0f} "
                  f"| {(top - base) / 1e6:.0f} | {(top - base) / meta[SIZES[1]]:.2f} |")
    print("\ninspect of the tiny folder (8 keys): " + ", ".join(
        f"{label} {med[f'inspect tiny [{label}]']:.2f} s, {peak[f'inspect tiny [{label}]'] / 1e6:.0f} MB"
        for label in trees))


if __name__ == "__main__":
    main()
