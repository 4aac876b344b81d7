"""Review 15: safetensors metadata (issue 11 §2) — kept through every write, --metadata,
--metadata-file, --no-metadata, shards and their index.

Every test here failed when written: each is a bug or a broken promise, described in its
docstring with what the tool should do instead."""

from __future__ import annotations

import json
import os
import struct

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from conftest import assert_one_error_line

SAFETENSORS_MAX_HEADER = 100_000_000  # the safetensors library's limit (Rust: MAX_HEADER_SIZE)
ONE_TENSOR = '"t":{"dtype":"F32","shape":[1],"data_offsets":[0,4]}'


def _raw(path, header: bytes, data: bytes = b"\0" * 4):
    """A safetensors file with exactly this header (no padding)."""
    path.write_bytes(struct.pack("<Q", len(header)) + header + data)
    return path


def _st_meta(path):
    with safe_open(str(path), "pt") as f:
        return f.metadata()


def _st_opens(path) -> bool:
    try:
        with safe_open(str(path), "pt") as f:
            f.metadata()
        return True
    except Exception:
        return False


def _index(folder):
    return json.loads(next(p for p in folder.iterdir() if p.name.endswith(".index.json")).read_text())


# ---- the index's metadata is read by transformers ----------------------------------------------

def test_a_dtype_entry_of_the_input_becomes_the_dtype_transformers_loads_the_sharded_output_in(cli, tmp_path):
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


def test_a_cast_leaves_a_stale_dtype_in_the_index(cli, tmp_path):
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


# ---- the header must stay one that safetensors reads -------------------------------------------

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


# ---- a header safetensors refuses must not be read some other way -------------------------------

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


# ---- a sharded input's index metadata is not checked ----------------------------------------------

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


def test_non_string_entries_of_an_index_metadata_vanish_unreported(cli, tmp_path):
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


# ---- shards vs index ------------------------------------------------------------------------------

def test_a_total_size_entry_is_reported_written_but_lost_by_a_sharded_output(cli, tmp_path):
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


def test_a_format_other_than_pt_is_rewritten_without_a_word(cli, tmp_path):
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
        assert "format" in result.json()["metadata_dropped"], (result.json()["metadata"], _st_meta(out))
    else:
        assert_one_error_line(result, "format", code=1)


# ---- --metadata-file / --metadata -----------------------------------------------------------------

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


def test_a_missing_metadata_file_is_not_called_not_a_regular_file(cli, tmp_path):
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
