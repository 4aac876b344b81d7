"""Every PEFT adapter kind folded, and LoRA to LoRA, against peft (issue 20 §3), on the 1 GB
Llama-shaped base of bench_methods.py (bench/out/llama-base: 12 layers, hidden 1024, float32).

(a) fold: `merge BASE --lora ADAPTER` against peft's route, the one a user runs: load the base with
    transformers (LlamaForCausalLM.from_pretrained), PeftModel.from_pretrained, merge_and_unload,
    save_pretrained. Kinds: LoRA, DoRA (use_dora), LoHa, LoKr — rank 16 (alpha 32) on every q_proj
    and v_proj — and IA3 with peft's defaults for Llama (k_proj, v_proj, down_proj; down_proj a
    feed-forward module). The adapters are made by peft itself (get_peft_model on the base) and
    every adapter weight given random values (peft starts LoRA's B, LoHa's/LoKr's second factor at
    zero, IA3 at one and DoRA's magnitude at ‖W‖, which would fold to W). The two outputs are
    compared (`diff --atol 1e-5`, not timed).
(b) `lora merge A B --combine svd --rank 16` of two rank-16 LoRA adapters, and `lora resize A
    --rank 8`, against peft: the base loaded with transformers, the adapter(s) with
    PeftModel.from_pretrained / load_adapter, add_weighted_adapter(..., combination_type="svd",
    svd_rank=R) (its defaults otherwise: full_matrices=True, no clamp), save_pretrained of the new
    adapter alone. peft has no resize, and turns "svd" of a single adapter into "linear" (svd_rank
    ignored, the rank kept): its resize route is the adapter given twice, weights 0.5 and 0.5. The two outputs' scale·B·A are compared per module (not timed).

Each group (one kind's fold; combine; resize) is measured by common.measure: ckptsurgery and peft
alternating within each round, medians of --runs, peak RssAnon of the process (sampled every
2 ms). Results accumulate in WORKDIR/bench_adapters.json.

Run: .venv/bin/python bench/bench_adapters.py --runs 3 [--groups lora,dora,ia3,loha,lokr,combine,resize]
[--rev REV] (after bench/bench_methods.py has built WORKDIR/llama-base). --rev: time the ckptsurgery
of that commit (a git worktree, WORKDIR/rev-REV), not the checkout, which others may be editing."""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys

from common import CLI, HERE, measure, print_tables, revision_tree, tree_cli, warm

KINDS = ("lora", "dora", "ia3", "loha", "lokr")
GROUPS = (*KINDS, "combine", "resize")

# an adapter of KIND made by peft on the base, every adapter weight given random values
MAKE_ADAPTER = """
import sys, torch
from transformers import LlamaForCausalLM
from peft import IA3Config, LoHaConfig, LoKrConfig, LoraConfig, get_peft_model
base, kind, folder, seed = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
qv = dict(target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM")
config = {
    "lora": lambda: LoraConfig(r=16, lora_alpha=32, **qv),
    "dora": lambda: LoraConfig(r=16, lora_alpha=32, use_dora=True, **qv),
    "ia3": lambda: IA3Config(task_type="CAUSAL_LM"),  # peft's Llama defaults: k_proj, v_proj, down_proj (ff)
    "loha": lambda: LoHaConfig(r=16, alpha=32, **qv),
    "lokr": lambda: LoKrConfig(r=16, alpha=32, **qv),
}[kind]()
model = get_peft_model(LlamaForCausalLM.from_pretrained(base, dtype=torch.float32), config)
g = torch.Generator().manual_seed(seed)
with torch.no_grad():
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        noise = torch.randn(p.shape, generator=g)
        if "lora_magnitude_vector" in name:
            p.mul_(1 + 0.1 * noise)
        elif "ia3_l" in name:
            p.copy_(1 + 0.1 * noise)
        elif "hada_" in name or "lokr_" in name:
            p.copy_(0.1 * noise)
        else:
            p.copy_(0.05 * noise)
model.save_pretrained(folder)
"""

PEFT_FOLD = """
import sys, torch
from peft import PeftModel
from transformers import LlamaForCausalLM
base, adapter, out = sys.argv[1:]
model = LlamaForCausalLM.from_pretrained(base, dtype=torch.float32)
model = PeftModel.from_pretrained(model, adapter).merge_and_unload()
model.save_pretrained(out)
"""

# add_weighted_adapter of one adapter (resize) or several (combine) into "default", saved alone
# (peft saves the adapter named "default" at the folder's root, the others in subfolders)
PEFT_SVD = """
import sys, torch
from peft import PeftModel
from transformers import LlamaForCausalLM
base, out, rank, *adapters = sys.argv[1:]
model = LlamaForCausalLM.from_pretrained(base, dtype=torch.float32)
names = [f"a{i}" for i in range(len(adapters))]
model = PeftModel.from_pretrained(model, adapters[0], adapter_name=names[0])
for name, path in zip(names[1:], adapters[1:]):
    model.load_adapter(path, adapter_name=name)
weights = [1.0] * len(names)
if len(names) == 1:  # peft turns "svd" of one adapter into "linear" (rank kept): the adapter twice, halves
    names, weights = names * 2, [0.5, 0.5]
model.add_weighted_adapter(names, weights, "default", combination_type="svd", svd_rank=int(rank))
model.save_pretrained(out, selected_adapters=["default"])
"""

