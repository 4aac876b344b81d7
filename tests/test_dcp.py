"""torch.distributed.checkpoint folders as inputs: written by torch itself, from one process and
from two (gloo on 127.0.0.1, FSDP2 `fully_shard` and a DTensor sharded on dimension 1), read
without torch's loader and checked against the full tensors the ranks gathered themselves; and
hostile folders (`.metadata` edited): a .pth output runs no more than torch's own loader would,
bad sizes and planner paths are one error line, and time, memory and descriptors stay bounded."""

from __future__ import annotations

import builtins
import importlib
import io
import json
import os
import pickle
import resource
import subprocess
import sys
import textwrap
import warnings

import pytest
import torch
from torch.distributed.checkpoint.filesystem import _StorageInfo
from torch.distributed.checkpoint.metadata import (BytesStorageMetadata, ChunkStorageMetadata, MetadataIndex,
                                                   TensorStorageMetadata)

from ckptsurgery.errors import CkptError
from conftest import ROOT, assert_one_error_line, dcp_storage, load_any, rewrite_dcp_metadata, run_two_ranks

TWO_RANKS = textwrap.dedent("""
    import sys, torch, torch.distributed as dist, torch.distributed.checkpoint as dcp
    from torch import nn
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor import Shard, distribute_tensor

    dist.init_process_group("gloo")
    torch.manual_seed(0)
    model = nn.Sequential(nn.Embedding(7, 5), nn.Linear(5, 3), nn.LayerNorm(3))  # 7 and 3 rows: uneven
    mesh = init_device_mesh("cpu", (dist.get_world_size(),))
    for layer in model:
        fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)
    opt = torch.optim.Adam(model.parameters())
    model(torch.tensor([[1, 2]])).sum().backward()
    opt.step()
    msd, osd = get_state_dict(model, opt)
    torch.manual_seed(1)
    cols = distribute_tensor(torch.randn(4, 5, dtype=torch.bfloat16), mesh, [Shard(1)])  # 5 columns over 2 ranks
    dcp.save({"model": {**msd, "cols.w": cols}, "optim": osd, "step": 3}, checkpoint_id=sys.argv[1])
    full_model, full_optim = get_state_dict(model, opt, options=StateDictOptions(full_state_dict=True))
    full_cols = cols.full_tensor()
    if dist.get_rank() == 0:
        torch.save({"model": {**full_model, "cols.w": full_cols}, "optim": full_optim}, sys.argv[2])
    dist.destroy_process_group()
""")


@pytest.fixture(scope="session")
def two_ranks(tmp_path_factory):
    """(DCP folder saved by two FSDP2 ranks, the full state dict rank 0 gathered)."""
    folder = tmp_path_factory.mktemp("dcp2")
    script = folder / "save.py"
    script.write_text(TWO_RANKS)
    out, full = folder / "ckpt", folder / "full.pth"
    run_two_ranks(script, out, full, cwd=folder)
    assert sorted(os.listdir(out)) == [".metadata", "__0_0.distcp", "__1_0.distcp"]
    return out, torch.load(full, weights_only=True)


@pytest.fixture
def one_rank(tmp_path):
    """A DCP folder saved from one process: nested model/extras, several dtypes, a 0-d tensor."""
    import torch.distributed.checkpoint as dcp

    torch.manual_seed(0)
    state = {"model": {"emb.weight": torch.randn(5, 3), "ids": torch.arange(4), "half": torch.randn(2, 2).half(),
                       "scale": torch.tensor(2.5)},
             "step": 7, "extra": {"lr": 0.1, "names": ["a", "b"]}}
    folder = tmp_path / "one"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "torch.distributed is disabled ... single process"
        dcp.save(state, checkpoint_id=str(folder))
    return folder, state


def test_one_process_folder_reads_like_a_nested_checkpoint(cli, one_rank):
    folder, state = one_rank
    doc = cli("inspect", folder, "--json").json()
    assert doc["format"] == "dcp" and doc["root"] == "model"
    assert doc["extras"] == {"step": "int", "extra": "dict"}
    assert [(t["name"], t["dtype"], t["shape"]) for t in doc["tensors"]] == [
        ("emb.weight", "float32", [5, 3]), ("ids", "int64", [4]), ("half", "float16", [2, 2]), ("scale", "float32", [])]
    out = folder.parent / "one.safetensors"
    assert cli("convert", folder, "-o", out).code == 0
    got = load_any(out)
    assert all(torch.equal(got[k], v) for k, v in state["model"].items())
    back = folder.parent / "one.pth"
    assert cli("convert", folder, "-o", back).code == 0
    loaded = torch.load(back, weights_only=True)
    assert loaded["step"] == 7 and loaded["extra"] == {"lr": 0.1, "names": ["a", "b"]}
    assert cli("diff", folder, back).code == 0


def test_metadata_file_points_at_its_folder(cli, one_rank):
    folder, _ = one_rank
    assert_one_error_line(cli("inspect", folder / ".metadata"), "give its folder", str(folder))


def test_two_ranks_are_put_together_bit_exact(cli, tmp_path, two_ranks):
    folder, full = two_ranks
    doc = cli("inspect", folder, "--json").json()
    assert doc["root"] == "model" and set(doc["extras"]) == {"optim", "step"}
    assert {t["name"]: t["shape"] for t in doc["tensors"]} == {k: list(v.shape) for k, v in full["model"].items()}
    out = tmp_path / "model.safetensors"
    assert cli("convert", folder, "-o", out).code == 0
    got = load_any(out)
    assert list(got) == list(full["model"]) and all(torch.equal(got[k], v) for k, v in full["model"].items())
    assert got["cols.w"].dtype == torch.bfloat16  # sharded on dimension 1: strided blocks of the whole


def test_two_ranks_optimizer_state_travels_into_pth(cli, tmp_path, two_ranks):
    folder, full = two_ranks
    out = tmp_path / "all.pth"
    assert cli("convert", folder, "-o", out).code == 0
    loaded = torch.load(out, weights_only=True)
    assert loaded["step"] == 3
    assert loaded["optim"]["param_groups"][0]["lr"] == full["optim"]["param_groups"][0]["lr"]
    for name, state in full["optim"]["state"].items():
        for key, value in state.items():
            assert torch.equal(loaded["optim"]["state"][name][key], value), (name, key)
    full_path = tmp_path / "full.pth"
    torch.save(full["model"], full_path)
    assert cli("diff", folder, full_path).code == 0


