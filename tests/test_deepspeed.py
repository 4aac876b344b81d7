"""DeepSpeed ZeRO checkpoints, written by DeepSpeed itself (two ranks on CPU, gloo on 127.0.0.1),
read into the fp32 weights DeepSpeed's own zero_to_fp32 reconstructs — bit for bit, and in the
dtypes its writer gives them (every floating tensor float32, frozen parameters included) —
without DeepSpeed and without its code running; and those checkpoints edited by hand (neg views,
shapes and paddings that do not add up, bad shared_params, buffer_names and module keys):
refused in one line, and a .pth output holds each weight, nothing hidden beside it."""

from __future__ import annotations

import collections
import os
import shutil
import subprocess
import sys
import textwrap
import zipfile

import pytest
import torch

from conftest import assert_one_error_line, assert_same_tensors, load_any


@pytest.fixture(scope="session", params=[(1, "fp32"), (2, "fp32"), (3, "fp32"), (3, "bf16")],
                ids=["stage1", "stage2", "stage3", "stage3-bf16"])
def zero(request, deepspeed_checkpoint):
    """(checkpoint folder, get_fp32_state_dict_from_zero_checkpoint's state dict, the frozen
    parameter as the model held it, stage)."""
    stage, dtype = request.param
    out = deepspeed_checkpoint(stage, dtype)
    frozen = torch.load(out / "frozen.pt", weights_only=True)  # fp32, before a bf16 run made it bf16
    frozen = frozen.to(torch.bfloat16 if dtype == "bf16" else frozen.dtype)
    return out, torch.load(out / "reference_fp32.pt", weights_only=True), frozen, stage


def test_zero_weights_are_zero_to_fp32s_bit_for_bit(cli, tmp_path, zero):
    """Names and values as get_fp32_state_dict_from_zero_checkpoint gives them; every floating
    tensor float32, as zero_to_fp32 writes them (the in-memory function leaves frozen parameters
    in the model's dtype: see test_zero_convert_writes_what_zero_to_fp32_writes)."""
    folder, reference, frozen, stage = zero
    doc = cli("inspect", folder, "--json").json()
    assert doc["format"] == "deepspeed"
    shares = {t["name"]: t["shares_with"] for t in doc["tensors"]}
    assert shares["head.weight"] == "emb.weight"  # tied: stored once
    assert cli("convert", folder, "-o", tmp_path / "model.safetensors", "--json").json()["tied"] == {
        "head.weight": "emb.weight"}
    out = tmp_path / "model.pth"
    assert cli("convert", folder, "-o", out).code == 0
    got = load_any(out)
    for name, value in reference.items():
        dtype = torch.float32 if value.is_floating_point() else value.dtype
        assert got[name].dtype == dtype and torch.equal(got[name], value.to(dtype)), name
    # zero_to_fp32 drops frozen parameters at stage 1; they are in the model states whole
    assert set(got) - set(reference) == ({"frozen"} if stage == 1 else set())
    assert got["frozen"].dtype == torch.float32 and torch.equal(got["frozen"], frozen.float())
    step = next(p for p in folder.iterdir() if p.is_dir())  # the tag's folder works as well
    assert cli("diff", step, out).code == 0


# What DeepSpeed's zero_to_fp32 writes: convert_zero_checkpoint_to_fp32_state_dict is what the
# zero_to_fp32.py script beside every checkpoint runs (float32); convert_zero_checkpoint_to_state_dict
# takes a dtype (float32, float16, bfloat16; tensors that are not floating keep theirs).
ZERO_TO_FP32 = textwrap.dedent("""
    import sys
    from deepspeed.utils.zero_to_fp32 import (convert_zero_checkpoint_to_fp32_state_dict,
                                              convert_zero_checkpoint_to_state_dict)
    out = sys.argv[1]
    for i, folder in enumerate(sys.argv[2:]):
        convert_zero_checkpoint_to_fp32_state_dict(folder, f"{out}/{i}/fp32")
        for dtype in ("bf16", "fp16"):
            convert_zero_checkpoint_to_state_dict(folder, f"{out}/{i}/{dtype}", dtype=dtype)
""")


def _float8(states, name):
    """The frozen parameter and the buffer of a bf16 run's stage-2 states as float8 (which torch
    counts as floating)."""
    states["frozen_param_fragments"]["frozen"] = states["frozen_param_fragments"]["frozen"].to(torch.float8_e4m3fn)
    states["module"]["counter"] = states["module"]["counter"].to(torch.float8_e5m2)


