"""Merge methods that read a tensor twice — a measure pass over the whole tensor (SLERP's norms,
TIES' ranks, model stock's angles), then the chunks — fetch each tensor of a remote input once
(ops/merge/by_method.py: InputReads; ops/spools.py: Spools): a small one kept in memory between the passes, a
larger one streamed into a temporary file with no name in the output's folder, closed once its
chunks are read, and when the command fails or is interrupted. The output is the local run's,
byte for byte. Served by tests/remote_server.py on 127.0.0.1."""

from __future__ import annotations

import json
import os

import pytest
import torch
from safetensors.torch import save_file

from conftest import assert_one_error_line
from remote_server import RangeServer, files_bytes, hub_models, no_debris, recorded_spools, spools_in_tmp, use_hub

import ckptsurgery.ops.spools as spooling
from ckptsurgery.ops import WriteOptions
from ckptsurgery.ops import methods


def _model(seed: int) -> dict[str, torch.Tensor]:
    """Tensors past the remote reader's 256 KiB read-ahead (else a window fetched for one serves
    the next, and nothing is fetched twice to see), and small ones: one first in the file, before
    a large one (its window must not fetch the large one's first bytes), one last."""
    g = torch.Generator().manual_seed(seed)
    return {"bias": torch.randn(96, generator=g),  # first: safetensors orders by dtype, then name
            "embed.weight": torch.randn(640, 128, generator=g),  # 320 KiB: spooled (IN_MEMORY is 64 KiB here)
            "layers.0.weight": torch.randn(384, 256, generator=g),  # 384 KiB
            "layers.1.weight": torch.randn(512, 384, generator=g).to(torch.bfloat16),  # 384 KiB
            "norm.weight": torch.randn(64, generator=g).to(torch.bfloat16)}  # kept in memory


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    root = tmp_path_factory.mktemp("served")
    hub_models(root, {name: _model(i) for i, name in enumerate(("a", "b", "base"))})
    with RangeServer(str(root)) as server:
        yield server, root


@pytest.fixture
def server(served, monkeypatch, tmp_path):
    server, root = served
    server.reset()
    use_hub(monkeypatch, server, root)
    monkeypatch.setattr(methods, "CHUNK", 4096)  # many chunks a tensor: the second pass reads the spool in pieces
    spools_in_tmp(monkeypatch, tmp_path)
    return server


@pytest.fixture
def spools(monkeypatch):
    return recorded_spools(monkeypatch)




@pytest.mark.parametrize("method, extra", [
    ("slerp", ["--t", "0.3"]),
    ("ties", ["--density", "0.5", "--base", "BASE"]),  # a rank window: several passes over base and model
    ("model-stock", ["--base", "BASE"]),
])
def test_a_two_pass_merge_of_remote_inputs_fetches_each_tensor_once(cli, server, served, spools, tmp_path,
                                                                   method, extra):
    _, root = served
    local = [root / "a.safetensors", root / "b.safetensors"]
    remote = [f"{server.url}/a.safetensors", "hf://org/b"]
    base = ["base.safetensors"] if "BASE" in extra else []
    local_extra = [str(root / "base.safetensors") if e == "BASE" else e for e in extra]
    remote_extra = [f"{server.url}/base.safetensors" if e == "BASE" else e for e in extra]
    assert cli("merge", *local, "--method", method, *local_extra, "-o", tmp_path / "local.safetensors").code == 0
    assert not spools  # a local input is mapped: read twice where it lies
    result = cli("merge", *remote, "--method", method, *remote_extra, "-o", tmp_path / "remote.safetensors",
                 "--json")
    assert result.code == 0, result.err
    assert (tmp_path / "remote.safetensors").read_bytes() == (tmp_path / "local.safetensors").read_bytes()
    fetched = json.loads(result.out)["fetched"]
    assert fetched["bytes"] <= files_bytes(root, "a.safetensors", "b.safetensors", *base)
    # 3 spooled tensors per input, each in the output's folder, all closed once written
    assert len(spools) == 3 * (2 + len(base))
    assert {folder for folder, _ in spools} == {str(tmp_path)}
    assert all(file.closed for _, file in spools)
    no_debris(tmp_path, tmp_path / "tmp")


def test_a_library_merge_given_no_spools_makes_none_it_cannot_close(server, served, spools, tmp_path):
    """merge_by_method without `spools` (a library caller's): a remote tensor is then read as it is
    asked, twice by a two-pass method — no temporary file made that nothing closes when the merge
    is left halfway (the command's ExitStack closes the Spools it passes)."""
    from ckptsurgery.io import open_checkpoint
    from ckptsurgery.ops.merge.by_method import merge_by_method
    from ckptsurgery.ops.methods import resolve_parameters

    params = resolve_parameters("slerp", 2, {"t": 0.3})
    with open_checkpoint(f"{server.url}/a.safetensors") as a, open_checkpoint(f"{server.url}/b.safetensors") as b:
        merged = merge_by_method([a, b], None, "slerp", params, None).tensors["embed.weight"]
        bytes(merged.storage.source.pieces[0][0].view(0, 16))  # its first chunk made, then left
    assert not spools
    no_debris(tmp_path, tmp_path / "tmp")
    del merged


def test_a_one_pass_merge_spools_nothing(cli, server, served, spools, tmp_path):
    _, root = served
    result = cli("merge", f"{server.url}/a.safetensors", "hf://org/b", "--average", "-o", tmp_path / "out.safetensors",
                 "--json")
    assert result.code == 0, result.err
    assert not spools
    assert json.loads(result.out)["fetched"]["bytes"] <= files_bytes(root, "a.safetensors", "b.safetensors")


