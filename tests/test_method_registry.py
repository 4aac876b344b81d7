"""The merge methods' registry (ckptsurgery/ops/methods/): a method is one file that declares
itself, and what the command line takes, checks and shows follows from the declarations —
including for a method added as a new file to a copy of the package, run through the real entry
point. Also: the one check of a method's parameters says exactly what it always said, the report
keeps its parameters' order, and docs/merging.md's table is the generated one."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from conftest import assert_one_error_line, load_any

from ckptsurgery.errors import UsageError
from ckptsurgery.ops import methods

ROOT = Path(__file__).resolve().parent.parent


# ---- the registry and what follows from it ---------------------------------------------------

def test_the_registry_finds_every_method_in_its_listing_order():
    assert list(methods.METHODS)[:6] == ["linear", "task-arithmetic", "ties", "dare-linear", "dare-ties", "slerp"]
    assert {"breadcrumbs", "breadcrumbs-ties", "della", "della-linear"} <= set(methods.METHODS)
    assert [m for m, spec in methods.METHODS.items() if spec.needs_base][:4] == [
        "task-arithmetic", "ties", "dare-linear", "dare-ties"]
    ties = methods.METHODS["ties"]
    defaults = {p.name: p.default for p in ties.parameters}
    assert (ties.sparsification, ties.consensus, defaults["normalize"], defaults["rescale"]) == (
        methods.Sparsification.MAGNITUDE, methods.Consensus.SUM, True, False)
    assert methods.METHODS["dare-ties"].sparsification == "random"  # str enums: compare as their values


def test_every_declared_parameter_is_an_option_of_merge():
    """The CLI's merge takes each parameter some method declares, as the type the declaration
    gives, and its --method choices are the registry's."""
    import typer

    from ckptsurgery.cli import app

    command = typer.main.get_command(app).get_command(None, "merge")
    options = {opt: param for param in command.params for opt in getattr(param, "opts", ())}
    declared = methods.merge_options()
    assert [o.parameter for o in declared][:8] == ["weights", "density", "scale", "t", "seed", "normalize", "rescale",
                                                   "int8_mask"]
    for option in declared:
        assert option.option in options, option
        typed = {"bool": "boolean"}.get(option.type.__name__, option.type.__name__)  # typer's "float", "int", "str"
        assert options[option.option].type.name == typed, option
        if option.type is bool:  # a flag pair: not given is None, the method's default
            assert "--no-" + option.option[2:] in options[option.option].secondary_opts
    assert list(options["--method"].type.choices) == list(methods.METHODS)
    by_name = {o.parameter: o for o in declared}
    assert by_name["density"].help.endswith("; in (0, 1], one or one per model; default 1.")
    assert "Taken by --method task-arithmetic, ties, dare-linear, dare-ties, " in by_name["density"].help
    assert by_name["t"].help.endswith("Taken by --method slerp (in [0, 1]; required); nearswap (a finite number; "
                                      "required).")
    # the text, which the declaration parses: "2,1" per model, "0,0.5,1" a gradient, a list for the seed refused
    assert by_name["weights"].type is str and by_name["seed"].type is str and by_name["t"].type is str
    assert by_name["t"].help.startswith("slerp: where between") and "A comma list (0,0.5,1) is a gradient over the " \
        "layers" in by_name["t"].help and "gradient" not in by_name["density"].help
    assert by_name["normalize"].type is bool and "linear, ties, della (true or false; default true)" in by_name[
        "normalize"].help


@pytest.mark.parametrize("method", list(methods.METHODS))
def test_each_method_takes_its_declared_parameters_and_refuses_the_others(method):
    spec = methods.METHODS[method]
    models = spec.min_models
    for name, parameter in methods.PARAMETERS.items():
        one = 0.5 if parameter.required else parameter.default  # a value in range
        value = (",".join([str(one)] * models) if parameter.per_model else
                 True if parameter.type is bool else 1 if parameter.type is int else one)
        given = {name: value}
        taken = {p.name: p for p in spec.parameters}
        if name in taken:
            required = {p.name: 0.5 for p in spec.parameters if p.required and p.name != name}
            assert name in methods.resolve_parameters(method, models, {**required, **given}).report()
        else:
            takers = ", ".join(m for m, s in methods.METHODS.items() if name in {p.name for p in s.parameters})
            with pytest.raises(UsageError, match=f"^{methods.option_of(name)} applies to --method {takers} only, "
                                                 f"not to {method}$"):
                methods.resolve_parameters(method, models, given)