def test_surgery_commands_take_dcp_folders(cli, tmp_path, two_ranks):
    folder, full = two_ranks
    keep = tmp_path / "k.safetensors"
    assert cli("filter", folder, "--keep", "0", "-o", keep).code == 0 and list(load_any(keep)) == ["0.weight"]
    dropped = tmp_path / "d.safetensors"
    assert cli("drop", folder, "cols", "-o", dropped).code == 0 and "cols.w" not in load_any(dropped)
    renamed = tmp_path / "r.safetensors"
    assert cli("rename", folder, "--add-prefix", "net", "-o", renamed).code == 0
    assert torch.equal(load_any(renamed)["net.0.weight"], full["model"]["0.weight"])
    template = tmp_path / "template.pth"
    torch.save({"module.0.weight": torch.zeros(7, 5), "new.bias": torch.ones(2)}, template)
    merged = tmp_path / "m.pth"
    report = cli("merge", folder, "--into", template, "-o", merged, "--json").json()
    assert report["renamed"] == {"0.weight": "module.0.weight"} and report["kept_from_template"] == ["new.bias"]
    assert torch.equal(load_any(merged)["module.0.weight"], full["model"]["0.weight"])
    into_dcp = tmp_path / "i.safetensors"
    assert cli("merge", template, "--into", folder, "-o", into_dcp).code == 0
    assert list(load_any(into_dcp)) == list(full["model"])


# ---- hostile or broken folders ------------------------------------------------------------------

@pytest.mark.parametrize("change, fragment", [
    (lambda m: setattr(dcp_storage(m, "model.emb.weight"), "relative_path", "../outside.distcp"), "not a file name"),
    (lambda m: setattr(dcp_storage(m, "model.emb.weight"), "relative_path", "__9_0.distcp"), "missing"),
    (lambda m: setattr(dcp_storage(m, "model.emb.weight"), "offset", 10**9), "outside"),
    (lambda m: setattr(dcp_storage(m, "model.emb.weight"), "transform_descriptors", ["zstd"]), "extensions"),
    (lambda m: m.storage_data.pop(next(k for k in m.storage_data if k.fqn == "model.ids")), "does not say where"),
    (lambda m: setattr(m.state_dict_metadata["model.emb.weight"], "size", torch.Size([5, 4])), "elements"),
    (lambda m: setattr(m.state_dict_metadata["model.emb.weight"].chunks[0], "sizes", torch.Size([9, 3])), "does not fit"),
])
def test_broken_metadata_is_one_line(cli, tmp_path, one_rank, change, fragment):
    folder, _ = one_rank
    rewrite_dcp_metadata(folder, change)
    for args in (("inspect", folder), ("convert", folder, "-o", tmp_path / "o.safetensors"),
                 ("diff", folder, folder)):
        assert_one_error_line(cli(*args), fragment, code=2 if args[0] == "diff" else 1)
    assert not (tmp_path / "o.safetensors").exists()


def test_a_chunk_that_disagrees_with_the_metadata_is_refused_when_its_bytes_are_read(cli, tmp_path, one_rank):
    """The metadata says float64 where the chunk's archive holds int64: inspect lists what the
    metadata says (it never opens chunk archives), and every command that reads the bytes refuses
    them in one line before using any."""
    folder, _ = one_rank
    rewrite_dcp_metadata(folder, lambda m: setattr(m.state_dict_metadata["model.ids"].properties, "dtype",
                                                   torch.float64))
    shapes = {t["name"]: (t["dtype"], t["shape"]) for t in cli("inspect", folder, "--json").json()["tensors"]}
    assert shapes["ids"] == ("float64", [4])
    for args in (("inspect", folder, "--stats"), ("inspect", folder, "--hash"),
                 ("convert", folder, "-o", tmp_path / "o.safetensors"), ("convert", folder, "-o", tmp_path / "o.pth"),
                 ("diff", folder, folder)):
        assert_one_error_line(cli(*args), "model.ids", "not the float64", code=2 if args[0] == "diff" else 1)
    assert not (tmp_path / "o.safetensors").exists() and not (tmp_path / "o.pth").exists()


def test_overlapping_chunks_fail_the_write(cli, tmp_path, two_ranks):
    folder, _ = two_ranks
    copy = tmp_path / "copy"
    subprocess.run(["cp", "-r", str(folder), str(copy)], check=True)

    def overlap(meta):  # the second chunk of 0.weight now starts where the first does
        chunk = meta.state_dict_metadata["model.0.weight"].chunks[1]
        old = chunk.offsets
        chunk.offsets = torch.Size([1, 0])
        chunk.sizes = torch.Size([3, 5])
        for key in list(meta.storage_data):
            if key.fqn == "model.0.weight" and tuple(key.offset) == tuple(old):
                value = meta.storage_data.pop(key)
                meta.storage_data[type(key)(key.fqn, torch.Size([1, 0]), key.index)] = value

    rewrite_dcp_metadata(copy, overlap)
    out = tmp_path / "o.safetensors"
    assert_one_error_line(cli("convert", copy, "-o", out), "0.weight", "overlap")
    assert not out.exists()


def test_metadata_payload_runs_under_torch_but_never_here(cli, tmp_path, one_rank):
    """torch's FileSystemReader.read_metadata is a plain pickle.load: a payload in .metadata runs.
    Here it is a placeholder, and the folder is refused with one line."""
    folder, _ = one_rank
    marker = tmp_path / "pwned"

    class Payload:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    meta = pickle.loads((folder / ".metadata").read_bytes())
    meta.planner_data = Payload()
    (folder / ".metadata").write_bytes(pickle.dumps(meta, protocol=4))
    for args in (("inspect", folder), ("convert", folder, "-o", tmp_path / "o.pth"), ("diff", folder, folder)):
        result = cli(*args)
        assert not marker.exists() and result.code in (1, 2), args
        assert_one_error_line(result, code=result.code)
    probe = ("import sys; from torch.distributed.checkpoint import FileSystemReader; "
             "FileSystemReader(sys.argv[1]).read_metadata()")
    subprocess.run([sys.executable, "-c", probe, str(folder)], capture_output=True, timeout=120)
    assert marker.exists()  # the payload is live: torch's own reader runs it


# ---- DCP out: --format dcp ---------------------------------------------------------------------

def _dcp_load(state: dict, folder) -> dict:
    import torch.distributed.checkpoint as dcp

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        dcp.load(state, checkpoint_id=str(folder))
    return state


def _tree(folder) -> dict:
    return {name: (folder / name).read_bytes() for name in sorted(os.listdir(folder))}


def test_pth_to_dcp_loads_in_torch_and_is_deterministic(cli, tmp_path, zip_pth, net):
    out = tmp_path / "ckpt"
    result = cli("convert", zip_pth, "-o", out, "--format", "dcp", "--json")
    assert result.code == 0, result.err
    assert result.json()["files"] == [str(out / "__0_0.distcp"), str(out / ".metadata")]
    target = {k: torch.zeros_like(v) for k, v in net.state_dict().items()}
    loaded = _dcp_load(target, out)
    assert all(torch.equal(loaded[k], v) for k, v in net.state_dict().items())
    first = _tree(out)
    assert cli("convert", zip_pth, "-o", out, "--format", "dcp").code == 1  # exists: --force
    assert cli("convert", zip_pth, "-o", out, "--format", "dcp", "--force").code == 0
    assert _tree(out) == first  # byte-identical, and nothing left beside it
    assert sorted(os.listdir(tmp_path)) == ["ckpt", "model.pth"]


