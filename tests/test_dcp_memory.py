"""DCP `.metadata` read without its tables (issue 18 §4, memory at 100,000 keys): where every entry
is a tensor of one chunk, dcp_chunks.Stream makes the table of tensors as dcp_pickles reads the
pickle where it lies (its frames' headers skipped between tokens, its memo in segments), and no
table of entries, paths or places is ever made. It must read exactly what the restricted
unpickler reads (held to it on torch's folders, on mutated copies and on frames split at every
opcode), and keep to a bound of memory a key."""

from __future__ import annotations

import pickle
import pickletools
import random
import struct
import tracemalloc

import pytest
import torch
from torch.distributed.checkpoint.filesystem import _StorageInfo
from torch.distributed.checkpoint.metadata import (
    ChunkStorageMetadata, Metadata, MetadataIndex, StorageMeta, TensorProperties, TensorStorageMetadata,
)

from ckptsurgery.io import dcp as dcp_io
from test_dcp_scale import _arguments, _mutate, _outcome, _save, _tensors
from test_dcp_scale import small  # noqa: F401  (a fixture: its few tensors and values)
from test_dcp_scale import _handmade as _handmade_chunks


class _Routes:
    """Which way read_dcp read a folder: streamed, the tables' way (fast_metadata's tables), or
    neither (the restricted unpickler)."""

    def __init__(self, monkeypatch):
        self.streamed = self.tables = 0
        stream, tables = dcp_io.read_streaming, dcp_io._fast_metadata

        def streaming(*args):
            got = stream(*args)
            self.streamed += got is not None
            return got

        def fast(*args):
            got = tables(*args)
            self.tables += got is not None
            return got

        monkeypatch.setattr(dcp_io, "read_streaming", streaming)
        monkeypatch.setattr(dcp_io, "_fast_metadata", fast)


@pytest.fixture
def routes(monkeypatch):
    return _Routes(monkeypatch)


@pytest.fixture(scope="module")
def nested(tmp_path_factory):
    """300 tensors of several dtypes and shapes under "model" (a .metadata of several frames)."""
    return _save(tmp_path_factory.mktemp("nested") / "ckpt", {"model": _tensors(300)})


def test_torchs_folders_of_tensors_are_streamed_and_read_as_the_restricted_unpickler_reads_them(
        nested, tmp_path, routes):
    flat = _save(tmp_path / "flat", _tensors(40))  # paths of one step: (key,)
    deep = _save(tmp_path / "deep", {"model": {"w": torch.ones(3)}, "ema": {"model": {"w": torch.zeros(3)}}})
    for folder in (nested, flat, deep):
        streamed = routes.streamed
        fast = _outcome(folder, True)
        assert routes.streamed == streamed + 1, folder
        assert fast[0] == "read" and fast == _outcome(folder, False)
    assert routes.tables == 0


def test_values_and_lists_beside_the_tensors_are_streamed_too(tmp_path, routes, small):
    """Values that are not tensors (a step counter, a learning rate, a list of names), read once
    every place is known, in torch's order; lists among the paths (an optimizer's param_groups):
    read as the tables' way reads them."""
    folder = _save(tmp_path / "ckpt", {"model": _tensors(20), "step": 3, "extra": {"lr": 0.1, "names": ["a"]},
                                       "lst": [torch.ones(2), torch.zeros(3, dtype=torch.int8)],
                                       "optim": {"param_groups": [{"lr": 0.1, "params": ["layers.0.w0"]}]}})
    for each in (folder, small):
        fast = _outcome(each, True)
        assert fast[0] == "read" and fast == _outcome(each, False)
    assert (routes.streamed, routes.tables) == (2, 0)


def test_tensors_of_several_chunks_are_read_the_tables_way(tmp_path, routes):
    """Tensors split in chunks (FSDP, ranks): the tables' way, as before, once the first one is
    read (not the whole of state_dict_metadata first)."""
    folder = tmp_path / "rows"
    _handmade_chunks(folder)
    fast = _outcome(folder, True)
    assert (routes.streamed, routes.tables) == (0, 1)
    assert fast[0] == "read" and fast == _outcome(folder, False)


