"""merge side by side with mergekit 0.1.5 (issue 10; issue 19 §3): every merge method mergekit has,
`ckptsurgery merge --method NAME` against `mergekit-yaml --lazy-unpickle --low-cpu-memory` on the
same recipe, on three ~1 GB float32 Llama-shaped Hugging Face folders (a base and two fine-tunes);
plus two recipes with gradients (a gradient SLERP over two slices, TIES with per-model density and
weight gradients) run by `ckptsurgery merge --config` and `mergekit-yaml` on the same YAML; and a
passthrough slice recipe (a frankenmerge of 16 layers: [0, 8) of one model, [4, 12) of the other)
against `cp -r` of the folder it writes (a copy of that very output, read from the page cache as
the inputs are: the same bytes, the same files).

Run: .venv/bin/python bench/bench_methods.py --runs 3 [--kit-runs 1] [--methods all|ties,slerp,...] [--rev REV]
Cases (--methods): the method names (ckptsurgery's, e.g. dare-ties), `recipe-slerp-gradient`,
`recipe-ties-gradient`, `passthrough-slices`; `all` (the default) is every one of them.
--kit-runs: mergekit's rounds (default --runs; it takes minutes on some methods). --naive adds the
in-memory script (load everything, compute with torch, save_file) for the methods it knows.
--rev REV: time the ckptsurgery of that commit (a git worktree), not the checkout being edited.
--no-kit: ckptsurgery alone (a case mergekit was recorded for keeps those figures, marked "recorded",
and its ratios are against them). --keep: keep each case's outputs (WORKDIR/out-CASE-ours|kit), else one
pair of output paths is reused. --tiny: the same cases on tiny folders, to check the commands.
Each case checks one tensor of the two outputs against each other (not timed).

Wall time: the median of the runs; memory: the peak, over the runs, of the summed RssAnon (the
anonymous memory, not the mapped inputs) of the command's process tree, sampled every 2 ms.
Goals (issue 19 §3): ≤ 0.2× mergekit's time and ≤ 0.1× its peak for every method and recipe;
the passthrough slice recipe ≤ 1.3× the cp. Results accumulate in WORKDIR/bench_methods.json
(--report prints the table of every case recorded there)."""

from __future__ import annotations

import argparse
import datetime
import json
import os
import shutil
import statistics
import subprocess
import sys
import time

from common import CLI, HERE, revision_tree, tree_cli, warm

LAYERS, HIDDEN, FFN, VOCAB = 12, 1024, 4096, 32000  # 256 M parameters: 1.02 GB in float32

BUILD_TEMPLATE = """
import json, sys, torch
from safetensors.torch import save_file
folder, noise = sys.argv[1], float(sys.argv[2])
torch.manual_seed(0)
h, f, v, layers = {h}, {f}, {v}, {layers}
shapes = {{"model.embed_tokens.weight": (v, h), "model.norm.weight": (h,), "lm_head.weight": (v, h)}}
for i in range(layers):
    p = f"model.layers.{{i}}."
    for name in ("q_proj", "k_proj", "v_proj", "o_proj"):
        shapes[p + f"self_attn.{{name}}.weight"] = (h, h)
    shapes[p + "mlp.gate_proj.weight"] = (f, h)
    shapes[p + "mlp.up_proj.weight"] = (f, h)
    shapes[p + "mlp.down_proj.weight"] = (h, f)
    shapes[p + "input_layernorm.weight"] = (h,)
    shapes[p + "post_attention_layernorm.weight"] = (h,)
sd = {{}}
for name, shape in shapes.items():
    sd[name] = torch.randn(shape) * 0.02  # the base: the same for every folder (seed 0)
if noise:
    g = torch.Generator().manual_seed(int(noise * 1000))
    for t in sd.values():
        t.add_(torch.randn(t.shape, generator=g), alpha=noise)
save_file(sd, folder + "/model.safetensors", metadata={{"format": "pt"}})
json.dump({{"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": h,
           "intermediate_size": f, "num_hidden_layers": layers, "num_attention_heads": 16,
           "num_key_value_heads": 16, "vocab_size": v, "max_position_embeddings": 2048,
           "rms_norm_eps": 1e-6, "tie_word_embeddings": False, "torch_dtype": "float32"}},
          open(folder + "/config.json", "w"))
"""


