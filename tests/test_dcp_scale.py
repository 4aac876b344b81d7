"""DCP folders at scale (issue 18 §4, item 2): listing a folder reads `.metadata` alone, each
chunk's archive opened only when its tensor's bytes are read; and `.metadata` as torch writes it
is read by dcp_pickles.fast_metadata, which must give exactly what the restricted unpickler gives
(held to each other on torch's own folders and on thousands of mutated copies), leaving every
other file — hostile ones first — to the restricted unpickler, reported as before."""

from __future__ import annotations

import contextlib
import copy
import os
import pickle
import random
import struct
import warnings

import pytest
import torch
from torch.distributed.checkpoint.filesystem import _StorageInfo
from torch.distributed.checkpoint.metadata import (
    ChunkStorageMetadata, Metadata, MetadataIndex, StorageMeta, TensorProperties, TensorStorageMetadata,
)

from ckptsurgery.errors import CkptError
from ckptsurgery.io import dcp as dcp_io
from ckptsurgery.io.dcp_pickles import FastMetadata, Unfollowed, fast_metadata
from ckptsurgery.io.model import MappedFile, TensorRef
from ckptsurgery.io.pickled import InertGlobal, InertObject
from ckptsurgery.io.torch_zip import load_torch_zip
import test_dcp
from conftest import assert_one_error_line, dcp_storage, load_any, rewrite_dcp_metadata

two_ranks = test_dcp.two_ranks  # the folder two FSDP2 ranks saved (a session fixture, shared)


def _save(folder, state) -> str:
    import torch.distributed.checkpoint as dcp

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "torch.distributed is disabled ... single process"
        dcp.save(state, checkpoint_id=str(folder))
    return folder


def _tensors(count: int) -> dict:
    """`count` small tensors of several dtypes and shapes (a 0-d one among them)."""
    kinds = (torch.float32, torch.bfloat16, torch.int64, torch.float16)
    out = {f"layers.{i // 8}.w{i % 8}": torch.full((1 + i % 3, 2), i, dtype=kinds[i % 4]) for i in range(count)}
    out["scale"] = torch.tensor(2.5)
    return out


@pytest.fixture(scope="module")
def many(tmp_path_factory):
    """1001 entries (two SETITEMS batches in each table, the last of one item; a .metadata of
    several frames): tensors in "model" and in a list, optimizer-like nested values, a step."""
    state = {"model": _tensors(995), "lst": [torch.ones(2), torch.zeros(3, dtype=torch.int8)],
             "optim": {"param_groups": [{"lr": 0.1, "params": ["layers.0.w0"]}]}, "step": 3}
    folder = _save(tmp_path_factory.mktemp("many") / "ckpt", state)
    assert os.path.getsize(folder / ".metadata") > 3 * 65536
    return folder  # 996 keys in model, 2 in lst, lr and params, step: 1001 entries


@pytest.fixture
def small(tmp_path):
    """A folder of a few tensors and values, for mutating."""
    torch.manual_seed(0)
    state = {"model": {"emb.weight": torch.randn(5, 3), "ids": torch.arange(4), "half": torch.randn(2, 2).half(),
                       "scale": torch.tensor(2.5)}, "step": 7, "extra": {"lr": 0.1, "names": ["a", "b"]}}
    return _save(tmp_path / "small", state)


@contextlib.contextmanager
def _route(fast: bool):
    saved = dcp_io.FAST
    dcp_io.FAST = fast
    try:
        yield
    finally:
        dcp_io.FAST = saved


def _value(v, read: bool = True):
    """What a reader gave, as plain data to compare: every tensor's bytes read, or (`read`
    False) where each chunk's bytes lie and what is checked when they are read."""
    if isinstance(v, TensorRef):
        storage = v.storage
        where = ((storage.key, storage.location, bytes(v.data())) if read
                 else _value(getattr(storage, "_pending", None) or (storage.source, storage.offset), False))
        return ("tensor", v.dtype.name, v.shape, v.stride, v.offset, v.nbytes, v.requires_grad, v.plain_grad,
                v.math_bits, storage.nbytes, where)
    if isinstance(v, dict):
        return (type(v).__name__, [(k, _value(x, read)) for k, x in v.items()])
    if isinstance(v, (list, tuple)):
        return (type(v).__name__, [_value(x, read) for x in v])
    if isinstance(v, (InertObject, InertGlobal)):
        return ("inert", type(v).__name__, v.qualname())
    if isinstance(v, (MappedFile, dcp_io._Reader)):
        return (type(v).__name__, getattr(v, "path", None) or v.folder)
    if callable(v) and hasattr(v, "__name__"):
        return ("function", v.__name__)
    return ("value", type(v).__name__, repr(v)[:300])


