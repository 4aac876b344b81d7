"""Safetensors metadata (issue 11, section 2): kept through every writing command, set with
--metadata / --metadata-file, emptied with --no-metadata, refused where it cannot apply — all
checked with safetensors' own reader; headers safetensors refuses (too large, two metadata maps,
not an object) refused as well, and a sharded output's index, which transformers reads, no
more than the input said."""

from __future__ import annotations

import json
import struct

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


# ---- headers safetensors reads, and only those --------------------------------------------------

SAFETENSORS_MAX_HEADER = 100_000_000  # the safetensors library's limit (Rust: MAX_HEADER_SIZE)


ONE_TENSOR = '"t":{"dtype":"F32","shape":[1],"data_offsets":[0,4]}'


def _raw(path, header: bytes, data: bytes = b"\0" * 4):
    """A safetensors file with exactly this header (no padding)."""
    path.write_bytes(struct.pack("<Q", len(header)) + header + data)
    return path


def _st_opens(path) -> bool:
    try:
        with safe_open(str(path), "pt") as f:
            f.metadata()
        return True
    except Exception:
        return False


def _index(folder):
    return json.loads(next(p for p in folder.iterdir() if p.name.endswith(".index.json")).read_text())


def test_an_output_header_is_never_larger_than_safetensors_reads(cli, tmp_path):
    """safetensors refuses a header longer than 100,000,000 bytes ("header too large"). An
    input whose header is exactly at that limit and has no `format` entry is a valid file;
    `convert` with no option adds `"format":"pt"` and writes a 100,000,016-byte header — exit 0,
    a file neither safetensors nor transformers opens (the same from `--metadata-file` with a big
    value, or `--metadata` on top of a large map). Cause: io/write.py, write_safetensors, writes
    `raw` without checking its length. Fix: before anything is written (and under --dry-run),
    refuse an output header over 100,000,000 bytes: one error line, exit 1, no file."""
    pre, post = b'{"__metadata__":{"a":"', b'"}}'
    src = _raw(tmp_path / "edge.safetensors", pre + b"x" * (SAFETENSORS_MAX_HEADER - len(pre) - len(post)) + post, b"")
    assert _st_opens(src)
    out = tmp_path / "out.safetensors"
    result = cli("convert", src, "-o", out, "-q")
    if result.code == 0:
        assert _st_opens(out), "exit 0, but safetensors refuses the output: header too large"
    else:
        assert_one_error_line(result, code=1)
        assert not out.exists()


def test_a_header_safetensors_refuses_as_too_large_is_refused(cli, tmp_path):
    """io/safetensors.py: `MAX_HEADER = 100 * 1024 * 1024  # the safetensors library's own limit`
    — but the library's limit is 100,000,000 bytes, not 104,857,600. A header between the two is
    refused by safetensors ("header too large") and read by ckptsurgery, which then writes a
    file that safetensors opens: a file no other reader accepts is laundered. Fix: MAX_HEADER =
    100_000_000 (and the writer's check above uses the same constant)."""
    n = SAFETENSORS_MAX_HEADER + 8
    body = "{" + ONE_TENSOR + ',"__metadata__":{"a":"'
    header = body.encode() + b"x" * (n - len(body) - 3) + b'"}}'
    assert len(header) == n
    src = _raw(tmp_path / "big.safetensors", header)
    assert not _st_opens(src)
    result = cli("inspect", src, "--json")
    assert_one_error_line(result, "header", code=1)


def test_two_metadata_maps_in_one_header_are_refused(cli, tmp_path):
    """`{"__metadata__": {...A...}, "__metadata__": {...B...}, ...}`: safetensors refuses it
    ("duplicate field `__metadata__`"); ckptsurgery's json.loads silently keeps the last map, so
    the licence (or a forged `ckptsurgery.aliases`, which the tool then honours) is whichever
    copy a reader happens to keep. `convert` turns it into a clean file carrying B, exit 0.
    Cause: io/safetensors.py read_header, json.loads without an object_pairs_hook. Fix: refuse
    a duplicate key in the header (at least `__metadata__`, and keys inside it), one error line."""
    header = ('{"__metadata__":{"license":"apache-2.0"},"__metadata__":{"license":"proprietary"},'
              + ONE_TENSOR + "}").encode()
    src = _raw(tmp_path / "dup.safetensors", header)
    assert not _st_opens(src)
    out = tmp_path / "out.safetensors"
    result = cli("convert", src, "-o", out)
    assert_one_error_line(result, "__metadata__", code=1)
    assert not out.exists()


