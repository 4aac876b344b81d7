"""diff on values: integers compared exactly, --atol across dtypes (imaginary parts and NaN real
parts included), quantization parameters, and which --atol is accepted."""

from __future__ import annotations

import importlib
import random
import warnings

import pytest
import torch

from ckptsurgery.errors import UsageError
from ckptsurgery.ops import diff_checkpoints

diff_module = importlib.import_module("ckptsurgery.ops.diff")


def save_pair(tmp_path, a: dict, b: dict):
    pa, pb = tmp_path / "a.pth", tmp_path / "b.pth"
    torch.save(a, pa)
    torch.save(b, pb)
    return pa, pb


# ---- integers compare exactly ----------------------------------------------------------------

def test_diff_int64_beyond_float_precision_is_different(cli, tmp_path):
    """2**53 and 2**53 + 1 are the same float64: compared as integers they differ by exactly 1."""
    a, b = save_pair(tmp_path, {"w": torch.tensor([2**53])}, {"w": torch.tensor([2**53 + 1])})
    result = cli("diff", a, b, "--atol", "0.5", "--json")
    assert result.code == 1, result.out
    [change] = result.json()["value_changed"]
    assert change["max_abs_diff"] == 1 and isinstance(change["max_abs_diff"], int)


def test_diff_int64_extremes_give_the_exact_gap(cli, tmp_path):
    a, b = save_pair(tmp_path, {"w": torch.tensor([-2**63, 0])}, {"w": torch.tensor([2**63 - 1, 0])})
    doc = cli("diff", a, b, "--json").json()
    assert doc["value_changed"] == [{"name": "w", "max_abs_diff": 2**64 - 1}]


def test_diff_uint64_near_two_to_the_64(cli, tmp_path):
    a, b = save_pair(tmp_path, {"u": torch.tensor([2**64 - 1, 2**63, 7], dtype=torch.uint64)},
                     {"u": torch.tensor([2**64 - 2, 2**63 + 3, 7], dtype=torch.uint64)})
    doc = cli("diff", a, b, "--atol", "0.5", "--json").json()
    assert doc["identical"] is False and doc["value_changed"] == [{"name": "u", "max_abs_diff": 3}]
    a, b = save_pair(tmp_path, {"u": torch.tensor([0, 5], dtype=torch.uint64)},
                     {"u": torch.tensor([2**64 - 1, 5], dtype=torch.uint64)})
    assert cli("diff", a, b, "--json").json()["value_changed"] == [{"name": "u", "max_abs_diff": 2**64 - 1}]


def test_diff_uint64_against_int64_across_dtypes(cli, tmp_path):
    """The same bits, read as 2**64 - 1 and as -1: 2**64 apart."""
    a, b = save_pair(tmp_path, {"w": torch.tensor([2**64 - 1], dtype=torch.uint64)}, {"w": torch.tensor([-1])})
    doc = cli("diff", a, b, "--atol", "1", "--json").json()
    assert doc["dtype_changed"] == [{"name": "w", "a": "uint64", "b": "int64", "max_abs_diff": 2**64}]
    assert doc["value_changed"] == [{"name": "w", "max_abs_diff": 2**64}] and not doc["identical"]


def test_diff_bool_against_bool(cli, tmp_path):
    a, b = save_pair(tmp_path, {"m": torch.tensor([True, False])}, {"m": torch.tensor([True, True])})
    doc = cli("diff", a, b, "--atol", "0.5", "--json").json()
    [change] = doc["value_changed"]
    assert change == {"name": "m", "max_abs_diff": 1} and isinstance(change["max_abs_diff"], int)
    assert cli("diff", a, b, "--atol", "1").code == 0


def test_diff_integer_gap_is_exact_across_chunks(tmp_path, monkeypatch):
    """Chunks of 3; the largest gap in a later chunk, beside gaps of the same high half, or of a
    larger low half; random int64 pairs over the whole range."""
    monkeypatch.setattr(diff_module, "_VALUE_CHUNK", 3)
    gaps = [2**40 + 5, 2**39 + 2**32 - 1, 3, -(2**40 + 8), 2**40 + 9, -1, 2**40 + 2**32 - 1, -(2**41 + 2), 2**41 + 1]
    rng = random.Random(0)
    xs = [rng.randrange(-2**63, 2**63) for _ in range(20)]
    ys = [rng.randrange(-2**63, 2**63) for _ in range(20)]
    a, b = save_pair(tmp_path, {"g": torch.zeros(len(gaps), dtype=torch.int64), "r": torch.tensor(xs)},
                     {"g": torch.tensor(gaps), "r": torch.tensor(ys)})
    assert diff_checkpoints(str(a), str(b)).value_changed == [
        {"name": "g", "max_abs_diff": 2**41 + 2},
        {"name": "r", "max_abs_diff": max(abs(x - y) for x, y in zip(xs, ys))}]


