"""Human output that names cannot forge or slow down, inputs that must not crash `inspect --tree`
(nor exhaust its memory), and `merge --average` refusing what it cannot average faithfully."""

import json
import struct
import time

import pytest
import torch
from safetensors.torch import save_file

from conftest import assert_one_error_line, load_any
from test_hostile_opcodes import CAP, assert_isolated_clean, run_isolated, safetensors_file


# ---- inspect --tree on odd names -------------------------------------------------------------

def test_tree_folds_only_ascii_numbers(cli, tmp_path):
    path = tmp_path / "digits.pth"
    long_number = "7" * 5000  # more digits than int() accepts from a string
    torch.save({"a.\u00b2.w": torch.ones(1), "a.\u0661.w": torch.ones(1), "a.\u0662.w": torch.ones(1),
                f"a.{long_number}.w": torch.ones(1), "b.0.w": torch.ones(2), "b.1.w": torch.ones(2)}, path)
    result = cli("inspect", path, "--tree", "--depth", "2", "--json")
    assert result.code == 0, result.err
    names = [row["name"] for row in result.json()["tree"]]
    assert names == ["a", "a.\u00b2", "a.\u0661", "a.\u0662", f"a.{long_number}", "b", "b.{0..1}"]
    human = cli("inspect", path, "--tree")
    assert human.code == 0 and "{0..1}  2 × 2 params" in human.out and "\u0661" in human.out


def test_tree_of_very_deep_names(cli, tmp_path):
    deep = ".".join(f"p{i}" for i in range(5000))
    path = tmp_path / "deep.safetensors"
    save_file({deep: torch.ones(3), "a": torch.ones(1), "a.b": torch.ones(2),
               # numbered siblings compared all the way down: they repeat each other, so fold
               "0." + ".".join(["x"] * 3000): torch.ones(1), "1." + ".".join(["x"] * 3000): torch.ones(1)},
              str(path))
    result = cli("inspect", path, "--tree", "--json")
    assert result.code == 0, result.err
    rows = result.json()["tree"]
    assert len(rows) == 5000 + 2 + 3001
    by_name = {row["name"]: row for row in rows}
    assert by_name[deep]["depth"] == 4999 and by_name[deep]["shape"] == [3] and by_name["p0"]["params"] == 3
    assert by_name["a"]["params"] == 3 and by_name["a.b"]["params"] == 2 and by_name["a.b"]["shape"] == [2]
    assert by_name["{0..1}"]["repeat"] == 2 and by_name["{0..1}"]["params"] == 2
    human = cli("inspect", path, "--tree")
    assert human.code == 0, human.err
    lines = human.out.splitlines()
    assert len(lines) == 1 + 1 + len(rows) + 1  # path, root, one line per row, total
    assert max(map(len, lines)) < 250  # deep levels name their level instead of drawing it
    assert "(level 5000) p4999  3 params  12 B  float32 (3,)" in human.out
    assert "├── a  3 params  12 B\n│   └── b  2 params  8 B  float32 (2,)\n" in human.out
    shallow = cli("inspect", path, "--tree", "--depth", "2", "--json").json()["tree"]
    assert sorted(row["name"] for row in shallow) == ["a", "a.b", "p0", "p0.p1", "{0..1}", "{0..1}.x"]


def write_many_tensors(path, count: int) -> None:
    """A safetensors file of `count` tiny tensors, written by hand: fast whatever the count."""
    header = {f"model.layers.{i // 1000}.experts.{i % 1000}.w": {
        "dtype": "F32", "shape": [2, 3], "data_offsets": [24 * i, 24 * i + 24]} for i in range(count)}
    body = json.dumps(header).encode()
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(body)) + body + bytes(24 * count))


def test_tree_of_many_tensors_is_fast(cli, tmp_path):
    path = tmp_path / "moe.safetensors"
    write_many_tensors(path, 100_000)
    start = time.perf_counter()
    result = cli("inspect", path, "--tree")
    assert time.perf_counter() - start < 15  # the reader included; about 2 s on one core
    assert result.code == 0 and "{0..99}  100 × 6,000 params" in result.out
    assert "{0..999}  1000 × 6 params" in result.out


# ---- the human table -------------------------------------------------------------------------

def test_human_table_of_100k_tensors_is_fast(cli, tmp_path):
    path = tmp_path / "moe.safetensors"
    write_many_tensors(path, 100_000)
    start = time.perf_counter()
    result = cli("inspect", path, "--all")
    assert time.perf_counter() - start < 15  # Rich took ~90 s; about 2 s now, the reader included
    assert result.code == 0
    lines = result.out.splitlines()
    assert len(lines) == 1 + 1 + 100_000 + 1
    assert lines[1] == "name                           dtype    shape   params  size  note"
    assert lines[2] == "model.layers.0.experts.0.w     float32  (2, 3)       6  24 B"
    assert lines[-2] == "model.layers.99.experts.999.w  float32  (2, 3)       6  24 B"
    assert lines[-1] == "100000 tensors, 600,000 parameters, 2.4 MB"
    # without --all: the first 2,000 rows, a line saying how to see the rest, the same totals
    short = cli("inspect", path).out.splitlines()
    assert [r.split() for r in short[:2002]] == [r.split() for r in lines[:2002]] and len(short) == 2 + 2000 + 2
    assert short[-2] == ("... 98,000 more tensors not listed: narrow with --keys, list them all with --all, "
                         "or read them with --json")
    assert short[-1] == lines[-1]
    assert len(cli("inspect", path, "--keys", "model.layers.3").out.splitlines()) == 2 + 1000 + 1
    for other in ("--json", "--tree"):
        assert cli("inspect", path, "--all", other).code == 2