def test_dcp_round_trip_keeps_torch_keys_and_optimizer(cli, tmp_path, two_ranks):
    """A folder of two FSDP2 ranks, rewritten by us: the keys, paths, sizes and dtypes torch
    wrote, and torch loads model, optimizer and step back into an unsharded model."""
    from torch import nn
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    folder, full = two_ranks
    out = tmp_path / "again"
    assert cli("convert", folder, "-o", out, "--format", "dcp").code == 0
    ours, theirs = (pickle.loads((f / ".metadata").read_bytes()) for f in (out, folder))
    assert ours.planner_data == theirs.planner_data
    for key, entry in theirs.state_dict_metadata.items():
        mine = ours.state_dict_metadata[key]
        assert type(mine) is type(entry) and getattr(mine, "size", None) == getattr(entry, "size", None), key
    torch.manual_seed(5)
    model = nn.Sequential(nn.Embedding(7, 5), nn.Linear(5, 3), nn.LayerNorm(3))
    opt = torch.optim.Adam(model.parameters())
    model(torch.tensor([[1, 2]])).sum().backward()
    opt.step()
    msd, osd = get_state_dict(model, opt)
    msd["cols.w"] = torch.zeros(4, 5, dtype=torch.bfloat16)
    state = _dcp_load({"model": msd, "optim": osd, "step": 0}, out)
    assert state["step"] == 3 and torch.equal(state["model"]["cols.w"], full["model"]["cols.w"])
    del state["model"]["cols.w"]
    set_state_dict(model, opt, model_state_dict=state["model"], optim_state_dict=state["optim"])
    assert all(torch.equal(model.state_dict()[k], v) for k, v in full["model"].items() if k != "cols.w")
    assert torch.equal(opt.state_dict()["state"][0]["exp_avg"], full["optim"]["state"]["0.weight"]["exp_avg"])


def test_dcp_output_shards_casts_and_dry_runs(cli, tmp_path, zip_pth, state_dict):
    out = tmp_path / "split"
    assert cli("convert", zip_pth, "-o", out, "--format", "dcp", "--max-shard-size", "100").code == 0
    assert len([n for n in os.listdir(out) if n.endswith(".distcp")]) > 2
    assert cli("diff", out, zip_pth).code == 0
    half = tmp_path / "half"
    report = cli("convert", zip_pth, "-o", half, "--format", "dcp", "--dtype", "bf16", "--json").json()
    assert report["kept_dtype"] == ["bn.num_batches_tracked"]
    meta = pickle.loads((half / ".metadata").read_bytes())
    assert meta.state_dict_metadata["conv.weight"].properties.dtype == torch.bfloat16
    assert meta.state_dict_metadata["bn.num_batches_tracked"].properties.dtype == torch.int64
    dry = tmp_path / "dry"
    assert cli("convert", zip_pth, "-o", dry, "--format", "dcp", "--dry-run").code == 0 and not dry.exists()


@pytest.mark.parametrize("args", [
    ["filter", "{src}", "--keep", "conv", "-o", "{out}"],
    ["drop", "{src}", "bn", "-o", "{out}"],
    ["rename", "{src}", "--add-prefix", "net", "-o", "{out}"],
    ["merge", "{src}", "--into", "{src}", "-o", "{out}"],
])
def test_every_writing_command_writes_dcp(cli, tmp_path, zip_pth, args):
    out = tmp_path / "out"
    result = cli(*[str(zip_pth) if a == "{src}" else str(out) if a == "{out}" else a for a in args], "--format", "dcp")
    assert result.code == 0, result.err
    assert cli("inspect", out, "--json").json()["format"] == "dcp"


def test_dcp_output_refuses_what_torch_would_run(cli, tmp_path, state_dict):
    """torch's DCP loader unpickles non-tensor values with weights_only=False: a placeholder
    (here argparse.Namespace, which weights_only=True refuses) must not become one."""
    import argparse

    src = tmp_path / "train.pth"
    torch.save({"state_dict": state_dict, "args": argparse.Namespace(lr=0.1)}, src)
    out = tmp_path / "out"
    assert_one_error_line(cli("convert", src, "-o", out, "--format", "dcp"), "argparse.Namespace", "run")
    assert sorted(os.listdir(tmp_path)) == ["train.pth"]  # no folder, no temporary left


def test_force_never_replaces_a_folder_of_other_files(cli, tmp_path, zip_pth):
    out = tmp_path / "photos"
    out.mkdir()
    (out / "cat.jpg").write_bytes(b"meow")
    assert_one_error_line(cli("convert", zip_pth, "-o", out, "--format", "dcp", "--force"), "not a DCP checkpoint")
    assert os.listdir(out) == ["cat.jpg"]


@pytest.mark.parametrize("extra, shown", [
    (["notes.txt", "logs/train.log"], "logs/, notes.txt"),
    (["data.distcp/keep.txt"], "data.distcp/"),  # a folder named like a data file is not one
    ([".metadata.bak"], ".metadata.bak"),
])
def test_force_never_deletes_files_beside_a_dcp_checkpoint(cli, tmp_path, zip_pth, extra, shown):
    """--force replaces a DCP folder that holds nothing but torch's own files (.metadata and
    *.distcp); one that holds a run's notes and logs beside them is refused in one line naming
    them (those files were once deleted, exit 0)."""
    out = _save_folder(tmp_path / "run-0001")
    for name in extra:
        (out / name).parent.mkdir(parents=True, exist_ok=True)
        (out / name).write_text("mine")
    before = sorted(str(p.relative_to(out)) for p in out.rglob("*"))
    result = cli("convert", zip_pth, "-o", out, "--format", "dcp", "--force")
    assert_one_error_line(result, str(out), "holds more than a DCP checkpoint", f"({shown})", "even with --force")
    assert sorted(str(p.relative_to(out)) for p in out.rglob("*")) == before
    assert all((out / name).read_text() == "mine" for name in extra)
    for name in extra:  # a folder of torch's own files alone is replaced
        (out / name).unlink()
        if (out / name).parent != out:
            (out / name).parent.rmdir()
    (out / "__3_0.distcp").write_bytes(b"an old rank's data")
    assert cli("convert", zip_pth, "-o", out, "--format", "dcp", "--force").code == 0
    assert sorted(os.listdir(out)) == [".metadata", "__0_0.distcp"]


def test_merge_methods_read_dcp_folders_chunk_by_chunk(cli, tmp_path, two_ranks):
    """FSDP's row chunks are read range by range, the column-sharded bf16 `cols.w` (put together
    in memory) once: the mean of the folder and its own full state dict is that state dict."""
    folder, full = two_ranks
    whole = tmp_path / "full.pth"
    torch.save(full["model"], whole)
    out = tmp_path / "mean.safetensors"
    report = cli("merge", folder, whole, "--method", "linear", "-o", out, "--json").json()
    assert report["merged"] == len(full["model"])
    got = load_any(out)
    assert got["cols.w"].dtype == torch.bfloat16
    assert all(torch.equal(got[k], v) for k, v in full["model"].items())


