"""filter, drop, rename, merge and diff through the real entry point; merge with entries that
are not tensors (_extra_state) and templates whose dtypes cannot be copied (quantized)."""

import hashlib
import json
import os

import pytest
import torch
from safetensors.torch import save_file

from conftest import Net, assert_one_error_line, load_any, torch_loads
from test_hostile_opcodes import assert_clean


def keys_of(path):
    return list(load_any(path))


# ---- filter / drop ---------------------------------------------------------------------------

def test_filter_keep_reports_left_out(cli, tmp_path, zip_pth):
    out = tmp_path / "f.safetensors"
    report = cli("filter", zip_pth, "--keep", "liner1", "-o", out, "--json").json()
    assert report["kept"] == ["liner1.weight", "liner1.bias"]
    assert "liner10.weight" in report["left_out"] and "liner1.weight" not in report["left_out"]
    assert sorted(keys_of(out)) == ["liner1.bias", "liner1.weight"]


def test_filter_like_template_reports_missing(cli, tmp_path, zip_pth):
    template = tmp_path / "t.safetensors"
    save_file({"conv.weight": torch.zeros(4, 3, 3, 3), "extra.weight": torch.zeros(1)}, str(template))
    out = tmp_path / "f.pth"
    report = cli("filter", zip_pth, "--like", template, "-o", out, "--json").json()
    assert report["kept"] == ["conv.weight"] and report["missing_from_input"] == ["extra.weight"]
    assert keys_of(out) == ["conv.weight"]


@pytest.mark.parametrize("args, code, message", [
    ([], 2, "either --keep PATTERN"),
    (["--keep", "conv", "--like", "x.pth"], 2, "either --keep PATTERN"),
    (["--keep", "linear1"], 1, "'linear1' selected no key"),
])
def test_filter_usage_errors(cli, tmp_path, zip_pth, args, code, message):
    result = cli("filter", zip_pth, "-o", tmp_path / "f.pth", *args)
    assert result.code == code and message in result.err and not (tmp_path / "f.pth").exists()


def test_filter_like_with_no_shared_key(cli, tmp_path, zip_pth):
    template = tmp_path / "t.pth"
    torch.save({"module." + k: v for k, v in torch.load(zip_pth).items()}, template)
    result = cli("filter", zip_pth, "--like", template, "-o", tmp_path / "f.pth")
    assert result.code == 1 and "share no key" in result.err


def test_filter_carries_nested_entries_and_metadata(cli, tmp_path, nested_pth):
    out = tmp_path / "f.ckpt"
    assert cli("filter", nested_pth, "--keep", "conv", "--keep", "bn", "-o", out).code == 0
    loaded = torch.load(out, weights_only=True)
    original = torch.load(nested_pth, weights_only=True)
    assert loaded["epoch"] == 7 and loaded["optimizer"]["param_groups"] == original["optimizer"]["param_groups"]
    assert list(loaded["state_dict"]) == ["conv.weight", "conv.bias", "bn.weight", "bn.bias", "bn.running_mean",
                                          "bn.running_var", "bn.num_batches_tracked"]
    assert loaded["state_dict"]._metadata == original["state_dict"]._metadata


def test_drop_module_not_prefix(cli, tmp_path, zip_pth):
    out = tmp_path / "d.pth"
    report = cli("drop", zip_pth, "liner1", "bn.running_*", "-o", out, "--json").json()
    assert report["dropped"] == ["bn.running_mean", "bn.running_var", "liner1.weight", "liner1.bias"]
    assert "liner10.weight" in keys_of(out) and "liner1.weight" not in keys_of(out)


def test_drop_pattern_selecting_nothing(cli, tmp_path, zip_pth):
    result = cli("drop", zip_pth, "fc", "-o", tmp_path / "d.pth")
    assert result.code == 1 and "'fc' selected no key" in result.err


# ---- filter --like: the template's shapes and dtypes -------------------------------------------

@pytest.fixture
def ten_class_template(tmp_path):
    """The new model's state dict: Net with 10 classes (liner10 is [10, 5] where the input's is [4, 5])."""
    path = tmp_path / "net10.pth"
    torch.save(Net(classes=10).state_dict(), path)
    return path


def test_filter_like_refuses_keys_whose_shape_differs_from_the_template(cli, tmp_path, zip_pth, ten_class_template):
    out = tmp_path / "f.pth"
    result = cli("filter", zip_pth, "--like", ten_class_template, "-o", out)
    assert_one_error_line(result, "2 key(s) differ in shape", "liner10.weight [4, 5] (template [10, 5])",
                          "liner10.bias [4] (template [10])", "--skip-mismatched", "merge --into")
    assert not out.exists()


