"""`inspect` through the real entry point: the JSON document, the human table, --keys, --stats,
--tree, metadata, the entry points, and names of extras as torch names them."""

import json
import os
import shutil
import subprocess
import sys

import pytest
import torch
from safetensors.torch import save_file

from conftest import ROOT, assert_one_error_line


def test_json_document_shape(cli, nested_pth, net):
    result = cli("inspect", nested_pth, "--json")
    assert result.code == 0 and result.err == ""
    doc = result.json()
    assert doc["format"] == "torch-zip" and doc["root"] == "state_dict"
    assert doc["extras"] == {"epoch": "int", "optimizer": "dict", "best": "float", "tag": "bytes"}
    assert doc["metadata"] == {} and doc["inert"] == []
    sd = net.state_dict()
    assert doc["total_params"] == sum(v.numel() for v in sd.values())
    assert doc["total_bytes"] == sum(v.numel() * v.element_size() for v in sd.values())
    first = doc["tensors"][0]
    assert first == {"name": "conv.weight", "dtype": "float32", "shape": [4, 3, 3, 3], "nbytes": 432,
                     "requires_grad": None, "shares_with": None, "contiguous": True}
    assert [t["name"] for t in doc["tensors"]] == list(sd)


def test_human_table(cli, zip_pth):
    result = cli("inspect", zip_pth)
    assert result.code == 0
    lines = result.out.splitlines()
    assert "format=torch-zip" in lines[0]
    assert any(line.split()[:3] == ["liner1.weight", "float32", "(5,"] for line in lines)
    assert lines[-1].startswith("11 tensors, ")  # BatchNorm adds num_batches_tracked


def test_keys_selects_modules_not_prefixes(cli, zip_pth):
    doc = cli("inspect", zip_pth, "--keys", "liner1", "--json").json()
    assert [t["name"] for t in doc["tensors"]] == ["liner1.weight", "liner1.bias"]
    doc = cli("inspect", zip_pth, "--keys", "*.bias", "--keys", "re:running", "--json").json()
    assert [t["name"] for t in doc["tensors"]] == ["conv.bias", "bn.bias", "bn.running_mean", "bn.running_var",
                                                  "liner1.bias", "liner10.bias"]
    assert doc["total_params"] == 4 + 4 + 4 + 4 + 5 + 4


def test_keys_that_select_nothing_fail(cli, zip_pth):
    result = cli("inspect", zip_pth, "--keys", "linear1")
    assert result.code == 1 and "'linear1' selected no key" in result.err and result.out == ""


def test_whole_module_reports_frozen_and_inert(cli, pickled_module):
    path, truth, _ = pickled_module
    result = cli("inspect", path, "--json")
    doc = result.json()
    assert "__main__.SecretNet" in doc["inert"]
    grads = {t["name"]: t["requires_grad"] for t in doc["tensors"]}
    assert grads["features.0.weight"] is False and grads["head.weight"] is True and grads["scale"] is None
    human = cli("inspect", path)
    assert "frozen" in human.out and "left inert" in human.err
    assert "left inert" not in cli("inspect", path, "-q").err


def test_stats(cli, odd_tensors_pth):
    doc = cli("inspect", odd_tensors_pth, "--stats", "--json").json()
    stats = {t["name"]: t for t in doc["tensors"]}
    ref = torch.load(odd_tensors_pth, weights_only=True)
    bf = ref["bf"].double()
    assert stats["bf"]["min"] == bf.min().item() and stats["bf"]["max"] == bf.max().item()
    assert stats["bf"]["mean"] == pytest.approx(bf.mean().item())
    assert stats["bf"]["std"] == pytest.approx(bf.std().item())
    assert stats["transposed"]["mean"] == pytest.approx(5.5)
    assert stats["mask"]["max"] == 1.0 and stats["empty"]["mean"] is None


