"""Shape adapters for `merge --into TEMPLATE --on-mismatch adapt`: a pretrained tensor fitted to
the changed model's shape by the rule the field uses for its kind (the rules are chosen in
core.adapt_rules). Each is computed in float32 and written in the template's dtype.

- position: timm's `resample_abs_pos_embed` — prefix tokens kept, the grid resampled bicubic with
  antialiasing (torch's `interpolate`, align_corners=False).
- rows: token embeddings and output rows — the rows both have kept, new rows the mean of the old
  ones, extra rows cut; a bias likewise.
- channels: timm's `adapt_input_conv`, generalised — to 1 channel the sum over the channels, to N
  the channels repeated cyclically and scaled by I/N.
"""

from __future__ import annotations

from ..core import AdaptRule
from ..io import TensorRef
from ..io.model import computed_tensor


def adapt_position(pos, prefix: int, old_grid: tuple[int, int], new_grid: tuple[int, int]):
    """[1, P+H·W, D] or [P+H·W, D] -> the same with H'·W' grid tokens (float32)."""
    import torch
    import torch.nn.functional as F

    flat = pos.dim() == 2
    pos = pos.reshape(1, -1, pos.shape[-1])
    head, grid = pos[:, :prefix], pos[:, prefix:].float()  # the prefix tokens as they are
    dim = grid.shape[-1]
    grid = grid.reshape(1, old_grid[0], old_grid[1], dim).permute(0, 3, 1, 2)
    grid = F.interpolate(grid, size=new_grid, mode="bicubic", antialias=True, align_corners=False)
    grid = grid.permute(0, 2, 3, 1).reshape(1, -1, dim).to(pos.dtype)
    out = torch.cat([head, grid], dim=1) if prefix else grid
    return out[0] if flat else out


def adapt_rows(t, rows: int):
    """First dimension resized to `rows`: the rows both have, then the mean of the old rows."""
    import torch

    if rows <= t.shape[0]:
        return t[:rows]  # the rows kept as they are (cast once, to the template's dtype)
    fill = t.float().mean(dim=0, keepdim=True).to(t.dtype).expand(rows - t.shape[0], *t.shape[1:])
    return torch.cat([t, fill], dim=0)


def adapt_channels(w, channels: int):
    """A convolution's weight [O, I, k...] for `channels` inputs: summed over I for 1, else the I
    channels repeated cyclically to `channels` and scaled by I/channels — for a multiple of I (or
    1) the layer answers an input whose channels are all equal as before."""
    w = w.float()
    old = w.shape[1]
    if channels == 1:
        return w.sum(dim=1, keepdim=True)
    repeats = -(-channels // old)
    return w.repeat(1, repeats, *([1] * (w.dim() - 2)))[:, :channels] * (old / channels)


def adapted(rule: AdaptRule, source: TensorRef, template: TensorRef, position: tuple | None = None) -> TensorRef:
    """`source` fitted to the template's shape by `rule`, computed when written, in the template's dtype."""

    def make():
        import torch

        from ..io.tensors import as_torch, to_bytes

        values = as_torch(source)
        if rule is AdaptRule.POSITION:
            out = adapt_position(values, *position)
        elif rule is AdaptRule.ROWS:
            out = adapt_rows(values, template.shape[0])
        else:
            out = adapt_channels(values, template.shape[1])
        return to_bytes(out.reshape(template.shape).to(getattr(torch, template.dtype.name)).contiguous())

    return computed_tensor(template.shape, template.dtype, make)
