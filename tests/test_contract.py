"""The command-line contract at its edges: exit codes that tell "different" from "broken", strict
JSON, real choices, options refused where they do not apply, rename rules that repeat and apply
in order, and examples at the end of every --help; empty values and options that cannot apply
refused, invalid regular expressions a usage error, the same exit codes through Typer's CliRunner;
and the library's side of it: misuse raises CkptError or UsageError, never a bare exception; the
--json schema (docs/json.md) generated from the report classes."""

from __future__ import annotations

import json
import os
import re
import shlex
from pathlib import Path

import pytest
import torch
import typer.main
from typer.testing import CliRunner

from conftest import ROOT, assert_one_error_line, load_any
from ckptsurgery.cli import app
from ckptsurgery.errors import CkptError

COMMANDS = ["inspect", "filter", "drop", "rename", "merge", "extract-lora", "convert", "diff"]


def strict_json(text: str):
    """json.loads that refuses NaN, Infinity and -Infinity, as jq and most parsers do."""
    def refuse(token):
        raise ValueError(f"not JSON: {token}")

    return json.loads(text, parse_constant=refuse)


# ---- diff: 0 same, 1 different, 2 trouble ----------------------------------------------------

def test_diff_exit_codes_follow_cmp(cli, tmp_path, zip_pth):
    other = tmp_path / "other.pth"
    torch.save({"w": torch.zeros(2)}, other)
    garbage = tmp_path / "garbage.pth"
    garbage.write_bytes(b"not a checkpoint at all")
    assert cli("diff", zip_pth, zip_pth).code == 0
    different = cli("diff", zip_pth, other)
    assert different.code == 1 and different.err == ""
    assert_one_error_line(cli("diff", zip_pth, tmp_path / "typo.pth"), "no such file", code=2)
    assert_one_error_line(cli("diff", garbage, zip_pth, "--json"), "not a checkpoint", code=2)
    assert_one_error_line(cli("diff", zip_pth, zip_pth, "--root", "nope"), "nope", code=2)
    assert cli("diff", zip_pth).code == 2  # wrong usage: the parser's own exit code
    assert cli("diff", zip_pth, zip_pth, "--atol", "lots").code == 2


# ---- strict JSON ---------------------------------------------------------------------------

def test_json_has_no_nan_or_infinity_tokens(cli, tmp_path):
    a, b = tmp_path / "a.pth", tmp_path / "b.pth"
    torch.save({"w": torch.tensor([1.0, float("nan")]), "x": torch.tensor([float("inf")])}, a)
    torch.save({"w": torch.tensor([1.0, 2.0]), "x": torch.tensor([float("inf")])}, b)
    result = cli("diff", a, b, "--atol", "0.5", "--json")
    assert result.code == 1
    doc = strict_json(result.out)
    assert doc["value_changed"] == [{"name": "w", "max_abs_diff": "inf"}]
    stats = strict_json(cli("inspect", a, "--stats", "--json").out)["tensors"]
    assert stats[1]["inf"] == 1 and stats[1]["max"] is None


def test_print_json_writes_non_finite_numbers_as_strings(capsys):
    from ckptsurgery.cli.common import print_json

    print_json({"rows": [{"v": float("-inf")}, {"v": 1.5}], "nested": {"n": [float("nan"), 2]}, "x": float("inf")})
    doc = strict_json(capsys.readouterr().out)
    assert doc == {"rows": [{"v": "-inf"}, {"v": 1.5}], "nested": {"n": ["nan", 2]}, "x": "inf"}


# ---- real choices ------------------------------------------------------------------------------