def test_stats_counts_nan_and_inf(cli, tmp_path):
    path = tmp_path / "bad.pth"
    torch.save({"w": torch.tensor([1.0, float("nan"), float("inf"), -float("inf"), 3.0])}, path)
    t = cli("inspect", path, "--stats", "--json").json()["tensors"][0]
    assert (t["nan"], t["inf"], t["min"], t["max"], t["mean"]) == (1, 2, 1.0, 3.0, 2.0)


def test_stats_streamed_over_chunks(cli, tmp_path, monkeypatch):
    import importlib

    monkeypatch.setattr(importlib.import_module("ckptsurgery.ops.stats"), "_TORCH_CHUNK", 7)  # many chunks: the merged moments must still be right
    values = torch.randn(1000, dtype=torch.float64) * 3 + 1
    path = tmp_path / "v.pth"
    torch.save({"v": values}, path)
    t = cli("inspect", path, "--stats", "--json").json()["tensors"][0]
    assert t["mean"] == pytest.approx(values.mean().item()) and t["std"] == pytest.approx(values.std().item())


def _mapped_stats_doc(cli, path, monkeypatch, jobs):
    import importlib

    stats = importlib.import_module("ckptsurgery.ops.stats")
    monkeypatch.setattr(stats, "_CHUNK", 5)  # many chunks and segments: the merged moments must still be right
    monkeypatch.setattr(stats, "_SEGMENT", 15)
    monkeypatch.setattr(importlib.import_module("ckptsurgery.ops.options"), "default_jobs", lambda: jobs)
    return {t["name"]: t for t in cli("inspect", path, "--stats", "--json").json()["tensors"]}


def test_stats_from_a_mapped_file_are_merged_over_chunks_and_segments_the_same_on_any_number_of_threads(
        cli, tmp_path, monkeypatch):
    torch.manual_seed(0)
    # "a": one pass for a chunk's sum and sum of squares; "norm": values about 1.0 whose spread that
    # would lose to cancellation, so the two passes (mean, then deviations) take them
    tensors = {"a": torch.randn(101) * 3 + 1, "norm": 1 + torch.randn(50, dtype=torch.float64) * 1e-4, "empty": torch.zeros(0),
               "b": torch.randn(7, 9, dtype=torch.float64),
               "bad": torch.tensor([1.0, float("nan"), 2.0, float("inf"), -float("inf"), 5.0] * 4),
               "h": torch.randn(40).to(torch.bfloat16), "i": torch.arange(-20, 23, dtype=torch.int32)}
    path = tmp_path / "t.safetensors"
    save_file(tensors, path)
    one, two = (_mapped_stats_doc(cli, path, monkeypatch, jobs) for jobs in (1, 2))
    assert one == two  # the same floats, not merely close: segments are merged in order
    for name in ("a", "norm", "b", "h", "i"):
        ref = tensors[name].double().flatten()
        assert one[name]["min"] == ref.min().item() and one[name]["max"] == ref.max().item()
        assert one[name]["mean"] == pytest.approx(ref.mean().item(), rel=1e-12, abs=1e-12)
        assert one[name]["std"] == pytest.approx(ref.std().item(), rel=1e-12, abs=0)
    assert (one["bad"]["nan"], one["bad"]["inf"], one["bad"]["mean"]) == (4, 8, 2.6666666666666665)
    assert one["empty"] == {**one["empty"], "min": None, "mean": None, "nan": 0, "inf": 0}


def _stats_module_with_forks_counted(monkeypatch, jobs):
    """ops.stats with `jobs` workers, _CHUNK/_SEGMENT small, and os.fork counted."""
    import importlib

    stats = importlib.import_module("ckptsurgery.ops.stats")
    monkeypatch.setattr(stats, "_CHUNK", 5)
    monkeypatch.setattr(stats, "_SEGMENT", 15)
    monkeypatch.setattr(importlib.import_module("ckptsurgery.ops.options"), "default_jobs", lambda: jobs)
    forks = []
    real_fork = os.fork
    monkeypatch.setattr(os, "fork", lambda: forks.append(1) or real_fork())
    return stats, forks


