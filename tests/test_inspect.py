"""`inspect` through the real entry point: the JSON document, the human table, --keys, --stats,
--tree, metadata, the entry points, and names of extras as torch names them."""

import json
import os
import shutil
import subprocess
import sys

import pytest
import torch


def test_json_document_shape(cli, nested_pth, net):
    result = cli("inspect", nested_pth, "--json")
    assert result.code == 0 and result.err == ""
    doc = result.json()
    assert doc["format"] == "torch-zip" and doc["root"] == "state_dict"
    assert doc["extras"] == {"epoch": "int", "optimizer": "dict", "best": "float", "tag": "bytes"}
    assert doc["metadata"] == {} and doc["inert"] == []
    sd = net.state_dict()
    assert doc["total_params"] == sum(v.numel() for v in sd.values())
    assert doc["total_bytes"] == sum(v.numel() * v.element_size() for v in sd.values())
    first = doc["tensors"][0]
    assert first == {"name": "conv.weight", "dtype": "float32", "shape": [4, 3, 3, 3], "nbytes": 432,
                     "requires_grad": None, "shares_with": None, "contiguous": True}
    assert [t["name"] for t in doc["tensors"]] == list(sd)


def test_human_table(cli, zip_pth):
    result = cli("inspect", zip_pth)
    assert result.code == 0
    lines = result.out.splitlines()
    assert "format=torch-zip" in lines[0]
    assert any(line.split()[:3] == ["liner1.weight", "float32", "(5,"] for line in lines)
    assert lines[-1].startswith("11 tensors, ")  # BatchNorm adds num_batches_tracked


def test_keys_selects_modules_not_prefixes(cli, zip_pth):
    doc = cli("inspect", zip_pth, "--keys", "liner1", "--json").json()
    assert [t["name"] for t in doc["tensors"]] == ["liner1.weight", "liner1.bias"]
    doc = cli("inspect", zip_pth, "--keys", "*.bias", "--keys", "re:running", "--json").json()
    assert [t["name"] for t in doc["tensors"]] == ["conv.bias", "bn.bias", "bn.running_mean", "bn.running_var",
                                                  "liner1.bias", "liner10.bias"]
    assert doc["total_params"] == 4 + 4 + 4 + 4 + 5 + 4


def test_keys_that_select_nothing_fail(cli, zip_pth):
    result = cli("inspect", zip_pth, "--keys", "linear1")
    assert result.code == 1 and "'linear1' selected no key" in result.err and result.out == ""


def test_whole_module_reports_frozen_and_inert(cli, pickled_module):
    path, truth, _ = pickled_module
    result = cli("inspect", path, "--json")
    doc = result.json()
    assert "__main__.SecretNet" in doc["inert"]
    grads = {t["name"]: t["requires_grad"] for t in doc["tensors"]}
    assert grads["features.0.weight"] is False and grads["head.weight"] is True and grads["scale"] is None
    human = cli("inspect", path)
    assert "frozen" in human.out and "left inert" in human.err
    assert "left inert" not in cli("inspect", path, "-q").err


def test_stats(cli, odd_tensors_pth):
    doc = cli("inspect", odd_tensors_pth, "--stats", "--json").json()
    stats = {t["name"]: t for t in doc["tensors"]}
    ref = torch.load(odd_tensors_pth, weights_only=True)
    bf = ref["bf"].double()
    assert stats["bf"]["min"] == bf.min().item() and stats["bf"]["max"] == bf.max().item()
    assert stats["bf"]["mean"] == pytest.approx(bf.mean().item())
    assert stats["bf"]["std"] == pytest.approx(bf.std().item())
    assert stats["transposed"]["mean"] == pytest.approx(5.5)
    assert stats["mask"]["max"] == 1.0 and stats["empty"]["mean"] is None


def test_stats_counts_nan_and_inf(cli, tmp_path):
    path = tmp_path / "bad.pth"
    torch.save({"w": torch.tensor([1.0, float("nan"), float("inf"), -float("inf"), 3.0])}, path)
    t = cli("inspect", path, "--stats", "--json").json()["tensors"][0]
    assert (t["nan"], t["inf"], t["min"], t["max"], t["mean"]) == (1, 2, 1.0, 3.0, 2.0)


