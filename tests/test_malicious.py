"""A corpus of hostile checkpoints, each of which creates a marker file if its pickle runs.

Every file is first proven live — torch.load(weights_only=False), in a subprocess, creates its
marker — so a test that passes means something. Then every reading command runs over every
file: the marker never appears, the exit code is 0 (the tensors were recovered, the payload
left inert) or 1 (refused with one clear line), never a traceback."""

import builtins
import importlib
import json
import os
import pickle
import subprocess
import sys
import textwrap
import zipfile
from collections import OrderedDict

import pytest
import torch


class Reduce:
    """Unpickles as func(*args)."""

    def __init__(self, func, *args):
        self.func, self.args = func, args

    def __reduce__(self):
        return self.func, self.args

    def __call__(self, *args):  # lets one Reduce stand as the callable of another
        raise AssertionError("never called while pickling")


def shell(marker) -> str:
    return f"touch {marker}"


def _state_dict():
    return OrderedDict(weight=torch.ones(2, 2), bias=torch.zeros(2))


# name -> (object to torch.save, whether the tensors can still be recovered)
def payloads(marker):
    import torch.utils.collect_env as collect_env

    cmd = shell(marker)
    system = Reduce(os.system, cmd)
    inner = pickle.dumps(system, protocol=2)
    return {
        "system_top_level": (system, False),
        "system_beside_state_dict": ({"state_dict": _state_dict(), "extra": system}, True),
        "system_inside_state_dict": (OrderedDict(weight=torch.ones(2), evil=system), False),
        "system_in_a_list": ({"state_dict": _state_dict(), "hooks": [1, system]}, True),
        "eval": ({"state_dict": _state_dict(), "x": Reduce(builtins.eval, f"__import__('os').system({cmd!r})")}, True),
        "exec": ({"state_dict": _state_dict(), "x": Reduce(builtins.exec, f"import os; os.system({cmd!r})")}, True),
        "popen": ({"state_dict": _state_dict(), "x": Reduce(subprocess.Popen, ["touch", str(marker)])}, True),
        "torch_runs_shell": ({"state_dict": _state_dict(), "x": Reduce(collect_env.run, cmd)}, True),
        "pickle_in_pickle": ({"state_dict": _state_dict(), "x": Reduce(pickle.loads, inner)}, True),
        "getattr_trick": ({"state_dict": _state_dict(), "x": Reduce(Reduce(builtins.getattr, Reduce(
            importlib.import_module, "os"), "system"), cmd)}, True),
        "rebuild_with_system": ({"state_dict": _state_dict(),
                                 "x": Reduce(torch._tensor._rebuild_from_type_v2, os.system, torch.Tensor, (cmd,), {})},
                                True),
    }


def _inst_pickle(marker) -> bytes:
    """Protocol 0: MARK, the argument, then INST module name — the oldest way to call a global."""
    return b"(S'" + shell(marker).encode() + b"'\nios\nsystem\n."


def _legacy_frame(body: bytes) -> bytes:
    from ckptsurgery.io.torch_legacy import MAGIC_NUMBER, PROTOCOL_VERSION

    head = b"".join(pickle.dumps(x, protocol=2) for x in
                    (MAGIC_NUMBER, PROTOCOL_VERSION, {"protocol_version": 1001, "little_endian": True}))
    return head + body + pickle.dumps([], protocol=2)


def _zip_frame(body: bytes, path) -> None:
    with zipfile.ZipFile(path, "w") as z:
        z.writestr("archive/data.pkl", body)
        z.writestr("archive/byteorder", "little")
        z.writestr("archive/version", "3\n")


