"""Every dtype torch 2.13 can save, in and out of every writer, checked by torch and safetensors
themselves; the dtype table checked against their own lists; and the exact bytes our writers
produce for a fixed input (known answers), so that an unintended change of format fails here; views of one storage keep their own dtypes."""

from __future__ import annotations

import hashlib
import io
import json
import pickletools
import struct
import warnings
import zipfile
from collections import OrderedDict

import pytest
import torch

from ckptsurgery import dtypes

warnings.filterwarnings("ignore", message=".*(ComplexHalf|quantiz).*")


def _all_torch_dtypes() -> list[torch.dtype]:
    return sorted({v for v in vars(torch).values() if isinstance(v, torch.dtype)}, key=str)


def _quantized(dtype, per_channel=False):
    x = torch.linspace(-1, 1, 6).reshape(2, 3)
    if per_channel:
        return torch.quantize_per_channel(x, torch.tensor([0.1, 0.05], dtype=torch.float64),
                                          torch.tensor([0, 2]), 0, dtype)
    return torch.quantize_per_tensor(x, 0.1, 2 if dtype != torch.qint32 else 0, dtype)


def sample(dtype: torch.dtype) -> torch.Tensor:
    """A small tensor of `dtype` with varied bytes (not all zeros)."""
    if str(dtype).startswith("torch.q"):
        return _quantized(dtype)
    raw = torch.arange(24, dtype=torch.uint8) * 37 + 5
    itemsize = torch.empty(0, dtype=dtype).element_size()
    if dtype == torch.bool:
        return raw[: 12].reshape(3, 4) % 2 == 1
    return raw[: 12 * itemsize].view(dtype).reshape(3, -1) if itemsize <= 2 else \
        torch.arange(12 * itemsize, dtype=torch.uint8).view(dtype).reshape(3, -1)


def savable() -> list[torch.dtype]:
    out = []
    for dtype in _all_torch_dtypes():
        try:
            torch.save({"t": sample(dtype)}, io.BytesIO())
        except Exception:  # noqa: BLE001  (torch.int1 and friends: no serialization)
            continue
        out.append(dtype)
    return out


SAVABLE = savable()
NAME = lambda d: str(d).removeprefix("torch.")  # noqa: E731