def test_filter_like_skip_mismatched_output_loads_into_the_template_model(cli, tmp_path, zip_pth, ten_class_template):
    out = tmp_path / "f.pth"
    report = cli("filter", zip_pth, "--like", ten_class_template, "--skip-mismatched", "-o", out, "--json").json()
    assert report["shape_mismatched"] == [
        {"name": "liner10.weight", "shape": [4, 5], "template_shape": [10, 5]},
        {"name": "liner10.bias", "shape": [4], "template_shape": [10]},
    ]
    assert report["left_out"] == ["liner10.weight", "liner10.bias"] and report["dtype_mismatched"] == []
    model = Net(classes=10)
    missing, unexpected = model.load_state_dict(torch.load(out, weights_only=True), strict=False)
    assert sorted(missing) == ["liner10.bias", "liner10.weight"] and unexpected == []
    assert torch.equal(model.conv.weight, torch.load(zip_pth)["conv.weight"])
    human = cli("filter", zip_pth, "--like", ten_class_template, "--skip-mismatched", "-o", out, "--force")
    assert human.code == 0 and "shape differs from the template's (--skip-mismatched) (2): " \
        "liner10.weight [4, 5] (template [10, 5])" in human.err


def test_filter_like_reports_dtypes_that_differ_from_the_template_and_writes_the_inputs(cli, tmp_path, zip_pth):
    template = tmp_path / "half.pth"
    model = Net()
    model.liner1.half()
    torch.save(model.state_dict(), template)
    out = tmp_path / "f.pth"
    result = cli("filter", zip_pth, "--like", template, "-o", out, "--json")
    assert result.code == 0, result.err
    assert result.json()["dtype_mismatched"] == [
        {"name": "liner1.weight", "dtype": "float32", "template_dtype": "float16"},
        {"name": "liner1.bias", "dtype": "float32", "template_dtype": "float16"},
    ]
    written = torch.load(out, weights_only=True)
    assert written["liner1.weight"].dtype == torch.float32
    model.load_state_dict(written)  # strict: every key, every shape; load_state_dict casts
    human = cli("filter", zip_pth, "--like", template, "-o", out, "--force")
    assert "dtype differs from the template's, written as is (load_state_dict casts) (2): " \
        "liner1.weight float32 (template float16)" in human.err


def test_filter_like_a_tensor_where_the_template_holds_another_value_is_a_mismatch(cli, tmp_path):
    src, template = tmp_path / "s.pth", tmp_path / "t.pth"
    torch.save({"w": torch.ones(2), "blk._extra_state": torch.zeros(3)}, src)
    torch.save({"w": torch.zeros(2), "blk._extra_state": b"state"}, template)
    result = cli("filter", src, "--like", template, "-o", tmp_path / "f.pth")
    assert_one_error_line(result, "blk._extra_state [3] (template (not a tensor))")


def test_filter_keys_library_refuses_shape_mismatch_and_skip_mismatched_writes_a_loadable_file(
        tmp_path, zip_pth, ten_class_template):
    from ckptsurgery.errors import CkptError
    from ckptsurgery.ops import WriteOptions, filter_keys

    out = tmp_path / "f.safetensors"
    with pytest.raises(CkptError, match=r"liner10\.weight \[4, 5\] \(template \[10, 5\]\)"):
        filter_keys(str(zip_pth), WriteOptions(str(out)), like=str(ten_class_template))
    assert not out.exists()
    report = filter_keys(str(zip_pth), WriteOptions(str(out)), like=str(ten_class_template), skip_mismatched=True)
    assert [m["name"] for m in report.shape_mismatched] == ["liner10.weight", "liner10.bias"]
    model = Net(classes=10)
    missing, unexpected = model.load_state_dict(load_any(out), strict=False)
    assert sorted(missing) == ["liner10.bias", "liner10.weight"] and unexpected == []


def test_skip_mismatched_without_like_is_a_usage_error(cli, tmp_path, zip_pth):
    result = cli("filter", zip_pth, "--keep", "conv", "--skip-mismatched", "-o", tmp_path / "f.pth")
    assert_one_error_line(result, "--skip-mismatched applies to --like", code=2)


# ---- drop: top-level entries beside the state dict (the optimizer) ----------------------------

