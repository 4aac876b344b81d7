"""Every command fetches each byte range of a remote input it needs once (issue 21 §3): what
reads a tensor twice — diff (its hash, then its values), inspect --stats --hash (one pass each),
a DoRA fold (its norms, then its rows), extract-lora — keeps it between the reads (ops/spools.py:
in memory when small, else a temporary file with no name), and leaves none behind. Reports and
outputs are the local run's. Served by tests/remote_server.py on 127.0.0.1."""

from __future__ import annotations

import json
import os

import pytest
import torch
from safetensors.torch import save_file

from conftest import assert_one_error_line
from remote_server import RangeServer

import ckptsurgery.io.http as http
import ckptsurgery.ops.spools as spooling
from ckptsurgery.io.remote import HEAD_BYTES


def _model(seed: int, same_as: int | None = None) -> dict[str, torch.Tensor]:
    """Tensors past the remote reader's 256 KiB read-ahead (else a window fetched for one serves
    the next, and nothing is fetched twice to see), and small ones. `same_as`: the large
    `layers.0.weight` is that seed's (equal bytes on both sides of a diff)."""
    g = torch.Generator().manual_seed(seed)
    tensors = {"bias": torch.randn(96, generator=g),
               "embed.weight": torch.randn(640, 128, generator=g),  # 320 KiB: spooled (IN_MEMORY is 64 KiB here)
               "layers.0.weight": torch.randn(384, 256, generator=g),  # 384 KiB
               "layers.1.weight": torch.randn(512, 384, generator=g).to(torch.bfloat16),  # 384 KiB
               "norm.weight": torch.randn(64, generator=g).to(torch.bfloat16)}  # kept in memory
    if same_as is not None:
        tensors["layers.0.weight"] = _model(same_as)["layers.0.weight"]
    return tensors


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    root = tmp_path_factory.mktemp("served")
    for name, tensors in (("a", _model(0)), ("b", _model(1, same_as=0))):
        save_file(tensors, str(root / f"{name}.safetensors"), metadata={"format": "pt"})
        (root / "org" / name).mkdir(parents=True)
        save_file(tensors, str(root / "org" / name / "model.safetensors"), metadata={"format": "pt"})
    with RangeServer(str(root)) as server:
        yield server, root


@pytest.fixture
def server(served, monkeypatch, tmp_path):
    server, root = served
    server.reset()
    monkeypatch.setenv("HF_ENDPOINT", server.url)
    monkeypatch.delenv("HF_TOKEN", raising=False)
    monkeypatch.setenv("HF_TOKEN_PATH", os.path.join(str(root), "no-token-here"))
    monkeypatch.setenv("CKPTSURGERY_HTTP_TIMEOUT", "5")
    monkeypatch.setattr(spooling, "IN_MEMORY", 64 << 10)
    (tmp_path / "tmp").mkdir()
    monkeypatch.setenv("TMPDIR", str(tmp_path / "tmp"))
    monkeypatch.setattr("tempfile.tempdir", None)
    return server


@pytest.fixture
def spools(monkeypatch):
    """Every temporary file a command makes, with the folder it was made in, as made."""
    made: list = []
    make = spooling._temporary_file

    def recorded(folder):
        file, where = made_in = make(folder)
        made.append((where, file))
        return made_in

    monkeypatch.setattr(spooling, "_temporary_file", recorded)
    return made


def _files_bytes(root, *names) -> int:
    """What reading the files' headers and every tensor once costs: per file, its first 512 bytes
    or its header when longer, and its tensors' bytes."""
    total = 0
    for name in names:
        with open(root / name, "rb") as f:
            header = 8 + int.from_bytes(f.read(8), "little")
        total += max(HEAD_BYTES, header) + os.path.getsize(root / name) - header
    return total


