"""Review 7: the command-line contract under hostile or careless use. Every test here fails
against the code as reviewed; each docstring says in one line what is wrong."""

from __future__ import annotations

import warnings

import pytest
import torch
from typer.testing import CliRunner

from conftest import assert_one_error_line
from ckptsurgery.cli import app
from ckptsurgery.errors import CkptError



@pytest.fixture
def flat(tmp_path):
    path = tmp_path / "flat.pth"
    torch.save({"module.a.weight": torch.ones(2), "module.b.bias": torch.zeros(3), "c": torch.arange(3)}, path)
    return path


# ---- diff: 0 same, 1 different, 2 trouble ----------------------------------------------------

def test_diff_exit_codes_through_typer_cli_runner(tmp_path, flat):
    """Through `CliRunner().invoke(app, ...)` a missing diff input and a mode error both exit 1 (diff's "different"), not 2."""
    runner = CliRunner()
    missing = runner.invoke(app, ["diff", str(flat), str(tmp_path / "typo.pth")])
    assert missing.exit_code == 2, (missing.exit_code, repr(missing.exception))
    out = tmp_path / "o.pth"
    usage = runner.invoke(app, ["merge", str(flat), "-o", str(out), "--on-mismatch", "skip"])
    assert usage.exit_code == 2, (usage.exit_code, repr(usage.exception))


def test_diff_int64_against_float64_beyond_2_53_is_not_exact(cli, tmp_path):
    """diff --atol widens an int64 side to float64: 2**53+1 vs 2.0**53 (gap 1) is reported as max 0 and 'identical' under --atol 0.5."""
    a, b = tmp_path / "a.pth", tmp_path / "b.pth"
    torch.save({"i": torch.tensor([2**53 + 1])}, a)
    torch.save({"i": torch.tensor([2.0**53], dtype=torch.float64)}, b)
    result = cli("diff", a, b, "--atol", "0.5", "--json")
    assert result.json()["dtype_changed"][0]["max_abs_diff"] == 1
    assert result.code == 1


def test_diff_of_a_file_with_itself_is_different_when_a_quantized_scale_is_nan(cli, tmp_path):
    """diff compares per-tensor quantization scales with ==, so a NaN scale makes a file differ from itself (exit 1, 'max |A-B| 0')."""
    path = tmp_path / "q.pth"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        q = torch.quantize_per_tensor(torch.tensor([0.0]), float("nan"), 3, torch.quint8)
    torch.save({"q": q}, path)
    result = cli("diff", path, path)
    assert result.code == 0, result.out


# ---- options silently ignored ------------------------------------------------------------------

@pytest.mark.parametrize("kind", ["safetensors", "sharded"])
def test_root_is_silently_ignored_for_safetensors_and_shards(cli, tmp_path, flat, kind):
    """--root KEY on a safetensors file or shard index is ignored (exit 0, top level listed); a flat .pth refuses an unknown root."""
    from safetensors.torch import save_file

    if kind == "safetensors":
        path = tmp_path / "m.safetensors"
        save_file({"a": torch.ones(2)}, str(path))
    else:
        path = tmp_path / "shards" / "model.safetensors"
        path.parent.mkdir()
        assert cli("convert", flat, "-o", path, "--max-shard-size", "12B").code == 0
        path = path.parent
    assert cli("inspect", flat, "--root", "state_dict").code == 1  # the .pth behaviour
    result = cli("inspect", path, "--root", "state_dict")
    assert result.code in (1, 2) and result.err.startswith("ckptsurgery: error: "), (result.code, result.out)


def test_merge_into_empty_template_silently_does_a_plain_union(cli, tmp_path, flat):
    """merge --into '' (an unset $TEMPLATE) is taken as no --into: a plain union is written, exit 0."""
    out = tmp_path / "o.pth"
    result = cli("merge", flat, "--into", "", "-o", out)
    assert result.code in (1, 2) and not out.exists(), (result.code, result.err)