@pytest.fixture
def training_ckpt(tmp_path):
    """torch.save({"epoch", "state_dict", "optimizer"}) after a real Adam step: (path, model)."""
    torch.manual_seed(0)
    model = Net()
    opt = torch.optim.Adam(model.parameters())
    model(torch.randn(2, 3, 5, 5)).sum().backward()
    opt.step()
    path = tmp_path / "ckpt.pth"
    torch.save({"epoch": 3, "state_dict": model.state_dict(), "optimizer": opt.state_dict()}, path)
    return path, model


def test_drop_optimizer_writes_a_pth_torch_loads_with_weights_only(cli, tmp_path, training_ckpt):
    src, model = training_ckpt
    out = tmp_path / "slim.pth"
    result = cli("drop", src, "optimizer", "-o", out)
    assert result.code == 0, result.err
    assert "dropped beside the state dict (1): optimizer" in result.err and "dropped: none" not in result.err
    slim = torch.load(out, weights_only=True)
    assert list(slim) == ["epoch", "state_dict"] and slim["epoch"] == 3
    expected = model.state_dict()
    assert list(slim["state_dict"]) == list(expected)
    assert all(torch.equal(slim["state_dict"][k], v) for k, v in expected.items())
    assert slim["state_dict"]._metadata == expected._metadata
    Net().load_state_dict(slim["state_dict"])
    assert out.stat().st_size < src.stat().st_size


def test_drop_optimizer_dry_run_and_json_report_the_entry(cli, tmp_path, training_ckpt):
    src, _ = training_ckpt
    out = tmp_path / "slim.pth"
    dry = cli("drop", src, "optimizer", "-o", out, "--dry-run")
    assert dry.code == 0 and not out.exists()
    assert "would write" in dry.out and "dropped beside the state dict (1): optimizer" in dry.out
    doc = cli("drop", src, "optimizer", "liner10", "-o", out, "--json").json()
    assert doc["dropped_outside"] == ["optimizer"] and doc["dropped"] == ["liner10.weight", "liner10.bias"]
    assert "liner10.weight" not in doc["kept"] and doc["extras_left_out"] == []
    assert list(torch.load(out, weights_only=True)) == ["epoch", "state_dict"]


def test_drop_a_pattern_that_selects_state_dict_keys_leaves_top_level_entries(cli, tmp_path):
    src = tmp_path / "clash.pth"
    torch.save({"model": {"optimizer.w": torch.ones(2), "b": torch.zeros(1)}, "optimizer": {"lr": 0.1}}, src)
    out = tmp_path / "o.pth"
    doc = cli("drop", src, "optimizer", "-o", out, "--json").json()
    assert doc["dropped"] == ["optimizer.w"] and doc["dropped_outside"] == []
    assert torch.load(out, weights_only=True)["optimizer"] == {"lr": 0.1}


def test_drop_a_name_found_nowhere_is_still_an_error_naming_the_entries(cli, tmp_path, training_ckpt):
    src, _ = training_ckpt
    out = tmp_path / "o.pth"
    result = cli("drop", src, "optimiser", "-o", out)
    assert_one_error_line(result, "'optimiser' selected no key", "nor an entry beside the state dict ('epoch', "
                                                                 "'optimizer')")
    assert not out.exists()
    root = cli("drop", src, "state_dict", "-o", out)
    assert_one_error_line(root, "'state_dict' holds the state dict itself")


def test_drop_with_root_top_level_of_a_training_checkpoint_says_to_leave_root_out(cli, tmp_path, training_ckpt):
    src, _ = training_ckpt
    result = cli("drop", src, "optimizer", "--root", "", "-o", tmp_path / "o.pth")
    assert_one_error_line(result, "--root '' does not hold a state dict of tensors", "leave out --root")


def test_drop_with_root_top_level_removes_non_tensor_keys_of_a_mixed_top_level(cli, tmp_path):
    src = tmp_path / "mixed.pth"
    torch.save({"w": torch.ones(2), "epoch": 3, "optimizer": {"lr": 0.1}}, src)
    out = tmp_path / "o.pth"
    doc = cli("drop", src, "optimizer", "--root", "", "-o", out, "--json").json()
    assert doc["dropped"] == ["optimizer"] and doc["dropped_outside"] == []
    assert list(torch.load(out, weights_only=True)) == ["w", "epoch"]


@pytest.mark.parametrize("name, args, message", [
    ("slim.safetensors", [], "a .safetensors output holds the state dict only"),
    ("slim.pth", ["--max-shard-size", "200"], "a sharded output holds the state dict only"),
])
def test_drop_an_entry_into_an_output_of_the_state_dict_only_is_refused_in_one_line(cli, tmp_path, training_ckpt,
                                                                                     name, args, message):
    src, _ = training_ckpt
    result = cli("drop", src, "optimizer", "-o", tmp_path / name, *args)
    assert_one_error_line(result, "'optimizer' lies outside the state dict", message, "to keep the rest")
    assert os.listdir(tmp_path) == ["ckpt.pth"]


