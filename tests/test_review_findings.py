"""Failing tests for the findings of a cold review of issue 7 ("Trust"). Each test is one bug;
they are expected to fail until the bug is fixed."""

from __future__ import annotations

import json
import subprocess
import sys
import warnings

import pytest
import torch
from torch import nn

from test_hostile_opcodes import (
    D, G, I, PROTO2, T, U, assert_clean, assert_one_error_line, full_load, storage_record, tensor, zip_file,
)

warnings.filterwarnings("ignore", message=".*(ComplexHalf|quantiz|Casting complex).*")


def _load(path):
    """torch.load(weights_only=True) in a fresh interpreter, then repr() of what it gave (a
    quantized tensor without a quantizer loads, and fails on first use): (ok, error line)."""
    code = ("import sys, torch\n"
            "try:\n    obj = torch.load(sys.argv[1], weights_only=True); repr(obj); print('OK')\n"
            "except Exception as e:\n    print('ERR', type(e).__name__, str(e).splitlines()[0][:200] if str(e) else '')")
    out = subprocess.run([sys.executable, "-c", code, str(path)], capture_output=True, text=True, timeout=120).stdout
    return out.startswith("OK"), out.strip()


# ---- 1. outputs that run more than their input ------------------------------------------------

_PAYLOAD = (U("x"), G("m", "f") + b")R")  # full_load counts calls of m.f
_GUARD_MODULE = (G("no_such_module_ckpt", "Net") + b")\x81" + D((U("_parameters"), D((U("w"), tensor()))),
                                                             (U("_buffers"), D()), (U("_modules"), D())) + b"b")
_GUARD_SUBCLASS = (G("torch._tensor", "_rebuild_from_type_v2") + T(
    G("torch._utils", "_rebuild_tensor_v2"), G("no_such_module_ckpt", "T"),
    b"(" + storage_record() + b"Q" + I(0) + T(I(4)) + T(I(1)) + b"\x89" + G("collections", "OrderedDict") + b")Rt",
    D()) + b"R")


@pytest.mark.parametrize("case", ["pickled_module_under_model", "subclass_type_in_state_dict", "dropped_extra_state"])
def test_output_does_not_drop_a_guard_inside_the_root(cli, tmp_path, case):
    """A failing import inside the root (module class, subclass type, _extra_state) that stops an unsafe load before a payload outside it must not be dropped."""
    if case == "pickled_module_under_model":
        body = PROTO2 + D((U("model"), _GUARD_MODULE), _PAYLOAD) + b"."
        args = ["convert"]
    elif case == "subclass_type_in_state_dict":
        body = PROTO2 + D((U("state_dict"), D((U("w"), _GUARD_SUBCLASS))), _PAYLOAD) + b"."
        args = ["convert"]
    else:
        sd = D((U("w"), tensor()), (U("blk._extra_state"), G("no_such_module_ckpt", "guard")))
        body = PROTO2 + D((U("state_dict"), sd), _PAYLOAD) + b"."
        args = ["drop"]
    src = zip_file(tmp_path / "guarded.pth", body)
    out = tmp_path / "out.pth"
    extra = ["blk._extra_state"] if args[0] == "drop" else []
    result = cli(args[0], src, *extra, "-o", out)
    assert_clean(result)
    assert full_load(src, tmp_path) == "0"  # the input stops at its failing import: m.f never runs
    if result.code == 0:
        assert full_load(out, tmp_path) == "0", "the output calls m.f, which its input never reached"


# ---- 2. silent wrong data in .pth outputs ------------------------------------------------------

def test_views_of_one_untyped_storage_keep_their_own_dtypes(cli, tmp_path):
    """A float8_e4m3fn tensor and its float8_e5m2 view (one UntypedStorage, as torch saves them) keep their dtypes in a .pth output."""
    w = torch.linspace(-1, 1, 8).to(torch.float8_e4m3fn)
    src, out = tmp_path / "f8.pth", tmp_path / "out.pth"
    torch.save({"a": w, "b": w.view(torch.float8_e5m2), "c": w.view(torch.uint16)}, src)
    assert cli("convert", src, "-o", out).code == 0
    got = torch.load(out, weights_only=True)
    assert {k: v.dtype for k, v in got.items()} == {"a": torch.float8_e4m3fn, "b": torch.float8_e5m2, "c": torch.uint16}


