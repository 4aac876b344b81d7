"""ram (Reinforced Agent Merging, https://arxiv.org/abs/2601.13572): each entry of the merged delta
is the one model's that changed it, or the mean of those that did."""

from __future__ import annotations

from ...errors import UsageError
from ._base import MergeMethod
from ._parameters import Range
from ._task_arithmetic import EPSILON

RAM_EPSILON = EPSILON.variant(default=1e-5, range=Range(lambda v: v >= 0, "0 or more"))


class Ram(MergeMethod):
    name = "ram"
    summary = ("base + Σ δᵢ over the models whose |δᵢ| > ε there, divided by their count when more than one "
               "(unique entries whole, shared ones averaged)")
    parameters = (RAM_EPSILON,)
    needs_base = True
    listing_order = 90

    @classmethod
    def check(cls, values: dict) -> None:
        if isinstance(values["epsilon"], list):
            raise UsageError(f"--method {cls.name} takes one --epsilon, not one per model")

    def _counted(self, values: list):
        """δᵢ where it counts (0 elsewhere), whether it counts, and how many count per entry: in
        scratch arrays (the next chunk's call overwrites them)."""
        import numpy as np

        base = values[0]
        n = len(base)
        deltas = [np.subtract(theta, base, out=self.scratch(i, n)) for i, theta in enumerate(values[1:])]
        counts = [np.greater(np.abs(d, out=self.scratch(len(deltas), n)), self.params["epsilon"],
                             out=self.buffer(("count", i), n, bool)) for i, d in enumerate(deltas)]
        contributors = self.buffer("contributors", n, np.int64)
        contributors[:] = 0
        for d, c in zip(deltas, counts):
            np.multiply(d, c, out=d)
            contributors += c
        return deltas, counts, contributors

    def _lambdas(self) -> list[float]:
        return [1.0] * self.models

    def merge_chunk(self, j: int, values: list, out):
        """The same operations, in the same dtypes, as Σ d·(unique·λ) + d·shared over fresh arrays
        (unique·λ a float64 product, so d·(unique·λ) is float64 and d·shared the wide dtype)."""
        import numpy as np

        deltas, _, contributors = self._counted(values)
        n = len(values[0])
        unique = np.equal(contributors, 1, out=self.buffer("unique", n, bool))
        shared = np.greater(contributors, 1, out=self.buffer("shared", n, bool))
        divisor = np.maximum(contributors, 1, out=self.buffer("divisor", n, np.int64))
        wide_divisor = self.scratch(len(deltas), n)
        np.copyto(wide_divisor, divisor, casting="unsafe")  # as .astype(wide)
        shared = np.divide(shared, wide_divisor, out=self.scratch(len(deltas) + 1, n))
        merged = self.scratch(len(deltas) + 2, n)
        merged[:] = 0
        lifted = self.buffer("lifted", n, np.float64)
        product = self.scratch(len(deltas), n)
        for d, lam in zip(deltas, self._lambdas()):
            np.multiply(unique, lam, out=lifted)
            np.multiply(d, lifted, out=lifted)
            np.add(lifted, np.multiply(d, shared, out=product), out=lifted)
            np.add(merged, lifted, out=merged)
        return np.add(values[0], merged, out=out)
