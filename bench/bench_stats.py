"""inspect --stats against one numpy pass over the same mapped bytes (the floor: every byte read
once) and against REV's inspect --stats (a git worktree in bench/out/rev-REV), on a ~1.37 GB
float32 .safetensors. Goal (issue 18 §4): <= 1.5x the numpy pass, <= 64 MB + one chunk.

    python bench/bench_stats.py [--rev REV] [--runs 3]
"""

from __future__ import annotations

import argparse
import os
import sys

from common import HERE, REPO, build, measure, print_tables, revision_tree, tree_cli, warm

# every float32 of every tensor read once, as one numpy reduction per tensor: what a pass costs
NUMPY_PASS = r"""
import json, mmap, struct, sys
import numpy as np
with open(sys.argv[1], "rb") as f:
    n = struct.unpack("<Q", f.read(8))[0]
    header = json.loads(f.read(n))
    m = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
total = 0.0
for name, info in header.items():
    if name == "__metadata__":
        continue
    start, end = info["data_offsets"]
    total += float(np.frombuffer(m, "<f4", (end - start) // 4, 8 + n + start).sum(dtype=np.float64))
print(total)
"""


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rev")
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--workdir", default=os.path.join(HERE, "out"))
    args = parser.parse_args()
    os.makedirs(args.workdir, exist_ok=True)
    st = os.path.join(args.workdir, "big.safetensors")
    build(None, st)
    cases = {"numpy pass over the mapped file": [sys.executable, "-c", NUMPY_PASS, st],
             "inspect --stats [this checkout]": tree_cli(REPO) + ["inspect", st, "--stats", "--json"]}
    if args.rev:
        base = revision_tree(args.rev, args.workdir)
        cases[f"inspect --stats [{args.rev}]"] = tree_cli(base) + ["inspect", st, "--stats", "--json"]
    warm(st)
    med, peak = measure(cases, args.runs, [])
    floor = med["numpy pass over the mapped file"]
    print(f"{args.runs} rounds, medians\n")
    print_tables(cases, med, peak, [("inspect --stats / numpy pass", med["inspect --stats [this checkout]"] / floor,
                                     "<= 1.5")])


if __name__ == "__main__":
    main()
