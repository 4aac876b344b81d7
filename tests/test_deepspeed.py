"""DeepSpeed ZeRO checkpoints, written by DeepSpeed itself (two ranks on CPU, gloo on 127.0.0.1),
read into the fp32 weights DeepSpeed's own zero_to_fp32 reconstructs — bit for bit — without
DeepSpeed and without its code running."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import textwrap

import pytest
import torch

from conftest import assert_one_error_line, load_any

TRAIN = textwrap.dedent("""
    import sys, torch, deepspeed, deepspeed.ops
    from torch import nn
    # the CPU accelerator would compile its shared-memory all-reduce with g++: use plain gloo
    deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False

    class Tiny(nn.Module):
        def __init__(self):
            super().__init__()
            self.emb = nn.Embedding(7, 5)
            self.lin = nn.Linear(5, 3)
            self.head = nn.Linear(5, 7, bias=False)
            self.head.weight = self.emb.weight  # tied
            self.odd = nn.Parameter(torch.randn(1, 3, 1))  # 63 trainable elements: nothing divides evenly
            self.frozen = nn.Parameter(torch.randn(2, 3), requires_grad=False)
            self.register_buffer("counter", torch.arange(3, dtype=torch.float32))

        def forward(self, ids):
            e = self.emb(ids)
            return self.lin(e).pow(2).mean() + self.head(e).logsumexp(-1).mean() + self.odd.sum() + self.counter.sum()

    stage, dtype, out = int(sys.argv[1]), sys.argv[2], sys.argv[3]
    deepspeed.init_distributed(dist_backend="gloo")
    rank = torch.distributed.get_rank()
    torch.manual_seed(1234)
    model = Tiny()
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    config = {"train_micro_batch_size_per_gpu": 1, "zero_optimization": {"stage": stage},
              "zero_allow_untested_optimizer": True, "steps_per_print": 1000}
    if dtype == "bf16":
        config["bf16"] = {"enabled": True}
    if stage == 3:
        config["zero_optimization"]["stage3_param_persistence_threshold"] = 0
    frozen = model.frozen.data.clone()  # before ZeRO-3 partitions it away
    engine, _, _, _ = deepspeed.initialize(model=model, optimizer=opt, config=config)
    torch.manual_seed(100 + rank)
    engine.backward(engine(torch.randint(0, 7, (1, 4))))
    engine.step()
    engine.save_checkpoint(out)
    torch.distributed.barrier()
    if rank == 0:
        from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint
        reference = get_fp32_state_dict_from_zero_checkpoint(out)
        torch.save({k: v.clone() for k, v in reference.items()}, out + ".reference.pt")
        torch.save(frozen, out + ".frozen.pt")
    torch.distributed.barrier()
""")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session", params=[(1, "fp32"), (2, "fp32"), (3, "fp32"), (3, "bf16")],
                ids=["stage1", "stage2", "stage3", "stage3-bf16"])
def zero(request, tmp_path_factory):
    """(checkpoint folder, zero_to_fp32's state dict, the frozen parameter, stage)."""
    stage, dtype = request.param
    folder = tmp_path_factory.mktemp(f"zero{stage}{dtype}")
    script = folder / "train.py"
    script.write_text(TRAIN)
    out = folder / "ckpt"
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1"}
    for attempt in range(3):  # gloo now and then aborts a rank as it shuts down
        run = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2",
                              "--master-addr", "127.0.0.1", "--master-port", str(_free_port()), str(script),
                              str(stage), dtype, str(out)], capture_output=True, text=True, timeout=300, cwd=folder,
                             env=env)
        if run.returncode == 0:
            break
    assert run.returncode == 0, run.stderr[-3000:]
    reference = torch.load(f"{out}.reference.pt", weights_only=True)
    return out, reference, torch.load(f"{out}.frozen.pt", weights_only=True), stage


def test_zero_weights_are_zero_to_fp32s_bit_for_bit(cli, tmp_path, zero):
    folder, reference, frozen, stage = zero
    doc = cli("inspect", folder, "--json").json()
    assert doc["format"] == "deepspeed"
    shares = {t["name"]: t["shares_with"] for t in doc["tensors"]}
    assert shares["head.weight"] == "emb.weight"  # tied: stored once
    assert cli("convert", folder, "-o", tmp_path / "model.safetensors", "--json").json()["tied"] == {
        "head.weight": "emb.weight"}
    out = tmp_path / "model.pth"
    assert cli("convert", folder, "-o", out).code == 0
    got = load_any(out)
    for name, value in reference.items():
        assert got[name].dtype == value.dtype and torch.equal(got[name], value), name
    # zero_to_fp32 drops frozen parameters at stage 1; they are in the model states whole
    assert set(got) - set(reference) == ({"frozen"} if stage == 1 else set())
    assert torch.equal(got["frozen"], frozen.to(got["frozen"].dtype))
    step = next(p for p in folder.iterdir() if p.is_dir())  # the tag's folder works as well
    assert cli("diff", step, out).code == 0


def test_zero_folder_refuses_root(cli, zero):
    folder = zero[0]
    assert_one_error_line(cli("inspect", folder, "--root", "module"), "DeepSpeed checkpoint")


def test_zero_state_files_are_read_without_running_them(cli, tmp_path, zero):
    """A live payload in an optim states file: refused or ignored, never run."""
    folder, _, _, stage = zero
    if stage != 2:
        pytest.skip("one stage is enough")
    copy = tmp_path / "copy"
    subprocess.run(["cp", "-r", str(folder), str(copy)], check=True)
    marker = tmp_path / "pwned"

    class Payload:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    optim = next(copy.glob("*/zero_pp_rank_0_*optim_states.pt"))
    states = torch.load(optim, weights_only=False)
    states["optimizer_state_dict"]["loss_scaler"] = Payload()
    torch.save(states, optim)
    for args in (("inspect", copy), ("convert", copy, "-o", tmp_path / "o.safetensors")):
        assert cli(*args).code == 0, args
    assert not marker.exists()