@pytest.fixture(scope="module")
def corpus(tmp_path_factory, deepspeed_checkpoint):
    """Every hostile file or folder, proven live. Returns [(name, path, marker, recoverable)]."""
    folder = tmp_path_factory.mktemp("hostile")
    files = []
    for legacy in (False, True):
        fmt = "legacy" if legacy else "zip"
        for name in payloads(folder / "x"):
            marker = folder / f"MARK-{name}-{fmt}"
            obj, recoverable = payloads(marker)[name]
            path = folder / f"{name}-{fmt}.pth"
            torch.save(obj, path, _use_new_zipfile_serialization=not legacy)
            files.append((f"{name}-{fmt}", path, marker, recoverable))
        marker = folder / f"MARK-inst-{fmt}"
        path = folder / f"inst-{fmt}.pth"
        if legacy:
            path.write_bytes(_legacy_frame(_inst_pickle(marker)))
        else:
            _zip_frame(_inst_pickle(marker), path)
        files.append((f"inst-{fmt}", path, marker, False))
    marker = folder / "MARK-raw"
    (folder / "raw.pth").write_bytes(pickle.dumps(Reduce(os.system, shell(marker)), protocol=4))
    files.append(("raw_pickle", folder / "raw.pth", marker, False))
    files += _module_with_payload(folder)
    files += _distributed_folders(folder, deepspeed_checkpoint(2))
    _prove_live(files, folder)
    return files


def _distributed_folders(folder, zero):
    """Folders of distributed engines with a payload: in a DCP `.metadata` (torch's reader is a
    plain pickle.load), in a DCP value (torch's loader unpickles values with weights_only=False),
    and in a DeepSpeed optimizer states file."""
    import shutil
    import warnings

    import torch.distributed.checkpoint as dcp

    out = []
    for kind in ("dcp_metadata", "dcp_value"):
        marker, path = folder / f"MARK-{kind}", folder / kind
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # one process: no process group
            dcp.save({"model": _state_dict(), **({"evil": Reduce(os.system, shell(marker))}
                                                  if kind == "dcp_value" else {})}, checkpoint_id=str(path))
        if kind == "dcp_metadata":
            meta = pickle.loads((path / ".metadata").read_bytes())
            meta.planner_data = Reduce(os.system, shell(marker))
            (path / ".metadata").write_bytes(pickle.dumps(meta, protocol=4))
        out.append((f"{kind}-folder", path, marker, kind == "dcp_value"))
    marker, path = folder / "MARK-zero", folder / "zero"
    shutil.copytree(zero, path)
    optim = next(path.glob("*/zero_pp_rank_0_*optim_states.pt"))
    states = torch.load(optim, weights_only=False)
    states["optimizer_state_dict"]["loss_scaler"] = Reduce(os.system, shell(marker))
    torch.save(states, optim)
    out.append(("zero_optim_states-folder", path, marker, True))
    return out


def _module_with_payload(folder):
    """A whole pickled nn.Module (class in the user's code) carrying a payload as an attribute."""
    (folder / "usermodel.py").write_text(textwrap.dedent("""
        import os, torch
        from torch import nn
        class Payload:
            def __init__(self, cmd): self.cmd = cmd
            def __reduce__(self): return os.system, (self.cmd,)
        class UserNet(nn.Module):
            def __init__(self, cmd):
                super().__init__()
                self.fc = nn.Linear(2, 2)
                self.evil = Payload(cmd)
    """))
    out = []
    for fmt, zip_format in (("zip", True), ("legacy", False)):
        marker = folder / f"MARK-module-{fmt}"
        path = folder / f"module-{fmt}.pth"
        code = (f"import torch, usermodel; torch.save(usermodel.UserNet({shell(marker)!r}), {str(path)!r}, "
                f"_use_new_zipfile_serialization={zip_format})")
        subprocess.run([sys.executable, "-c", code], cwd=folder, check=True)
        out.append((f"module_attribute-{fmt}", path, marker, True))
    return out


