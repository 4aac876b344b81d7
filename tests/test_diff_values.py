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


# ---- --rtol: torch.isclose's rule, B the reference --------------------------------------------

TRICKY = [0.0, -0.0, 1.0, 1.0 + 1e-9, 1.001, -1.0, 1e-300, 5e-324, 1e308, -1e308, 1.7e308, float("inf"),
          -float("inf"), float("nan")]


def save_pairs(tmp_path, values, a_dtype, b_dtype):
    """Every ordered pair of `values` as its own one-element tensor, A's in `a_dtype`, B's in `b_dtype`."""
    names = {f"p{i}_{j}": (x, y) for i, x in enumerate(values) for j, y in enumerate(values)}
    return names, save_pair(tmp_path, {n: torch.tensor([x], dtype=a_dtype) for n, (x, y) in names.items()},
                            {n: torch.tensor([y], dtype=b_dtype) for n, (x, y) in names.items()})


@pytest.mark.parametrize("a_dtype, b_dtype", [(torch.float64, torch.float64), (torch.float32, torch.float16)])
@pytest.mark.parametrize("atol, rtol", [(0.0, 1e-3), (1e-6, 1e-3), (0.0, 2.0), (1e-300, 0.5)])
def test_diff_rtol_agrees_with_torch_isclose_on_inf_nan_negative_zero_and_huge_values(tmp_path, a_dtype, b_dtype,
                                                                                       atol, rtol):
    """Every pair of tricky values, as torch.isclose(A, B, rtol, atol, equal_nan=True) judges the
    values widened to float64: -0.0 equals 0.0, an infinity only itself, NaN NaN; a gap that
    overflows (1.7e308 against -1.7e308) is never within, even where rtol·|B| overflows too."""
    names, (a, b) = save_pairs(tmp_path, TRICKY, a_dtype, b_dtype)
    report = diff_checkpoints(str(a), str(b), atol=atol, rtol=rtol)
    widened = {n: (torch.tensor([x], dtype=a_dtype).double(), torch.tensor([y], dtype=b_dtype).double())
               for n, (x, y) in names.items()}
    expected = {n for n, (x, y) in widened.items() if not torch.isclose(x, y, rtol=rtol, atol=atol, equal_nan=True)}
    assert {c["name"] for c in report.value_changed} == expected
    assert report.equal == len(names) - len(expected) and report.identical is False and report.rtol == rtol


def test_diff_rtol_is_relative_to_b(cli, tmp_path):
    """|A - B| <= atol + rtol·|B|: 1.0 against 1.1 is within 0.095 of B (0.1045), 1.1 against 1.0 is not."""
    a, b = save_pair(tmp_path, {"w": torch.tensor([1.0], dtype=torch.float64)},
                     {"w": torch.tensor([1.1], dtype=torch.float64)})
    assert cli("diff", a, b, "--rtol", "0.095").code == 0
    assert cli("diff", b, a, "--rtol", "0.095").code == 1


def test_diff_rtol_on_integers_is_exact_beyond_two_to_the_53(tmp_path):
    """Integers: the gap exact, the bound atol + rtol·|B| in float64 — Python's own
    `abs(a - b) <= atol + rtol * abs(b)`, which compares an int with a float exactly. 2**62 + 1
    against a bound of 2**62 is beyond it, though float64 rounds the gap to 2**62."""
    top = 2**63 - 1
    pairs = [(top - 2**62, top), (top - 2**62 - 1, top), (10**6 + 1000, 10**6), (10**6 + 1001, 10**6),
             (-2**63, top), (-5, 5), (0, 0), (-2**63, -2**63 + 3)]
    rng = random.Random(1)
    pairs += [(rng.randrange(-2**63, 2**63), rng.randrange(-2**63, 2**63)) for _ in range(30)]
    pairs += [(y + rng.randrange(-2**40, 2**40), y) for y in (rng.randrange(-2**62, 2**62) for _ in range(30))]
    for atol, rtol in ((0.0, 0.5), (0.0, 1e-3), (3.0, 2**-22), (0.5, 1.0), (0.0, 1e300)):
        sides = [{f"k{i}": torch.tensor([v]) for i, v in enumerate(side)} for side in zip(*pairs)]
        a, b = save_pair(tmp_path, *sides)
        expected = {f"k{i}" for i, (x, y) in enumerate(pairs) if not abs(x - y) <= atol + rtol * abs(y)}
        report = diff_checkpoints(str(a), str(b), atol=atol, rtol=rtol)
        assert {c["name"] for c in report.value_changed} == expected, (atol, rtol)
    assert {"k1"} <= {c["name"] for c in diff_checkpoints(str(a), str(b), rtol=0.5).value_changed}


