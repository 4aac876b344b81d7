"""Distributed checkpoints against the field's own route, side by side in one run: a ~1.2 GB DCP
folder written by two FSDP2 ranks, converted to one .safetensors by ckptsurgery and by
`dcp_to_torch_save` + `safetensors.torch.save_file`; and, when deepspeed is installed, a ZeRO-3
checkpoint of the same size converted by ckptsurgery and by DeepSpeed's
`get_fp32_state_dict_from_zero_checkpoint` + `save_file`. Wall time and peak RssAnon.

    python bench/bench_distributed.py [--runs 3] [--workdir bench/out]"""

from __future__ import annotations

import importlib.util
import os
import socket
import subprocess
import sys

from common import CLI, measure, options, print_tables

# an embedding (32000 x 2048) and 64 linear layers (2048 x 2048): 334 M parameters, 1.34 GB fp32
MODEL = """
import torch
from torch import nn
def make():
    torch.manual_seed(0)
    layers = [nn.Embedding(32000, 2048)] + [nn.Linear(2048, 2048) for _ in range(64)]
    return nn.Sequential(*layers)
"""

SAVE_DCP = MODEL + """
import sys, torch.distributed as dist, torch.distributed.checkpoint as dcp
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard
dist.init_process_group("gloo")
model = make()
mesh = init_device_mesh("cpu", (dist.get_world_size(),))
for layer in model:
    fully_shard(layer, mesh=mesh)
fully_shard(model, mesh=mesh)
dcp.save({"model": model.state_dict()}, checkpoint_id=sys.argv[1])
dist.destroy_process_group()
"""

SAVE_ZERO = MODEL + """
import sys, deepspeed, deepspeed.ops
deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False
deepspeed.init_distributed(dist_backend="gloo")
model = make()
opt = torch.optim.SGD(model.parameters(), lr=0.0)
config = {"train_micro_batch_size_per_gpu": 1, "zero_optimization": {"stage": 3},
          "zero_allow_untested_optimizer": True, "steps_per_print": 10**9}
engine, _, _, _ = deepspeed.initialize(model=model, optimizer=opt, config=config)
engine.save_checkpoint(sys.argv[1])
"""

NAIVE_DCP = """
import sys, torch
from torch.distributed.checkpoint.format_utils import dcp_to_torch_save
from safetensors.torch import save_file
dcp_to_torch_save(sys.argv[1], sys.argv[2] + ".tmp.pth")
sd = torch.load(sys.argv[2] + ".tmp.pth", weights_only=True)["model"]
save_file({k: v.contiguous() for k, v in sd.items()}, sys.argv[2])
"""

NAIVE_ZERO = """
import sys
from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint
from safetensors.torch import save_file
sd = get_fp32_state_dict_from_zero_checkpoint(sys.argv[1])
save_file({k: v.contiguous() for k, v in sd.items()}, sys.argv[2])
"""


def _port() -> str:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return str(s.getsockname()[1])


def _two_ranks(code: str, folder: str, env: dict | None = None) -> None:
    if os.path.exists(folder):
        return
    script = folder + ".py"
    with open(script, "w") as f:
        f.write(code)
    subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-addr",
                    "127.0.0.1", "--master-port", _port(), script, folder], check=True, env=env,
                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def main() -> None:
    args, out = options(runs=3)
    dcp_folder = out("dcp2")
    _two_ranks(SAVE_DCP, dcp_folder)
    cases = {
        "ckptsurgery convert dcp -> .safetensors": CLI + ["convert", dcp_folder, "-o", out("d.safetensors"), "-q"],
        "dcp_to_torch_save + save_file": [sys.executable, "-c", NAIVE_DCP, dcp_folder, out("dn.safetensors")],
    }
    outputs = [out("d.safetensors"), out("dn.safetensors"), out("dn.safetensors.tmp.pth")]
    if importlib.util.find_spec("deepspeed"):
        zero_folder = out("zero3")
        _two_ranks(SAVE_ZERO, zero_folder, {**os.environ, "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1"})
        cases["ckptsurgery convert zero3 -> .safetensors"] = CLI + ["convert", zero_folder, "-o", out("z.safetensors"), "-q"]
        cases["get_fp32_state_dict_from_zero_checkpoint + save_file"] = [
            sys.executable, "-c", NAIVE_ZERO, zero_folder, out("zn.safetensors")]
        outputs += [out("z.safetensors"), out("zn.safetensors")]
    else:
        print("deepspeed is not installed: ZeRO cases left out\n")
    med, peak = measure(cases, args.runs, outputs)
    for command in cases.values():  # the last round's outputs are removed: make them once more
        subprocess.run(command, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    for ours, theirs in (("d", "dn"), ("z", "zn")):
        if os.path.exists(out(f"{ours}.safetensors")):  # the same weights, or the figures mean nothing
            subprocess.run(CLI + ["diff", out(f"{ours}.safetensors"), out(f"{theirs}.safetensors")], check=True,
                           stdout=subprocess.DEVNULL)
    names = list(cases)
    ratios = [("dcp: ckptsurgery / torch's route, time", med[names[0]] / med[names[1]], "<= 0.5"),
              ("dcp: ckptsurgery / torch's route, peak RssAnon", peak[names[0]] / peak[names[1]], "<= 0.1")]
    if len(names) == 4:
        ratios.append(("zero: ckptsurgery / DeepSpeed's route, peak RssAnon", peak[names[2]] / peak[names[3]], "<= 0.5"))
    print_tables(cases, med, peak, ratios)


if __name__ == "__main__":
    main()