def same(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Bit for bit, scales and zero points included for quantized tensors."""
    if a.dtype != b.dtype or a.shape != b.shape:
        return False
    if a.is_quantized:
        if a.qscheme() != b.qscheme():
            return False
        if a.qscheme() == torch.per_tensor_affine:
            params = a.q_scale() == b.q_scale() and a.q_zero_point() == b.q_zero_point()
        else:
            params = (torch.equal(a.q_per_channel_scales(), b.q_per_channel_scales())
                      and torch.equal(a.q_per_channel_zero_points(), b.q_per_channel_zero_points())
                      and a.q_per_channel_axis() == b.q_per_channel_axis())
        return params and torch.equal(a.int_repr(), b.int_repr())
    a, b = a.resolve_conj().resolve_neg().contiguous(), b.resolve_conj().resolve_neg().contiguous()
    return a.reshape(-1).view(torch.uint8).tolist() == b.reshape(-1).view(torch.uint8).tolist()


# ---- the table -------------------------------------------------------------------------------

def _zip_globals(file) -> list[str]:
    with zipfile.ZipFile(file) as z:
        data = z.read(next(n for n in z.namelist() if n.endswith("data.pkl")))
    return [arg for op, arg, _ in pickletools.genops(data) if op.name == "GLOBAL"]


def _pickled_globals(obj) -> list[str]:
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    return _zip_globals(io.BytesIO(buffer.getvalue()))


def test_table_is_torchs_list_of_savable_dtypes():
    """Every dtype torch.save accepts is in the table, with torch's element size and the storage
    class torch pickles; nothing else is."""
    assert sorted(NAME(d) for d in SAVABLE) == sorted(dtypes.BY_NAME)
    for dtype in SAVABLE:
        row = dtypes.BY_NAME[NAME(dtype)]
        assert row.itemsize == torch.empty(0, dtype=dtype).element_size(), row
        names = _pickled_globals({"t": sample(dtype)})
        storage = "torch.storage UntypedStorage" if row.storage is None else f"torch {row.storage}"
        assert storage in names, (row, names)
        assert (f"torch {row.name}" in names) == (row.storage is None), (row, names)


def test_table_matches_safetensors_names():
    """Every dtype safetensors' torch module names maps to the same torch dtype here, and the
    codes it lacks a torch mapping for (F8_E8M0, F4) are read back by safetensors itself."""
    from safetensors.torch import _TYPES

    for code, dtype in _TYPES.items():
        assert dtypes.BY_SAFETENSORS[code].name == NAME(dtype), code
    assert set(dtypes.BY_SAFETENSORS) - set(_TYPES) <= {"F8_E8M0", "F4"}


# ---- round trips -----------------------------------------------------------------------------

@pytest.fixture(scope="module")
def every_dtype(tmp_path_factory):
    """One .pth (zip) and one legacy file holding a tensor of every savable dtype, plus
    per-channel quantized and conjugated tensors."""
    folder = tmp_path_factory.mktemp("dtypes")
    sd = OrderedDict((NAME(d), sample(d)) for d in SAVABLE)
    sd["qint8_per_channel"] = _quantized(torch.qint8, per_channel=True)
    sd["conj"] = torch.tensor([1 + 2j, 3 - 4j], dtype=torch.complex64).conj()
    zip_path, legacy_path = folder / "all.pth", folder / "all-legacy.pth"
    torch.save(sd, zip_path)
    torch.save(sd, legacy_path, _use_new_zipfile_serialization=False)
    return sd, zip_path, legacy_path


def _safetensors_ok(name: str) -> bool:
    return dtypes.BY_NAME[name].safetensors is not None if name in dtypes.BY_NAME else name == "conj"


def test_every_dtype_through_the_pth_writer(cli, tmp_path, every_dtype):
    """Zip and legacy inputs of every dtype -> .pth: torch.load(weights_only=True) reads them
    back bit for bit, scales and zero points included."""
    sd, zip_path, legacy_path = every_dtype
    for source in (zip_path, legacy_path):
        out = tmp_path / f"{source.stem}-copy.pth"
        result = cli("convert", source, "-o", out)
        assert result.code == 0, result.err
        back = torch.load(out, weights_only=True)
        assert list(back) == list(sd)
        for name, tensor in sd.items():
            assert same(back[name], tensor), name
        # written the way torch writes it: the same rebuild functions, storage classes and dtypes
        assert sorted(set(_pickled_globals(sd))) == sorted(set(_zip_globals(out)))


def test_every_dtype_inspected(cli, every_dtype):
    _, zip_path, legacy_path = every_dtype
    for source in (zip_path, legacy_path):
        doc = cli("inspect", source, "--json").json()
        found = {t["name"]: t["dtype"] for t in doc["tensors"]}
        assert all(found[n] == n for n in dtypes.BY_NAME), found
        assert found["qint8_per_channel"] == "qint8" and found["conj"] == "complex64"
        assert doc["inert"] == []


def test_every_dtype_through_the_safetensors_writer(cli, tmp_path, every_dtype):
    """Each dtype safetensors knows is written so that safetensors reads it back bit for bit
    (conj bits applied); each it does not know is refused with a line naming it, nothing written."""
    from safetensors import safe_open

    sd, zip_path, _ = every_dtype
    for name, tensor in sd.items():
        single = tmp_path / f"{name}.pth"
        torch.save({name: tensor}, single)
        out = tmp_path / f"{name}.safetensors"
        result = cli("convert", single, "-o", out)
        if not _safetensors_ok(name):
            assert result.code == 1 and name.split("_per")[0] in result.err and not out.exists(), (name, result.err)
            assert len(result.err.strip().splitlines()) == 1
            continue
        assert result.code == 0, (name, result.err)
        with safe_open(str(out), "pt") as f:
            assert same(f.get_tensor(name), tensor.resolve_conj()), name
        # and back to .pth: the same bytes again
        again = tmp_path / f"{name}-again.pth"
        assert cli("convert", out, "-o", again).code == 0
        assert same(torch.load(again, weights_only=True)[name], tensor.resolve_conj()), name


def test_quantized_for_safetensors_says_why(cli, tmp_path):
    path = tmp_path / "q.pth"
    torch.save({"q": _quantized(torch.quint8)}, path)
    result = cli("convert", path, "-o", tmp_path / "q.safetensors")
    assert result.code == 1 and "quantized" in result.err and "scales" in result.err


def test_packed_float4_shape_follows_safetensors(tmp_path, cli):
    """torch's float4_e2m1fn_x2 counts pairs of 4-bit floats; safetensors' F4 counts floats."""
    t = torch.arange(6, dtype=torch.uint8).view(torch.float4_e2m1fn_x2).reshape(2, 3)
    path = tmp_path / "f4.pth"
    torch.save({"w": t}, path)
    out = tmp_path / "f4.safetensors"
    assert cli("convert", path, "-o", out).code == 0
    header = json.loads(out.read_bytes()[8 : 8 + struct.unpack("<Q", out.read_bytes()[:8])[0]])
    assert header["w"]["dtype"] == "F4" and header["w"]["shape"] == [2, 6]
    doc = cli("inspect", out, "--json").json()
    assert doc["tensors"][0]["shape"] == [2, 3] and doc["tensors"][0]["dtype"] == "float4_e2m1fn_x2"


def test_dtype_cast_keeps_float8_quantized_and_integers(cli, tmp_path):
    """--dtype casts float16/bfloat16/float32/float64 only, and names what it kept."""
    sd = OrderedDict(w=torch.randn(3), d=torch.randn(2, dtype=torch.float64), f8=torch.randn(4).to(torch.float8_e4m3fn),
                     q=_quantized(torch.qint8), ids=torch.arange(3), mask=torch.tensor([True]))
    path = tmp_path / "mixed.pth"
    torch.save(sd, path)
    out = tmp_path / "half.pth"
    result = cli("convert", path, "-o", out, "--dtype", "fp16", "--json")
    assert result.code == 0, result.err
    assert result.json()["kept_dtype"] == ["f8", "q", "ids", "mask"]
    back = torch.load(out, weights_only=True)
    assert back["w"].dtype == back["d"].dtype == torch.float16
    for name in ("f8", "q", "ids", "mask"):
        assert same(back[name], sd[name]), name


def test_quantized_stats_are_dequantized(cli, tmp_path):
    q = _quantized(torch.qint8, per_channel=True)
    path = tmp_path / "q.pth"
    torch.save({"q": q, "p": _quantized(torch.quint8)}, path)
    entry, other = cli("inspect", path, "--stats", "--json").json()["tensors"]
    assert entry["quantization"] == {"scheme": "per_channel_affine", "axis": 0, "channels": 2}
    assert other["quantization"] == {"scheme": "per_tensor_affine", "scale": 0.1, "zero_point": 2}
    assert entry["min"] == pytest.approx(float(q.dequantize().min()))
    assert entry["max"] == pytest.approx(float(q.dequantize().max()))


def test_values_torch_weights_only_allows_come_back_as_they_were(cli, tmp_path):
    """torch.Size, torch.device, complex, bytes, bytearray, sets and a state dict's _metadata:
    read, and written back as the same constructs."""
    sd = torch.nn.Linear(2, 2).state_dict()
    extra = {"size": torch.Size([2, 3]), "device": torch.device("cuda", 1), "cpu": torch.device("cpu"),
             "z": 1 + 2j, "raw": b"\x00\xff", "buf": bytearray(b"ab"), "ids": {3, 1, 2}}
    path = tmp_path / "values.pth"
    torch.save({"state_dict": sd, **extra}, path)
    out = tmp_path / "values-copy.pth"
    assert cli("convert", path, "-o", out).code == 0
    back = torch.load(out, weights_only=True)
    for key, value in extra.items():
        assert back[key] == value and type(back[key]) is type(value), key
    assert back["state_dict"]._metadata == sd._metadata
    assert _pickled_globals(torch.load(path, weights_only=True)) == _pickled_globals(back)


def test_empty_bytes_become_loadable(cli, tmp_path):
    """Protocol 2 spells b"" as a call of bytes(), which torch's safe loader refuses: read as
    b"", written as _codecs.encode("", "latin1"), which it reads."""
    path = tmp_path / "empty-bytes.pth"
    torch.save({"state_dict": {"w": torch.ones(1)}, "tag": b""}, path)
    out = tmp_path / "copy.pth"
    assert cli("convert", path, "-o", out).code == 0
    assert torch.load(out, weights_only=True)["tag"] == b""


class _WithExtraState(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = torch.nn.Linear(2, 2)

    def get_extra_state(self):
        return {"fp8_meta": [1, 2], "version": "1.0"}

    def set_extra_state(self, state):
        self.loaded = state


def test_extra_state_is_read_and_carried(cli, tmp_path):
    """A state dict holding `_extra_state` (TransformerEngine and others): the tensors are read;
    .pth outputs carry the value unchanged, in place; .safetensors reports it left out."""
    model = _WithExtraState()
    sd = model.state_dict()
    assert list(sd) == ["_extra_state", "fc.weight", "fc.bias"]
    path = tmp_path / "extra.pth"
    torch.save(sd, path)
    doc = cli("inspect", path, "--json").json()
    assert [t["name"] for t in doc["tensors"]] == ["fc.weight", "fc.bias"]
    assert doc["non_tensors"] == {"_extra_state": "dict"}
    assert "non-tensor entries: _extra_state (dict)" in cli("inspect", path).out
    assert cli("inspect", path, "--root", "", "--json").code == 0
    assert cli("inspect", path, "--stats").code == 0 and cli("inspect", path, "--tree").code == 0
    out = tmp_path / "copy.pth"
    assert cli("convert", path, "-o", out).code == 0
    back = torch.load(out, weights_only=True)
    assert list(back) == list(sd) and back["_extra_state"] == sd["_extra_state"]
    fresh = _WithExtraState()
    fresh.load_state_dict(back)
    assert fresh.loaded == {"fp8_meta": [1, 2], "version": "1.0"}
    report = cli("convert", path, "-o", tmp_path / "x.safetensors", "--json").json()
    assert report["extras_left_out"] == ["_extra_state"]
    dropped = tmp_path / "dropped.pth"
    assert cli("drop", path, "fc.bias", "-o", dropped).code == 0
    assert list(torch.load(dropped, weights_only=True)) == ["_extra_state", "fc.weight"]


def test_non_tensor_values_need_extra_state_names_or_an_explicit_root(cli, tmp_path):
    path = tmp_path / "mixed.pth"
    torch.save({"w": torch.ones(2), "note": "hello"}, path)
    assert cli("inspect", path).code == 1
    doc = cli("inspect", path, "--root", "", "--json").json()
    assert [t["name"] for t in doc["tensors"]] == ["w"]
    out = tmp_path / "copy.pth"
    assert cli("convert", path, "--root", "", "-o", out).code == 0
    back = torch.load(out, weights_only=True)
    assert list(back) == ["w", "note"] and back["note"] == "hello" and torch.equal(back["w"], torch.ones(2))


def test_parameter_attributes_are_carried(cli, tmp_path):
    p = torch.nn.Parameter(torch.ones(2))
    p.tensor_model_parallel = True
    path = tmp_path / "param.pth"
    torch.save({"p": p}, path)
    out = tmp_path / "copy.pth"
    assert cli("convert", path, "-o", out).code == 0
    back = torch.load(out, weights_only=True)["p"]
    assert isinstance(back, torch.nn.Parameter) and back.tensor_model_parallel is True


# ---- known answers ---------------------------------------------------------------------------

def _fixed_input(tmp_path):
    """A fixed small state dict, written by hand as safetensors so that the input bytes are
    fixed too: float32, bfloat16, int64, a tied name, uint16 and float8 (the v3 route)."""
    from ckptsurgery.io.model import Checkpoint
    from ckptsurgery.io.safetensors import write_safetensors
    from ckptsurgery import open_checkpoint

    sd = OrderedDict(
        w=torch.arange(6, dtype=torch.float32).reshape(2, 3) / 4,
        h=torch.arange(4, dtype=torch.float32).to(torch.bfloat16),
        ids=torch.arange(3),
        u=torch.arange(5, dtype=torch.int32).to(torch.uint16),
        f8=torch.tensor([0.5, -2.0]).to(torch.float8_e4m3fn),
    )
    plain = tmp_path / "plain.pth"
    torch.save(sd, plain)
    path = tmp_path / "fixed.safetensors"
    with open_checkpoint(plain) as ckpt, open(path, "wb") as f:
        tensors = OrderedDict(ckpt.tensors)
        tensors["tied"] = tensors["w"]
        write_safetensors(f, tensors, {})
    assert isinstance(ckpt, Checkpoint)
    return path


# sha256 of what each writer must produce for `_fixed_input`. A change here is a change of
# output format: make it on purpose, say why in the commit, and update these.
KNOWN = {
    "fixed.safetensors": "d7003061c7f4425994b461e991fe6bc4d6a8cc45d5f99c6117961633f5997292",
    "out.pth": "dbb2917caeb0963de70604764445efbe3c2f97eaf163de6003827052c743c0f8",
    "out.safetensors": "d7003061c7f4425994b461e991fe6bc4d6a8cc45d5f99c6117961633f5997292",  # a copy
    "shards": "6b08f1a5c3613a6692b67a667b5fbdcf061b9735974a2eb6b1fa1434095a1d49",
}


def test_known_answers(cli, tmp_path):
    source = _fixed_input(tmp_path)
    digests = {"fixed.safetensors": hashlib.sha256(source.read_bytes()).hexdigest()}
    for name in ("out.pth", "out.safetensors"):
        assert cli("convert", source, "-o", tmp_path / name).code == 0
        digests[name] = hashlib.sha256((tmp_path / name).read_bytes()).hexdigest()
    shards = tmp_path / "sharded" / "model.bin"
    shards.parent.mkdir()
    assert cli("convert", source, "-o", shards, "--max-shard-size", "40").code == 0
    digests["shards"] = hashlib.sha256(b"".join(
        p.name.encode() + p.read_bytes() for p in sorted(shards.parent.iterdir()))).hexdigest()
    assert digests == KNOWN
    back = torch.load(tmp_path / "out.pth", weights_only=True)
    assert back["tied"].untyped_storage().data_ptr() == back["w"].untyped_storage().data_ptr()


def test_extra_state_follows_key_edits(cli, tmp_path):
    """filter, drop and rename choose and rename `*._extra_state` with the module it belongs to."""
    wrapper = torch.nn.Sequential(_WithExtraState())
    path = tmp_path / "extra.pth"
    torch.save(wrapper.state_dict(), path)  # 0._extra_state, 0.fc.weight, 0.fc.bias
    out = tmp_path / "renamed.pth"
    assert cli("rename", path, "--add-prefix", "module.", "-o", out).code == 0
    assert list(torch.load(out, weights_only=True)) == ["module.0.fc.weight", "module.0.fc.bias", "module.0._extra_state"]
    assert cli("drop", path, "0._extra_state", "-o", tmp_path / "d.pth").code == 0
    assert list(torch.load(tmp_path / "d.pth", weights_only=True)) == ["0.fc.weight", "0.fc.bias"]
    assert cli("filter", path, "--keep", "re:extra", "--keep", "0.fc.bias", "-o", tmp_path / "f.pth").code == 0
    assert list(torch.load(tmp_path / "f.pth", weights_only=True)) == ["0._extra_state", "0.fc.bias"]


def test_dtype_cast_says_what_it_kept(cli, tmp_path):
    path = tmp_path / "mixed.pth"
    torch.save({"w": torch.randn(2), "f8": torch.randn(2).to(torch.float8_e5m2)}, path)
    result = cli("convert", path, "-o", tmp_path / "bf.safetensors", "--dtype", "bf16")
    assert result.code == 0 and "kept their dtype" in result.err and "f8" in result.err


def test_device_types_are_torchs():
    """Every device type the reader accepts is one torch.device accepts (and a made-up one is not)."""
    from ckptsurgery.io.unpickler import DEVICE_TYPES, is_device

    for kind in DEVICE_TYPES:
        torch.device(kind)
        torch.device(f"{kind}:1")
    with pytest.raises(RuntimeError):
        torch.device("nosuchdevice")
    assert not is_device("nosuchdevice") and is_device("cuda:3") and not is_device("cuda:-1")


def test_dtype_cast_reports_a_float_kept_for_the_scales_it_shares(cli, tmp_path):
    """In a .pth, a float64 tensor sharing its storage with a quantized tensor's scales is not
    cast, and kept_dtype says so."""
    scales = torch.tensor([0.1, 0.2, 0.3], dtype=torch.float64)
    q = torch.quantize_per_channel(torch.randn(3, 4), scales, torch.tensor([0, 1, 2]), 0, torch.qint8)
    path = tmp_path / "q.pth"
    torch.save({"q": q, "q_scales": scales}, path)
    report = cli("convert", path, "-o", tmp_path / "out.pth", "--dtype", "fp16", "--json").json()
    assert report["kept_dtype"] == ["q", "q_scales"]
    assert torch.load(tmp_path / "out.pth", weights_only=True)["q_scales"].dtype == torch.float64


# ---- views of one storage ---------------------------------------------------------------------

def test_views_of_one_untyped_storage_keep_their_own_dtypes(cli, tmp_path):
    """A float8_e4m3fn tensor and its float8_e5m2 view (one UntypedStorage, as torch saves them) keep their dtypes in a .pth output."""
    w = torch.linspace(-1, 1, 8).to(torch.float8_e4m3fn)
    src, out = tmp_path / "f8.pth", tmp_path / "out.pth"
    torch.save({"a": w, "b": w.view(torch.float8_e5m2), "c": w.view(torch.uint16)}, src)
    assert cli("convert", src, "-o", out).code == 0
    got = torch.load(out, weights_only=True)
    assert {k: v.dtype for k, v in got.items()} == {"a": torch.float8_e4m3fn, "b": torch.float8_e5m2, "c": torch.uint16}


def test_every_dtype_option_name_is_the_torch_dtype_of_that_name():
    """--dtype takes the short names and torch's own (float16, bfloat16, half, float), each
    meaning what torch means by it."""
    from ckptsurgery.dtypes import CAST_TARGETS

    short = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
    for name, dtype in CAST_TARGETS.items():
        assert str(short.get(name) or getattr(torch, name)) == f"torch.{dtype.name}", name
    assert {"float16", "bfloat16", "half", "float32"} <= set(CAST_TARGETS)


@pytest.mark.parametrize("name", ["float16", "half", "bfloat16"])
def test_convert_takes_torch_dtype_names(cli, tmp_path, name):
    torch.save({"w": torch.ones(3)}, tmp_path / "a.pth")
    report = cli("convert", tmp_path / "a.pth", "-o", tmp_path / "b.safetensors", "--dtype", name, "--json").json()
    assert report["dtype"] == str(getattr(torch, name)).removeprefix("torch.")