def _outcome(folder, fast: bool, read: bool = True):
    """("read", everything the checkpoint holds) or ("refused", the error), by one route."""
    with _route(fast):
        try:
            ckpt = dcp_io.read_dcp(str(folder), None)
        except CkptError as e:
            return "refused", str(e)
        try:
            with ckpt:
                return "read", {
                    "root": ckpt.root, "tensors": [(k, _value(t, read)) for k, t in ckpt.tensors.items()],
                    "tree": _value(ckpt.obj, read), "others": _value(dict(ckpt.others), read),
                    "shares": ckpt.shares_with(), "events": [_value(e) for e in ckpt.events],
                    "sources": [s.path for s in ckpt.sources]}
        except CkptError as e:  # a chunk refused when its bytes are read
            return "refused when read", str(e)


def _follows(folder) -> bool:
    try:
        return isinstance(fast_metadata((folder / ".metadata").read_bytes()), FastMetadata)
    except Unfollowed:
        return False


# ---- listing a folder opens no chunk ------------------------------------------------------------------

def test_inspect_opens_no_chunk_archive_and_reading_bytes_opens_each_once(cli, tmp_path, monkeypatch):
    folder = _save(tmp_path / "ckpt", {"model": _tensors(300)})
    opened, unzipped = [], []
    real_open, real_unzip = dcp_io._Reader._chunk_archive, dcp_io.load_torch_zip
    monkeypatch.setattr(dcp_io._Reader, "_chunk_archive", lambda self, *a: opened.append(a[1:3]) or real_open(self, *a))
    monkeypatch.setattr(dcp_io, "load_torch_zip", lambda *a, **k: unzipped.append(a[1:3]) or real_unzip(*a, **k))
    doc = cli("inspect", folder, "--json").json()
    assert len(doc["tensors"]) == 301 and opened == [] == unzipped
    assert {t["name"]: t["shape"] for t in doc["tensors"]}["layers.0.w2"] == [3, 2]
    assert cli("inspect", folder, "--stats", "--json").code == 0
    assert len(opened) == len(set(opened)) == 301
    assert len(unzipped) == 4 * 3 + 1  # by zipfile: the first chunk of each dtype and shape; the rest without
    out = tmp_path / "o.safetensors"
    assert cli("convert", folder, "-o", out).code == 0
    assert torch.equal(load_any(out)["layers.9.w5"], torch.full((3, 2), 77, dtype=torch.bfloat16))


def test_a_corrupt_data_file_is_listed_by_inspect_and_refused_in_one_line_when_read(cli, tmp_path):
    folder = _save(tmp_path / "ckpt", {"model": _tensors(200)})
    data = folder / "__0_0.distcp"
    data.write_bytes(bytes(data.stat().st_size))  # every chunk's archive gone: zeros
    doc = cli("inspect", folder, "--json").json()
    assert len(doc["tensors"]) == 201 and doc["inert"] == []
    out = tmp_path / "o.safetensors"
    assert_one_error_line(cli("convert", folder, "-o", out), "layers.0.w0", "its chunk holds")
    assert not out.exists()
    assert_one_error_line(cli("inspect", folder, "--stats"), "its chunk holds")


@pytest.mark.parametrize("same_records", [False, True], ids=["records_alike", "one_record_twice"])
def test_keys_naming_one_chunk_share_one_tensor_as_before(small, same_records):
    """A second key whose records name model.ids's byte range as int64 (4,): one tensor (inspect
    says the second shares the first's bytes), whichever reader reads the metadata. The same
    records pickled twice are memo references, which the fast reader leaves to the restricted one."""
    def point(meta):
        entry, info = meta.state_dict_metadata["model.ids"], dcp_storage(meta, "model.ids")
        if not same_records:
            entry, info = copy.deepcopy(entry), _StorageInfo(info.relative_path, info.offset, info.length)
        meta.state_dict_metadata["model.ids2"] = entry
        meta.storage_data[MetadataIndex("model.ids2", [0], 0)] = info
        meta.planner_data["model.ids2"] = ("model", "ids2")
    rewrite_dcp_metadata(small, point)
    assert _follows(small) is not same_records
    fast = _outcome(small, True)
    assert fast == _outcome(small, False)
    assert fast[0] == "read" and fast[1]["shares"]["ids2"] == "ids"


def _archive_outcome(read):
    try:
        value, events = read()
    except CkptError as e:
        return "refused", str(e)
    if not isinstance(value, TensorRef):
        return "read", _value(value), [_value(e) for e in events]
    storage = value.storage
    return ("read", value.dtype.name, value.shape, value.stride, value.offset, value.requires_grad, value.plain_grad,
            value.wrap, value.param_state, value.quant, value.math_bits, storage.source.path, storage.offset,
            storage.nbytes, storage.key, storage.location, [_value(e) for e in events])


