"""How a tensor is cut into the vectors a spherical or per-filter method works on: the whole tensor
flattened, its rows (along its last dimension), or its columns (along its first) — and sums over
each vector, made chunk by chunk (`sums`), held one number per vector."""

from __future__ import annotations


class Vectors:
    """The vectors of a tensor of `shape` (numel elements): `how` is "whole", "rows" or "columns".
    A tensor of fewer than two dimensions is one vector whichever way it is cut."""

    def __init__(self, shape: tuple[int, ...], numel: int, how: str):
        self.numel = numel
        if len(shape) < 2 or how == "whole":
            self.how, self.count = "whole", 1
        elif how == "rows":
            self.how, self.length = "rows", shape[-1]
            self.count = numel // shape[-1] if shape[-1] else 0
        else:
            self.how, self.stride = "columns", numel // shape[0] if shape[0] else 0
            self.count = self.stride

    def ids(self, start: int, count: int):
        """The vector of each element of [start, start + count)."""
        import numpy as np

        index = np.arange(start, start + count, dtype=np.int64)
        if self.how == "rows":
            return index // self.length
        return index % self.stride

    def sums(self, start: int, values):
        """Σ of `values` (elements [start, start + len)) per vector, in float64: an array of `count`."""
        import numpy as np

        if self.how == "whole":
            return np.array([values.sum(dtype=np.float64)])
        return np.bincount(self.ids(start, len(values)), weights=values.astype(np.float64, copy=False),
                           minlength=self.count)

    def multiply(self, start: int, values, per_vector):
        """`values` (elements [start, start + len)) times their vector's value, in place: what
        `values * spread(...)` gives, without an index per element (rows: a row at a time, broadcast)."""
        import numpy as np

        if self.how == "whole":
            values *= per_vector[0]
            return values
        if self.how == "columns":
            values *= self.spread(start, len(values), per_vector)
            return values
        per_vector = np.asarray(per_vector)
        length, count = self.length, len(values)
        row, offset = divmod(start, length)
        head = min(count, length - offset) if offset else 0
        if head:
            values[:head] *= per_vector[row]
            row += 1
        whole = (count - head) // length
        if whole:
            body = values[head:head + whole * length].reshape(whole, length)
            body *= per_vector[row:row + whole, None]
            row += whole
        tail = head + whole * length
        if tail < count:
            values[tail:] *= per_vector[row]
        return values

    def spread(self, start: int, count: int, per_vector):
        """A value per vector as a value per element of [start, start + count)."""
        import numpy as np

        if self.how == "whole":
            return per_vector[0]
        return np.asarray(per_vector)[self.ids(start, count)]
