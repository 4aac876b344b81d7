"""Merge methods as pure per-key math, with mergekit 0.1.5's semantics (docs/merging.md): one module
per method, each a `MergeMethod` subclass that declares itself — its name, whether it needs a
base, how many models, its parameters (`Parameter`: type, default, range, help, whether it may
vary per model or per tensor) — and gives its math for one chunk of one key.

Adding a method is adding one file here: the registry (`METHODS`) lists this package's modules
and takes every method declared in them; the merge command's choices and options
(`merge_options`), the checks of what it is given (`resolve_parameters`) and docs/merging.md's
table (`methods_table`, `python -m ckptsurgery.ops.methods`) follow from the declarations.
Modules named _like_this hold what methods share: the chunked merge of one key (_base), bytes
<-> numpy (_codec), the parameters (_parameters), generalized task arithmetic (_task_arithmetic).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from . import _registry
from ._base import CHUNK, MergeMethod, Read, tensor_seed
from ._codec import decode, encode
from ._parameters import REQUIRED, Parameter, Parameters, Range, option_of
from ._registry import MergeOption
from ._task_arithmetic import Consensus, Sparsification, TaskArithmetic

METHODS: dict[str, type[MergeMethod]] = _registry.discover(__name__, __path__)
# mergekit's names of parameters, where ours differ (a recipe's `weight: 0.5` is our --weights, `lambda` --scale)
MERGEKIT_PARAMETERS = {"weight": "weights", "lambda": "scale"}


def method_of_mergekit(name: str) -> str:
    """Our name of mergekit's `merge_method: NAME` (model_stock -> model-stock); not checked."""
    return name.replace("_", "-")

PARAMETERS: dict[str, Parameter] = _registry.parameters_by_name(METHODS)  # every method's, by name


def resolve_parameters(method_name: str, models: int, given: Mapping[str, Any]) -> Parameters:
    """The parameters `method_name` merges `models` models with, checked: `given` maps a
    parameter's name to its raw value, None when not given (e.g. {"weights": "2,1", "density":
    0.5, "scale": None, "t": None, "seed": None}). Raises a UsageError naming what is wrong."""
    return _registry.resolve_parameters(METHODS, method_name, models, given)


def merge_options() -> list[MergeOption]:
    """The merge command's options for the methods' parameters (see MergeOption), in --help's order."""
    return _registry.merge_options(METHODS)


def methods_table() -> str:
    """docs/merging.md's tables of the methods and their parameters, markers included."""
    return _registry.methods_table(METHODS)


__all__ = [
    "CHUNK",
    "MERGEKIT_PARAMETERS",
    "METHODS",
    "PARAMETERS",
    "REQUIRED",
    "Consensus",
    "MergeMethod",
    "MergeOption",
    "Parameter",
    "Parameters",
    "Range",
    "Read",
    "Sparsification",
    "TaskArithmetic",
    "decode",
    "encode",
    "merge_options",
    "method_of_mergekit",
    "methods_table",
    "option_of",
    "resolve_parameters",
    "tensor_seed",
]