@pytest.mark.parametrize("adapter", [False, True])
def test_a_recipe_of_hub_models_with_slerp_fetches_each_tensor_once(cli, server, served, spools, tmp_path,
                                                                    monkeypatch, adapter):
    """With `model+adapter` the base's tensors are folded as read (not in order in a file): the
    fold's copy made once for both passes, not folded — and fetched — again for the second."""
    _, root = served
    lora = f"+{_lora(tmp_path / 'lora')}" if adapter else ""
    recipe = ("models:\n  - model: {p}a" + lora + "\n  - model: {p}b\nmerge_method: slerp\nbase_model: {p}a" + lora
              + "\nparameters:\n  t: [0, 0.4, 1]\ndtype: float32\n")
    for name in ("a", "b"):
        (tmp_path / name).mkdir()
        save_file(_model(("a", "b").index(name)), str(tmp_path / name / "model.safetensors"),
                  metadata={"format": "pt"})
    monkeypatch.chdir(tmp_path)
    (tmp_path / "local.yml").write_text(recipe.format(p=""))
    assert cli("merge", "--config", tmp_path / "local.yml", "-o", tmp_path / "local.safetensors").code == 0
    (tmp_path / "remote.yml").write_text(recipe.format(p="hf://org/"))
    result = cli("merge", "--config", tmp_path / "remote.yml", "-o", tmp_path / "out" / "remote.safetensors",
                 "--json")
    assert result.code == 0, result.err
    assert (tmp_path / "out" / "remote.safetensors").read_bytes() == (tmp_path / "local.safetensors").read_bytes()
    weights = [f for f in json.loads(result.out)["fetched"]["files"] if f["url"].endswith(".safetensors")]
    assert sum(f["bytes"] for f in weights) <= files_bytes(root, "org/a/model.safetensors", "org/b/model.safetensors")
    assert spools and {folder for folder, _ in spools} == {str(tmp_path / "out")}
    assert all(file.closed for _, file in spools)
    no_debris(tmp_path / "out", tmp_path / "tmp")


def _lora(folder):
    """A PEFT LoRA on embed and layers.0 (r=2)."""
    folder.mkdir()
    (folder / "adapter_config.json").write_text(json.dumps(
        {"peft_type": "LORA", "r": 2, "lora_alpha": 2, "target_modules": ["embed", "layers.0"]}))
    g = torch.Generator().manual_seed(7)
    prefix = "base_model.model."
    save_file({f"{prefix}embed.lora_A.weight": torch.randn(2, 128, generator=g),
               f"{prefix}embed.lora_B.weight": torch.randn(640, 2, generator=g),
               f"{prefix}layers.0.lora_A.weight": torch.randn(2, 256, generator=g),
               f"{prefix}layers.0.lora_B.weight": torch.randn(384, 2, generator=g)},
              str(folder / "adapter_model.safetensors"))
    return folder


@pytest.mark.parametrize("failure", ["5xx", "changed"])
def test_a_server_failing_midway_leaves_no_output_and_no_spool(cli, server, served, spools, tmp_path, monkeypatch,
                                                             failure):
    make = spooling._temporary_file

    def then_fail(folder):  # the server fails once the first tensor is held in a spool
        if spools:
            if failure == "5xx":
                server.behaviour.fail_times = 100
            else:
                server.behaviour.change_after = 0
        return make(folder)

    monkeypatch.setattr(spooling, "_temporary_file", then_fail)
    out = tmp_path / "out" / "merged.safetensors"
    out.parent.mkdir()
    result = cli("merge", f"{server.url}/a.safetensors", "hf://org/b", "--method", "slerp", "--t", "0.5",
                 "-o", out)
    assert_one_error_line(result, "503" if failure == "5xx" else "changed while being read")
    assert len(spools) >= 1 and all(file.closed for _, file in spools)
    assert os.listdir(out.parent) == []
    no_debris(out.parent, tmp_path / "tmp")


def test_an_interrupted_merge_closes_its_spools(server, served, spools, tmp_path, monkeypatch):
    from ckptsurgery.ops import merge_with_method

    make = spooling._temporary_file

    def interrupted(folder):
        if spools:
            raise KeyboardInterrupt
        return make(folder)

    monkeypatch.setattr(spooling, "_temporary_file", interrupted)
    out = tmp_path / "out" / "merged.safetensors"
    out.parent.mkdir()
    with pytest.raises(KeyboardInterrupt):
        merge_with_method([f"{server.url}/a.safetensors", "hf://org/b"], WriteOptions(str(out)), method="slerp", t=0.5)
    assert len(spools) == 1 and spools[0][1].closed
    assert os.listdir(out.parent) == []
    no_debris(out.parent, tmp_path / "tmp")


def test_a_full_disk_under_a_spool_is_one_line_and_leaves_nothing(cli, server, served, spools, tmp_path, monkeypatch):
    make = spooling._temporary_file

    class Full:
        """A temporary file on a disk that fills up at once."""

        def __init__(self, file):
            self.file = file

        def write(self, data):
            raise OSError(28, "No space left on device")

        def __getattr__(self, name):
            return getattr(self.file, name)

    monkeypatch.setattr(spooling, "_temporary_file", lambda folder: (Full(make(folder)[0]), folder))
    out = tmp_path / "out" / "merged.safetensors"
    out.parent.mkdir()
    result = cli("merge", f"{server.url}/a.safetensors", "hf://org/b", "--method", "slerp", "--t", "0.5", "-o", out)
    assert_one_error_line(result, str(out.parent), "No space left on device", "read twice")
    assert len(spools) == 1 and spools[0][1].closed
    assert os.listdir(out.parent) == []
    no_debris(out.parent, tmp_path / "tmp")