def test_drop_an_entry_from_a_dcp_output(cli, tmp_path, training_ckpt):
    import subprocess
    import sys

    src, _ = training_ckpt
    folder, back = tmp_path / "run", tmp_path / "back.pth"
    doc = cli("drop", src, "optimizer", "-o", folder, "--format", "dcp", "--json").json()
    assert doc["dropped_outside"] == ["optimizer"]
    probe = ("import sys; from torch.distributed.checkpoint.format_utils import dcp_to_torch_save; "
             "dcp_to_torch_save(sys.argv[1], sys.argv[2])")
    subprocess.run([sys.executable, "-c", probe, str(folder), str(back)], check=True, capture_output=True)
    loaded = torch.load(back, weights_only=True)
    assert sorted(loaded) == ["epoch", "state_dict"] and loaded["epoch"] == 3


def test_drop_an_entry_keeps_the_ordering_rule_of_the_inputs_unsafe_load(cli, tmp_path):
    """An entry whose failing import stops torch.load before a payload beside it: dropping that
    entry would let the payload run, so it is refused; dropping the payload's entry is not."""
    from test_hostile_opcodes import D, G, PROTO2, T, U, tensor, zip_file

    marker = tmp_path / "FIRED"
    body = PROTO2 + D((U("state_dict"), D((U("w"), tensor()))), (U("optimizer"), G("no_such_module_ckpt", "Guard")),
                      (U("x"), G("posix", "system") + T(U(f"touch {marker}")) + b"R")) + b"."
    src = zip_file(tmp_path / "guarded.pth", body)
    out = tmp_path / "out.pth"
    refused = cli("drop", src, "optimizer", "-o", out)
    assert_one_error_line(refused, "without first passing no_such_module_ckpt.Guard")
    assert not out.exists()
    done = cli("drop", src, "x", "-o", out, "--json")
    assert done.code == 0, done.err
    assert done.json()["dropped_outside"] == ["x"]
    assert cli("inspect", out, "--json").json()["extras"] == {"optimizer": "no_such_module_ckpt.Guard"}


def test_filter_keeps_ties_in_safetensors(cli, tmp_path, tied_pth):
    out = tmp_path / "t.safetensors"
    report = cli("filter", tied_pth, "--keep", "embed", "--keep", "lm_head", "-o", out, "--json").json()
    assert report["tied"] == {"lm_head.weight": "embed.weight"}
    from safetensors import safe_open

    with safe_open(str(out), "pt") as f:
        assert list(f.keys()) == ["embed.weight"]  # stored once
    back = tmp_path / "back.pth"
    cli("convert", out, "-o", back)
    restored = torch.load(back, weights_only=True)
    assert list(restored) == ["embed.weight", "lm_head.weight"]
    assert restored["lm_head.weight"].data_ptr() == restored["embed.weight"].data_ptr()


# ---- rename ----------------------------------------------------------------------------------

def test_rename_dry_run_prints_table_and_writes_nothing(cli, tmp_path, zip_pth):
    out = tmp_path / "r.pth"
    result = cli("rename", zip_pth, "--add-prefix", "backbone.", "-o", out, "--dry-run")
    assert result.code == 0 and not out.exists()
    assert "conv.weight" in result.out and "backbone.conv.weight" in result.out and "would write" in result.out
    doc = cli("rename", zip_pth, "--add-prefix", "backbone.", "-o", out, "--dry-run", "--json").json()
    assert doc["renamed"]["conv.weight"] == "backbone.conv.weight" and doc["untouched"] == []


def test_rename_collision_writes_nothing(cli, tmp_path):
    src = tmp_path / "mixed.pth"
    torch.save({"module.a": torch.zeros(1), "a": torch.ones(1), "module.b": torch.zeros(1), "b": torch.ones(1)}, src)
    out = tmp_path / "r.pth"
    result = cli("rename", src, "--strip-prefix", "module.", "-o", out)
    assert result.code == 1 and "module.a + a -> a" in result.err and "module.b + b -> b" in result.err
    assert not out.exists()


