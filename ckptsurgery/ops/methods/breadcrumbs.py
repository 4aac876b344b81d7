"""breadcrumbs (Davari & Belilovsky 2023, https://arxiv.org/abs/2312.06795): each delta's largest
entries dropped as outliers (γ) and its smallest ones (all but D), the rest summed."""

from ._parameters import DENSITY, SCALE, WEIGHTS
from ._task_arithmetic import (
    GAMMA,
    NORMALIZE_OFF,
    RESCALE_OFF,
    TOGGLES,
    Sparsification,
    TaskArithmetic,
)


class Breadcrumbs(TaskArithmetic):
    name = "breadcrumbs"
    summary = ("δᵢ cut to the ⌊D·n⌋ entries after its top ⌊γ·n⌋ by magnitude (fewer outliers when D needs them); "
               "base + λ·Σ wᵢδᵢ")
    parameters = (WEIGHTS, DENSITY, GAMMA, SCALE, NORMALIZE_OFF, RESCALE_OFF, *TOGGLES)
    listing_order = 70
    differs = "equal magnitudes ranked in row-major order; mergekit's sort leaves it to the sort"
    sparsification = Sparsification.MAGNITUDE_OUTLIERS
