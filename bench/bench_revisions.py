"""A/B against an earlier revision: the same commands, run by this checkout's ckptsurgery and by
REV's (a git worktree in bench/out/rev-REV), alternating in every round so that the machine's
noise falls on both alike. The way to tell a regression from noise on these machines.

    python bench/bench_revisions.py REV [--runs 5] [--workdir bench/out]

Uses the checkpoints of bench_foundation.py and bench_surgery.py (built if missing)."""

from __future__ import annotations

import argparse
import os

from common import HERE, REPO, build, measure, revision_tree, tree_cli, warm


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("rev")
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--workdir", default=os.path.join(HERE, "out"))
    args = parser.parse_args()
    os.makedirs(args.workdir, exist_ok=True)
    out = lambda name: os.path.join(args.workdir, name)  # noqa: E731
    base = revision_tree(args.rev, args.workdir)
    pth, st, small = out("big.pth"), out("big.safetensors"), out("small0.pth")
    build(pth, st)
    for i in range(2):
        build(out(f"small{i}.pth"), None, blocks=9, seed=i)
    commands = {
        "inspect --json big.pth": ["inspect", pth, "--json"],
        "convert big.pth -> .safetensors": ["convert", pth, "-o", out("ab.safetensors"), "-q"],
        "convert big.safetensors -> .pth": ["convert", st, "-o", out("ab.pth"), "-q"],
        "rename big.safetensors -> .pth": ["rename", st, "--add-prefix", "m.", "-o", out("ab-r.pth"), "-q"],
        "merge --average 2 x 0.45 GB": ["merge", small, out("small1.pth"), "--average", "-o", out("ab-avg.pth"), "-q"],
        "diff big.pth big.safetensors": ["diff", pth, st],
        "diff --atol 2 x 0.45 GB": ["diff", small, out("small1.pth"), "--atol", "100", "--json"],  # values read, exit 0
    }
    cases = {}
    for name, command in commands.items():
        cases[f"{name} [{args.rev}]"] = tree_cli(base) + command
        cases[f"{name} [this checkout]"] = tree_cli(REPO) + command
    warm(pth, st, small)
    med, peak = measure(cases, args.runs, [out(n) for n in ("ab.safetensors", "ab.pth", "ab-r.pth", "ab-avg.pth")])
    print(f"{args.runs} rounds, medians; each pair alternates within every round\n")
    print("| case | median wall (s) | peak RssAnon (MB) |")
    print("|---|---:|---:|")
    for name in cases:
        print(f"| {name} | {med[name]:.3f} | {peak[name] / 1e6:.0f} |")
    print("\n| this checkout / REV | wall | peak RssAnon |")
    print("|---|---:|---:|")
    for name in commands:
        old, new = f"{name} [{args.rev}]", f"{name} [this checkout]"
        print(f"| {name} | {med[new] / med[old]:.2f} | {peak[new] / max(peak[old], 1):.2f} |")


if __name__ == "__main__":
    main()