def test_rename_with_map_regex_and_replace(cli, tmp_path, zip_pth):
    mapping = tmp_path / "map.json"
    mapping.write_text(json.dumps({"fc1.weight": "encoder.fc1.weight"}))
    out = tmp_path / "r.safetensors"
    report = cli("rename", zip_pth, "--replace", "liner", "fc", "--regex", r"^fc(\d+)\.bias$", r"fc\1.b",
                 "--map", mapping, "-o", out, "--json").json()
    assert report["renamed"]["liner1.weight"] == "encoder.fc1.weight"
    assert report["renamed"]["liner10.bias"] == "fc10.b"
    assert report["untouched"] == ["conv.weight", "conv.bias", "bn.weight", "bn.bias", "bn.running_mean",
                                   "bn.running_var", "bn.num_batches_tracked"]
    assert "encoder.fc1.weight" in keys_of(out)


@pytest.mark.parametrize("content, message", [("[1, 2]", "must be a JSON object"), ("{nope", "not valid JSON")])
def test_rename_bad_map(cli, tmp_path, zip_pth, content, message):
    mapping = tmp_path / "map.json"
    mapping.write_text(content)
    result = cli("rename", zip_pth, "--map", mapping, "-o", tmp_path / "r.pth")
    assert result.code == 1 and message in result.err


def test_rename_drops_stale_module_metadata(cli, tmp_path, zip_pth):
    out = tmp_path / "r.pth"
    cli("rename", zip_pth, "--add-prefix", "m.", "-o", out)
    assert not hasattr(torch.load(out, weights_only=True), "_metadata")


# ---- merge -----------------------------------------------------------------------------------

@pytest.fixture
def halves(tmp_path):
    torch.manual_seed(0)
    a = {"x": torch.randn(2), "shared": torch.zeros(3)}
    b = {"shared": torch.ones(3), "y": torch.randn(4)}
    pa, pb = tmp_path / "a.pth", tmp_path / "b.safetensors"
    torch.save(a, pa)
    save_file(b, str(pb))
    return pa, pb


def test_merge_union_conflicts(cli, tmp_path, halves):
    pa, pb = halves
    out = tmp_path / "m.pth"
    refused = cli("merge", pa, pb, "-o", out)
    assert refused.code == 1 and "1 key(s) are in more than one source: shared" in refused.err and not out.exists()
    first = cli("merge", pa, pb, "-o", out, "--on-conflict", "first", "--json").json()
    assert first["conflicts"] == ["shared"] and keys_of(out) == ["x", "shared", "y"]
    assert torch.equal(load_any(out)["shared"], torch.zeros(3))
    cli("merge", pa, pb, "-o", out, "--on-conflict", "last", "--force")
    assert torch.equal(load_any(out)["shared"], torch.ones(3)) and keys_of(out) == ["x", "shared", "y"]


def test_merge_average_weights_and_dtypes(cli, tmp_path):
    paths = []
    for i, value in enumerate([1.0, 2.0, 4.0]):
        p = tmp_path / f"c{i}.pth"
        torch.save({"h": torch.full((3,), value, dtype=torch.float16), "n": torch.tensor(i),
                    "d": torch.full((2,), value, dtype=torch.float64)}, p)
        paths.append(p)
    out = tmp_path / "avg.pth"
    report = cli("merge", *paths, "--average", "--weights", "1,1,2", "-o", out, "--json").json()
    assert report["not_merged"] == ["n"] and report["parameters"]["weights"] == [1, 1, 2]
    got = load_any(out)
    assert got["h"].dtype == torch.float16 and torch.equal(got["h"], torch.full((3,), 2.75, dtype=torch.float16))
    assert got["d"].dtype == torch.float64 and got["n"] == 0


@pytest.mark.parametrize("args, message", [
    (["--weights", "1,2"], "2 weights for 3 models"),
    (["--weights", "1,x,2"], "numbers separated by commas"),
    (["--weights", "1,-1,0"], "must not sum to zero"),
])
def test_merge_average_bad_weights(cli, tmp_path, zip_pth, args, message):
    result = cli("merge", zip_pth, zip_pth, zip_pth, "--average", *args, "-o", tmp_path / "a.pth")
    assert result.code == 2 and message in result.err


def test_merge_average_disagreeing_sources(cli, tmp_path, zip_pth):
    other = tmp_path / "other.pth"
    sd = torch.load(zip_pth)
    sd["liner10.weight"] = torch.zeros(7, 5)
    del sd["conv.bias"]
    torch.save(sd, other)
    result = cli("merge", zip_pth, other, "--average", "-o", tmp_path / "a.pth")
    assert result.code == 1 and "lacks conv.bias" in result.err and "liner10.weight [4, 5] vs [7, 5]" in result.err