def test_human_table_exact_format(cli, tmp_path):
    emb = torch.arange(6, dtype=torch.float32).reshape(2, 3)
    path = tmp_path / "small.pth"
    torch.save({"embed.weight": emb, "long_module_name.bias": torch.zeros(1000, dtype=torch.float16),
                "日本.w": torch.ones(1), "tr": emb.t(), "frozen": torch.nn.Parameter(torch.ones(2), requires_grad=False),
                "fc:thumbs_up:": torch.ones(1), "[bold]x": torch.ones(1)}, path)
    result = cli("inspect", path)
    assert result.code == 0 and result.err == ""
    # as Rich printed it, less the trailing blanks and the emoji; 日本 takes four cells
    assert result.out == (
        f"{path}  format=torch-zip  root=''\n"
        "name                   dtype    shape    params    size  note\n"
        "embed.weight           float32  (2, 3)        6    24 B\n"
        "long_module_name.bias  float16  (1000,)   1,000  2.0 KB\n"
        "日本.w                 float32  (1,)          1     4 B\n"
        "tr                     float32  (3, 2)        6    24 B  shares embed.weight, non-contiguous view\n"
        "frozen                 float32  (2,)          2     8 B  frozen\n"
        "fc:thumbs_up:          float32  (1,)          1     4 B\n"
        "[bold]x                float32  (1,)          1     4 B\n"
        "7 tensors, 1,017 parameters, 2.1 KB\n")


def test_human_table_with_stats_exact_format(cli, tmp_path):
    path = tmp_path / "s.safetensors"
    save_file({"v": torch.tensor([1.0, 2.0, 3.0]), "big": torch.tensor([1e6, float("nan")])}, str(path))
    result = cli("inspect", path, "--stats")
    assert result.code == 0, result.err
    assert result.out.splitlines()[1:] == [  # save_file sorted the keys
        "name  dtype    shape  params  size    min    max   mean  std  nan  inf  note",
        "big   float32  (2,)        2   8 B  1e+06  1e+06  1e+06    0    1    0",
        "v     float32  (3,)        3  12 B      1      3      2    1    0    0",
        "2 tensors, 5 parameters, 20 B",
    ]


# ---- names cannot forge lines, styles or emoji -----------------------------------------------

FORGED = "x\nckptsurgery: error: forged"


def test_names_cannot_forge_lines(cli, tmp_path):
    emb = torch.ones(2, 2)
    path = tmp_path / "tied.pth"
    torch.save({FORGED: emb, "head\r\nforged too": emb, "fc:thumbs_up:": torch.ones(1)}, path)
    out = tmp_path / "out.safetensors"
    result = cli("convert", path, "-o", out)  # the tied-names line names both
    assert result.code == 0 and len(result.err.splitlines()) == 2, result.err
    assert "x\\nckptsurgery: error: forged" in result.err and "head\\r\\nforged too" in result.err
    dry = cli("convert", path, "-o", tmp_path / "dry.safetensors", "--dry-run")
    assert dry.code == 0 and len(dry.out.splitlines()) == 2 and "forged too" in dry.out
    for args in (["inspect", path], ["inspect", path, "--tree"]):
        result = cli(*args)
        assert result.code == 0 and "x\\nckptsurgery: error: forged" in result.out, args
        assert not any(line.startswith("ckptsurgery") for line in result.out.splitlines())
        assert "fc:thumbs_up:" in result.out and "\U0001f44d" not in result.out
    for args in (["drop", path, "fc:thumbs_up:", "-o", tmp_path / "d.pth"],
                 ["rename", path, "--add-prefix", "p.", "-o", tmp_path / "r.pth", "--dry-run"],
                 ["merge", path, "--into", path, "-o", tmp_path / "m.pth", "--dry-run"],
                 ["diff", path, tmp_path / "d.pth"]):
        result = cli(*args)
        assert result.code in (0, 1), (args, result.err)
        for stream in (result.out, result.err):
            assert not any(line.startswith("ckptsurgery: error: forged") for line in stream.splitlines()), args
            assert "\U0001f44d" not in stream, args


def test_inert_names_cannot_forge_lines(cli, zip_pth, monkeypatch):
    """The reader now refuses a pickled global that is not a Python name; should a placeholder's
    name still hold a newline, the note stays one line."""
    import importlib

    ops = importlib.import_module("ckptsurgery.ops.inspect")
    real = ops.inspect_report

    def with_forged_inert(ckpt, patterns=None):
        report = real(ckpt, patterns)
        report.inert = [FORGED + ".Thing", "fc:thumbs_up:"]
        return report

    monkeypatch.setattr(ops, "inspect_report", with_forged_inert)
    for args in ([], ["--tree"]):
        result = cli("inspect", zip_pth, *args)
        assert result.code == 0
        assert result.err == "left inert (not run): x\\nckptsurgery: error: forged.Thing, fc:thumbs_up:\n"


