"""diff A B --by-layer (issue 19, "See before you merge"): per layer, ‖A‖, ‖B−A‖ and ‖B−A‖/‖A‖;
with --base, each model's task vector and their cosine. Known answers on tiny hand-built state
dicts, numpy computed directly, the chart's width and plain text, exit codes, and a streamed
pass that reads each tensor's bytes once."""

from __future__ import annotations

import math
import re

import numpy as np
import pytest
import torch
from conftest import assert_one_error_line
from safetensors.torch import save_file

from ckptsurgery.ops import diff_checkpoints

ROW_FIELDS = ["layer", "tensors", "left_out", "a_norm", "diff_norm", "relative"]
BASE_FIELDS = ROW_FIELDS + ["base_norm", "a_delta", "b_delta", "a_relative", "b_relative", "cosine"]


def layered(layers: int = 3, value=lambda i: float(i + 1)) -> dict[str, torch.Tensor]:
    """A small Llama-like state dict: per layer a 2x2 weight and a bias of 2, embeddings and a norm outside."""
    sd = {"model.embed_tokens.weight": torch.full((3, 2), 0.5)}
    for i in range(layers):
        sd[f"model.layers.{i}.mlp.weight"] = torch.full((2, 2), value(i))
        sd[f"model.layers.{i}.mlp.bias"] = torch.full((2,), value(i))
    sd["model.norm.weight"] = torch.ones(2)
    return sd


def save(tmp_path, name: str, sd: dict) -> str:
    path = tmp_path / name
    if name.endswith(".safetensors"):
        save_file(sd, path)
    else:
        torch.save(sd, path)
    return str(path)


def rows_by_layer(report) -> dict:
    return {r["layer"]: r for r in report.layers}


# ---- known answers ---------------------------------------------------------------------------


def test_a_change_to_layer_1_alone_gives_its_known_norms_and_zero_elsewhere(tmp_path):
    a = layered()
    b = {k: v.clone() for k, v in a.items()}
    b["model.layers.1.mlp.weight"] += 0.5  # 4 elements: ‖B−A‖ = √(4·0.25) = 1; ‖A₁‖ = √(6·2²) = √24
    report = diff_checkpoints(save(tmp_path, "a.safetensors", a), save(tmp_path, "b.safetensors", b), by_layer=True)
    rows = rows_by_layer(report)
    assert list(rows) == [0, 1, 2, None] and report.layer_container == "model.layers"
    assert rows[1]["tensors"] == 2 and rows[1]["diff_norm"] == 1.0 and rows[1]["a_norm"] == math.sqrt(24)
    assert rows[1]["relative"] == pytest.approx(1 / math.sqrt(24), rel=1e-15)
    assert rows[0]["diff_norm"] == rows[2]["diff_norm"] == rows[None]["diff_norm"] == 0.0
    assert rows[0]["a_norm"] == math.sqrt(6) and rows[2]["a_norm"] == math.sqrt(6 * 9)
    assert rows[None]["tensors"] == 2 and rows[None]["a_norm"] == math.sqrt(6 * 0.25 + 2)
    assert not report.identical and [c["name"] for c in report.value_changed] == ["model.layers.1.mlp.weight"]
    assert report.left_out == [] and report.base is None


def test_the_outside_row_holds_every_tensor_outside_the_layers_and_comes_last(tmp_path):
    a = layered(2)
    b = {k: v.clone() for k, v in a.items()}
    b["model.embed_tokens.weight"] *= 3  # ‖B−A‖ = 2‖A‖ over the embeddings alone
    report = diff_checkpoints(save(tmp_path, "a.pth", a), save(tmp_path, "b.pth", b), by_layer=True)
    outside = report.layers[-1]
    assert outside["layer"] is None and outside["tensors"] == 2
    embed, norm = math.sqrt(6 * 0.25), math.sqrt(2)
    assert outside["a_norm"] == pytest.approx(math.hypot(embed, norm)) and outside["diff_norm"] == 2 * embed
    assert [r["diff_norm"] for r in report.layers[:-1]] == [0.0, 0.0]