def test_diff_rtol_on_uint64_and_bool(tmp_path):
    """uint64 gaps of 2**53 - 1 and 2**53 near 2**64 and 2**63 are within 2**-10 of B, not 2**-11;
    a bool compares as 0 and 1."""
    a, b = save_pair(tmp_path, {"u": torch.tensor([2**64 - 1, 2**63], dtype=torch.uint64)},
                     {"u": torch.tensor([2**64 - 2**53, 2**63 + 2**53], dtype=torch.uint64)})
    assert diff_checkpoints(str(a), str(b), rtol=2**-10).identical
    assert [c["name"] for c in diff_checkpoints(str(a), str(b), rtol=2**-11).value_changed] == ["u"]
    a, b = save_pair(tmp_path, {"m": torch.tensor([False, True])}, {"m": torch.tensor([True, True])})
    assert diff_checkpoints(str(a), str(b), rtol=1.0).identical
    assert not diff_checkpoints(str(a), str(b), rtol=0.5).identical


def test_diff_rtol_compares_complex_values_part_by_part(tmp_path):
    """As --atol does: the real parts 1.0 and 1.05 differ beyond 1 % of 1.05, though the moduli
    (about 100) would be within it."""
    a, b = save_pair(tmp_path, {"c": torch.tensor([1 + 100j])}, {"c": torch.tensor([1.05 + 100j])})
    assert [c["name"] for c in diff_checkpoints(str(a), str(b), rtol=0.01).value_changed] == ["c"]
    assert diff_checkpoints(str(a), str(b), rtol=0.05).identical


def test_diff_rtol_judges_a_dtype_change_on_its_values(cli, tmp_path, zip_pth, state_dict):
    """A bf16 copy is identical within --rtol 1e-2 (plus an atol for values rounded to zero);
    the dtype changes are listed, not counted."""
    bf16 = tmp_path / "bf16.pth"
    torch.save({k: v.to(torch.bfloat16) if v.is_floating_point() else v for k, v in state_dict.items()}, bf16)
    result = cli("diff", zip_pth, bf16, "--rtol", "1e-2", "--atol", "1e-6")
    assert result.code == 0, result.out
    assert result.out.splitlines()[-1] == (f"identical: {len(state_dict)} equal tensor(s) within atol 1e-06, "
                                           f"rtol 0.01, 0 difference(s)")
    doc = cli("diff", zip_pth, bf16, "--rtol", "1e-4", "--json").json()
    assert doc["rtol"] == 1e-4 and doc["identical"] is False and doc["value_changed"]
    assert all("max_abs_diff" in c for c in doc["dtype_changed"])


def test_diff_rtol_is_checked_chunk_by_chunk(tmp_path, monkeypatch):
    """Values are compared in chunks of _VALUE_CHUNK elements (3 here), never the whole tensor
    at once; the one element beyond the tolerance sits in the last chunk, floats and integers."""
    monkeypatch.setattr(diff_module, "_VALUE_CHUNK", 3)
    seen = []
    for name in ("_float_close", "_int_close"):
        real = getattr(diff_module, name)
        monkeypatch.setattr(diff_module, name, lambda x, y, *tol, real=real: seen.append(x.numel()) or real(x, y, *tol))
    ints = torch.arange(1, 11) * 1000
    gaps = torch.tensor([1] * 9 + [20])  # 1 is within 0.1 % of every B, 20 of 10,020 is not
    a, b = save_pair(tmp_path, {"f": ints.double(), "i": ints}, {"f": (ints + gaps).double(), "i": ints + gaps})
    report = diff_checkpoints(str(a), str(b), rtol=0.001)
    assert [c["name"] for c in report.value_changed] == ["f", "i"]
    assert seen and max(seen) <= 3 and len(seen) == 8  # 4 chunks of each tensor


@pytest.mark.parametrize("rtol", ["-1", "nan", "inf"])
def test_diff_refuses_an_rtol_that_is_not_a_finite_non_negative_number(cli, tmp_path, rtol):
    a, b = save_pair(tmp_path, {"w": torch.ones(2)}, {"w": torch.ones(2)})
    result = cli("diff", a, b, "--rtol", rtol)
    assert result.code == 2 and "--rtol" in result.err and len(result.err.strip().splitlines()) == 1, result.err
    with pytest.raises(UsageError, match="--rtol"):
        diff_checkpoints(str(a), str(b), rtol=float(rtol))