@pytest.mark.parametrize("command, option, bad, listed", [
    ("merge", "--on-mismatch", "pad", ["error", "skip", "overlap", "adapt"]),
    ("merge", "--on-conflict", "newest", ["error", "first", "last"]),
    ("convert", "--dtype", "fp8", ["fp32", "fp16", "bf16", "float32", "float16", "bfloat16", "float", "half"]),
])
def test_choices_are_real_choices(cli, tmp_path, zip_pth, command, option, bad, listed, monkeypatch):
    monkeypatch.setenv("COLUMNS", "300")  # the choices on one line of the help's table
    out = tmp_path / "o.pth"
    result = cli(command, zip_pth, "-o", out, option, bad)
    assert result.code == 2 and f"'{bad}' is not one of" in result.err and not out.exists()
    help_text = " ".join(cli(command, "--help").out.split())
    assert f"<{'|'.join(listed)}>" in help_text.replace(" ", ""), help_text


# ---- options that do not apply to the chosen mode ----------------------------------------------

@pytest.mark.parametrize("args, message", [
    (["merge", "{a}", "--on-mismatch", "skip"], "--on-mismatch applies to merge --into only"),
    (["merge", "{a}", "{a}", "--average", "--on-mismatch", "skip"], "--on-mismatch applies to merge --into only"),
    (["merge", "{a}", "--into", "{a}", "--on-conflict", "first"], "--on-conflict applies to a plain merge only"),
    (["merge", "{a}", "{a}", "--average", "--on-conflict", "last"], "--on-conflict applies to a plain merge only"),
    (["merge", "{a}", "{a}", "--weights", "1,2"], "--weights applies to --method (or --average) only"),
    (["merge", "{a}", "{a}", "--average", "--into", "{a}"], "do not combine"),
    (["filter", "{a}", "--keep", "conv", "--like", "{a}"], "not both"),
])
def test_options_that_do_not_apply_exit_2_and_write_nothing(cli, tmp_path, zip_pth, args, message):
    out = tmp_path / "o.pth"
    result = cli(*[str(zip_pth) if a == "{a}" else a for a in args], "-o", out)
    assert_one_error_line(result, message, code=2)
    assert not out.exists()


@pytest.mark.parametrize("args, message", [
    (["--depth", "2"], "--depth applies to --tree only"),
    (["--stats", "--tree"], "--stats lists tensors and --tree lists modules"),
])
def test_inspect_options_that_do_not_apply(cli, zip_pth, args, message):
    result = cli("inspect", zip_pth, *args)
    assert_one_error_line(result, message, code=2)
    assert result.out == ""


def test_inspect_stats_with_tree_in_json_gives_both(cli, zip_pth):
    doc = cli("inspect", zip_pth, "--stats", "--tree", "--depth", "1", "--json").json()
    assert "mean" in doc["tensors"][0] and [row["name"] for row in doc["tree"]] == ["conv", "bn", "liner1", "liner10"]


# ---- rename: repeatable rules, in the order given --------------------------------------------

def renamed(result) -> dict:
    assert result.code == 0, result.err
    return result.json()["renamed"]


def test_repeated_rules_all_apply_in_the_order_given(cli, tmp_path, zip_pth):
    out = tmp_path / "r.pth"
    got = renamed(cli("rename", zip_pth, "-o", out, "--replace", "conv", "c", "--replace", "bn", "b", "--json"))
    assert got["conv.weight"] == "c.weight" and got["bn.running_mean"] == "b.running_mean"
    assert sorted(load_any(out)) == sorted(got[k] if k in got else k for k in load_any(zip_pth))
    # each rule sees the names the earlier ones left
    chained = renamed(cli("rename", zip_pth, "-o", tmp_path / "c.pth", "--replace", "liner1", "fc",
                          "--regex", r"^fc(\d*)\.", r"head\1.", "--add-prefix", "net", "--json"))
    assert chained["liner1.weight"] == "net.head.weight" and chained["liner10.bias"] == "net.head0.bias"
    assert chained["conv.weight"] == "net.conv.weight"
    # the other order: the regex comes first and finds no fc yet
    result = cli("rename", zip_pth, "-o", tmp_path / "d.pth", "--regex", r"^fc(\d*)\.", r"head\1.",
                 "--replace", "liner1", "fc")
    assert_one_error_line(result, "--regex '^fc(\\\\d*)\\\\.' 'head\\\\1.' changed no key")


