"""Safetensors metadata (issue 11, section 2): kept through every writing command, set with
--metadata / --metadata-file, emptied with --no-metadata, refused where it cannot apply — all
checked with safetensors' own reader."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from conftest import assert_one_error_line, load_any

META = {
    "license": "apache-2.0",
    "modelspec.title": "Net v1",
    "ss_network_dim": "4",
    # content hashes: not true of the bytes a rewrite writes, dropped
    "modelspec.hash_sha256": "0x1234",
    "sshs_model_hash": "deadbeef",
}
KEPT = {"format": "pt", "license": "apache-2.0", "modelspec.title": "Net v1", "ss_network_dim": "4"}
HASHES = ["modelspec.hash_sha256", "sshs_model_hash"]


def st_meta(path) -> dict:
    with safe_open(str(path), "pt") as f:
        return f.metadata()


@pytest.fixture
def src(tmp_path, state_dict):
    path = tmp_path / "src.safetensors"
    save_file(dict(state_dict), str(path), metadata=META)
    return path


@pytest.fixture
def tuned(tmp_path, state_dict):
    """Another model of the same shape, with metadata of its own."""
    path = tmp_path / "tuned.safetensors"
    save_file({k: v + 1 if v.is_floating_point() else v for k, v in state_dict.items()}, str(path),
              metadata={"license": "tuned-licence", "modelspec.title": "Tuned"})
    return path


def _template(tmp_path, state_dict):
    path = tmp_path / "template.safetensors"
    save_file(dict(state_dict), str(path), metadata={"license": "template-licence"})
    return path


def _adapter(cli, tmp_path, src, tuned):
    adapter = tmp_path / "adapter"
    assert cli("extract-lora", src, tuned, "--rank", "2", "-o", adapter, "-q").code == 0
    return adapter


# each writing command, its arguments given the fixtures' paths and OUT
COMMANDS = {
    "convert": lambda p: ["convert", p["src"], "-o", p["out"]],
    "convert-cast": lambda p: ["convert", p["src"], "-o", p["out"], "--dtype", "bf16"],
    "filter": lambda p: ["filter", p["src"], "--keep", "liner1", "-o", p["out"]],
    "drop": lambda p: ["drop", p["src"], "bn", "-o", p["out"]],
    "rename": lambda p: ["rename", p["src"], "-o", p["out"], "--add-prefix", "model"],
    "merge-union": lambda p: ["merge", p["src"], p["tuned"], "--on-conflict", "first", "-o", p["out"]],
    "merge-into": lambda p: ["merge", p["src"], "--into", p["template"], "-o", p["out"]],
    "merge-average": lambda p: ["merge", p["src"], p["tuned"], "--average", "-o", p["out"]],
    "merge-method-base": lambda p: ["merge", p["tuned"], "--method", "task-arithmetic", "--base", p["src"], "-o", p["out"]],
    "merge-lora": lambda p: ["merge", p["src"], "--lora", p["adapter"], "-o", p["out"]],
}


@pytest.fixture
def paths(cli, tmp_path, state_dict, src, tuned):
    def make(command: str) -> dict:
        p = {"src": src, "tuned": tuned, "out": tmp_path / "out.safetensors"}
        if command == "merge-into":
            p["template"] = _template(tmp_path, state_dict)
        if command == "merge-lora":
            p["adapter"] = _adapter(cli, tmp_path, src, tuned)
        return p

    return make


@pytest.mark.parametrize("command", COMMANDS)
def test_every_command_keeps_the_metadata_but_the_content_hashes(cli, paths, command):
    """A cast, a rename, a filter or a merge does not make a licence untrue; merges keep the
    first source's (the base's with --method --base and --lora; never --into's template's)."""
    p = paths(command)
    result = cli(*COMMANDS[command](p), "--json")
    assert result.code == 0, result.err
    report = result.json()
    assert st_meta(p["out"]) == KEPT
    assert report["metadata"] == KEPT and report["metadata_dropped"] == HASHES


@pytest.mark.parametrize("command", ["convert", "merge-into", "merge-lora"])
def test_every_command_sets_and_empties_metadata(cli, paths, command):
    p = paths(command)
    result = cli(*COMMANDS[command](p), "--no-metadata", "--metadata", "license=mit", "--json")
    assert result.code == 0, result.err
    assert st_meta(p["out"]) == {"format": "pt", "license": "mit"}
    assert result.json()["metadata_dropped"] == sorted(set(META) - {"license"})


def test_cast_keeps_the_licence_and_the_tensors_are_cast(cli, tmp_path, src):
    out = tmp_path / "bf16.safetensors"
    assert cli("convert", src, "-o", out, "--dtype", "bf16").code == 0
    assert st_meta(out)["license"] == "apache-2.0"
    assert load_any(out)["liner1.weight"].dtype == torch.bfloat16


def test_metadata_sets_and_replaces_entries(cli, tmp_path, src):
    out = tmp_path / "out.safetensors"
    result = cli("convert", src, "-o", out, "--metadata", "license=mit", "--metadata", "note=a=b",
                 "--metadata", "empty=", "--metadata", "note=last wins", "--json")
    assert result.code == 0, result.err
    expected = {**KEPT, "license": "mit", "note": "last wins", "empty": ""}
    assert st_meta(out) == expected
    assert result.json()["metadata"] == dict(sorted(expected.items()))
    # the user may set a content hash again: then it is carried, not dropped
    again = tmp_path / "again.safetensors"
    result = cli("convert", src, "-o", again, "--metadata", "sshs_model_hash=cafe", "--json")
    assert st_meta(again)["sshs_model_hash"] == "cafe" and result.json()["metadata_dropped"] == ["modelspec.hash_sha256"]


def test_metadata_file_then_command_line(cli, tmp_path, src):
    entries = tmp_path / "meta.json"
    entries.write_text(json.dumps({"license": "cc-by-4.0", "modelspec.author": "me", "ünïcode": "✓"}))
    out = tmp_path / "out.safetensors"
    result = cli("convert", src, "-o", out, "--metadata-file", entries, "--metadata", "modelspec.author=you")
    assert result.code == 0, result.err
    assert st_meta(out) == {**KEPT, "license": "cc-by-4.0", "modelspec.author": "you", "ünïcode": "✓"}


def test_no_metadata_starts_empty_but_keeps_format_and_the_alias_record(cli, tmp_path, tied_pth):
    tied_st = tmp_path / "tied.safetensors"
    assert cli("convert", tied_pth, "-o", tied_st, "--metadata", "license=mit").code == 0
    assert st_meta(tied_st)["license"] == "mit" and "ckptsurgery.aliases" in st_meta(tied_st)
    out = tmp_path / "bare.safetensors"
    result = cli("convert", tied_st, "-o", out, "--no-metadata")
    assert result.code == 0, result.err
    assert set(st_meta(out)) == {"format", "ckptsurgery.aliases"} and st_meta(out)["format"] == "pt"
    assert "metadata dropped (--no-metadata) (1): license" in result.err
    # the ties still come back
    back = tmp_path / "back.pth"
    assert cli("convert", out, "-o", back).code == 0
    sd = load_any(back)
    assert sd["lm_head.weight"].data_ptr() == sd["embed.weight"].data_ptr()


def test_pth_input_gets_format_only(cli, tmp_path, zip_pth):
    out = tmp_path / "out.safetensors"
    result = cli("convert", zip_pth, "-o", out, "--json")
    assert st_meta(out) == {"format": "pt"}
    assert result.json()["metadata"] == {"format": "pt"} and result.json()["metadata_dropped"] == []


def test_dropped_keys_are_said_for_humans(cli, tmp_path, src):
    result = cli("convert", src, "-o", tmp_path / "out.safetensors")
    assert result.code == 0
    assert "metadata dropped (content hashes, not recomputed for the bytes written) (2): " \
           "modelspec.hash_sha256, sshs_model_hash" in result.err
    # a .pth holds no metadata map: everything is said to be left out, in the JSON too
    result = cli("convert", src, "-o", tmp_path / "out.pth")
    assert result.code == 0
    assert "metadata left out (a .pth or DCP output holds none) (5): " in result.err
    result = cli("convert", src, "-o", tmp_path / "out2.pth", "--json")
    assert result.json()["metadata"] is None and result.json()["metadata_dropped"] == sorted(META)
    # --dry-run says the same, on stdout, and writes nothing
    result = cli("convert", src, "-o", tmp_path / "dry.safetensors", "--dry-run")
    assert "metadata dropped (content hashes" in result.out and not (tmp_path / "dry.safetensors").exists()


def test_sharded_output_carries_it_in_each_shard_not_the_index(cli, tmp_path, src):
    out = tmp_path / "sharded" / "model.safetensors"
    out.parent.mkdir()
    result = cli("convert", src, "-o", out, "--max-shard-size", "100B", "--metadata", "note=x", "--json")
    assert result.code == 0, result.err
    shards = [f for f in result.json()["files"] if f.endswith(".safetensors")]
    assert len(shards) > 1
    for shard in shards:
        assert st_meta(shard) == {**KEPT, "note": "x"}
    index = json.loads((tmp_path / "sharded" / "model.safetensors.index.json").read_text())
    assert list(index["metadata"]) == ["total_size"]  # transformers acts on an index's metadata (`dtype`)
    doc = cli("inspect", out.parent, "--json").json()  # read back from the shards
    assert doc["metadata"] == {k: v for k, v in {**KEPT, "note": "x"}.items() if k != "format"}
    # and back to one file, the metadata comes along
    one = tmp_path / "one.safetensors"
    assert cli("convert", out.parent, "-o", one).code == 0
    assert st_meta(one) == {**KEPT, "note": "x"}


def test_inspect_shows_metadata_human_and_json(cli, tmp_path, src):
    out = tmp_path / "out.safetensors"
    assert cli("convert", src, "-o", out, "--metadata", "note=hello").code == 0
    doc = cli("inspect", out, "--json").json()
    assert doc["metadata"] == {**KEPT, "note": "hello"}
    human = cli("inspect", out)
    assert human.code == 0
    line = next(line for line in human.out.splitlines() if line.startswith("metadata: "))
    assert "license=apache-2.0" in line and "note=hello" in line and "format=pt" in line


def test_writes_are_byte_deterministic_whatever_the_option_order(cli, tmp_path, src):
    a, b = tmp_path / "a.safetensors", tmp_path / "b.safetensors"
    assert cli("convert", src, "-o", a, "--metadata", "zeta=1", "--metadata", "alpha=2").code == 0
    assert cli("convert", src, "-o", b, "--metadata", "alpha=2", "--metadata", "zeta=1").code == 0
    assert a.read_bytes() == b.read_bytes()
    header = json.loads(a.read_bytes()[8:8 + int.from_bytes(a.read_bytes()[:8], "little")])
    assert list(header["__metadata__"]) == sorted(header["__metadata__"])


def test_extract_lora_sets_the_adapters_metadata(cli, tmp_path, src, tuned):
    adapter = tmp_path / "adapter"
    result = cli("extract-lora", src, tuned, "--rank", "2", "-o", adapter, "--metadata", "license=mit", "--json")
    assert result.code == 0, result.err
    # the adapter is a difference: it inherits neither model's title or hashes
    assert st_meta(adapter / "adapter_model.safetensors") == {"format": "pt", "license": "mit"}
    assert result.json()["metadata"] == {"format": "pt", "license": "mit"}


def _json_file(tmp_path, text: str):
    path = tmp_path / "meta.json"
    path.write_text(text)
    return path


@pytest.mark.parametrize("options, fragments", [
    (["--metadata", "novalue"], ["--metadata 'novalue'", "KEY=VALUE"]),
    (["--metadata", "=value"], ["KEY=VALUE"]),
    (["--metadata", "format=np"], ["'format'", "cannot be set"]),
    (["--metadata", "ckptsurgery.aliases=[]"], ["'ckptsurgery.'", "tool's own"]),
    (["--metadata-file", '{"epochs": 3}'], ["'epochs'", "int value", "must be strings"]),
    (["--metadata-file", '{"nested": {"a": "b"}}'], ["'nested'", "must be strings"]),
    (["--metadata-file", '{"flag": null}'], ["'flag'", "must be strings"]),
    (["--metadata-file", '["a", "b"]'], ["JSON object"]),
    (["--metadata-file", "{not json"], ["not valid JSON"]),
    (["--metadata-file", '{"ckptsurgery.x": "1"}'], ["tool's own"]),
    (["--metadata-file", '{"format": "pt"}'], ["'format'"]),
    (["--metadata-file", '{"bad": "\\ud800"}'], ["not valid Unicode"]),
])
def test_bad_metadata_is_a_usage_error(cli, tmp_path, src, options, fragments):
    if options[0] == "--metadata-file":
        options = [options[0], _json_file(tmp_path, options[1])]
    out = tmp_path / "out.safetensors"
    result = cli("convert", src, "-o", out, *options)
    assert_one_error_line(result, *fragments, code=2)
    assert not out.exists()


def test_missing_metadata_file_is_a_usage_error(cli, tmp_path, src):
    result = cli("convert", src, "-o", tmp_path / "out.safetensors", "--metadata-file", tmp_path / "none.json")
    assert_one_error_line(result, "--metadata-file", "none.json", code=2)


@pytest.mark.parametrize("output", ["out.pth", "out.bin", "dcp"])
@pytest.mark.parametrize("option", [["--metadata", "license=mit"], ["--metadata-file", "FILE"], ["--no-metadata"]])
def test_metadata_options_are_refused_where_no_metadata_is_written(cli, tmp_path, src, output, option):
    if option[0] == "--metadata-file":
        option = [option[0], _json_file(tmp_path, "{}")]
    extra = ["--format", "dcp"] if output == "dcp" else []
    result = cli("convert", src, "-o", tmp_path / output, *extra, *option, "--dry-run")
    assert_one_error_line(result, "apply to .safetensors outputs only", code=2)
    assert not (tmp_path / output).exists()


@pytest.mark.parametrize("command", ["convert", "filter", "drop", "rename", "merge"])
def test_help_lists_the_options(cli, command):
    result = cli(command, "--help")
    assert result.code == 0
    for option in ("--metadata", "--metadata-file", "--no-metadata"):
        assert option in result.out, (command, option)