# ---- hostile folders: real `dcp.save` output, `.metadata` edited by plain pickle or hand-made bytes ----

CATCH_ALL = "CKPTSURGERY_DEBUG"


@pytest.fixture
def folder(tmp_path):
    """A one-process DCP folder: model.emb.weight (5, 3) float32, model.ids (4,) int64, step (bytes)."""
    return _save_folder(tmp_path / "ckpt")


def _save_folder(out):
    """The `folder` fixture's folder, saved by torch's own DCP writer at `out`."""
    import torch.distributed.checkpoint as dcp

    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        dcp.save({"model": {"emb.weight": torch.randn(5, 3), "ids": torch.arange(4)}, "step": 7},
                 checkpoint_id=str(out))
    return out


def _rekey(meta, fqn, offsets):
    """Move the storage record of fqn's (single) chunk to a MetadataIndex at `offsets`."""
    key = next(k for k in meta.storage_data if k.fqn == fqn)
    info = meta.storage_data.pop(key)
    meta.storage_data[MetadataIndex(fqn, offsets, 0)] = info
    return info


def _rename(meta, old: str, new: str) -> None:
    """Move `old`'s entry, storage records and planner path to the key `new` (path: (new,))."""
    meta.state_dict_metadata[new] = meta.state_dict_metadata.pop(old)
    for key in [k for k in meta.storage_data if k.fqn == old]:
        meta.storage_data[MetadataIndex(new, key.offset, key.index)] = meta.storage_data.pop(key)
    del meta.planner_data[old]
    meta.planner_data[new] = (new,)


def _saved(obj) -> bytes:
    buf = io.BytesIO()
    torch.save(obj, buf)
    return buf.getvalue()


def _run(*args, timeout=120, data_limit=None, nofile=None, env=None, cwd=ROOT):
    """`python -m ckptsurgery ARGS` in a child, optionally with a heap or file-descriptor limit.
    Returns (returncode, stdout, stderr) or None on timeout."""
    def limits():
        if data_limit:
            resource.setrlimit(resource.RLIMIT_DATA, (data_limit, data_limit))
        if nofile:
            resource.setrlimit(resource.RLIMIT_NOFILE, (nofile, nofile))
    try:
        r = subprocess.run([sys.executable, "-m", "ckptsurgery", *map(str, args)], capture_output=True, text=True,
                           timeout=timeout, preexec_fn=limits, env=env, cwd=cwd)
    except subprocess.TimeoutExpired:
        return None
    return r.returncode, r.stdout, r.stderr


def _run_torch(code: str, folders, cwd) -> list[str]:
    """Run `code` (torch's own loader on `path`) for each folder in turn, in one fresh interpreter
    (one torch import); return each folder's exception line ('' where it raised none)."""
    script = ("import sys, json\n"
              "out = []\n"
              "for path in json.loads(sys.argv[1]):\n"
              "    try:\n" + textwrap.indent(code, " " * 8) + "\n"
              "        out.append('')\n"
              "    except BaseException as e:\n"
              "        out.append(f'{type(e).__name__}: {e}'.splitlines()[0])\n"
              "print(json.dumps(out))\n")
    r = subprocess.run([sys.executable, "-c", script, json.dumps([str(f) for f in folders])], capture_output=True,
                       text=True, cwd=cwd, timeout=300)
    return json.loads(r.stdout.strip().splitlines()[-1])


def _assert_one_line(result, code=1):
    assert result is not None, "hangs (killed at the timeout)"
    rc, _, err = result
    assert rc == code, (rc, err[-500:])
    assert err.startswith("ckptsurgery: error: ") and err.count("\n") == 1, err[-1000:]
    assert CATCH_ALL not in err and "Traceback" not in err, err[-1000:]


MAXRSS_WRAPPER = textwrap.dedent("""
    import resource, sys
    from ckptsurgery.cli import main
    sys.argv = ["ckptsurgery", *sys.argv[2:]]
    try:
        main()
    finally:  # VmHWM, not ru_maxrss: Linux carries ru_maxrss over exec from the forking parent (pytest)
        with open("/proc/self/status") as status, open(OUT, "w") as f:
            f.write(next(line.split()[1] for line in status if line.startswith("VmHWM:")))
""")


def _peak_kib(tmp_path, *args) -> int:
    """Run ckptsurgery ARGS in a child and return its peak resident memory (KiB)."""
    out = tmp_path / "maxrss.txt"
    script = MAXRSS_WRAPPER.replace("OUT", repr(str(out)))
    subprocess.run([sys.executable, "-c", script, "x", *map(str, args)], capture_output=True, timeout=300, cwd=ROOT)
    return int(out.read_text())


# ---- a .pth output runs no more than torch's own DCP loader would -------------------------------

def test_pth_output_never_imports_a_chunk_subclass_torch_refuses(cli, tmp_path, folder):
    """torch loads tensor chunks with weights_only=True (a subclass refuses the load): the .pth output must not keep it, so an unsafe load of the output never imports it."""
    evil = tmp_path / "evil"
    evil.mkdir()
    (evil / "evilmod_r8.py").write_text(textwrap.dedent("""
        import os, torch
        if os.environ.get("R8_MARKER"):
            open(os.environ["R8_MARKER"], "w").write("imported")
        class Evil(torch.Tensor):
            pass
    """))
    sys.path.insert(0, str(evil))
    try:
        import evilmod_r8
        data = _saved(torch.arange(4).as_subclass(evilmod_r8.Evil))
    finally:
        sys.path.remove(str(evil))
        sys.modules.pop("evilmod_r8", None)
    (folder / "__9_0.distcp").write_bytes(data)

    def change(meta):
        key = next(k for k in meta.storage_data if k.fqn == "model.ids")
        meta.storage_data[key] = _StorageInfo("__9_0.distcp", 0, len(data))
    rewrite_dcp_metadata(folder, change)

    env = dict(os.environ, PYTHONPATH=str(evil))
    live = tmp_path / "live"
    subprocess.run([sys.executable, "-c", "import evilmod_r8"], env={**env, "R8_MARKER": str(live)}, check=True)
    assert live.exists()  # the module's import is a live payload
    by_torch = tmp_path / "by_torch"
    probe = ("import sys; from torch.distributed.checkpoint.format_utils import dcp_to_torch_save; "
             "dcp_to_torch_save(sys.argv[1], sys.argv[2])")
    r = subprocess.run([sys.executable, "-c", probe, str(folder), str(tmp_path / "t.pth")],
                       env={**env, "R8_MARKER": str(by_torch)}, capture_output=True, text=True, cwd=tmp_path)
    assert r.returncode != 0 and "weights_only" in r.stderr and not by_torch.exists()  # torch refuses the chunk

    out = tmp_path / "out.pth"
    result = cli("convert", folder, "-o", out)
    if result.code != 0:
        assert_one_error_line(result)
        return
    by_output = tmp_path / "by_output"
    subprocess.run([sys.executable, "-c", "import sys, torch; torch.load(sys.argv[1], weights_only=False)", str(out)],
                   env={**env, "R8_MARKER": str(by_output)}, capture_output=True, cwd=tmp_path)
    assert not by_output.exists(), "the .pth output imports a module that torch's DCP loader never imports"


