"""Parallel writing: `--jobs N` shards written by threads, and the same command under torchrun
with the shards split between ranks. Both must write exactly what one process writes; and
under injected faults (a rank that fails or is lost, a slow removal, a rename that fails
mid-commit) nothing is left staged, an older output stays whole and every message is true."""

from __future__ import annotations

import errno
import json
import os
import random
import textwrap
import threading
import time
from collections import OrderedDict

import pytest
import torch

from ckptsurgery.io import model
from ckptsurgery.io.model import MappedFile
from conftest import ROOT, assert_one_error_line, assert_same_tensors, load_any, run_ranks


# ---- the descriptor table under threads --------------------------------------------------------

def test_a_descriptor_in_use_is_never_closed_by_another_thread(tmp_path, monkeypatch):
    """Ten files, room for two descriptors, eight threads reading through them: each read must
    get its own file's bytes (a descriptor closed under a thread gives EBADF, or, its number
    reused, another file's bytes)."""
    monkeypatch.setattr(model, "MAX_OPEN_FILES", 2)
    rng = random.Random(0)
    files = []
    for i in range(10):
        data = rng.randbytes(1 << 16)
        (tmp_path / f"f{i}").write_bytes(data)
        files.append((MappedFile(str(tmp_path / f"f{i}")), data))
    failures = []

    def read(seed: int) -> None:
        pick = random.Random(seed)
        try:
            for _ in range(400):
                mapped, data = pick.choice(files)
                with mapped.descriptor() as fd:
                    start = pick.randrange(len(data) - 64)
                    os.sched_yield()  # let the others open and close files meanwhile
                    if os.pread(fd, 64, start) != data[start : start + 64]:
                        failures.append(f"wrong bytes from {mapped.path}")
        except OSError as e:
            failures.append(repr(e))

    threads = [threading.Thread(target=read, args=(seed,)) for seed in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert failures == []
    assert len(model._open_files) <= 2  # once nobody uses them, the table shrinks back to its limit
    for mapped, _ in files:
        mapped.close()
    assert model._open_files == {}


# ---- --jobs: shards written at once ------------------------------------------------------------

@pytest.fixture
def many_tensors(tmp_path):
    """A training checkpoint of 14 small tensors in several dtypes, a tied pair and a transposed
    view: `--max-shard-size 1KB` makes about ten shards of it."""
    torch.manual_seed(0)
    sd = OrderedDict()
    for i in range(10):
        sd[f"blocks.{i}.weight"] = torch.randn(8, 8 + i).to(torch.bfloat16 if i % 3 == 0 else torch.float32)
    sd["embed.weight"] = torch.randn(12, 6)
    sd["head.weight"] = sd["embed.weight"]  # tied
    sd["ids"] = torch.arange(20)
    sd["transposed"] = torch.randn(6, 5).t()
    path = tmp_path / "train.pth"
    torch.save({"state_dict": sd, "epoch": 3}, path)
    return path


def contents(path) -> dict[str, bytes]:
    """Every file an output is made of (a file, its shards and index, or a DCP folder), by name."""
    path = str(path)
    if os.path.isdir(path):
        return {name: open(os.path.join(path, name), "rb").read() for name in sorted(os.listdir(path))}
    folder, name = os.path.split(path)
    stem = os.path.splitext(name)[0]
    return {n: open(os.path.join(folder, n), "rb").read() for n in sorted(os.listdir(folder))
            if n == name or n.startswith(stem + "-") or n == name + ".index.json"}


OUTPUTS = [("model.safetensors", []), ("model.pth", []), ("dcp", ["--format", "dcp"])]


@pytest.mark.parametrize("name, extra", OUTPUTS, ids=["safetensors", "pth", "dcp"])
def test_jobs_write_exactly_what_one_job_writes(cli, tmp_path, many_tensors, name, extra):
    outputs = {}
    for jobs in (1, 2, 3):
        out = tmp_path / f"j{jobs}" / name
        out.parent.mkdir()
        result = cli("convert", many_tensors, "-o", out, "--max-shard-size", "1KB", "--jobs", jobs, *extra, "--json")
        assert result.code == 0, result.err
        assert len(result.json()["files"]) > 5
        outputs[jobs] = contents(out)
        assert not [n for n in os.listdir(out.parent) if n.endswith(".ckptsurgery-tmp")]
    assert len(outputs[1]) > 5
    assert outputs[2] == outputs[1] and outputs[3] == outputs[1]
    if name == "model.safetensors":
        assert_same_tensors(load_sharded(tmp_path / "j3" / name), load_sharded(tmp_path / "j1" / name))


def load_sharded(out) -> dict:
    """What transformers' loader would read: every shard the index names, in the index's order."""
    index = json.loads((out.parent / (out.name + ".index.json")).read_text())
    tensors = {}
    for shard in dict.fromkeys(index["weight_map"].values()):
        tensors.update(load_any(out.parent / shard))
    return {name: tensors[name] for name in index["weight_map"] if name in tensors}


def test_jobs_share_a_small_descriptor_table(cli, tmp_path, many_tensors, monkeypatch):
    """Twelve input shards, room for two descriptors, four writer threads copying from them; each
    copy waits a moment after it got its descriptor, so that the others open and close meanwhile."""
    source = tmp_path / "in" / "model.safetensors"
    source.parent.mkdir()
    assert cli("convert", many_tensors, "-o", source, "--max-shard-size", "100B").code == 0
    assert len(os.listdir(source.parent)) >= 12
    monkeypatch.setattr(model, "MAX_OPEN_FILES", 2)
    copy = os.copy_file_range

    def slow_copy(*args):
        time.sleep(0.002)
        return copy(*args)

    monkeypatch.setattr(os, "copy_file_range", slow_copy)
    for jobs in (1, 4):
        out = tmp_path / f"j{jobs}" / "model.safetensors"
        out.parent.mkdir()
        assert cli("convert", source.parent, "-o", out, "--max-shard-size", "1KB", "--jobs", jobs).code == 0
    assert contents(tmp_path / "j4" / "model.safetensors") == contents(tmp_path / "j1" / "model.safetensors")


@pytest.mark.parametrize("args, message", [
    (["--jobs", "0", "--max-shard-size", "1KB"], "--jobs"),
    (["--jobs", "-2", "--max-shard-size", "1KB"], "--jobs"),
    (["--jobs", "2"], "--jobs applies to sharded outputs only"),
    (["--jobs", "2", "--format", "dcp"], "--jobs applies to sharded outputs only"),
])
def test_jobs_that_do_not_apply_exit_2(cli, tmp_path, many_tensors, args, message):
    out = tmp_path / "out" / "model.safetensors"
    out.parent.mkdir()
    result = cli("convert", many_tensors, "-o", out, *args)
    assert result.code == 2 and message in result.err, result.err
    assert os.listdir(out.parent) == []


def test_jobs_in_the_library_are_checked_too(tmp_path, many_tensors):
    from ckptsurgery.errors import UsageError
    from ckptsurgery.ops import WriteOptions, convert_checkpoint

    for jobs in (0, -1, 1.5, "2"):
        with pytest.raises(UsageError, match="--jobs"):
            convert_checkpoint(str(many_tensors), WriteOptions(str(tmp_path / "o.safetensors"), max_shard_size="1KB",
                                                               jobs=jobs))
    assert os.listdir(tmp_path) == ["train.pth"]


def handmade_dcp(folder, names: list[str], bad: str):
    """A DCP folder of [4, 5] float32 tensors (tensor i full of i), each one chunk of raw bytes —
    but `bad` in two chunks that overlap by a row and miss the last: a corrupt input that only
    the writer of that tensor finds out about (chunks are put together when written)."""
    import pickle

    from torch.distributed.checkpoint.filesystem import _StorageInfo
    from torch.distributed.checkpoint.metadata import (
        ChunkStorageMetadata, Metadata, MetadataIndex, StorageMeta, TensorProperties, TensorStorageMetadata,
    )

    folder.mkdir()
    data, entries, places = bytearray(), {}, {}
    for i, name in enumerate(names):
        chunks = [((0, 0), (2, 5)), ((1, 0), (2, 5))] if name == bad else [((0, 0), (4, 5))]
        for offsets, sizes in chunks:
            raw = torch.full(sizes, float(i)).numpy().tobytes()
            places[MetadataIndex(name, offsets, 0)] = _StorageInfo("__0_0.distcp", len(data), len(raw))
            data += raw
        entries[name] = TensorStorageMetadata(
            TensorProperties(dtype=torch.float32), torch.Size([4, 5]),
            [ChunkStorageMetadata(offsets=torch.Size(o), sizes=torch.Size(s)) for o, s in chunks])
    (folder / "__0_0.distcp").write_bytes(data)
    meta = Metadata(state_dict_metadata=entries, planner_data={n: (n,) for n in names}, storage_data=places,
                    storage_meta=StorageMeta(), version="1.0.0")
    (folder / ".metadata").write_bytes(pickle.dumps(meta, protocol=4))
    return folder


@pytest.mark.parametrize("name, extra", OUTPUTS, ids=["safetensors", "pth", "dcp"])
def test_a_failing_shard_stops_the_others_and_leaves_nothing(cli, tmp_path, name, extra):
    source = handmade_dcp(tmp_path / "in", [f"t{i}" for i in range(8)], bad="t1")
    out = tmp_path / "out" / name
    out.parent.mkdir()
    result = cli("convert", source, "-o", out, "--max-shard-size", "80B", "--jobs", "3", *extra)
    assert_one_error_line(result, "t1", "overlap")
    assert os.listdir(out.parent) == []  # no shard, no index, no temporary file


def test_default_jobs_follow_the_cores_shared_by_local_ranks():
    from ckptsurgery.ops.options import MAX_DEFAULT_JOBS, default_jobs

    cores = len(os.sched_getaffinity(0))
    assert default_jobs({}) == max(1, min(MAX_DEFAULT_JOBS, cores))
    assert default_jobs({"LOCAL_WORLD_SIZE": str(cores * 2)}) == 1
    assert default_jobs({"LOCAL_WORLD_SIZE": "junk"}) == default_jobs({})


# ---- under torchrun: each rank writes its share ------------------------------------------------

def convert_on_ranks(count, *args, cwd, expect_failure=False):
    """`torchrun --nproc-per-node COUNT -m ckptsurgery convert ARGS --json`: each rank's
    (report or None, stderr)."""
    _, ranks = run_ranks(count, "-m", "ckptsurgery", "convert", *args, "--json", cwd=cwd,
                         expect_failure=expect_failure)
    return [(json.loads(out) if out.strip() else None, err) for out, err in ranks]


@pytest.mark.parametrize("count", [2, 3])
@pytest.mark.parametrize("name, extra", OUTPUTS, ids=["safetensors", "pth", "dcp"])
def test_ranks_write_exactly_what_one_process_writes(cli, tmp_path, many_tensors, count, name, extra):
    alone, shared = tmp_path / "alone" / name, tmp_path / "shared" / name
    alone.parent.mkdir()
    shared.parent.mkdir()
    single = cli("convert", many_tensors, "-o", alone, "--max-shard-size", "1KB", *extra, "--json").json()
    reports = [report for report, _ in convert_on_ranks(count, many_tensors, "-o", shared, "--max-shard-size", "1KB",
                                                        *extra, cwd=tmp_path)]
    assert contents(shared) == contents(alone)
    assert not [n for n in os.listdir(shared.parent) if n.endswith(".ckptsurgery-tmp")]
    # each rank lists what it wrote: data file i is rank i % count's, the index or .metadata rank 0's
    last = os.path.join(shared, ".metadata") if extra else f"{shared}.index.json"
    data = [f.replace(str(alone.parent), str(shared.parent)) for f in single["files"] if f != str(alone) + ".index.json"
            and not f.endswith(".metadata")]
    assert len(data) >= count
    for rank, report in enumerate(reports):
        assert (report["rank"], report["world_size"]) == (rank, count)
        assert report["files"] == data[rank::count] + ([last] if rank == 0 else [])


def test_ranks_with_one_file_rank_0_writes_it(tmp_path, many_tensors, cli):
    """Without --max-shard-size there is one file: rank 0 writes it, the others nothing. Any
    writing command runs on ranks, not only convert."""
    cli("filter", many_tensors, "--keep", "blocks", "-o", tmp_path / "alone.pth")
    _, ranks = run_ranks(2, "-m", "ckptsurgery", "filter", many_tensors, "--keep", "blocks", "-o",
                         tmp_path / "shared.pth", "--json", cwd=tmp_path)
    assert (tmp_path / "shared.pth").read_bytes() == (tmp_path / "alone.pth").read_bytes()
    assert [json.loads(out)["files"] for out, _ in ranks] == [[str(tmp_path / "shared.pth")], []]


@pytest.mark.parametrize("count", [2, 3])
def test_a_failure_on_one_rank_leaves_nothing_on_any(tmp_path, count):
    """t1 lies in shard 2, which rank 1 writes: only rank 1 reads its (overlapping) chunks, and
    fails; every rank removes what it staged, and the job fails."""
    source = handmade_dcp(tmp_path / "in", [f"t{i}" for i in range(8)], bad="t1")
    out = tmp_path / "out" / "model.safetensors"
    out.parent.mkdir()
    ranks = convert_on_ranks(count, source, "-o", out, "--max-shard-size", "80B", cwd=tmp_path, expect_failure=True)
    assert os.listdir(out.parent) == []  # no shard, no index, no temporary file
    assert all(report is None for report, _ in ranks)
    failed = ranks[1][1].strip().splitlines()
    assert failed[-1].startswith("ckptsurgery: error: ") and "t1" in failed[-1] and "overlap" in failed[-1], failed
    for rank in (0, *range(2, count)):  # the others name rank 1, unless torchrun stopped them first
        errors = [line for line in ranks[rank][1].splitlines() if line.startswith("ckptsurgery: error:")]
        assert all("rank 1 of" in line for line in errors), errors
    assert "Traceback" not in "".join(err for _, err in ranks)


def test_dry_run_on_ranks_writes_nothing_and_shows_the_split(tmp_path, many_tensors):
    out = tmp_path / "out" / "model.safetensors"
    out.parent.mkdir()
    reports = [r for r, _ in convert_on_ranks(2, many_tensors, "-o", out, "--max-shard-size", "1KB", "--dry-run",
                                               cwd=tmp_path)]
    assert os.listdir(out.parent) == []
    files = [f for r in reports for f in r["files"]]
    assert len(files) == len(set(files)) == reports[0]["shards"] + 1 and reports[0]["files"][-1].endswith(".index.json")


def test_force_on_ranks_replaces_an_earlier_sharded_output(cli, tmp_path, many_tensors):
    """An earlier output of more shards: with --force the ranks write the new set and rank 0
    removes the old shards the new set does not replace, as one process would."""
    for folder in ("alone", "shared"):
        (tmp_path / folder).mkdir()
        assert cli("convert", many_tensors, "-o", tmp_path / folder / "m.safetensors", "--max-shard-size", "300B").code == 0
    cli("convert", many_tensors, "-o", tmp_path / "alone" / "m.safetensors", "--max-shard-size", "2KB", "--force")
    reports = [r for r, _ in convert_on_ranks(2, many_tensors, "-o", tmp_path / "shared" / "m.safetensors",
                                              "--max-shard-size", "2KB", "--force", cwd=tmp_path)]
    assert contents(tmp_path / "shared" / "m.safetensors") == contents(tmp_path / "alone" / "m.safetensors")
    assert sorted(os.listdir(tmp_path / "shared")) == sorted(os.listdir(tmp_path / "alone"))
    assert reports[0]["removed"] and reports[1]["removed"] == []


def test_rank0_adopts_only_what_it_would_have_staged_itself(tmp_path):
    """The staged names another rank sends are checked before rank 0 renames or removes them:
    a path elsewhere, or a final path this process did not plan, is refused, never touched."""
    from ckptsurgery.errors import CkptError
    from ckptsurgery.io.write import StagedOutputs

    out = str(tmp_path / "model-00001-of-00002.safetensors")
    victim = tmp_path / "keep.txt"
    victim.write_text("not a staged file")
    good = str(tmp_path / ".model-00001-of-00002.safetensors.0123456789abcdef.ckptsurgery-tmp")
    for pairs, order in (([(str(victim), out)], [out]),
                         ([(good, str(tmp_path / "elsewhere.safetensors"))], [out]),
                         ([(str(tmp_path / ".other.0123456789abcdef.ckptsurgery-tmp"), out)], [out])):
        outputs = StagedOutputs()
        with pytest.raises(CkptError, match="did the ranks run different commands"):
            outputs.adopt(pairs, order)
        outputs.abort()
        assert victim.read_text() == "not a staged file"
    outputs = StagedOutputs()
    outputs.adopt([(good, out)], [out])
    assert outputs.staged == [(good, out)]


def test_nothing_is_staged_once_the_set_is_aborted(tmp_path):
    """A writer thread that reaches stage() after the main thread aborted (a second Ctrl-C cut
    short the wait for it) is refused: no temporary file appears that nobody would remove."""
    from ckptsurgery.errors import CkptError
    from ckptsurgery.io.write import StagedOutputs

    outputs = StagedOutputs()
    with outputs.stage(str(tmp_path / "a.safetensors")) as f:
        f.write(b"x")
    outputs.abort()
    with pytest.raises(CkptError, match="the write was stopped"):
        with outputs.stage(str(tmp_path / "b.safetensors")):
            pass
    with pytest.raises(CkptError, match="the write was stopped"):
        outputs.stage_folder(str(tmp_path / "c"))
    assert os.listdir(tmp_path) == []


# ---- faults injected under ranks (wrapper scripts) and threads (monkeypatching) -----------------

@pytest.fixture
def many(tmp_path):
    """Ten [8, 8] float32 tensors (256 B each): `--max-shard-size 300B` gives one per file."""
    torch.manual_seed(0)
    sd = OrderedDict((f"t{i}", torch.randn(8, 8)) for i in range(10))
    path = tmp_path / "in.pth"
    torch.save(sd, path)
    return path


def script(tmp_path, body: str):
    """A torchrun entry point: `body` (faults for this rank, RANK in `rank`), then the real CLI."""
    path = tmp_path / "faulty.py"
    path.write_text("import os, sys, time\nrank = int(os.environ['RANK'])\n" + textwrap.dedent(body)
                    + "\nfrom ckptsurgery.cli import main\nmain()\n")
    return path


def leftovers(folder) -> list[str]:
    return sorted(n for n in os.listdir(folder) if "ckptsurgery-tmp" in n)


def error_lines(err: str) -> list[str]:
    return [line for line in err.splitlines() if line.startswith("ckptsurgery: error:")]


RANK0_FAILS_ON_ITS_FILE = """
from ckptsurgery.errors import CkptError
from ckptsurgery.io import dcp
real = dcp.DcpWriter.write_file
def write_file(self, folder, number, progress=None):
    if rank == 0 and number == 0:       # rank 0 fails on its own data file (an unreadable input, a full disk)
        time.sleep(0.3)
        raise CkptError("injected: rank 0 could not read its tensor")
    if rank == 1:                       # rank 1 is a little slower (a bigger share, a busier node)
        time.sleep(1.0)
    return real(self, folder, number, progress)
dcp.DcpWriter.write_file = write_file
"""


def test_dcp_rank0_failure_leaves_no_staged_folder_when_removal_is_slow(tmp_path, many):
    """Rank 0 fails on its own data file and, at once (before casting its error at `written`),
    rmtree's the staged folder — which the other ranks are still writing into. On a shared file
    system (the README's setting) that removal takes a while: a file the other rank creates
    meanwhile makes the final rmdir fail (ENOTEMPTY), so the staged folder with rank 1's data
    files stays behind, and rank 0's error becomes 'Directory not empty' instead of its own."""
    body = RANK0_FAILS_ON_ITS_FILE + """
if rank == 0:   # a slow shared file system: the folder's removal takes a moment
    real_rmdir = os.rmdir
    def rmdir(path, *args, **kwargs):
        time.sleep(1.5)
        return real_rmdir(path, *args, **kwargs)
    os.rmdir = rmdir
"""
    out = tmp_path / "out" / "ckpt"
    out.parent.mkdir()
    _, ranks = run_ranks(2, script(tmp_path, body), "convert", many, "-o", out, "--format", "dcp", "--max-shard-size", "300B",
                         cwd=tmp_path, expect_failure=True)
    errors = [error_lines(err) for _, err in ranks]
    assert leftovers(out.parent) == [], (leftovers(out.parent), errors)
    assert "injected" in " ".join(errors[0]), errors


def test_dcp_rank0_failure_other_ranks_name_rank_0(tmp_path, many):
    """Same failure without the slow removal: rank 0 has already removed the staged folder when
    rank 1 opens its data file, so rank 1 fails with its own ENOENT line naming a temporary
    folder ('.ckpt.XXXX.ckptsurgery-tmp/__0_1.distcp: No such file or directory') instead of the
    documented 'rank 0 of 2 failed, so nothing was written: ...'."""
    out = tmp_path / "out" / "ckpt"
    out.parent.mkdir()
    _, ranks = run_ranks(2, script(tmp_path, RANK0_FAILS_ON_ITS_FILE), "convert", many, "-o", out, "--format", "dcp",
                         "--max-shard-size", "300B", cwd=tmp_path, expect_failure=True)
    assert leftovers(out.parent) == []
    rank1 = error_lines(ranks[1][1])
    assert rank1 and all("rank 0 of 2 failed" in line for line in rank1), rank1


def test_rank0_failure_after_commit_is_not_reported_as_nothing_written(cli, tmp_path, many):
    """--force over an earlier output of more shards: rank 0 renames the new set into place, then
    cannot remove one stale shard (EPERM: e.g. another user's file in a sticky shared folder).
    Alone, the command says 'the new output is written but this file of the old one could not
    be removed'. Rank 1 says 'rank 0 of 2 failed, so nothing was written: ... the new output is
    written ...' — self-contradictory, and false: the new output is in place."""
    out = tmp_path / "out" / "m.safetensors"
    out.parent.mkdir()
    assert cli("convert", many, "-o", out, "--max-shard-size", "300B").code == 0  # 10 shards
    body = """
import errno
real_unlink = os.unlink
def unlink(path, *args, **kwargs):
    if rank == 0 and "-of-00010" in os.fspath(path) and "ckptsurgery-tmp" not in os.fspath(path):
        raise PermissionError(errno.EPERM, "Operation not permitted", path)
    return real_unlink(path, *args, **kwargs)
os.unlink = unlink
"""
    _, ranks = run_ranks(2, script(tmp_path, body), "convert", many, "-o", out, "--max-shard-size", "600B", "--force",
                         cwd=tmp_path, expect_failure=True)
    assert os.path.exists(f"{out}.index.json") and '"m-00001-of-00005' in open(f"{out}.index.json").read()
    lines = [line for _, err in ranks for line in error_lines(err)]
    assert lines and not [line for line in lines if "nothing was written" in line], lines


def test_rank0_that_committed_does_not_say_nothing_was_written_when_a_rank_is_lost(tmp_path, many):
    """Rank 1 dies (OOM killer, a node lost) right after `written`: rank 0 adopts its files and
    renames the whole output into place — every shard and the index are there — and then, at
    `committed`, fails with 'rank 0: lost contact with the other ranks at step 'committed' (...);
    nothing was written' and exit 1. The output is whole and in place; the message is false."""
    body = """
from ckptsurgery.ops import ranks as R
real = R.Ranks.step
def step(self, name, value=None):
    answer = real(self, name, value)
    if rank == 1 and name == "written":
        os._exit(9)
    return answer
R.Ranks.step = step
"""
    out = tmp_path / "out" / "m.safetensors"
    out.parent.mkdir()
    _, ranks = run_ranks(2, script(tmp_path, body), "convert", many, "-o", out, "--max-shard-size", "600B",
                         cwd=tmp_path, expect_failure=True)
    assert sorted(os.listdir(out.parent)) == [f"m-0000{i}-of-00005.safetensors" for i in range(1, 6)] + [
        "m.safetensors.index.json"]
    rank0 = error_lines(ranks[0][1])
    assert not [line for line in rank0 if "nothing was written" in line], rank0


def test_a_rename_failing_mid_commit_leaves_the_older_output_whole(cli, tmp_path, many, monkeypatch):
    """commit() renames the staged shards one by one; if the third rename fails, abort() removes
    the staged files not yet renamed — but the two already renamed stay: OUT is now new shards
    1-2, old shards 3-5 and the old index (same names, so a loader reads the mix). The docs say
    'StagedOutputs.commit aborts the whole set if a rename fails' and the project promises an older
    output is left whole on failure. Under ranks rank 0 runs this same commit for every rank."""
    out = tmp_path / "out" / "m.safetensors"
    out.parent.mkdir()
    assert cli("convert", many, "-o", out, "--max-shard-size", "600B").code == 0
    before = {n: (out.parent / n).read_bytes() for n in os.listdir(out.parent)}
    torch.save(OrderedDict((f"t{i}", torch.zeros(8, 8)) for i in range(10)), tmp_path / "zeros.pth")
    real, calls = os.replace, []

    def replace(src, dst, *args, **kwargs):
        if "ckptsurgery-tmp" in os.fspath(src):
            calls.append(dst)
            if len(calls) == 3:
                raise OSError(errno.EIO, "Input/output error", os.fspath(dst))
        return real(src, dst, *args, **kwargs)

    monkeypatch.setattr(os, "replace", replace)
    result = cli("convert", tmp_path / "zeros.pth", "-o", out, "--max-shard-size", "600B", "--force", "--jobs", "2")
    assert result.code == 1
    assert leftovers(out.parent) == []
    after = {n: (out.parent / n).read_bytes() for n in os.listdir(out.parent)}
    assert after == before, [n for n in after if after[n] != before.get(n)]


# ---- the docs describe the mechanism the code uses ----------------------------------------------

def test_docs_do_not_say_the_ranks_exchange_all_gather_object():
    """docs/reading-and-writing.md ('Writing in parallel') says the three steps are 'each an
    `all_gather_object` of (error or None, a value)'; since 2300716 they are JSON in uint8
    tensors precisely because all_gather_object unpickles what the other processes send."""
    text = open(os.path.join(ROOT, "docs", "reading-and-writing.md")).read()
    section = text[text.index("## Writing in parallel"):]
    assert "each an `all_gather_object`" not in section


# ---- the torchrun environment: checked before joining, and every wait bounded ----------------------

@pytest.mark.parametrize("env, message", [
    ({"WORLD_SIZE": "2", "RANK": "2"}, "RANK='2' must be 0 to 1, below WORLD_SIZE=2"),
    ({"WORLD_SIZE": "2", "RANK": "-1"}, "RANK='-1' must be 0 to 1"),
    ({"WORLD_SIZE": "2", "RANK": "one"}, "RANK='one' is not a number"),
    ({"WORLD_SIZE": "2"}, "RANK is not set"),
])
def test_a_torchrun_environment_that_cannot_meet_is_refused_at_once(cli, tmp_path, many_tensors, monkeypatch,
                                                                   env, message):
    """RANK=2 of WORLD_SIZE=2, or RANK=-1, waited 30 minutes for a rendezvous that cannot happen."""
    monkeypatch.delenv("RANK", raising=False)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    started = time.monotonic()
    assert_one_error_line(cli("convert", many_tensors, "-o", tmp_path / "o.safetensors"), message, code=2)
    assert time.monotonic() - started < 10 and not (tmp_path / "o.safetensors").exists()


def test_a_rank_whose_partners_never_come_fails_within_its_timeout(tmp_path, many_tensors):
    """WORLD_SIZE=2 with one rank started waited half an hour; it fails after --rank-timeout with
    one line, and leaves nothing."""
    import socket
    import subprocess
    import sys

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "WORLD_SIZE": "2", "RANK": "0", "LOCAL_RANK": "0", "MASTER_ADDR": "127.0.0.1",
           "MASTER_PORT": str(port), "PYTHONPATH": ROOT}
    started = time.monotonic()
    done = subprocess.run([sys.executable, "-P", "-m", "ckptsurgery", "convert", str(many_tensors), "-o",
                           str(tmp_path / "o.safetensors"), "--rank-timeout", "2"],
                          capture_output=True, text=True, env=env, timeout=120)
    assert done.returncode == 1 and time.monotonic() - started < 60, done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and "cannot join the other ranks within 2 s" in lines[0], done.stderr
    assert sorted(os.listdir(tmp_path)) == [many_tensors.name]


