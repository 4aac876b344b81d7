"""Folders that accelerate's `Accelerator.save_state` writes, by accelerate itself: the models'
weights are read; the optimizer, scheduler and random-state files never are."""

from __future__ import annotations

import os
import warnings

import accelerate
import pytest
import torch
from torch import nn

from conftest import assert_one_error_line, load_any


@pytest.fixture(params=[True, False], ids=["safetensors", "bin"])
def saved_state(request, tmp_path):
    """(folder, the two models' state dicts) after one training step of two prepared models."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        acc = accelerate.Accelerator(cpu=True)
        torch.manual_seed(0)
        first, second = nn.Sequential(nn.Linear(4, 3), nn.LayerNorm(3)), nn.Linear(3, 2)
        opt = torch.optim.Adam(first.parameters())
        sched = torch.optim.lr_scheduler.StepLR(opt, 1)
        first, second, opt, sched = acc.prepare(first, second, opt, sched)
        first(torch.randn(2, 4)).sum().backward()
        opt.step()
        sched.step()
        folder = tmp_path / "state"
        acc.save_state(str(folder), safe_serialization=request.param)
    assert "optimizer.bin" in os.listdir(folder) and "random_states_0.pkl" in os.listdir(folder)
    return folder, first.state_dict(), second.state_dict()


def test_models_of_a_save_state_folder(cli, tmp_path, saved_state):
    folder, first, second = saved_state
    doc = cli("inspect", folder, "--json").json()
    assert doc["format"] == "accelerate" and doc["root"] == "model"
    assert sorted(t["name"] for t in doc["tensors"]) == sorted(first)
    out = tmp_path / "first.safetensors"
    assert cli("convert", folder, "-o", out).code == 0
    assert all(torch.equal(load_any(out)[k], v) for k, v in first.items())
    other = tmp_path / "second.pth"
    assert cli("convert", folder, "--root", "model_1", "-o", other).code == 0
    got = torch.load(other, weights_only=True)
    assert sorted(got) == sorted(second) and all(torch.equal(got[k], v) for k, v in second.items())
    assert_one_error_line(cli("inspect", folder, "--root", "optimizer"), "its models: model, model_1")


def test_state_files_are_never_unpickled(cli, tmp_path, saved_state):
    """optimizer.bin and random_states_0.pkl with live payloads: no command opens them."""
    folder, first, _ = saved_state
    marker = tmp_path / "pwned"

    class Payload:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    for name in ("optimizer.bin", "random_states_0.pkl", "scheduler.bin"):
        torch.save({"state": Payload()}, folder / name)
    for args in (("inspect", folder), ("convert", folder, "-o", tmp_path / "o.pth"), ("diff", folder, folder),
                 ("merge", folder, "--into", folder, "-o", tmp_path / "m.safetensors")):
        assert cli(*args).code == 0, args
    assert not marker.exists()
    assert sorted(torch.load(tmp_path / "o.pth", weights_only=True)) == sorted(first)
