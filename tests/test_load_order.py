"""The ordering rule: an unsafe load of an edited output (plain `torch.load(weights_only=False)`)
never gets further than the same load of its input. A failing import, or a call that raises in
torch, stops the input's load before a payload that comes after it; no edit (drop, rename, a
root replaced, a storage retagged, a merge of several sources, a sharded input) may drop, move
or repair that guard and so let the payload run. Files are assembled opcode by opcode with the
builders of test_hostile_opcodes; the unsafe loads run in a fresh interpreter."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import warnings

import pytest
import torch

from test_hostile_opcodes import (
    D, G, I, PROTO2, T, U, assert_clean, full_load, latin1_bytes, rebuild_v2, storage_record, tensor, zip_file,
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


def _int_tensor_requiring_grad(key: str = "1") -> bytes:
    """An int64 tensor saved with requires_grad=True: torch.load raises on it (ints cannot require grad)."""
    return rebuild_v2(storage_record(U(key), 4, G("torch", "LongStorage")), requires_grad=True)


def _tensor_with_state(state: bytes, key: str = "0") -> bytes:
    """_rebuild_from_type_v2(_rebuild_tensor_v2, torch.Tensor, args, state), its storage under `key`."""
    return (G("torch._tensor", "_rebuild_from_type_v2") + T(
        G("torch._utils", "_rebuild_tensor_v2"), G("torch", "Tensor"),
        b"(" + storage_record(U(key)) + b"Q" + I(0) + T(I(4)) + T(I(1)) + b"\x89"
        + G("collections", "OrderedDict") + b")Rt", state) + b"R")


_STORAGES = {"0": bytes(16), "1": bytes(32)}


# ---- a failing import that guards a payload -------------------------------------------------

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
    """A second source whose failing import guards a payload: merge must not carry the payload without the guard (once only the base's placeholders were checked)."""
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


# ---- a call that raises in torch guards a payload as well ------------------------------------

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


def _param_with_state(state: bytes) -> bytes:
    """_rebuild_parameter_with_state(zeros(4), True, OrderedDict(), state)."""
    return (G("torch._utils", "_rebuild_parameter_with_state")
            + T(tensor("1"), b"\x88", G("collections", "OrderedDict") + b")R", state) + b"R")


def _dropped_guard_fires(cli, tmp_path, state_dict: bytes, drop: str, extra: tuple = ()) -> None:
    """An input {"state_dict": ..., *extra, "x": payload} whose unsafe load stops on a guard in
    the state dict; `drop` removes the guard. The output must not run the payload."""
    marker = tmp_path / "FIRED"
    body = PROTO2 + D((U("state_dict"), state_dict), *extra, (U("x"), payload(marker))) + b"."
    src = zip_file(tmp_path / "in.pth", body, {"0": bytes(16), "1": bytes(16)})
    assert not fires(src, marker), "the input's unsafe load must stop before its payload"
    out = tmp_path / "out.pth"
    result = cli("drop", src, drop, "-o", out)
    assert_clean(result)
    if result.code == 0:
        assert not fires(out, marker), "the output runs posix.system, which the input's unsafe load never reached"


def test_dropping_a_metal_device_guard_does_not_free_the_payload(cli, tmp_path):
    """torch 2.13 raises on torch.device('metal') (DEVICE_TYPES lists it): dropping such an _extra_state must not free the payload."""
    guard = G("torch", "device") + T(U("metal")) + b"R"
    _dropped_guard_fires(cli, tmp_path, D((U("w"), tensor()), (U("a._extra_state"), guard)), "a._extra_state")


def test_dropping_a_rebuild_from_type_v2_torch_refuses_does_not_free_the_payload(cli, tmp_path):
    """_rebuild_from_type_v2(torch.Size, torch.Tensor, ((1,),), None) raises in torch (Size has no as_subclass): its inert fallback must still count as a guard, so dropping it does not free the payload."""
    guard = G("torch._tensor", "_rebuild_from_type_v2") + T(G("torch", "Size"), G("torch", "Tensor"), T(T(I(1))), b"N") + b"R"
    _dropped_guard_fires(cli, tmp_path, D((U("w"), tensor()), (U("a._extra_state"), guard)), "a._extra_state")


OBJECT_STATES = {
    "parameter_sets_data": _param_with_state(D((U("data"), I(1)))),  # param.data = 1: TypeError
    "parameter_non_str_key": _param_with_state(D((I(1), I(2)))),  # setattr(p, 1, 2): TypeError
    "tensor_sets_requires_grad": _tensor_with_state(D((U("requires_grad"), U("x"))), key="1"),  # TypeError
}


@pytest.mark.parametrize("case", sorted(OBJECT_STATES))
def test_dropping_an_object_state_torch_cannot_set_does_not_free_the_payload(cli, tmp_path, case):
    """torch._utils._set_obj_state setattr()s each state entry and raises on these: dropping the tensor must not free the payload (any dict was once accepted as a state)."""
    _dropped_guard_fires(cli, tmp_path, D((U("w"), tensor()), (U("guard"), OBJECT_STATES[case])), "guard")


@pytest.mark.parametrize("where", ["set_member", "dict_key"])
def test_dropping_a_hash_of_an_unhashable_object_does_not_free_the_payload(cli, tmp_path, where):
    """set([Namespace()]) / {Namespace(): 1} raise in torch (Namespace is unhashable) though not on an inert placeholder; with the Namespace kept elsewhere in the output, dropping the guard must not free the payload."""
    ns = G("argparse", "Namespace") + b")\x81" + b"q\x07"  # NEWOBJ, memo 7
    guard = G("builtins", "set") + T(b"]" + ns + b"a") + b"R" if where == "set_member" else b"}" + ns + I(1) + b"s"
    args = (U("args"), b"h\x07")  # the same Namespace, kept in the output
    _dropped_guard_fires(cli, tmp_path, D((U("w"), tensor()), (U("a._extra_state"), guard)), "a._extra_state", (args,))


# ---- storages torch cannot restore guard a payload ----------------------------------------------

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


def _tensor_on(location: str) -> bytes:
    """_rebuild_tensor_v2(('storage', FloatStorage, '0', location, 4), 0, (4,), (1,), False, OrderedDict())."""
    record = b"(" + U("storage") + G("torch", "FloatStorage") + U("0") + U(location) + I(4) + b"t"
    return (G("torch._utils", "_rebuild_tensor_v2") + b"(" + record + b"Q" + I(0) + T(I(4)) + T(I(1))
            + b"\x89" + G("collections", "OrderedDict") + b")R" + b"tR")


@pytest.mark.parametrize("location", ["fpga", "xla", "cuda"])
def test_storage_location_torch_cannot_restore_is_not_rewritten_to_cpu_ahead_of_a_payload(cli, tmp_path, location):
    """A storage on a device plain torch.load cannot restore stops the input's unsafe load; the .pth copy must not be rewritten to 'cpu' and so run the payload after it."""
    if location == "cuda" and torch.cuda.is_available():
        pytest.skip("torch.load restores cuda storages here")
    marker = tmp_path / "FIRED"
    body = PROTO2 + D((U("state_dict"), D((U("w"), _tensor_on(location)))), (U("x"), payload(marker))) + b"."
    src = zip_file(tmp_path / "in.pth", body, {"0": bytes(16)})
    assert not fires(src, marker), "the input's unsafe load must stop at the storage, before its payload"
    out = tmp_path / "out.pth"
    result = cli("convert", src, "-o", out)
    assert_clean(result)
    assert not (result.code == 0 and fires(out, marker)), "the output runs a payload the input never reaches"