@pytest.mark.parametrize("value", ["[]", "0", "false", '""'])
def test_a_metadata_that_is_not_an_object_is_refused(cli, tmp_path, value):
    """`"__metadata__": []` (or 0, false, "") is refused by safetensors ("invalid type: ...,
    expected a map") and by ckptsurgery's own check `isinstance(meta, dict)` — except that
    `header.pop("__metadata__", None) or {}` turns every falsy value into {} first, so the file
    is read and rewritten as a valid one. Cause: io/safetensors.py `_metadata`, the `or {}`.
    Fix: only a missing key or null means "no metadata"; anything else not an object is the
    existing error "__metadata__ must map strings to strings"."""
    src = _raw(tmp_path / "bad.safetensors", ('{"__metadata__":' + value + "," + ONE_TENSOR + "}").encode())
    assert not _st_opens(src)
    out = tmp_path / "out.safetensors"
    result = cli("convert", src, "-o", out)
    assert_one_error_line(result, "__metadata__", code=1)
    assert not out.exists()


# ---- a sharded output's index, which transformers reads -------------------------------------------

def test_a_dtype_entry_of_the_input_does_not_change_the_dtype_transformers_loads_a_sharded_output_in(cli, tmp_path):
    """A single .safetensors file's `__metadata__` is opaque to transformers: a model whose
    weights are float32 loads as float32 whatever that map says. ckptsurgery copies every kept
    entry into a sharded output's index (`"metadata": {"total_size": ..., **entries}`), and the
    index's `metadata` is *not* opaque: `from_pretrained(dtype="auto")` takes
    `sharded_metadata["dtype"]` as the model's dtype when config.json names none
    (transformers/modeling_utils.py `_get_dtype`). So an input carrying `"dtype": "float64"`
    in its `__metadata__` (a forged or stale entry) gives a sharded output that transformers loads
    in float64 — the output means more than the input. Cause: ops/write.py, write_checkpoint,
    `entries = {k: v for k, v in (meta or {}).items() if k != "total_size"}` puts the free-form
    map into the index. Fix: the index should carry only `total_size` (and what the tool itself
    vouches for), or at least never keys transformers reads from it (`dtype`), reporting them in
    `metadata_dropped`."""
    transformers = pytest.importorskip("transformers")
    cfg = transformers.GPT2Config(n_layer=1, n_embd=8, n_head=2, vocab_size=16, n_positions=8,
                                  bos_token_id=0, eos_token_id=0)
    torch.manual_seed(0)
    model = transformers.GPT2LMHeadModel(cfg)
    src = tmp_path / "src"
    model.save_pretrained(src)
    config = json.loads((src / "config.json").read_text())
    config.pop("dtype", None), config.pop("torch_dtype", None)
    (src / "config.json").write_text(json.dumps(config))
    weights = {k: v.contiguous() for k, v in model.state_dict().items() if k != "lm_head.weight"}
    save_file(weights, str(src / "model.safetensors"), metadata={"format": "pt", "dtype": "float64"})
    before = transformers.AutoModelForCausalLM.from_pretrained(src, dtype="auto")
    assert next(before.parameters()).dtype == torch.float32  # the input: float32 to transformers

    out = tmp_path / "out"
    out.mkdir()
    (out / "config.json").write_text(json.dumps(config))
    result = cli("convert", src / "model.safetensors", "-o", out / "model.safetensors", "--max-shard-size", "1KB", "-q")
    assert result.code == 0, result.err
    after = transformers.AutoModelForCausalLM.from_pretrained(out, dtype="auto")
    assert next(after.parameters()).dtype == torch.float32, \
        f"the sharded output loads as {next(after.parameters()).dtype}: index metadata {_index(out)['metadata']}"


def test_a_cast_leaves_no_stale_dtype_in_the_index(cli, tmp_path):
    """`convert --dtype bf16 --max-shard-size` writes bfloat16 shards, but the index keeps the
    input's `"dtype": "float32"` entry — the one entry of an index's metadata transformers acts on
    (`from_pretrained(dtype="auto")` without a dtype in config.json upcasts the model to float32).
    The doc's rule "a cast does not make a licence untrue" does not hold for a dtype the index
    states. Cause: ops/write.py, write_checkpoint, the index `body` copies `meta` verbatim. Fix:
    after a cast, `dtype` in the index must be the written dtype or absent (and, if dropped,
    listed in `metadata_dropped`)."""
    src = tmp_path / "src.safetensors"
    save_file({"a": torch.ones(64), "b": torch.ones(64)}, str(src), metadata={"dtype": "float32", "license": "mit"})
    out = tmp_path / "sharded"
    out.mkdir()
    result = cli("convert", src, "-o", out / "model.safetensors", "--dtype", "bf16", "--max-shard-size", "200B", "--json")
    assert result.code == 0, result.err
    assert result.json().get("shards", 1) > 1
    assert _index(out)["metadata"].get("dtype") in (None, "bfloat16"), _index(out)["metadata"]


