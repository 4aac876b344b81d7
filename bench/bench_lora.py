"""merge --lora against peft's own route (load the model, PeftModel.from_pretrained,
merge_and_unload, save_pretrained), on the 1 GB Llama-shaped base of bench_methods.py and a
rank-16 adapter on every q_proj and v_proj (made here, float32, B non-zero).
Run: .venv/bin/python bench/bench_lora.py --runs 3 (after bench_methods.py has built its folders)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

from common import CLI, measure, options, print_tables, warm

MAKE_ADAPTER = """
import json, sys, torch
from safetensors.torch import save_file
folder, layers, hidden, rank = sys.argv[1], 12, 1024, 16
torch.manual_seed(0)
tensors = {}
for i in range(layers):
    for proj in ("q_proj", "v_proj"):
        prefix = f"base_model.model.model.layers.{i}.self_attn.{proj}."
        tensors[prefix + "lora_A.weight"] = torch.randn(rank, hidden) * 0.01
        tensors[prefix + "lora_B.weight"] = torch.randn(hidden, rank) * 0.01
save_file(tensors, folder + "/adapter_model.safetensors", metadata={"format": "pt"})
json.dump({"peft_type": "LORA", "r": rank, "lora_alpha": 32, "target_modules": ["q_proj", "v_proj"],
           "base_model_name_or_path": None, "bias": "none", "fan_in_fan_out": False, "lora_dropout": 0.0,
           "task_type": "CAUSAL_LM", "use_rslora": False, "use_dora": False, "inference_mode": True},
          open(folder + "/adapter_config.json", "w"))
"""

PEFT_ROUTE = """
import sys, torch
from peft import PeftModel
from transformers import LlamaForCausalLM
base, adapter, out = sys.argv[1:]
model = LlamaForCausalLM.from_pretrained(base, dtype=torch.float32)
model = PeftModel.from_pretrained(model, adapter).merge_and_unload()
model.save_pretrained(out)
"""


def main() -> None:
    args, out = options(runs=3)
    base, adapter = out("llama-base"), out("lora-adapter")
    if not os.path.exists(os.path.join(base, "model.safetensors")):
        raise SystemExit("run bench/bench_methods.py first: it builds the base folder")
    if not os.path.exists(os.path.join(adapter, "adapter_model.safetensors")):
        os.makedirs(adapter, exist_ok=True)
        subprocess.run([sys.executable, "-c", MAKE_ADAPTER, adapter], check=True)
    ours, peft_out = out("lora-ours.safetensors"), out("lora-peft")
    os.environ["HF_HUB_OFFLINE"] = "1"
    cases = {
        "ckptsurgery merge --lora": [*CLI, "merge", base, "--lora", adapter, "-o", ours, "-q", "--force"],
        "peft merge_and_unload": [sys.executable, "-c", PEFT_ROUTE, base, adapter, peft_out],
    }
    os.makedirs(peft_out, exist_ok=True)
    warm(os.path.join(base, "model.safetensors"))
    med, peak = measure(cases, args.runs, [ours, peft_out])
    for command in cases.values():  # measure() cleared the outputs between runs: made once more, compared
        subprocess.run(command, check=True, capture_output=True)
    same = subprocess.run([*CLI, "diff", ours, os.path.join(peft_out, "model.safetensors"), "--atol", "1e-5", "--json"],
                          capture_output=True)
    print("outputs agree within 1e-5:", json.loads(same.stdout)["identical"])
    print_tables(cases, med, peak, [
        ("time: ckptsurgery / peft", med["ckptsurgery merge --lora"] / med["peft merge_and_unload"], ""),
        ("peak: ckptsurgery / peft", peak["ckptsurgery merge --lora"] / peak["peft merge_and_unload"], ""),
    ])


if __name__ == "__main__":
    main()