def test_the_docs_table_is_the_generated_one():
    page = (ROOT / "docs" / "merging.md").read_text()
    start, end = page.index("<!-- methods table: generated"), page.index("<!-- end methods table -->")
    assert page[start:end + len("<!-- end methods table -->\n")] == methods.methods_table()
    printed = subprocess.run([sys.executable, "-m", "ckptsurgery.ops.methods"], capture_output=True, text=True,
                             check=True, cwd=ROOT).stdout
    assert printed == methods.methods_table()


# ---- one check of the parameters, with the messages it always had ---------------------------

NONE = {"weights": None, "density": None, "scale": None, "t": None, "seed": None}


@pytest.mark.parametrize("method, models, given, message", [
    ("linear", 2, {"seed": 1}, "--seed applies to --method dare-linear, dare-ties, della, della-linear only, not to linear"),
    ("slerp", 3, {"t": 0.5}, "--method slerp takes exactly 2 model(s), not 3"),
    ("linear", 1, {}, "--method linear takes at least 2 model(s), not 1"),
    ("ties", 0, {}, "--method ties takes at least 1 model(s), not 0 (the base is --base)"),
    ("slerp", 2, {}, "--method slerp needs --t"),
    ("ties", 2, {"density": 1.5}, "--density 1.5: must be in (0, 1]"),
    ("ties", 2, {"density": 0}, "--density 0.0: must be in (0, 1]"),
    ("slerp", 2, {"t": -0.1}, "--t -0.1: must be in [0, 1]"),
    ("task-arithmetic", 2, {"scale": float("nan")}, "--scale nan: must be a finite number"),
    ("dare-ties", 2, {"seed": -1}, "--seed -1: must be a whole number, 0 or more"),
    ("dare-ties", 2, {"seed": 1.0}, "--seed 1.0: must be a whole number, 0 or more"),
    ("dare-ties", 2, {"seed": True}, "--seed True: must be a whole number, 0 or more"),
    ("ties", 2, {"weights": "1,x"}, "--weights '1,x': expected numbers separated by commas"),
    ("ties", 2, {"weights": "1"}, "--weights gives 1 weights for 2 models"),
    ("ties", 2, {"weights": [1, float("inf")]}, "--weights [1, inf]: every weight must be a finite number (no nan or inf)"),
    ("ties", 2, {"weights": "1e308,1e308"}, "--weights '1e308,1e308': the weights are too large to add up"),
    ("linear", 2, {"weights": "1,-1"}, "--weights must not sum to zero or less (they sum to 0)"),
])
def test_refusals_say_what_they_always_said(method, models, given, message):
    with pytest.raises(UsageError) as refused:
        methods.resolve_parameters(method, models, {**NONE, **given})
    assert str(refused.value) == message


def test_the_first_refused_option_is_named_in_the_order_given():
    with pytest.raises(UsageError, match="^--t applies"):
        methods.resolve_parameters("ties", 2, {"weights": "1,1", "t": 0.5, "seed": 1})


