"""Benchmarks for surgery: merge --average of three ~0.45 GB checkpoints and merge --into of one
onto another (peak RssAnon against a naive torch.load script), and filter/drop/rename of the
~1.37 GB checkpoint timed against cp / import torch + cp like convert.

    python bench/bench_surgery.py [--runs 3] [--workdir bench/out]"""

from __future__ import annotations

import sys

from common import CLI, build, measure, options, print_tables, warm

NAIVE_AVERAGE = """
import sys, torch
sds = [torch.load(p, weights_only=True) for p in sys.argv[1:4]]
torch.save({k: sum(sd[k] for sd in sds) / 3 for k in sds[0]}, sys.argv[4])
"""
NAIVE_INTO = """
import sys, torch
model_dict = torch.load(sys.argv[2], weights_only=True)
pretrained = torch.load(sys.argv[1], weights_only=True)
model_dict.update({k: v for k, v in pretrained.items() if k in model_dict and v.shape == model_dict[k].shape})
torch.save(model_dict, sys.argv[3])
"""


def main() -> None:
    args, out = options(runs=3)
    pth, st = out("big.pth"), out("big.safetensors")
    build(pth, st)
    small = [out(f"small{i}.pth") for i in range(3)]
    for i, path in enumerate(small):
        build(path, None, blocks=9, seed=i)
    template = out("template.pth")  # the new model: a 10-row "embedding" head, fresh values
    build(template, None, blocks=9, seed=9, classes=10)
    cases = {
        "naive average of 3 (torch.load)": [sys.executable, "-c", NAIVE_AVERAGE, *small, out("naive_avg.pth")],
        "merge --average 3 x 0.45 GB": CLI + ["merge", *small, "--average", "-o", out("avg.pth"), "-q"],
        "naive model_dict.update": [sys.executable, "-c", NAIVE_INTO, small[0], template, out("naive_into.pth")],
        "merge --into (overlap head)": CLI + ["merge", small[0], "--into", template, "--on-mismatch", "overlap",
                                              "-o", out("into.pth"), "-q"],
        "cp big.pth": ["cp", pth, out("copy.pth")],
        "filter big.pth -> .safetensors": CLI + ["filter", pth, "--keep", "blocks", "-o", out("f.safetensors"), "-q"],
        "drop big.pth -> .safetensors": CLI + ["drop", pth, "embed", "-o", out("d.safetensors"), "-q"],
        "rename big.pth -> .safetensors": CLI + ["rename", pth, "--add-prefix", "m.", "-o", out("r.safetensors"), "-q"],
        "import torch + cp big.safetensors": ["bash", "-c", f"{sys.executable} -c 'import torch' && cp {st} {out('copy.st')}"],
        "rename big.safetensors -> .pth": CLI + ["rename", st, "--add-prefix", "m.", "-o", out("r.pth"), "-q"],
    }
    outputs = [out(n) for n in ("naive_avg.pth", "avg.pth", "naive_into.pth", "into.pth", "copy.pth", "f.safetensors",
                                "d.safetensors", "r.safetensors", "copy.st", "r.pth")]
    warm(pth, st, *small, template)
    med, peak = measure(cases, args.runs, outputs)
    print(f"{args.runs} runs each, medians; peaks are the maximum over runs\n")
    print_tables(cases, med, peak, [
        ("merge --average peak RssAnon (MB)", peak["merge --average 3 x 0.45 GB"] / 1e6, "< 600"),
        ("merge --into peak RssAnon (MB)", peak["merge --into (overlap head)"] / 1e6, "< 600"),
        ("filter -> .safetensors / cp", med["filter big.pth -> .safetensors"] / med["cp big.pth"], "< 1.6"),
        ("drop -> .safetensors / cp", med["drop big.pth -> .safetensors"] / med["cp big.pth"], "< 1.6"),
        ("rename -> .safetensors / cp", med["rename big.pth -> .safetensors"] / med["cp big.pth"], "< 1.6"),
        ("rename -> .pth / (import torch + cp)",
         med["rename big.safetensors -> .pth"] / med["import torch + cp big.safetensors"], "< 1.6"),
    ])


if __name__ == "__main__":
    main()
