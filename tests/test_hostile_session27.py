"""Hostile `.metadata` files against the streaming reader (dcp_tokens, dcp_pickles, dcp_chunks):
each read exactly as the restricted unpickler's route reads it (the old route; torch's own
read_metadata is a plain pickle.load of the same dicts), or refused alike."""

from __future__ import annotations

import pickletools
import re
import struct

import pytest
import torch

from ckptsurgery.io import dcp as dcp_io
from test_dcp_scale import _outcome, _save


@pytest.fixture(scope="module")
def three(tmp_path_factory):
    """model.a, model.b, model.c: three float32 tensors of 3 (ones, zeros, twos), one .metadata frame."""
    return _save(tmp_path_factory.mktemp("three") / "ckpt",
                 {"model": {"a": torch.ones(3), "b": torch.zeros(3), "c": torch.full((3,), 2.0)}})


def _body(data: bytes) -> bytes:
    """A protocol 4 pickle's opcodes without its frames' headers."""
    positions = [pos for _, _, pos in pickletools.genops(data)] + [len(data)]
    return b"".join(data[a:b] for a, b in zip(positions, positions[1:]) if data[a] != 0x95 and a >= 2)


def _framed(body: bytes) -> bytes:
    return b"\x80\x04\x95" + struct.pack("<Q", len(body)) + body


def _folder(tmp_path, source, data: bytes):
    folder = tmp_path / "hostile"
    folder.mkdir()
    (folder / "__0_0.distcp").symlink_to(source / "__0_0.distcp")
    (folder / ".metadata").write_bytes(data)
    return folder


class _Routes:
    def __init__(self, monkeypatch):
        self.streamed = 0
        stream = dcp_io.read_streaming

        def streaming(*args):
            got = stream(*args)
            self.streamed += got is not None
            return got

        monkeypatch.setattr(dcp_io, "read_streaming", streaming)


def test_a_key_repeated_with_another_path_naming_it_is_one_tensor_as_torch_reads_it(three, tmp_path, monkeypatch):
    """state_dict_metadata names "model.a" twice (a dict: torch's pickle.load keeps one entry, the
    later value at the first place; planner_data and storage_data alike keep the later path and
    record): the second's planner path is ("model.a",), the first's ("model", "a"), so the two
    paths do not meet in the tree. Streaming made two tensors of them — an extra "model"/"a" that
    torch's metadata does not hold. It must read what the restricted unpickler reads."""
    body = _body((three / ".metadata").read_bytes()).replace(b"model.b", b"model.a")
    body, n = re.subn(rb"h([\s\S])h[\s\S]\x8c\x01b\x94\x86\x94",
                     lambda m: b"h" + m[1] + b"\x8c\x07model.a\x94\x85\x94", body)
    assert n == 1  # (the same memo slots: a string and a tuple memoized, as before)
    folder = _folder(tmp_path, three, _framed(body))
    routes = _Routes(monkeypatch)
    fast = _outcome(folder, True)
    old = _outcome(folder, False)
    assert old[0] == "read" and [key for key, _ in old[1]["tensors"]] == ["c"]
    assert fast == old
    assert routes.streamed == 0


def test_a_folder_refused_once_streamed_reads_its_values_twice_not_three_times(tmp_path, monkeypatch):
    """A folder whose `.metadata` streams whole but is refused after (here: two state dicts and no
    --root; as well a value refused, a place outside its file) is refused by the tables' way too:
    it is read again only for the restricted unpickler's words, not a third time — a heavy value
    (a list of a million strings) was unpickled three times (3x the time of the old route), and
    the readers that gave up kept theirs until the garbage collector ran."""
    from ckptsurgery.errors import CkptError

    folder = _save(tmp_path / "ckpt", {"a": {"w": torch.ones(2)}, "b": {"w": torch.ones(2)}, "step": 7})
    reads, value = [], dcp_io._Reader.value

    def counted(self, place, where):
        reads.append(where)
        return value(self, place, where)

    monkeypatch.setattr(dcp_io._Reader, "value", counted)
    with pytest.raises(CkptError, match="several entries hold state dicts"):
        dcp_io.read_dcp(str(folder), None)
    assert len(reads) == 2  # streamed, then the restricted unpickler's route
    reads.clear()
    dcp_io.read_dcp(str(folder), "a")
    assert len(reads) == 1