def test_merge_into_casts_to_template_dtype_and_reports_each_key_once(cli, tmp_path, zip_pth):
    template = tmp_path / "t.safetensors"
    sd = torch.load(zip_pth)
    tpl = {("model." + k if k.startswith("liner") else k): v.half() if v.is_floating_point() else v
           for k, v in sd.items()}
    tpl["new.weight"] = torch.ones(2)
    save_file(tpl, str(template))
    out = tmp_path / "m.pth"
    report = cli("merge", zip_pth, "--into", template, "-o", out, "--json").json()
    buckets = report["copied"] + list(report["renamed"].values()) + report["kept_from_template"] + \
        [m["name"] for m in report["mismatched"]]
    assert sorted(buckets) == sorted(tpl) and len(buckets) == len(set(buckets))
    assert report["renamed"]["liner1.weight"] == "model.liner1.weight" and report["kept_from_template"] == ["new.weight"]
    got = load_any(out)
    assert got["conv.weight"].dtype == torch.float16 and torch.equal(got["conv.weight"], sd["conv.weight"].half())


def test_merge_into_left_out_and_multiple_sources(cli, tmp_path, halves):
    pa, pb = halves
    template = tmp_path / "t.pth"
    torch.save({"shared": torch.full((3,), 9.0), "y": torch.zeros(4), "z": torch.zeros(1)}, template)
    report = cli("merge", pa, pb, "--into", template, "-o", tmp_path / "m.pth", "--json").json()
    assert report["copied"] == ["shared", "y"] and report["kept_from_template"] == ["z"]
    assert report["left_out"] == ["x"]
    assert torch.equal(load_any(tmp_path / "m.pth")["shared"], torch.zeros(3))  # the first source wins


def test_merge_into_dry_run_prints_table(cli, tmp_path, zip_pth):
    template = tmp_path / "t.pth"
    torch.save(Net(classes=7).state_dict(), template)
    out = tmp_path / "m.pth"
    result = cli("merge", zip_pth, "--into", template, "-o", out, "--on-mismatch", "skip", "--dry-run")
    assert result.code == 0 and not out.exists()
    assert "mismatched (skip)" in result.out and "[4, 5] -> [7, 5]" in result.out


def test_merge_into_ambiguous(cli, tmp_path):
    src, template = tmp_path / "s.pth", tmp_path / "t.pth"
    torch.save({"module.fc.weight": torch.zeros(1)}, src)
    torch.save({"fc.weight": torch.zeros(1), "model.fc.weight": torch.zeros(1)}, template)
    result = cli("merge", src, "--into", template, "-o", tmp_path / "m.pth")
    assert result.code == 1 and "ambiguous" in result.err


@pytest.mark.parametrize("args, message", [
    (["--on-mismatch", "pad"], "'pad' is not one of 'error', 'skip', 'overlap', 'adapt'"),
    (["--on-conflict", "newest"], "'newest' is not one of 'error', 'first', 'last'"),
    (["--average", "--into", "x.pth"], "do not combine"),
    (["--weights", "1"], "--weights applies to --method (or --average) only"),
])
def test_merge_usage_errors(cli, tmp_path, zip_pth, args, message):
    result = cli("merge", zip_pth, zip_pth, "-o", tmp_path / "m.pth", *args)
    assert result.code == 2 and message in " ".join(result.err.replace("│", " ").split())


# ---- diff ------------------------------------------------------------------------------------

def test_diff_identical_across_formats(cli, tmp_path, zip_pth):
    st = tmp_path / "m.safetensors"
    cli("convert", zip_pth, "-o", st)
    result = cli("diff", zip_pth, st)
    assert result.code == 0 and "identical" in result.out
    doc = cli("diff", zip_pth, st, "--json").json()
    assert doc["identical"] is True and doc["equal"] == 11


def test_diff_reports_every_kind_of_change(cli, tmp_path):
    a, b = tmp_path / "a.pth", tmp_path / "b.pth"
    torch.save({"same": torch.ones(2), "gone": torch.ones(1), "shape": torch.ones(2), "dtype": torch.ones(2),
                "value": torch.tensor([1.0, 2.0]), "nan": torch.tensor([float("nan")])}, a)
    torch.save({"same": torch.ones(2), "new": torch.ones(1), "shape": torch.ones(3),
                "dtype": torch.ones(2, dtype=torch.float64), "value": torch.tensor([1.0, 2.5]),
                "nan": torch.tensor([float("nan")])}, b)
    result = cli("diff", a, b, "--json")
    assert result.code == 1
    doc = result.json()
    assert doc["only_in_a"] == ["gone"] and doc["only_in_b"] == ["new"]
    assert doc["shape_changed"] == [{"name": "shape", "a": [2], "b": [3]}]
    assert doc["dtype_changed"] == [{"name": "dtype", "a": "float32", "b": "float64"}]
    assert doc["value_changed"] == [{"name": "value", "max_abs_diff": 0.5}]
    assert doc["equal"] == 2  # same, and nan == nan bit for bit
    human = cli("diff", a, b)
    assert human.code == 1 and "only in A" in human.out and "max |A-B| 0.5" in human.out


