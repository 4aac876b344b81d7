"""task-arithmetic (Ilharco et al. 2022, https://arxiv.org/abs/2212.04089): base + λ·Σ wᵢ(θᵢ − base)."""

from ._parameters import DENSITY, SCALE, WEIGHTS
from ._task_arithmetic import NORMALIZE_OFF, RESCALE_OFF, TOGGLES, TaskArithmetic


class TaskArithmeticMerge(TaskArithmetic):
    name = "task-arithmetic"
    summary = "base + λ·Σ wᵢδᵢ, where δᵢ = θᵢ − base"
    parameters = (WEIGHTS, DENSITY, SCALE, NORMALIZE_OFF, RESCALE_OFF, *TOGGLES)
    listing_order = 20
    differs = "takes --density and --rescale, as mergekit does, and, as there, they change nothing (nothing is sparsified)"
