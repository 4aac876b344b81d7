"""The per-key fast paths of issue 9 part 4 (Scale) keep every rule of the slow ones: the
unpickler's nesting bound, the safetensors header checks (each layout checked once), the
collector paused only while a file is read, and writers that copy runs of tensors at once
(zero-element views far past their storage included); chains of calls on placeholders count as
nesting."""

from __future__ import annotations

import gc
import io
import json
import pickle
import struct

import pytest
import torch
from safetensors.torch import load_file, save_file

from ckptsurgery.errors import CkptError
from ckptsurgery.io import open_checkpoint
from ckptsurgery.io.unpickler import MAX_NESTING, safe_load
from conftest import assert_one_error_line
from test_hostile_opcodes import D, G, I, PROTO2, U, checkpoint, tensor, zip_file


def _load(obj):
    return safe_load(io.BytesIO(pickle.dumps(obj, protocol=2)), lambda pid: pid, "test")[0]


def _lists(depth: int, innermost):
    value = innermost
    for _ in range(depth - 1):
        value = [value]
    return value


def _tuples(depth: int):
    value = (1,)
    for _ in range(depth - 1):
        value = (value,)
    return value


@pytest.mark.parametrize("build", [
    lambda d: _lists(d, []),  # built empty: counted one level short, never more
    lambda d: _lists(d, [1]),
    _tuples,
])
def test_nesting_bound_holds_at_its_edge(build):
    _load(build(MAX_NESTING))  # as deep as allowed: read
    with pytest.raises(CkptError, match="nests containers more than"):
        _load(build(MAX_NESTING + 2))


def test_collector_is_back_after_a_read_and_after_a_failed_one(tmp_path):
    good, bad = tmp_path / "good.pth", tmp_path / "bad.pth"
    torch.save({"w": torch.ones(2)}, good)
    bad.write_bytes(good.read_bytes()[:-40])
    assert gc.isenabled()
    open_checkpoint(str(good)).close()
    assert gc.isenabled()
    with pytest.raises(CkptError):
        open_checkpoint(str(bad))
    assert gc.isenabled()


def _safetensors(path, header: dict, data: bytes) -> str:
    raw = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + data)
    return str(path)


@pytest.mark.parametrize("second, expect", [
    ({"dtype": "F32", "shape": [True], "data_offsets": [4, 8]}, "shape"),  # bool: a cached (1,) must not match
    ({"dtype": "F32", "shape": [1.0], "data_offsets": [4, 8]}, "shape"),
    ({"dtype": "F32", "shape": [1], "data_offsets": [True, 8]}, "data_offsets"),
    ({"dtype": "F32", "shape": [1], "data_offsets": [4.0, 8]}, "data_offsets"),
    ({"dtype": "F32", "shape": [1], "data_offsets": [4, 8, 8]}, "data_offsets"),
    ({"dtype": "F32", "shape": [1], "data_offsets": [4, 12]}, "outside"),
    ({"dtype": "F32", "shape": [1], "data_offsets": [4, 4]}, "0 bytes for 1 float32"),
    ({"dtype": ["F32"], "shape": [1], "data_offsets": [4, 8]}, "unknown dtype"),
    ({"dtype": "F32", "shape": "1", "data_offsets": [4, 8]}, "shape"),
    ([1], "not an object"),
])
def test_a_layout_seen_before_does_not_excuse_a_bad_entry(tmp_path, second, expect):
    first = {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}
    path = _safetensors(tmp_path / "x.safetensors", {"a": first, "b": second}, bytes(8))
    with pytest.raises(CkptError, match=expect):
        open_checkpoint(path)


def test_tensors_listed_out_of_byte_order_are_read(tmp_path):
    header = {"b": {"dtype": "F32", "shape": [1], "data_offsets": [4, 8]},
              "a": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}}
    path = _safetensors(tmp_path / "x.safetensors", header, struct.pack("<2f", 1.0, 2.0))
    with open_checkpoint(path) as ckpt:
        assert list(ckpt.tensors) == ["b", "a"]
        assert ckpt.tensors["b"].to_torch().item() == 2.0


def test_no_tensors_and_bytes_after_them_is_refused(tmp_path):
    path = _safetensors(tmp_path / "x.safetensors", {}, bytes(8))
    with pytest.raises(CkptError, match="8 bytes after the last tensor"):
        open_checkpoint(path)


def test_runs_of_tensors_copied_at_once_keep_every_byte(cli, tmp_path):
    """Small tensors back to back (one copy), a large one (the kernel's copy), a strided view
    (computed) and a cast between them: the output equals what torch holds."""
    sd = {f"s{i}": torch.arange(i, i + 3, dtype=torch.float32) for i in range(50)}
    sd["big"] = torch.randn(300, 300)
    sd["view"] = torch.randn(8, 6).t()
    sd["half"] = torch.randn(5).half()
    sd.update({f"t{i}": torch.full((2,), float(i)) for i in range(20)})
    src = tmp_path / "in.safetensors"
    save_file({k: v.contiguous() for k, v in sd.items()}, src)
    pth = tmp_path / "in.pth"
    torch.save(sd, pth)
    for source in (src, pth):
        out = tmp_path / f"out-{source.suffix[1:]}.safetensors"
        assert cli("convert", source, "-o", out).code == 0
        back = load_file(out)
        assert set(back) == set(sd)
        for name, value in sd.items():
            assert torch.equal(back[name], value), name


