"""Review 5: small hostile files that still reach the catch-all error, run out of memory or leak
warnings. Each test is one bug; they fail until it is fixed."""

from __future__ import annotations

import pytest

from test_hostile_opcodes import (
    D, G, I, PROTO2, T, U, assert_isolated_clean, run_isolated, safetensors_file, zip_file,
)

CAP = 2 * 2**30  # RLIMIT_AS


def _v3(dtype: str, metadata: bytes = b"N", key: str = "0", shape=(4,), nbytes: int = 16) -> bytes:
    """torch._utils._rebuild_tensor_v3(UntypedStorage record, 0, shape, contiguous, False, {}, torch.DTYPE, metadata)."""
    record = b"(" + U("storage") + G("torch", "UntypedStorage") + U(key) + U("cpu") + I(nbytes) + b"t"
    stride = [1] * len(shape)
    for i in range(len(shape) - 2, -1, -1):
        stride[i] = stride[i + 1] * shape[i + 1]
    return (G("torch._utils", "_rebuild_tensor_v3") + b"(" + record + b"Q" + I(0) + T(*map(I, shape))
            + T(*map(I, stride)) + b"\x89" + G("collections", "OrderedDict") + b")R" + G("torch", dtype)
            + metadata + b"tR")


NEG = D((U("neg"), b"\x88"))


@pytest.mark.parametrize("dtype", ["bool", "float8_e4m3fn", "uint16"])
@pytest.mark.parametrize("command", ["stats", "to_safetensors", "diff"])
def test_neg_bit_on_a_dtype_torch_cannot_negate(tmp_path, dtype, command):
    """Tensor metadata {"neg": True} on a bool/float8/uint16 tensor reaches the catch-all (torch.neg raises)."""
    pkl = PROTO2 + D((U("w"), _v3(dtype, NEG))) + b"."
    a = zip_file(tmp_path / "a.pth", pkl, {"0": bytes(range(16))})
    b = zip_file(tmp_path / "b.pth", pkl, {"0": bytes(range(1, 17))})
    args = {"stats": ("inspect", a, "--stats"), "to_safetensors": ("convert", a, "-o", tmp_path / "o.safetensors"),
            "diff": ("diff", a, b)}[command]
    result = run_isolated(tmp_path, *args, memory=CAP)
    if command == "diff":  # exit 1 with no error line is diff's "they differ" verdict; 2 a refusal
        assert result.code in (0, 1, 2) and "CKPTSURGERY_DEBUG" not in result.err and "Traceback" not in result.err, result
        assert (result.code == 2) == result.err.startswith("ckptsurgery: error: "), result
    else:
        assert_isolated_clean(result, within=10)


def test_tree_of_one_deeply_dotted_name(tmp_path):
    """One tensor named x.x.x... (200,000 parts, 400 KB): inspect --tree builds O(depth^2) row names and dies of MemoryError."""
    name = ".".join(["x"] * 200_000)
    path = safetensors_file(tmp_path / "deep.safetensors",
                            {name: {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}}, bytes(4))
    result = run_isolated(tmp_path, "inspect", path, "--tree", memory=CAP, timeout=20)
    assert_isolated_clean(result, within=10)


@pytest.mark.parametrize("args", [("inspect",), ("diff",), ("convert", "o.safetensors")])
def test_zero_sized_tensor_with_20000_huge_dimensions(tmp_path, args):
    """shape [0] + [2**62] * 20000 (400 KB header): contiguous_strides multiplies unbounded ints to MemoryError."""
    path = safetensors_file(tmp_path / "dims.safetensors",
                            {"w": {"dtype": "U8", "shape": [0] + [2**62] * 20_000, "data_offsets": [0, 0]}}, b"")
    argv = {"inspect": ("inspect", path), "diff": ("diff", path, path),
            "convert": ("convert", path, "-o", tmp_path / "o.safetensors")}[args[0]]
    result = run_isolated(tmp_path, *argv, memory=CAP, timeout=20)
    assert_isolated_clean(result, within=10)


def test_per_channel_scales_of_complex_dtype_leak_a_torch_warning(tmp_path):
    """A per-channel qint8 tensor whose scales are complex64: inspect --stats prints torch's UserWarning (with source line) on stderr."""
    scale = _v3("complex64", key="s", shape=(2,), nbytes=16)
    zero = _v3("int64", key="z", shape=(2,), nbytes=16)
    record = (b"(" + U("storage") + G("torch", "QInt8Storage") + U("0") + U("cpu") + I(4) + b"t")
    qt = (G("torch._utils", "_rebuild_qtensor") + b"(" + record + b"Q" + I(0) + T(I(2), I(2)) + T(I(2), I(1))
          + T(G("torch", "per_channel_affine"), scale, zero, I(0)) + b"\x89" + G("collections", "OrderedDict")
          + b")R" + b"tR")
    path = zip_file(tmp_path / "q.pth", PROTO2 + D((U("w"), qt)) + b".",
                    {"0": bytes(4), "s": bytes(range(16)), "z": bytes(16)})
    result = run_isolated(tmp_path, "inspect", path, "--stats", memory=CAP)
    assert_isolated_clean(result, within=10)
    assert "Warning" not in result.err, result