def test_a_model_without_layers_is_one_row(tmp_path):
    a = {"conv.weight": torch.ones(2, 1, 3, 3), "fc.weight": torch.ones(4, 2), "fc.bias": torch.zeros(4)}
    b = {**a, "fc.bias": torch.ones(4)}
    report = diff_checkpoints(save(tmp_path, "a.pth", a), save(tmp_path, "b.pth", b), by_layer=True)
    assert report.layer_container is None and len(report.layers) == 1
    (row,) = report.layers
    assert row["layer"] is None and row["tensors"] == 3 and row["diff_norm"] == 2.0 and row["a_norm"] == math.sqrt(26)


def test_a_container_without_tensors_outside_it_has_no_outside_row(tmp_path):
    a = {f"blocks.{i}.w": torch.ones(2) for i in range(3)}
    report = diff_checkpoints(save(tmp_path, "a.pth", a), save(tmp_path, "b.pth", a), by_layer=True)
    assert [r["layer"] for r in report.layers] == [0, 1, 2] and report.identical


def test_task_vectors_and_cosines_match_numpy_computed_directly(tmp_path):
    torch.manual_seed(0)
    base = {f"model.layers.{i}.{p}": torch.randn(16, 8) for i in range(4) for p in ("q", "k")}
    base["lm_head.weight"] = torch.randn(10, 8)
    a = {k: v + 0.1 * torch.randn_like(v) for k, v in base.items()}
    b = {k: v + 0.1 * torch.randn_like(v) + 0.05 * (a[k] - v) for k, v in base.items()}
    a["model.layers.2.q"] = a["model.layers.2.q"].bfloat16()  # A and B bfloat16, BASE float32: counted,
    b["model.layers.2.q"] = b["model.layers.2.q"].bfloat16()  # each widened to float64
    paths = [save(tmp_path, f"{n}.safetensors", sd) for n, sd in (("a", a), ("b", b), ("base", base))]
    report = diff_checkpoints(*paths[:2], by_layer=True, base=paths[2])
    assert report.base == paths[2] and report.left_out == []
    for row in report.layers:
        names = [k for k in base if (row["layer"] is None) == (not k.startswith("model.layers."))
                 and (row["layer"] is None or k.startswith(f"model.layers.{row['layer']}."))]
        x, y, z = (np.concatenate([sd[k].double().numpy().ravel() for k in names]) for sd in (a, b, base))
        da, db = x - z, y - z
        assert row["tensors"] == len(names)
        assert row["a_norm"] == pytest.approx(np.linalg.norm(x), rel=1e-12)
        assert row["diff_norm"] == pytest.approx(np.linalg.norm(y - x), rel=1e-12)
        assert row["base_norm"] == pytest.approx(np.linalg.norm(z), rel=1e-12)
        assert row["a_delta"] == pytest.approx(np.linalg.norm(da), rel=1e-12)
        assert row["b_delta"] == pytest.approx(np.linalg.norm(db), rel=1e-12)
        assert row["a_relative"] == pytest.approx(np.linalg.norm(da) / np.linalg.norm(z), rel=1e-12)
        cosine = float(da @ db / (np.linalg.norm(da) * np.linalg.norm(db)))
        assert row["cosine"] == pytest.approx(cosine, rel=1e-12, abs=1e-14)


def test_identical_task_vectors_have_cosine_1_and_opposite_ones_minus_1(tmp_path):
    base = layered(2)
    a = {k: v + 1 for k, v in base.items()}
    b = {k: v - 1 for k, v in base.items()}
    paths = [save(tmp_path, f"{n}.pth", sd) for n, sd in (("a", a), ("b", b), ("base", base))]
    same = diff_checkpoints(paths[0], paths[0], by_layer=True, base=paths[2])
    assert [r["cosine"] for r in same.layers] == [1.0] * 3 and same.identical
    opposite = diff_checkpoints(paths[0], paths[1], by_layer=True, base=paths[2])
    assert [r["cosine"] for r in opposite.layers] == [-1.0] * 3
    untouched = diff_checkpoints(paths[2], paths[2], by_layer=True, base=paths[2])  # no task vector: no cosine
    assert [r["cosine"] for r in untouched.layers] == [None] * 3 and untouched.layers[0]["a_relative"] == 0.0