@pytest.mark.parametrize("method, models, given, report", [
    ("dare-ties", 2, {"seed": 7, "weights": "2,1", "scale": 0.5},
     {"weights": [2.0, 1.0], "density": 1.0, "scale": 0.5, "seed": 7, "normalize": False, "rescale": True,
      "int8_mask": False}),
    ("ties", 3, {"density": 0.25}, {"weights": [1.0, 1.0, 1.0], "density": 0.25, "scale": 1.0, "normalize": True,
                                    "rescale": False, "int8_mask": False}),
    ("ties", 2, {"density": "0.25,0.5", "normalize": False}, {"weights": [1.0, 1.0], "density": [0.25, 0.5],
                                                              "scale": 1.0, "normalize": False, "rescale": False,
                                                              "int8_mask": False}),
    ("task-arithmetic", 1, {}, {"weights": [1.0], "density": 1.0, "scale": 1.0, "normalize": False,
                                "rescale": False, "int8_mask": False}),
    ("linear", 2, {"weights": [3, 1]}, {"weights": [3.0, 1.0], "normalize": True}),
    ("linear", 2, {"weights": [3, -3], "normalize": False}, {"weights": [3.0, -3.0], "normalize": False}),
    ("slerp", 2, {"t": 1}, {"t": 1.0}),
])
def test_the_report_has_the_parameters_in_their_order_with_defaults(method, models, given, report):
    got = methods.resolve_parameters(method, models, {**NONE, **given}).report()
    assert got == report and list(got) == list(report)
    assert json.dumps(got) == json.dumps(report)  # --json prints the same bytes: 1.0, not 1


def test_parameters_hold_values_per_model_and_per_tensor():
    params = methods.resolve_parameters("ties", 2, {**NONE, "weights": "2,1", "density": 0.5})
    assert params.for_tensor("any.weight") == {"weights": [2.0, 1.0], "density": 0.5, "scale": 1.0,
                                               "normalize": True, "rescale": False, "int8_mask": False}
    layered = params.varying("density", lambda key: 0.9 if key.startswith("head.") else 0.5)
    assert layered.for_tensor("head.weight")["density"] == 0.9 and layered.for_tensor("body.weight")["density"] == 0.5
    assert params.for_tensor("head.weight")["density"] == 0.5  # the original is left as it was
    per_layer = params.varying("weights", lambda key: [1.0, 0.0] if key.endswith("bias") else [2.0, 1.0])
    assert per_layer.for_tensor("a.bias")["weights"] == [1.0, 0.0]
    assert layered.report() == params.report()
    dare = methods.resolve_parameters("dare-ties", 2, NONE)
    with pytest.raises(ValueError, match="seed is not a parameter that may vary per tensor"):
        dare.varying("seed", lambda key: 1)
    with pytest.raises(ValueError, match="t is not"):
        dare.varying("t", lambda key: 0.5)


def test_a_tensors_merge_reads_its_own_values(tmp_path):
    """Each key's merge is made with params.for_tensor(key): a per-tensor density reaches it."""
    import numpy as np
    from safetensors.torch import save_file

    from ckptsurgery.io import open_checkpoint
    from ckptsurgery.ops.merge.by_method import merge_by_method

    save_file({"a": torch.zeros(8), "b": torch.zeros(8)}, str(tmp_path / "base.safetensors"))
    save_file({"a": torch.arange(1.0, 9.0), "b": torch.arange(1.0, 9.0)}, str(tmp_path / "m.safetensors"))
    params = methods.resolve_parameters("ties", 1, NONE).varying("density", lambda key: 0.25 if key == "a" else 1.0)
    with open_checkpoint(str(tmp_path / "base.safetensors")) as base, open_checkpoint(str(tmp_path / "m.safetensors")) as m:
        result = merge_by_method([m], base, "ties", params, None)
        a, b = (np.frombuffer(bytes(result.tensors[k].data()), np.float32).tolist() for k in "ab")
    assert a == [0, 0, 0, 0, 0, 0, 7, 8] and b == list(range(1, 9))


def test_merges_are_made_with_the_packages_chunk(tmp_path, monkeypatch):
    """tests set methods.CHUNK to make many chunks of a tiny tensor: both ways a key's merge is
    made must then use it."""
    import numpy as np

    from ckptsurgery.io import open_checkpoint
    from ckptsurgery.ops.merge.by_method import merge_by_method
    from safetensors.torch import save_file

    monkeypatch.setattr(methods, "CHUNK", 4)
    save_file({"w": torch.arange(10.0)}, str(tmp_path / "a.safetensors"))
    params = methods.resolve_parameters("linear", 2, NONE)
    with open_checkpoint(str(tmp_path / "a.safetensors")) as a:
        result = merge_by_method([a, a], None, "linear", params, None)
        assert [m.chunks for m in result.key_merges.values()] == [3]
        assert np.frombuffer(bytes(result.tensors["w"].data()), np.float32).tolist() == list(range(10))
    reads = [lambda start, count: np.arange(10, dtype=np.float32)[start:start + count]] * 2
    assert methods.METHODS["linear"]({"weights": [1.0, 1.0]}, "w", reads, 10, "float32",
                                     chunk_size=methods.CHUNK).chunks == 3


