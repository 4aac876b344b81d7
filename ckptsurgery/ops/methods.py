"""Merge methods as pure per-tensor math, with mergekit 0.1.5's semantics (see docs/merging.md).

Each function takes the models' tensors for one key, already widened to float32 (float64 for
float64 inputs), and returns the merged tensor in that wide dtype; the caller reads the inputs
and writes the result. Nothing here knows about files, names or dtypes on disk — apart from the
name that seeds DARE's random drop, so that a tensor's mask does not depend on the order in
which tensors are computed or on how many threads or ranks compute them.
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass


@dataclass(frozen=True)
class Method:
    """What a method needs and which of mergekit's generalized-task-arithmetic steps it takes."""

    needs_base: bool
    options: frozenset[str]  # the parameters it accepts, by their option names
    sparsify: str | None = None  # "magnitude" (TIES' top-k) or "random" (DARE's drop)
    elect_sign: bool = False  # TIES' sign consensus
    normalize: bool = False  # divide by the sum of the counted weights
    min_models: int = 1
    max_models: int | None = None


METHODS: dict[str, Method] = {
    "linear": Method(False, frozenset({"weights"}), min_models=2),
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


def linear(tensors: list, weights: list[float]):
    """Σ wᵢθᵢ / Σ wᵢ."""
    total = tensors[0] * weights[0]
    for t, w in zip(tensors[1:], weights[1:]):
        total.add_(t, alpha=w)
    return total.div_(math.fsum(weights))


def top_magnitude(delta, density: float):
    """TIES' sparsification: exactly k = max(1, int(density·numel)) entries of largest
    magnitude kept, the rest zeroed, no rescaling. Among equal magnitudes at the cut, the
    earlier entries (row-major) are kept, so the result never depends on a sort's whims."""
    import torch

    n = delta.numel()
    if density >= 1 or n == 0:
        return delta
    k = max(1, int(density * n))
    magnitude = delta.abs().reshape(-1)
    # the k-th largest magnitude: entries above it are in, entries equal to it fill the rest
    cut = torch.kthvalue(magnitude, n - k + 1).values
    keep = magnitude > cut
    missing = k - int(keep.sum())
    if missing > 0:
        keep[torch.nonzero(magnitude == cut).reshape(-1)[:missing]] = True
    return delta * keep.reshape(delta.shape)


def tensor_seed(seed: int, name: str, model: int) -> int:
    """The random stream of one model's delta for one key: 63 bits of
    SHA-256("{seed}\\0{model}\\0{name}"), so it depends on nothing but these three."""
    digest = hashlib.sha256(f"{seed}\0{model}\0{name}".encode("utf-8", "surrogatepass")).digest()
    return int.from_bytes(digest[:8], "little") & (2**63 - 1)


def random_drop(delta, density: float, seed: int):
    """DARE: keep each entry where a uniform draw in [0, 1) is below `density`, then scale the
    kept entries so that the delta keeps its L1 norm (≈ 1/density; left unscaled when either
    norm is below 1e-7, as mergekit does)."""
    import torch

    if density >= 1:
        return delta
    draws = torch.rand(delta.shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float32)
    kept = delta * (draws < density)
    del draws
    before, after = float(delta.abs().sum()), float(kept.abs().sum())
    if before < RESCALE_EPS or after < RESCALE_EPS:
        return kept
    return kept.mul_(before / after)


def task_arithmetic(base, tensors: list, weights: list[float], method: Method, *, density: float = 1.0,
                    scale: float = 1.0, seeds: list[int] | None = None):
    """mergekit's generalized task arithmetic: δᵢ = θᵢ − base, each δᵢ sparsified, times wᵢ;
    summed (task-arithmetic, dare-linear) or, with sign election (ties, dare-ties), summed over
    the entries whose sign agrees with that of Σ wᵢδᵢ (≥ 0 elects +); divided by the counted
    weights for ties; times λ; added to the base."""
    import torch

    deltas = []
    for i, (theta, w) in enumerate(zip(tensors, weights)):
        delta = theta - base
        if method.sparsify == "magnitude":
            delta = top_magnitude(delta, density)
        elif method.sparsify == "random":
            delta = random_drop(delta, density, seeds[i])
        deltas.append(delta.mul_(w))  # every step above made a new tensor: the inputs stay as read
    if not method.elect_sign:
        mixed = deltas[0]
        for d in deltas[1:]:
            mixed.add_(d)
    else:
        total = deltas[0].clone()
        for d in deltas[1:]:
            total.add_(d)
        elected = torch.where(total >= 0, 1.0, -1.0).to(base.dtype)
        del total
        mixed = torch.zeros_like(base)
        counted = torch.zeros_like(base) if method.normalize else None
        for d, w in zip(deltas, weights):
            agrees = torch.sign(d) == elected  # a zero never agrees
            mixed.add_(torch.where(agrees, d, 0.0))
            if counted is not None:
                counted.add_(agrees.to(base.dtype), alpha=w)
        del deltas
        if counted is not None:
            counted[counted == 0] = 1
            mixed.div_(counted)
    if scale != 1:
        mixed.mul_(scale)
    return mixed.add_(base)


def slerp(a, b, t: float) -> tuple[object, bool]:
    """Spherical interpolation of two whole tensors (flattened): `a` at t = 0, `b` at t = 1.
    Returns (result, True) when the two are nearly collinear (|cos| > 0.9995, antipodal too) and
    plain linear interpolation was used instead."""
    import torch

    if a.numel() == 0:
        return a, True
    norm_a, norm_b = float(torch.linalg.vector_norm(a)), float(torch.linalg.vector_norm(b))
    norm_a = norm_a if norm_a > SLERP_NORM_EPS else 1.0
    norm_b = norm_b if norm_b > SLERP_NORM_EPS else 1.0
    # normalised before multiplying, so that the dot product cannot overflow
    dot = float(torch.dot((a / norm_a).reshape(-1), (b / norm_b).reshape(-1)))
    dot = min(1.0, max(-1.0, dot)) if not math.isnan(dot) else dot
    if not abs(dot) <= SLERP_DOT_THRESHOLD:  # nan included: no angle to follow
        return (a * (1 - t)).add_(b, alpha=t), True
    theta = math.acos(dot)
    sin_theta = math.sin(theta)
    return (a * (math.sin((1 - t) * theta) / sin_theta)).add_(b, alpha=math.sin(t * theta) / sin_theta), False