# ---- what the norms leave out ----------------------------------------------------------------


def test_one_sided_keys_shape_and_dtype_changes_are_left_out_of_the_norms_and_counted(tmp_path):
    a = layered()
    b = {k: v.clone() for k, v in a.items()}
    del b["model.layers.2.mlp.bias"]
    b["model.layers.0.extra"] = torch.ones(2)
    b["model.layers.1.mlp.weight"] = torch.ones(2, 3)
    b["model.norm.weight"] = b["model.norm.weight"].half()
    a["model.layers.0.steps"] = b["model.layers.0.steps"] = torch.tensor([3])  # not floating: in no norm, not listed
    report = diff_checkpoints(save(tmp_path, "a.pth", a), save(tmp_path, "b.pth", b), by_layer=True)
    assert {(e["name"], e["why"]) for e in report.left_out} == {
        ("model.layers.2.mlp.bias", "only in A"), ("model.layers.0.extra", "only in B"),
        ("model.layers.1.mlp.weight", "shape"), ("model.norm.weight", "dtype")}
    rows = rows_by_layer(report)
    assert [(rows[i]["tensors"], rows[i]["left_out"]) for i in (0, 1, 2, None)] == [(2, 1), (1, 1), (1, 1), (1, 1)]
    assert rows[1]["a_norm"] == math.sqrt(2 * 4) and rows[None]["a_norm"] == math.sqrt(6 * 0.25)
    # what plain diff reports, it reports still
    assert report.only_in_a == ["model.layers.2.mlp.bias"] and report.only_in_b == ["model.layers.0.extra"]


def test_names_base_lacks_or_shapes_otherwise_are_left_out_of_every_norm_of_their_row(tmp_path):
    base = layered(2)
    a = {k: v + 1 for k, v in base.items()}
    b = {k: v + 2 for k, v in base.items()}
    del base["model.layers.0.mlp.bias"]
    base["model.layers.1.mlp.bias"] = torch.zeros(3)
    base["model.layers.1.mlp.weight"] = base["model.layers.1.mlp.weight"].double()  # any floating dtype: counted
    paths = [save(tmp_path, f"{n}.pth", sd) for n, sd in (("a", a), ("b", b), ("base", base))]
    report = diff_checkpoints(*paths[:2], by_layer=True, base=paths[2])
    assert report.left_out == [{"name": "model.layers.0.mlp.bias", "why": "not in BASE"},
                               {"name": "model.layers.1.mlp.bias", "why": "shape in BASE"}]
    rows = rows_by_layer(report)
    assert rows[0]["tensors"] == rows[1]["tensors"] == 1 and rows[0]["left_out"] == 1
    assert rows[0]["diff_norm"] == 2.0 and rows[0]["a_delta"] == 2.0 and rows[0]["b_delta"] == 4.0  # the weight alone
    assert rows[1]["base_norm"] == 4.0 and rows[1]["cosine"] == 1.0


def test_a_name_tied_on_both_sides_is_counted_once(tmp_path):
    def tied(scale):
        sd = layered(1)
        sd["model.embed_tokens.weight"] = sd["model.embed_tokens.weight"] * scale
        sd["lm_head.weight"] = sd["model.embed_tokens.weight"]  # one storage, as a tied model's state_dict()
        return sd

    report = diff_checkpoints(save(tmp_path, "a.pth", tied(1)), save(tmp_path, "b.pth", tied(3)), by_layer=True)
    outside = report.layers[-1]
    assert outside["tensors"] == 2  # the embeddings once, and the norm
    assert outside["diff_norm"] == 2 * math.sqrt(6 * 0.25) and outside["a_norm"] == math.sqrt(6 * 0.25 + 2)
    plain = diff_checkpoints(str(tmp_path / "a.pth"), str(tmp_path / "b.pth"))
    assert report.value_changed == plain.value_changed and report.equal == plain.equal


