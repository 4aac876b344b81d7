"""Failing tests for the findings of a fourth adversarial review. Each test is one bug; they are
expected to fail until the bug is fixed."""

from __future__ import annotations

import warnings

import pytest
import torch

from test_hostile_opcodes import D, G, I, PROTO2, T, U, assert_clean, zip_file
from test_review2_findings import fires, payload

warnings.filterwarnings("ignore", message=".*(TypedStorage).*")


def _tensor_on(location: str) -> bytes:
    """_rebuild_tensor_v2(('storage', FloatStorage, '0', location, 4), 0, (4,), (1,), False, OrderedDict())."""
    record = b"(" + U("storage") + G("torch", "FloatStorage") + U("0") + U(location) + I(4) + b"t"
    return (G("torch._utils", "_rebuild_tensor_v2") + b"(" + record + b"Q" + I(0) + T(I(4)) + T(I(1))
            + b"\x89" + G("collections", "OrderedDict") + b")R" + b"tR")


@pytest.mark.parametrize("location", ["fpga", "xla", "cuda"])
def test_storage_location_torch_cannot_restore_is_not_rewritten_to_cpu_ahead_of_a_payload(cli, tmp_path, location):
    """A storage on a device plain torch.load cannot restore stops the input's unsafe load; the .pth copy (rewritten to 'cpu') runs the payload after it."""
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