def test_stats_of_a_mapped_file_are_taken_by_forked_workers_and_equal_one_processs(cli, tmp_path, monkeypatch):
    torch.manual_seed(1)
    save_file({"a": torch.randn(200) * 2, "b": torch.randn(3, 33, dtype=torch.float64)}, tmp_path / "t.safetensors")
    docs = []
    for jobs in (1, 3):
        _, forks = _stats_module_with_forks_counted(monkeypatch, jobs)
        docs.append(cli("inspect", tmp_path / "t.safetensors", "--stats", "--json").json()["tensors"])
        assert len(forks) == (2 if jobs == 3 and sys.platform.startswith("linux") else 0)
    assert docs[0] == docs[1]


def test_stats_of_a_worker_that_stops_early_are_computed_here_and_its_error_is_one_line(cli, tmp_path, monkeypatch):
    if not sys.platform.startswith("linux"):
        pytest.skip("workers are forked on Linux only")
    torch.manual_seed(2)
    path = tmp_path / "t.safetensors"
    save_file({"a": torch.randn(100), "b": torch.randn(64)}, path)
    stats, forks = _stats_module_with_forks_counted(monkeypatch, 2)
    expected = cli("inspect", path, "--stats", "--json").json()["tensors"]
    here, real = os.getpid(), stats._mapped_moments

    def dies_in_a_worker(*args):  # a worker's task fails (as a killed or broken worker would)
        if os.getpid() != here:
            raise MemoryError
        return real(*args)

    monkeypatch.setattr(stats, "_mapped_moments", dies_in_a_worker)
    assert cli("inspect", path, "--stats", "--json").json()["tensors"] == expected
    monkeypatch.setattr(os, "fork", lambda: (_ for _ in ()).throw(BlockingIOError(11, "no process")))
    assert cli("inspect", path, "--stats", "--json").json()["tensors"] == expected  # none started: all here

    def fails_everywhere(*args):  # what fails here too is an error of this process, one line
        from ckptsurgery.errors import CkptError

        raise CkptError("t.safetensors: data lies past the end of the file") if os.getpid() == here else MemoryError

    monkeypatch.setattr(stats, "_mapped_moments", fails_everywhere)
    assert_one_error_line(cli("inspect", path, "--stats"), "data lies past the end of the file")
    assert len(forks) == 2


def test_stats_of_a_pth_go_to_threads_when_a_tensor_is_not_in_a_mapped_file(cli, tmp_path, monkeypatch):
    path = tmp_path / "m.pth"
    torch.save({"a": torch.randn(40), "strided": torch.randn(8, 8).t()}, path)
    _, forks = _stats_module_with_forks_counted(monkeypatch, 2)
    tensors = cli("inspect", path, "--stats", "--json").json()["tensors"]
    assert not forks and [t["std"] is not None for t in tensors] == [True, True]


def test_tree_folds_repeated_layers(cli, tmp_path):
    torch.manual_seed(0)
    blocks = torch.nn.Sequential(*[torch.nn.Linear(4, 4) for _ in range(24)], torch.nn.Linear(4, 2))
    path = tmp_path / "deep.pth"
    torch.save({"h." + k: v for k, v in blocks.state_dict().items()}, path)
    doc = cli("inspect", path, "--tree", "--depth", "2", "--json").json()
    rows = [(r["name"], r["params"], r["repeat"]) for r in doc["tree"]]
    assert rows == [("h", 24 * 20 + 10, 1), ("h.{0..23}", 24 * 20, 24), ("h.24", 10, 1)]
    human = cli("inspect", path, "--tree")
    assert "{0..23}" in human.out and "24 × 20 params" in human.out