def test_a_tied_name_one_side_stores_once_is_no_difference_and_counted_once(tmp_path):
    a = layered(1)
    a["lm_head.weight"] = a["model.embed_tokens.weight"]
    b = {k: v for k, v in a.items() if k != "lm_head.weight"}  # save_pretrained keeps one name
    report = diff_checkpoints(save(tmp_path, "a.pth", a), save(tmp_path, "b.safetensors", b), by_layer=True)
    assert report.identical and [t["name"] for t in report.tied] == ["lm_head.weight"]
    assert report.left_out == [] and report.layers[-1]["tensors"] == 2


# ---- the layers: the recipes' rule, and --layer-pattern ----------------------------------------


def test_ambiguous_layers_are_refused_naming_layer_pattern_which_decides_them(cli, tmp_path):
    sd = {f"{stack}.block.{i}.w": torch.full((2,), float(i)) for stack in ("encoder", "decoder") for i in range(2)}
    a, b = save(tmp_path, "a.pth", sd), save(tmp_path, "b.pth", {**sd, "decoder.block.1.w": torch.zeros(2)})
    assert_one_error_line(cli("diff", a, b, "--by-layer"), "ambiguous", "--layer-pattern", code=2)
    result = cli("diff", a, b, "--by-layer", "--layer-pattern", r"decoder\.block\.(\d+)\.", "--json")
    assert result.code == 1
    doc = result.json()
    assert doc["layer_container"] == r"decoder\.block\.(\d+)\."
    assert [(r["layer"], r["tensors"]) for r in doc["layers"]] == [(0, 1), (1, 1), (None, 2)]
    assert doc["layers"][1]["diff_norm"] == math.sqrt(2)


def test_a_layer_pattern_that_matches_nothing_or_has_no_group_is_refused(cli, tmp_path):
    a = save(tmp_path, "a.pth", layered(2))
    assert_one_error_line(cli("diff", a, a, "--by-layer", "--layer-pattern", r"blocks\.(\d+)"), "matches none", code=2)
    assert_one_error_line(cli("diff", a, a, "--by-layer", "--layer-pattern", r"layers\.\d+"), "one group", code=2)


def test_layers_are_found_over_both_models_keys(tmp_path):
    """B one layer deeper: its layer 3 is a row of its own, left out (only in B)."""
    a, b = layered(3), layered(4)
    report = diff_checkpoints(save(tmp_path, "a.pth", a), save(tmp_path, "b.pth", b), by_layer=True)
    rows = rows_by_layer(report)
    assert list(rows) == [0, 1, 2, 3, None] and rows[3]["tensors"] == 0 and rows[3]["left_out"] == 2
    assert rows[3]["relative"] is None and rows[3]["a_norm"] == 0.0


# ---- the command: JSON, chart, exit codes ------------------------------------------------------


def test_json_has_one_row_per_layer_with_the_documented_fields(cli, tmp_path):
    a = save(tmp_path, "a.pth", layered())
    b = save(tmp_path, "b.pth", {k: v * 2 for k, v in layered().items()})
    doc = cli("diff", a, b, "--by-layer", "--json").json()
    assert [list(r) for r in doc["layers"]] == [ROW_FIELDS] * 4 and "base" not in doc
    assert all(r["relative"] == pytest.approx(1.0) for r in doc["layers"])
    assert isinstance(doc["left_out"], list) and doc["layer_container"] == "model.layers"
    with_base = cli("diff", a, b, "--by-layer", "--base", a, "--json").json()
    assert [list(r) for r in with_base["layers"]] == [BASE_FIELDS] * 4 and with_base["base"] == a
    plain = cli("diff", a, b, "--json").json()
    assert not {"layers", "left_out", "layer_container", "base"} & set(plain)