def test_repeated_rules_through_the_library_runner(tmp_path, zip_pth):
    """Typer's own test runner passes its arguments, not sys.argv: nothing may be dropped."""
    out = tmp_path / "r.pth"
    result = CliRunner().invoke(app, ["rename", str(zip_pth), "-o", str(out), "--replace", "conv", "c",
                                      "--replace=bn", "b", "--json"])
    assert result.exit_code == 0, result.output
    names = set(load_any(out))
    assert "c.weight" in names and "b.running_var" in names and not any(n.startswith(("conv", "bn")) for n in names)


def test_no_cli_code_but_the_entry_point_reads_sys_argv():
    """Commands take their arguments from whatever runs them (a test runner, another program); the
    console script's `main` alone reads the process's."""
    import inspect

    from ckptsurgery import cli

    cli_dir = Path(__file__).resolve().parent.parent / "ckptsurgery" / "cli"
    readers = [p.name for p in cli_dir.glob("*.py") if "sys.argv" in p.read_text()]
    assert readers == ["__init__.py"]
    assert (cli_dir / "__init__.py").read_text().count("sys.argv") == inspect.getsource(cli.main).count("sys.argv") == 1


@pytest.mark.parametrize("args", [
    ["--replace", "conv"],  # one value short
    ["--strip-prefix"],
    ["--regex", "x"],
])
def test_rule_missing_values_is_usage_error(cli, tmp_path, zip_pth, args):
    out = tmp_path / "r.pth"
    result = cli("rename", zip_pth, "-o", out, *args)
    assert result.code == 2 and "takes" in result.err and not out.exists()


def test_a_value_spelled_like_a_rule_belongs_to_its_option(cli, tmp_path, zip_pth):
    folder = tmp_path / "--map"
    folder.mkdir()
    out = folder / "r.pth"
    result = cli("rename", zip_pth, "--add-prefix", "m", "-qo", out)  # -o's value follows a short cluster
    assert result.code == 0 and out.exists(), result.err


@pytest.mark.parametrize("prefix", ["module", "module."])
def test_strip_and_add_prefix_name_a_module(cli, tmp_path, zip_pth, prefix):
    wrapped = tmp_path / f"wrapped{prefix}.pth"
    assert cli("rename", zip_pth, "--add-prefix", prefix, "-o", wrapped).code == 0
    assert all(k.startswith("module.") and not k.startswith("module..") for k in load_any(wrapped))
    plain = tmp_path / f"plain{prefix}.pth"
    assert cli("rename", wrapped, "--strip-prefix", prefix, "-o", plain).code == 0
    assert list(load_any(plain)) == list(load_any(zip_pth))


# ---- every --help ends with real examples ------------------------------------------------------

@pytest.mark.parametrize("command", COMMANDS)
def test_help_ends_with_two_or_three_examples_that_parse(cli, command):
    result = cli(command, "--help")
    assert result.code == 0
    lines = [line.strip() for line in result.out.splitlines() if line.strip()]
    start = lines.index("Examples:")
    examples = lines[start + 1 :]
    assert 2 <= len(examples) <= 3 and all(e.startswith(f"ckptsurgery {command} ") for e in examples), examples
    group = typer.main.get_command(app)
    for example in examples:
        words = shlex.split(example.split(" |")[0].split(" >")[0].split(" ||")[0])
        sub = group.get_command(None, words[1])
        with sub.make_context(words[1], words[2:]) as ctx:  # parses: every option exists, every choice is valid
            assert ctx.params