def build_script(layers=LAYERS, hidden=HIDDEN, ffn=FFN, vocab=VOCAB) -> str:
    return BUILD_TEMPLATE.format(h=hidden, f=ffn, v=vocab, layers=layers)


BUILD = build_script()

# The same formulas, the plain way: every tensor of every model in memory at once.
IN_MEMORY = """
import sys, torch
from safetensors.torch import load_file, save_file
method, out, base, *models = sys.argv[1:]
base = load_file(base + "/model.safetensors")
models = [load_file(m + "/model.safetensors") for m in models]
merged = {}
for k, b in base.items():
    thetas = [m[k] for m in models]
    if method == "linear":
        merged[k] = (sum(thetas) + b) / (len(thetas) + 1)
        continue
    if method == "slerp":
        a, c = thetas
        cos = float(((a / a.norm()).flatten() @ (c / c.norm()).flatten()).clamp(-1, 1))
        if abs(cos) > 0.9995:
            merged[k] = 0.5 * a + 0.5 * c
        else:
            th = torch.tensor(cos).acos()
            merged[k] = (torch.sin(0.5 * th) * a + torch.sin(0.5 * th) * c) / torch.sin(th)
        continue
    deltas = [t - b for t in thetas]
    if method == "dare-ties":
        kept = []
        for d in deltas:
            m = d * (torch.rand(d.shape) < 0.5)
            kept.append(m * (d.abs().sum() / m.abs().sum()))
        elected = torch.where(sum(kept) >= 0, 1.0, -1.0)
        merged[k] = b + sum(d * (torch.sign(d) == elected) for d in kept)
    elif method == "ties":
        kept = []
        for d in deltas:
            n = d.numel(); k_ = max(1, int(0.5 * n))
            cut = d.abs().reshape(-1).kthvalue(n - k_ + 1).values
            kept.append(d * (d.abs() >= cut))
        total = sum(kept)
        elected = torch.where(total >= 0, 1.0, -1.0)
        agree = [torch.sign(d) == elected for d in kept]
        counted = sum(a.float() for a in agree)
        merged[k] = b + sum(d * a for d, a in zip(kept, agree)) / counted.clamp(min=1)
    else:
        merged[k] = b + sum(deltas)
save_file(merged, out)
"""

NAIVE = ("linear", "task-arithmetic", "ties", "dare-ties", "slerp")  # what IN_MEMORY knows

W2 = {"weight": [1.0, 1.0]}
# ckptsurgery's name -> (mergekit's name, models, base, per-model parameters, shared parameters):
# each method's typical use on these folders — a method that takes one or two models gets them,
# one that merges any number merges the three (linear, karcher), the others the two fine-tunes
# onto the base. slerp: mergekit's base is its t = 0 model, ours the first model (no --base).
METHODS = {
    "linear": ("linear", ["base", "m1", "m2"], None, {"weight": [1.0, 1.0, 1.0]}, {}),
    "task-arithmetic": ("task_arithmetic", ["m1", "m2"], "base", W2, {}),
    "ties": ("ties", ["m1", "m2"], "base", {**W2, "density": [0.5, 0.5]}, {}),
    "dare-linear": ("dare_linear", ["m1", "m2"], "base", {**W2, "density": [0.5, 0.5]}, {}),
    "dare-ties": ("dare_ties", ["m1", "m2"], "base", {**W2, "density": [0.5, 0.5]}, {}),
    "slerp": ("slerp", ["m1", "m2"], None, {}, {"t": 0.5}),
    "nuslerp": ("nuslerp", ["m1", "m2"], None, W2, {}),
    "multislerp": ("multislerp", ["m1", "m2"], "base", W2, {}),
    "karcher": ("karcher", ["base", "m1", "m2"], None, {}, {}),
    "nearswap": ("nearswap", ["m1"], "base", {}, {"t": 0.001}),
    "breadcrumbs": ("breadcrumbs", ["m1", "m2"], "base", {**W2, "density": [0.9, 0.9], "gamma": [0.01, 0.01]}, {}),
    "breadcrumbs-ties": ("breadcrumbs_ties", ["m1", "m2"], "base",
                         {**W2, "density": [0.9, 0.9], "gamma": [0.01, 0.01]}, {}),
    "della": ("della", ["m1", "m2"], "base", {**W2, "density": [0.5, 0.5], "epsilon": [0.1, 0.1]}, {}),
    "della-linear": ("della_linear", ["m1", "m2"], "base", {**W2, "density": [0.5, 0.5], "epsilon": [0.1, 0.1]}, {}),
    "sce": ("sce", ["m1", "m2"], "base", {}, {"select_topk": 0.5}),
    "model-stock": ("model_stock", ["m1", "m2"], "base", {}, {}),
    "arcee-fusion": ("arcee_fusion", ["m1"], "base", {}, {}),
    "ram": ("ram", ["m1", "m2"], "base", {}, {}),
    "ramplus-tl": ("ramplus_tl", ["m1", "m2"], "base", {}, {}),
    "passthrough": ("passthrough", ["m1"], None, {}, {}),
}
RANDOM = {"dare-linear", "dare-ties", "della", "della-linear"}  # other draws than mergekit's: compared by norm
OURS_NAME = {"weight": "weights", "lambda": "scale"}  # mergekit's parameter -> ours (ops/methods MERGEKIT_PARAMETERS)