# scale·B·A of every module of two PEFT folders, compared (relative to the largest entry)
COMPARE_ADAPTERS = """
import sys
from ckptsurgery.ops.adapters.lowrank import factors, plain_modules
from ckptsurgery.ops.adapters.read import read_adapter
with read_adapter(sys.argv[1]) as x, read_adapter(sys.argv[2]) as y:
    mx = {m.name: m for m in plain_modules(x)}
    my = {m.name: m for m in plain_modules(y)}
    assert sorted(mx) == sorted(my), (sorted(mx)[:3], sorted(my)[:3])
    worst = 0.0
    for name in mx:
        dx = [f for f in factors(mx[name], "x")]
        dy = [f for f in factors(my[name], "y")]
        wx, wy = mx[name].scale * dx[0] @ dx[1], my[name].scale * dy[0] @ dy[1]
        worst = max(worst, float((wx - wy).abs().max() / wy.abs().max()))
print(f"{len(mx)} modules, largest difference of scale*B*A relative to its largest entry: {worst:.2e}")
"""


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--workdir", default=os.path.join(HERE, "out"))
    parser.add_argument("--rev", help="time the ckptsurgery of this commit (a git worktree)")
    parser.add_argument("--groups", default=",".join(GROUPS), help=f"comma-separated, of {', '.join(GROUPS)}")
    args = parser.parse_args()
    groups = args.groups.split(",")
    unknown = sorted(set(groups) - set(GROUPS))
    if unknown:
        raise SystemExit(f"unknown group(s): {', '.join(unknown)}")
    out = lambda name: os.path.join(args.workdir, name)  # noqa: E731
    base = out("llama-base")
    if not os.path.exists(os.path.join(base, "model.safetensors")):
        raise SystemExit("run bench/bench_methods.py first: it builds the base folder")
    os.environ["HF_HUB_OFFLINE"] = "1"
    cli = tree_cli(revision_tree(args.rev, args.workdir)) if args.rev else CLI
    adapters = {}
    for kind, seed in [*((k, 1) for k in KINDS), ("lora2", 2)]:
        folder = adapters[kind] = out(f"adapter-{kind}")
        if not os.path.exists(os.path.join(folder, "adapter_model.safetensors")):
            print(f"making {folder}", file=sys.stderr)
            subprocess.run([sys.executable, "-c", MAKE_ADAPTER, base, kind.rstrip("2"), folder, str(seed)], check=True,
                           capture_output=True)
    results_path = out("bench_adapters.json")
    results = json.load(open(results_path)) if os.path.exists(results_path) else {}
    warm(os.path.join(base, "model.safetensors"))
    for group in groups:
        ours_case, peft_case = f"ckptsurgery {group}", f"peft {group}"
        if group in KINDS:
            ours, theirs = out(f"fold-{group}-ours.safetensors"), out(f"fold-{group}-peft")
            cases = {
                ours_case: [*cli, "merge", base, "--lora", adapters[group], "-o", ours, "-q", "--force"],
                peft_case: [sys.executable, "-c", PEFT_FOLD, base, adapters[group], theirs],
            }
        else:
            ours, theirs = out(f"{group}-ours"), out(f"{group}-peft")
            if group == "combine":
                command = ["lora", "merge", adapters["lora"], adapters["lora2"], "--combine", "svd", "--rank", "16"]
                rank, inputs = "16", [adapters["lora"], adapters["lora2"]]
            else:
                command = ["lora", "resize", adapters["lora"], "--rank", "8"]
                rank, inputs = "8", [adapters["lora"]]
            cases = {
                ours_case: [*cli, *command, "-o", ours, "-q", "--force"],
                peft_case: [sys.executable, "-c", PEFT_SVD, base, theirs, rank, *inputs],
            }
        os.makedirs(theirs, exist_ok=True)
        med, peak = measure(cases, args.runs, [ours, theirs])
        for command in cases.values():  # measure() cleared the outputs between runs: made once more, compared
            subprocess.run(command, check=True, capture_output=True)
        if group in KINDS:
            same = subprocess.run([*cli, "diff", ours, os.path.join(theirs, "model.safetensors"), "--atol", "1e-5",
                                   "--json"], capture_output=True)
            check = f"outputs agree within 1e-5: {json.loads(same.stdout)['identical']}"
        else:
            check = subprocess.run([sys.executable, "-c", COMPARE_ADAPTERS, ours, theirs], capture_output=True,
                                   text=True, check=True).stdout.strip()
        time_ratio, peak_ratio = med[ours_case] / med[peft_case], peak[ours_case] / peak[peft_case]
        print(f"\n## {group}: {check}")
        print_tables(cases, med, peak, [
            ("time: ckptsurgery / peft", time_ratio, "≤ 0.25" if group in KINDS else "≤ 0.5"),
            ("peak: ckptsurgery / peft", peak_ratio, "≤ 0.1" if group in KINDS else ""),
        ])
        sys.stdout.flush()
        results[group] = {"runs": args.runs, "rev": args.rev, "check": check, "time": med, "peak": peak,
                          "time_ratio": time_ratio, "peak_ratio": peak_ratio}
        with open(results_path, "w") as f:
            json.dump(results, f, indent=1)


if __name__ == "__main__":
    main()