@pytest.fixture(scope="session")
def zero_to_fp32(deepspeed_checkpoint, tmp_path_factory):
    """name -> (ZeRO folder, {dtype: the state dict DeepSpeed's zero_to_fp32 writes in it}) for a
    bf16 run at stages 1, 2 and 3 — the model's frozen parameter and buffer are bf16 in the
    checkpoint — and a copy of stage 2 whose frozen parameter and buffer are float8. One
    DeepSpeed process writes them all."""
    folders = {f"stage{s}": deepspeed_checkpoint(s, "bf16") for s in (1, 2, 3)}
    base = tmp_path_factory.mktemp("zero_to_fp32")
    folders["stage2-float8"] = shutil.copytree(folders["stage2"], base / "stage2-float8")
    _edit(folders["stage2-float8"], "*model_states.pt", _float8)
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1"}
    run = subprocess.run([sys.executable, "-c", ZERO_TO_FP32, str(base / "out"), *map(str, folders.values())],
                         capture_output=True, text=True, timeout=300, env=env)
    assert run.returncode == 0, run.stderr[-3000:]
    written = lambda i, dtype: load_any(base / "out" / str(i) / dtype / "pytorch_model.bin")  # noqa: E731
    return {name: (folder, {dtype: written(i, dtype) for dtype in ("fp32", "bf16", "fp16")})
            for i, (name, folder) in enumerate(folders.items())}


@pytest.mark.parametrize("stage", [1, 2, 3])
def test_zero_convert_writes_what_zero_to_fp32_writes(cli, tmp_path, monkeypatch, zero_to_fp32, stage):
    """A bf16 run (the frozen parameter bf16 in the checkpoint): `convert` gives the names, order,
    dtypes, values and ties that zero_to_fp32 writes — every floating tensor float32, the frozen
    one included — and `--dtype bf16|fp16` what it writes given that dtype. At stage 1, where
    zero_to_fp32 drops frozen parameters, ours is kept, float32 too."""
    # cast 4 elements at a time: the 6-element frozen parameter in two chunks, at stage 3 one
    # of them across the two ranks' fragments
    monkeypatch.setattr("ckptsurgery.io.deepspeed._CAST_CHUNK", 4)
    folder, written = zero_to_fp32[f"stage{stage}"]
    reference = torch.load(folder / "reference_fp32.pt", weights_only=True)
    for dtype, expected in written.items():
        out = tmp_path / f"{dtype}.pth"
        assert cli("convert", folder, "-o", out, *(("--dtype", dtype) if dtype != "fp32" else ())).code == 0
        got = load_any(out)
        assert got["frozen"].dtype == expected["emb.weight"].dtype
        if stage == 1:
            del got["frozen"]
        assert_same_tensors(got, expected)
        assert got["head.weight"].data_ptr() == got["emb.weight"].data_ptr()  # tied, as zero_to_fp32 writes it
    # get_fp32_state_dict_from_zero_checkpoint: the same names and values (DeepSpeed 0.19.8 leaves
    # the frozen parameter in the model's dtype there, bf16, where its writer gives float32)
    assert list(reference) == list(written["fp32"])
    assert all(torch.equal(reference[n].to(written["fp32"][n].dtype), written["fp32"][n]) for n in reference)


def test_zero_float8_frozen_parameter_and_buffer_come_out_float32(cli, tmp_path, zero_to_fp32):
    """A frozen parameter and a buffer stored as float8 (torch counts them as floating): float32,
    as zero_to_fp32 writes them."""
    folder, written = zero_to_fp32["stage2-float8"]
    out = tmp_path / "out.pth"
    assert cli("convert", folder, "-o", out).code == 0
    got = load_any(out)
    assert written["fp32"]["frozen"].dtype == written["fp32"]["counter"].dtype == torch.float32
    assert_same_tensors(got, written["fp32"])


def test_zero_folder_refuses_root(cli, zero):
    folder = zero[0]
    assert_one_error_line(cli("inspect", folder, "--root", "module"), "DeepSpeed checkpoint")


def test_zero_state_files_are_read_without_running_them(cli, tmp_path, deepspeed_checkpoint):
    """A live payload in an optim states file: refused or ignored, never run."""
    folder = deepspeed_checkpoint(2)
    copy = tmp_path / "copy"
    subprocess.run(["cp", "-r", str(folder), str(copy)], check=True)
    marker = tmp_path / "pwned"

    class Payload:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    optim = next(copy.glob("*/zero_pp_rank_0_*optim_states.pt"))
    states = torch.load(optim, weights_only=False)
    states["optimizer_state_dict"]["loss_scaler"] = Payload()
    torch.save(states, optim)
    for args in (("inspect", copy), ("convert", copy, "-o", tmp_path / "o.safetensors")):
        assert cli(*args).code == 0, args
    assert not marker.exists()