def _peak(folder, fast: bool) -> int:
    import tracemalloc

    saved = dcp_io.FAST
    dcp_io.FAST = fast
    tracemalloc.start()
    try:
        dcp_io.read_dcp(str(folder), None).close()
        return tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
        dcp_io.FAST = saved


def test_a_long_run_repeated_is_not_spelled_out_as_a_regular_expression(three, tmp_path):
    """Entries of 20,000 dimensions, one value's bytes twice, in one frame (a hostile file's frames
    may be as long as it likes; torch's are 64 KiB): the second copy was compiled into a regular
    expression of its 120 KB (a literal costs ~18 B a byte kept, ~110 B a byte while compiled) —
    4.7x the old route's memory and time at 600 KB. A run longer than a few KB is recognised by
    the dictionary of runs alone."""
    import copy
    import pickle

    from torch.distributed.checkpoint.filesystem import _StorageInfo
    from torch.distributed.checkpoint.metadata import (
        ChunkStorageMetadata, Metadata, MetadataIndex, TensorProperties, TensorStorageMetadata,
    )

    rank, entries, storage = 20000, {}, {}
    for index in range(3):
        key = f"model.w{index}"
        entries[key] = TensorStorageMetadata(copy.deepcopy(TensorProperties(dtype=torch.float32)),
                                             torch.Size([1] * rank),
                                             [ChunkStorageMetadata(torch.Size([0] * rank), torch.Size([1] * rank))])
        storage[MetadataIndex(key, torch.Size([0] * rank))] = _StorageInfo("__0_0.distcp", 0, 4)
    data = pickle.dumps(Metadata(entries, planner_data={key: ("model", key[6:]) for key in entries},
                                 storage_data=storage), protocol=4)
    folder = _folder(tmp_path, three, _framed(_body(data)))
    old, fast = _peak(folder, False), _peak(folder, True)
    assert fast <= 2 * old, (fast, old)


def test_a_file_of_empty_frames_costs_no_more_than_the_old_route(three, tmp_path):
    """200,000 empty frames (9 bytes each) before torch's records: the fast reader listed every
    header's position (~40 B a header: 4x the file) before reading a token; it finds each next
    one from the one before. (90 MB of them: peak RSS 486 MB, the old route's 188.)"""
    body = _body((three / ".metadata").read_bytes())
    empty = b"\x95" + bytes(8)
    folder = _folder(tmp_path, three, b"\x80\x04" + empty * 200_000 + _framed(body)[2:])
    assert _outcome(folder, True, read=False) == _outcome(folder, False, read=False)
    old, fast = _peak(folder, False), _peak(folder, True)
    assert fast <= 2 * old, (fast, old)


def test_a_frame_that_runs_past_the_end_is_refused_as_torchs_loader_refuses_it(three, tmp_path, cli):
    """A frame whose length runs past the end of `.metadata` (the file cut short, or its length
    field changed): Python's unpickler, which torch's read_metadata is, refuses it ("pickle data was
    truncated"); both of our routes read on before, so `convert` made a loadable file of a folder
    torch cannot load."""
    import subprocess
    import sys

    data = (three / ".metadata").read_bytes()
    assert data[2] == 0x95  # one frame, after PROTO
    (size,) = struct.unpack("<Q", data[3:11])
    longer = data[:3] + struct.pack("<Q", size + 1) + data[11:]
    folder = _folder(tmp_path, three, longer)
    torch_reads = subprocess.run([sys.executable, "-c", "import pickle, sys; pickle.load(open(sys.argv[1], 'rb'))",
                                  str(folder / ".metadata")], capture_output=True, text=True)
    assert torch_reads.returncode != 0 and "truncated" in torch_reads.stderr  # (in a process of its own)
    for fast in (True, False):
        assert _outcome(folder, fast)[0] == "refused"
    from conftest import assert_one_error_line

    assert_one_error_line(cli("inspect", folder), "runs past the end")
    assert_one_error_line(cli("convert", folder, "-o", tmp_path / "out.safetensors"), "runs past the end")
    assert not (tmp_path / "out.safetensors").exists()