def test_pth_output_never_reaches_a_payload_torchs_per_file_order_never_reaches(cli, tmp_path, folder):
    """torch reads DCP values grouped by data file, stopping at a failing import in __0_0 before a payload in __1_0: the .pth output must not run the payload first."""
    gone = tmp_path / "gone"
    gone.mkdir()
    (gone / "gonemod_r8.py").write_text("class Thing:\n    pass\n")
    marker = tmp_path / "pwned"

    class Payload:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    sys.path.insert(0, str(gone))
    try:
        import gonemod_r8
        failing = _saved(gonemod_r8.Thing())  # an import the loading machine cannot make
    finally:
        sys.path.remove(str(gone))
        sys.modules.pop("gonemod_r8", None)
    payload = _saved({"x": Payload()})
    (folder / "__1_0.distcp").write_bytes(payload)
    first = folder / "__0_0.distcp"
    at = first.stat().st_size
    with open(first, "ab") as f:
        f.write(failing)

    def change(meta):  # metadata order: ..., step (__0_0), b (__1_0), c (__0_0)
        for key, name, start, data in (("b", "__1_0.distcp", 0, payload), ("c", "__0_0.distcp", at, failing)):
            meta.state_dict_metadata[key] = BytesStorageMetadata()
            meta.planner_data[key] = (key,)
            meta.storage_data[MetadataIndex(key)] = _StorageInfo(name, start, len(data))
    rewrite_dcp_metadata(folder, change)

    probe = ("import sys; from torch.distributed.checkpoint.format_utils import dcp_to_torch_save; "
             "dcp_to_torch_save(sys.argv[1], sys.argv[2])")
    r = subprocess.run([sys.executable, "-c", probe, str(folder), str(tmp_path / "t.pth")],
                       capture_output=True, text=True, cwd=tmp_path)
    assert r.returncode != 0 and "gonemod_r8" in r.stderr and not marker.exists()  # torch stops at c, before b
    subprocess.run([sys.executable, "-c", "import io, sys, torch; torch.load(io.BytesIO(open(sys.argv[1], 'rb').read()),"
                    " weights_only=False)", str(folder / "__1_0.distcp")], capture_output=True, cwd=tmp_path)
    assert marker.exists()  # b's payload is live
    marker.unlink()

    out = tmp_path / "out.pth"
    result = cli("convert", folder, "-o", out)
    if result.code != 0:
        assert_one_error_line(result)
        return
    subprocess.run([sys.executable, "-c", "import sys, torch; torch.load(sys.argv[1], weights_only=False)", str(out)],
                   capture_output=True, cwd=tmp_path)
    assert not marker.exists(), "the .pth output runs a payload that torch's own load of the folder never reaches"


# ---- every placeholder torch's own reader would run is listed, wherever it sits --------------------

class Reduce:
    """Unpickles as func(*args); callable, so that one Reduce may stand as another's function."""

    def __init__(self, func, *args):
        self.func, self.args = func, args

    def __reduce__(self):
        return self.func, self.args

    def __call__(self, *args):
        raise AssertionError("never called while pickling")


def _payload(kind: str, marker):
    cmd = f"touch {marker}"
    return {
        "system": lambda: Reduce(os.system, cmd),
        "eval": lambda: Reduce(builtins.eval, f"__import__('os').system({cmd!r})"),
        "popen": lambda: Reduce(subprocess.Popen, ["touch", str(marker)]),
        "getattr_chain": lambda: Reduce(Reduce(builtins.getattr, Reduce(importlib.import_module, "os"), "system"), cmd),
    }[kind]()


INERT = {"system": {"posix.system"}, "eval": {"builtins.eval"}, "popen": {"subprocess.Popen"},
         "getattr_chain": {"builtins.getattr", "importlib.import_module"}}


def _hide(meta, place: str, payload) -> None:
    """Put `payload` in a field of .metadata that no reader needs to look at."""
    if place == "storage_meta":
        meta.storage_meta.modules = [payload]
    elif place == "metadata_attribute":
        meta.notes = payload
    elif place == "chunk_attribute":
        meta.state_dict_metadata["model.ids"].chunks[0].comment = payload
    else:  # the planner path of a key the folder does not hold
        meta.planner_data["unused"] = payload


def _fired(markers, timeout=10.0) -> list:
    """The markers that exist, after waiting up to `timeout` for all (Popen's child runs on its own)."""
    import time

    deadline = time.monotonic() + timeout
    while not all(m.exists() for m in markers) and time.monotonic() < deadline:
        time.sleep(0.05)
    return [m for m in markers if m.exists()]


PLACES = ["storage_meta", "metadata_attribute", "chunk_attribute", "unused_planner_path"]


def test_hidden_metadata_payloads_are_listed_and_never_run(cli, tmp_path, one_rank, two_ranks):
    """A payload anywhere in .metadata — in fields no reader needs, through a getattr/import_module
    chain — runs under torch's own FileSystemReader.read_metadata (a plain pickle.load); here
    inspect lists it as inert (it once said "inert": []), and nothing runs it. torch's own records
    (its dataclasses, layouts, memory formats, the checkpoint's path) are not payloads."""
    cases = []
    for number, (kind, place) in enumerate([(k, p) for k in INERT for p in PLACES][::3]):  # every kind, every place
        marker = tmp_path / f"MARK-{kind}-{place}"
        ckpt = _save_folder(tmp_path / f"f{number}")
        rewrite_dcp_metadata(ckpt, lambda meta, kind=kind, place=place, marker=marker:
                             _hide(meta, place, _payload(kind, marker)))
        cases.append((kind, ckpt, marker))
    assert {kind for kind, _, _ in cases} == set(INERT) and len(cases) == 6
    _run_torch("from torch.distributed.checkpoint import FileSystemReader\nFileSystemReader(path).read_metadata()",
               [c for _, c, _ in cases], tmp_path)
    markers = [m for _, _, m in cases]
    assert _fired(markers) == markers  # every payload is live: torch's own reader runs it
    for m in markers:
        m.unlink()
    for kind, ckpt, marker in cases:
        doc = cli("inspect", ckpt, "--json")
        assert doc.code == 0, doc.err
        assert INERT[kind] <= set(doc.json()["inert"]), (kind, doc.json()["inert"])
        assert "left inert (not run)" in cli("inspect", ckpt).err
        assert cli("convert", ckpt, "-o", tmp_path / "o.safetensors", "--force").code == 0
        assert cli("diff", ckpt, ckpt).code == 0
    assert not _fired(markers, timeout=0.5)
    for ckpt in (one_rank[0], two_ranks[0]):
        assert cli("inspect", ckpt, "--json").json()["inert"] == []


