"""The registry: every method declared in a module of this package, found by listing the package
(a new file is a new method), and what is derived from the declarations — the one check of the
parameters given to a method, the merge command's options, and the docs' table."""

from __future__ import annotations

import importlib
import pkgutil
from collections.abc import Mapping
from typing import Any, NamedTuple

from ...errors import UsageError
from ._base import MergeMethod
from ._parameters import SHARED, Parameter, Parameters, option_of


def discover(package: str, path: list[str]) -> dict[str, type[MergeMethod]]:
    """The methods declared in the package's modules (not those named _like_this), by name, in
    their listing order. Two methods of one name, or two parameters of one name, are refused."""
    found: dict[str, type[MergeMethod]] = {}
    for module_info in pkgutil.iter_modules(path):
        if module_info.name.startswith("_"):
            continue
        module = importlib.import_module(f"{package}.{module_info.name}")
        for value in vars(module).values():
            if (isinstance(value, type) and issubclass(value, MergeMethod) and value.__module__ == module.__name__
                    and value.__dict__.get("name")):  # its own name: not a base imported or inherited
                if value.name in found:
                    raise ValueError(f"two merge methods named {value.name}: {found[value.name]} and {value}")
                found[value.name] = value
    methods = dict(sorted(found.items(), key=lambda item: (item[1].listing_order, item[0])))
    for method in methods.values():
        _check_declaration(method)
    parameters_by_name(methods)  # refuses two declarations of one name
    return methods


def _check_declaration(method: type[MergeMethod]) -> None:
    if not callable(getattr(method, "merge_chunk", None)):
        raise ValueError(f"merge method {method.name}: no merge_chunk(j, values, out), the math of one chunk")
    names = [p.name for p in method.parameters]
    if len(set(names)) != len(names) or method.min_models < 1 or (
            method.max_models is not None and method.max_models < method.min_models):
        raise ValueError(f"merge method {method.name}: parameters {names}, models {method.min_models}..{method.max_models}")


def parameters_by_name(methods: Mapping[str, type[MergeMethod]]) -> dict[str, Parameter]:
    """Every parameter some method takes, by name: the shared ones in their order, then the others
    in the order the methods list them."""
    found: dict[str, Parameter] = {}
    for method in methods.values():
        for parameter in method.parameters:
            if found.setdefault(parameter.name, parameter.origin).origin is not parameter.origin:
                raise ValueError(f"two parameters named {parameter.name}: declare it once and share it (or a "
                                 f"variant of it)")
    order = [p.name for p in SHARED if p.name in found] + [name for name in found if name not in {p.name for p in SHARED}]
    return {name: found[name] for name in order}


def takers(methods: Mapping[str, type[MergeMethod]], parameter: str) -> list[str]:
    return [name for name, method in methods.items() if any(p.name == parameter for p in method.parameters)]


def variants(methods: Mapping[str, type[MergeMethod]], parameter: str) -> list[tuple[Parameter, list[str]]]:
    """How the methods take a parameter: each distinct (range, default) with the methods taking it so."""
    found: list[tuple[Parameter, list[str]]] = []
    for name, method in methods.items():
        for p in method.parameters:
            if p.name != parameter:
                continue
            same = next((f for f in found if f[0].range_wording() == p.range_wording()
                         and f[0].default_wording() == p.default_wording()), None)
            if same is None:
                found.append((p, [name]))
            else:
                same[1].append(name)
    return found


def _range_and_default(methods: Mapping[str, type[MergeMethod]], name: str) -> tuple[str, str]:
    """The range and default columns of a parameter: per group of methods when variants differ."""
    found = variants(methods, name)
    if len(found) == 1:
        p = found[0][0]
        return p.range_wording(), p.default_wording()
    ranges, defaults = ({wording(p) for p, _ in found} for wording in (Parameter.range_wording, Parameter.default_wording))
    return tuple(words.pop() if len(words) == 1 else "; ".join(f"{wording(p)} ({', '.join(m)})" for p, m in found)
                 for words, wording in ((ranges, Parameter.range_wording), (defaults, Parameter.default_wording)))