def _prove_live(files, folder):
    """One subprocess (one torch import) loads every file the unsafe way; each must fire."""
    code = ("import sys, json, os, glob, torch\n"
            "from torch.distributed.checkpoint.format_utils import dcp_to_torch_save\n"
            "for path in json.loads(sys.argv[1]):\n"
            "    try:\n"
            "        if os.path.isfile(os.path.join(path, '.metadata')):\n"  # what torch's own DCP route does
            "            dcp_to_torch_save(path, path + '.pth')\n"
            "        elif os.path.isdir(path):\n"  # what DeepSpeed's own loaders do with its files
            "            [torch.load(p, weights_only=False) for p in glob.glob(path + '/*/*.pt')]\n"
            "        else:\n"
            "            torch.load(path, weights_only=False)\n"
            "    except BaseException: pass\n")
    subprocess.run([sys.executable, "-c", code, json.dumps([str(p) for _, p, _, _ in files])],
                   cwd=folder, capture_output=True, timeout=300)
    dead = [name for name, _, marker, _ in files if not marker.exists()]
    assert not dead, f"payloads that did not fire under torch.load: {dead}"
    for _, _, marker, _ in files:
        marker.unlink()


def reading_commands(path, out):
    return [
        ["inspect", path], ["inspect", path, "--json"], ["inspect", path, "--stats"], ["inspect", path, "--tree"],
        ["convert", path, "-o", out / "c.safetensors", "--force"], ["convert", path, "-o", out / "c.pth", "--force"],
        ["filter", path, "--keep", "re:.", "-o", out / "f.pth", "--force"],
        ["drop", path, "re:bias", "-o", out / "d.pth", "--force"],
        ["rename", path, "--add-prefix", "m.", "-o", out / "r.pth", "--force"],
        ["merge", path, path, "--on-conflict", "first", "-o", out / "m.pth", "--force"],
        ["merge", path, "--into", path, "-o", out / "i.safetensors", "--force"],
        ["merge", path, path, "--average", "-o", out / "a.pth", "--force"],
        ["diff", path, path],
    ]


def test_corpus_is_complete(corpus):
    names = {name.rsplit("-", 1)[0] for name, _, _, _ in corpus}
    assert {"system_top_level", "eval", "exec", "popen", "torch_runs_shell", "pickle_in_pickle",
            "rebuild_with_system", "module_attribute", "inst", "raw_pickle", "dcp_metadata", "dcp_value",
            "zero_optim_states"} <= names
    # 12 kinds in both formats, the raw pickle, the module in both, three distributed folders
    assert len(corpus) == 2 * 12 + 1 + 2 + 3


def test_no_payload_ever_runs(cli, tmp_path, corpus):
    for name, path, marker, recoverable in corpus:
        for args in reading_commands(path, tmp_path):
            result = cli(*args)
            assert not marker.exists(), (name, args)
            failed = 2 if args[0] == "diff" else 1  # diff: 1 is "they differ", 2 trouble
            assert result.code in (0, failed), (name, args, result.err)
            assert "Traceback" not in result.err and len(result.err.strip().splitlines()) <= 30, (name, args)
            if result.code == failed:
                assert len(result.err.strip().splitlines()) == 1, (name, args, result.err)
            if recoverable and args[0] in ("inspect", "convert", "filter", "rename"):
                assert result.code == 0, (name, args, result.err)


def test_inspect_names_what_it_left_inert(cli, corpus):
    expected = {"system_beside_state_dict": "posix.system", "eval": "__builtin__.eval",
                "exec": "__builtin__.exec", "popen": "commands.Popen",  # protocol 2 writes Python 2's module names
                "torch_runs_shell": "torch.utils.collect_env.run", "pickle_in_pickle": "pickle.loads",
                "getattr_trick": "__builtin__.getattr", "module_attribute": "posix.system"}
    seen = {}
    for name, path, _, recoverable in corpus:
        if recoverable:
            doc = cli("inspect", path, "--json").json()
            seen[name.rsplit("-", 1)[0]] = doc["inert"]
            human = cli("inspect", path)
            assert "left inert (not run)" in human.err
    for kind, global_name in expected.items():
        assert any(global_name in g or global_name.replace("posix.", "os.") in g for g in seen[kind]), (kind, seen[kind])


