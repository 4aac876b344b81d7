"""Review 11: parallel writing (--jobs threads, torchrun ranks). Each test is a finding that
fails against the code as it stands; faults are injected through small wrapper scripts (ranks)
or monkeypatching (in-process), the way the project's own tests simulate a full disk."""

from __future__ import annotations

import errno
import os
import textwrap
from collections import OrderedDict

import pytest
import torch

from conftest import ROOT, run_ranks


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


# ---- 1. DCP under ranks: rank 0 removes the shared staged folder while the others still write ----

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


# ---- 2. rank 0 fails after renaming the output into place: the others say nothing was written ----

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


# ---- 3. a rename failing mid-commit leaves a mix of old and new files ----------------------

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


# ---- 4. the docs describe a mechanism the code no longer uses -------------------------------

def test_docs_do_not_say_the_ranks_exchange_all_gather_object():
    """docs/reading-and-writing.md ('Writing in parallel') says the three steps are 'each an
    `all_gather_object` of (error or None, a value)'; since 2300716 they are JSON in uint8
    tensors precisely because all_gather_object unpickles what the other processes send."""
    text = open(os.path.join(ROOT, "docs", "reading-and-writing.md")).read()
    section = text[text.index("## Writing in parallel"):]
    assert "each an `all_gather_object`" not in section