def _value_folder(tmp_path, name: str, data: bytes):
    """A folder whose value `extra` is the bytes `data` in a data file of their own."""
    ckpt = _save_folder(tmp_path / name)
    (ckpt / "__9_0.distcp").write_bytes(data)

    def change(meta):
        meta.state_dict_metadata["extra"] = BytesStorageMetadata()
        meta.planner_data["extra"] = ("extra",)
        meta.storage_data[MetadataIndex("extra")] = _StorageInfo("__9_0.distcp", 0, len(data))
    rewrite_dcp_metadata(ckpt, change)
    return ckpt


def test_values_torch_would_unpickle_are_listed_and_never_run(cli, tmp_path):
    """torch's DCP loader torch.loads a value's bytes with weights_only=False: a raw pickle, a
    legacy torch file, or a payload behind a first pickle that compares equal to torch's magic
    number (unittest.mock.ANY) all run under dcp_to_torch_save. Here each pickle torch would
    read is read by the restricted unpickler: listed as inert, never run (they once showed as
    opaque bytes and "inert": []); the legacy file's object is the value, as torch gives it."""
    import pickle as plain
    from unittest import mock

    def legacy(obj) -> bytes:
        buf = io.BytesIO()
        torch.save(obj, buf, _use_new_zipfile_serialization=False)
        return buf.getvalue()

    marks = {name: tmp_path / f"MARK-{name}" for name in ("raw", "legacy", "behind_magic")}
    folders = {
        "raw": _value_folder(tmp_path, "raw", plain.dumps(Reduce(os.system, f"touch {marks['raw']}"), protocol=4)),
        "legacy": _value_folder(tmp_path, "legacy", legacy(
            {"lr": 0.5, "t": torch.arange(3), "x": Reduce(os.system, f"touch {marks['legacy']}")})),
        "behind_magic": _value_folder(tmp_path, "behind_magic", b"".join(plain.dumps(x, protocol=2) for x in (
            mock.ANY, mock.ANY, Reduce(os.system, f"touch {marks['behind_magic']}")))),
    }
    errors = _run_torch("from torch.distributed.checkpoint.format_utils import dcp_to_torch_save\n"
                        "dcp_to_torch_save(path, path + '.pth')", list(folders.values()), tmp_path)
    assert _fired(list(marks.values())) == list(marks.values()), errors  # all live under torch's own loader
    for m in marks.values():
        m.unlink()
    for name, ckpt in folders.items():
        doc = cli("inspect", ckpt, "--json")
        assert doc.code == 0, doc.err
        assert "posix.system" in doc.json()["inert"], (name, doc.json()["inert"])
        for args in (("convert", ckpt, "-o", tmp_path / "o.pth", "--force"), ("diff", ckpt, ckpt),
                     ("convert", ckpt, "-o", tmp_path / "o.safetensors", "--force")):
            assert cli(*args).code == 0, (name, args)
    assert "unittest.mock._ANY" in cli("inspect", folders["behind_magic"], "--json").json()["inert"]
    assert cli("inspect", folders["legacy"], "--json").json()["extras"]["extra"] == "dict"
    out = tmp_path / "ours.pth"
    assert cli("convert", folders["legacy"], "-o", out).code == 0
    probe = "import sys, torch; e = torch.load(sys.argv[1], weights_only=False)['extra']; print(e['lr'], e['t'].tolist())"
    loaded = subprocess.run([sys.executable, "-c", probe, str(out)], capture_output=True, text=True, cwd=tmp_path)
    assert loaded.stdout.split() == ["0.5", "[0,", "1,", "2]"], loaded.stderr  # the object torch's loader gives
    assert marks["legacy"].exists()  # ... and the payload beside it, carried as the input holds it
    marks["legacy"].unlink()
    assert not _fired(list(marks.values()), timeout=0.5)


def test_a_value_pickle_beyond_the_restricted_unpickler_is_one_error_line(cli, tmp_path):
    """A value whose bytes are a pickle of opcodes the restricted unpickler does not read (protocol 0):
    torch would run it, so the folder is refused in one line, never shown as opaque bytes."""
    marker = tmp_path / "MARK"
    ckpt = _value_folder(tmp_path, "inst", b"(S'touch " + str(marker).encode() + b"'\nios\nsystem\n.")
    _run_torch("from torch.distributed.checkpoint.format_utils import dcp_to_torch_save\n"
               "dcp_to_torch_save(path, path + '.pth')", [ckpt], tmp_path)
    assert _fired([marker]) == [marker]
    marker.unlink()
    for args in (("inspect", ckpt), ("convert", ckpt, "-o", tmp_path / "o.pth")):
        assert_one_error_line(cli(*args), "extra", "unpickles unrestricted", "opcode")
    assert not marker.exists()


def test_a_huge_value_torch_cannot_load_is_never_held_in_memory(tmp_path):
    """A 100 MB value that begins with a small pickle (not torch's magic number), which torch's
    loader fails on: refused in one line, its bytes never copied into memory (past 64 MiB; they
    were held whole, as the value)."""
    ckpt = _save_folder(tmp_path / "huge")
    data = pickle.dumps(7, protocol=2)
    with open(ckpt / "__9_0.distcp", "wb") as f:
        f.write(data)
        f.truncate(100_000_000)

    def change(meta):
        meta.state_dict_metadata["extra"] = BytesStorageMetadata()
        meta.planner_data["extra"] = ("extra",)
        meta.storage_data[MetadataIndex("extra")] = _StorageInfo("__9_0.distcp", 0, 100_000_000)
    rewrite_dcp_metadata(ckpt, change)
    result = _run("inspect", ckpt, data_limit=1 << 30)
    _assert_one_line(result)
    assert "a value of 100000000 bytes" in result[2]


# ---- one error line, never the catch-all ---------------------------------------------------------

def test_a_negative_planner_list_index_is_one_error_line(cli, folder):
    """A planner path with a negative list index: one error line naming the planner path (IndexError once reached the catch-all)."""
    def change(meta):  # the key is what the path names, as torch checks
        _rename(meta, "model.ids", "lst.-1")
        meta.planner_data["lst.-1"] = ("lst", -1)
    rewrite_dcp_metadata(folder, change)
    assert_one_error_line(cli("inspect", folder), "planner path has a bad list index")


def _swap_paths(meta):
    planner = meta.planner_data
    planner["model.emb.weight"], planner["model.ids"] = planner["model.ids"], planner["model.emb.weight"]


def _rename_path(meta):
    meta.planner_data["model.ids"] = ("model", "idx")