def test_diff_table_counts_what_decides_the_verdict(cli, tmp_path):
    a, b = tmp_path / "a.pth", tmp_path / "b.pth"
    torch.save({"w": torch.ones(3), "i": torch.tensor([2**53])}, a)
    torch.save({"w": torch.ones(3).bfloat16(), "i": torch.tensor([2**53 + 1])}, b)
    within = cli("diff", a, b, "--atol", "1")
    assert within.code == 0 and "dtype (max |A-B| 0)" in within.out
    assert within.out.splitlines()[-1] == "identical: 2 equal tensor(s) within atol 1, 0 difference(s)"
    beyond = cli("diff", a, b, "--atol", "0.5")
    assert beyond.code == 1 and "values (max |A-B| 1)" in beyond.out
    assert beyond.out.splitlines()[-1] == "different: 1 equal tensor(s) within atol 0.5, 1 difference(s)"


# ---- exit codes through Typer's runner, empty values, options that do not apply ------------------

def test_cli_runner_gets_exit_2_for_a_missing_diff_input_and_a_usage_error(tmp_path, flat):
    """Through `CliRunner().invoke(app, ...)` as well, a missing diff input and a usage error exit 2, not 1 (diff's "different")."""
    runner = CliRunner()
    missing = runner.invoke(app, ["diff", str(flat), str(tmp_path / "typo.pth")])
    assert missing.exit_code == 2, (missing.exit_code, repr(missing.exception))
    out = tmp_path / "o.pth"
    usage = runner.invoke(app, ["merge", str(flat), "-o", str(out), "--on-mismatch", "skip"])
    assert usage.exit_code == 2, (usage.exit_code, repr(usage.exception))


@pytest.mark.parametrize("kind", ["safetensors", "sharded"])
def test_root_is_refused_for_safetensors_and_shards(cli, tmp_path, flat, kind):
    """--root KEY on a safetensors file or a shard index is refused in one line, as a flat .pth refuses an unknown root (it was once ignored: exit 0, the top level listed)."""
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


def test_merge_into_an_empty_template_path_is_refused(cli, tmp_path, flat):
    """merge --into '' (an unset $TEMPLATE) is refused and writes nothing (it was once taken as no --into: a plain union, exit 0)."""
    out = tmp_path / "o.pth"
    result = cli("merge", flat, "--into", "", "-o", out)
    assert result.code in (1, 2) and not out.exists(), (result.code, result.err)


def test_an_empty_max_shard_size_is_a_usage_error(cli, tmp_path, flat):
    """convert --max-shard-size '' is a usage error naming the size and writes nothing (not one unsharded file, exit 0)."""
    out = tmp_path / "o.safetensors"
    result = cli("convert", flat, "-o", out, "--max-shard-size", "")
    assert_one_error_line(result, "size", code=2)
    assert not out.exists()


@pytest.mark.parametrize("args", [
    ["rename", "{in}", "-o", "{out}", "--regex", "a{4294967296}", "b"],
    ["inspect", "{in}", "--keys", "re:a{4294967296}"],
    ["drop", "{in}", "re:a{4294967296}", "-o", "{out}"],
    ["rename", "{in}", "-o", "{out}", "--regex", "(" * 2000 + "a" + ")" * 2000, "b"],
], ids=["rename-regex-overflow", "inspect-keys-overflow", "drop-overflow", "rename-regex-nested"])
def test_a_regex_python_cannot_compile_is_a_usage_error(cli, tmp_path, flat, args):
    """A regex Python refuses with OverflowError/RecursionError is exit 2 'not a valid regular expression', not the catch-all (exit 1, 'set CKPTSURGERY_DEBUG')."""
    out = tmp_path / "o.pth"
    result = cli(*[str(flat) if a == "{in}" else str(out) if a == "{out}" else a for a in args])
    assert_one_error_line(result, "regular expression", code=2)


# ---- the library: CkptError/UsageError, never a bare exception, never a silent default ------------