@pytest.mark.parametrize("columns", [60, 80, 120])
@pytest.mark.parametrize("with_base", [False, True])
def test_the_chart_fits_the_terminal_width_and_is_plain_text_in_a_pipe(cli, tmp_path, monkeypatch, columns,
                                                                       with_base):
    monkeypatch.setenv("COLUMNS", str(columns))
    base = layered(12, value=lambda i: 1.0)
    a = save(tmp_path, "a.pth", {k: v * (1 + 0.01 * i) for i, (k, v) in enumerate(base.items())})
    b = save(tmp_path, "b.pth", {k: v * (1 - 0.02 * i) for i, (k, v) in enumerate(base.items())})
    extra = ["--base", save(tmp_path, "base.pth", base)] if with_base else []
    result = cli("diff", a, b, "--by-layer", *extra)
    assert result.code == 1 and "\x1b" not in result.out
    lines = result.out.splitlines()
    assert max(map(len, lines)) <= columns, [line for line in lines if len(line) > columns]
    bars = [re.sub(r"[^█▏▎▍▌▋▊▉]", "", line) for line in lines]
    longest = max(map(len, bars))
    widest = next(line for line, bar in zip(lines, bars) if len(bar) == longest)
    assert len(widest) == columns  # the longest bar takes the width the numbers leave
    assert sum(bool(bar) for bar in bars) == (2 * (12 + 1) if with_base else 12 + 1)  # every row changed, outside too
    assert lines[-1].startswith("different: ")


def test_the_chart_names_the_layers_and_scales_the_bars_to_the_largest(cli, tmp_path, monkeypatch):
    monkeypatch.setenv("COLUMNS", "80")
    a = layered()
    b = {k: v.clone() for k, v in a.items()}
    b["model.layers.1.mlp.weight"] += 0.5
    b["model.layers.2.mlp.weight"] += 0.5
    result = cli("diff", save(tmp_path, "a.pth", a), save(tmp_path, "b.pth", b), "--by-layer")
    lines = result.out.splitlines()
    assert lines[0] == "relative change per layer, 3 layer(s) of model.layers:"
    assert lines[1].split() == ["layer", "tensors", "‖B−A‖/‖A‖"]
    rows = {line.split()[0]: line for line in lines[2:6]}
    assert set(rows) == {"0", "1", "2", "outside"} and "█" not in rows["0"] + rows["outside"]
    one, two = (rows[i].count("█") for i in ("1", "2"))  # 1/√24 and 1/√54: layer 1 is the longest bar
    assert one == 80 - len(lines[1]) - 2 and two == pytest.approx(one * math.sqrt(24 / 54), abs=1)
    assert lines[-1] == "different: 6 equal tensor(s) (bit-exact), 2 difference(s)"  # of 8


def test_no_color_and_a_terminal_width_leave_the_chart_plain(cli, tmp_path, monkeypatch):
    monkeypatch.setenv("NO_COLOR", "1")
    monkeypatch.setenv("COLUMNS", "100")
    a = save(tmp_path, "a.pth", layered())
    b = save(tmp_path, "b.pth", {k: v + 1 for k, v in layered().items()})
    result = cli("diff", a, b, "--by-layer")
    assert "\x1b" not in result.out and max(map(len, result.out.splitlines())) <= 100


def test_exit_codes_are_plain_diffs_and_the_options_that_make_no_sense_are_refused(cli, tmp_path):
    a = save(tmp_path, "a.pth", layered())
    b = save(tmp_path, "b.pth", {k: v + 1 for k, v in layered().items()})
    assert cli("diff", a, a, "--by-layer").code == 0
    assert cli("diff", a, b, "--by-layer").code == 1
    assert cli("diff", a, b, "--by-layer", "--atol", "1").code == 0  # the verdict follows the tolerance
    assert_one_error_line(cli("diff", a, b, "--by-layer", "-q"), "--by-layer", "--brief", code=2)
    assert_one_error_line(cli("diff", a, b, "--base", a), "--base goes with --by-layer", code=2)
    assert_one_error_line(cli("diff", a, b, "--layer-pattern", r"(\d+)"), "--layer-pattern goes with --by-layer",
                          code=2)
    assert cli("diff", a, str(tmp_path / "missing.pth"), "--by-layer").code == 2
    assert cli("diff", a, b, "--by-layer", "--base", str(tmp_path / "missing.pth")).code == 2


