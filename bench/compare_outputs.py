"""What a refactoring must not change: the same commands, run by this checkout's ckptsurgery and by
REV's (a git worktree in bench/out/rev-REV), on small checkpoints built here, compared byte for
byte — stdout, stderr, the exit code and every file written. Prints the cases that differ.

    python bench/compare_outputs.py REV [--workdir bench/out/compare] [--show]

Paths in the outputs are the same on both sides (each side runs in the same folder, one after the
other), so any difference is a difference of behaviour."""

from __future__ import annotations

import argparse
import hashlib
import os
import shutil
import subprocess
import sys

from common import HERE, REPO, revision_tree


def build(folder: str) -> None:
    """Tiny checkpoints: a model, a changed model (template), fine-tuned copies, a nested .pth."""
    import torch
    from safetensors.torch import save_file

    torch.manual_seed(0)

    def model(classes=10, channels=3):
        return {"conv.weight": torch.randn(8, channels, 3, 3), "conv.bias": torch.randn(8),
                "bn.weight": torch.rand(8), "bn.bias": torch.randn(8), "bn.running_mean": torch.randn(8),
                "bn.running_var": torch.rand(8), "bn.num_batches_tracked": torch.tensor(3),
                "fc.weight": torch.randn(classes, 8), "fc.bias": torch.randn(classes)}

    base = model()
    torch.save(base, f"{folder}/base.pth")
    save_file(base, f"{folder}/base.safetensors", metadata={"format": "pt", "license": "mit"})
    for i in (1, 2):
        tuned = {k: (v + 0.1 * i * torch.randn_like(v) if v.is_floating_point() else v) for k, v in base.items()}
        save_file(tuned, f"{folder}/tuned{i}.safetensors")
    torch.save(model(classes=4, channels=4), f"{folder}/template.pth")
    torch.save({"epoch": 3, "state_dict": {"module." + k: v for k, v in base.items()},
                "optimizer": {"lr": 0.1}}, f"{folder}/nested.pth")


def cases(d: str) -> dict[str, list[str]]:
    o = f"{d}/out"
    writes = {
        "convert": ["convert", f"{d}/base.pth", "-o", f"{o}/c.safetensors"],
        "convert-bf16-shards": ["convert", f"{d}/base.pth", "-o", f"{o}/s.safetensors", "--dtype", "bf16",
                                "--max-shard-size", "600B"],
        "convert-dcp": ["convert", f"{d}/nested.pth", "-o", f"{o}/dcp", "--format", "dcp"],
        "convert-nested-safetensors": ["convert", f"{d}/nested.pth", "-o", f"{o}/n.safetensors"],
        "drop": ["drop", f"{d}/base.pth", "fc", "-o", f"{o}/d.pth"],
        "drop-metadata": ["drop", f"{d}/base.safetensors", "bn", "-o", f"{o}/d.safetensors", "--metadata", "a=b"],
        "filter-keep": ["filter", f"{d}/base.pth", "--keep", "conv", "-o", f"{o}/f.pth"],
        "filter-like": ["filter", f"{d}/base.pth", "--like", f"{d}/template.pth", "-o", f"{o}/fl.pth"],
        "rename": ["rename", f"{d}/nested.pth", "--strip-prefix", "module", "-o", f"{o}/r.pth"],
        "merge-union": ["merge", f"{d}/base.pth", f"{d}/tuned1.safetensors", "--on-conflict", "last",
                        "-o", f"{o}/u.safetensors"],
        "merge-into": ["merge", f"{d}/base.pth", "--into", f"{d}/template.pth", "--on-mismatch", "overlap",
                       "-o", f"{o}/i.pth"],
        "merge-adapt": ["merge", f"{d}/base.pth", "--into", f"{d}/template.pth", "--on-mismatch", "adapt",
                        "-o", f"{o}/a.pth"],
        "merge-average": ["merge", f"{d}/tuned1.safetensors", f"{d}/tuned2.safetensors", "--average",
                          "--weights", "1,3", "-o", f"{o}/avg.safetensors"],
        "merge-ties": ["merge", f"{d}/tuned1.safetensors", f"{d}/tuned2.safetensors", "--method", "ties",
                       "--base", f"{d}/base.safetensors", "--density", "0.5", "-o", f"{o}/ties.safetensors"],
        "merge-dare": ["merge", f"{d}/tuned1.safetensors", f"{d}/tuned2.safetensors", "--method", "dare-ties",
                       "--base", f"{d}/base.safetensors", "--density", "0.5", "--seed", "3", "-o", f"{o}/dare.pth"],
        "merge-slerp": ["merge", f"{d}/tuned1.safetensors", f"{d}/tuned2.safetensors", "--method", "slerp",
                        "--t", "0.3", "-o", f"{o}/slerp.safetensors"],
        "extract-lora": ["extract-lora", f"{d}/base.safetensors", f"{d}/tuned1.safetensors", "--rank", "2",
                         "-o", f"{o}/adapter"],
    }
    runs = {}
    for name, command in writes.items():
        at = command.index("-o") + 1
        runs[name] = command
        stem, ext = os.path.splitext(command[at])
        runs[f"{name} --json"] = [*command[:at], f"{stem}-j{ext}", *command[at + 1:], "--json"]
        runs[f"{name} --dry-run"] = [*command, "--dry-run"]
    runs["merge-lora"] = ["merge", f"{d}/base.safetensors", "--lora", f"{o}/adapter", "-o", f"{o}/folded.safetensors"]
    runs["merge-lora --json"] = [*runs["merge-lora"][:-1], f"{o}/folded2.safetensors", "--json"]
    runs.update({
        "inspect": ["inspect", f"{d}/nested.pth"], "inspect --json": ["inspect", f"{d}/nested.pth", "--json"],
        "inspect --tree": ["inspect", f"{d}/base.safetensors", "--tree"],
        "inspect --stats --hash --json": ["inspect", f"{d}/base.pth", "--stats", "--hash", "--json"],
        "diff": ["diff", f"{d}/base.pth", f"{d}/tuned1.safetensors"],
        "diff --json": ["diff", f"{d}/base.pth", f"{d}/tuned1.safetensors", "--json", "--atol", "0.01"],
        "exists-no-force": writes["drop"],
        "wrong-option-mix": ["merge", f"{d}/base.pth", "--into", f"{d}/template.pth", "--on-conflict", "last",
                             "-o", f"{o}/x.pth"],
        "method-param": ["merge", f"{d}/base.pth", f"{d}/base.pth", "--method", "linear", "--density", "0.5",
                         "-o", f"{o}/x.pth"],
        "on-mismatch-with-average": ["merge", f"{d}/base.pth", f"{d}/base.pth", "--average", "--on-mismatch", "skip",
                                     "-o", f"{o}/x.pth"],
        "otherwise-without-adapt": ["merge", f"{d}/base.pth", "--otherwise", "skip", "-o", f"{o}/x.pth"],
        "lora-with-into": ["merge", f"{d}/base.pth", "--lora", f"{o}/adapter", "--into", f"{d}/template.pth",
                           "--seed", "1", "-o", f"{o}/x.pth"],
        "lora-scale-without-lora": ["merge", f"{d}/base.pth", "--lora-scale", "0.5", "-o", f"{o}/x.pth"],
        "base-without-method": ["merge", f"{d}/base.pth", "--base", f"{d}/base.pth", "-o", f"{o}/x.pth"],
        "seed-zero": ["merge", f"{d}/tuned1.safetensors", f"{d}/tuned2.safetensors", "--method", "dare-linear",
                      "--base", f"{d}/base.safetensors", "--seed", "0", "--t", "0", "-o", f"{o}/x.pth"],
        "jobs-one-file": ["convert", f"{d}/base.pth", "-o", f"{o}/x.pth", "-j", "2"],
        "metadata-on-pth": ["convert", f"{d}/base.pth", "-o", f"{o}/x.pth", "--metadata", "a=b"],
    })
    return runs