@pytest.mark.parametrize("call", [
    "convert_checkpoint(p, WriteOptions(out, max_shard_size=2_000_000_000, dry_run=True))",
    "merge_checkpoints([p, p], WriteOptions(out, dry_run=True), average=True, weights=[2, 1])",
    "diff_checkpoints(p, p, atol='0.01')",
    "rename_keys(p, [('strip', 'module')], WriteOptions(out, dry_run=True))",
    "rename_rule('strip', 5)",
])
def test_library_misuse_by_type_works_or_raises_ckpt_error(tmp_path, flat, call):
    """Natural library misuse (an int size, a list of weights, a str atol, a tuple rule) works or raises CkptError, never a bare TypeError/AttributeError."""
    from ckptsurgery.core import rename_rule
    from ckptsurgery.ops import (
        WriteOptions, convert_checkpoint, diff_checkpoints, inspect_report, merge_checkpoints, rename_keys,
    )

    env = dict(p=str(flat), out=str(tmp_path / "o.safetensors"), convert_checkpoint=convert_checkpoint,
               merge_checkpoints=merge_checkpoints, diff_checkpoints=diff_checkpoints, WriteOptions=WriteOptions,
               rename_keys=rename_keys, rename_rule=rename_rule, inspect_report=inspect_report)
    try:
        eval(call, env)
    except CkptError:
        return
    except Exception as e:  # noqa: BLE001
        pytest.fail(f"{call}: bare {type(e).__name__}: {e}")


@pytest.mark.parametrize("call", [
    "inspect_checkpoint(p, tree=True, depth=0)",
    "merge_checkpoints([p], WriteOptions(out, dry_run=True), into=p, on_mismatch='')",
    "drop_keys(p, [], WriteOptions(out, dry_run=True))",
])
def test_library_raises_usage_error_for_values_the_cli_refuses(tmp_path, flat, call):
    """The library raises UsageError for values the CLI refuses (depth 0, an empty policy, no drop pattern) instead of accepting them silently."""
    from ckptsurgery.errors import UsageError
    from ckptsurgery.ops import WriteOptions, drop_keys, inspect_checkpoint, merge_checkpoints

    env = dict(p=str(flat), out=str(tmp_path / "o.pth"), inspect_checkpoint=inspect_checkpoint,
               merge_checkpoints=merge_checkpoints, drop_keys=drop_keys, WriteOptions=WriteOptions)
    with pytest.raises(UsageError):
        eval(call, env)


# ---- the --json schema: documented once, from the report classes ---------------------------------

def test_docs_json_md_is_the_schema_the_report_classes_declare():
    """docs/json.md is generated from ckptsurgery/ops/reports.py: regenerate it with
    `python -m ckptsurgery.ops.reports > docs/json.md` when a report changes."""
    from ckptsurgery.ops.reports import schema_markdown

    with open(os.path.join(ROOT, "docs", "json.md"), encoding="utf-8") as f:
        assert f.read() == schema_markdown()


def test_every_report_field_is_documented_and_every_json_key_is_a_field(cli, tmp_path, flat):
    """The --json document of a write is exactly its report's fields, in declared order."""
    from dataclasses import fields

    from ckptsurgery.ops.reports import REPORTS, NESTED, DropReport

    for cls in (*(c for _, c in REPORTS), *NESTED):
        assert all(f.metadata.get("doc") for f in fields(cls)), cls.__name__
    first = cli("inspect", flat, "--json").json()["tensors"][0]["name"]
    doc = cli("drop", flat, first, "-o", tmp_path / "o.pth", "--json").json()
    declared = [f.name for f in fields(DropReport)]
    always = [f.name for f in fields(DropReport) if not f.metadata["omit_if_none"]]
    assert set(doc) <= set(declared) and set(always) <= set(doc)
    assert list(doc) == [name for name in declared if name in doc]


