"""torch.distributed.checkpoint folders as inputs: written by torch itself, from one process and
from two (gloo on 127.0.0.1, FSDP2 `fully_shard` and a DTensor sharded on dimension 1), read
without torch's loader and checked against the full tensors the ranks gathered themselves."""

from __future__ import annotations

import os
import pickle
import subprocess
import sys
import textwrap
import warnings

import pytest
import torch

from conftest import assert_one_error_line, dcp_storage, load_any, rewrite_dcp_metadata, run_two_ranks

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
    (lambda m: setattr(m.state_dict_metadata["model.ids"].properties, "dtype", torch.float64), "not the float64"),
])
def test_broken_metadata_is_one_line(cli, tmp_path, one_rank, change, fragment):
    folder, _ = one_rank
    rewrite_dcp_metadata(folder, change)
    for args in (("inspect", folder), ("convert", folder, "-o", tmp_path / "o.safetensors"),
                 ("diff", folder, folder)):
        assert_one_error_line(cli(*args), fragment, code=2 if args[0] == "diff" else 1)
    assert not (tmp_path / "o.safetensors").exists()


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
