"""merge --method side by side (issue 10): ckptsurgery, a straightforward in-memory script of the
same formula (load everything, compute, save_file), and mergekit 0.1.5 (`mergekit-yaml
--lazy-unpickle --low-cpu-memory`), on three ~1 GB Llama-shaped Hugging Face folders (a base and
two fine-tunes), float32. Run: .venv/bin/python bench/bench_methods.py --runs 3 [--methods ties,slerp]
Goal: ckptsurgery ≤ 0.3× mergekit's time and ≤ 0.25× its peak memory for every method."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

from common import CLI, measure, options, print_tables, warm

LAYERS, HIDDEN, FFN, VOCAB = 12, 1024, 4096, 32000  # 256 M parameters: 1.02 GB in float32

BUILD = """
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
""".format(h=HIDDEN, f=FFN, v=VOCAB, layers=LAYERS)

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

KIT = {
    "linear": "merge_method: linear\nmodels:\n  - model: {base}\n    parameters: {{weight: 1}}\n"
              "  - model: {m1}\n    parameters: {{weight: 1}}\n  - model: {m2}\n    parameters: {{weight: 1}}\n",
    "task-arithmetic": "merge_method: task_arithmetic\nbase_model: {base}\nmodels:\n"
                       "  - model: {m1}\n    parameters: {{weight: 1}}\n  - model: {m2}\n    parameters: {{weight: 1}}\n",
    "ties": "merge_method: ties\nbase_model: {base}\nmodels:\n  - model: {m1}\n    parameters: {{weight: 1, density: 0.5}}\n"
            "  - model: {m2}\n    parameters: {{weight: 1, density: 0.5}}\n",
    "dare-ties": "merge_method: dare_ties\nbase_model: {base}\nmodels:\n  - model: {m1}\n    parameters: {{weight: 1, density: 0.5}}\n"
                 "  - model: {m2}\n    parameters: {{weight: 1, density: 0.5}}\n",
    "slerp": "merge_method: slerp\nbase_model: {m1}\nmodels:\n  - model: {m1}\n  - model: {m2}\nparameters: {{t: 0.5}}\n",
}


def main() -> None:
    chosen = None
    if "--methods" in sys.argv:  # not one of common.options(): taken out before it parses
        at = sys.argv.index("--methods")
        chosen = sys.argv[at + 1].split(",")
        del sys.argv[at:at + 2]
    args, out = options(runs=3)
    folders = {name: out(f"llama-{name}") for name in ("base", "m1", "m2")}
    for name, noise in (("base", 0), ("m1", 0.01), ("m2", 0.02)):
        if not os.path.exists(os.path.join(folders[name], "model.safetensors")):
            os.makedirs(folders[name], exist_ok=True)
            subprocess.run([sys.executable, "-c", BUILD, folders[name], str(noise)], check=True)
    kit_bin = os.path.join(os.path.dirname(sys.executable), "mergekit-yaml")
    have_kit = os.path.exists(kit_bin)
    os.environ["HF_HUB_OFFLINE"] = "1"
    results = {}
    for method, yaml_text in KIT.items():
        if chosen and method not in chosen:
            continue
        config = out(f"mergekit-{method}.yml")
        with open(config, "w") as f:
            f.write(yaml_text.format(**folders) + "dtype: float32\n")
        ours, naive, kit = out("ours.safetensors"), out("naive.safetensors"), out("kit")
        flags = {"linear": ["--method", "linear", folders["base"]], "task-arithmetic": ["--method", "task-arithmetic"],
                 "ties": ["--method", "ties", "--density", "0.5"], "dare-ties": ["--method", "dare-ties", "--density", "0.5"],
                 "slerp": ["--method", "slerp", "--t", "0.5"]}[method]
        base_args = [] if method in ("linear", "slerp") else ["--base", folders["base"]]
        cases = {
            f"ckptsurgery {method}": [*CLI, "merge", folders["m1"], folders["m2"], *flags, *base_args, "-o", ours,
                                      "-q", "--force"],
            f"in-memory {method}": [sys.executable, "-c", IN_MEMORY, method, naive, folders["base"], folders["m1"],
                                    folders["m2"]],
        }
        if have_kit:
            shutil.rmtree(kit, ignore_errors=True)
            os.makedirs(kit)
            cases[f"mergekit {method}"] = [kit_bin, config, kit, "--lazy-unpickle", "--low-cpu-memory",
                                           "--no-copy-tokenizer", "--no-write-model-card"]
        warm(*(os.path.join(f, "model.safetensors") for f in folders.values()))
        med, peak = measure(cases, args.runs, [ours, naive, kit])
        ratios = [(f"{method}: in-memory / ckptsurgery time", med[f"in-memory {method}"] / med[f"ckptsurgery {method}"], "")]
        if have_kit:
            ratios += [(f"{method}: ckptsurgery / mergekit time", med[f"ckptsurgery {method}"] / med[f"mergekit {method}"], "≤ 0.3"),
                       (f"{method}: ckptsurgery / mergekit peak", peak[f"ckptsurgery {method}"] / peak[f"mergekit {method}"], "≤ 0.25")]
        print(f"\n### {method}\n")
        print_tables(cases, med, peak, ratios)
        results[method] = {"median_s": med, "peak_bytes": peak}
    with open(out("bench_methods.json"), "w") as f:
        json.dump(results, f, indent=1)


if __name__ == "__main__":
    main()