# ---- merge --average -------------------------------------------------------------------------

@pytest.mark.parametrize("first_int", [True, False])
def test_average_refuses_sources_whose_dtypes_differ(cli, tmp_path, first_int):
    a, b = tmp_path / "a.pth", tmp_path / "b.pth"
    ints, floats = torch.tensor([1, 2]), torch.tensor([1.0, 2.0])
    torch.save({"w": torch.ones(2), "n": ints if first_int else floats}, a)
    torch.save({"w": torch.ones(2), "n": floats if first_int else ints}, b)
    result = cli("merge", a, b, "--average", "-o", tmp_path / "avg.pth")
    first, second = ("int64", "float32") if first_int else ("float32", "int64")
    assert_one_error_line(result, str(a), str(b), f"n {first} vs {second}")
    assert not (tmp_path / "avg.pth").exists()


@pytest.mark.parametrize("weights, message", [
    ("nan,1", "finite"), ("1,inf", "finite"), ("-inf,1", "finite"), ("1e308,1e308", "too large"),
    ("-1,-1", "zero or less"), ("1,-3", "zero or less"),
])
def test_average_refuses_weights_that_are_not_finite_or_sum_below_zero(cli, tmp_path, zip_pth, weights, message):
    result = cli("merge", zip_pth, zip_pth, "--average", "--weights", weights, "-o", tmp_path / "a.pth")
    assert_one_error_line(result, "--weights", message, code=2)


def test_average_accepts_a_negative_weight_with_a_positive_total(cli, tmp_path):
    a, b = tmp_path / "a.pth", tmp_path / "b.pth"
    torch.save({"w": torch.full((2,), 1.0)}, a)
    torch.save({"w": torch.full((2,), 3.0)}, b)
    out = tmp_path / "x.pth"
    assert cli("merge", a, b, "--average", "--weights", "-1,2", "-o", out).code == 0
    assert torch.equal(load_any(out)["w"], torch.full((2,), 5.0))


def tied_source(path, value: float) -> None:
    emb = torch.full((3, 2), value)
    torch.save({"embed.weight": emb, "mid.weight": torch.full((2,), value), "lm_head.weight": emb}, path)


@pytest.mark.parametrize("suffix", [".pth", ".safetensors"])
def test_average_keeps_tied_tensors_tied(cli, tmp_path, suffix):
    paths = [tmp_path / "a.pth", tmp_path / "b.pth"]
    tied_source(paths[0], 1.0)
    tied_source(paths[1], 3.0)
    out = tmp_path / f"avg{suffix}"
    report = cli("merge", *paths, "--average", "-o", out, "--json").json()
    assert report["tied"] == {"lm_head.weight": "embed.weight"} and report["merged"] == 3
    doc = cli("inspect", out, "--json").json()
    shares = {t["name"]: t["shares_with"] for t in doc["tensors"]}
    assert shares == {"embed.weight": None, "mid.weight": None, "lm_head.weight": "embed.weight"}
    assert doc["total_params"] == 6 + 2  # the tied pair counted once
    got = cli("convert", out, "-o", tmp_path / "back.pth")
    assert got.code == 0
    loaded = load_any(tmp_path / "back.pth")
    assert torch.equal(loaded["embed.weight"], torch.full((3, 2), 2.0))
    assert loaded["lm_head.weight"].data_ptr() == loaded["embed.weight"].data_ptr()
    if suffix == ".safetensors":
        assert sorted(load_any(out)) == ["embed.weight", "mid.weight"]  # stored once


def test_average_does_not_tie_names_tied_in_one_source_only(cli, tmp_path):
    a, b = tmp_path / "a.pth", tmp_path / "b.pth"
    tied_source(a, 1.0)
    torch.save({"embed.weight": torch.full((3, 2), 3.0), "mid.weight": torch.full((2,), 3.0),
                "lm_head.weight": torch.full((3, 2), 5.0)}, b)
    out = tmp_path / "avg.pth"
    assert cli("merge", a, b, "--average", "-o", out).code == 0
    loaded = load_any(out)
    assert torch.equal(loaded["embed.weight"], torch.full((3, 2), 2.0))
    assert torch.equal(loaded["lm_head.weight"], torch.full((3, 2), 3.0))


def test_tree_of_one_name_of_200000_parts_stays_within_memory(tmp_path):
    """One tensor named x.x.x... (200,000 parts, 400 KB): inspect --tree answers cleanly within 10 s and 2 GiB (building O(depth^2) row names once died of MemoryError)."""
    name = ".".join(["x"] * 200_000)
    path = safetensors_file(tmp_path / "deep.safetensors",
                            {name: {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}}, bytes(4))
    result = run_isolated(tmp_path, "inspect", path, "--tree", memory=CAP, timeout=20)
    assert_isolated_clean(result, within=10)