def test_tree_folds_layers_of_a_safetensors_file_whose_names_are_sorted_as_strings(cli, tmp_path):
    """save_file stores names sorted as strings (layers 0, 1, 10, 11, 2, ...): the twelve layers
    still fold into one row, as the same keys in a .pth do."""
    sd = {f"model.layers.{i}.{part}.weight": torch.ones(4, 4) for i in range(12) for part in ("attn", "mlp")}
    sd["model.norm.weight"] = torch.ones(4)
    st, pth = tmp_path / "m.safetensors", tmp_path / "m.pth"
    save_file(sd, str(st))
    torch.save(sd, pth)
    rows = cli("inspect", st, "--tree", "--depth", "3", "--json").json()["tree"]
    assert [(r["name"], r["repeat"]) for r in rows] == [
        ("model", 1), ("model.layers", 1), ("model.layers.{0..11}", 12), ("model.norm", 1), ("model.norm.weight", 1)]
    assert rows == cli("inspect", pth, "--tree", "--depth", "3", "--json").json()["tree"]
    human = cli("inspect", st, "--tree").out
    assert "{0..11}  12 × 32 params" in human and "{0..1}" not in human and "{2..9}" not in human


def test_tree_of_numbered_siblings_does_not_depend_on_the_order_of_the_keys(cli, tmp_path):
    """Shuffled layers fold as ordered ones do; a layer whose shape differs stands alone where
    its number puts it; numbered siblings are listed together, before a named one met after the first of them."""
    order = [7, 3, 0, 11, 5, 1, 9, 2, 10, 4, 8, 6]
    sd = {f"h.{i}.w": torch.ones(3 if i == 5 else 2) for i in order}
    sd = {"h.head.w": torch.ones(1), **dict(list(sd.items())[:4]), "h.tail.w": torch.ones(1), **dict(list(sd.items())[4:])}
    path = tmp_path / "shuffled.pth"
    torch.save(sd, path)
    rows = cli("inspect", path, "--tree", "--depth", "2", "--json").json()["tree"]
    assert [(r["name"], r["repeat"], r["params"]) for r in rows] == [
        ("h", 1, 11 * 2 + 3 + 2), ("h.head", 1, 1), ("h.{0..4}", 5, 10), ("h.5", 1, 3), ("h.{6..11}", 6, 12),
        ("h.tail", 1, 1)]


def test_tree_folds_the_layers_of_a_save_pretrained_llama(cli, tmp_path, capsys):
    """A real `save_pretrained` of a tiny 12-layer Llama (safetensors, names sorted as strings)."""
    transformers = pytest.importorskip("transformers")
    config = transformers.LlamaConfig(vocab_size=16, hidden_size=8, intermediate_size=8, num_hidden_layers=12,
                                      num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=8)
    transformers.LlamaForCausalLM(config).save_pretrained(str(tmp_path / "llama"))
    capsys.readouterr()  # what transformers printed is not ours
    rows = cli("inspect", tmp_path / "llama", "--tree", "--depth", "3", "--json").json()["tree"]
    layers = [r for r in rows if r["name"].startswith("model.layers.")]
    assert [(r["name"], r["repeat"]) for r in layers] == [("model.layers.{0..11}", 12)]


def test_tree_depth_must_be_positive(cli, zip_pth):
    assert cli("inspect", zip_pth, "--tree", "--depth", "0").code == 2


def test_safetensors_metadata_shown(cli, safetensors_file):
    doc = cli("inspect", safetensors_file, "--json").json()
    assert doc["format"] == "safetensors" and doc["metadata"] == {"source": "test"} and doc["root"] is None
    assert "source=test" in cli("inspect", safetensors_file).out


def test_console_script_and_module_entry_points(zip_pth):
    script = shutil.which("ckptsurgery") or os.path.join(os.path.dirname(sys.executable), "ckptsurgery")
    for command in ([script], [sys.executable, "-m", "ckptsurgery"]):
        done = subprocess.run([*command, "inspect", str(zip_pth), "--json"], capture_output=True, text=True)
        assert done.returncode == 0, done.stderr
        assert '"total_params"' in done.stdout and done.stderr == ""


def test_usage_errors_exit_2(cli, zip_pth):
    assert cli("inspect").code == 2
    assert cli("inspect", zip_pth, "--bogus").code == 2
    assert cli("frobnicate").code == 2