def test_every_shared_output_option_is_a_write_options_field():
    """A new output option is one WriteOptions field and one OUTPUT_OPTIONS entry of the same name
    (docs/architecture.md): the command line hands every one on, by name."""
    from dataclasses import fields

    from ckptsurgery.cli.common import OUTPUT_OPTIONS
    from ckptsurgery.ops import WriteOptions

    shown_only = {"json", "quiet", "metadata_file", "rank_timeout"}  # shown; read into metadata; how ranks join
    assert set(OUTPUT_OPTIONS) - shown_only <= {f.name for f in fields(WriteOptions)}



@pytest.mark.parametrize("options, message", [
    ({"average": True, "weights": []}, "--weights gives 0 weights for 2 models"),
    ({"into": "{p}", "on_mismatch": "adapt", "grid": ()}, "--grid ()"),
    ({"grid": ()}, "--grid applies to --on-mismatch adapt only"),
    ({"weights": ()}, "--weights applies to --method (or --average) only"),
])
def test_library_merge_checks_an_empty_list_as_a_value(tmp_path, flat, options, message):
    """An empty list given to merge_checkpoints is a value to check (and refuse), not "not given"."""
    from ckptsurgery.errors import UsageError
    from ckptsurgery.ops import WriteOptions, merge_checkpoints

    options = {k: str(flat) if v == "{p}" else v for k, v in options.items()}
    with pytest.raises(UsageError, match=re.escape(message)):
        merge_checkpoints([str(flat), str(flat)], WriteOptions(str(tmp_path / "o.pth"), dry_run=True), **options)


def test_library_merge_with_no_adapters_is_a_plain_merge(tmp_path, flat):
    from ckptsurgery.ops import UnionReport, WriteOptions, merge_checkpoints

    report = merge_checkpoints([str(flat)], WriteOptions(str(tmp_path / "o.pth"), dry_run=True), lora=[],
                               lora_scale=[])
    assert isinstance(report, UnionReport) and report.mode == "union"


@pytest.mark.parametrize("call", [
    "convert_checkpoint(p, out)", "drop_keys(p, ['fc'], out)", "filter_keys(p, out, keep=['fc'])",
    "rename_keys(p, [], out)", "merge_checkpoints([p], out)", "extract_lora(p, p, out)",
    "write_checkpoint({}, out)",
])
def test_library_writing_functions_name_write_options_when_given_a_path(tmp_path, flat, call):
    """0.2's calls passed the output path where 0.3 takes a WriteOptions: one line says so."""
    from ckptsurgery import ops
    from ckptsurgery.errors import UsageError

    env = {name: getattr(ops, name) for name in ops.__all__} | {"p": str(flat), "out": str(tmp_path / "o.pth")}
    with pytest.raises(UsageError, match="give the output as WriteOptions"):
        eval(call, env)


def test_extract_lora_refuses_write_options_it_cannot_use_even_when_zero(tmp_path, flat):
    from ckptsurgery.errors import UsageError
    from ckptsurgery.ops import WriteOptions, extract_lora

    for given in ({"jobs": 0}, {"no_metadata": True}, {"format": "dcp"}):
        with pytest.raises(UsageError, match="cannot be used with an adapter folder"):
            extract_lora(str(flat), str(flat), WriteOptions(str(tmp_path / "a"), dry_run=True, **given), rank=2)


@pytest.mark.parametrize("args", [["-h"], ["drop", "-h"], ["merge", "-h"]])
def test_dash_h_is_help(cli, args):
    result = cli(*args)
    assert result.code == 0 and "Usage:" in result.out and "-h" in result.out


def test_help_offers_shell_completion(cli):
    assert "--install-completion" in cli("--help").out