@pytest.mark.parametrize("bad", ["0", "-1", "nan"])
def test_rank_timeout_takes_seconds(cli, tmp_path, many_tensors, monkeypatch, bad):
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "0")
    assert_one_error_line(cli("convert", many_tensors, "-o", tmp_path / "o.pth", "--rank-timeout", bad),
                          "--rank-timeout", code=2)


RANK1_FAILS_ON_ITS_SHARD = """
from contextlib import contextmanager
from ckptsurgery.io import write
real_stage = write.StagedOutputs.stage
@contextmanager
def stage(self, path):
    if rank == 0:
        time.sleep(0.5)                 # rank 1 reaches the output's folder first
    with real_stage(self, path) as f:
        if rank == 1:                   # its file staged in the folder, rank 1 fails (a full disk)...
            time.sleep(1.5)             # ...once rank 0 has staged its own file there too
            raise OSError(28, "No space left on device", path)
        yield f
write.StagedOutputs.stage = stage
"""


def test_a_failed_sharded_write_under_torchrun_leaves_no_folder_it_made(tmp_path, many):
    """The output's missing folder is made by rank 0 before the others stage anything: when a rank
    then fails, rank 0, the last to remove its files, removes the folder too. Each rank made it
    (whichever came first owned it), and one that failed could not remove it while rank 0's
    staged file was still inside: an empty folder stayed behind, every other run."""
    out = tmp_path / "new" / "deeper" / "model.safetensors"
    _, ranks = run_ranks(2, script(tmp_path, RANK1_FAILS_ON_ITS_SHARD), "convert", many, "-o", out, "--max-shard-size", "300B",
                         cwd=tmp_path, expect_failure=True)
    assert not (tmp_path / "new").exists(), [error_lines(err) for _, err in ranks]