def test_hostile_names_cannot_drive_the_terminal(cli, tmp_path):
    """Names come from the file: an ANSI escape is shown escaped, Rich markup is shown as text."""
    path = tmp_path / "names.pth"
    torch.save({"\x1b[2Jwipe": torch.ones(1), "[bold red]loud[/]": torch.ones(1), "new\nline": torch.ones(1)}, path)
    for args in (["inspect", path], ["inspect", path, "--tree"], ["rename", path, "--add-prefix", "x.", "-o",
                                                                   tmp_path / "r.pth", "--dry-run"]):
        out = cli(*args).out
        assert "\x1b" not in out and "\\x1b[2Jwipe" in out, args
        assert "[bold red]loud[/]" in out and "new\\nline" in out, args
    result = cli("drop", path, "new\nline", "nothing-here", "-o", tmp_path / "d.pth")
    assert result.code == 1 and len(result.err.splitlines()) == 1


def test_version(cli):
    from ckptsurgery import __version__

    result = cli("--version")
    assert result.code == 0 and result.out == f"ckptsurgery {__version__}\n"


def test_inspect_names_a_storage_entry_by_torchs_type(cli, tmp_path):
    """A storage saved beside the state dict is listed as torch's type (torch.FloatStorage / UntypedStorage), never as ckptsurgery's StorageHandle."""
    src = tmp_path / "storage.pth"
    torch.save({"state_dict": {"w": torch.ones(2)}, "typed": torch.FloatStorage([1.0, 2.0])}, src)
    result = cli("inspect", src, "--json")
    assert result.code == 0, result.err
    assert "StorageHandle" not in json.dumps(result.json()["extras"]), result.json()["extras"]


# ---- several inputs ------------------------------------------------------------------------------

def test_several_inputs_print_one_block_each_as_each_alone_would(cli, zip_pth, safetensors_file):
    """One block per input, in order, a blank line between; each block is what inspecting that
    input alone prints, path header included."""
    for args in ((), ("--tree",), ("--keys", "liner1")):
        alone = [cli("inspect", path, *args).out for path in (zip_pth, safetensors_file)]
        both = cli("inspect", zip_pth, safetensors_file, *args)
        assert both.code == 0 and both.err == ""
        assert both.out == alone[0] + "\n" + alone[1], args
        assert both.out.startswith(f"{zip_pth}  format=torch-zip")
        assert f"\n\n{safetensors_file}  format=safetensors" in both.out


def test_json_with_several_inputs_is_refused_in_one_line(cli, zip_pth, safetensors_file):
    result = cli("inspect", zip_pth, safetensors_file, "--json")
    assert_one_error_line(result, "--json", "once per input", code=2)
    assert result.out == ""


def test_several_inputs_a_failure_names_its_input(cli, tmp_path, zip_pth):
    """The first input's block is printed; the second lacks the pattern's keys: exit 1, one
    line that says which input."""
    other = tmp_path / "other.pth"
    torch.save({"fc.weight": torch.ones(1)}, other)
    result = cli("inspect", zip_pth, other, "--keys", "liner1")
    assert_one_error_line(result, f"{other}: pattern 'liner1' selected no key")
    assert result.out == cli("inspect", zip_pth, "--keys", "liner1").out


# ---- whole pickled models: trainable and frozen parameters ---------------------------------------

