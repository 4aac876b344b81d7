"""Broken input: exit 1, one line on stderr naming the file (a checkpoint, a --map file), no
traceback, nothing written."""

import json
import os
import struct
import zipfile

import pytest
import torch

from conftest import assert_one_error_line

ST_HEADER = {"w": {"dtype": "F32", "shape": [2, 2], "data_offsets": [0, 16]},
             "b": {"dtype": "F32", "shape": [2], "data_offsets": [16, 24]}}


def safetensors_bytes(header: dict, data_len: int = 24, length: int | None = None) -> bytes:
    raw = json.dumps(header).encode()
    return struct.pack("<Q", len(raw) if length is None else length) + raw + b"\0" * data_len


def assert_clean_failure(cli, tmp_path, path, expect: str):
    out_dir = tmp_path / "outdir"
    out_dir.mkdir(exist_ok=True)
    for args in (["inspect", path], ["inspect", path, "--json"], ["convert", path, "-o", out_dir / "o.safetensors"],
                 ["convert", path, "-o", out_dir / "o.pth"]):
        result = cli(*args)
        assert result.code == 1, (args, result.err)
        assert result.out == ""
        lines = result.err.strip().splitlines()
        assert len(lines) == 1 and "Traceback" not in result.err, result.err
        assert expect in lines[0], lines[0]
        assert str(path) in lines[0] or not os.path.exists(path) or os.path.isdir(path)
    assert os.listdir(out_dir) == []


@pytest.mark.parametrize("name, content, expect", [
    ("empty.safetensors", b"", "the file is empty"),
    ("text.pth", b"hello, I am not a checkpoint\n", "not a checkpoint ckptsurgery can read"),
    ("garbage.bin", bytes(range(256)) * 4, "not a checkpoint ckptsurgery can read"),
    ("raw.pkl", b"\x80\x04\x95\x05\x00\x00\x00\x00\x00\x00\x00K\x01.", "a bare pickle"),
    ("past_end.safetensors", safetensors_bytes(ST_HEADER, length=10**6), "runs past the end"),
    ("huge_len.safetensors", safetensors_bytes(ST_HEADER, length=2**63 - 5), "runs past the end"),
    ("bad_json.safetensors", struct.pack("<Q", 12) + b'{"w": {"dtyp', "not valid JSON"),
    ("not_object.safetensors", struct.pack("<Q", 2) + b"{}"[:1] + b"]", "not valid JSON"),
    ("dtype.safetensors", safetensors_bytes({"w": {"dtype": "F33", "shape": [2], "data_offsets": [0, 8]}}, 8),
     "unknown dtype 'F33'"),
    ("negative.safetensors", safetensors_bytes({"w": {"dtype": "F32", "shape": [-2], "data_offsets": [0, 8]}}, 8),
     "non-negative"),
    ("overlap.safetensors", safetensors_bytes(
        {"w": {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]},
         "b": {"dtype": "F32", "shape": [2], "data_offsets": [8, 16]}}, 16), "overlaps"),
    ("gap.safetensors", safetensors_bytes({"w": {"dtype": "F32", "shape": [2], "data_offsets": [8, 16]}}, 16),
     "gap"),
    ("range.safetensors", safetensors_bytes({"w": {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]}}, 8),
     "outside"),
    ("size.safetensors", safetensors_bytes({"w": {"dtype": "F32", "shape": [3], "data_offsets": [0, 8]}}, 8),
     "8 bytes for 3 float32 elements"),
    ("truncated.safetensors", safetensors_bytes(ST_HEADER)[:-5], "outside"),
    ("bad_meta.safetensors", safetensors_bytes({"__metadata__": {"a": 1}, **ST_HEADER}), "__metadata__"),
])
def test_broken_safetensors_and_garbage(cli, tmp_path, name, content, expect):
    path = tmp_path / name
    path.write_bytes(content)
    assert_clean_failure(cli, tmp_path, path, expect)


def test_missing_path_and_folder_without_index(cli, tmp_path):
    assert_clean_failure(cli, tmp_path, tmp_path / "nope.pth", "no such file")
    empty = tmp_path / "emptydir"
    empty.mkdir()
    assert_clean_failure(cli, tmp_path, empty, "no *.index.json")


def _rewrite_zip(src, dst, change):
    """Copy a torch zip record by record; `change(name, data)` returns new data or None to drop."""
    with zipfile.ZipFile(src) as zin, zipfile.ZipFile(dst, "w", zipfile.ZIP_STORED) as zout:
        for info in zin.infolist():
            data = change(info.filename, zin.read(info))
            if data is not None:
                zout.writestr(info.filename, data)


def test_zip_record_shorter_than_tensor(cli, tmp_path, zip_pth):
    bad = tmp_path / "short.pth"
    _rewrite_zip(zip_pth, bad, lambda n, d: d[:-4] if n.endswith("data/0") else d)
    assert_clean_failure(cli, tmp_path, bad, "shorter than its")


def test_zip_missing_record(cli, tmp_path, zip_pth):
    bad = tmp_path / "missing.pth"
    _rewrite_zip(zip_pth, bad, lambda n, d: None if n.endswith("data/1") else d)
    assert_clean_failure(cli, tmp_path, bad, "data/1 is missing")


def test_zip_without_data_pkl(cli, tmp_path, zip_pth):
    bad = tmp_path / "nopkl.pth"
    _rewrite_zip(zip_pth, bad, lambda n, d: None if n.endswith("data.pkl") else d)
    assert_clean_failure(cli, tmp_path, bad, "without a torch data.pkl")