RECIPES = {
    # a gradient SLERP over two slices: t runs along each slice's layers, per filter
    "recipe-slerp-gradient": """slices:
  - sources:
      - model: {m1}
        layer_range: [0, {half}]
      - model: {m2}
        layer_range: [0, {half}]
  - sources:
      - model: {m1}
        layer_range: [{half}, {layers}]
      - model: {m2}
        layer_range: [{half}, {layers}]
merge_method: slerp
base_model: {m1}
parameters:
  t:
    - filter: self_attn
      value: [0, 0.5, 0.3, 0.7, 1]
    - filter: mlp
      value: [1, 0.5, 0.7, 0.3, 0]
    - value: 0.5
dtype: float32
""",
    # mergekit's TIES example: per-model density and weight gradients along the layers
    "recipe-ties-gradient": """models:
  - model: {base}
  - model: {m1}
    parameters:
      density: [1, 0.7, 0.1]
      weight: 1.0
  - model: {m2}
    parameters:
      density: 0.5
      weight: [0, 0.3, 0.7, 1]
merge_method: ties
base_model: {base}
parameters:
  normalize: true
dtype: float32
""",
    # a frankenmerge: layers [0, 2/3) of one model, then [1/3, 1) of the other
    "passthrough-slices": """slices:
  - sources:
      - model: {m1}
        layer_range: [0, {two_thirds}]
  - sources:
      - model: {m2}
        layer_range: [{third}, {layers}]
merge_method: passthrough
dtype: float32
""",
}
CHECKED = "model.layers.{}.self_attn.q_proj.weight"  # the tensor compared between the two outputs
GOALS = {"time": 0.2, "peak": 0.1, "cp": 1.3}


def method_yaml(method: str, folders: dict[str, str]) -> str:
    kit, models, base, per_model, shared = METHODS[method]
    lines = [f"merge_method: {kit}"]
    if kit == "slerp":
        lines.append(f"base_model: {folders[models[0]]}")
    elif base:
        lines.append(f"base_model: {folders[base]}")
    lines.append("models:")
    for i, name in enumerate(models):
        lines.append(f"  - model: {folders[name]}")
        if per_model:
            lines.append("    parameters: {" + ", ".join(f"{k}: {v[i]}" for k, v in per_model.items()) + "}")
    if shared:
        lines.append("parameters: {" + ", ".join(f"{k}: {v}" for k, v in shared.items()) + "}")
    return "\n".join(lines) + "\ndtype: float32\n"


def method_args(method: str, folders: dict[str, str]) -> list[str]:
    """ckptsurgery's command line for the same merge as method_yaml's."""
    _, models, base, per_model, shared = METHODS[method]
    args = [folders[m] for m in models] + ["--method", method]
    for name, value in {**per_model, **shared}.items():
        option = "--" + OURS_NAME.get(name, name).replace("_", "-")
        if isinstance(value, bool):
            args.append(option if value else "--no-" + option[2:])
        else:
            args += [option, ",".join(map(str, value)) if isinstance(value, list) else str(value)]
    if base:
        args += ["--base", folders[base]]
    return args


