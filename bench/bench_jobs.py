"""Many shards: a 1.37 GB checkpoint in 12 safetensors shards of ~115 MB converted to 12 shards
again — safetensors (bytes copied by the kernel) and .pth (every byte through a CRC-32) — with
--jobs 1, 2 and 4, against `cp` of the same shards. Wall time and peak RssAnon; what the default
of --jobs rests on (docs/performance.md, "Many shards").

    python bench/bench_jobs.py [--runs 5] [--workdir bench/out]"""

from __future__ import annotations

import os
import subprocess

from common import CLI, build, measure, options, print_tables, warm

SHARD = "120MB"
JOBS = (1, 2, 4)


def main() -> None:
    args, out = options(runs=5)
    st = out("big.safetensors")
    build(None, st)
    shards = out("shards")
    if not os.path.isdir(shards):
        os.makedirs(shards)
        subprocess.run(CLI + ["convert", st, "-o", os.path.join(shards, "model.safetensors"), "--max-shard-size",
                              SHARD, "-q"], check=True)
    inputs = sorted(os.path.join(shards, n) for n in os.listdir(shards))
    folders = {name: out(f"jobs-{name}") for name in ("cp", "st", "pth")}
    for folder in folders.values():
        os.makedirs(folder, exist_ok=True)
    cases = {f"cp {len(inputs) - 1} shards": ["bash", "-c", f"cp {shards}/* {folders['cp']}/"]}
    for suffix, key in ((".safetensors", "st"), (".pth", "pth")):
        for jobs in JOBS:
            cases[f"convert -> {suffix} shards, --jobs {jobs}"] = CLI + [
                "convert", shards, "-o", os.path.join(folders[key], "model" + suffix), "--max-shard-size", SHARD,
                "--jobs", str(jobs), "-q"]
    warm(*inputs)
    med, peak = measure(cases, args.runs, list(folders.values()))
    size = sum(os.path.getsize(p) for p in inputs)
    print(f"input: {len(inputs) - 1} shards, {size / 1e9:.2f} GB; {os.cpu_count()} cores; {args.runs} runs each, "
          f"medians\n")
    cp = med[f"cp {len(inputs) - 1} shards"]
    ratios = [(f"{name.removeprefix('convert ')} / cp", med[name] / cp, "") for name in cases if "jobs" in name]
    print_tables(cases, med, peak, ratios)


if __name__ == "__main__":
    main()