def test_chunk_archives_read_without_zipfile_are_what_load_torch_zip_reads(tmp_path):
    """An archive laid out as torch.save lays one out, whose data.pkl was read before, is read
    without zipfile: 600 mutated archives (a byte changed in their central directory, headers,
    names, CRCs, data.pkl or data) give what load_torch_zip gives, tensor or refusal."""
    folder = _save(tmp_path / "ckpt", {"model": _tensors(40)})
    meta = pickle.loads((folder / ".metadata").read_bytes())
    ranges = [(info.offset, info.length) for info in meta.storage_data.values()]
    original = (folder / "__0_0.distcp").read_bytes()
    rng, lean = random.Random(18), 0
    for _ in range(600):
        start, length = rng.choice(ranges)
        archive = bytearray(original[start : start + length])
        at = rng.choice([rng.randrange(length), length - 1 - rng.randrange(min(length, 500)), rng.randrange(300)])
        archive[at] = rng.choice([rng.randrange(256), archive[at] ^ 1, archive[at] + 1 & 255, 0])
        (folder / "__0_0.distcp").write_bytes(original + archive)
        reader = dcp_io._Reader(str(folder), [])
        source = reader.file("__0_0.distcp", "w")
        for offset, size in ranges:  # the unchanged archives first: their data.pkls are known
            reader._chunk_archive(source, offset, size, "w")
        unzipped = []
        with pytest.MonkeyPatch.context() as patch:
            patch.setattr(dcp_io, "load_torch_zip", lambda *a, **k: unzipped.append(1) or load_torch_zip(*a, **k))
            got = _archive_outcome(lambda: reader._chunk_archive(source, len(original), length, "w"))
        assert got == _archive_outcome(lambda: load_torch_zip(source, len(original), length, "w", [0]))
        lean += not unzipped
        source.close()
    assert lean >= 100, lean


# ---- fast_metadata reads what the restricted unpickler reads --------------------------------------------

def test_the_fast_reader_follows_torchs_own_folders_and_reads_them_alike(many, two_ranks, tmp_path):
    fsdp_like = _handmade(tmp_path / "rows")
    for folder in (many, two_ranks[0], fsdp_like):
        assert _follows(folder), folder
        fast = _outcome(folder, True)
        assert fast[0] == "read" and fast == _outcome(folder, False)
    assert len(fast_metadata((many / ".metadata").read_bytes()).entries) == 1001


def _handmade(folder):
    """Tensors split in rows over two files, in columns, and one of a single chunk: torch's own
    records pickled as torch pickles them (pickle.dump), the data raw bytes."""
    folder.mkdir()
    entries, places, files = {}, {}, {"__0_0.distcp": bytearray(), "__1_0.distcp": bytearray()}
    layouts = {"rows": [((0, 0), (3, 4), 0), ((3, 0), (2, 4), 1)], "cols": [((0, 0), (5, 1), 0), ((0, 1), (5, 3), 1)],
               "one": [((0, 0), (5, 4), 1)]}
    for number, (name, chunks) in enumerate(layouts.items()):
        full = torch.arange(20, dtype=torch.float32).reshape(5, 4) + 100 * number
        for offsets, sizes, rank in chunks:
            block = full[offsets[0] : offsets[0] + sizes[0], offsets[1] : offsets[1] + sizes[1]]
            raw = block.contiguous().numpy().tobytes()
            data = files[f"__{rank}_0.distcp"]
            places[MetadataIndex(name, offsets, 0)] = _StorageInfo(f"__{rank}_0.distcp", len(data), len(raw))
            data += raw
        pieces = [ChunkStorageMetadata(torch.Size(o), torch.Size(s)) for o, s, _ in chunks]
        entries[name] = TensorStorageMetadata(TensorProperties(dtype=torch.float32), torch.Size([5, 4]), pieces)
    for name, data in files.items():
        (folder / name).write_bytes(data)
    meta = Metadata(state_dict_metadata=entries, planner_data={n: (n,) for n in entries}, storage_data=places,
                    storage_meta=StorageMeta(), version="1.0.0")
    (folder / ".metadata").write_bytes(pickle.dumps(meta, protocol=4))
    return folder


def _arguments(data: bytes) -> list[tuple[int, int]]:
    """(position, length) of each opcode's argument in a pickle: integers, strings, memo indexes."""
    import pickletools

    out, ops = [], list(pickletools.genops(data))
    for (op, _, pos), (_, _, after) in zip(ops, ops[1:] + [(None, None, len(data))]):
        if after - pos > 1 and op.name != "FRAME":
            out.append((pos + 1, after - pos - 1))
    return out