def test_diff_atol(cli, tmp_path):
    a, b = tmp_path / "a.pth", tmp_path / "b.pth"
    torch.save({"w": torch.tensor([1.0, 2.0])}, a)
    torch.save({"w": torch.tensor([1.0, 2.0001])}, b)
    assert cli("diff", a, b).code == 1
    assert cli("diff", a, b, "--atol", "1e-3").code == 0
    assert cli("diff", a, b, "--atol", "1e-6").code == 1
    assert cli("diff", a, b, "--atol", "-1").code == 2


# ---- every writing command -------------------------------------------------------------------

WRITERS = {
    "filter": lambda src, out: ["filter", src, "--keep", "liner1", "-o", out],
    "drop": lambda src, out: ["drop", src, "bn", "-o", out],
    "rename": lambda src, out: ["rename", src, "--add-prefix", "m.", "-o", out],
    "merge": lambda src, out: ["merge", src, src, "--on-conflict", "last", "-o", out],
    "average": lambda src, out: ["merge", src, src, "--average", "-o", out],
    "into": lambda src, out: ["merge", src, "--into", src, "-o", out],
    "convert": lambda src, out: ["convert", src, "-o", out, "--dtype", "bf16"],
}


@pytest.mark.parametrize("suffix", [".pth", ".safetensors"])
@pytest.mark.parametrize("command", sorted(WRITERS))
def test_writers_are_deterministic_atomic_and_careful(cli, tmp_path, nested_pth, command, suffix):
    make = WRITERS[command]
    (tmp_path / "one").mkdir()
    (tmp_path / "two").mkdir()
    first, second = tmp_path / "one" / f"a{suffix}", tmp_path / "two" / f"b{suffix}"
    assert cli(*make(nested_pth, first)).code == 0
    assert cli(*make(nested_pth, second)).code == 0
    digest = lambda p: hashlib.sha256(p.read_bytes()).hexdigest()  # noqa: E731
    assert digest(first) == digest(second)
    refused = cli(*make(nested_pth, first))
    assert refused.code == 1 and "--force" in refused.err
    assert cli(*make(nested_pth, first), "--force").code == 0 and digest(first) == digest(second)
    dry = tmp_path / "one" / f"dry{suffix}"
    assert cli(*make(nested_pth, dry), "--dry-run").code == 0 and not dry.exists()
    assert sorted(os.listdir(tmp_path / "one")) == [f"a{suffix}"]
    quiet = cli(*make(nested_pth, first), "--force", "-q")
    assert quiet.code == 0 and quiet.err == "" and quiet.out == ""
    if suffix == ".pth":
        assert torch.load(first, weights_only=True)["epoch"] == 7  # carried through