def test_empty_max_shard_size_is_silently_ignored(cli, tmp_path, flat):
    """convert --max-shard-size '' writes one unsharded file (exit 0) instead of refusing the size."""
    out = tmp_path / "o.safetensors"
    result = cli("convert", flat, "-o", out, "--max-shard-size", "")
    assert_one_error_line(result, "size", code=2)
    assert not out.exists()


# ---- one line, never the catch-all ---------------------------------------------------------------

@pytest.mark.parametrize("args", [
    ["rename", "{in}", "-o", "{out}", "--regex", "a{4294967296}", "b"],
    ["inspect", "{in}", "--keys", "re:a{4294967296}"],
    ["drop", "{in}", "re:a{4294967296}", "-o", "{out}"],
    ["rename", "{in}", "-o", "{out}", "--regex", "(" * 2000 + "a" + ")" * 2000, "b"],
], ids=["rename-regex-overflow", "inspect-keys-overflow", "drop-overflow", "rename-regex-nested"])
def test_invalid_regex_reaches_the_catch_all(cli, tmp_path, flat, args):
    """A regex Python refuses with OverflowError/RecursionError ends in the catch-all (exit 1, 'set CKPTSURGERY_DEBUG'), not exit 2 'not a valid regular expression'."""
    out = tmp_path / "o.pth"
    result = cli(*[str(flat) if a == "{in}" else str(out) if a == "{out}" else a for a in args])
    assert_one_error_line(result, "regular expression", code=2)


def test_deeply_nested_map_json_reaches_the_catch_all(cli, tmp_path, flat):
    """rename --map with deeply nested JSON ends in the catch-all RecursionError; the shard index reader says 'nested too deeply'."""
    deep = tmp_path / "deep.json"
    deep.write_text("[" * 100000 + "]" * 100000)
    result = cli("rename", flat, "-o", tmp_path / "o.pth", "--map", deep)
    assert_one_error_line(result, "deep.json", code=1)


# ---- the library: CkptError/UsageError, never a bare exception, never a silent default ------------

@pytest.mark.parametrize("call", [
    "convert(p, out, max_shard_size=2_000_000_000, dry_run=True)",
    "merge([p, p], out, average=True, weights=[2, 1], dry_run=True)",
    "diff(p, p, atol='0.01')",
    "rename_keys(p, out, [('strip', 'module')], dry_run=True)",
    "rename_rule('strip', 5)",
])
def test_library_wrong_argument_types_raise_bare_exceptions(tmp_path, flat, call):
    """Natural library misuse (an int size, a list of weights, a str atol, a tuple rule) raises a bare TypeError/AttributeError, not CkptError."""
    from ckptsurgery.core import rename_rule
    from ckptsurgery.ops import convert, diff, inspect_report, merge, rename_keys

    env = dict(p=str(flat), out=str(tmp_path / "o.safetensors"), convert=convert, merge=merge, diff=diff,
               rename_keys=rename_keys, rename_rule=rename_rule, inspect_report=inspect_report)
    try:
        eval(call, env)
    except CkptError:
        return
    except Exception as e:  # noqa: BLE001
        pytest.fail(f"{call}: bare {type(e).__name__}: {e}")


@pytest.mark.parametrize("call", [
    "inspect(p, tree=True, depth=0)",
    "merge([p], out, into=p, on_mismatch='', dry_run=True)",
    "drop_keys(p, out, [], dry_run=True)",
])
def test_library_wrong_values_are_silently_accepted(tmp_path, flat, call):
    """The library silently accepts values the CLI refuses (depth 0, an empty policy, no drop pattern) instead of raising UsageError."""
    from ckptsurgery.errors import UsageError
    from ckptsurgery.ops import drop_keys, inspect, merge

    env = dict(p=str(flat), out=str(tmp_path / "o.pth"), inspect=inspect, merge=merge, drop_keys=drop_keys)
    with pytest.raises(UsageError):
        eval(call, env)