def test_a_sharded_output_reports_the_metadata_its_index_gives_back(cli, tmp_path):
    """An input (or `--metadata total_size=...`) entry `total_size` is listed in the report's
    `metadata` of a sharded output, and each shard's header carries it — but the index, which
    the doc says "holds it after total_size, so reading the index gives it back", silently
    replaces it with the real byte count; reading the output back (`inspect`, `convert` to one
    file) loses the entry, and every shard keeps a `total_size` that contradicts the index.
    Cause: ops/write.py write_checkpoint, `entries = {... if k != "total_size"}` while the
    shards get `meta` whole. Fix: for a sharded output, treat `total_size` like the tool's own
    keys — not written in the shards, listed in `metadata_dropped` (or refused when given by
    --metadata)."""
    src = tmp_path / "src.safetensors"
    save_file({"a": torch.ones(2), "b": torch.ones(2)}, str(src), metadata={"total_size": "123", "license": "mit"})
    out = tmp_path / "sharded"
    out.mkdir()
    result = cli("convert", src, "-o", out / "m.safetensors", "--max-shard-size", "8B", "--json")
    assert result.code == 0, result.err
    report = result.json()
    read_back = cli("inspect", out, "--json").json()["metadata"]
    shown = {k: v for k, v in report["metadata"].items() if k != "format"}
    assert shown == read_back, (shown, read_back, report["metadata_dropped"])


# ---- a sharded input's index metadata is checked like a header's -----------------------------------