def test_notes_are_read_once_the_tensors_are_written(tmp_path):
    from safetensors.torch import save_file

    from ckptsurgery.io import open_checkpoint
    from ckptsurgery.ops.merge.by_method import merge_by_method

    w = torch.randn(4, 4)
    save_file({"w": w, "v": torch.randn(5), "n": torch.tensor([3])}, str(tmp_path / "a.safetensors"))
    save_file({"w": -2 * w, "v": torch.randn(5), "n": torch.tensor([4])}, str(tmp_path / "b.safetensors"))
    params = methods.resolve_parameters("slerp", 2, {**NONE, "t": 0.25})
    with open_checkpoint(str(tmp_path / "a.safetensors")) as a, open_checkpoint(str(tmp_path / "b.safetensors")) as b:
        result = merge_by_method([a, b], None, "slerp", params, None)
        assert (result.merged, result.not_merged, result.notes()) == (2, ["n"], {})  # nothing computed yet
        for t in result.tensors.values():
            t.data()
    assert result.notes() == {"w": "nearly collinear: interpolated linearly"}


# ---- a method added as one file, through the real command line -------------------------------

NUDGE = '''\
"""nudge: the base moved a fraction D of the way to the models' weighted mean."""

from __future__ import annotations

import math

from ._base import MergeMethod
from ._parameters import DENSITY, WEIGHTS


class Nudge(MergeMethod):
    name = "nudge"
    summary = "base + D·(Σ wᵢθᵢ / Σ wᵢ − base)"
    needs_base = True
    parameters = (WEIGHTS, DENSITY)

    def merge_chunk(self, j, values, out):
        import numpy as np

        total = math.fsum(self.params["weights"])
        mean = sum(w / total * x for w, x in zip(self.params["weights"], values[1:]))
        return np.add(values[0], self.params["density"] * (mean - values[0]), out=out)
'''

STEP = '''\
"""step-toward: the base moved a fraction S of the way to the models' mean; S is its own parameter."""

from ._base import MergeMethod
from ._parameters import UNIT_INTERVAL, Parameter

STEP = Parameter("step", "How far the base moves toward the models' mean.", "S", default=0.5, range=UNIT_INTERVAL)


class StepToward(MergeMethod):
    name = "step-toward"
    summary = "base + S·(mean θᵢ − base)"
    needs_base = True
    parameters = (STEP,)

    def merge_chunk(self, j, values, out):
        import numpy as np

        mean = sum(values[1:]) / (len(values) - 1)
        return np.add(values[0], self.params["step"] * (mean - values[0]), out=out)
'''


GAINS = '''\
"""scaled-sum: base + Σ gᵢ(θᵢ − base), one gain per model: a per-model parameter of its own."""

from ._base import MergeMethod
from ._parameters import FINITE, Parameter

GAINS = Parameter("gains", "One gain per model.", "G,G,..", default=1.0, range=FINITE, per_model=True, each="gain")


class ScaledSum(MergeMethod):
    name = "scaled-sum"
    summary = "base + Σ gᵢ(θᵢ − base)"
    needs_base = True
    parameters = (GAINS,)

    def merge_chunk(self, j, values, out):
        import numpy as np

        return np.add(values[0], sum(g * (x - values[0]) for g, x in zip(self.params["gains"], values[1:])), out=out)
'''


