"""Review 8: hostile torch.distributed.checkpoint folders against ckptsurgery/io/dcp.py. Each test
is a broken promise; folders are real `dcp.save` output with `.metadata` edited by plain pickle
(trusted test code) or with hand-made bytes."""

from __future__ import annotations

import io
import os
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

from conftest import assert_one_error_line, dcp_storage, rewrite_dcp_metadata

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CATCH_ALL = "CKPTSURGERY_DEBUG"


@pytest.fixture
def folder(tmp_path):
    """A one-process DCP folder: model.emb.weight (5, 3) float32, model.ids (4,) int64, step (bytes)."""
    import torch.distributed.checkpoint as dcp

    torch.manual_seed(0)
    out = tmp_path / "ckpt"
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


def _saved(obj) -> bytes:
    buf = io.BytesIO()
    torch.save(obj, buf)
    return buf.getvalue()


def _run(*args, timeout=120, data_limit=None, nofile=None, env=None, cwd=REPO):
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
    subprocess.run([sys.executable, "-c", script, "x", *map(str, args)], capture_output=True, timeout=300, cwd=REPO)
    return int(out.read_text())


# ---- code execution: a .pth output runs more than torch's own DCP loader would -------------------

def test_tensor_chunk_subclass_is_carried_into_pth_output(cli, tmp_path, folder):
    """torch loads tensor chunks with weights_only=True (a subclass refuses the load), but the .pth output keeps it: an unsafe load of the output imports it."""
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


def test_pth_output_reaches_payload_torch_per_file_order_never_reaches(cli, tmp_path, folder):
    """torch reads DCP values grouped by data file, stopping at a failing import in __0_0 before a payload in __1_0; the .pth output runs the payload first."""
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


# ---- crashes: the catch-all or a traceback instead of one line -----------------------------------

def test_negative_planner_list_index_hits_the_catch_all(cli, folder):
    """A planner path with a negative list index raises IndexError: the catch-all, not one error line."""
    def change(meta):
        meta.planner_data["model.ids"] = ("lst", -1)
    rewrite_dcp_metadata(folder, change)
    assert_one_error_line(cli("inspect", folder), "planner path")


def test_huge_size_product_hits_the_catch_all(cli, folder):
    """A size whose element count has >4300 digits crashes formatting the error message (ValueError, catch-all)."""
    big = (2**2000,) * 8

    def change(meta):
        entry = meta.state_dict_metadata["model.ids"]
        entry.size = big
        entry.chunks[0].offsets, entry.chunks[0].sizes = (0,) * 8, big
        info = _rekey(meta, "model.ids", (0,) * 8)
        info.offset, info.length = info.offset + 1, info.length - 1  # raw bytes, not a zip: the length check runs
    rewrite_dcp_metadata(folder, change)
    assert_one_error_line(cli("inspect", folder))


def test_shape_beyond_int64_with_zero_elements_is_not_validated(cli, tmp_path, folder):
    """A (0, 2**70) tensor from raw bytes is never validated: --stats crashes (multi-line catch-all), convert writes files torch and safetensors cannot load."""
    def change(meta):
        entry = meta.state_dict_metadata["model.ids"]
        entry.size = (0, 2**70)
        entry.chunks[0].offsets, entry.chunks[0].sizes = (0, 0), (0, 2**70)
        _rekey(meta, "model.ids", (0, 0)).length = 0
    rewrite_dcp_metadata(folder, change)
    assert_one_error_line(cli("inspect", folder, "--stats"))
    assert_one_error_line(cli("convert", folder, "-o", tmp_path / "o.safetensors"))
    assert_one_error_line(cli("convert", folder, "-o", tmp_path / "o.pth"))


def test_assembling_more_than_64_dims_hits_the_catch_all(cli, tmp_path, folder):
    """A 100-dimension tensor in two chunks: torch's 64-dim limit in assemble raises RuntimeError (catch-all) on --stats, convert and diff."""
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


# ---- wrong values ---------------------------------------------------------------------------------

def test_zero_sized_single_chunk_replaces_the_recorded_shape(cli, tmp_path, folder):
    """size (0, 4) with one empty chunk of (0, 3): the output tensor is (0, 3), where torch's own loader gives (0, 4)."""
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


# ---- hangs and memory -----------------------------------------------------------------------------

def test_many_huge_dimensions_take_minutes(folder):
    """200,000 dimensions of 2**62 (a 3 MB .metadata): the unbounded element-count products take minutes, not a quick refusal."""
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


def test_repeated_tuple_keys_in_metadata_take_minutes(folder):
    """A 500 KB .metadata that uses one 88,573-path tuple as a dict key 125,000 times: each SETITEM rehashes it, minutes of CPU (the tuple-path cap bounds one hash, not their number)."""
    levels, pairs = 10, 125_000

    def tuples(i):  # t_i = (t_{i-1},) * 3, each memoized at index i
        if i == 0:
            return b")q\x00"
        get = b"h" + bytes([i - 1])
        return tuples(i - 1) + get + get + b"\x87q" + bytes([i])
    get = b"h" + bytes([levels])
    (folder / ".metadata").write_bytes(b"\x80\x04}" + tuples(levels) + get + b"s(" + get * (2 * pairs) + b"u.")
    _assert_one_line(_run("inspect", folder, timeout=20))


def test_planner_list_indices_allocate_gigabytes(folder):
    """1,000 keys with planner paths (kN, 1000000) in a 63 KB .metadata make 1,000 lists of a million Nones (8 GB): MemoryError, the catch-all."""
    def change(meta):
        info = dcp_storage(meta, "step")
        for i in range(1000):
            key = f"k{i}"
            meta.state_dict_metadata[key] = BytesStorageMetadata()
            meta.storage_data[MetadataIndex(key)] = info
            meta.planner_data[key] = (key, 1_000_000)
    rewrite_dcp_metadata(folder, change)
    _assert_one_line(_run("inspect", folder, data_limit=2 << 30, timeout=120))


def test_stride0_chunks_escape_the_repeated_bytes_cap(tmp_path, folder):
    """Each chunk's archive gets its own 256 MiB stride-0 allowance: 20 chunks of one 1.5 KB archive make a 4.8 GB tensor, and --stats dies of MemoryError (catch-all)."""
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


def test_one_byte_range_is_reloaded_for_every_key(tmp_path, folder):
    """250 BytesStorage keys naming one 4 MB archive load 250 copies of its string: a 4 MB folder takes over 1 GB of memory."""
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


# ---- a real layout that fails -----------------------------------------------------------------------

def test_six_hundred_rank_folder_runs_out_of_file_descriptors(tmp_path, folder):
    """A folder from 600 ranks (600 .distcp files) fails under the usual 1024 open-file limit: every data file stays open and mapped (two descriptors each)."""
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
