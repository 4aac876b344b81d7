"""slerp: spherical linear interpolation between two models, along the arc between them as
flattened vectors (mergekit's slerp: the raw tensors, not normalised, take the coefficients)."""

from __future__ import annotations

import math

from ._base import MergeMethod
from ._parameters import T

DOT_THRESHOLD = 0.9995  # beyond it (either sign) the two are treated as collinear
NORM_EPS = 1e-8  # a norm at most this is taken as 1


class Slerp(MergeMethod):
    name = "slerp"
    summary = ("sin((1−t)θ)/sin θ · a + sin(tθ)/sin θ · b, θ the angle between the first model a (t = 0) and the "
               "second b (t = 1); (1−t)·a + t·b when they are nearly collinear")
    parameters = (T,)
    without_base = "slerp goes from the first model, t=0, to the second, t=1"
    min_models = max_models = 2
    listing_order = 60
    differs = 'the first model is t = 0 (mergekit: the base); no --base'
    collinear = False  # fell back to linear interpolation

    @property
    def note(self) -> str | None:
        return "nearly collinear: interpolated linearly" if self.collinear else None

    def measure(self) -> None:
        import numpy as np

        squares_a = squares_b = dot = 0.0
        for j in range(self.chunks):  # each chunk's sums in the wide dtype, the chunks' in float64
            start, count = self.span(j)
            a, b = self.reads[0](start, count), self.reads[1](start, count)
            squares_a += float(np.dot(a, a))
            squares_b += float(np.dot(b, b))
            dot += float(np.dot(a, b))
        norm_a, norm_b = math.sqrt(squares_a), math.sqrt(squares_b)
        norm_a = norm_a if norm_a > NORM_EPS else 1.0
        norm_b = norm_b if norm_b > NORM_EPS else 1.0
        cos = dot / (norm_a * norm_b)
        cos = min(1.0, max(-1.0, cos)) if math.isfinite(cos) else cos
        t = self.params["t"]
        if not abs(cos) <= DOT_THRESHOLD:  # nan included: no angle to follow
            self.collinear, self.coefficients = True, (1 - t, t)
        else:
            theta = math.acos(cos)
            self.coefficients = (math.sin((1 - t) * theta) / math.sin(theta), math.sin(t * theta) / math.sin(theta))

    def merge_chunk(self, j: int, values: list, out):
        import numpy as np

        a, b = self.coefficients
        result = np.multiply(values[0], a, out=out)
        result += np.multiply(values[1], b, out=self.scratch(0, len(values[1])))
        return result
