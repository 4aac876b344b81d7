"""GGUF in (issue 21 §1): files written by the gguf package's own GGUFWriter, read by ckptsurgery —
plain tensors copied bit for bit, quantized ones equal to gguf.quants.dequantize's values byte for
byte — and hostile headers, each refused in one line."""

from __future__ import annotations

import json

import struct

import numpy as np
import pytest
from conftest import assert_one_error_line

gguf = pytest.importorskip("gguf")
from gguf.quants import dequantize, quantize  # noqa: E402

Q = gguf.GGMLQuantizationType
QUANTIZED = ("Q8_0", "Q4_0", "Q4_K", "Q6_K")


def _blocks(rng, qtype, rows: int, columns: int) -> np.ndarray:
    """`rows` × `columns` values in `qtype`'s blocks: quantized by gguf where it can (Q8_0, Q4_0),
    else random blocks (gguf-py has no Q4_K/Q6_K quantizer; any bytes are blocks it decodes)."""
    try:
        return quantize(rng.standard_normal((rows, columns)).astype(np.float32), qtype)
    except NotImplementedError:
        block, size = gguf.GGML_QUANT_SIZES[qtype]
        return rng.integers(0, 256, (rows, columns // block * size), dtype=np.uint8)


def write_gguf(path, tensors: dict, *, arch="llama", endianess=None) -> None:
    """tensors: name -> a numpy array (F32/F16/I8/I32...) or (raw array, GGML type)."""
    kwargs = {} if endianess is None else {"endianess": endianess}
    w = gguf.GGUFWriter(str(path), arch, **kwargs)
    w.add_block_count(2)
    w.add_string("general.name", "tiny")
    w.add_float32("tiny.scale", 0.5)
    w.add_bool("tiny.flag", True)
    w.add_array("tokenizer.ggml.tokens", [f"tok{i}" for i in range(40)])
    w.add_array("tokenizer.ggml.scores", [float(i) for i in range(40)])
    for name, value in tensors.items():
        if isinstance(value, tuple):
            raw, qtype = value
            w.add_tensor(name, raw, raw_shape=raw.shape, raw_dtype=qtype)
        else:
            w.add_tensor(name, value)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    rng = np.random.default_rng(21)
    tensors = {
        "token_embd.weight": rng.standard_normal((6, 4)).astype(np.float32),
        "blk.0.attn_norm.weight": rng.standard_normal(8).astype(np.float16),
        "blk.0.ffn_gate.weight": (rng.integers(0, 1 << 16, (2, 8), dtype=np.uint16), Q.BF16),
        "blk.0.ints8": rng.integers(-128, 128, (3, 4), dtype=np.int8),
        "blk.0.ints32": rng.integers(-1000, 1000, (5,), dtype=np.int32),
    }
    for name in QUANTIZED:
        tensors[f"blk.1.{name.lower()}.weight"] = (_blocks(rng, Q[name], 3, 512), Q[name])
    path = tmp_path_factory.mktemp("gguf") / "tiny.gguf"
    write_gguf(path, tensors)
    return path


def _reference(path) -> dict:
    """What gguf itself makes of each tensor: its array as stored, or dequantized."""
    reader = gguf.GGUFReader(str(path))
    out = {}
    for t in reader.tensors:
        data = np.asarray(t.data)
        if t.tensor_type.name in QUANTIZED:
            data = dequantize(data, t.tensor_type)
        out[t.name] = (t.tensor_type.name, data)
    return out


def test_inspect_json_lists_torch_shapes_types_and_metadata(cli, tiny):
    doc = cli("inspect", tiny, "--json").json()
    assert doc["format"] == "gguf"
    rows = {t["name"]: t for t in doc["tensors"]}
    assert {n: (r["dtype"], r["shape"]) for n, r in rows.items()} == {
        "token_embd.weight": ("float32", [6, 4]), "blk.0.attn_norm.weight": ("float16", [8]),
        "blk.0.ffn_gate.weight": ("bfloat16", [2, 8]), "blk.0.ints8": ("int8", [3, 4]),
        "blk.0.ints32": ("int32", [5]),
        **{f"blk.1.{q.lower()}.weight": (q, [3, 512]) for q in QUANTIZED}}
    block, size = gguf.GGML_QUANT_SIZES[Q.Q4_K]
    assert rows["blk.1.q4_k.weight"]["nbytes"] == 3 * 512 // block * size  # the file's bytes
    meta = doc["metadata"]
    assert meta["general.architecture"] == "llama" and meta["general.name"] == "tiny"
    assert meta["llama.block_count"] == 2 and meta["tiny.scale"] == 0.5 and meta["tiny.flag"] is True
    assert meta["tokenizer.ggml.tokens"] == [f"tok{i}" for i in range(40)]
    assert meta["tokenizer.ggml.scores"] == [float(i) for i in range(40)]
    human = cli("inspect", tiny).out
    assert "tokenizer.ggml.tokens=[40 values: 'tok0'" in human and "tok39" not in human
    assert "Q4_K" in human


def test_convert_copies_plain_tensors_and_dequantizes_the_others_as_gguf_does(cli, tiny, tmp_path):
    import safetensors
    import torch
    from safetensors.torch import load_file

    out = tmp_path / "out.safetensors"
    result = cli("convert", tiny, "-o", out)
    assert result.code == 0, result.err
    got = load_file(str(out))
    torch_dtypes = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16, "I8": torch.int8,
                    "I32": torch.int32, **{q: torch.float32 for q in QUANTIZED}}
    for name, (kind, want) in _reference(tiny).items():
        assert got[name].dtype == torch_dtypes[kind], name
        shape = [*want.shape[:-1], want.shape[-1] // 2] if kind == "BF16" else list(want.shape)  # gguf: its bytes
        assert list(got[name].shape) == shape, name
        assert got[name].contiguous().view(torch.uint8).numpy().tobytes() == np.ascontiguousarray(want).tobytes(), name
    with safetensors.safe_open(str(out), "pt") as f:
        assert f.metadata()["general.name"] == "tiny"  # text metadata carried; numbers and arrays left out
        assert "llama.block_count" not in f.metadata()


def test_plain_tensors_are_views_of_the_file_and_quantized_ones_are_chunked(tiny):
    from ckptsurgery.io import open_checkpoint
    from ckptsurgery.io.model import JoinedSource, MappedFile

    with open_checkpoint(str(tiny)) as ckpt:
        assert isinstance(ckpt.tensors["blk.0.attn_norm.weight"].storage.source, MappedFile)
        assert ckpt.tensors["blk.0.attn_norm.weight"].encoded is None
        q = ckpt.tensors["blk.1.q8_0.weight"]
        assert isinstance(q.storage.source, JoinedSource) and q.dtype.name == "float32"
        assert q.encoded.type == "Q8_0"


@pytest.mark.parametrize("dtype", [None, "bf16"])
def test_small_chunks_give_the_same_bytes(cli, tiny, tmp_path, monkeypatch, dtype):
    import ckptsurgery.io.gguf as reader

    extra = ("--dtype", dtype) if dtype else ()
    assert cli("convert", tiny, "-o", tmp_path / "whole.safetensors", *extra).code == 0
    monkeypatch.setattr(reader, "CHUNK_BYTES", 100)  # one block a piece
    from ckptsurgery.io import open_checkpoint

    with open_checkpoint(str(tiny)) as ckpt:
        assert len(ckpt.tensors["blk.1.q4_0.weight"].storage.source.pieces) == 3 * 512 // 32
    assert cli("convert", tiny, "-o", tmp_path / "chunked.safetensors", *extra).code == 0
    assert (tmp_path / "whole.safetensors").read_bytes() == (tmp_path / "chunked.safetensors").read_bytes()
    if dtype:
        import torch
        from safetensors.torch import load_file

        got = load_file(str(tmp_path / "chunked.safetensors"))["blk.1.q8_0.weight"]
        want = torch.from_numpy(_reference(tiny)["blk.1.q8_0.weight"][1].copy()).to(torch.bfloat16)
        assert torch.equal(got, want)


def test_stats_of_a_quantized_tensor_read_each_block_about_once(cli, tiny, monkeypatch):
    import ckptsurgery.io.gguf as reader

    calls = []
    real = reader._Blocks.view
    monkeypatch.setattr(reader._Blocks, "view", lambda self, o, n: calls.append(n) or real(self, o, n))
    doc = cli("inspect", tiny, "--stats", "--keys", "blk.1.q6_k.weight", "--json").json()
    assert doc["tensors"][0]["min"] is not None
    assert sum(calls) == 3 * 512 * 4


def test_filter_and_diff_read_gguf(cli, tiny, tmp_path):
    out = tmp_path / "f.safetensors"
    assert cli("filter", tiny, "--keep", "blk.1", "-o", out).code == 0
    assert sorted(cli("inspect", out, "--json").json()["tensors"][i]["name"] for i in range(4)) == sorted(
        f"blk.1.{q.lower()}.weight" for q in QUANTIZED)
    full = tmp_path / "full.safetensors"
    assert cli("convert", tiny, "-o", full).code == 0
    same = cli("diff", tiny, full)
    assert same.code == 0, same.out + same.err
    assert cli("diff", tiny, out).code == 1


def test_a_file_of_123_tensors_is_not_taken_for_safetensors(cli, tmp_path):
    """GGUF's tensor count is at byte 8, where safetensors' header starts with "{" (123)."""
    path = tmp_path / "many.gguf"
    write_gguf(path, {f"t{i}": np.full(2, i, np.float32) for i in range(123)})
    doc = cli("inspect", path, "--json").json()
    assert doc["format"] == "gguf" and len(doc["tensors"]) == 123


def test_a_type_gguf_cannot_dequantize_is_listed_and_refused_when_read(cli, tmp_path):
    path = tmp_path / "q8k.gguf"
    block, size = gguf.GGML_QUANT_SIZES[Q.Q8_K]
    write_gguf(path, {"w": (np.zeros((1, size), np.uint8), Q.Q8_K)})
    assert cli("inspect", path, "--json").json()["tensors"][0]["dtype"] == "Q8_K"
    assert_one_error_line(cli("convert", path, "-o", tmp_path / "o.safetensors"), "'w'", "cannot dequantize Q8_K")
    assert not (tmp_path / "o.safetensors").exists()


def test_without_the_gguf_package_one_line_says_how_to_install_it(cli, tiny, monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "gguf", None)
    assert_one_error_line(cli("inspect", tiny), "pip install 'ckptsurgery[gguf]'")


def test_the_plain_types_are_ggufs_own_and_a_file_of_them_needs_no_gguf_package(cli, tmp_path, monkeypatch):
    import sys

    from ckptsurgery.io.gguf import PLAIN_TYPES

    for type_id, (name, dtype) in PLAIN_TYPES.items():
        assert gguf.GGMLQuantizationType(type_id).name == name
        assert gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType(type_id)] == (1, np.dtype(dtype.replace("bfloat16", "float16")).itemsize)
    path = tmp_path / "plain.gguf"
    write_gguf(path, {"w": np.ones((2, 4), np.float16), "n": np.arange(3, dtype=np.int32)})
    monkeypatch.setitem(sys.modules, "gguf", None)
    result = cli("inspect", path, "--json")
    assert result.code == 0, result.err
    assert [(t["name"], t["dtype"]) for t in json.loads(result.out)["tensors"]] == [("w", "float16"), ("n", "int32")]


def test_big_endian_files_are_refused(cli, tmp_path):
    path = tmp_path / "be.gguf"
    write_gguf(path, {"w": np.ones(4, np.float32)}, endianess=gguf.GGUFEndian.BIG)
    assert_one_error_line(cli("inspect", path), "big-endian")


# ---- hostile headers, built byte by byte -------------------------------------------------------

def _string(text: bytes) -> bytes:
    return struct.pack("<Q", len(text)) + text


def raw_gguf(tensors=(), kv=(), *, version=3, n_tensors=None, n_kv=None, data=b"", alignment=32) -> bytes:
    """tensors: (name, dims innermost first, type id, offset); kv: (key, type id, encoded value)."""
    head = b"GGUF" + struct.pack("<IQQ", version, len(tensors) if n_tensors is None else n_tensors,
                                 len(kv) if n_kv is None else n_kv)
    for key, kind, value in kv:
        head += _string(key) + struct.pack("<I", kind) + value
    for name, dims, kind, offset in tensors:
        head += _string(name) + struct.pack(f"<I{len(dims)}QIQ", len(dims), *dims, kind, offset)
    head += b"\0" * (-len(head) % alignment)
    return head + data


GOOD = [(b"w", (4,), 0, 0)]
HOSTILE = {
    "truncated": (raw_gguf(GOOD, data=b"\0" * 16)[:50], "runs past the end"),
    "truncated_data": (raw_gguf(GOOD, data=b"\0" * 8), "past the end"),
    "huge_n_tensors": (raw_gguf(n_tensors=2**62), "tensors, more than"),
    "huge_n_kv": (raw_gguf(n_kv=2**40), "metadata entries, more than"),
    "string_past_the_end": (raw_gguf(kv=[(b"k", 8, struct.pack("<Q", 2**40) + b"abc")]), "runs past the end"),
    "array_past_the_end": (raw_gguf(kv=[(b"k", 9, struct.pack("<IQ", 4, 2**50))]), "more than the rest"),
    "nested_arrays": (raw_gguf(kv=[(b"k", 9, struct.pack("<IQ", 9, 1) * 6 + struct.pack("<IQ", 0, 0))]),
                      "nests arrays"),
    "unknown_value_type": (raw_gguf(kv=[(b"k", 77, b"\0" * 8)]), "value type 77"),
    "offset_past_the_end": (raw_gguf([(b"w", (4,), 0, 1 << 20)], data=b"\0" * 16), "past the end"),
    "misaligned_offset": (raw_gguf([(b"w", (2,), 0, 0), (b"v", (2,), 0, 8)], data=b"\0" * 64),
                          "not a multiple of the alignment"),
    "overlap": (raw_gguf([(b"w", (8,), 0, 0), (b"v", (8,), 0, 0)], data=b"\0" * 64), "overlaps"),
    "unknown_type": (raw_gguf([(b"w", (4,), 99, 0)], data=b"\0" * 16), "GGML type 99"),
    "removed_type": (raw_gguf([(b"w", (32,), 4, 0)], data=b"\0" * 32), "GGML type 4"),
    "partial_block": (raw_gguf([(b"w", (33,), 8, 0)], data=b"\0" * 64), "not whole blocks"),
    "too_many_dims": (raw_gguf([(b"w", (1,) * 5, 0, 0)], data=b"\0" * 4), "5 dimensions"),
    "huge_shape": (raw_gguf([(b"w", (2**40, 2**40), 0, 0)], data=b"\0" * 4), "more elements"),
    "version_1": (raw_gguf(GOOD, version=1, data=b"\0" * 16), "version 1"),
    "version_4": (raw_gguf(GOOD, version=4, data=b"\0" * 16), "version 4"),
    "duplicate_key": (raw_gguf(kv=[(b"k", 4, b"\0" * 4)] * 2), "given twice"),
    "duplicate_tensor": (raw_gguf([(b"w", (4,), 0, 0), (b"w", (4,), 0, 32)], data=b"\0" * 64), "listed twice"),
    "bad_alignment": (raw_gguf(GOOD, kv=[(b"general.alignment", 4, struct.pack("<I", 3))], data=b"\0" * 16),
                      "general.alignment 3"),
    "long_name": (raw_gguf([(b"w" * 70000, (4,), 0, 0)], data=b"\0" * 16), "more than the 65,536 allowed"),
    "bad_utf8_name": (raw_gguf([(b"\xff\xfe", (4,), 0, 0)], data=b"\0" * 16), "not valid UTF-8"),
}


def test_a_well_formed_raw_file_reads(cli, tmp_path):
    """The builder itself makes files the reader accepts: each hostile case differs by its fault."""
    path = tmp_path / "ok.gguf"
    path.write_bytes(raw_gguf(GOOD, kv=[(b"general.alignment", 4, struct.pack("<I", 32))],
                              data=struct.pack("<4f", 1, 2, 3, 4)))
    doc = cli("inspect", path, "--json").json()
    assert doc["tensors"][0]["shape"] == [4] and doc["metadata"] == {"general.alignment": 32}


@pytest.mark.parametrize("case", sorted(HOSTILE))
def test_hostile_headers_are_refused_in_one_line(cli, tmp_path, case):
    data, fragment = HOSTILE[case]
    path = tmp_path / f"{case}.gguf"
    path.write_bytes(data)
    for args in (["inspect", path, "--json"], ["convert", path, "-o", tmp_path / "o.safetensors"]):
        assert_one_error_line(cli(*args), str(path), fragment)
    assert not (tmp_path / "o.safetensors").exists()


def test_the_metadata_arrays_are_bounded_in_all(cli, tiny, monkeypatch):
    import ckptsurgery.io.gguf as reader

    monkeypatch.setattr(reader, "MAX_ARRAY_VALUES", 60)  # tokens (40) and scores (40): 80 in all
    assert_one_error_line(cli("inspect", tiny), "tokenizer.ggml.scores", "more than 60 values in all")


def test_empty_and_0_d_tensors_read(cli, tmp_path):
    path = tmp_path / "edges.gguf"
    path.write_bytes(raw_gguf([(b"empty_q8", (0, 4), 8, 0), (b"scalar", (), 0, 0), (b"empty_q4k", (256, 0), 12, 32)],
                              data=struct.pack("<f", 2.5) + b"\0" * 60))
    doc = cli("inspect", path, "--json").json()
    assert [(t["name"], t["dtype"], t["shape"]) for t in doc["tensors"]] == [
        ("empty_q8", "Q8_0", [4, 0]), ("scalar", "float32", []), ("empty_q4k", "Q4_K", [0, 256])]
    out = tmp_path / "edges.safetensors"
    assert cli("convert", path, "-o", out, "--dtype", "bf16").code == 0
    from safetensors.torch import load_file

    got = load_file(str(out))
    assert got["scalar"].item() == 2.5 and got["empty_q8"].shape == (4, 0) and got["empty_q4k"].shape == (0, 256)