def test_the_verdict_and_every_plain_field_are_the_plain_diffs(tmp_path):
    """The pass that measures also compares: its answers are `_compare`'s, NaN, infinities,
    tolerances, dtypes and ties included."""
    torch.manual_seed(1)
    a = {f"layers.{i}.w": torch.randn(50) for i in range(4)}
    a["layers.0.h"] = torch.randn(7).half()
    a["layers.1.bf"] = torch.randn(9).bfloat16()
    a["layers.2.i"] = torch.arange(5)
    a["layers.3.d"] = torch.randn(4).double()
    b = {k: v.clone() for k, v in a.items()}
    b["layers.0.w"][3] = float("nan")
    a["layers.1.w"][2] = b["layers.1.w"][2] = float("nan")
    a["layers.2.w"][1] = b["layers.2.w"][1] = float("inf")
    b["layers.3.w"] += 1e-3
    b["layers.1.bf"][0] += 1
    b["layers.0.h"] = b["layers.0.h"].float()
    pa, pb = save(tmp_path, "a.pth", a), save(tmp_path, "b.pth", b)
    for atol, rtol in [(0, 0), (1e-2, 0), (0, 1e-2), (2.0, 0), (1e-4, 1e-4)]:
        plain = diff_checkpoints(pa, pb, atol=atol, rtol=rtol).to_json()
        measured = diff_checkpoints(pa, pb, atol=atol, rtol=rtol, by_layer=True).to_json()
        assert {k: measured[k] for k in plain} == plain, (atol, rtol)


def test_each_tensor_is_read_once_chunk_by_chunk(tmp_path, monkeypatch):
    """A spy on the mapped files: every byte of every tensor viewed once, in spans of at most a
    chunk; and the peak of what is allocated stays a few chunks."""
    import tracemalloc

    import ckptsurgery.ops.diff as diff
    from ckptsurgery.io.model import MappedFile

    monkeypatch.setattr(diff, "_VALUE_CHUNK", 4096)
    torch.manual_seed(2)
    a = {f"model.layers.{i}.w": torch.randn(64, 1024) for i in range(2)}  # 16 chunks each
    a["model.embed.weight"] = torch.randn(100, 64)
    b = {k: v + 0.01 for k, v in a.items()}
    paths = [save(tmp_path, f"{n}.safetensors", sd) for n, sd in (("a", a), ("b", b), ("z", a))]
    views: dict[str, list] = {}
    real = MappedFile.view

    def spy(self, offset, nbytes):
        views.setdefault(self.path, []).append((offset, nbytes))
        return real(self, offset, nbytes)

    monkeypatch.setattr(MappedFile, "view", spy)
    tracemalloc.start()
    report = diff_checkpoints(*paths[:2], by_layer=True, base=paths[2])
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert report.layers[0]["diff_norm"] == pytest.approx(0.01 * 256)
    for path in paths:
        spans = sorted(views[path])
        header = 8 + int.from_bytes(open(path, "rb").read(8), "little")
        data = [s for s in spans if s[1] > 0 and s[0] >= header]  # the tensors' bytes, not the header's
        assert max(n for _, n in data) <= 4096 * 4
        covered = sum(n for _, n in data)
        assert covered == sum(t.numel() * 4 for t in a.values()), path  # each byte once: no hash, no second pass
        assert all(o1 + n1 <= o2 for (o1, n1), (o2, _) in zip(data, data[1:]))  # no span twice
    assert peak < 40 * 4096 * 8  # a few float64 chunks, far below one layer's 256 KB ×3 sides