# ---- timing: the process tree's memory ------------------------------------------------------------

def _children(pid: int) -> list[int]:
    kids = []
    try:
        tasks = os.listdir(f"/proc/{pid}/task")
    except OSError:
        return kids
    for tid in tasks:
        try:
            with open(f"/proc/{pid}/task/{tid}/children") as f:
                kids += [int(x) for x in f.read().split()]
        except (OSError, ValueError):
            pass
    return kids


def _rss_anon(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("RssAnon:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ProcessLookupError):
        pass
    return 0


def run_tree(command: list[str], log: str) -> tuple[float, int]:
    """Wall time and the peak of the summed RssAnon (bytes) of the command's process tree: every
    process's read every 2 ms, the tree walked again every 20 ms (a torchrun's or a worker's
    children counted). stderr goes to `log`, shown when the command fails."""
    start = time.perf_counter()
    with open(log, "w") as err:
        proc = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=err)
        peak, pids, walked = 0, [proc.pid], 0.0
        while proc.poll() is None:
            now = time.perf_counter()
            if now - walked > 0.02:
                pids, i = [proc.pid], 0
                while i < len(pids):
                    pids += _children(pids[i])
                    i += 1
                walked = now
            peak = max(peak, sum(_rss_anon(pid) for pid in pids))
            time.sleep(0.002)
    elapsed = time.perf_counter() - start
    if proc.returncode != 0:
        with open(log) as f:
            tail = f.read()[-3000:]
        raise RuntimeError(f"failed ({proc.returncode}): {' '.join(command)}\n{tail}")
    return elapsed, peak


def _clear(path: str) -> None:
    if os.path.isdir(path):
        shutil.rmtree(path)
    elif os.path.exists(path):
        os.unlink(path)


def timed(cases: dict[str, tuple[list[str], str]], runs: dict[str, int], logs: str) -> tuple[dict, dict]:
    """Run each case (command, output) runs[case] times, one run of every case per round while it
    has runs left, so that the machine's noise falls on all alike; the output removed and the disk
    synced before each run (neither timed). Median times, max peaks."""
    times: dict[str, list[float]] = {k: [] for k in cases}
    peaks: dict[str, list[int]] = {k: [] for k in cases}
    for r in range(max(runs.values())):
        for name, (command, output) in cases.items():
            if r >= runs[name]:
                continue
            _clear(output)
            os.sync()
            elapsed, peak = run_tree(command, os.path.join(logs, "stderr.log"))
            times[name].append(elapsed)
            peaks[name].append(peak)
            print(f"  {name}: {elapsed:.2f} s, {peak / 1e6:.0f} MB", file=sys.stderr, flush=True)
    return {k: statistics.median(v) for k, v in times.items()}, {k: max(v) for k, v in peaks.items()}


# ---- the sanity check: one tensor of each output -----------------------------------------------------

def one_tensor(path: str, key: str):
    from safetensors import safe_open

    files = [path]
    if os.path.isdir(path):
        files = sorted(os.path.join(path, f) for f in os.listdir(path) if f.endswith(".safetensors"))
    for file in files:
        with safe_open(file, "numpy") as f:
            if key in f.keys():
                return f.get_tensor(key).astype("float64")
    raise KeyError(f"{key} not in {path}")


def compare(ours: str, kit: str, key: str, random: bool, sampled: bool = False) -> str:
    import numpy as np

    a, b = one_tensor(ours, key), one_tensor(kit, key)
    if a.shape != b.shape:
        return f"{key}: shapes {a.shape} vs {b.shape} DIFFER"
    if random:  # other draws: the same distribution, so about the same norm
        ratio = np.linalg.norm(a) / np.linalg.norm(b)
        return f"‖ours‖/‖mergekit‖ {ratio:.4f} (other draws){'' if abs(ratio - 1) < 0.02 else ' FAR'}"
    rel = np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-30)
    if sampled:  # mergekit's threshold from a random sample of the scores: a few entries either side of it
        return f"‖ours−mergekit‖/‖mergekit‖ {rel:.1e} (mergekit's quartiles of a random sample of 10⁶ scores)"
    return f"‖ours−mergekit‖/‖mergekit‖ {rel:.1e}{'' if rel < 1e-4 else ' FAR'}"


