"""diff's command-line habits: -q/--brief prints one line as diff -q does, --ignore PATTERN
leaves keys out of the comparison on both sides and reports them."""

from __future__ import annotations

import pytest
import torch

from conftest import assert_one_error_line
from ckptsurgery.ops import diff_checkpoints


def save_pair(tmp_path, a: dict, b: dict):
    pa, pb = tmp_path / "a.pth", tmp_path / "b.pth"
    torch.save(a, pa)
    torch.save(b, pb)
    return pa, pb


# ---- -q / --brief --------------------------------------------------------------------------------

@pytest.mark.parametrize("flag", ["-q", "--brief", "--quiet"])
def test_diff_brief_prints_files_differ_or_nothing_and_exits_0_1_or_2(cli, tmp_path, flag):
    a, b = save_pair(tmp_path, {"w": torch.ones(2)}, {"w": torch.zeros(2)})
    result = cli("diff", flag, a, b)
    assert (result.code, result.out, result.err) == (1, f"Files {a} and {b} differ\n", "")
    same = cli("diff", a, a, flag)
    assert (same.code, same.out, same.err) == (0, "", "")
    trouble = cli("diff", flag, a, tmp_path / "missing.pth")
    assert_one_error_line(trouble, "missing.pth", code=2)
    assert trouble.out == ""


def test_diff_brief_follows_the_tolerance_and_ignore(cli, tmp_path):
    a, b = save_pair(tmp_path, {"w": torch.ones(2), "step": torch.tensor(1)},
                     {"w": torch.ones(2) + 1e-4, "step": torch.tensor(2)})
    assert cli("diff", "-q", a, b, "--atol", "1e-3").out == f"Files {a} and {b} differ\n"
    result = cli("diff", "-q", a, b, "--atol", "1e-3", "--ignore", "step")
    assert (result.code, result.out) == (0, "")


def test_diff_brief_with_json_is_refused_in_one_line(cli, tmp_path):
    a, b = save_pair(tmp_path, {"w": torch.ones(2)}, {"w": torch.zeros(2)})
    result = cli("diff", a, b, "--brief", "--json")
    assert_one_error_line(result, "--brief", "--json", code=2)
    assert result.out == ""


# ---- --ignore ------------------------------------------------------------------------------------

def test_diff_ignore_compares_neither_sides_keys_and_reports_them(cli, tmp_path):
    """`head` (values and a shape that differ) and the keys only one side has are ignored: the
    rest is identical, exit 0; `ignored` lists them, A's first."""
    a, b = save_pair(tmp_path, {"enc.w": torch.ones(3), "head.w": torch.ones(2, 2), "head.b": torch.ones(2),
                                "extra_a": torch.ones(1)},
                     {"enc.w": torch.ones(3), "head.w": torch.zeros(2, 2), "head.b": torch.ones(3),
                      "extra_b": torch.ones(1)})
    assert cli("diff", a, b).code == 1
    result = cli("diff", a, b, "--ignore", "head", "--ignore", "extra_*", "--json")
    assert result.code == 0, result.out
    doc = result.json()
    assert doc["ignored"] == ["head.w", "head.b", "extra_a", "extra_b"] and doc["identical"] is True
    assert doc["equal"] == 1
    assert doc["only_in_a"] == doc["only_in_b"] == doc["shape_changed"] == doc["value_changed"] == []
    human = cli("diff", a, b, "--ignore", "re:^(head|extra)")
    assert human.code == 0 and human.out.splitlines()[-1].endswith("0 difference(s), 4 key(s) ignored"), human.out


def test_diff_ignore_keeps_what_it_does_not_select(tmp_path):
    """`fc` is a module name: it selects fc.weight, never fc2.weight, which still differs."""
    a, b = save_pair(tmp_path, {"fc.weight": torch.ones(1), "fc2.weight": torch.ones(1)},
                     {"fc.weight": torch.zeros(1), "fc2.weight": torch.zeros(1)})
    report = diff_checkpoints(str(a), str(b), ignore=["fc"])
    assert report.ignored == ["fc.weight"] and [c["name"] for c in report.value_changed] == ["fc2.weight"]


def test_diff_ignore_pattern_found_on_one_side_only_is_accepted(tmp_path):
    a, b = save_pair(tmp_path, {"w": torch.ones(1)}, {"w": torch.ones(1), "new.bias": torch.ones(1)})
    report = diff_checkpoints(str(a), str(b), ignore=["new"])
    assert report.identical and report.ignored == ["new.bias"]


def test_diff_ignore_pattern_that_selects_no_key_on_either_side_is_an_error(cli, tmp_path):
    a, b = save_pair(tmp_path, {"bn.num_batches_tracked": torch.tensor(1)}, {"bn.num_batches_tracked": torch.tensor(2)})
    result = cli("diff", a, b, "--ignore", "num_batches_tracked")
    assert_one_error_line(result, "'num_batches_tracked' selected no key", "*.num_batches_tracked", code=2)
    assert result.out == ""
