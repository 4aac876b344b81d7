"""Merge methods as pure per-tensor math, with mergekit 0.1.5's semantics (docs/merging.md).

A `TensorMerge` merges one key: it reads the models' values chunk by chunk (CHUNK elements at a
time, widened to float32, or float64 when an input is float64) and returns any chunk of the
result on its own, so a writer streams the output and memory holds a few chunks — plus, for
TIES, one whole delta at a time while its magnitude cut is found. What a chunk needs from the
whole tensor (TIES' cut, DARE's norms, SLERP's angle) is measured once, by `prepare`.

numpy, not torch: the math is elementwise, and torch's import alone takes longer than merging a
1 GB model. Nothing here knows about files or names — apart from the name that seeds DARE's
draws, so that a mask does not depend on the order tensors are computed in, nor on how many
threads or ranks compute them.
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass
from typing import Callable

CHUNK = 1 << 18  # elements of one chunk: 1 MiB of float32 per input, so that a chunk's arrays stay
# in the CPU's cache (2²⁰ took ~30 % longer for task arithmetic on 3 × 1 GB)


@dataclass(frozen=True)
class Method:
    """What a method needs and which of mergekit's generalized-task-arithmetic steps it takes."""

    needs_base: bool
    options: frozenset[str]  # the parameters it accepts, by their option names
    sparsify: str | None = None  # "magnitude" (TIES' top-k) or "random" (DARE's drop)
    elect_sign: bool = False  # TIES' sign consensus
    normalize: bool = False  # divide by the sum of the counted weights
    mean: bool = False  # a weighted mean: the weights must sum to more than zero
    min_models: int = 1
    max_models: int | None = None


METHODS: dict[str, Method] = {
    "linear": Method(False, frozenset({"weights"}), mean=True, min_models=2),
    "task-arithmetic": Method(True, frozenset({"weights", "scale"})),
    "ties": Method(True, frozenset({"weights", "density", "scale"}), sparsify="magnitude",
                   elect_sign=True, normalize=True),
    "dare-linear": Method(True, frozenset({"weights", "density", "scale", "seed"}), sparsify="random"),
    "dare-ties": Method(True, frozenset({"weights", "density", "scale", "seed"}), sparsify="random",
                        elect_sign=True),
    "slerp": Method(False, frozenset({"t"}), min_models=2, max_models=2),
}

SLERP_DOT_THRESHOLD = 0.9995  # beyond it (either sign) the two are treated as collinear
SLERP_NORM_EPS = 1e-8  # a norm at most this is taken as 1
RESCALE_EPS = 1e-7  # DARE leaves a delta unscaled when its L1 norm before or after is below this

# ---- raw little-endian bytes <-> numpy, bfloat16 included ---------------------------------------

_NUMPY = {"float16": "<f2", "float32": "<f4", "float64": "<f8"}


def decode(buffer, dtype: str, wide: str):
    """Values of `dtype` (float16, bfloat16, float32, float64) as a `wide` array (float32 or
    float64). May be a read-only view of `buffer`: callers never write into it."""
    import numpy as np

    if dtype == "bfloat16":  # the upper half of a float32
        values = (np.frombuffer(buffer, "<u2").astype(np.uint32) << 16).view(np.float32)
    else:
        values = np.frombuffer(buffer, _NUMPY[dtype])
    return values if values.dtype == np.dtype(wide) else values.astype(wide)


def encode(values, dtype: str) -> memoryview:
    """`values` rounded to `dtype` as torch's CPU conversion rounds them (to nearest, ties to
    even; every NaN becomes 0xFFFF in bfloat16), as raw little-endian bytes (a view of an array
    made here: no copy when `values` already has that dtype)."""
    import numpy as np

    with np.errstate(all="ignore"):  # beyond float16's range is inf, as in torch: no warning
        if dtype != "bfloat16":
            out = np.ascontiguousarray(values, dtype=_NUMPY[dtype])
        else:
            bits = values.astype(np.float32, copy=False).view(np.uint32)
            out = ((bits + np.uint32(0x7FFF) + ((bits >> 16) & 1)) >> 16).astype("<u2")
            out[np.isnan(values)] = 0xFFFF
    return memoryview(out).cast("B")


# ---- the merge of one key ------------------------------------------------------------------

Read = Callable[[int, int], object]  # (first element, count) -> a wide array of the inputs' values


def tensor_seed(seed: int, name: str, model: int, chunk: int) -> int:
    """The draws of one model's delta for one chunk of one key: SHA-256 of
    "{seed}\\0{model}\\0{name}\\0{chunk}", its first 8 bytes little-endian, top bit cleared."""
    digest = hashlib.sha256(f"{seed}\0{model}\0{name}\0{chunk}".encode("utf-8", "surrogatepass")).digest()
    return int.from_bytes(digest[:8], "little") & (2**63 - 1)