@pytest.fixture(scope="module")
def package_copy(tmp_path_factory):
    """A copy of the ckptsurgery package with two methods added, each as one new file, and a
    base and a model to merge."""
    from safetensors.torch import save_file

    import ckptsurgery

    root = tmp_path_factory.mktemp("copy")
    shutil.copytree(Path(ckptsurgery.__file__).parent, root / "ckptsurgery",
                    ignore=shutil.ignore_patterns("__pycache__"))
    (root / "ckptsurgery" / "ops" / "methods" / "nudge.py").write_text(NUDGE)
    (root / "ckptsurgery" / "ops" / "methods" / "step_toward.py").write_text(STEP)
    (root / "ckptsurgery" / "ops" / "methods" / "scaled_sum.py").write_text(GAINS)
    save_file({"w": torch.zeros(4), "steps": torch.tensor([1])}, str(root / "base.safetensors"))
    save_file({"w": torch.tensor([2.0, 4.0, -2.0, 8.0]), "steps": torch.tensor([2])}, str(root / "m.safetensors"))
    return root


def run_copy(root: Path, *args):
    """The copy's real entry point, `python -m ckptsurgery ...`, in a fresh interpreter."""
    env = {**os.environ, "PYTHONPATH": str(root), "COLUMNS": "400"}  # --help's lines whole
    done = subprocess.run([sys.executable, "-m", "ckptsurgery", *map(str, args)], cwd=root, env=env, check=False,
                          capture_output=True, text=True, timeout=300)
    done.code, done.out, done.err = done.returncode, done.stdout, done.stderr
    return done


def test_a_method_in_one_new_file_is_a_method_of_the_command_line(package_copy):
    root = package_copy
    helped = run_copy(root, "merge", "--help")
    assert helped.code == 0 and "nudge" in helped.out and "step-toward" in helped.out
    common = ["m.safetensors", "--base", "base.safetensors", "--method", "nudge"]
    assert_one_error_line(run_copy(root, "merge", *common, "--density", "1.5", "-o", "o.safetensors"),
                          "--density 1.5: must be in (0, 1]", code=2)
    assert_one_error_line(run_copy(root, "merge", *common, "--seed", "1", "-o", "o.safetensors"),
                          "--seed applies to --method dare-linear, dare-ties, della, della-linear only, not to nudge",
                          code=2)
    assert_one_error_line(run_copy(root, "merge", "m.safetensors", "m.safetensors", "--method", "linear",
                                   "--density", "0.5", "-o", "o.safetensors"),
                          "--density applies to --method task-arithmetic, ties, dare-linear, dare-ties, ", "nudge only, not to linear",
                          code=2)
    assert not (root / "o.safetensors").exists()
    merged = run_copy(root, "merge", *common, "--density", "0.5", "-o", "o.safetensors", "--json")
    assert merged.code == 0, merged.err
    report = json.loads(merged.out)
    assert (report["method"], report["parameters"], report["not_merged"]) == (
        "nudge", {"weights": [1.0], "density": 0.5}, ["steps"])
    got = load_any(root / "o.safetensors")
    assert got["w"].tolist() == [1.0, 2.0, -1.0, 4.0] and got["steps"].tolist() == [1]
    table = subprocess.run([sys.executable, "-m", "ckptsurgery.ops.methods"], cwd=root, capture_output=True,
                           text=True, check=True, env={**os.environ, "PYTHONPATH": str(root)}).stdout
    assert ("| `nudge` | base + D·(Σ wᵢθᵢ / Σ wᵢ − base) | required | ≥ 1 | `--weights` (1 each), `--density` (1) | — |"
            in table)
    assert "| `--step S` | in [0, 1] | 0.5 | no | yes | step-toward |" in table


def test_a_parameter_declared_in_that_file_is_an_option_of_the_command_line(package_copy):
    root = package_copy
    helped = run_copy(root, "merge", "--help")
    assert "--step" in helped.out and "Taken by --method step-toward; in [0, 1]; default 0.5." in helped.out
    common = ["m.safetensors", "--base", "base.safetensors"]
    assert_one_error_line(run_copy(root, "merge", *common, "--method", "step-toward", "--step", "2",
                                   "-o", "o.safetensors"), "--step 2.0: must be in [0, 1]", code=2)
    assert_one_error_line(run_copy(root, "merge", *common, "--method", "ties", "--step", "0.5",
                                   "-o", "o.safetensors"), "--step applies to --method step-toward only, not to ties",
                          code=2)
    merged = run_copy(root, "merge", *common, "--method", "step-toward", "--step", "0.25", "-o", "s.safetensors")
    assert merged.code == 0, merged.err
    assert load_any(root / "s.safetensors")["w"].tolist() == [0.5, 1.0, -0.5, 2.0]


