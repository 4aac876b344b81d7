"""The pickler's plain-tensor records: their opcodes are kept per layout (storage class, location,
size, offset, shape, stride), a bounded number of layouts; past the bound they are made again,
the same bytes."""

from __future__ import annotations

import io

import torch

from ckptsurgery.io import open_checkpoint
from ckptsurgery.io import pickler
from ckptsurgery.io.torch_zip import write_torch


def test_views_at_many_offsets_past_the_kept_layouts(tmp_path, monkeypatch):
    flat = torch.arange(64, dtype=torch.float32)
    sd = {f"v{i}": flat[i : i + 4] for i in range(40)}  # one storage, 40 offsets: 40 layouts
    sd["w"] = torch.ones(2, 3)
    torch.save(sd, tmp_path / "views.pth")
    with open_checkpoint(str(tmp_path / "views.pth")) as ckpt:
        kept = io.BytesIO()
        write_torch(kept, ckpt.tensors)
        monkeypatch.setattr(pickler, "_LAYOUTS_KEPT", 3)
        bounded = io.BytesIO()
        write_torch(bounded, ckpt.tensors)
    assert bounded.getvalue() == kept.getvalue()
    loaded = torch.load(io.BytesIO(bounded.getvalue()), weights_only=True)
    assert list(loaded) == list(sd)
    for name, tensor in sd.items():
        assert torch.equal(loaded[name], tensor)
    assert loaded["v0"].untyped_storage().data_ptr() == loaded["v39"].untyped_storage().data_ptr()