def test_dtype_cast_leaves_what_is_outside_the_state_dict_alone(cli, tmp_path, net):
    """--dtype bf16 casts the state dict only: an optimizer's step counter (257.0) must not become bf16 (256.0)."""
    opt = torch.optim.Adam(net.parameters())
    net(torch.randn(2, 3, 5, 5)).sum().backward()
    opt.step()
    state = opt.state_dict()
    for entry in state["state"].values():
        entry["step"] = torch.tensor(257.0)
    src, out = tmp_path / "train.pth", tmp_path / "bf16.pth"
    torch.save({"state_dict": net.state_dict(), "optimizer": state}, src)
    assert cli("convert", src, "-o", out, "--dtype", "bf16").code == 0
    got = torch.load(out, weights_only=True)
    assert got["state_dict"]["conv.weight"].dtype == torch.bfloat16
    step = got["optimizer"]["state"][0]["step"]
    assert step.dtype == torch.float32 and step.item() == 257.0, (step.dtype, step.item())


def test_tensor_attributes_survive_a_pth_round_trip(cli, tmp_path):
    """A tensor with a Python attribute (saved by torch via _rebuild_from_type_v2 with state) keeps it in a .pth output."""
    t = torch.arange(4.0)
    t.scale_hint = "per-row"
    src, out = tmp_path / "attr.pth", tmp_path / "out.pth"
    torch.save({"w": t}, src)
    assert torch.load(src, weights_only=True)["w"].__dict__ == {"scale_hint": "per-row"}
    assert cli("convert", src, "-o", out).code == 0
    assert torch.load(out, weights_only=True)["w"].__dict__ == {"scale_hint": "per-row"}


def test_untyped_storage_of_odd_size_converts(cli, tmp_path):
    """A uint16 tensor over a 5-byte UntypedStorage (torch writes and reads it) converts to .pth without the catch-all."""
    storage = torch.UntypedStorage(5)
    t = torch.tensor([], dtype=torch.uint16).set_(storage, 0, (2,), (1,))
    t.fill_(7)
    src, out = tmp_path / "odd.pth", tmp_path / "out.pth"
    torch.save({"w": t}, src)
    assert torch.equal(torch.load(src, weights_only=True)["w"], t)
    result = cli("convert", src, "-o", out)
    assert result.code == 0, result.err
    assert torch.equal(torch.load(out, weights_only=True)["w"], t)


def test_typed_and_untyped_records_of_one_storage_are_read(cli, tmp_path):
    """torch saves a float8 tensor and its uint8 view as UntypedStorage + ByteStorage records of one key; torch reads it, so must we."""
    w = torch.linspace(-1, 1, 8).to(torch.float8_e4m3fn)
    src = tmp_path / "mixed.pth"
    torch.save({"f8": w, "raw": w.view(torch.uint8)}, src)
    assert _load(src)[0]
    assert cli("inspect", src).code == 0


# ---- 3. diff says "identical" for different tensors --------------------------------------------

def test_diff_sees_quantization_parameters(cli, tmp_path):
    """Two qint8 tensors with the same integers but different scale/zero point are not identical."""
    a = torch.quantize_per_tensor(torch.randn(4, 3), 0.1, 0, torch.qint8)
    b = torch._make_per_tensor_quantized_tensor(a.int_repr(), 0.5, 3)
    torch.save({"q": a}, tmp_path / "a.pth")
    torch.save({"q": b}, tmp_path / "b.pth")
    result = cli("diff", tmp_path / "a.pth", tmp_path / "b.pth", "--json")
    assert result.code == 1 and not result.json()["identical"], result.out


def test_diff_atol_sees_imaginary_parts(cli, tmp_path):
    """Complex tensors that differ by 4 in their imaginary part differ beyond --atol 1e-3."""
    torch.save({"c": torch.tensor([1 + 1j, 2 + 2j])}, tmp_path / "a.pth")
    torch.save({"c": torch.tensor([1 + 5j, 2 + 2j])}, tmp_path / "b.pth")
    result = cli("diff", tmp_path / "a.pth", tmp_path / "b.pth", "--atol", "1e-3", "--json")
    assert result.code == 1 and not result.json()["identical"], result.out