def _sharded_input(tmp_path, metadata: dict):
    folder = tmp_path / "in"
    folder.mkdir()
    save_file({"a": torch.ones(2)}, str(folder / "m-1.safetensors"), metadata={"format": "pt"})
    (folder / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": metadata, "weight_map": {"a": "m-1.safetensors"}}))
    return folder


@pytest.mark.parametrize("dry_run", [False, True])
def test_a_lone_surrogate_in_an_index_metadata_is_one_clear_error(cli, tmp_path, dry_run):
    """A single file's `__metadata__` with a lone surrogate is refused when read ("not valid
    Unicode"), but an index's `metadata` is taken as it is: `convert` then dies in
    write_safetensors' `.encode("utf-8")` with the catch-all "UnicodeEncodeError: 'utf-8' codec
    can't encode character '\\ud800' ... (set CKPTSURGERY_DEBUG=1 for a traceback)", and
    `--dry-run` says "would write" for a write that cannot happen. Cause: io/sharded.py
    read_index keeps `meta` with only an isinstance(v, str) check. Fix: check it as
    io/safetensors.py `_metadata` does (or drop and report such entries): one error line, exit
    1, the same under --dry-run."""
    folder = _sharded_input(tmp_path, {"total_size": 8, "note": "\ud800"})
    out = tmp_path / "out.safetensors"
    result = cli("convert", folder, "-o", out, *(["--dry-run"] if dry_run else []))
    assert_one_error_line(result, "Unicode", code=1)
    assert not out.exists()


def test_non_string_entries_of_an_index_metadata_are_reported_dropped(cli, tmp_path):
    """The issue: every writing command "says which keys it dropped". An index's metadata
    entries that are not strings (`"epochs": 3`; transformers itself writes
    `"total_parameters": N`) are silently discarded when read, and the report's
    `metadata_dropped` is [] — the user is told nothing was dropped. Cause: io/sharded.py
    read_index, `{k: v ... if isinstance(v, str) and k != "total_size"}`. Fix: carry the
    discarded keys (besides total_size) to the report's `metadata_dropped` (or say why)."""
    folder = _sharded_input(tmp_path, {"total_size": 8, "total_parameters": 2, "epochs": 3, "license": "mit"})
    result = cli("convert", folder, "-o", tmp_path / "out.safetensors", "--json")
    assert result.code == 0, result.err
    report = result.json()
    assert report["metadata"] == {"format": "pt", "license": "mit"}
    assert {"epochs", "total_parameters"} <= set(report["metadata_dropped"]), report["metadata_dropped"]


# ---- entries the tool would rewrite, --metadata-file mistakes --------------------------------------

def test_a_format_other_than_pt_is_refused_or_reported_dropped(cli, tmp_path):
    """An input whose `format` is "tf" (or "flax", "mlx") says its tensors follow that
    framework's layout and names (transformers 4.x loads such a file through its TF-to-PyTorch
    conversion, transposing Dense kernels). ckptsurgery rewrites `format` to "pt" — a claim the
    input never made — and neither `metadata_dropped` nor the human summary mention it. Cause:
    core.plan_metadata treats `format` as the tool's own key (is_tool_metadata) and
    write_safetensors sets "pt". Fix: refuse a non-"pt" format (one error line naming it), or
    at least report the replaced entry (`metadata_dropped` or a note)."""
    src = tmp_path / "tf.safetensors"
    save_file({"dense/kernel:0": torch.ones(2, 3)}, str(src), metadata={"format": "tf"})
    out = tmp_path / "out.safetensors"
    result = cli("convert", src, "-o", out, "--json")
    if result.code == 0:
        assert "format" in result.json()["metadata_dropped"], (result.json()["metadata"], st_meta(out))
    else:
        assert_one_error_line(result, "format", code=1)


def test_duplicate_keys_in_a_metadata_file_are_refused(cli, tmp_path):
    """`{"license": "mit", "license": "proprietary"}` is ambiguous JSON (readers differ on
    which copy wins); --metadata-file silently takes the last and writes "proprietary". A
    licence is the kind of entry this option exists to set. Cause: ops/write.py
    metadata_options, json.load without an object_pairs_hook. Fix: a usage error naming the
    key (exit 2), as for any other malformed metadata file."""
    src = tmp_path / "src.safetensors"
    save_file({"a": torch.ones(2)}, str(src))
    meta = tmp_path / "meta.json"
    meta.write_text('{"license": "mit", "license": "proprietary"}')
    out = tmp_path / "out.safetensors"
    result = cli("convert", src, "-o", out, "--metadata-file", meta)
    assert_one_error_line(result, "license", code=2)
    assert not out.exists()


def test_a_missing_metadata_file_is_said_not_to_exist(cli, tmp_path):
    """`--metadata-file typo.json` (no such file) answers "not a regular file", which reads as
    "it is a directory or a device": the `os.path.isfile` guard against FIFOs runs before the
    open that would have said "No such file or directory". Cause: ops/write.py metadata_options.
    Fix: say the file does not exist (check os.path.exists first, or open with O_NONBLOCK and
    fstat)."""
    src = tmp_path / "src.safetensors"
    save_file({"a": torch.ones(2)}, str(src))
    result = cli("convert", src, "-o", tmp_path / "out.safetensors", "--metadata-file", tmp_path / "typo.json")
    assert_one_error_line(result, "typo.json", code=2)
    assert "not a regular file" not in result.err and ("No such file" in result.err or "does not exist" in result.err)


def test_an_error_about_a_huge_metadata_key_is_one_short_line(cli, tmp_path):
    """A --metadata-file entry with a 100,000-character key and a number value gives a
    100,000-character error line: check_metadata puts `{key!r}` in the message whole (and
    parse_metadata_pairs the whole `{pair!r}`), where every other message of the tool cuts a
    name from the file ([:40], [:80]). Cause: core.check_metadata. Fix: cut the key (and the
    pair) in messages, e.g. to 60 characters with an ellipsis."""
    src = tmp_path / "src.safetensors"
    save_file({"a": torch.ones(2)}, str(src))
    meta = tmp_path / "meta.json"
    meta.write_text(json.dumps({"k" * 100_000: 3}))
    result = cli("convert", src, "-o", tmp_path / "out.safetensors", "--metadata-file", meta)
    assert_one_error_line(result, "must be strings", code=2)
    assert len(result.err) < 1000, len(result.err)


def test_a_metadata_file_of_many_keys_is_checked_in_linear_time(cli, tmp_path):
    """--metadata-file with 100,000 keys and one given twice at the end: the duplicate check was
    quadratic (keys.count for every key)."""
    import time

    torch.save({"w": torch.ones(2)}, tmp_path / "a.pth")
    body = ", ".join(f'"k{i}": "v"' for i in range(100_000)) + ', "k99999": "again"'
    (tmp_path / "meta.json").write_text("{" + body + "}")
    started = time.monotonic()
    result = cli("convert", tmp_path / "a.pth", "-o", tmp_path / "o.safetensors", "--metadata-file", tmp_path / "meta.json")
    assert result.code == 2 and "key 'k99999' is given twice" in result.err, result.err
    assert time.monotonic() - started < 5