def resolve_parameters(methods: Mapping[str, type[MergeMethod]], method_name: str, models: int,
                       given: Mapping[str, Any]) -> Parameters:
    """The parameters `method_name` merges `models` models with: `given` maps a parameter's name
    to its raw value (None: not given; "2,1,1" or a list for a per-model one; "0,0.5,1" or a list
    for a gradient over the layers, held in `Parameters.gradients`). A parameter the method does
    not take is refused, naming the methods that do; a wrong count of models, a missing required
    one, a value out of range too (one UsageError line)."""
    method = methods[method_name]
    taken = {p.name for p in method.parameters}
    for name, value in given.items():
        if value is not None and name not in taken:
            raise UsageError(f"{option_of(name)} applies to --method {', '.join(takers(methods, name))} only, "
                             f"not to {method_name}")
    if models < method.min_models or (method.max_models is not None and models > method.max_models):
        if method.max_models == method.min_models:
            wanted = f"exactly {method.min_models}"
        elif method.max_models is None:
            wanted = f"at least {method.min_models}"
        else:
            wanted = f"from {method.min_models} to {method.max_models}"
        raise UsageError(f"--method {method_name} takes {wanted} model(s), not {models}"
                         + (" (the base is --base)" if method.needs_base else ""))
    gradients = {p.name: g for p in method.parameters if (g := p.gradient(given.get(p.name))) is not None}
    values = {p.name: p.resolve(gradients[p.name][0] if p.name in gradients else given.get(p.name), method_name, models)
              for p in method.parameters}  # a gradient's first value until the layers are known
    method.check(values)
    return Parameters(method_name, values, method.parameters, models=models, check=method.check, gradients=gradients)


# ---- what the command line and the docs show ---------------------------------------------------

GRADIENT_HELP = "A comma list (0,0.5,1) is a gradient over the layers, as in a recipe."


class MergeOption(NamedTuple):
    """One option of the merge command for a method parameter: `parameter` is the keyword the
    library's merge takes; `type` what the command line parses the value as: a flag pair for a
    bool, else the text, which the declaration parses ("2,1,1" per model, "0,0.5,1" a gradient,
    and a list where none is taken refused in its own words)."""

    option: str
    parameter: str
    type: type  # bool: a flag pair, --name/--no-name
    metavar: str
    help: str


def merge_options(methods: Mapping[str, type[MergeMethod]]) -> list[MergeOption]:
    """The merge command's parameter options, each with a help text built from its declaration."""
    options = []
    for name, p in parameters_by_name(methods).items():
        found = variants(methods, name)
        does = f"{p.help} {GRADIENT_HELP}" if p.takes_gradient else p.help
        if len(found) == 1:
            text = (f"{does} Taken by --method {', '.join(takers(methods, name))}; {p.range_wording()}; "
                    f"{'required' if p.required else 'default ' + p.default_wording()}.")
        else:
            text = f"{does} Taken by --method " + "; ".join(
                f"{', '.join(m)} ({v.range_wording()}; {'required' if v.required else 'default ' + v.default_wording()})"
                for v, m in found) + "."
        options.append(MergeOption(p.option, name, bool if p.type is bool else str, p.metavar, text))
    return options


def _models_wording(method: type[MergeMethod]) -> str:
    if method.max_models == method.min_models:
        return f"exactly {method.min_models}"
    if method.max_models is None:
        return f"≥ {method.min_models}"
    return f"{method.min_models} to {method.max_models}"


TABLE_START = ("<!-- methods table: generated from ckptsurgery/ops/methods/ by `python -m ckptsurgery.ops.methods`;"
               " tests/test_method_registry.py holds this page to it -->")
TABLE_END = "<!-- end methods table -->"


def _cell(text: str) -> str:
    """Text in a cell of a markdown table: its | (an absolute value) escaped."""
    return text.replace("|", "\\|")


def methods_table(methods: Mapping[str, type[MergeMethod]]) -> str:
    """docs/merging.md's tables of the methods and their parameters, between its markers."""
    lines = [TABLE_START, "| method | computes | `--base` | models | parameters (default) | where it differs from mergekit 0.1.5 |",
             "|---|---|---|---|---|---|"]
    for name, method in methods.items():
        taken = ", ".join(f"`{p.option}` ({p.default_wording()})" for p in method.parameters)
        lines.append(f"| `{name}` | {_cell(method.summary)} | {'required' if method.needs_base else 'optional' if method.base_optional else 'refused'} "
                     f"| {_models_wording(method)} | {taken or '—'} | {_cell(method.differs) or '—'} |")
    lines += ["", "| parameter | range | default | per model | gradient | methods | what it does |",
              "|---|---|---|---|---|---|---|"]
    for name, p in parameters_by_name(methods).items():
        shown = f"`{p.option}/--no-{p.option[2:]}`" if p.type is bool else f"`{p.option} {p.metavar}`"
        per_model = "one or each" if p.broadcast else "yes" if p.per_model else "no"
        # over the layers: a comma list on the command line; per model, only a recipe says it
        gradient = "yes" if p.takes_gradient else "in a recipe" if p.per_model else "no"
        range_, default = _range_and_default(methods, name)
        lines.append(f"| {shown} | {range_} | {default} | {per_model} | {gradient} "
                     f"| {', '.join(takers(methods, name))} | {p.help} |")
    return "\n".join([*lines, TABLE_END]) + "\n"