# ---- --atol across dtypes --------------------------------------------------------------------

def test_diff_bf16_copy_is_identical_within_atol(cli, tmp_path, zip_pth, state_dict):
    bf16 = tmp_path / "bf16.pth"
    torch.save({k: v.to(torch.bfloat16) for k, v in state_dict.items()}, bf16)
    result = cli("diff", zip_pth, bf16, "--atol", "0.1", "--json")
    assert result.code == 0, result.out
    doc = result.json()
    assert doc["identical"] is True and doc["value_changed"] == [] and doc["equal"] == len(state_dict)
    assert [c["name"] for c in doc["dtype_changed"]] == list(state_dict)
    assert all(0 <= c["max_abs_diff"] <= 0.1 and c["b"] == "bfloat16" for c in doc["dtype_changed"])
    bit_exact = cli("diff", zip_pth, bf16, "--json")
    assert bit_exact.code == 1 and bit_exact.json()["identical"] is False
    assert "max_abs_diff" not in bit_exact.json()["dtype_changed"][0]  # atol 0: values not read


def test_diff_int8_against_int64_same_values(cli, tmp_path):
    values = [-128, 0, 127]
    a, b = save_pair(tmp_path, {"i": torch.tensor(values, dtype=torch.int8)}, {"i": torch.tensor(values)})
    result = cli("diff", a, b, "--atol", "1", "--json")
    assert result.code == 0, result.out
    assert result.json()["dtype_changed"] == [{"name": "i", "a": "int8", "b": "int64", "max_abs_diff": 0}]
    assert cli("diff", a, b).code == 1


def test_diff_dtype_change_beyond_atol_is_a_value_change(cli, tmp_path):
    a, b = save_pair(tmp_path, {"w": torch.tensor([1.0, 2.0]), "i": torch.tensor([3], dtype=torch.int32)},
                     {"w": torch.tensor([1.0, 2.5], dtype=torch.float64), "i": torch.tensor([3.25])})
    result = cli("diff", a, b, "--atol", "0.3", "--json")
    assert result.code == 1
    doc = result.json()
    assert doc["dtype_changed"] == [{"name": "w", "a": "float32", "b": "float64", "max_abs_diff": 0.5},
                                    {"name": "i", "a": "int32", "b": "float32", "max_abs_diff": 0.25}]
    assert doc["value_changed"] == [{"name": "w", "max_abs_diff": 0.5}] and doc["equal"] == 1


def test_diff_floats_across_dtypes_keep_nan_and_inf_rules(cli, tmp_path):
    special = [float("nan"), float("inf"), -float("inf"), 1.0]
    a, b = save_pair(tmp_path, {"w": torch.tensor(special)}, {"w": torch.tensor(special).half()})
    assert cli("diff", a, b, "--atol", "0.1").code == 0
    a, b = save_pair(tmp_path, {"w": torch.tensor([float("nan")])}, {"w": torch.tensor([1.0]).half()})
    doc = cli("diff", a, b, "--atol", "0.1", "--json").json()
    assert [c["name"] for c in doc["value_changed"]] == ["w"] and not doc["identical"]


def test_diff_quantized_against_float_within_atol(cli, tmp_path):
    torch.manual_seed(0)
    w = torch.randn(4, 3)
    q = torch.quantize_per_tensor(w, 0.05, 0, torch.qint8)
    a, b = save_pair(tmp_path, {"w": q}, {"w": w})
    assert cli("diff", a, b, "--atol", "0.03", "--json").json()["identical"] is True
    assert cli("diff", a, b, "--atol", "0.001").code == 1


def test_diff_complex_against_real(cli, tmp_path):
    a, b = save_pair(tmp_path, {"c": torch.tensor([1 + 1j, 2 + 0j])}, {"c": torch.tensor([1.0, 2.0])})
    doc = cli("diff", a, b, "--atol", "0.5", "--json").json()
    assert doc["value_changed"] == [{"name": "c", "max_abs_diff": 1.0}]