# ---- main --------------------------------------------------------------------------------------------

def parse() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--kit-runs", type=int, help="mergekit's runs (default: --runs)")
    parser.add_argument("--methods", default="all", help="comma-separated cases, or all")
    parser.add_argument("--workdir", default=os.path.join(HERE, "out"))
    parser.add_argument("--naive", action="store_true", help="add the in-memory script where it knows the method")
    parser.add_argument("--no-kit", action="store_true", help="ckptsurgery alone; ratios against mergekit's recorded figures")
    parser.add_argument("--keep", action="store_true", help="keep each case's outputs")
    parser.add_argument("--tiny", action="store_true", help="tiny folders: check the commands, not the speed")
    parser.add_argument("--report", action="store_true", help="print the table of WORKDIR/bench_methods.json")
    parser.add_argument("--rev", help="time this revision's ckptsurgery (a worktree in WORKDIR/rev-REV), not the checkout's")
    args = parser.parse_args()
    args.kit_runs = args.runs if args.kit_runs is None else args.kit_runs
    every = list(METHODS) + list(RECIPES)
    args.cases = every if args.methods == "all" else args.methods.split(",")
    unknown = [c for c in args.cases if c not in every]
    if unknown:
        parser.error(f"unknown --methods {unknown}: choose from all, {', '.join(every)}")
    if args.tiny:
        args.workdir = os.path.join(args.workdir, "tiny")
    os.makedirs(args.workdir, exist_ok=True)
    return args


def folders_for(args) -> tuple[dict[str, str], int]:
    layers = 6 if args.tiny else LAYERS
    script = build_script(layers, 64, 128, 256) if args.tiny else BUILD
    folders = {name: os.path.join(args.workdir, f"llama-{name}") for name in ("base", "m1", "m2")}
    for name, noise in (("base", 0), ("m1", 0.01), ("m2", 0.02)):
        if not os.path.exists(os.path.join(folders[name], "model.safetensors")):
            os.makedirs(folders[name], exist_ok=True)
            subprocess.run([sys.executable, "-c", script, folders[name], str(noise)], check=True)
    return folders, layers


def ratio_cell(value: float, goal: float) -> str:
    return f"{value:.3f} {'met' if value <= goal else 'NOT met'}"


def report(results: dict) -> None:
    print("| case | time ours (s) | time mergekit (s) | ratio (goal ≤ 0.2) | peak ours (MB) | peak mergekit (MB) "
          "| ratio (goal ≤ 0.1) | one tensor, ours against mergekit's |")
    print("|---|---:|---:|---:|---:|---:|---:|---|")
    for case, r in results.items():
        if "kit_s" not in r:
            continue
        recorded = " (recorded)" if "kit_recorded" in r else ""
        print(f"| {case} | {r['ours_s']:.2f} | {r['kit_s']:.2f}{recorded} | {ratio_cell(r['ours_s'] / r['kit_s'], GOALS['time'])} "
              f"| {r['ours_peak'] / 1e6:.0f} | {r['kit_peak'] / 1e6:.0f}{recorded} "
              f"| {ratio_cell(r['ours_peak'] / max(r['kit_peak'], 1), GOALS['peak'])} | {r.get('check', '')} |")
    for case, r in results.items():
        if "cp_s" in r:
            print(f"\n{case}: ckptsurgery {r['ours_s']:.2f} s, {r['ours_peak'] / 1e6:.0f} MB; cp -r of the folder it "
                  f"writes ({r['bytes'] / 1e9:.2f} GB) {r['cp_s']:.2f} s: "
                  f"{ratio_cell(r['ours_s'] / r['cp_s'], GOALS['cp'])} (goal ≤ 1.3)")


