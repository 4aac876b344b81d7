"""breadcrumbs-ties: breadcrumbs' band of magnitudes, then TIES' sign election (summed, not divided:
mergekit's `normalize: false`)."""

from ._task_arithmetic import Consensus
from .breadcrumbs import Breadcrumbs


class BreadcrumbsTies(Breadcrumbs):
    name = "breadcrumbs-ties"
    summary = ("δᵢ cut as breadcrumbs cuts it; the sign of Σ wᵢδᵢ elected; the agreeing wᵢδᵢ summed; times λ, "
               "plus base")
    listing_order = 71
    differs = 'as breadcrumbs'
    consensus = Consensus.SUM