# ---- hostile edits of real checkpoints (torch.load(weights_only=False), torch.save: a trusted test author) ----

def _copy(tmp_path, source, stage: str):
    target = tmp_path / stage
    shutil.copytree(source, target)
    return target


@pytest.fixture
def stage2(tmp_path, deepspeed_checkpoint):
    return _copy(tmp_path, deepspeed_checkpoint(2), "stage2")


@pytest.fixture
def stage3(tmp_path, deepspeed_checkpoint):
    return _copy(tmp_path, deepspeed_checkpoint(3), "stage3")


def _edit(folder, pattern: str, change) -> None:
    """Apply change(states, file name) to each matching file of the tag's folder, in place."""
    paths = sorted((folder / "global_step1").glob(pattern))
    assert paths, pattern
    for path in paths:
        states = torch.load(path, weights_only=False)
        change(states, path.name)
        torch.save(states, path)


def test_a_neg_view_fp32_partition_is_refused(cli, stage2, tmp_path):
    """A partition saved as a lazy neg view (torch.load gives the true values): refused in one line (it was once read without its neg bit)."""

    def negated(states, name):
        opt = states["optimizer_state_dict"]
        opt["single_partition_of_fp32_groups"] = [(-p.detach())._neg_view() for p in
                                                  opt["single_partition_of_fp32_groups"]]

    _edit(stage2, "*optim_states.pt", negated)
    assert_one_error_line(cli("convert", stage2, "-o", tmp_path / "o.safetensors"), "not a flat float32 tensor")


def test_a_neg_view_stage3_frozen_fragment_is_refused(cli, stage3, tmp_path):
    """A ZeRO-3 frozen fragment saved as a lazy neg view: refused in one line (it once came out negated)."""

    def negated(states, name):
        fragments = states["frozen_param_fragments"]
        fragments["frozen"] = (-fragments["frozen"])._neg_view()

    _edit(stage3, "*model_states.pt", negated)
    assert_one_error_line(cli("convert", stage3, "-o", tmp_path / "o.safetensors"), "no plain fragment")


def test_pth_output_leaves_out_bytes_hidden_beside_a_partition(cli, stage2, tmp_path):
    """A partition that views a bigger storage: convert -o x.pth writes the partition only, never the hidden bytes beside it."""
    secret = torch.frombuffer(bytearray(b"TOP-SECRET-API-KEY-0123456789ab!"), dtype=torch.float32)

    def hide(states, name):
        opt = states["optimizer_state_dict"]
        opt["single_partition_of_fp32_groups"] = [torch.cat([p.detach(), secret])[: p.numel()]
                                                  for p in opt["single_partition_of_fp32_groups"]]

    _edit(stage2, "*optim_states.pt", hide)
    out = tmp_path / "out.pth"
    assert cli("convert", stage2, "-o", out).code == 0
    assert b"TOP-SECRET" not in out.read_bytes()


def test_pth_output_stores_each_weight_not_its_rank_partition(cli, stage2, tmp_path):
    """Untouched DeepSpeed output: each .pth tensor's storage holds the weight only, not a whole rank partition (padding included)."""
    out = tmp_path / "out.pth"
    assert cli("convert", stage2, "-o", out).code == 0
    with zipfile.ZipFile(out) as archive:
        stored = sum(i.file_size for i in archive.infolist() if "/data/" in i.filename)
    weights = {(t.data_ptr(), tuple(t.shape)): t.nbytes for t in load_any(out).values()}  # ties once
    assert stored == sum(weights.values()), (stored, sum(weights.values()))


@pytest.mark.parametrize("stage", [2, 3])
def test_param_shapes_that_do_not_add_up_are_refused(cli, stage, tmp_path, deepspeed_checkpoint):
    """param_shapes with one parameter shrunk: every later parameter is read shifted, silently."""
    folder = _copy(tmp_path, deepspeed_checkpoint(stage), f"stage{stage}")

    def shrink(states, name):
        states["param_shapes"][0]["odd"] = torch.Size([1, 1, 1])

    _edit(folder, "*model_states.pt", shrink)
    assert_one_error_line(cli("inspect", folder))


def test_stage2_rank_file_copied_over_another_is_refused(cli, stage2):
    """Rank 0's optim states copied over rank 1's: 64 fp32 elements for 63, read as weights."""
    step = stage2 / "global_step1"
    shutil.copy(step / "zero_pp_rank_0_mp_rank_00_optim_states.pt", step / "zero_pp_rank_1_mp_rank_00_optim_states.pt")
    assert_one_error_line(cli("inspect", stage2, "--stats"))