def test_zip_with_broken_pickle(cli, tmp_path, zip_pth):
    bad = tmp_path / "badpkl.pth"
    _rewrite_zip(zip_pth, bad, lambda n, d: d[: len(d) // 2] if n.endswith("data.pkl") else d)
    assert_clean_failure(cli, tmp_path, bad, "not a valid pickle")


@pytest.mark.filterwarnings("ignore::DeprecationWarning")
def test_torchscript_archive_is_named(cli, tmp_path, net):
    path = tmp_path / "scripted.pt"
    torch.jit.save(torch.jit.script(torch.nn.Linear(2, 2)), path)
    assert_clean_failure(cli, tmp_path, path, "TorchScript")


@pytest.mark.parametrize("fixture", ["zip_pth", "legacy_pth"])
@pytest.mark.parametrize("fraction", [0.05, 0.3, 0.6, 0.9, 0.99])
def test_truncated_torch_files(cli, tmp_path, request, fixture, fraction):
    data = request.getfixturevalue(fixture).read_bytes()
    bad = tmp_path / "cut.pth"
    bad.write_bytes(data[: int(len(data) * fraction)])
    assert_clean_failure(cli, tmp_path, bad, str(bad))


def test_safetensors_truncated_everywhere(cli, tmp_path, safetensors_file):
    data = safetensors_file.read_bytes()
    for cut in range(1, len(data), max(1, len(data) // 25)):
        bad = tmp_path / "cut.safetensors"
        bad.write_bytes(data[:cut])
        result = cli("inspect", bad)
        assert result.code == 1 and "Traceback" not in result.err and len(result.err.splitlines()) == 1, cut


def test_unknown_storage_dtype_in_zip(cli, tmp_path, zip_pth):
    bad = tmp_path / "dtype.pth"
    _rewrite_zip(zip_pth, bad, lambda n, d: d.replace(b"FloatStorage", b"FloatStorXge") if n.endswith("data.pkl") else d)
    assert_clean_failure(cli, tmp_path, bad, "unknown storage type torch.FloatStorXge")


def test_view_reaching_past_its_storage(cli, tmp_path):
    import re

    good = tmp_path / "view.pth"
    torch.save({"v": torch.arange(10.0)[2:]}, good)  # storage of 10, view of 8 from offset 2
    bad = tmp_path / "past.pth"
    shrink = lambda d: re.sub(rb"(cpu(?:q.)?)K\n", lambda m: m.group(1) + b"K\x05", d, count=1)  # storage numel 10 -> 5
    _rewrite_zip(good, bad, lambda n, d: shrink(d) if n.endswith("data.pkl") else d)
    assert_clean_failure(cli, tmp_path, bad, "reaches element 9 of a storage holding 5")


def test_special_tensors_are_named(cli, tmp_path):
    """Sparse tensors are not read (quantized ones are: tests/test_dtypes.py)."""
    path = tmp_path / "special.pth"
    torch.save({"state_dict": {"w": torch.randn(3, 3).to_sparse(), "b": torch.zeros(1)}, "epoch": 1}, path)
    result = cli("inspect", path)
    assert result.code == 1 and "tensors of a kind ckptsurgery does not read (torch._utils._rebuild_sparse" in result.err


def test_pickle_cannot_rewrite_a_validated_tensor(cli, tmp_path, zip_pth):
    """BUILD right after a tensor's REDUCE would set its attributes past validation."""
    bad = tmp_path / "build.pth"
    # after the first tensor is rebuilt, set state {"offset": 10**12} on it
    import re

    state = b"}X\x06\x00\x00\x00offsetJ\x00\x00\x00\x7fsb"  # {"offset": 2**31 - 2**24}, BUILD
    inject = lambda d: re.sub(rb"(tq.R)", lambda m: m.group(1) + state, d, count=1, flags=re.DOTALL)  # noqa: E731
    _rewrite_zip(zip_pth, bad, lambda n, d: inject(d) if n.endswith("data.pkl") else d)
    assert_clean_failure(cli, tmp_path, bad, "sets state on a tensor")


# ---- errors that name the file ------------------------------------------------------------------

def test_safetensors_refusals_name_the_input(cli, tmp_path):
    """Refusing a quantized tensor for a .safetensors output: the one line names the input file."""
    q = torch.quantize_per_tensor(torch.randn(2), 0.1, 0, torch.qint8)
    src = tmp_path / "q.pth"
    torch.save({"w": q}, src)
    assert_one_error_line(cli("convert", src, "-o", tmp_path / "q.safetensors"), str(src))


def test_a_deeply_nested_map_json_is_one_error_line_naming_it(cli, tmp_path, flat):
    """rename --map with JSON nested 100,000 deep: one error line naming the file, as the shard index reader says 'nested too deeply' (not the catch-all RecursionError)."""
    deep = tmp_path / "deep.json"
    deep.write_text("[" * 100000 + "]" * 100000)
    result = cli("rename", flat, "-o", tmp_path / "o.pth", "--map", deep)
    assert_one_error_line(result, "deep.json", code=1)


def test_ckptsurgery_debug_shows_where_a_known_failure_was_raised(cli, tmp_path, monkeypatch):
    """CKPTSURGERY_DEBUG=1 printed the same one line as without it; it adds the traceback now."""
    plain = cli("inspect", tmp_path / "missing.pth")
    assert "Traceback" not in plain.err
    monkeypatch.setenv("CKPTSURGERY_DEBUG", "1")
    debug = cli("inspect", tmp_path / "missing.pth")
    assert debug.code == 1 and "Traceback" in debug.err and "CkptError" in debug.err
    assert debug.err.splitlines()[-1] == plain.err.strip()