def test_carried_through_payload_stays_inert(cli, tmp_path, corpus):
    """Copying a hostile .pth to .pth writes the payload back exactly as it was, never run by
    us: torch's safe loader still refuses the copy, and an unsafe load of it still fires."""
    copies = []
    for kind in ("system_beside_state_dict-zip", "getattr_trick-legacy"):
        name, path, marker, _ = next(c for c in corpus if c[0] == kind)
        out = tmp_path / f"{kind}.pth"
        assert cli("convert", path, "-o", out).code == 0 and not marker.exists()
        with pytest.raises(pickle.UnpicklingError):
            torch.load(out, weights_only=True)
        copies.append((name, out, marker, True))
    _prove_live(copies, path.parent)


def test_whole_module_payload_is_not_written_back(cli, tmp_path, corpus):
    """A pickled module becomes its state dict: the attribute holding the payload is gone."""
    _, path, marker, _ = next(c for c in corpus if c[0] == "module_attribute-zip")
    out = tmp_path / "sd.pth"
    assert cli("convert", path, "-o", out).code == 0 and not marker.exists()
    assert list(torch.load(out, weights_only=True)) == ["fc.weight", "fc.bias"]


def test_bytearray_of_a_huge_size_is_refused(cli, tmp_path):
    """`bytearray(10**12)` would allocate a terabyte; the allow-list checks the argument."""
    path = tmp_path / "bomb.pth"
    _zip_frame(b"\x80\x02c__builtin__\nbytearray\nJ\x00\x00\x00\x7f\x85R.", path)
    result = cli("inspect", path)
    assert result.code == 1 and "bytearray of a size" in result.err


def test_memo_index_cannot_reserve_gigabytes(cli, tmp_path, limited_heap):
    """LONG_BINPUT at index 2**31-1: the C unpickler would size its memo table to match (32 GB)."""
    path = tmp_path / "memo.pth"
    _zip_frame(b"\x80\x02}r\xff\xff\xff\x7f.", path)
    result = cli("inspect", path, "--json")
    assert result.code == 0, result.err
    assert result.json()["tensors"] == []


def test_length_field_cannot_reserve_gigabytes(cli, tmp_path, limited_heap):
    """BINUNICODE claiming 4 GB in a small legacy file: refused before anything is allocated."""
    path = tmp_path / "len.pth"
    path.write_bytes(_legacy_frame(b"\x80\x02X\xff\xff\xff\xffabc."))
    result = cli("inspect", path)
    assert result.code == 1 and "runs past the end" in result.err


@pytest.mark.parametrize("kind", ["system_beside_state_dict-zip", "getattr_trick-legacy", "popen-zip"])
def test_a_written_output_that_carries_placeholders_warns_and_lists_them(cli, tmp_path, corpus, kind):
    """A hostile .pth copied to .pth keeps its inert payload, as documented; the write now says so
    on stderr, and --json lists the globals an unsafe load of the output would import — as
    inspect does for the input. (A DCP output refuses them; safetensors holds tensors only.)"""
    name, path, marker, _ = next(c for c in corpus if c[0] == kind)
    inert = cli("inspect", path, "--json").json()["inert"]
    out, args = tmp_path / "o.pth", []
    written = cli("convert", path, "-o", out, *args)
    assert written.code == 0 and "warning: the output carries the input's inert placeholders" in written.err
    report = cli("convert", path, "-o", out, *args, "--force", "--json").json()
    assert report["inert"] == inert and not marker.exists()
    clean = cli("convert", path, "-o", tmp_path / "o.safetensors", "--json").json()
    assert "inert" not in clean  # safetensors holds tensors only: nothing carried