def test_stage3_frozen_fragments_of_the_wrong_size_are_refused(cli, stage3):
    """Rank 0's frozen fragment holds the whole parameter, rank 1's three more: accepted, rank 1 ignored."""

    def resize(states, name):
        fragments = states["frozen_param_fragments"]
        fragments["frozen"] = torch.arange(6.0) if "rank_0_" in name else torch.full((3,), 99.0)

    _edit(stage3, "*model_states.pt", resize)
    assert_one_error_line(cli("inspect", stage3, "--stats"))


@pytest.mark.parametrize("alias", ["lin.weight", "counter"])
def test_shared_params_overwriting_a_stored_tensor_is_refused(cli, stage2, alias):
    """shared_params naming a trained parameter or buffer as an alias silently replaces it (other shape)."""
    _edit(stage2, "*model_states.pt", lambda s, n: s.__setitem__("shared_params", {alias: "emb.weight"}))
    assert_one_error_line(cli("inspect", stage2))


@pytest.mark.parametrize("paddings", [[-5, 0, 0, 0, 0, 0, 0], [0, 0, 0, 0, 0, 0, 2**62]], ids=["negative", "huge"])
def test_bad_alignment_paddings_are_refused(cli, stage2, paddings):
    """param_alignment_paddings that are negative (read as 0) or huge after the last parameter: accepted."""

    def pad(states, name):
        states["optimizer_state_dict"]["param_alignment_paddings"] = [paddings]

    _edit(stage2, "*optim_states.pt", pad)
    assert_one_error_line(cli("inspect", stage2))


@pytest.mark.parametrize("value", [5, "tensor"], ids=["int", "tensor"])
def test_buffer_names_not_a_list_give_one_error_line(cli, stage2, value):
    """buffer_names an int or a tensor: the catch-all TypeError (inspect exit 1, diff exit 2)."""
    value = torch.zeros(2) if value == "tensor" else value
    _edit(stage2, "*model_states.pt", lambda s, n: s.__setitem__("buffer_names", value))
    assert_one_error_line(cli("inspect", stage2))
    assert_one_error_line(cli("diff", stage2, stage2), code=2)


def test_shared_params_unhashable_source_gives_one_error_line(cli, stage2):
    """shared_params {'head.weight': ['emb.weight']}: the catch-all TypeError: unhashable type."""
    _edit(stage2, "*model_states.pt", lambda s, n: s.__setitem__("shared_params", {"head.weight": ["emb.weight"]}))
    assert_one_error_line(cli("inspect", stage2))


def test_shared_params_not_a_table_without_frozen_shapes_gives_one_error_line(cli, stage2):
    """No frozen_param_shapes (older DeepSpeed) and shared_params = 5: the catch-all TypeError."""

    def change(states, name):
        states["frozen_param_shapes"] = None
        states["shared_params"] = 5

    _edit(stage2, "*model_states.pt", change)
    assert_one_error_line(cli("inspect", stage2))


@pytest.mark.parametrize("key", [7, "bad\ud800"], ids=["int", "surrogate"])
def test_module_key_that_is_not_text_gives_one_error_line(cli, stage2, tmp_path, key):
    """Frozen names taken from `module` skip check_key: an int or lone-surrogate key reaches the catch-all."""

    def change(states, name):
        states["frozen_param_shapes"] = None
        states["module"][key] = torch.ones(2)

    _edit(stage2, "*model_states.pt", change)
    assert_one_error_line(cli("convert", stage2, "-o", tmp_path / "out.safetensors"))
    assert_one_error_line(cli("inspect", stage2))


def test_stage3_many_flat_groups_do_not_hang(stage3):
    """12,000 one-element fp32_flat_groups and params (a 2.5 MB folder): _slices scans every group per param, minutes."""
    n = 12_000

    def groups(states, name):
        base = torch.zeros(n)
        states["optimizer_state_dict"]["fp32_flat_groups"] = [base[i : i + 1] for i in range(n)]

    def params(states, name):
        states["param_shapes"] = [collections.OrderedDict((f"p{i}", torch.Size([2])) for i in range(n))]
        states["frozen_param_shapes"] = collections.OrderedDict()
        states["frozen_param_fragments"] = {}
        states["shared_params"] = {}

    _edit(stage3, "*optim_states.pt", groups)
    _edit(stage3, "*model_states.pt", params)
    try:
        run = subprocess.run([sys.executable, "-m", "ckptsurgery", "inspect", str(stage3)], capture_output=True,
                             timeout=20)
    except subprocess.TimeoutExpired:
        pytest.fail("inspect of a 2.5 MB DeepSpeed folder still running after 20 s")
    assert run.returncode in (0, 1), run.stderr[-500:]