def test_stats_streamed_over_chunks(cli, tmp_path, monkeypatch):
    import importlib

    monkeypatch.setattr(importlib.import_module("ckptsurgery.ops.inspect"), "_STATS_CHUNK", 7)  # many chunks: the merged moments must still be right
    values = torch.randn(1000, dtype=torch.float64) * 3 + 1
    path = tmp_path / "v.pth"
    torch.save({"v": values}, path)
    t = cli("inspect", path, "--stats", "--json").json()["tensors"][0]
    assert t["mean"] == pytest.approx(values.mean().item()) and t["std"] == pytest.approx(values.std().item())


def test_tree_folds_repeated_layers(cli, tmp_path):
    torch.manual_seed(0)
    blocks = torch.nn.Sequential(*[torch.nn.Linear(4, 4) for _ in range(24)], torch.nn.Linear(4, 2))
    path = tmp_path / "deep.pth"
    torch.save({"h." + k: v for k, v in blocks.state_dict().items()}, path)
    doc = cli("inspect", path, "--tree", "--depth", "2", "--json").json()
    rows = [(r["name"], r["params"], r["repeat"]) for r in doc["tree"]]
    assert rows == [("h", 24 * 20 + 10, 1), ("h.{0..23}", 24 * 20, 24), ("h.24", 10, 1)]
    human = cli("inspect", path, "--tree")
    assert "{0..23}" in human.out and "24 × 20 params" in human.out


def test_tree_depth_must_be_positive(cli, zip_pth):
    assert cli("inspect", zip_pth, "--tree", "--depth", "0").code == 2


def test_safetensors_metadata_shown(cli, safetensors_file):
    doc = cli("inspect", safetensors_file, "--json").json()
    assert doc["format"] == "safetensors" and doc["metadata"] == {"source": "test"} and doc["root"] is None
    assert "source=test" in cli("inspect", safetensors_file).out


def test_console_script_and_module_entry_points(zip_pth):
    script = shutil.which("ckptsurgery") or os.path.join(os.path.dirname(sys.executable), "ckptsurgery")
    for command in ([script], [sys.executable, "-m", "ckptsurgery"]):
        done = subprocess.run([*command, "inspect", str(zip_pth), "--json"], capture_output=True, text=True)
        assert done.returncode == 0, done.stderr
        assert '"total_params"' in done.stdout and done.stderr == ""


def test_usage_errors_exit_2(cli, zip_pth):
    assert cli("inspect").code == 2
    assert cli("inspect", zip_pth, "--bogus").code == 2
    assert cli("frobnicate").code == 2


def test_hostile_names_cannot_drive_the_terminal(cli, tmp_path):
    """Names come from the file: an ANSI escape is shown escaped, Rich markup is shown as text."""
    path = tmp_path / "names.pth"
    torch.save({"\x1b[2Jwipe": torch.ones(1), "[bold red]loud[/]": torch.ones(1), "new\nline": torch.ones(1)}, path)
    for args in (["inspect", path], ["inspect", path, "--tree"], ["rename", path, "--add-prefix", "x.", "-o",
                                                                   tmp_path / "r.pth", "--dry-run"]):
        out = cli(*args).out
        assert "\x1b" not in out and "\\x1b[2Jwipe" in out, args
        assert "[bold red]loud[/]" in out and "new\\nline" in out, args
    result = cli("drop", path, "new\nline", "nothing-here", "-o", tmp_path / "d.pth")
    assert result.code == 1 and len(result.err.splitlines()) == 1


def test_version(cli):
    from ckptsurgery import __version__

    result = cli("--version")
    assert result.code == 0 and result.out == f"ckptsurgery {__version__}\n"


def test_inspect_names_a_storage_entry_by_torchs_type(cli, tmp_path):
    """A storage saved beside the state dict is listed as torch's type (torch.FloatStorage / UntypedStorage), never as ckptsurgery's StorageHandle."""
    src = tmp_path / "storage.pth"
    torch.save({"state_dict": {"w": torch.ones(2)}, "typed": torch.FloatStorage([1.0, 2.0])}, src)
    result = cli("inspect", src, "--json")
    assert result.code == 0, result.err
    assert "StorageHandle" not in json.dumps(result.json()["extras"]), result.json()["extras"]