def test_planner_paths_that_name_another_key_are_refused(cli, tmp_path):
    """A .metadata whose planner_data swaps two tensors' paths, or renames one, says two things
    about each key; torch's loader reads the data under the path's key and refuses both. Here
    each is one line naming the key (the values once came out under each other's names)."""
    folders = []
    for name, change in (("swapped", _swap_paths), ("renamed", _rename_path)):
        ckpt = _save_folder(tmp_path / name)
        rewrite_dcp_metadata(ckpt, change)
        folders.append(ckpt)
    errors = _run_torch("from torch.distributed.checkpoint.format_utils import dcp_to_torch_save\n"
                        "dcp_to_torch_save(path, path + '.pth')", folders, tmp_path)
    assert all(errors), errors  # torch refuses both
    for ckpt, (key, named) in zip(folders, [("model.emb.weight", "model.ids"), ("model.ids", "model.idx")]):
        for args in (("inspect", ckpt), ("convert", ckpt, "-o", tmp_path / "o.safetensors"),
                     ("convert", ckpt, "-o", tmp_path / "o", "--format", "dcp")):
            assert_one_error_line(cli(*args), f"{ckpt}: {key}: its planner path", repr(named), "contradicts itself")
        assert not (tmp_path / "o.safetensors").exists() and not (tmp_path / "o").exists()


def test_a_size_whose_element_count_has_thousands_of_digits_is_one_error_line(cli, folder):
    """A size whose element count has >4300 digits: one error line (formatting the message once raised ValueError, the catch-all)."""
    big = (2**2000,) * 8

    def change(meta):
        entry = meta.state_dict_metadata["model.ids"]
        entry.size = big
        entry.chunks[0].offsets, entry.chunks[0].sizes = (0,) * 8, big
        info = _rekey(meta, "model.ids", (0,) * 8)
        info.offset, info.length = info.offset + 1, info.length - 1  # raw bytes, not a zip: the length check runs
    rewrite_dcp_metadata(folder, change)
    assert_one_error_line(cli("inspect", folder))


def test_a_zero_element_shape_beyond_int64_is_refused_by_every_command(cli, tmp_path, folder):
    """A (0, 2**70) tensor from raw bytes is refused in one line by --stats and by both converts (unvalidated, it once crashed --stats and made files torch and safetensors cannot load)."""
    def change(meta):
        entry = meta.state_dict_metadata["model.ids"]
        entry.size = (0, 2**70)
        entry.chunks[0].offsets, entry.chunks[0].sizes = (0, 0), (0, 2**70)
        _rekey(meta, "model.ids", (0, 0)).length = 0
    rewrite_dcp_metadata(folder, change)
    assert_one_error_line(cli("inspect", folder, "--stats"))
    assert_one_error_line(cli("convert", folder, "-o", tmp_path / "o.safetensors"))
    assert_one_error_line(cli("convert", folder, "-o", tmp_path / "o.pth"))


def test_a_100_dimension_tensor_in_two_chunks_is_read_or_refused_in_one_line(cli, tmp_path, folder):
    """A 100-dimension tensor in two chunks: --stats, convert and diff read it or refuse it in one line (torch's 64-dim limit in assemble once raised RuntimeError, the catch-all)."""
    dims = 100
    tail = os.path.getsize(folder / "__0_0.distcp") - 16  # 16 raw bytes that are not a zip header

    def change(meta):
        entry = meta.state_dict_metadata["model.ids"]
        entry.size = torch.Size([4] + [1] * (dims - 1))
        entry.chunks = [ChunkStorageMetadata(torch.Size([2 * i] + [0] * (dims - 1)), torch.Size([2] + [1] * (dims - 1)))
                        for i in range(2)]
        for key in [k for k in meta.storage_data if k.fqn == "model.ids"]:
            del meta.storage_data[key]
        for i in range(2):
            meta.storage_data[MetadataIndex("model.ids", torch.Size([2 * i] + [0] * (dims - 1)), i)] = \
                _StorageInfo("__0_0.distcp", tail, 16)
    rewrite_dcp_metadata(folder, change)
    # split along the first dimension only, the chunks are now joined in place (no torch
    # indexing, no limit): read, or refused with one line — never the catch-all
    for args, failed in ((("inspect", folder, "--stats"), 1), (("convert", folder, "-o", tmp_path / "o.safetensors"), 1),
                         (("diff", folder, folder), 2)):
        result = cli(*args)
        if result.code != 0:
            assert_one_error_line(result, code=failed)


# ---- values ------------------------------------------------------------------------------------------

def test_a_zero_sized_single_chunk_keeps_the_recorded_shape(cli, tmp_path, folder):
    """size (0, 4) with one empty chunk of (0, 3): the tensor is (0, 4), as torch's own loader gives it, not the chunk's (0, 3)."""
    def change(meta):
        entry = meta.state_dict_metadata["model.ids"]
        entry.size = torch.Size([0, 4])
        entry.chunks[0].offsets, entry.chunks[0].sizes = torch.Size([0, 1]), torch.Size([0, 3])
        _rekey(meta, "model.ids", torch.Size([0, 1])).length = 0
    rewrite_dcp_metadata(folder, change)
    result = cli("inspect", folder, "--json")
    if result.code != 0:
        assert_one_error_line(result)
        return
    shapes = {t["name"]: t["shape"] for t in result.json()["tensors"]}
    assert shapes["ids"] == [0, 4], shapes


# ---- time, memory and file descriptors follow the real work ---------------------------------------

def test_many_huge_dimensions_are_refused_within_seconds(folder):
    """200,000 dimensions of 2**62 (a 3 MB .metadata): one error line within 20 s (the unbounded element-count products once took minutes)."""
    dims = 200_000
    big = torch.Size([2**62] * dims)

    def change(meta):
        entry = meta.state_dict_metadata["model.ids"]
        entry.size = big
        entry.chunks[0].offsets, entry.chunks[0].sizes = torch.Size([0] * dims), big
        info = _rekey(meta, "model.ids", torch.Size([0] * dims))
        info.offset, info.length = info.offset + 1, info.length - 1  # raw bytes: the length check runs
    rewrite_dcp_metadata(folder, change)
    _assert_one_line(_run("inspect", folder, timeout=20))


def test_repeated_tuple_keys_in_metadata_are_refused_within_seconds(folder):
    """A 500 KB .metadata that uses one 88,573-path tuple as a dict key 125,000 times: one error line within 20 s (rehashing it at each SETITEM once took minutes of CPU; the tuple-path cap bounds one hash, not their number)."""
    levels, pairs = 10, 125_000

    def tuples(i):  # t_i = (t_{i-1},) * 3, each memoized at index i
        if i == 0:
            return b")q\x00"
        get = b"h" + bytes([i - 1])
        return tuples(i - 1) + get + get + b"\x87q" + bytes([i])
    get = b"h" + bytes([levels])
    (folder / ".metadata").write_bytes(b"\x80\x04}" + tuples(levels) + get + b"s(" + get * (2 * pairs) + b"u.")
    _assert_one_line(_run("inspect", folder, timeout=20))