def test_an_existing_output_stays_at_its_path_until_the_new_one_replaces_it(cli, tmp_path, monkeypatch):
    """--force over an existing file: the old file is kept aside by a second link, so OUT never
    goes missing between the two steps (a job reading it meanwhile sees the old or the new file)."""
    import os

    src = tmp_path / "in.pth"
    torch.save({"w": torch.ones(3)}, src)
    out = tmp_path / "out.safetensors"
    out.write_bytes(b"the old output")
    real_replace, seen = os.replace, []

    def replace(a, b, *args, **kwargs):
        if os.fspath(b) == str(out):
            seen.append(out.read_bytes())  # what a reader would find at that moment
        return real_replace(a, b, *args, **kwargs)

    monkeypatch.setattr(os, "replace", replace)
    assert cli("convert", src, "-o", out, "--force").code == 0
    assert seen == [b"the old output"]
    assert load_file(out)["w"].tolist() == [1.0, 1.0, 1.0]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in.pth", "out.safetensors"]


# ---- the safetensors writer: a zero-element tensor past its storage --------------------------

@pytest.mark.parametrize("empty_first", [True, False])
def test_zero_element_tensor_with_far_storage_offset_converts_to_safetensors(cli, tmp_path, empty_first):
    """torch accepts a zero-element view at any storage offset (checkInBoundsForStorage returns
    early for 0 bytes), and so does the reader (`_validate` stops at numel 0). Before 08fd444 the
    safetensors writer copied nothing for it; `_Runs.flush` now calls `MappedFile.view(start, 0)`
    with start = storage offset + 4e9 bytes, which refuses "data ... lies past the end of the file":
    a file torch loads, and ckptsurgery read and wrote before, was refused by convert."""
    empty = (U("empty"), tensor(numel=4, shape=(0,), stride=(1,), offset=10**9))
    full = (U("w"), tensor(numel=4, shape=(4,), stride=(1,), offset=0))
    entries = (empty, full) if empty_first else (full, empty)
    src = zip_file(tmp_path / "empty_view.pth", PROTO2 + D(*entries) + b".",
                   storages={"0": bytes(range(16))})
    loaded = torch.load(src, weights_only=True)  # torch itself reads it
    assert loaded["empty"].shape == (0,) and loaded["empty"].storage_offset() == 10**9

    assert cli("inspect", src).code == 0  # the reader accepts it
    out = tmp_path / "out.safetensors"
    result = cli("convert", src, "-o", out)
    assert result.code == 0, result.err
    written = load_file(str(out))
    assert written["empty"].shape == (0,)
    assert torch.equal(written["w"], loaded["w"])


# ---- placeholder calls on calls: the callee counts as nesting -----------------------------------

@pytest.mark.parametrize("args", [("inspect",), ("inspect", "--json"), ("convert", "-o", "out.pth")])
def test_chain_of_calls_on_placeholder_results_is_one_clear_line(cli, tmp_path, args):
    """m.n()()()...() 5,000 times (2 bytes a call, as torch's weights-only opcodes allow:
    GLOBAL, EMPTY_TUPLE, REDUCE). Each InertObject holds the previous one as its callee, but
    `load_reduce` records nesting from the arguments only — and since 08fd444 a call without
    arguments is not recorded at all — so the 5,000-deep chain passes MAX_NESTING, and
    `InertObject.qualname()` (reached from describe/extras) recurses 5,000 deep. Result: the
    catch-all "RecursionError: maximum recursion depth exceeded (set CKPTSURGERY_DEBUG=1 ...)"
    instead of the refusal the nesting bound promises. (Pre-existing since call-on-a-call
    support; the speed commit keeps it.)"""
    chain = G("m", "n") + b")R" * 5000
    src = zip_file(tmp_path / "calls.pth", checkpoint((U("x"), chain)))
    argv = [args[0], src, *[str(tmp_path / a) if a.endswith(".pth") else a for a in args[1:]]]
    result = cli(*argv)
    if result.code != 0:
        assert_one_error_line(result, str(src))
    assert "RecursionError" not in result.err


def test_chain_of_calls_with_arguments_is_bounded_too(cli, tmp_path):
    """The same chain with one argument per call (m.n(1)(1)(1)...): the arguments are atoms, so
    each result is recorded at depth 1 whatever its callee's depth."""
    chain = G("m", "n") + (I(1) + b"\x85R") * 5000
    src = zip_file(tmp_path / "calls1.pth", checkpoint((U("x"), chain)))
    result = cli("inspect", src)
    if result.code != 0:
        assert_one_error_line(result, str(src))
    assert "RecursionError" not in result.err