class TensorMerge:
    """One key merged by one method. `reads`: [base, model...] for the methods with a base, else
    [model...]; `numel` elements each. `chunk(j)` is elements [j·CHUNK, (j+1)·CHUNK) of the result."""

    def __init__(self, method: str, params: dict, name: str, reads: list[Read], numel: int, wide: str):
        self.method, self.spec, self.params, self.name = method, METHODS[method], params, name
        self.reads, self.numel, self.wide = reads, numel, wide
        self.weights = params.get("weights")
        self.collinear = False  # slerp fell back to linear interpolation
        self._prepared = False
        self._buffers: dict = {}

    @property
    def chunks(self) -> int:
        return -(-self.numel // CHUNK)

    def span(self, j: int) -> tuple[int, int]:
        start = j * CHUNK
        return start, min(CHUNK, self.numel - start)

    # -- what a chunk needs from the whole tensor, measured once --

    def prepare(self) -> None:
        import numpy as np

        if self._prepared:
            return
        with np.errstate(all="ignore"):  # inf and nan in, inf and nan out, as torch would: no warning
            self._measure()
        self._prepared = True

    def _measure(self) -> None:
        if self.method == "slerp":
            self._measure_angle()
        elif self.spec.sparsify == "magnitude" and self.params["density"] < 1 and self.numel:
            self._find_cuts()
        elif self.spec.sparsify == "random" and self.params["density"] < 1:
            self._measure_drop()

    def _find_cuts(self) -> None:
        """TIES keeps exactly k = max(1, int(density·numel)) entries of each delta: those whose
        magnitude is above the k-th largest, then those equal to it in row-major order until
        there are k. Per model: the cut, how many equal entries to keep, and how many equal
        entries lie in the chunks before each chunk (so any chunk can be computed alone)."""
        import numpy as np

        n = self.numel
        k = max(1, int(self.params["density"] * n))
        self.cuts = []
        for i in range(1, len(self.reads)):
            magnitude = np.empty(n, self.wide)  # the one whole array: filled chunk by chunk
            for s, c in map(self.span, range(self.chunks)):
                np.abs(self._delta(i, s, c, out=magnitude[s:s + c]), out=magnitude[s:s + c])
            magnitude.partition(n - k)  # in place: the k-th largest lands at n - k, larger ones after it
            cut = magnitude[n - k]
            above = int(np.count_nonzero(magnitude[n - k + 1:] > cut))
            equal_total = int(np.count_nonzero(magnitude == cut))
            del magnitude
            if k - above >= equal_total:  # every entry equal to the cut is kept: nothing to count
                self.cuts.append((cut, None, None))
                continue
            equal = []  # equal entries beyond k (ties at the cut): the first ones in row-major order
            for s, c in map(self.span, range(self.chunks)):
                equal.append(int(np.count_nonzero(np.abs(self._delta(i, s, c)) == cut)))
            before = [0, *np.cumsum(equal)[:-1].tolist()]
            self.cuts.append((cut, k - above, before))

    def _delta(self, i: int, start: int, count: int, out=None):
        import numpy as np

        return np.subtract(self.reads[i](start, count), self.reads[0](start, count), out=out)

    def _kept_by_magnitude(self, i: int, j: int, delta):
        import numpy as np

        cut, equal_to_keep, before = self.cuts[i]
        magnitude = np.abs(delta)
        if before is None:
            return np.multiply(delta, magnitude >= cut, out=delta)
        keep = magnitude > cut
        room = equal_to_keep - before[j]
        if room > 0:
            equal = np.flatnonzero(magnitude == cut)[:room]
            keep[equal] = True
        return np.multiply(delta, keep, out=delta)

    def _draw_kept(self, i: int, j: int, count: int):
        """DARE's draws for model i in chunk j: ⌈count/2⌉ raw 64-bit outputs of PCG64 seeded by
        `tensor_seed`, read as little-endian uint32s (the first `count`); an entry is kept where
        its uint32 is below ⌊density·2³²⌋ — a uniform draw below the density, 2⁻³² apart."""
        import numpy as np

        generator = np.random.PCG64(tensor_seed(self.params["seed"], self.name, i, j))
        draws = generator.random_raw((count + 1) // 2).astype("<u8", copy=False).view("<u4")[:count]
        return draws < np.uint32(int(self.params["density"] * 2**32))

    def _dropped(self, i: int, j: int, delta):
        """DARE: the entries of the delta that were kept (the masks drawn by `prepare`); the
        rescale that keeps its L1 norm is applied with the weight."""
        import numpy as np

        return np.multiply(delta, np.unpackbits(self.kept[i][j], count=delta.size).view(bool), out=delta)

    def _measure_drop(self) -> None:
        """DARE rescales the kept entries so that each delta keeps its L1 norm: the norms before
        and after the drop, summed chunk by chunk. The masks are drawn once and kept, a bit per
        entry."""
        import numpy as np

        self.rescale, self.kept = [], []
        for i in range(1, len(self.reads)):
            before = after = 0.0
            masks = []
            for j in range(self.chunks):
                start, count = self.span(j)
                magnitude = np.abs(self._delta(i, start, count, self._scratch(0, count)), out=self._scratch(0, count))
                kept = self._draw_kept(i - 1, j, count)
                before += float(magnitude.sum())
                after += float(np.multiply(magnitude, kept, out=magnitude).sum())
                masks.append(np.packbits(kept))
            self.kept.append(masks)
            self.rescale.append(1.0 if before < RESCALE_EPS or after < RESCALE_EPS else before / after)

    def _measure_angle(self) -> None:
        import numpy as np

        squares_a = squares_b = dot = 0.0
        for j in range(self.chunks):  # each chunk's sums in the wide dtype, the chunks' in float64
            start, count = self.span(j)
            a, b = self.reads[0](start, count), self.reads[1](start, count)
            squares_a += float(np.dot(a, a))
            squares_b += float(np.dot(b, b))
            dot += float(np.dot(a, b))
        norm_a, norm_b = math.sqrt(squares_a), math.sqrt(squares_b)
        norm_a = norm_a if norm_a > SLERP_NORM_EPS else 1.0
        norm_b = norm_b if norm_b > SLERP_NORM_EPS else 1.0
        cos = dot / (norm_a * norm_b)
        cos = min(1.0, max(-1.0, cos)) if math.isfinite(cos) else cos
        t = self.params["t"]
        if not abs(cos) <= SLERP_DOT_THRESHOLD:  # nan included: no angle to follow
            self.collinear, self.coefficients = True, (1 - t, t)
        else:
            theta = math.acos(cos)
            self.coefficients = (math.sin((1 - t) * theta) / math.sin(theta), math.sin(t * theta) / math.sin(theta))

    # -- one chunk --

    def chunk(self, j: int, out=None):
        """Elements [j·CHUNK, (j+1)·CHUNK) of the result, in the wide dtype — into `out` (an
        array of the chunk's length) when given, so that a writer can reuse one buffer."""
        import numpy as np

        self.prepare()
        with np.errstate(all="ignore"):
            result = self._chunk(j, out)
        if j == self.chunks - 1:
            self._buffers.clear()  # the tensor is done: its scratch is not kept for the next
        return result

    def _scratch(self, k: int, count: int):
        """Scratch array k for a chunk of `count` elements, the same memory from chunk to chunk
        (a fresh array per step costs more in page faults than the arithmetic)."""
        import numpy as np

        if k not in self._buffers:
            self._buffers[k] = np.empty(min(CHUNK, self.numel), self.wide)
        return self._buffers[k][:count]

    def _chunk(self, j: int, out):
        import numpy as np

        start, count = self.span(j)
        values = [read(start, count) for read in self.reads]
        if self.method == "linear":  # the weights divided by their sum first, in float64: 1e-50 each is 1/n
            total = math.fsum(self.weights)
            shares = [w / total for w in self.weights]
            result = np.multiply(values[0], shares[0], out=out)
            for x, share in zip(values[1:], shares[1:]):
                result += np.multiply(x, share, out=self._scratch(0, count))
            return result
        if self.method == "slerp":
            a, b = self.coefficients
            result = np.multiply(values[0], a, out=out)
            result += np.multiply(values[1], b, out=self._scratch(0, count))
            return result
        return self._task_arithmetic(j, values[0], values[1:], out)

    def _task_arithmetic(self, j: int, base, thetas, out):
        """δᵢ = θᵢ − base; sparsified; times wᵢ; summed, or summed where its sign is the elected
        one (and for TIES divided by the agreeing weights); times λ; added to the base."""
        import numpy as np

        density = self.params.get("density", 1.0)
        deltas = []
        for i, (theta, w) in enumerate(zip(thetas, self.weights)):
            delta = np.subtract(theta, base, out=self._scratch(i + 1, len(base)))
            if self.spec.sparsify == "magnitude" and density < 1:
                delta = self._kept_by_magnitude(i, j, delta)
            elif self.spec.sparsify == "random" and density < 1:
                delta = self._dropped(i, j, delta)
                w = w * self.rescale[i]
            if w != 1:
                delta *= w  # in scratch: the inputs stay as read
            deltas.append(delta)
        mixed = deltas[0]
        if self.spec.elect_sign:  # the deltas are needed again: the sum goes elsewhere
            mixed = self._scratch(0, len(base))
            mixed[:] = deltas[0]
        for d in deltas[1:]:
            mixed += d
        if self.spec.elect_sign:
            one = np.ones(1, self.wide)[0]
            elected = np.where(mixed >= 0, one, -one)
            mixed[:] = 0
            counted = np.zeros_like(mixed) if self.spec.normalize else None
            counts = self._scratch(len(thetas) + 1, len(base))
            for d, w in zip(deltas, self.weights):
                agrees = np.multiply(d, elected, out=counts) > 0  # same sign; a zero never agrees
                mixed += np.multiply(d, agrees, out=counts)
                if counted is not None:
                    counted += np.multiply(agrees, one * w, out=counts)
            if counted is not None:
                counted[counted == 0] = 1
                mixed /= counted
        scale = self.params.get("scale", 1.0)
        if scale != 1:
            mixed *= scale
        return np.add(base, mixed, out=out)