def test_huge_planner_list_indices_are_refused_without_allocating_them(folder):
    """1,000 keys with planner paths (kN, 1000000) in a 63 KB .metadata: one error line under a 2 GiB heap (1,000 lists of a million Nones, 8 GB, once ended in MemoryError, the catch-all)."""
    def change(meta):
        info = dcp_storage(meta, "step")
        for i in range(1000):
            key = f"k{i}.1000000"  # what the path names, as torch checks
            meta.state_dict_metadata[key] = BytesStorageMetadata()
            meta.storage_data[MetadataIndex(key)] = info
            meta.planner_data[key] = (f"k{i}", 1_000_000)
    rewrite_dcp_metadata(folder, change)
    _assert_one_line(_run("inspect", folder, data_limit=2 << 30, timeout=120))


def test_a_300000_step_planner_path_is_refused_within_seconds(tmp_path, folder):
    """A 300,000-step planner path (its key what the path names): one error line within 20 s from
    inspect and from a DCP write (a 200,000-step one once took 56 s to write, quadratic in the
    depth: each level copied its parent's path)."""
    path = ("a",) * 299_999 + ("step",)
    key = ".".join(path)

    def change(meta):
        _rename(meta, "step", key)
        meta.planner_data[key] = path
    rewrite_dcp_metadata(folder, change)
    for args in (("inspect", folder), ("convert", folder, "-o", tmp_path / "out", "--format", "dcp")):
        result = _run(*args, timeout=20)
        _assert_one_line(result)
        assert "300000 steps deep, more than the 200" in result[2] and len(result[2]) < 1000, result[2][:1000]
    assert not (tmp_path / "out").exists()


def test_dcp_writes_are_linear_in_depth_and_refuse_absurd_nesting(tmp_path):
    """Flattening for a DCP output builds each path once (linear), refuses a tree nested past
    what a reader takes back and one that holds the same containers within each other over and
    over (a 60-level DAG: 2**60 keys); a state dict nested 150 levels deep goes through."""
    import time

    from ckptsurgery.io import dcp as dcp_io

    deep = node = {}
    for _ in range(300_000):
        node["a"] = node = {}
    node["x"] = 1
    start = time.monotonic()
    with pytest.raises(CkptError, match="nests more than 200 levels deep"):
        dcp_io.flatten(deep)
    assert time.monotonic() - start < 5
    dag = {"x": 1}
    for _ in range(60):
        dag = {"a": dag, "b": dag}
    start = time.monotonic()
    with pytest.raises(CkptError, match="same containers inside each other"):
        dcp_io.flatten({"cfg": dag})
    assert time.monotonic() - start < 30
    ok = node = {}
    for _ in range(149):
        node["n"] = node = {}
    node["x"] = 1
    [(key, path, value)] = dcp_io.flatten({"cfg": ok})
    assert key == "cfg" + ".n" * 149 + ".x" and len(path) == 151 and value == 1


def test_a_dag_of_containers_is_refused_by_a_dcp_write_within_seconds(tmp_path):
    """A .pth whose extra entry holds one dict twice, by dicts each held twice, 60 levels deep:
    --format dcp refuses it in one line within 30 s (it once flattened forever)."""
    dag = {"x": 1}
    for _ in range(60):
        dag = {"a": dag, "b": dag}
    src = tmp_path / "dag.pth"
    torch.save({"model": {"w": torch.ones(2)}, "cfg": dag}, src)
    _assert_one_line(_run("convert", src, "-o", tmp_path / "out", "--format", "dcp", timeout=30))
    assert not (tmp_path / "out").exists()


def test_stride0_chunks_share_one_repeated_bytes_cap(tmp_path, folder):
    """20 chunks of one 1.5 KB stride-0 archive (a 4.8 GB tensor): --stats refuses it in one line under a 3 GiB heap (each chunk's archive once got its own 256 MiB allowance, and --stats died of MemoryError)."""
    n, chunks = 60_000_000, 20
    data = _saved(torch.zeros(1).expand(n))  # one stored element viewed 60 million times (240 MB)
    (folder / "__9_0.distcp").write_bytes(data)

    def change(meta):
        entry = meta.state_dict_metadata["model.emb.weight"]
        entry.size = torch.Size([chunks * n])
        entry.chunks = [ChunkStorageMetadata(torch.Size([i * n]), torch.Size([n])) for i in range(chunks)]
        for key in [k for k in meta.storage_data if k.fqn == "model.emb.weight"]:
            del meta.storage_data[key]
        info = _StorageInfo("__9_0.distcp", 0, len(data))
        for i in range(chunks):
            meta.storage_data[MetadataIndex("model.emb.weight", torch.Size([i * n]), i)] = info
    rewrite_dcp_metadata(folder, change)
    _assert_one_line(_run("inspect", folder, "--stats", data_limit=3 << 30, timeout=300))


def test_many_keys_naming_one_byte_range_stay_within_memory(tmp_path, folder):
    """250 BytesStorage keys naming one 4 MB archive: inspect peaks under 512 MiB (loading 250 copies of its string once took over 1 GB)."""
    data = _saved("x" * 4_000_000)
    (folder / "__9_0.distcp").write_bytes(data)

    def change(meta):
        info = _StorageInfo("__9_0.distcp", 0, len(data))
        for i in range(250):
            key = f"v{i}"
            meta.state_dict_metadata[key] = BytesStorageMetadata()
            meta.storage_data[MetadataIndex(key)] = info
            meta.planner_data[key] = ("extra", key)
    rewrite_dcp_metadata(folder, change)
    peak = _peak_kib(tmp_path, "inspect", folder)
    assert peak < 512 * 1024, f"peak memory {peak >> 10} MiB for a {len(data) / 1e6:.0f} MB folder"


def test_a_six_hundred_rank_folder_reads_under_1024_file_descriptors(tmp_path, folder):
    """A folder from 600 ranks (600 .distcp files) reads under the usual 1024 open-file limit (every data file once stayed open and mapped, two descriptors each)."""
    ids = _saved(torch.arange(4))

    def change(meta):
        props = meta.state_dict_metadata["model.ids"].properties
        for rank in range(1, 600):
            name = f"__{rank}_0.distcp"
            (folder / name).write_bytes(ids)
            key = f"model.t{rank}"
            meta.state_dict_metadata[key] = TensorStorageMetadata(
                props, torch.Size([4]), [ChunkStorageMetadata(torch.Size([0]), torch.Size([4]))])
            meta.storage_data[MetadataIndex(key, torch.Size([0]), 0)] = _StorageInfo(name, 0, len(ids))
            meta.planner_data[key] = ("model", f"t{rank}")
    rewrite_dcp_metadata(folder, change)
    result = _run("inspect", folder, nofile=1024)
    assert result is not None and result[0] == 0, result and result[2][-300:]