def main() -> None:
    args = parse()
    store = os.path.join(args.workdir, "bench_methods.json")
    results = json.load(open(store)) if os.path.exists(store) else {}
    if args.report:
        report(results)
        return
    folders, layers = folders_for(args)
    kit_bin = os.path.join(os.path.dirname(sys.executable), "mergekit-yaml")
    have_kit = os.path.exists(kit_bin) and not args.no_kit
    os.environ["HF_HUB_OFFLINE"] = "1"
    kit_flags = ["--lazy-unpickle", "--low-cpu-memory", "--no-copy-tokenizer", "--no-write-model-card"]
    places = {"half": layers // 2, "layers": layers, "third": layers // 3, "two_thirds": 2 * layers // 3}
    cli = CLI
    if args.rev:  # a committed revision: what is timed does not change under edits in the checkout
        cli = tree_cli(revision_tree(args.rev, os.path.join(HERE, "out")))
    command_line = " ".join([".venv/bin/python", "bench/bench_methods.py", *sys.argv[1:]])
    for case in args.cases:
        out = (lambda side: os.path.join(args.workdir, f"out-{case}-{side}")) if args.keep else (
            lambda side: os.path.join(args.workdir, f"out-{side}"))
        ours, kit, naive = out("ours"), out("kit"), out("naive.safetensors")
        config = os.path.join(args.workdir, f"{case}.yml")
        with open(config, "w") as f:
            f.write(method_yaml(case, folders) if case in METHODS else RECIPES[case].format(**folders, **places))
        if case in METHODS:
            ours += ".safetensors"
            cases = {"ckptsurgery": ([*cli, "merge", *method_args(case, folders), "-o", ours, "-q", "--force"], ours)}
        else:
            cases = {"ckptsurgery": ([*cli, "merge", "--config", config, "-o", ours, "-q", "--force"], ours)}
        runs = {"ckptsurgery": args.runs}
        if args.naive and case in NAIVE:
            cases["in-memory"] = ([sys.executable, "-c", IN_MEMORY, case, naive, folders["base"], folders["m1"],
                                   folders["m2"]], naive)
            runs["in-memory"] = args.runs
        if have_kit:
            cases["mergekit"] = ([kit_bin, config, kit, *kit_flags], kit)
            runs["mergekit"] = args.kit_runs
        copy_source = os.path.join(args.workdir, f"{case}-copy-source")
        if case == "passthrough-slices":  # cp -r of the very folder ckptsurgery writes
            _clear(copy_source)
            run_tree(cases["ckptsurgery"][0], os.path.join(args.workdir, "stderr.log"))
            shutil.copytree(ours, copy_source)
            cases["cp"] = (["cp", "-r", copy_source, out("cp")], out("cp"))
            runs["cp"] = args.runs
            warm(*(os.path.join(copy_source, f) for f in os.listdir(copy_source)))
        warm(*(os.path.join(f, "model.safetensors") for f in folders.values()))
        print(f"{case}:", file=sys.stderr, flush=True)
        med, peak = timed(cases, runs, args.workdir)
        row = {"ours_s": med["ckptsurgery"], "ours_peak": peak["ckptsurgery"], "runs": args.runs,
               "date": datetime.date.today().isoformat(), "command": command_line}
        if "in-memory" in med:
            row.update(naive_s=med["in-memory"], naive_peak=peak["in-memory"])
        if "cp" in med:
            row.update(cp_s=med["cp"], bytes=sum(os.path.getsize(os.path.join(copy_source, f))
                                                 for f in os.listdir(copy_source)))
            _clear(copy_source)
        if have_kit:
            row.update(kit_s=med["mergekit"], kit_peak=peak["mergekit"], kit_runs=args.kit_runs)
            try:
                row["check"] = compare(ours, kit, CHECKED.format(layers // 3), case in RANDOM, case == "arcee-fusion")
            except Exception as e:  # a check, not the bench: say so and go on
                row["check"] = f"not checked: {e}"
        elif "kit_s" in results.get(case, {}):  # --no-kit: the ratios against mergekit's figures recorded before
            before = results[case]
            row.update({k: before[k] for k in ("kit_s", "kit_peak", "kit_runs", "check") if k in before},
                       kit_recorded=before.get("kit_recorded", f"{before['date']}: {before['command']}"))
        results[case] = row
        with open(store, "w") as f:
            json.dump(results, f, indent=1)
        if not args.keep:
            for _, output in cases.values():
                _clear(output)
    report({c: results[c] for c in args.cases})


if __name__ == "__main__":
    main()