def _no_debris(*folders) -> None:
    """No temporary file in the folders, and none of theirs still open or mapped here."""
    for folder in folders:
        names = os.listdir(folder)
        assert not [n for n in names if "ckptsurgery" in n or n.startswith(".")], names
    if not os.path.isdir("/proc/self/fd"):
        return
    held = []
    for fd in os.listdir("/proc/self/fd"):
        try:
            held.append(os.readlink(f"/proc/self/fd/{fd}"))
        except OSError:
            pass
    with open("/proc/self/maps") as maps:
        held += [line.split(maxsplit=5)[-1].strip() for line in maps if len(line.split()) == 6 or "(deleted)" in line]
    assert not [h for h in held if any(h.startswith(str(f) + os.sep) for f in folders)], held


def _report(result, *drop) -> dict:
    report = json.loads(result.out)
    for key in ("fetched", *drop):
        report.pop(key, None)
    return report


# ---- diff -------------------------------------------------------------------------------------

@pytest.mark.parametrize("options", [[], ["--atol", "1e-3"], ["--rtol", "1e-2"]])
def test_diff_of_remote_inputs_fetches_each_tensor_once(cli, server, served, spools, tmp_path, options):
    _, root = served
    local = cli("diff", root / "a.safetensors", root / "b.safetensors", *options, "--json")
    assert local.code == 1, local.err
    assert not spools  # a local input is read twice where it lies
    result = cli("diff", f"{server.url}/a.safetensors", "hf://org/b", *options, "--json")
    assert result.code == 1, result.err
    assert _report(result, "a", "b") == _report(local, "a", "b")
    fetched = json.loads(result.out)["fetched"]["bytes"]
    assert fetched <= _files_bytes(root, "a.safetensors", "org/b/model.safetensors"), fetched
    assert spools and {folder for folder, _ in spools} == {str(tmp_path / "tmp")}  # no output: tempfile's folder
    assert all(file.closed for _, file in spools)
    _no_debris(tmp_path / "tmp")


def test_diff_failing_midway_is_one_line_and_leaves_no_spool(cli, server, served, spools, tmp_path, monkeypatch):
    make = spooling._temporary_file

    def then_fail(folder):  # the server fails once the first tensor is held in a spool
        if spools:
            server.behaviour.fail_times = 100
        return make(folder)

    monkeypatch.setattr(spooling, "_temporary_file", then_fail)
    monkeypatch.setattr(http, "RETRIES", 0)  # the 503 at once, not after three more tries
    result = cli("diff", f"{server.url}/a.safetensors", "hf://org/b")
    assert_one_error_line(result, "503", code=2)
    assert spools and all(file.closed for _, file in spools)
    _no_debris(tmp_path / "tmp")


# ---- inspect --stats --hash -------------------------------------------------------------------

def test_inspect_stats_and_hash_of_a_remote_file_fetch_it_once(cli, server, served, spools, tmp_path):
    _, root = served
    local = cli("inspect", root / "a.safetensors", "--stats", "--hash", "--json")
    assert local.code == 0, local.err
    assert not spools
    result = cli("inspect", "hf://org/a", "--stats", "--hash", "--json")
    assert result.code == 0, result.err
    assert _report(result, "path", "input") == _report(local, "path", "input")
    fetched = json.loads(result.out)["fetched"]["bytes"]
    assert fetched <= _files_bytes(root, "org/a/model.safetensors"), fetched
    assert spools and {folder for folder, _ in spools} == {str(tmp_path / "tmp")}
    assert all(file.closed for _, file in spools)
    _no_debris(tmp_path / "tmp")


def test_inspect_failing_midway_is_one_line_and_leaves_no_spool(cli, server, served, spools, tmp_path, monkeypatch):
    make = spooling._temporary_file

    def then_fail(folder):
        if spools:
            server.behaviour.fail_times = 100
        return make(folder)

    monkeypatch.setattr(spooling, "_temporary_file", then_fail)
    monkeypatch.setattr(http, "RETRIES", 0)
    result = cli("inspect", f"{server.url}/a.safetensors", "--stats", "--hash")
    assert_one_error_line(result, "503")
    assert spools and all(file.closed for _, file in spools)
    _no_debris(tmp_path / "tmp")