# ---- 4. merge: non-tensor entries and dtypes it cannot copy ------------------------------------

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


def test_merge_into_a_quantized_template_is_one_line(cli, tmp_path):
    """merge float.pth --into quantized.pth (same shapes): refused with one line, never the catch-all."""
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
        ok, why = _load(out)
        assert ok, f"exit 0, but torch.load cannot read the output: {why}"


# ---- 5. inputs torch writes today --------------------------------------------------------------

class _SharedBlock(nn.Module):
    def __init__(self):
        super().__init__()
        block = nn.Linear(2, 2)
        self.enc = block
        self.dec = block


def test_pickled_module_with_a_shared_submodule_lists_every_name(cli, tmp_path):
    """torch.save(model) where one submodule is registered twice: the names are model.state_dict()'s, all four."""
    model = _SharedBlock()
    src = tmp_path / "shared.pth"
    torch.save(model, src)
    result = cli("inspect", src, "--json")
    assert result.code == 0, result.err
    assert [t["name"] for t in result.json()["tensors"]] == list(model.state_dict())


def test_ao_quantized_state_dict_is_found_without_root(cli, tmp_path):
    """The state_dict of a torch.ao.quantization-converted model (dtype and packed-params entries beside tensors) is read without --root ''."""
    import torch.ao.quantization as tq

    model = nn.Sequential(tq.QuantStub(), nn.Linear(4, 2), tq.DeQuantStub()).eval()
    model.qconfig = tq.get_default_qconfig("fbgemm")
    prepared = tq.prepare(model)
    prepared(torch.randn(8, 4))
    src = tmp_path / "ao.pth"
    torch.save(tq.convert(prepared).state_dict(), src)
    assert _load(src)[0]
    result = cli("inspect", src, "--json")
    assert result.code == 0, result.err


def test_sharded_bin_extra_state_is_carried_or_reported(cli, tmp_path):
    """A sharded .bin whose shard holds a._extra_state: the .pth output carries it, or the report names it as left out."""
    folder = tmp_path / "sharded"
    folder.mkdir()
    torch.save({"a.weight": torch.ones(2), "a._extra_state": b"fp8-meta"}, folder / "m-1.bin")
    torch.save({"b.weight": torch.zeros(2)}, folder / "m-2.bin")
    (folder / "m.bin.index.json").write_text(json.dumps(
        {"metadata": {}, "weight_map": {"a.weight": "m-1.bin", "b.weight": "m-2.bin"}}))
    out = tmp_path / "out.pth"
    result = cli("convert", folder / "m.bin.index.json", "-o", out, "--json")
    assert result.code == 0, result.err
    got = torch.load(out, weights_only=True)
    assert got.get("a._extra_state") == b"fp8-meta" or "a._extra_state" in result.out, (list(got), result.out)


# ---- 6. errors that do not name the file -------------------------------------------------------

def test_safetensors_refusals_name_the_input(cli, tmp_path):
    """Refusing a quantized tensor for a .safetensors output: the one line names the input file."""
    q = torch.quantize_per_tensor(torch.randn(2), 0.1, 0, torch.qint8)
    src = tmp_path / "q.pth"
    torch.save({"w": q}, src)
    assert_one_error_line(cli("convert", src, "-o", tmp_path / "q.safetensors"), str(src))


# ---- 7. calls torch refuses that the reader accepts (and the writer makes loadable) ------------

@pytest.mark.parametrize("call", [
    pytest.param(G("torch._utils", "_rebuild_parameter") + T(tensor(), b"\x88", G("collections", "OrderedDict") + b")R",
                                                             D((U("x"), I(1)))) + b"R", id="rebuild_parameter_with_4_args"),
    pytest.param(G("torch._utils", "_rebuild_parameter_with_state") + T(tensor(), b"\x88", G("collections", "OrderedDict")
                                                                        + b")R") + b"R", id="with_state_without_state"),
])
def test_rebuilders_take_torchs_arguments_only(cli, tmp_path, call):
    """A rebuild call torch.load refuses (wrong arity) is refused, not rewritten into one torch loads."""
    src = zip_file(tmp_path / "arity.pth", PROTO2 + D((U("w"), call)) + b".")
    assert not _load(src)[0]
    assert_one_error_line(cli("convert", src, "-o", tmp_path / "out.pth"), str(src))
