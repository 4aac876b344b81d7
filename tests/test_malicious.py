"""Checkpoints that run a command when unpickled. Each is first proven live: torch.load with
weights_only=False, in a subprocess, creates the marker file. Then every reading command runs
over it: the marker never appears, the exit code is 0 or 1, and there is no traceback."""

import os
import pickle
import subprocess
import sys
from collections import OrderedDict

import pytest
import torch


class Payload:
    """Unpickles as os.system(command)."""

    def __init__(self, command: str):
        self.command = command

    def __reduce__(self):
        return os.system, (self.command,)


class RebuildWithSystem:
    """An allow-listed torch rebuild function handed os.system as the callable it calls."""

    def __init__(self, command: str):
        self.command = command

    def __reduce__(self):
        return torch._tensor._rebuild_from_type_v2, (os.system, torch.Tensor, (self.command,), {})


class EvalPayload:
    def __init__(self, command: str):
        self.command = command

    def __reduce__(self):
        return eval, (f"__import__('os').system({self.command!r})",)


def build(kind: str, marker, legacy: bool, path):
    command = f"touch {marker}"
    sd = OrderedDict(weight=torch.ones(2, 2), bias=torch.zeros(2))
    objects = {
        "top_level": Payload(command),
        "nested_beside_state_dict": {"state_dict": sd, "extra": Payload(command)},
        "inside_list": {"state_dict": sd, "hooks": [1, Payload(command)]},
        "rebuild_with_system": {"state_dict": sd, "x": RebuildWithSystem(command)},
        "eval": {"state_dict": sd, "x": EvalPayload(command)},
    }
    torch.save(objects[kind], path, _use_new_zipfile_serialization=not legacy)


def proven_live(path, marker) -> bool:
    code = "import sys, torch; torch.load(sys.argv[1], weights_only=False)"
    subprocess.run([sys.executable, "-c", code, str(path)], capture_output=True)
    live = marker.exists()
    if live:
        marker.unlink()
    return live


KINDS = ["top_level", "nested_beside_state_dict", "inside_list", "rebuild_with_system", "eval"]


@pytest.mark.parametrize("legacy", [False, True], ids=["zip", "legacy"])
@pytest.mark.parametrize("kind", KINDS)
def test_payload_never_runs(cli, tmp_path, kind, legacy):
    marker = tmp_path / "PWNED"
    path = tmp_path / "evil.pth"
    build(kind, marker, legacy, path)
    assert proven_live(path, marker), "the payload must be live for this test to mean anything"
    for args in (["inspect", path], ["inspect", path, "--json"], ["inspect", path, "--stats"],
                 ["convert", path, "-o", tmp_path / "o.safetensors", "--force"],
                 ["convert", path, "-o", tmp_path / "o.pth", "--force"]):
        result = cli(*args)
        assert not marker.exists(), args
        assert result.code in (0, 1) and "Traceback" not in result.err, (args, result.err)
        if kind != "top_level":  # tensors recovered, payload left inert and reported
            assert result.code == 0, result.err
    if kind != "top_level":
        doc = cli("inspect", path, "--json").json()
        assert doc["root"] == "state_dict" and len(doc["tensors"]) == 2
        assert any(name in ("posix.system", "__builtin__.eval") for name in doc["inert"])


def test_carried_through_payload_stays_inert(cli, tmp_path):
    """Copying a hostile .pth to .pth writes the payload back as it was — still never run by us,
    and still refused by torch's own safe loader."""
    marker = tmp_path / "PWNED"
    path = tmp_path / "evil.pth"
    build("nested_beside_state_dict", marker, False, path)
    out = tmp_path / "copy.pth"
    assert cli("convert", path, "-o", out).code == 0
    assert not marker.exists()
    with pytest.raises(pickle.UnpicklingError):
        torch.load(out, weights_only=True)
    assert proven_live(out, marker)  # faithfully the same file content, for torch.load to judge


def test_bytearray_of_a_huge_size_is_refused(cli, tmp_path):
    """`bytearray(10**12)` would allocate a terabyte; the allow-list checks the argument."""
    data = b"\x80\x02c__builtin__\nbytearray\nJ\x00\x00\x00\x7f\x85R."
    import zipfile

    path = tmp_path / "bomb.pth"
    with zipfile.ZipFile(path, "w") as z:
        z.writestr("archive/data.pkl", data)
    result = cli("inspect", path)
    assert result.code == 1 and "bytearray of a size" in result.err