def test_a_per_model_parameter_of_a_new_method_is_parsed_checked_and_shown(package_copy):
    """The summary shows each parameter as its declaration says (a list per model, a whole number,
    a float), not by the names of the parameters that exist today."""
    root = package_copy
    common = ["m.safetensors", "--base", "base.safetensors", "--method", "scaled-sum"]
    assert_one_error_line(run_copy(root, "merge", *common, "--gains", "1,2", "-o", "g.safetensors"),
                          "--gains gives 2 gains for 1 models", code=2)
    merged = run_copy(root, "merge", *common, "--gains", "0.5", "-o", "g.safetensors")
    assert merged.code == 0 and "by scaled-sum (gains 0.5)" in merged.err, merged.err
    assert load_any(root / "g.safetensors")["w"].tolist() == [1.0, 2.0, -1.0, 4.0]


def test_a_method_parameter_named_as_one_of_merges_options_is_refused_at_once(tmp_path):
    """A parameter may not take the name of an option merge already has (--grid, --into, ...):
    the registry says which, instead of Typer failing on a duplicate name at every command."""
    import ckptsurgery

    shutil.copytree(Path(ckptsurgery.__file__).parent, tmp_path / "ckptsurgery",
                    ignore=shutil.ignore_patterns("__pycache__"))
    (tmp_path / "ckptsurgery" / "ops" / "methods" / "gridded.py").write_text(
        STEP.replace('Parameter("step"', 'Parameter("grid"').replace('"step-toward"', '"gridded"')
        .replace('self.params["step"]', 'self.params["grid"]'))
    failed = run_copy(tmp_path, "merge", "--help")
    assert failed.code != 0 and "merge: grid: already an option of the command" in failed.err


def test_two_methods_of_one_name_or_two_parameters_of_one_name_are_refused(tmp_path, monkeypatch):
    from ckptsurgery.ops.methods import _registry

    def package(name: str, files: dict[str, str]) -> None:
        (tmp_path / name).mkdir()
        (tmp_path / name / "__init__.py").write_text("")
        for file, text in files.items():
            (tmp_path / name / file).write_text(textwrap.dedent(text))

    # a base class with the math, so that each declaration below is a whole method but for what it tests
    header = ("from ckptsurgery.ops.methods import MergeMethod, Parameter\n"
              "class MergeMethod(MergeMethod):\n    def merge_chunk(self, j, values, out):\n        return values[0]\n")
    package("twice", {"a.py": header + "class A(MergeMethod):\n    name = 'same'\n",
                      "b.py": header + "class B(MergeMethod):\n    name = 'same'\n"})
    package("clash", {"a.py": header + "class A(MergeMethod):\n    name = 'a'\n    parameters = (Parameter('k', 'K.', 'K'),)\n",
                      "b.py": header + "class B(MergeMethod):\n    name = 'b'\n    parameters = (Parameter('k', 'K.', 'K'),)\n",
                      "_shared.py": header + "class Helper(MergeMethod):\n    name = 'hidden'\n"})
    monkeypatch.syspath_prepend(str(tmp_path))
    with pytest.raises(ValueError, match="two merge methods named same"):
        _registry.discover("twice", [str(tmp_path / "twice")])
    with pytest.raises(ValueError, match="two parameters named k"):
        _registry.discover("clash", [str(tmp_path / "clash")])
    package("mathless", {"a.py": "from ckptsurgery.ops.methods import MergeMethod\n"
                                 "class A(MergeMethod):\n    name = 'no-math'\n"})
    with pytest.raises(ValueError, match="merge method no-math: no merge_chunk"):
        _registry.discover("mathless", [str(tmp_path / "mathless")])