def test_mutated_metadata_of_tensors_alone_reads_alike_by_either_reader(nested, tmp_path, routes):
    """Mutations of a .metadata that streams: read or refused, exactly as the restricted
    unpickler's route. Small changes anywhere (most are refused: a key no longer its path's, a
    memo index to another slot), then integers alone (a size, an offset, a length, a memory
    format), many of them still read, and streamed."""
    folder = tmp_path / "ckpt"
    folder.mkdir()
    (folder / "__0_0.distcp").symlink_to(nested / "__0_0.distcp")
    original = (nested / ".metadata").read_bytes()
    arguments, rng, outcomes = _arguments(original), random.Random(1804), set()
    numbers = [(at, size) for at, size in arguments if original[at - 1] in b"KMJ"]  # BININT1, BININT2, BININT
    for trial in range(120):
        if trial < 80:
            data = _mutate(original, arguments, rng)
        else:
            data = bytearray(original)
            start, size = rng.choice(numbers)
            at = start + rng.randrange(size)
            data[at] = rng.choice([data[at] ^ 1, data[at] + 1 & 255, data[at] - 1 & 255, rng.randrange(256)])
        (folder / ".metadata").write_bytes(bytes(data))
        fast = _outcome(folder, True, read=False)
        assert fast == _outcome(folder, False, read=False)
        outcomes.add(fast[0])
    assert routes.streamed >= 6 and {"read", "refused"} <= outcomes, (routes.streamed, outcomes)


_STARTS = frozenset(b"\x8cXhjKMJ\x8a)}]N\x88\x89")  # opcodes an object's pickle may begin with (not MARK: a batch's too)


def _reframed(data: bytes, rng: random.Random) -> bytes:
    """The same opcodes in frames of a few opcodes each, each boundary where pickle.dump may put
    one — where an object's pickle begins — but far more often than it does."""
    positions = [pos for _, _, pos in pickletools.genops(data)] + [len(data)]
    pieces = [data[a:b] for a, b in zip(positions, positions[1:]) if data[a] != 0x95 and a >= 2]
    starts = [i for i, piece in enumerate(pieces) if i and piece[0] in _STARTS]
    cuts = sorted({0, *rng.sample(starts, len(starts) // 3)})
    frames = [b"".join(pieces[a:b]) for a, b in zip(cuts, cuts[1:] + [len(pieces)])]
    return data[:2] + b"".join(b"\x95" + struct.pack("<Q", len(f)) + f for f in frames)


def test_frames_at_any_object_are_skipped_where_they_lie(nested, tmp_path, routes):
    """Frame boundaries before a third of the objects, at random: the runs of records read at
    once stop at each, and what is read token by token skips it; read as by the restricted
    unpickler, and streamed. (A boundary pickle.dump never makes — between a string and its
    MEMOIZE — leaves the file to the restricted unpickler: test_dcp_scale.)"""
    folder = tmp_path / "ckpt"
    folder.mkdir()
    (folder / "__0_0.distcp").symlink_to(nested / "__0_0.distcp")
    original, expected = (nested / ".metadata").read_bytes(), _outcome(nested, False)
    rng = random.Random(18)
    for _ in range(3):
        (folder / ".metadata").write_bytes(_reframed(original, rng))
        fast = _outcome(folder, True)
        assert fast == _outcome(folder, False)
        assert fast[0] == "read" and fast[1]["tensors"] == expected[1]["tensors"]
    assert routes.streamed == 3


def _handmade(folder, count: int) -> None:
    """`count` one-chunk float32 tensors of 4 elements under "model", torch's own records
    pickled as torch pickles them, the data raw bytes."""
    folder.mkdir()
    entries, places, planner = {}, {}, {}
    for i in range(count):
        key = f"model.layers.{i // 64}.experts.{i % 64}.w"
        entries[key] = TensorStorageMetadata(TensorProperties(dtype=torch.float32), torch.Size([4]),
                                             [ChunkStorageMetadata(torch.Size([0]), torch.Size([4]))])
        places[MetadataIndex(key, [0], 0)] = _StorageInfo("__0_0.distcp", 16 * i, 16)
        planner[key] = ("model", key[6:])
    (folder / "__0_0.distcp").write_bytes(bytes(16 * count))
    meta = Metadata(state_dict_metadata=entries, planner_data=planner, storage_data=places,
                    storage_meta=StorageMeta(), version="1.0.0")
    (folder / ".metadata").write_bytes(pickle.dumps(meta, protocol=4))


def test_reading_20000_keys_stays_within_twice_the_metadata(tmp_path, routes):
    """The whole read — the pickle's memo, the tensors, the tree — at its peak under twice the
    size of `.metadata` (it was ~4x, with an unframed copy, the memo's 26 slots a key and three
    tables), and what is kept under 400 bytes a key."""
    folder = tmp_path / "ckpt"
    _handmade(folder, 20_000)
    size = (folder / ".metadata").stat().st_size
    dcp_io.read_dcp(str(tmp_path / "ckpt"), None).close()  # (imports, compiled expressions: not counted)
    tracemalloc.start()
    try:
        ckpt = dcp_io.read_dcp(str(folder), None)
        kept, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    with ckpt:
        assert len(ckpt.tensors) == 20_000 and ckpt.root == "model"
        assert ckpt.tensors["layers.312.experts.31.w"].storage.place()[1] == 16 * 19999
    assert routes.streamed == 2
    assert peak < 2 * size, (peak, size)
    assert kept < 400 * 20_000, kept