@pytest.mark.parametrize("fmt", [[], ["--format", "dcp"]])
def test_dry_run_over_an_existing_output_says_it_would_need_force(cli, tmp_path, flat, fmt):
    out = tmp_path / ("dcp" if fmt else "o.pth")
    assert cli("convert", flat, "-o", out, *fmt).code == 0
    before = sorted(os.listdir(tmp_path))
    result = cli("convert", flat, "-o", out, *fmt, "--dry-run")
    assert result.code == 0 and "would need --force: already there (1)" in result.out, result.err
    report = cli("convert", flat, "-o", out, *fmt, "--dry-run", "--json").json()
    assert report["needs_force"] == [str(out)]
    assert "needs_force" not in cli("convert", flat, "-o", out, *fmt, "--dry-run", "--force", "--json").json()
    assert sorted(os.listdir(tmp_path)) == before
    assert cli("convert", flat, "-o", out, *fmt).code == 1  # the real run still refuses


def test_a_union_of_overlapping_sources_suggests_averaging_them_too(cli, tmp_path, flat):
    result = cli("merge", flat, flat, "-o", tmp_path / "o.pth")
    assert_one_error_line(result, "more than one source", "--on-conflict first|last", "--average or --method")


def test_rename_with_allow_unchanged_runs_twice_to_the_same_file(cli, tmp_path, flat):
    """--strip-prefix in a script: the second run (on the stripped file) is an error unless
    --allow-unchanged, and then writes the same bytes."""
    once, twice = tmp_path / "once.pth", tmp_path / "twice.pth"
    assert cli("rename", flat, "--strip-prefix", "module", "-o", once).code == 0
    assert_one_error_line(cli("rename", once, "--strip-prefix", "module", "-o", twice), "changed no key",
                          "--allow-unchanged")
    result = cli("rename", once, "--strip-prefix", "module", "-o", twice, "--allow-unchanged", "--json")
    assert result.code == 0 and result.json()["renamed"] == {}
    assert cli("diff", once, twice).code == 0


def test_long_key_tables_stop_at_2000_rows_and_lead_with_what_matters(cli, tmp_path, monkeypatch):
    """merge --into and rename --dry-run print one row per key: 20,000 keys were 20,007 lines.
    Like inspect, a table stops at 2,000 rows with a line saying where the rest is; merge --into
    lists mismatches before copies."""
    monkeypatch.setenv("COLUMNS", "200")
    state = {f"layer.{i}.w": torch.zeros(1) for i in range(2100)}
    torch.save(state, tmp_path / "a.pth")
    torch.save({**state, "layer.2099.w": torch.zeros(2)}, tmp_path / "t.pth")
    result = cli("merge", tmp_path / "a.pth", "--into", tmp_path / "t.pth", "--on-mismatch", "skip",
                 "-o", tmp_path / "o.pth", "--dry-run")
    rows = result.out.splitlines()
    assert result.code == 0 and rows[1].split()[:2] == ["layer.2099.w", "mismatched"]
    assert "... 100 more keys not listed: --json lists them all" in result.out
    assert len(rows) < 2010
    renamed = cli("rename", tmp_path / "a.pth", "--add-prefix", "m", "-o", tmp_path / "r.pth", "--dry-run")
    assert "... 100 more renamed keys not listed" in renamed.out and len(renamed.out.splitlines()) < 2010


def test_a_long_key_wraps_in_a_narrow_terminal_and_is_never_cut(cli, tmp_path, monkeypatch):
    monkeypatch.setenv("COLUMNS", "40")
    name = "encoder.layers.0.attention.self.query_key_value.weight"
    torch.save({name: torch.zeros(1)}, tmp_path / "a.pth")
    result = cli("rename", tmp_path / "a.pth", "--add-prefix", "model", "-o", tmp_path / "r.pth", "--dry-run")
    rows = [re.split(r"\s{2,}", line.strip()) for line in result.out.splitlines()[1:] if not line.startswith("would")]
    rows = rows[:next(i for i, r in enumerate(rows) if r[0].startswith("renamed"))]
    assert "…" not in result.out
    assert "".join(r[0] for r in rows) == name and "".join(r[-1] for r in rows) == "model." + name


