"""Failing tests for the findings of a second adversarial review (the ordering rule for
placeholders, _rebuild_from_type_v2, storages recorded as two types, the module walk, merge and
--dtype). Each test is one bug; they are expected to fail until the bug is fixed."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import warnings

import pytest
import torch

from test_hostile_opcodes import (
    D, G, I, PROTO2, T, U, assert_clean, assert_one_error_line, latin1_bytes, legacy_file, storage_record, tensor,
    zip_file,
)

warnings.filterwarnings("ignore", message=".*(ComplexHalf|quantiz|Casting complex|TypedStorage).*")

_UNSAFE = """
import sys, torch
try:
    torch.load(sys.argv[1], weights_only=False)
except Exception as e:
    print(type(e).__name__)
"""


def fires(path, marker) -> bool:
    """Plain torch.load(weights_only=False) of `path` in a fresh interpreter: did the payload run?"""
    if os.path.exists(marker):
        os.unlink(marker)
    subprocess.run([sys.executable, "-c", _UNSAFE, str(path)], capture_output=True, text=True, timeout=120,
                   cwd=os.path.dirname(str(marker)))
    return os.path.exists(marker)


def payload(marker) -> bytes:
    return G("posix", "system") + T(U(f"touch {marker}")) + b"R"


def _rebuild_v2(record: bytes, shape=(4,), requires_grad=False) -> bytes:
    return (G("torch._utils", "_rebuild_tensor_v2") + b"(" + record + b"Q" + I(0) + T(*map(I, shape)) + T(I(1))
            + (b"\x88" if requires_grad else b"\x89") + G("collections", "OrderedDict") + b")R" + b"tR")


def _int_tensor_requiring_grad(key: str = "1") -> bytes:
    """An int64 tensor saved with requires_grad=True: torch.load raises on it (ints cannot require grad)."""
    return _rebuild_v2(storage_record(U(key), 4, G("torch", "LongStorage")), requires_grad=True)


def _tensor_with_state(state: bytes) -> bytes:
    """_rebuild_from_type_v2(_rebuild_tensor_v2, torch.Tensor, args, state)."""
    return (G("torch._tensor", "_rebuild_from_type_v2") + T(
        G("torch._utils", "_rebuild_tensor_v2"), G("torch", "Tensor"),
        b"(" + storage_record() + b"Q" + I(0) + T(I(4)) + T(I(1)) + b"\x89" + G("collections", "OrderedDict") + b")Rt",
        state) + b"R")


_STORAGES = {"0": bytes(16), "1": bytes(32)}


# ---- 1. the ordering rule sees failing imports only, not failing calls ---------------------------

def _guarded(case: str, marker) -> tuple[bytes, list[str]]:
    """(data.pkl, command) for an input whose unsafe load raises on a guard before its payload."""
    if case == "int_tensor_requiring_grad_dropped":
        sd = D((U("guard"), _int_tensor_requiring_grad()), (U("w"), tensor()))
        return PROTO2 + D((U("state_dict"), sd), (U("x"), payload(marker))) + b".", ["drop", "guard"]
    if case == "bad_device_extra_state_dropped":  # torch.device('bogus') raises
        sd = D((U("w"), tensor()), (U("a._extra_state"), G("torch", "device") + T(U("bogus")) + b"R"))
        return PROTO2 + D((U("state_dict"), sd), (U("x"), payload(marker))) + b".", ["drop", "a._extra_state"]
    if case == "raising_placeholder_call_dropped":  # builtins.int("x") raises; the name itself imports fine
        sd = D((U("w"), tensor()), (U("a._extra_state"), G("builtins", "int") + T(U("x")) + b"R"))
        body = D((U("arch"), G("builtins", "int")), (U("state_dict"), sd), (U("x"), payload(marker)))
        return PROTO2 + body + b".", ["drop", "a._extra_state"]
    if case == "renamed_guard_moves_after_payload":  # renamed keys go after the unrenamed _extra_state
        sd = D((U("guard"), _int_tensor_requiring_grad()), (U("p._extra_state"), payload(marker)))
        return PROTO2 + D((U("state_dict"), sd)) + b".", ["rename", "--map", "MAP"]
    assert case == "module_root_replaced"  # a pickled "module" whose attribute raises, replaced by its state dict
    module = (G("types", "SimpleNamespace") + b")\x81" + D(
        (U("_parameters"), D((U("w"), tensor()))), (U("_buffers"), D()), (U("_modules"), D()),
        (U("cache"), _int_tensor_requiring_grad())) + b"b")
    body = D((U("arch"), G("types", "SimpleNamespace")), (U("model"), module), (U("x"), payload(marker)))
    return PROTO2 + body + b".", ["convert"]


@pytest.mark.parametrize("case", ["int_tensor_requiring_grad_dropped", "bad_device_extra_state_dropped",
                                  "raising_placeholder_call_dropped", "renamed_guard_moves_after_payload",
                                  "module_root_replaced"])
def test_output_does_not_skip_a_call_that_stops_the_inputs_unsafe_load(cli, tmp_path, case):
    """An unsafe load also stops at a call that raises: an edit must not drop or move it before a payload that stays."""
    marker = tmp_path / "FIRED"
    body, command = _guarded(case, marker)
    src = zip_file(tmp_path / "guarded.pth", body, _STORAGES)
    (tmp_path / "map.json").write_text(json.dumps({"guard": "zz"}))
    command = [str(tmp_path / "map.json") if a == "MAP" else a for a in command]
    assert not fires(src, marker), "the input's unsafe load must stop before its payload"
    out = tmp_path / "out.pth"
    result = cli(command[0], src, *command[1:], "-o", out)
    assert_clean(result)
    if result.code == 0:
        assert not fires(out, marker), "the output runs posix.system, which the input's unsafe load never reached"


def test_convert_does_not_repair_a_storage_location_torch_cannot_restore(cli, tmp_path):
    """A storage tagged 'nosuchdevice' stops every torch.load of the input; a plain convert must not retag it 'cpu' and let the payload after it run."""
    marker = tmp_path / "FIRED"
    record = b"(" + U("storage") + G("torch", "FloatStorage") + U("0") + U("nosuchdevice") + I(4) + b"t"
    body = PROTO2 + D((U("state_dict"), D((U("w"), tensor(record=record)))), (U("x"), payload(marker))) + b"."
    src = zip_file(tmp_path / "loc.pth", body)
    assert not fires(src, marker)
    out = tmp_path / "out.pth"
    result = cli("convert", src, "-o", out)
    assert_clean(result)
    if result.code == 0:
        assert not fires(out, marker), "convert made the input loadable, and its payload runs"


def test_convert_does_not_drop_a_tensor_state_torch_refuses(cli, tmp_path):
    """_rebuild_from_type_v2 with state () raises in torch ('Invalid serialized state'); convert must not drop it as empty and let the payload run."""
    marker = tmp_path / "FIRED"
    body = PROTO2 + D((U("state_dict"), D((U("w"), _tensor_with_state(b")")))), (U("x"), payload(marker))) + b"."
    src = zip_file(tmp_path / "state.pth", body)
    assert not fires(src, marker)
    out = tmp_path / "out.pth"
    result = cli("convert", src, "-o", out)
    assert_clean(result)
    if result.code == 0:
        assert not fires(out, marker), "the output loads where the input raised, and runs posix.system"


# ---- 2. the ordering rule is not applied to every input ------------------------------------------

def test_sharded_bin_input_keeps_the_ordering_rule(cli, tmp_path):
    """A shard whose failing import guards a payload: dropping the guard from the sharded input must be refused like for a single file."""
    marker = tmp_path / "FIRED"
    folder = tmp_path / "sharded"
    folder.mkdir()
    body = PROTO2 + D((U("w"), tensor()), (U("g"), G("no_such_module_ckpt", "Guard")), (U("p"), payload(marker))) + b"."
    shard = zip_file(folder / "m-1.bin", body)
    (folder / "m.bin.index.json").write_text(json.dumps({"metadata": {}, "weight_map": {"w": "m-1.bin"}}))
    assert not fires(shard, marker)
    out = tmp_path / "out.pth"
    result = cli("drop", folder / "m.bin.index.json", "g", "-o", out)
    assert_clean(result)
    if result.code == 0:
        assert not fires(out, marker), "the output runs the payload the shard's failing import guarded"


@pytest.mark.parametrize("mode", ["union_on_conflict_first", "into_with_parameter_state"])
def test_merge_applies_the_ordering_rule_to_every_source(cli, tmp_path, mode):
    """A second source whose failing import guards a payload: merge must not carry the payload without the guard (only the base's placeholders are checked today)."""
    marker = tmp_path / "FIRED"
    guard_type = (G("torch._tensor", "_rebuild_from_type_v2") + T(
        G("torch._utils", "_rebuild_tensor_v2"), G("no_such_module_ckpt", "T"),
        b"(" + storage_record() + b"Q" + I(0) + T(I(4)) + T(I(1)) + b"\x89" + G("collections", "OrderedDict") + b")Rt",
        D()) + b"R")
    out = tmp_path / "out.pth"
    if mode == "union_on_conflict_first":
        a = zip_file(tmp_path / "a.pth", PROTO2 + D((U("w"), tensor()), (U("g._extra_state"), latin1_bytes(b"x"))) + b".")
        b = zip_file(tmp_path / "b.pth", PROTO2 + D((U("w2"), tensor()), (U("g._extra_state"), G("no_such_module_ckpt", "Guard")),
                                                   (U("p._extra_state"), payload(marker))) + b".")
        args = ["merge", a, b, "--on-conflict", "first", "-o", out]
    else:
        param = (G("torch._utils", "_rebuild_parameter_with_state")
                 + T(tensor("1"), b"\x88", G("collections", "OrderedDict") + b")R", D((U("hook"), payload(marker)))) + b"R")
        b = zip_file(tmp_path / "b.pth", PROTO2 + D((U("a"), guard_type), (U("w"), param)) + b".", {"0": bytes(16), "1": bytes(16)})
        template = zip_file(tmp_path / "t.pth", PROTO2 + D((U("w"), tensor())) + b".")
        args = ["merge", b, "--into", template, "-o", out]
    assert not fires(b, marker)
    result = cli(*args)
    assert_clean(result)
    if result.code == 0:
        assert not fires(out, marker), "the merged output runs the payload its source's failing import guarded"


# ---- 3. one storage recorded as two typed storages ------------------------------------------------

@pytest.mark.parametrize("layout", ["zip_byte_then_float", "zip_untyped_v3_then_float", "legacy_float_then_byte"])
def test_storage_recorded_as_two_types_reads_as_torch_reads_it(cli, tmp_path, layout):
    """torch keeps the first record's typed storage for a key, so a later _rebuild_tensor_v2 gets the first dtype; inspect must show torch's dtypes."""
    if layout == "legacy_float_then_byte":
        first = storage_record(U("0"), 4, G("torch", "FloatStorage"), extra=b"N")
        second = storage_record(U("0"), 16, G("torch", "ByteStorage"), extra=b"N")
        body = PROTO2 + D((U("a"), _rebuild_v2(first, (4,))), (U("b"), _rebuild_v2(second, (4,)))) + b"."
        src = legacy_file(tmp_path / "two.pth", body, storages={"0": bytes(range(16))})
    else:
        if layout == "zip_byte_then_float":
            a = _rebuild_v2(storage_record(U("0"), 16, G("torch", "ByteStorage")), (16,))
        else:
            a = (G("torch._utils", "_rebuild_tensor_v3") + b"(" + storage_record(U("0"), 16, G("torch.storage", "UntypedStorage"))
                 + b"Q" + I(0) + T(I(16)) + T(I(1)) + b"\x89" + G("collections", "OrderedDict") + b")R"
                 + G("torch", "float8_e4m3fn") + b"tR")
        b = _rebuild_v2(storage_record(U("0"), 4, G("torch", "FloatStorage")), (4,))
        src = zip_file(tmp_path / "two.pth", PROTO2 + D((U("a"), a), (U("b"), b)) + b".", {"0": bytes(range(16))})
    expected = {k: str(v.dtype).removeprefix("torch.") for k, v in torch.load(src, weights_only=True).items()}
    result = cli("inspect", src, "--json")
    assert_clean(result)
    if result.code == 0:
        got = {t["name"]: t["dtype"] for t in result.json()["tensors"]}
        assert got == expected, f"torch reads {expected}, ckptsurgery {got}"


# ---- 4. --dtype and storages shared with what must not be cast -----------------------------------

def test_dtype_cast_leaves_a_quantized_tensors_scales_alone(cli, tmp_path):
    """--dtype fp16 keeps q (reported in kept_dtype), so its per-channel scales — one storage with a float64 state-dict tensor — must not be cast either."""
    scales = torch.tensor([0.1, 0.2, 0.3], dtype=torch.float64)
    q = torch.quantize_per_channel(torch.randn(3, 4), scales, torch.tensor([0, 1, 2]), 0, torch.qint8)
    src, out = tmp_path / "q.pth", tmp_path / "out.pth"
    torch.save({"q": q, "q_scales": scales}, src)
    result = cli("convert", src, "-o", out, "--dtype", "fp16", "--json")
    assert_clean(result)
    if result.code == 0:
        assert "q" in result.json()["kept_dtype"]
        got = torch.load(out, weights_only=True)["q"]
        assert torch.equal(got.dequantize(), q.dequantize()), "q's values changed although it kept its dtype"


# ---- 4b. the module walk's bound is far above what a small file suggests ----------------------------

def test_a_small_pickled_module_dag_costs_bounded_work(tmp_path):
    """A 5 KB pickled module whose 21 levels each register one child twice expands to 2M names (23 s, 1 GB, a 96 MB .pth): refuse it quickly."""
    def module(children: bytes) -> bytes:
        return (G("mymodel", "Block") + b")\x81" + D((U("_parameters"), D((U("w"), tensor()))), (U("_buffers"), D()),
                                                     (U("_modules"), children)) + b"b")
    body = module(D()) + b"q\x00"
    for level in range(1, 21):
        body = module(D((U("a"), body), (U("b"), b"h" + bytes([level - 1])))) + b"q" + bytes([level])
    src = zip_file(tmp_path / "dag.pth", PROTO2 + body + b".")
    assert os.path.getsize(src) < 8000
    try:
        run = subprocess.run([sys.executable, "-m", "ckptsurgery", "convert", src, "-o", str(tmp_path / "out.pth")],
                             capture_output=True, text=True, timeout=8)
    except subprocess.TimeoutExpired:
        pytest.fail("an 8 KB file kept ckptsurgery busy for more than 8 seconds")
    assert run.returncode in (0, 1) and "CKPTSURGERY_DEBUG" not in run.stderr, run.stderr


# ---- 5. errors that do not name the file, refusals that contradict themselves --------------------

def test_module_walk_errors_name_the_file(cli, tmp_path):
    """A pickled module with a parameter name that is not valid Unicode: the one error line names the file."""
    module = (G("mymodel", "Net") + b")\x81" + D((U("_parameters"), D((U("w\udc80"), tensor()))),
                                                (U("_buffers"), D()), (U("_modules"), D())) + b"b")
    src = zip_file(tmp_path / "surrogate.pth", PROTO2 + module + b".")
    assert_one_error_line(cli("inspect", src), str(src))


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


# ---- 6. diff and inspect ----------------------------------------------------------------------

def test_diff_atol_sees_imaginary_parts_beside_a_nan_real_part(cli, tmp_path):
    """complex(nan, 1) vs complex(nan, 5) differ by 4 in the imaginary part: not 'identical' under --atol 1e-3."""
    torch.save({"c": torch.tensor([complex(float("nan"), 1.0)])}, tmp_path / "a.pth")
    torch.save({"c": torch.tensor([complex(float("nan"), 5.0)])}, tmp_path / "b.pth")
    result = cli("diff", tmp_path / "a.pth", tmp_path / "b.pth", "--atol", "1e-3", "--json")
    assert result.code == 1 and not result.json()["identical"], result.out


def test_inspect_names_a_storage_entry_by_torchs_type(cli, tmp_path):
    """A storage saved beside the state dict is listed as torch's type (torch.FloatStorage / UntypedStorage), never as ckptsurgery's StorageHandle."""
    src = tmp_path / "storage.pth"
    torch.save({"state_dict": {"w": torch.ones(2)}, "typed": torch.FloatStorage([1.0, 2.0])}, src)
    result = cli("inspect", src, "--json")
    assert result.code == 0, result.err
    assert "StorageHandle" not in json.dumps(result.json()["extras"]), result.json()["extras"]