@pytest.mark.parametrize("args", [
    ["filter", "{src}", "--keep", "liner1", "-o", "{out}"],
    ["drop", "{src}", "bn", "-o", "{out}"],
    ["rename", "{src}", "--replace", "liner", "fc", "-o", "{out}"],
    ["merge", "{src}", "--into", "{src}", "-o", "{out}"],
    ["merge", "{src}", "{src}", "--on-conflict", "first", "-o", "{out}"],
])
def test_plain_edits_do_not_import_torch(tmp_path, zip_pth, args):
    """Only computing new values (casts, averages, overlaps, stats) needs torch."""
    import subprocess
    import sys

    out = tmp_path / "o.safetensors"
    argv = [a.format(src=zip_pth, out=out) for a in args]
    code = ("import sys; from ckptsurgery.cli import main; sys.argv=['ckptsurgery', *sys.argv[1:]]\n"
            "try: main()\nexcept SystemExit as e: assert not e.code, e.code\n"
            "assert 'torch' not in sys.modules, 'torch was imported'")
    done = subprocess.run([sys.executable, "-c", code, *argv], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert out.exists()


# ---- merge: entries that are not tensors, dtypes that cannot be copied --------------------------

def test_merge_union_keeps_later_sources_extra_state(cli, tmp_path):
    """merge A B: B's b._extra_state is carried into the .pth output, or at least reported as left out."""
    torch.save({"a.weight": torch.ones(2), "a._extra_state": b"A"}, tmp_path / "a.pth")
    torch.save({"b.weight": torch.zeros(2), "b._extra_state": b"B"}, tmp_path / "b.pth")
    out = tmp_path / "ab.pth"
    result = cli("merge", tmp_path / "a.pth", tmp_path / "b.pth", "-o", out, "--json")
    assert result.code == 0, result.err
    got = torch.load(out, weights_only=True)
    assert got.get("b._extra_state") == b"B" or "b._extra_state" in result.out, (list(got), result.out)


def test_merge_union_tensor_does_not_replace_extra_state_silently(cli, tmp_path):
    """merge A B where B has a tensor named like A's _extra_state: a conflict (refused by default), not a silent replacement."""
    torch.save({"blk.weight": torch.ones(2), "blk._extra_state": b"benign"}, tmp_path / "a.pth")
    torch.save({"blk._extra_state": torch.full((3,), 7.0)}, tmp_path / "b.pth")
    out = tmp_path / "ab.pth"
    result = cli("merge", tmp_path / "a.pth", tmp_path / "b.pth", "-o", out)
    if result.code == 0:
        assert torch.load(out, weights_only=True)["blk._extra_state"] == b"benign"
    else:
        assert_one_error_line(result, "blk._extra_state")


def test_merge_into_a_quantized_template_is_written_or_refused_in_one_line(cli, tmp_path):
    """merge float.pth --into quantized.pth (same shapes): written, or refused with one line, never the catch-all."""
    q = torch.quantize_per_tensor(torch.randn(4, 3), 0.1, 0, torch.qint8)
    torch.save({"w": q}, tmp_path / "q.pth")
    torch.save({"w": torch.randn(4, 3)}, tmp_path / "f.pth")
    result = cli("merge", tmp_path / "f.pth", "--into", tmp_path / "q.pth", "-o", tmp_path / "o.pth")
    assert_clean(result)


def test_merge_overlap_into_a_quantized_template_is_loadable_or_refused(cli, tmp_path):
    """merge --on-mismatch overlap onto a qint8 template must not write, with exit 0, a quantized tensor without its scales."""
    q = torch.quantize_per_tensor(torch.randn(4, 3), 0.1, 0, torch.qint8)
    torch.save({"w": q}, tmp_path / "q.pth")
    torch.save({"w": torch.randn(5, 3)}, tmp_path / "f.pth")
    out = tmp_path / "o.pth"
    result = cli("merge", tmp_path / "f.pth", "--into", tmp_path / "q.pth", "--on-mismatch", "overlap", "-o", out)
    assert_clean(result)
    if result.code == 0:
        ok, why = torch_loads(out)
        assert ok, f"exit 0, but torch.load cannot read the output: {why}"


def test_merge_into_with_skip_keeps_the_template_tensor_of_an_unconvertible_dtype(cli, tmp_path):
    """--on-mismatch skip copies nothing for a shape mismatch, so a float source beside a qint8 template is no reason to refuse (the refusal even says 'use --on-mismatch skip')."""
    q = torch.quantize_per_tensor(torch.randn(4, 3), 0.1, 0, torch.qint8)
    torch.save({"w": q, "b": torch.zeros(3)}, tmp_path / "q.pth")
    torch.save({"w": torch.randn(5, 3), "b": torch.ones(3)}, tmp_path / "f.pth")
    out = tmp_path / "o.pth"
    result = cli("merge", tmp_path / "f.pth", "--into", tmp_path / "q.pth", "--on-mismatch", "skip", "-o", out)
    assert result.code == 0, result.err
    got = torch.load(out, weights_only=True)
    assert torch.equal(got["w"].int_repr(), q.int_repr()) and torch.equal(got["b"], torch.ones(3))


def test_merge_into_refusal_names_a_file(cli, tmp_path):
    """merge --into refusing an unconvertible dtype: the one line names the source or the template file."""
    q = torch.quantize_per_tensor(torch.randn(4, 3), 0.1, 0, torch.qint8)
    torch.save({"w": q}, tmp_path / "q.pth")
    torch.save({"w": torch.randn(4, 3)}, tmp_path / "f.pth")
    result = cli("merge", tmp_path / "f.pth", "--into", tmp_path / "q.pth", "-o", tmp_path / "o.pth")
    assert_one_error_line(result)
    assert str(tmp_path / "f.pth") in result.err or str(tmp_path / "q.pth") in result.err, result.err
