"""breadcrumbs-ties: breadcrumbs' band of magnitudes, then TIES' sign election (summed, not divided:
mergekit's `normalize: false`)."""

from ._parameters import DENSITY, SCALE, WEIGHTS
from ._task_arithmetic import (
    GAMMA,
    NORMALIZE_OFF,
    RESCALE_OFF,
    TOGGLES,
    Consensus,
    Sparsification,
    TaskArithmetic,
)


class BreadcrumbsTies(TaskArithmetic):
    name = "breadcrumbs-ties"
    summary = ("δᵢ cut as breadcrumbs cuts it; the sign of Σ wᵢδᵢ elected; the agreeing wᵢδᵢ summed; times λ, "
               "plus base")
    parameters = (WEIGHTS, DENSITY, GAMMA, SCALE, NORMALIZE_OFF, RESCALE_OFF, *TOGGLES)
    listing_order = 71
    differs = 'as breadcrumbs'
    sparsification = Sparsification.MAGNITUDE_OUTLIERS
    consensus = Consensus.SUM
