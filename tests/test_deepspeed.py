"""DeepSpeed ZeRO checkpoints, written by DeepSpeed itself (two ranks on CPU, gloo on 127.0.0.1),
read into the fp32 weights DeepSpeed's own zero_to_fp32 reconstructs — bit for bit — without
DeepSpeed and without its code running."""

from __future__ import annotations

import os
import subprocess

import pytest
import torch

from conftest import assert_one_error_line, load_any

@pytest.fixture(scope="session", params=[(1, "fp32"), (2, "fp32"), (3, "fp32"), (3, "bf16")],
                ids=["stage1", "stage2", "stage3", "stage3-bf16"])
def zero(request, deepspeed_checkpoint):
    """(checkpoint folder, zero_to_fp32's state dict, the frozen parameter, stage)."""
    stage, dtype = request.param
    out = deepspeed_checkpoint(stage, dtype)
    return out, torch.load(out / "reference_fp32.pt", weights_only=True), torch.load(out / "frozen.pt",
                                                                                   weights_only=True), stage


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


def test_zero_state_files_are_read_without_running_them(cli, tmp_path, deepspeed_checkpoint):
    """A live payload in an optim states file: refused or ignored, never run."""
    folder = deepspeed_checkpoint(2)
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
