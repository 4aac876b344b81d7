"""Paths a checkpoint or a user hands us: shard names in an index, inputs that are not regular
files, outputs that are symlinks, temporary files, what --force removes, and outputs in folders
that do not exist yet (made, and removed again on failure) or named as folders (`-o DIR/`)."""

import json
import os
import signal
import struct
from contextlib import contextmanager

import pytest
import torch
from torch import nn

from conftest import assert_same_tensors, load_any


def assert_error(result, path, text: str):
    """Exit 1 and one known line on stderr naming `path`, never the catch-all."""
    lines = result.err.strip().splitlines()
    assert result.code == 1 and len(lines) == 1, result.err
    assert lines[0].startswith("ckptsurgery: error: ") and "CKPTSURGERY_DEBUG" not in lines[0], lines[0]
    assert str(path) in lines[0] and text in lines[0], lines[0]


class Hung(BaseException):
    """Not an Exception: main() must not turn it into an error line and hide the hang."""


@contextmanager
def no_hang(seconds: int = 10):
    def expire(signum, frame):
        raise Hung(f"still running after {seconds} s")

    previous = signal.signal(signal.SIGALRM, expire)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


def st_metadata(path) -> dict:
    with open(path, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        return json.loads(f.read(n))["__metadata__"]


def write_index(folder, weight_map: dict, name="model.safetensors.index.json", metadata=None):
    path = folder / name
    path.write_text(json.dumps({"metadata": metadata or {}, "weight_map": weight_map}))
    return path


@pytest.fixture
def shards(tmp_path, state_dict):
    """A sharded safetensors checkpoint in tmp_path/ckpt, two shards; returns (folder, index)."""
    from safetensors.torch import save_file

    folder = tmp_path / "ckpt"
    folder.mkdir()
    names = list(state_dict)
    parts = {"a.safetensors": names[: len(names) // 2], "b.safetensors": names[len(names) // 2 :]}
    for shard, keys in parts.items():
        save_file({k: state_dict[k] for k in keys}, str(folder / shard))
    index = write_index(folder, {k: shard for shard, keys in parts.items() for k in keys})
    return folder, index


# ---- 1. shard names, shard files, inputs -------------------------------------------------------

@pytest.mark.parametrize("bad", [".", "..", "", "/etc/passwd", "sub/a.safetensors", "sub\\a.safetensors", "a\0b"])
def test_index_names_plain_files_beside_it_only(cli, tmp_path, shards, bad):
    folder, index = shards
    torch.save({"w": torch.ones(2)}, tmp_path / "parent.pth")  # what ".." would have read
    doc = json.loads(index.read_text())
    doc["weight_map"] = {"w": bad}
    index.write_text(json.dumps(doc))
    with no_hang():
        for args in (["inspect", index], ["convert", folder, "-o", tmp_path / "o.safetensors"]):
            assert_error(cli(*args), index, "not a plain file name beside the index")
    assert not (tmp_path / "o.safetensors").exists()


def test_symlinked_shards_are_followed(cli, tmp_path, state_dict):
    """The Hugging Face cache: snapshots/REV/ holds symlinks into blobs/ named by hash."""
    from safetensors.torch import save_file

    blobs, snapshot = tmp_path / "blobs", tmp_path / "snapshots" / "rev"
    blobs.mkdir()
    snapshot.mkdir(parents=True)
    names = list(state_dict)
    save_file({k: state_dict[k] for k in names[:3]}, str(blobs / "1f2e"))
    save_file({k: state_dict[k] for k in names[3:]}, str(blobs / "9a8b"))
    write_index(blobs, {k: ("m-1.safetensors" if i < 3 else "m-2.safetensors") for i, k in enumerate(names)},
                        name="77cc")
    for link, blob in (("m-1.safetensors", "1f2e"), ("m-2.safetensors", "9a8b"), ("m.safetensors.index.json", "77cc")):
        os.symlink(os.path.join("..", "..", "blobs", blob), snapshot / link)
    out = tmp_path / "one.safetensors"
    assert cli("convert", snapshot, "-o", out).code == 0
    assert_same_tensors(dict(state_dict), load_any(out))


@pytest.mark.parametrize("kind", ["fifo", "folder", "index", "itself"])
def test_shard_must_be_a_checkpoint_file(cli, tmp_path, shards, kind):
    folder, index = shards
    doc = json.loads(index.read_text())
    first = next(iter(doc["weight_map"]))
    if kind == "fifo":
        os.mkfifo(folder / "x.safetensors")
        name, expect = "x.safetensors", "not a regular file"
    elif kind == "folder":
        (folder / "x.safetensors").mkdir()
        name, expect = "x.safetensors", "is a folder"
    elif kind == "index":
        write_index(folder, {first: "a.safetensors"}, name="x.json")
        name, expect = "x.json", "is a shard index"
    else:
        name, expect = index.name, "the index itself"
    doc["weight_map"][first] = name
    index.write_text(json.dumps(doc))
    with no_hang():
        result = cli("inspect", index)
    assert_error(result, folder / name if kind != "itself" else index, expect)


@pytest.mark.parametrize("kind", ["fifo", "device"])
def test_input_that_is_not_a_regular_file(cli, tmp_path, kind):
    if kind == "fifo":
        path = tmp_path / "model.pth"
        os.mkfifo(path)
    else:
        path = os.devnull
    with no_hang():
        assert_error(cli("inspect", path), path, "not a regular file")
        assert_error(cli("convert", path, "-o", tmp_path / "o.safetensors"), path, "not a regular file")


def test_index_nested_too_deeply_or_too_large(cli, tmp_path):
    deep = tmp_path / "deep.index.json"
    deep.write_text('{"weight_map": ' + "[" * 100_000 + "]" * 100_000 + "}")
    assert_error(cli("inspect", deep), deep, "nested too deeply")
    huge = tmp_path / "huge.index.json"
    huge.write_text('{"weight_map": {}, "pad": "' + "x" * (17 * 2**20) + '"}')
    assert_error(cli("inspect", huge), huge, "larger than 16 MiB")


def test_inert_names_of_every_bin_shard_are_listed(cli, tmp_path):
    """Each shard a whole pickled module: the classes stay inert, and the index lists them all."""
    torch.save(nn.Linear(2, 2), tmp_path / "s1.bin")
    torch.save(nn.Sequential(nn.Identity(), nn.Conv1d(1, 1, 1)), tmp_path / "s2.bin")
    index = write_index(tmp_path, {"weight": "s1.bin", "bias": "s1.bin", "1.weight": "s2.bin", "1.bias": "s2.bin"},
                        name="m.bin.index.json")
    shard_inert = [cli("inspect", tmp_path / s, "--json").json()["inert"] for s in ("s1.bin", "s2.bin")]
    doc = cli("inspect", index, "--json").json()
    assert doc["inert"] == sorted(set(shard_inert[0]) | set(shard_inert[1]))
    assert "torch.nn.modules.linear.Linear" in doc["inert"] and "torch.nn.modules.conv.Conv1d" in doc["inert"]


# ---- 2. the index's metadata ----------------------------------------------------------------------

def test_index_total_size_is_not_carried_into_the_output(cli, tmp_path, shards):
    folder, index = shards
    doc = json.loads(index.read_text())
    doc["metadata"] = {"total_size": 123, "note": "kept"}
    index.write_text(json.dumps(doc))
    out = tmp_path / "one.safetensors"
    assert cli("convert", index, "-o", out).code == 0
    assert st_metadata(out) == {"format": "pt", "note": "kept"}


# ---- 3. no tensors, sharded ---------------------------------------------------------------------

@pytest.mark.parametrize("source", ["empty.pth", "empty.safetensors"])
@pytest.mark.parametrize("suffix", [".safetensors", ".pth"])
def test_empty_checkpoint_with_max_shard_size(cli, tmp_path, source, suffix):
    from safetensors.torch import save_file

    src = tmp_path / source
    torch.save({}, src) if source.endswith(".pth") else save_file({}, str(src))
    out = tmp_path / "out" / f"e{suffix}"
    out.parent.mkdir()
    result = cli("convert", src, "-o", out, "--max-shard-size", "1KB", "--json")
    assert result.code == 0, result.err
    assert result.json()["files"] == [str(out)] and os.listdir(out.parent) == [out.name]
    assert dict(load_any(out)) == {}


# ---- 4. what --force removes --------------------------------------------------------------------

def test_force_with_other_shard_count_removes_the_old_shards(cli, tmp_path, zip_pth):
    out = tmp_path / "out" / "model.safetensors"
    out.parent.mkdir()
    bystanders = {"notes.txt": b"mine", "model-99999-of-99999.safetensors": b"not named by the index"}
    for name, data in bystanders.items():
        (out.parent / name).write_bytes(data)
    first = cli("convert", zip_pth, "-o", out, "--max-shard-size", "200B", "--json").json()
    second = cli("convert", zip_pth, "-o", out, "--max-shard-size", "400B", "--force", "--json").json()
    assert first["shards"] != second["shards"]
    new = sorted(os.path.basename(f) for f in second["files"])
    assert sorted(os.listdir(out.parent)) == sorted(new + list(bystanders))
    assert sorted(second["removed"]) == sorted(set(first["files"]) - set(second["files"]))
    for name, data in bystanders.items():
        assert (out.parent / name).read_bytes() == data
    assert cli("convert", out.parent, "-o", tmp_path / "one.pth").code == 0  # the folder has one index
    assert_same_tensors(torch.load(zip_pth, weights_only=True), load_any(tmp_path / "one.pth"))


def test_force_removes_only_checkpoints_the_old_index_names_beside_it(cli, tmp_path, zip_pth):
    out = tmp_path / "out" / "model.safetensors"
    out.parent.mkdir()
    torch.save({"w": torch.ones(1)}, tmp_path / "victim.pth")
    (out.parent / "README.md").write_text("not a checkpoint")
    torch.save({"w": torch.ones(1)}, out.parent / "old-shard.pth")
    write_index(out.parent, {"a": "../victim.pth", "b": "README.md", "c": "old-shard.pth", "d": "/etc/hostname"})
    assert cli("convert", zip_pth, "-o", out, "--max-shard-size", "200B").code == 1  # the index exists
    result = cli("convert", zip_pth, "-o", out, "--max-shard-size", "200B", "--force", "--json")
    assert result.code == 0, result.err
    assert result.json()["removed"] == [str(out.parent / "old-shard.pth")]
    assert not (out.parent / "old-shard.pth").exists()
    assert (out.parent / "README.md").exists() and (tmp_path / "victim.pth").exists()


def test_single_file_replacing_a_sharded_output(cli, tmp_path, zip_pth):
    out = tmp_path / "out" / "model.safetensors"
    out.parent.mkdir()
    (out.parent / "keep.txt").write_text("mine")
    assert cli("convert", zip_pth, "-o", out, "--max-shard-size", "200B").code == 0
    before = sorted(os.listdir(out.parent))
    index = out.parent / "model.safetensors.index.json"
    assert_error(cli("convert", zip_pth, "-o", out), index, "pass --force")
    assert sorted(os.listdir(out.parent)) == before
    dry = cli("convert", zip_pth, "-o", out, "--force", "--dry-run")
    assert dry.code == 0 and "would remove" in dry.out and sorted(os.listdir(out.parent)) == before
    assert cli("convert", zip_pth, "-o", out, "--force").code == 0
    assert sorted(os.listdir(out.parent)) == ["keep.txt", "model.safetensors"]
    assert_same_tensors(torch.load(zip_pth, weights_only=True), load_any(out))


def test_old_shards_are_removed_only_after_the_commit(cli, tmp_path, zip_pth, monkeypatch):
    import ckptsurgery.io.write as write

    out = tmp_path / "out" / "model.safetensors"
    out.parent.mkdir()
    assert cli("convert", zip_pth, "-o", out, "--max-shard-size", "200B").code == 0
    before = {n: (out.parent / n).read_bytes() for n in os.listdir(out.parent)}

    def fail(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(write, "_copy_range", fail)
    monkeypatch.setattr(write, "SMALL_COPY", 0)  # every tensor copied by the kernel, even small ones
    result = cli("convert", zip_pth, "-o", out, "--force")  # would replace the set by one file
    assert result.code == 1 and "No space left" in result.err
    assert {n: (out.parent / n).read_bytes() for n in os.listdir(out.parent)} == before


# ---- 5. temporary files and symlinked outputs -----------------------------------------------------

def test_planted_symlink_at_the_old_temp_name_is_not_followed(cli, tmp_path, zip_pth):
    victim = tmp_path / "victim.txt"
    victim.write_text("precious")
    out = tmp_path / "o.pth"
    os.symlink(victim, tmp_path / f".o.pth.{os.getpid()}.ckptsurgery-tmp")  # the old, predictable name
    assert cli("convert", zip_pth, "-o", out).code == 0
    assert victim.read_text() == "precious"
    assert not out.is_symlink()
    assert_same_tensors(torch.load(zip_pth, weights_only=True), load_any(out))


def test_temp_file_is_hidden_unpredictable_and_exclusive(tmp_path, monkeypatch):
    from ckptsurgery.errors import CkptError
    from ckptsurgery.io.write import StagedOutputs

    out = tmp_path / "o.pth"
    seen = []
    with StagedOutputs() as outputs:
        for _ in range(2):
            with outputs.stage(str(out)) as f:
                f.write(b"x")
                seen += [n for n in os.listdir(tmp_path) if n not in seen]
    assert len(set(seen)) == 2
    assert all(n.startswith(".o.pth.") and n.endswith(".ckptsurgery-tmp") for n in seen)
    assert os.listdir(tmp_path) == ["o.pth"]
    # a name taken already (here: a planted symlink) is refused, not followed nor removed
    victim = tmp_path / "victim.txt"
    victim.write_text("precious")
    monkeypatch.setattr(os, "urandom", lambda n: bytes(n))  # the staging name's 16 hex digits: all 0
    planted = tmp_path / f".o.pth.{'0' * 16}.ckptsurgery-tmp"
    os.symlink(victim, planted)
    with pytest.raises(CkptError, match="cannot write"):
        with StagedOutputs() as outputs:
            with outputs.stage(str(out)) as f:
                f.write(b"y")
    assert victim.read_text() == "precious" and planted.is_symlink() and out.read_bytes() == b"x"


def test_dangling_symlink_output(cli, tmp_path, zip_pth):
    target = tmp_path / "elsewhere" / "target.safetensors"
    target.parent.mkdir()
    out = tmp_path / "o.safetensors"
    os.symlink(target, out)
    assert_error(cli("convert", zip_pth, "-o", out), out, "already exists; pass --force")
    assert out.is_symlink() and not target.exists()
    assert cli("convert", zip_pth, "-o", out, "--force").code == 0
    assert not out.is_symlink() and not target.exists()  # the link is replaced, not followed
    assert_same_tensors(torch.load(zip_pth, weights_only=True), load_any(out))


def test_force_over_a_symlink_replaces_the_link_not_its_target(cli, tmp_path, zip_pth):
    target = tmp_path / "target.pth"
    target.write_bytes(b"someone else's file")
    out = tmp_path / "o.pth"
    os.symlink(target, out)
    assert cli("convert", zip_pth, "-o", out, "--force").code == 0
    assert target.read_bytes() == b"someone else's file" and not out.is_symlink()


def test_rename_map_must_be_a_regular_file(cli, tmp_path, zip_pth):
    """`--map FIFO` would block on the read."""
    fifo = tmp_path / "map.fifo"
    os.mkfifo(fifo)
    result = cli("rename", zip_pth, "-o", tmp_path / "r.pth", "--map", fifo)
    assert result.code == 1 and "not a regular file" in result.err


# ---- output folders: made as save_pretrained makes them, gone again if the write fails -------------

@pytest.mark.parametrize("args, files", [
    (["-o", "out/sub/model.safetensors", "--max-shard-size", "20B"],
     ["model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors", "model.safetensors.index.json"]),
    (["-o", "out/sub/"], ["model.safetensors"]),
    (["-o", "out/sub/", "--max-shard-size", "20B"],
     ["model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors", "model.safetensors.index.json"]),
    (["-o", "out/sub/", "--format", "dcp"], [".metadata", "__0_0.distcp"]),
])
def test_an_output_in_folders_that_do_not_exist_makes_them(cli, tmp_path, flat, monkeypatch, args, files):
    """-o out/model.safetensors with out/ missing writes it (the README's own example failed); a
    trailing / names a folder output: DIR/model.safetensors, or DIR itself for --format dcp."""
    monkeypatch.chdir(tmp_path)
    result = cli("convert", flat, *args)
    assert result.code == 0, result.err
    assert sorted(os.listdir(tmp_path / "out" / "sub")) == files
    assert cli("diff", flat, tmp_path / "out" / "sub").code == 0  # the folder reads back as the input


def test_a_failed_write_removes_the_folders_it_made(cli, tmp_path, flat, monkeypatch):
    import ckptsurgery.io.write as write

    def fail(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(write, "_copy_range", fail)
    monkeypatch.setattr(write, "SMALL_COPY", 0)  # every tensor copied by the kernel: the failure is reached
    (tmp_path / "kept").mkdir()
    result = cli("convert", flat, "-o", tmp_path / "kept" / "new" / "deeper" / "m.safetensors")
    assert result.code == 1 and "No space left" in result.err, result.err
    assert os.listdir(tmp_path / "kept") == []


def test_dry_run_makes_no_folder_and_a_file_in_the_way_is_refused(cli, tmp_path, flat):
    assert cli("convert", flat, "-o", tmp_path / "a" / "b.safetensors", "--dry-run").code == 0
    assert not (tmp_path / "a").exists()
    (tmp_path / "file").write_text("not a folder")
    assert_error(cli("convert", flat, "-o", tmp_path / "file" / "b.safetensors"), tmp_path / "file",
                 "is not a folder")
