"""Review of the per-key speed commits (08fd444, a28fe89): hand-made files that the new fast
paths mishandle, or that they leave as exposed as before.

Each test states what is wrong and fails until it is fixed."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file

from conftest import assert_one_error_line
from test_hostile_opcodes import D, G, I, PROTO2, U, checkpoint, tensor, zip_file


# ---- 1. safetensors writer: a zero-element tensor "past" its storage --------------------------

@pytest.mark.parametrize("empty_first", [True, False])
def test_zero_element_tensor_with_far_storage_offset_converts_to_safetensors(cli, tmp_path, empty_first):
    """torch accepts a zero-element view at any storage offset (checkInBoundsForStorage returns
    early for 0 bytes), and so does the reader (`_validate` stops at numel 0). Before 08fd444 the
    safetensors writer copied nothing for it; `_Runs.flush` now calls `MappedFile.view(start, 0)`
    with start = storage offset + 4e9 bytes, which refuses "data ... lies past the end of the file":
    a file torch loads, and ckptsurgery read and wrote before, is now refused by convert."""
    empty = (U("empty"), tensor(numel=4, shape=(0,), stride=(1,), offset=10**9))
    full = (U("w"), tensor(numel=4, shape=(4,), stride=(1,), offset=0))
    entries = (empty, full) if empty_first else (full, empty)
    src = zip_file(tmp_path / "empty_view.pth", PROTO2 + D(*entries) + b".",
                   storages={"0": bytes(range(16))})
    loaded = torch.load(src, weights_only=True)  # torch itself reads it
    assert loaded["empty"].shape == (0,) and loaded["empty"].storage_offset() == 10**9

    assert cli("inspect", src).code == 0  # the reader accepts it
    out = tmp_path / "out.safetensors"
    result = cli("convert", src, "-o", out)
    assert result.code == 0, result.err
    written = load_file(str(out))
    assert written["empty"].shape == (0,)
    assert torch.equal(written["w"], loaded["w"])


# ---- 2. placeholder calls on calls: the callee is not counted as nesting ----------------------

@pytest.mark.parametrize("args", [("inspect",), ("inspect", "--json"), ("convert", "-o", "out.pth")])
def test_chain_of_calls_on_placeholder_results_is_one_clear_line(cli, tmp_path, args):
    """m.n()()()...() 5,000 times (2 bytes a call, as torch's weights-only opcodes allow:
    GLOBAL, EMPTY_TUPLE, REDUCE). Each InertObject holds the previous one as its callee, but
    `load_reduce` records nesting from the arguments only — and since 08fd444 a call without
    arguments is not recorded at all — so the 5,000-deep chain passes MAX_NESTING, and
    `InertObject.qualname()` (reached from describe/extras) recurses 5,000 deep. Result: the
    catch-all "RecursionError: maximum recursion depth exceeded (set CKPTSURGERY_DEBUG=1 ...)"
    instead of the refusal the nesting bound promises. (Pre-existing since call-on-a-call
    support; the speed commit keeps it.)"""
    chain = G("m", "n") + b")R" * 5000
    src = zip_file(tmp_path / "calls.pth", checkpoint((U("x"), chain)))
    argv = [args[0], src, *[str(tmp_path / a) if a.endswith(".pth") else a for a in args[1:]]]
    result = cli(*argv)
    if result.code != 0:
        assert_one_error_line(result, str(src))
    assert "RecursionError" not in result.err


def test_chain_of_calls_with_arguments_is_bounded_too(cli, tmp_path):
    """The same chain with one argument per call (m.n(1)(1)(1)...): the arguments are atoms, so
    each result is recorded at depth 1 whatever its callee's depth."""
    chain = G("m", "n") + (I(1) + b"\x85R") * 5000
    src = zip_file(tmp_path / "calls1.pth", checkpoint((U("x"), chain)))
    result = cli("inspect", src)
    if result.code != 0:
        assert_one_error_line(result, str(src))
    assert "RecursionError" not in result.err