def _partly_frozen_model():
    """An embedding tied to the output layer, six equal blocks of which the first three are
    frozen, and one block whose weight alone is frozen."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Embedding(10, 4), *[torch.nn.Linear(4, 4) for _ in range(6)],
                                torch.nn.Linear(4, 4), torch.nn.BatchNorm1d(4), torch.nn.Linear(4, 10, bias=False))
    model[9].weight = model[0].weight  # tied: counted once, as model.parameters() does
    for block in model[1:4]:
        block.requires_grad_(False)
    model[7].weight.requires_grad_(False)
    return model


@pytest.fixture
def whole_model(tmp_path):
    model = _partly_frozen_model()
    path = tmp_path / "whole.pth"
    torch.save(model, path)
    return path, model


def test_whole_model_totals_trainable_and_frozen_parameters_its_state_dict_nothing(cli, tmp_path, whole_model):
    """Counted as model.parameters() counts them (the tied weight once), over the listed tensors;
    model.state_dict() records no requires_grad: no line, no JSON fields."""
    path, model = whole_model
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    frozen = sum(p.numel() for p in model.parameters() if not p.requires_grad)
    assert frozen == 3 * 20 + 16 and trainable == 40 + 3 * 20 + 4 + 8
    doc = cli("inspect", path, "--json").json()
    assert (doc["trainable_params"], doc["frozen_params"]) == (trainable, frozen)
    human = cli("inspect", path).out.splitlines()
    assert human[-1] == f"{trainable:,} trainable, {frozen:,} frozen parameters"
    assert human[-2].startswith(f"{len(model.state_dict())} tensors")
    nested = tmp_path / "nested.pth"  # a training checkpoint that keeps the whole model under a key
    torch.save({"model": model, "epoch": 3}, nested)
    doc = cli("inspect", nested, "--json").json()
    assert doc["root"] == "model" and (doc["trainable_params"], doc["frozen_params"]) == (trainable, frozen)
    doc = cli("inspect", path, "--keys", "7", "--json").json()  # the listed tensors only
    assert (doc["trainable_params"], doc["frozen_params"]) == (4, 16)
    state_dict = tmp_path / "sd.pth"
    torch.save(model.state_dict(), state_dict)
    doc = cli("inspect", state_dict, "--json").json()
    assert "trainable_params" not in doc and "frozen_params" not in doc
    out = cli("inspect", state_dict).out
    assert "trainable" not in out and out.splitlines()[-1].startswith(f"{len(model.state_dict())} tensors")


def test_tree_marks_frozen_modules_and_never_folds_them_with_trainable_ones(cli, whole_model):
    """Blocks 1-3 (frozen) and 4-6 (trainable) are two rows, not one; block 7 is partly frozen:
    its weight is marked, the block is not."""
    path, _ = whole_model
    rows = cli("inspect", path, "--tree", "--json").json()["tree"]
    top = [(r["name"], r["repeat"], r.get("frozen", False)) for r in rows if r["depth"] == 0]
    assert top == [("0", 1, False), ("{1..3}", 3, True), ("{4..6}", 3, False), ("7", 1, False), ("8", 1, False),
                   ("9", 1, False)]
    frozen = {r["name"] for r in rows if r.get("frozen")}
    assert frozen == {"{1..3}", "{1..3}.weight", "{1..3}.bias", "7.weight"}
    human = cli("inspect", path, "--tree").out
    assert "├── {1..3}  3 × 20 params  3 × 80 B  frozen\n" in human
    assert "├── {4..6}  3 × 20 params  3 × 80 B\n" in human


def test_the_summary_line_counts_one_tensor_in_the_singular(cli, tmp_path):
    torch.save({"w": torch.ones(1)}, tmp_path / "one.pth")
    assert cli("inspect", tmp_path / "one.pth").out.splitlines()[-1] == "1 tensor, 1 parameter, 4 B"


@pytest.mark.parametrize("dtype", ["float32", "float16", "bfloat16", "float64", "int64", "uint8", "bool"])
def test_stats_streamed_from_the_mapped_file_equal_torchs_own(cli, tmp_path, dtype):
    """--stats reads plain tensors with numpy, a cache-sized chunk at a time (it held a whole 2 GB
    tensor in torch, 42 s and 2.4 GB): the same min, max and counts as torch, mean and std to
    rounding, NaN and infinities counted apart."""
    from safetensors.torch import save_file

    g = torch.Generator().manual_seed(0)
    x = (torch.randn(300_001, generator=g) * 100).to(getattr(torch, dtype)) if dtype != "bool" \
        else torch.rand(300_001, generator=g) > 0.3
    if x.is_floating_point():
        x[[5, 70_000]] = float("nan")
        x[[9, 250_000, 300_000]] = float("inf")
        x[11] = float("-inf")
    save_file({"x": x}, tmp_path / "a.safetensors")
    got = cli("inspect", tmp_path / "a.safetensors", "--stats", "--json").json()["tensors"][0]
    finite = x[torch.isfinite(x)].double() if x.is_floating_point() else x.double()
    assert got["min"] == float(finite.min()) and got["max"] == float(finite.max())
    assert got["mean"] == pytest.approx(float(finite.mean()), rel=1e-12, abs=1e-12)
    assert got["std"] == pytest.approx(float(finite.std()), rel=1e-12)
    assert (got["nan"], got["inf"]) == ((2, 4) if x.is_floating_point() else (0, 0))


def test_stats_of_float64_values_whose_sum_overflows_count_no_infinity(cli, tmp_path):
    """A non-finite sum is how the numpy path finds NaN and infinities without testing each value;
    finite float64 values whose sum overflows must not be counted as infinities."""
    from safetensors.torch import save_file

    save_file({"x": torch.tensor([1e308, 1e308, -5.0, float("nan")], dtype=torch.float64)}, tmp_path / "a.safetensors")
    got = cli("inspect", tmp_path / "a.safetensors", "--stats", "--json").json()["tensors"][0]
    assert (got["nan"], got["inf"], got["min"], got["max"], got["mean"]) == (1, 0, -5.0, 1e308, None)


def test_stats_of_plain_safetensors_do_not_import_torch(tmp_path):
    """torch's import alone outlasts the statistics of a small file."""
    import subprocess
    import sys

    from safetensors.numpy import save_file

    import numpy as np

    save_file({"w": np.arange(10, dtype=np.float32)}, str(tmp_path / "a.safetensors"))
    code = ("import sys; from ckptsurgery.ops import inspect_checkpoint; "
            f"r = inspect_checkpoint({str(tmp_path / 'a.safetensors')!r}, stats=True); "
            "print(r.tensors[0]['max'], 'torch' in sys.modules)")
    done = subprocess.run([sys.executable, "-P", "-c", code], capture_output=True, text=True,
                          env={**os.environ, "PYTHONPATH": ROOT})
    assert done.stdout.split() == ["9.0", "False"], done.stderr