def run_all(tree: str, folder: str) -> dict[str, tuple]:
    """Every case run by `tree`'s ckptsurgery in `folder` (outputs made afresh): what it printed,
    its exit code and the SHA-256 of every file under out/ afterwards."""
    results = {}
    out = os.path.join(folder, "out")
    shutil.rmtree(out, ignore_errors=True)
    os.makedirs(out)
    env = {**os.environ, "PYTHONPATH": tree, "COLUMNS": "160"}
    for name, command in cases(folder).items():
        # run in `folder`: `python -m` puts the working folder first on sys.path, before PYTHONPATH
        done = subprocess.run([sys.executable, "-m", "ckptsurgery", *command], capture_output=True, env=env,
                              cwd=folder)
        results[name] = (done.returncode, done.stdout, done.stderr)
    files = {}
    for top, _, names in os.walk(out):
        for n in names:
            path = os.path.join(top, n)
            with open(path, "rb") as f:
                files[os.path.relpath(path, out)] = hashlib.sha256(f.read()).hexdigest()
    results["files written"] = (0, repr(sorted(files.items())).encode(), b"")
    return results


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("rev")
    parser.add_argument("--workdir", default=os.path.join(HERE, "out", "compare"))
    parser.add_argument("--show", action="store_true", help="print both sides of every difference")
    args = parser.parse_args()
    base = revision_tree(args.rev, os.path.join(HERE, "out"))
    os.makedirs(args.workdir, exist_ok=True)
    build(args.workdir)
    before, after = run_all(base, args.workdir), run_all(REPO, args.workdir)
    differ = [name for name in before if before[name] != after[name]]
    print(f"{len(before)} cases, {len(differ)} differ")
    for name in differ:
        print(f"- {name}")
        if args.show:
            for side, result in (("before", before[name]), ("after", after[name])):
                print(f"  {side}: exit {result[0]}\n    stdout: {result[1].decode(errors='replace')!r}"
                      f"\n    stderr: {result[2].decode(errors='replace')!r}")
    sys.exit(1 if differ else 0)


if __name__ == "__main__":
    main()