@pytest.mark.parametrize("bits", ["bits8", "float4_e2m1fn_x2"])
def test_diff_non_numbers_across_dtypes_are_infinitely_different(cli, tmp_path, bits):
    raw = torch.arange(3, dtype=torch.uint8)
    a, b = save_pair(tmp_path, {"b": raw.view(getattr(torch, bits))}, {"b": raw})
    result = cli("diff", a, b, "--atol", "1", "--json")
    assert result.code == 1
    assert result.json()["value_changed"] == [{"name": "b", "max_abs_diff": "inf"}]


# ---- which --atol is accepted ----------------------------------------------------------------

@pytest.mark.parametrize("atol", ["-1", "nan", "inf", "-inf"])
def test_diff_refuses_an_atol_that_is_not_a_finite_non_negative_number(cli, tmp_path, atol):
    a, b = save_pair(tmp_path, {"w": torch.ones(2)}, {"w": torch.ones(2)})
    result = cli("diff", a, b, "--atol", atol)
    assert result.code == 2 and "--atol" in result.err and len(result.err.strip().splitlines()) == 1, result.err
    with pytest.raises(UsageError, match="--atol"):
        diff_checkpoints(str(a), str(b), atol=float(atol))


# ---- what makes two tensors different ---------------------------------------------------------

def test_diff_sees_quantization_parameters(cli, tmp_path):
    """Two qint8 tensors with the same integers but different scale/zero point are not identical."""
    a = torch.quantize_per_tensor(torch.randn(4, 3), 0.1, 0, torch.qint8)
    b = torch._make_per_tensor_quantized_tensor(a.int_repr(), 0.5, 3)
    torch.save({"q": a}, tmp_path / "a.pth")
    torch.save({"q": b}, tmp_path / "b.pth")
    result = cli("diff", tmp_path / "a.pth", tmp_path / "b.pth", "--json")
    assert result.code == 1 and not result.json()["identical"], result.out


def test_diff_of_a_file_with_itself_is_identical_even_with_a_nan_quantized_scale(cli, tmp_path):
    """A file is identical to itself (exit 0) even when a per-tensor quantization scale is NaN (comparing the scales with == once made it differ, exit 1)."""
    path = tmp_path / "q.pth"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        q = torch.quantize_per_tensor(torch.tensor([0.0]), float("nan"), 3, torch.quint8)
    torch.save({"q": q}, path)
    result = cli("diff", path, path)
    assert result.code == 0, result.out


def test_diff_atol_sees_imaginary_parts(cli, tmp_path):
    """Complex tensors that differ by 4 in their imaginary part differ beyond --atol 1e-3."""
    torch.save({"c": torch.tensor([1 + 1j, 2 + 2j])}, tmp_path / "a.pth")
    torch.save({"c": torch.tensor([1 + 5j, 2 + 2j])}, tmp_path / "b.pth")
    result = cli("diff", tmp_path / "a.pth", tmp_path / "b.pth", "--atol", "1e-3", "--json")
    assert result.code == 1 and not result.json()["identical"], result.out


def test_diff_atol_sees_imaginary_parts_beside_a_nan_real_part(cli, tmp_path):
    """complex(nan, 1) vs complex(nan, 5) differ by 4 in the imaginary part: not 'identical' under --atol 1e-3."""
    torch.save({"c": torch.tensor([complex(float("nan"), 1.0)])}, tmp_path / "a.pth")
    torch.save({"c": torch.tensor([complex(float("nan"), 5.0)])}, tmp_path / "b.pth")
    result = cli("diff", tmp_path / "a.pth", tmp_path / "b.pth", "--atol", "1e-3", "--json")
    assert result.code == 1 and not result.json()["identical"], result.out


def test_diff_int64_against_float64_beyond_2_53_gives_the_exact_gap(cli, tmp_path):
    """int64 2**53+1 against float64 2.0**53 under --atol 0.5: the gap is exactly 1 and they differ (widening the int64 side to float64 once gave max 0, 'identical')."""
    a, b = tmp_path / "a.pth", tmp_path / "b.pth"
    torch.save({"i": torch.tensor([2**53 + 1])}, a)
    torch.save({"i": torch.tensor([2.0**53], dtype=torch.float64)}, b)
    result = cli("diff", a, b, "--atol", "0.5", "--json")
    assert result.json()["dtype_changed"][0]["max_abs_diff"] == 1
    assert result.code == 1