def test_tree_folds_only_indices_as_numbers_write_them(cli, tmp_path):
    """`layers.01` is a name, not layer 1: folding 0, 01, 2, 3 into {0..3} named a layer 1 that
    does not exist."""
    torch.save({f"layers.{i}.w": torch.zeros(2) for i in ("0", "01", "2", "3")}, tmp_path / "odd.pth")
    rows = cli("inspect", tmp_path / "odd.pth", "--tree", "--json").json()["tree"]
    names = [r["name"] for r in rows]
    assert "{0..3}" not in " ".join(names) and any(n.endswith("01") for n in names), names


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bool, torch.int16])
def test_stats_of_bytes_read_a_chunk_at_a_time_equal_those_of_a_mapped_view(tmp_path, monkeypatch, dtype):
    """A tensor whose bytes are not one view of a mapped file (a joined tensor's pieces, a remote
    file's ranges) is read a chunk at a time, its min and max per chunk: the figures are those of
    the same bytes viewed in place, segment by segment."""
    import importlib

    from ckptsurgery import open_checkpoint
    from ckptsurgery.io.model import joined_tensor

    stats = importlib.import_module("ckptsurgery.ops.stats")
    monkeypatch.setattr(stats, "_CHUNK", 7)
    monkeypatch.setattr(stats, "_SEGMENT", 30)
    torch.manual_seed(3)
    values = (torch.randn(101, dtype=torch.float64) * 5).to(dtype)
    save_file({"v": values}, tmp_path / "v.safetensors")
    with open_checkpoint(str(tmp_path / "v.safetensors")) as ckpt:
        mapped = ckpt.tensors["v"]
        source, first = mapped.storage.source, mapped.byte_range()[0]
        half = mapped.nbytes // 2 // mapped.dtype.itemsize * mapped.dtype.itemsize
        joined = joined_tensor(mapped.shape, mapped.dtype, [(source, first, half),
                                                            (source, first + half, mapped.nbytes - half)])
        assert stats.tensor_stats(joined) == stats.tensor_stats(mapped)
        assert stats.tensor_stats(mapped)["max"] == values.double().max().item()
