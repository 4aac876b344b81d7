"""Failing tests for the findings of a third adversarial review (calls that raise in torch but
not in ckptsurgery's reader: an unsafe load of the input stops there, a rewrite that drops them
does not). Each test is one bug; they are expected to fail until the bug is fixed."""

from __future__ import annotations

import warnings

import pytest

from test_hostile_opcodes import D, G, I, PROTO2, T, U, assert_clean, storage_record, tensor, zip_file
from test_review2_findings import fires, payload

warnings.filterwarnings("ignore", message=".*(ComplexHalf|quantiz|Casting complex|TypedStorage).*")


def _param_with_state(state: bytes) -> bytes:
    """_rebuild_parameter_with_state(zeros(4), True, OrderedDict(), state)."""
    return (G("torch._utils", "_rebuild_parameter_with_state")
            + T(tensor("1"), b"\x88", G("collections", "OrderedDict") + b")R", state) + b"R")


def _tensor_with_state(state: bytes) -> bytes:
    """_rebuild_from_type_v2(_rebuild_tensor_v2, torch.Tensor, args, state)."""
    return (G("torch._tensor", "_rebuild_from_type_v2") + T(
        G("torch._utils", "_rebuild_tensor_v2"), G("torch", "Tensor"),
        b"(" + storage_record(U("1")) + b"Q" + I(0) + T(I(4)) + T(I(1)) + b"\x89"
        + G("collections", "OrderedDict") + b")Rt", state) + b"R")


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


def test_torch_device_metal_is_refused_like_torch_refuses_it(cli, tmp_path):
    """torch 2.13 raises on torch.device('metal') (DEVICE_TYPES lists it): dropping such an _extra_state must not free the payload."""
    guard = G("torch", "device") + T(U("metal")) + b"R"
    _dropped_guard_fires(cli, tmp_path, D((U("w"), tensor()), (U("a._extra_state"), guard)), "a._extra_state")


def test_rebuild_from_type_v2_fallback_is_an_event(cli, tmp_path):
    """_rebuild_from_type_v2(torch.Size, torch.Tensor, ((1,),), None) raises in torch (Size has no as_subclass) but its fallback InertObject is no event: dropping it frees the payload."""
    guard = G("torch._tensor", "_rebuild_from_type_v2") + T(G("torch", "Size"), G("torch", "Tensor"), T(T(I(1))), b"N") + b"R"
    _dropped_guard_fires(cli, tmp_path, D((U("w"), tensor()), (U("a._extra_state"), guard)), "a._extra_state")


OBJECT_STATES = {
    "parameter_sets_data": _param_with_state(D((U("data"), I(1)))),  # param.data = 1: TypeError
    "parameter_non_str_key": _param_with_state(D((I(1), I(2)))),  # setattr(p, 1, 2): TypeError
    "tensor_sets_requires_grad": _tensor_with_state(D((U("requires_grad"), U("x")))),  # TypeError
}


@pytest.mark.parametrize("case", sorted(OBJECT_STATES))
def test_object_state_whose_setattr_torch_refuses_is_refused(cli, tmp_path, case):
    """torch._utils._set_obj_state setattr()s each state entry and raises on these; _object_state accepts any dict, so dropping the tensor frees the payload."""
    _dropped_guard_fires(cli, tmp_path, D((U("w"), tensor()), (U("guard"), OBJECT_STATES[case])), "guard")


@pytest.mark.parametrize("where", ["set_member", "dict_key"])
def test_hashing_an_unhashable_placeholder_object_stops_the_load(cli, tmp_path, where):
    """set([Namespace()]) / {Namespace(): 1} raise in torch (Namespace is unhashable) but not on an InertObject; the Namespace kept elsewhere meets its events, so dropping the guard frees the payload."""
    ns = G("argparse", "Namespace") + b")\x81" + b"q\x07"  # NEWOBJ, memo 7
    guard = G("builtins", "set") + T(b"]" + ns + b"a") + b"R" if where == "set_member" else b"}" + ns + I(1) + b"s"
    args = (U("args"), b"h\x07")  # the same Namespace, kept in the output
    _dropped_guard_fires(cli, tmp_path, D((U("w"), tensor()), (U("a._extra_state"), guard)), "a._extra_state", (args,))