def test_summaries_count_in_the_singular_and_sum_up_the_routine(cli, tmp_path):
    """No "1 tensors"; no "…: none" line; 20 num_batches_tracked said once, not listed."""
    state = {f"bn{i}.num_batches_tracked": torch.tensor(1) for i in range(20)}
    torch.save({"w": torch.ones(2), **state}, tmp_path / "a.pth")
    cast = cli("convert", tmp_path / "a.pth", "-o", tmp_path / "b.safetensors", "--dtype", "bf16")
    assert "kept their dtype (--dtype casts float16/bfloat16/float32/float64 only) (1): *.num_batches_tracked (20)" \
        in cast.err, cast.err
    torch.save({"w": torch.ones(2)}, tmp_path / "one.pth")
    one = cli("convert", tmp_path / "one.pth", "-o", tmp_path / "one.safetensors")
    assert ": 1 tensor, " in one.err
    merged = cli("merge", tmp_path / "one.pth", tmp_path / "one.pth", "--average", "-o", tmp_path / "m.pth")
    assert "merged 1 tensor by linear" in merged.err and "not floating" not in merged.err


@pytest.mark.parametrize("args, message", [
    (["merge", "{a}", "--on-mismatch", "bogus", "-o", "{o}"], "Invalid value for '--on-mismatch'"),
    (["drop", "{a}"], "Missing argument 'PATTERN...'"),
    (["convert", "{a}", "--bogus", "-o", "{o}"], "No such option: --bogus"),
    (["bogus"], "No such command 'bogus'"),
    (["--bogus"], "No such option: --bogus"),
])
def test_wrong_usage_is_one_line_and_exit_2(cli, tmp_path, flat, args, message):
    """Usage errors were Click's usage line, a hint and a boxed panel; now one line like every other
    refusal, naming where --help is."""
    result = cli(*[str(flat) if a == "{a}" else str(tmp_path / "o.pth") if a == "{o}" else a for a in args])
    assert_one_error_line(result, message, "--help')", code=2)


def test_help_says_what_each_command_reads_and_what_extract_lora_metadata_keeps(cli, monkeypatch):
    monkeypatch.setenv("COLUMNS", "400")
    converted = " ".join(cli("convert", "--help").out.split())
    assert "DCP, DeepSpeed (ZeRO) or accelerate folder" in converted and "Hugging Face folder" in converted
    extracted = " ".join(cli("extract-lora", "--help").out.split())
    assert "inherits none of BASE's or TUNED's" in extracted and "The input's is kept" not in extracted


def test_merge_help_groups_its_options_by_mode(cli, monkeypatch):
    monkeypatch.setenv("COLUMNS", "120")
    text = cli("merge", "--help").out
    panels = ["Into a template (--into)", "Plain merge", "Merge methods (--method, --average)", "Adapters (--lora)",
              "Output"]
    assert all(f"─ {panel} ─" in text for panel in panels)
    into_panel = text[text.index("─ Into a template"):text.index("─ Plain merge")]
    assert "--on-mismatch" in into_panel and "--density" not in into_panel and "--lora" not in into_panel


def test_rank_timeout_is_checked_without_torchrun_too(cli, tmp_path, flat):
    """An option is never silently taken: --rank-timeout -5 wrote a file when WORLD_SIZE was unset."""
    assert_one_error_line(cli("convert", flat, "-o", tmp_path / "o.pth", "--rank-timeout", "-5"), "--rank-timeout",
                          code=2)


def test_dry_run_over_an_existing_sharded_output_names_each_file_once(cli, tmp_path, flat):
    out = tmp_path / "s.safetensors"
    assert cli("convert", flat, "-o", out, "--max-shard-size", "20B").code == 0
    report = cli("convert", flat, "-o", out, "--max-shard-size", "20B", "--dry-run", "--json").json()
    assert report["needs_force"] == report["files"] and len(set(report["needs_force"])) == 3