def _mutate(data: bytes, arguments: list, rng: random.Random) -> bytes:
    """One small change: a byte of an opcode's argument (an integer, a string, a memo index:
    what keeps a pickle a pickle), a byte anywhere, a run of bytes copied over another, or bytes
    cut out."""
    data = bytearray(data)
    kind = rng.random()
    at = rng.randrange(len(data) // 8, len(data))
    if kind < 0.5:
        start, size = rng.choice(arguments)
        at = start + rng.randrange(size)
        data[at] = rng.choice([rng.randrange(256), data[at] ^ 1, data[at] + 1 & 255, data[at] - 1 & 255, 0x94])
    elif kind < 0.75:
        data[at] = rng.choice([rng.randrange(256), data[at] ^ 1, data[at] + 1 & 255, 0])
    elif kind < 0.9:
        source, size = rng.randrange(len(data)), rng.randrange(1, 12)
        data[at : at + size] = data[source : source + size]
    else:
        del data[at : at + rng.randrange(1, 6)]
    return bytes(data)


@pytest.mark.parametrize("keys", [4, 300])
def test_mutated_metadata_reads_alike_by_either_reader(tmp_path, small, keys):
    """Mutations of a real .metadata (of a few keys; of 300, over two frames): read (every
    tensor's bytes too) or refused, the fast reader's route gives exactly what the restricted
    unpickler's gives — the same error line where it refuses — and follows a share of them
    itself (an integer, a string, a memo index changed)."""
    folder = small if keys == 4 else _save(tmp_path / "mid", {"model": _tensors(keys), "step": 1})
    original = (folder / ".metadata").read_bytes()
    arguments, rng, followed, outcomes = _arguments(original), random.Random(18 + keys), 0, set()
    trials, read = (400, True) if keys == 4 else (80, False)  # (300 keys: where bytes lie, not the bytes)
    for _ in range(trials):
        (folder / ".metadata").write_bytes(_mutate(original, arguments, rng))
        fast = _outcome(folder, True, read)
        assert fast == _outcome(folder, False, read)
        followed += _follows(folder)
        outcomes.add(fast[0])
    assert followed >= trials // 10 and {"read", "refused"} <= outcomes, (followed, outcomes)


def test_frames_split_where_pickle_dump_never_splits_are_left_to_the_restricted_unpickler(tmp_path, small):
    """A frame boundary between two opcodes is followed (and reads as before); one inside a token
    is not: the restricted unpickler reads the frame's header as part of the token (here a
    string, no longer UTF-8), and its refusal stands."""
    original = (small / ".metadata").read_bytes()
    assert original[2] == 0x95 and len(original) == 11 + struct.unpack("<Q", original[3:11])[0]
    body = original[11:]
    inside = body.index(b"model.emb.weight") + 3  # within the first key's string
    between = body.index(b"model.emb.weight") - 2  # at the SHORT_BINUNICODE opcode that starts it
    expected = _outcome(small, False)
    for split, follows in ((between, True), (inside, False)):
        framed = b"".join([original[:2], b"\x95", struct.pack("<Q", split), body[:split],
                           b"\x95", struct.pack("<Q", len(body) - split), body[split:]])
        (small / ".metadata").write_bytes(framed)
        assert _follows(small) is follows
        outcome = _outcome(small, True)
        assert outcome == _outcome(small, False)
        assert outcome == expected if follows else outcome[0] == "refused" and "UnicodeDecodeError" in outcome[1]


class _Call:
    def __init__(self, func, *args):
        self.func, self.args = func, args

    def __reduce__(self):
        return self.func, self.args


@pytest.mark.parametrize("hide", [
    lambda m, p: setattr(m.storage_meta, "modules", [p]),
    lambda m, p: setattr(m, "notes", p),
    lambda m, p: setattr(m.state_dict_metadata["model.ids"].chunks[0], "comment", p),
    lambda m, p: m.planner_data.__setitem__("unused", p),
    lambda m, p: setattr(m.state_dict_metadata["model.ids"].properties, "requires_grad", p),
    lambda m, p: setattr(dcp_storage(m, "model.ids"), "relative_path", p),
], ids=["storage_meta", "metadata_attribute", "chunk_attribute", "unused_planner_path", "properties", "file_name"])
def test_a_payload_anywhere_leaves_the_file_to_the_restricted_unpickler(cli, small, hide):
    rewrite_dcp_metadata(small, lambda m: hide(m, _Call(os.system, "true")))
    assert not _follows(small)
    assert _outcome(small, True) == _outcome(small, False)
    result = cli("inspect", small, "--json")
    if result.code == 0:
        assert "posix.system" in result.json()["inert"]
    else:  # a payload where read_dcp needs a value (a file name) is refused, and named
        assert_one_error_line(result)
