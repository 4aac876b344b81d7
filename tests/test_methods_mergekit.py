"""Each merge method against mergekit 0.1.5's own function (`merge_tensors`) on small seeded
tensors: the deterministic ones within float tolerance, the random ones exactly when handed our
draws, and statistically against mergekit's own draws (as close to mergekit as two of mergekit's
seeds are to each other); every method the same with a tiny chunk size, and deterministic."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from ckptsurgery.errors import UsageError
from ckptsurgery.ops import methods
from ckptsurgery.ops.methods._base import uniform_draws

mergekit_api = pytest.importorskip("mergekit.merge_methods.api")

# ours -> mergekit's name of a parameter
KIT_NAMES = {"weights": "weight", "scale": "lambda"}
SHAPES = [(16, 12), (40,), (3, 4, 5), ()]


def tensors(shape, count, spread=0.1, seed=0, base=True):
    """A base and `count` fine-tunes of it (or `count` models, without a base)."""
    g = torch.Generator().manual_seed(seed)
    b = torch.randn(shape, generator=g)
    models = [b + spread * torch.randn(shape, generator=g) for _ in range(count)]
    return [b, *models] if base else models


def ours(method, inputs, given=None, chunk_size=None, key="w", has_base=None):
    """Our merge of one key: `inputs` as the method reads them ([base, model...] or [model...])."""
    spec = methods.METHODS[method]
    has_base = spec.needs_base if has_base is None else has_base
    models = len(inputs) - (1 if has_base else 0)
    params = methods.resolve_parameters(method, models, given or {})
    arrays = [t.reshape(-1).numpy().astype(np.float32) for t in inputs]
    reads = [lambda start, count, a=a: a[start:start + count] for a in arrays]
    merge = spec(params.for_tensor(key), key, reads, arrays[0].size, "float32",
                 chunk_size=chunk_size or methods.CHUNK, shape=tuple(inputs[0].shape), has_base=has_base)
    out = np.concatenate([np.array(merge.chunk(j)) for j in range(merge.chunks)]) if merge.chunks else np.zeros(0)
    return torch.from_numpy(out.astype(np.float32)).reshape(inputs[0].shape)


def kit(method, inputs, given=None, base=True):
    """mergekit 0.1.5's merge of the same inputs (the base first when there is one)."""
    parameters = {KIT_NAMES.get(k, k): v for k, v in (given or {}).items() if k != "seed"}
    return mergekit_api.merge_tensors(inputs, method, base_index=0 if base else None, parameters=parameters)


def assert_close(got, want, rtol=1e-5, atol=1e-6):
    torch.testing.assert_close(got, want.to(got.dtype), rtol=rtol, atol=atol)


# ---- the task-arithmetic family: the toggles, per-model values, breadcrumbs ---------------------

DETERMINISTIC = [
    ("task-arithmetic", "task_arithmetic", {"weights": [1.0, 0.5, -0.3], "scale": 0.8}),
    ("task-arithmetic", "task_arithmetic", {"weights": [1.0, 0.5, 0.3], "normalize": True}),
    ("task-arithmetic", "task_arithmetic", {"weights": [1.0, -1.0, 0.0], "normalize": True}),  # sum 0: divides by 1
    ("ties", "ties", {"weights": [1.0, 0.5, 0.7], "density": 0.4}),
    ("ties", "ties", {"weights": [1.0, 0.5, 0.7], "density": [0.3, 0.6, 1.0]}),
    ("ties", "ties", {"weights": [1.0, 0.5, 0.7], "density": 0.5, "normalize": False, "rescale": True,
                      "int8_mask": True, "scale": 1.2}),
    ("breadcrumbs", "breadcrumbs", {"weights": [1.0, 0.5, 0.7], "density": 0.5}),
    ("breadcrumbs", "breadcrumbs", {"weights": [1.0, 0.5, 0.7], "density": 0.5, "gamma": 0.1, "rescale": True}),
    ("breadcrumbs", "breadcrumbs", {"weights": [1.0, 0.5, 0.7], "density": [0.2, 0.5, 0.9],
                                    "gamma": [0.0, 0.05, 0.2]}),
    ("breadcrumbs", "breadcrumbs", {"weights": [1.0, 0.5, 0.7], "density": 0.95, "gamma": 0.2}),  # fewer outliers
    ("breadcrumbs", "breadcrumbs", {"weights": [1.0, 0.5, 0.7], "density": 0.01}),  # ⌊D·n⌋ may be 0
    ("breadcrumbs-ties", "breadcrumbs_ties", {"weights": [1.0, 0.5, 0.7], "density": 0.6, "gamma": 0.05}),
    ("breadcrumbs-ties", "breadcrumbs_ties", {"weights": [1.0, 0.5, 0.7], "density": 0.6, "normalize": True,
                                              "scale": 0.5}),
]


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("method, kit_method, given", DETERMINISTIC)
def test_the_task_arithmetic_family_equals_mergekit(method, kit_method, given, shape):
    inputs = tensors(shape, 3)
    assert_close(ours(method, inputs, given), kit(kit_method, inputs, given))


@pytest.mark.parametrize("given", [{"weights": [3.0, 1.0, 2.0]}, {"weights": [3.0, 1.0, -2.0], "normalize": False},
                                   {"weights": [0.5, 0.25, 0.25], "normalize": True}])
def test_linear_with_and_without_normalize_equals_mergekit(given):
    inputs = tensors((7, 9), 3, base=False)
    assert_close(ours("linear", inputs, given), kit("linear", inputs, given, base=False))


def test_breadcrumbs_without_outliers_keeps_the_top_entries():
    """gamma 0: no outlier dropped, the ⌊D·n⌋ largest kept (where a slice indices[n_bot:-n_top]
    would keep nothing)."""
    base = torch.zeros(10)
    delta = torch.arange(1.0, 11.0)
    got = ours("breadcrumbs", [base, delta], {"density": 0.3, "gamma": 0.0})
    assert got.tolist() == [0.0] * 7 + [8.0, 9.0, 10.0]
    got = ours("breadcrumbs", [base, delta], {"density": 0.3, "gamma": 0.2})  # the top 2 dropped
    assert got.tolist() == [0.0] * 5 + [6.0, 7.0, 8.0, 0.0, 0.0]
    assert_close(got, kit("breadcrumbs", [base, delta], {"weights": [1.0], "density": 0.3, "gamma": 0.2}))


def test_rank_windows_break_ties_in_row_major_order_whatever_the_chunks():
    base = torch.zeros(8)
    delta = torch.tensor([1.0, 2.0, 2.0, 2.0, 3.0, 2.0, 1.0, 0.5])
    for chunk in (None, 1, 3):
        # ranks, largest first: 3.0, then the 2.0s in order; gamma drops the top ⌊0.25·8⌋ = 2
        got = ours("breadcrumbs", [base, delta], {"density": 0.25, "gamma": 0.25}, chunk_size=chunk)
        assert got.tolist() == [0.0, 0.0, 2.0, 2.0, 0.0, 0.0, 0.0, 0.0]
        got = ours("ties", [base, delta], {"density": 0.5}, chunk_size=chunk)
        assert got.tolist() == [0.0, 2.0, 2.0, 2.0, 3.0, 0.0, 0.0, 0.0]


# ---- the random drops: exact given our draws, statistical against mergekit's ------------------

def our_bernoulli(seed, key, keep_models):
    """A stand-in for torch.bernoulli that draws as we do: element e of model i is kept where its
    uniform draw (`uniform_draws`) is below ⌊p·2³²⌋, p the chance mergekit computed for it."""
    models = iter(keep_models)

    def bernoulli(probs, *args, **kwargs):
        model = next(models)
        draws = uniform_draws(seed, key, model, 0, probs.numel()).astype(np.float64)
        limit = np.floor(probs.double().reshape(-1).numpy() * 2**32)
        return torch.from_numpy(draws < limit).reshape(probs.shape).to(probs.dtype)

    return bernoulli


RANDOM = [
    ("dare-linear", "dare_linear", {"weights": [1.0, 0.6, 0.3], "density": 0.4, "seed": 7}),
    ("dare-linear", "dare_linear", {"weights": [1.0, 0.6, 0.3], "density": [0.4, 1.0, 0.7], "seed": 7,
                                    "rescale": False, "normalize": True}),
    ("dare-ties", "dare_ties", {"weights": [1.0, 0.6, 0.3], "density": 0.3, "seed": 2, "scale": 0.9}),
    ("dare-ties", "dare_ties", {"weights": [1.0, 0.6, 0.3], "density": 0.3, "seed": 2, "normalize": True}),
    ("della", "della", {"weights": [1.0, 0.6, 0.3], "density": 0.5, "epsilon": 0.1, "seed": 3}),
    ("della", "della", {"weights": [1.0, 0.6, 0.3], "density": [0.5, 0.3, 1.0], "epsilon": [0.1, 0.2, 0.05],
                        "seed": 3, "rescale": False}),
    ("della-linear", "della_linear", {"weights": [1.0, 0.6, 0.3], "density": 0.6, "seed": 5, "scale": 1.1}),
]


@pytest.mark.parametrize("shape", [(16, 12), (40,), (3, 4, 5)])
@pytest.mark.parametrize("method, kit_method, given", RANDOM)
def test_random_methods_equal_mergekit_given_our_draws(method, kit_method, given, shape, monkeypatch):
    inputs = tensors(shape, 3)
    densities = given["density"] if isinstance(given["density"], list) else [given["density"]] * 3
    keep_models = [i for i, d in enumerate(densities) if d < 1]
    monkeypatch.setattr(torch, "bernoulli", our_bernoulli(given["seed"], "w", keep_models))
    want = kit(kit_method, inputs, given)
    monkeypatch.undo()
    assert_close(ours(method, inputs, given), want)


def statistics(result, base):
    delta = (result - base).reshape(-1)
    return np.array([float((delta != 0).float().mean()), float(result.mean()), float(result.norm())])


@pytest.mark.parametrize("method, kit_method, given", [
    ("dare-linear", "dare_linear", {"weights": [1.0], "density": 0.3}),
    ("dare-ties", "dare_ties", {"weights": [1.0, 1.0], "density": 0.5}),
    ("della", "della", {"weights": [1.0, 1.0], "density": 0.4, "epsilon": 0.2}),
    ("della-linear", "della_linear", {"weights": [1.0], "density": 0.5, "epsilon": 0.3}),
])
def test_random_methods_are_as_close_to_mergekit_as_its_own_seeds(method, kit_method, given):
    """The fraction of entries changed, the mean and the norm of the result: ours, from two of our
    seeds, no farther from mergekit's mean than mergekit's own seeds are from each other."""
    inputs = tensors((64, 64), len(given["weights"]), seed=4)
    runs = []
    for seed in range(6):
        torch.manual_seed(seed)
        runs.append(statistics(kit(kit_method, inputs, given), inputs[0]))
    runs = np.array(runs)
    spread = runs.max(axis=0) - runs.min(axis=0)  # the farthest two of mergekit's seeds
    for seed in (0, 1):
        got = statistics(ours(method, inputs, {**given, "seed": seed}), inputs[0])
        assert np.all(np.abs(got - runs.mean(axis=0)) <= spread), (got, runs)


def test_della_keeps_the_larger_entries_more_often():
    """Chances from D − ε for a row's smallest entry to D + ε for its largest."""
    base = torch.zeros(200, 50)
    delta = torch.randn(200, 50, generator=torch.Generator().manual_seed(0))
    got = ours("della-linear", [base, delta], {"density": 0.5, "epsilon": 0.4, "rescale": False})
    order = delta.abs().argsort(dim=1)
    kept = (got != 0).gather(1, order).float().mean(dim=0)  # by rank in the row, smallest first
    assert abs(float(kept[:10].mean()) - 0.14) < 0.04 and abs(float(kept[-10:].mean()) - 0.86) < 0.04
    assert abs(float((got != 0).float().mean()) - 0.5) < 0.02


# ---- determinism, chunks, refusals --------------------------------------------------------------

EVERY = [(m, g) for m, _, g in DETERMINISTIC + RANDOM]


@pytest.mark.parametrize("method, given", EVERY)
def test_the_same_output_with_a_tiny_chunk_size_and_again(method, given):
    inputs = tensors((9, 7), 3)
    whole = ours(method, inputs, given)
    assert torch.equal(ours(method, inputs, given), whole)
    torch.testing.assert_close(ours(method, inputs, given, chunk_size=5), whole, rtol=1e-6, atol=1e-7)


def test_random_draws_depend_on_the_seed_the_model_and_the_key():
    inputs = tensors((30, 30), 1)
    given = {"density": 0.5, "seed": 1}
    first = ours("della-linear", inputs, given)
    assert not torch.equal(first, ours("della-linear", inputs, {**given, "seed": 2}))
    assert not torch.equal(first, ours("della-linear", inputs, given, key="v"))


@pytest.mark.parametrize("method, models, given, message", [
    ("della", 2, {"density": 0.9, "epsilon": 0.15}, "--density 0.9 with --epsilon 0.15: density ± epsilon must be in (0, 1)"),
    ("della", 2, {"density": "0.5,0.1", "epsilon": 0.15}, "--density 0.1 with --epsilon 0.15"),
    ("ties", 2, {"density": "0.5,0.1,0.2"}, "--density gives 3 density for 2 models"),
    ("ties", 2, {"density": "0.5,0"}, "--density '0.5,0': every density must be in (0, 1]"),
    ("ties", 2, {"density": "x"}, "--density 'x': expected a number"),
    ("breadcrumbs", 2, {"gamma": 1.5}, "--gamma 1.5: must be in [0, 1]"),
    ("ties", 2, {"normalize": "yes"}, "--normalize 'yes': must be true or false"),
    ("ties", 2, {"gamma": 0.1}, "--gamma applies to --method breadcrumbs, breadcrumbs-ties only, not to ties"),
    ("dare-ties", 2, {"epsilon": 0.1}, "--epsilon applies to --method della, della-linear"),
    ("slerp", 2, {"t": 0.5, "normalize": False}, "--normalize applies to --method linear, task-arithmetic"),
])
def test_parameters_a_method_does_not_take_or_out_of_range_are_refused(method, models, given, message):
    with pytest.raises(UsageError) as refused:
        methods.resolve_parameters(method, models, given)
    assert message in str(refused.value)


def test_flags_and_per_model_values_on_the_command_line(cli, tmp_path):
    from conftest import assert_one_error_line, load_any
    from safetensors.torch import save_file

    inputs = tensors((8, 6), 2)
    paths = [tmp_path / f"{n}.safetensors" for n in ("base", "a", "b")]
    for path, t in zip(paths, inputs):
        save_file({"w": t}, str(path))
    out = tmp_path / "o.safetensors"
    report = cli("merge", *paths[1:], "--base", paths[0], "--method", "breadcrumbs-ties", "--density", "0.5,0.7",
                 "--gamma", "0.1", "--normalize", "--rescale", "--int8-mask", "-o", out, "--json").json()
    assert report["parameters"] == {"weights": [1.0, 1.0], "density": [0.5, 0.7], "gamma": 0.1, "scale": 1.0,
                                    "normalize": True, "rescale": True, "int8_mask": True}
    given = {"density": [0.5, 0.7], "gamma": 0.1, "normalize": True, "rescale": True}
    assert_close(load_any(out)["w"], kit("breadcrumbs_ties", inputs, {**given, "weights": [1.0, 1.0]}))
    report = cli("merge", *paths[1:], "--base", paths[0], "--method", "ties", "--no-normalize", "-o", out, "--force",
                 "--json").json()
    assert report["parameters"]["normalize"] is False
    summary = cli("merge", *paths[1:], "--base", paths[0], "--method", "ties", "--no-normalize", "-o", out, "--force")
    assert "by ties (weights 1,1, density 1, scale 1, normalize false)" in summary.err, summary.err  # flags: when not the default
    refused = cli("merge", *paths[1:], "--method", "slerp", "--t", "0.5", "--no-normalize", "-o", out, "--force")
    assert_one_error_line(refused, "--normalize applies to --method linear", "not to slerp", code=2)


# ---- sce ----------------------------------------------------------------------------------------

@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("given", [{}, {"select_topk": 0.3}, {"select_topk": 0.7, "int8_mask": True},
                                   {"select_topk": 0.0}])
def test_sce_equals_mergekit(given, shape):
    inputs = tensors(shape, 3)
    assert_close(ours("sce", inputs, given), kit("sce", inputs, given))
    torch.testing.assert_close(ours("sce", inputs, given, chunk_size=7), ours("sce", inputs, given))


def test_sce_of_one_model_keeps_nothing_that_does_not_vary():
    inputs = tensors((5, 4), 1)
    assert_close(ours("sce", inputs, {"select_topk": 0.5}), kit("sce", inputs, {"select_topk": 0.5}))
    assert_close(ours("sce", inputs), kit("sce", inputs))


# ---- elementwise methods: nearswap, ram, ramplus-tl, passthrough ---------------------------------

@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("method, kit_method, count, given", [
    ("nearswap", "nearswap", 1, {"t": 0.05}),
    ("nearswap", "nearswap", 1, {"t": 2.0}),
    ("ram", "ram", 3, {}),
    ("ram", "ram", 3, {"epsilon": 0.08}),
    ("ramplus-tl", "ramplus_tl", 3, {"epsilon": 0.08}),
    ("ramplus-tl", "ramplus_tl", 3, {"r": 0.5, "alpha": 0.9, "epsilon": 0.1}),
])
def test_elementwise_methods_equal_mergekit(method, kit_method, count, given, shape):
    inputs = tensors(shape, count)
    if method.startswith("ram"):  # some entries left unchanged, so that unique and shared ones both occur
        g = torch.Generator().manual_seed(9)
        inputs = [inputs[0]] + [torch.where(torch.rand(shape, generator=g) < 0.5, inputs[0], t) for t in inputs[1:]]
    assert_close(ours(method, inputs, given), kit(kit_method, inputs, given))
    torch.testing.assert_close(ours(method, inputs, given, chunk_size=3), ours(method, inputs, given))


@pytest.mark.parametrize("scale", [None, 0.5, -2.0])
def test_passthrough_equals_mergekit(scale):
    (model,) = tensors((6, 5), 1, base=False)
    given = {} if scale is None else {"scale": scale}
    want = mergekit_api.merge_tensors([model], "passthrough", parameters=given)
    assert_close(ours("passthrough", [model], given), want)


def test_ram_takes_one_epsilon():
    with pytest.raises(UsageError, match="--method ram takes one --epsilon, not one per model"):
        methods.resolve_parameters("ram", 2, {"epsilon": "0.1,0.2"})


# ---- model-stock, nuslerp, multislerp, karcher: per tensor, row or column ----------------------------

@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("count, given", [(2, {}), (3, {}), (3, {"filter_wise": True}), (2, {"filter_wise": True})])
def test_model_stock_equals_mergekit(count, given, shape):
    inputs = tensors(shape, count)
    assert_close(ours("model-stock", inputs, given), kit("model_stock", inputs, given), rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(ours("model-stock", inputs, given, chunk_size=3), ours("model-stock", inputs, given))


def test_model_stock_keeps_the_base_where_the_changes_cancel():
    base = torch.zeros(4)
    a = torch.tensor([1.0, 2.0, 0.0, 0.0])
    inputs = [base, a, -a]  # cos = −1: 1 + (N − 1)·cos = 0
    assert ours("model-stock", inputs).tolist() == [0.0] * 4
    assert_close(ours("model-stock", inputs), kit("model_stock", inputs))


NUSLERP = [{"weights": [1.0, 1.0]}, {"weights": [1.0, 3.0]}, {"weights": [1.0, -1.0]},
           {"weights": [2.0, 1.0], "nuslerp_flatten": False},
           {"weights": [2.0, 1.0], "nuslerp_flatten": False, "nuslerp_row_wise": True}]


@pytest.mark.parametrize("shape", [(16, 12), (40,), (3, 4, 5)])
@pytest.mark.parametrize("with_base", [True, False])
@pytest.mark.parametrize("given", NUSLERP)
def test_nuslerp_equals_mergekit(given, with_base, shape):
    inputs = tensors(shape, 2, spread=0.5 if with_base else 1.0, base=with_base)
    got = ours("nuslerp", inputs, given, has_base=with_base)
    assert_close(got, kit("nuslerp", inputs, given, base=with_base), rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(ours("nuslerp", inputs, given, chunk_size=5, has_base=with_base), got)


def test_nuslerp_of_collinear_vectors_is_linear():
    a = torch.arange(1.0, 7.0)
    inputs = [a, 3 * a]
    got = ours("nuslerp", inputs, {"weights": [1.0, 1.0]}, has_base=False)
    assert_close(got, 2 * a)
    assert_close(got, kit("nuslerp", inputs, {"weights": [1.0, 1.0]}, base=False))


@pytest.mark.parametrize("shape", [(16, 12), (40,), (3, 4, 5)])
@pytest.mark.parametrize("with_base", [True, False])
@pytest.mark.parametrize("given", [{"weights": [1.0, 1.0, 1.0]}, {"weights": [1.0, 2.0, 0.5]},
                                   {"weights": [0.2, 0.3, 0.5], "normalize_weights": False},
                                   {"weights": [1.0, 2.0, 0.5], "eps": 1e-3}])
def test_multislerp_equals_mergekit(given, with_base, shape):
    inputs = tensors(shape, 3, spread=0.5, base=with_base) if with_base else tensors(shape, 3, base=False, spread=1.0)
    got = ours("multislerp", inputs, given, has_base=with_base)
    assert_close(got, kit("multislerp", inputs, given, base=with_base), rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(ours("multislerp", inputs, given, chunk_size=5, has_base=with_base), got)


def test_multislerp_of_one_model_and_of_two_that_cancel():
    (a,) = tensors((5,), 1, base=False)
    assert_close(ours("multislerp", [a], {"weights": [1.0]}, has_base=False), a)
    inputs = [a, -a]
    given = {"weights": [1.0, 1.0]}
    assert_close(ours("multislerp", inputs, given, has_base=False), kit("multislerp", inputs, given, base=False))
    with pytest.raises(UsageError, match="sum to 0"):
        methods.resolve_parameters("multislerp", 2, {"weights": [1.0, -1.0]})


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("count, given", [(2, {}), (3, {}), (4, {"max_iter": 3}), (3, {"tol": 1e-2}),
                                          (3, {"max_iter": 0})])
def test_karcher_equals_mergekit(count, given, shape):
    inputs = tensors(shape, count, spread=0.5, base=False)
    got = ours("karcher", inputs, given)
    assert_close(got, kit("karcher", inputs, given, base=False), rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(ours("karcher", inputs, given, chunk_size=3), got)


def test_karcher_skips_a_zero_model():
    a, b = tensors((6,), 2, base=False)
    inputs = [a, b, torch.zeros(6)]
    assert_close(ours("karcher", inputs), kit("karcher", inputs, base=False), rtol=1e-4, atol=1e-5)


def test_base_optional_methods_take_base_or_not_on_the_command_line(cli, tmp_path):
    from conftest import assert_one_error_line, load_any
    from safetensors.torch import save_file

    inputs = tensors((8, 6), 2, spread=0.5)
    paths = [tmp_path / f"{n}.safetensors" for n in ("base", "a", "b")]
    for path, t in zip(paths, inputs):
        save_file({"w": t}, str(path))
    with_base, without = tmp_path / "with.safetensors", tmp_path / "without.safetensors"
    assert cli("merge", *paths[1:], "--base", paths[0], "--method", "nuslerp", "--weights", "1,2", "-o",
               with_base).code == 0
    assert cli("merge", *paths[1:], "--method", "nuslerp", "--weights", "1,2", "--no-nuslerp-flatten",
               "-o", without).code == 0
    assert_close(load_any(with_base)["w"], kit("nuslerp", inputs, {"weights": [1.0, 2.0]}))
    assert_close(load_any(without)["w"], kit("nuslerp", inputs[1:], {"weights": [1.0, 2.0], "nuslerp_flatten": False},
                                             base=False), rtol=1e-4, atol=1e-5)
    refused = cli("merge", *paths[1:], "--base", paths[0], "--method", "karcher", "-o", tmp_path / "k.safetensors")
    assert_one_error_line(refused, "--base applies to --method", "nuslerp, multislerp", "karcher averages", code=2)
    refused = cli("merge", *paths[1:], "--method", "model-stock", "-o", tmp_path / "k.safetensors")
    assert_one_error_line(refused, "--method model-stock needs --base BASE", code=2)


# ---- arcee-fusion -------------------------------------------------------------------------------

@pytest.mark.parametrize("shape", [(16, 12), (40,), (3, 4, 5), (200, 64)])
def test_arcee_fusion_equals_mergekit(shape):
    inputs = tensors(shape, 1, spread=0.3)
    got = ours("arcee-fusion", inputs)
    want = kit("arcee_fusion", inputs)
    assert_close(got, want)
    assert 0 < int(((got - inputs[0]) != 0).sum()) < got.numel()  # some changes kept, not all
    torch.testing.assert_close(ours("arcee-fusion", inputs, chunk_size=7), got)


@pytest.mark.parametrize("method, kit_method", [("arcee-fusion", "arcee_fusion"), ("ramplus-tl", "ramplus_tl")])
def test_methods_mergekit_promotes_write_bfloat16_when_asked(cli, tmp_path, method, kit_method):
    """mergekit's float32 mask (arcee_fusion) and λ (ramplus_tl) promote a bfloat16 merge to float32;
    we write what the inputs are (or --dtype asks for)."""
    from conftest import load_any
    from safetensors.torch import save_file

    base, model = (t.to(torch.bfloat16) for t in tensors((16, 12), 1, spread=0.3))
    paths = [tmp_path / "base.safetensors", tmp_path / "m.safetensors"]
    save_file({"w": base}, str(paths[0]))
    save_file({"w": model}, str(paths[1]))
    out = tmp_path / "o.safetensors"
    extra = ["--epsilon", "0.05"] if method == "ramplus-tl" else []
    assert cli("merge", paths[1], "--base", paths[0], "--method", method, *extra, "-o", out).code == 0
    got = load_any(out)["w"]
    want = kit(kit_method, [base, model], {"epsilon": 0.05} if method == "ramplus-tl" else {})
    assert got.dtype == torch.bfloat16 and want.dtype == torch.float32
    torch.testing.assert_close(got, want.to(torch.bfloat16), rtol=1e-2, atol=1e-2)


# ---- per-tensor values, as recipes give them ------------------------------------------------------

def test_per_tensor_values_are_checked_and_reach_each_keys_merge():
    params = methods.resolve_parameters("della", 2, {"density": 0.5, "weights": [1.0, 2.0]})
    layered = params.varying("density", lambda key: [0.9, 0.4] if key.startswith("head") else None) \
                    .varying("epsilon", lambda key: "0.05" if key.startswith("head") else 0.2)
    assert layered.for_tensor("head.w")["density"] == [0.9, 0.4] and layered.for_tensor("head.w")["epsilon"] == 0.05
    assert layered.for_tensor("body.w")["density"] == 1.0 and layered.for_tensor("body.w")["epsilon"] == 0.2
    bad = params.varying("density", lambda key: [0.5, 1.5])
    with pytest.raises(UsageError, match=r"^body.w: --density \[0.5, 1.5\]: every density must be in \(0, 1\]$"):
        bad.for_tensor("body.w")
    crossed = params.varying("epsilon", lambda key: 0.6)  # density 0.5 ± 0.6 leaves (0, 1)
    with pytest.raises(UsageError, match="^body.w: --density 0.5 with --epsilon 0.6"):
        crossed.for_tensor("body.w")
    flags = methods.resolve_parameters("ties", 2, {}).varying("normalize", lambda key: key == "a")
    assert flags.for_tensor("a")["normalize"] is True and flags.for_tensor("b")["normalize"] is False
    with pytest.raises(ValueError, match="seed is not a parameter that may vary per tensor"):
        methods.resolve_parameters("della", 2, {}).varying("seed", lambda key: 1)


def test_a_per_tensor_per_model_density_gives_mergekits_merge_of_that_key():
    inputs = tensors((12, 10), 2)
    params = methods.resolve_parameters("ties", 2, {}).varying("density", lambda key: [0.3, 0.8])
    arrays = [t.reshape(-1).numpy() for t in inputs]
    reads = [lambda start, count, a=a: a[start:start + count] for a in arrays]
    merge = methods.METHODS["ties"](params.for_tensor("w"), "w", reads, 120, "float32", shape=(12, 10))
    got = torch.from_numpy(np.concatenate([merge.chunk(j) for j in range(merge.chunks)])).reshape(12, 10)
    assert_close(got, kit("ties", inputs, {"density": [0.3, 0.8], "weight": [1.0, 1.0]}))


# ---- every mergekit method and parameter has ours ----------------------------------------------------

def test_every_mergekit_method_and_parameter_is_ours_with_mergekits_default():
    from mergekit.merge_methods import registry
    from mergekit.merge_methods.base import MISSING

    for kit_method in registry.registered_methods():
        name = methods.method_of_mergekit(kit_method.spec.name)
        assert name in methods.METHODS, kit_method.spec.name
        spec = methods.METHODS[name]
        ours_by_name = {p.name: p for p in spec.parameters}
        for p in kit_method.spec.parameters:
            ours_name = methods.MERGEKIT_PARAMETERS.get(p.name, p.name)
            assert ours_name in ours_by_name, (name, p.name)
            if p.default is not MISSING and p.default is not None:  # mergekit requires weights; ours are 1
                assert ours_by_name[ours_name].default == p.default, (name, p.name)


# ---- whole merges: mergekit-yaml's run_merge on a tiny Llama, ours through the command line ----------

@pytest.fixture(scope="module")
def llamas(tmp_path_factory):
    transformers = pytest.importorskip("transformers")
    folder = tmp_path_factory.mktemp("llamas")
    config = transformers.LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                                      num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=32,
                                      tie_word_embeddings=False)
    torch.manual_seed(0)
    base = transformers.LlamaForCausalLM(config)
    base.save_pretrained(folder / "base")
    for i in range(3):
        tuned = transformers.LlamaForCausalLM(config)
        tuned.load_state_dict({k: v + 0.02 * torch.randn_like(v) for k, v in base.state_dict().items()})
        tuned.save_pretrained(folder / f"m{i}")
    return folder


RECIPES = [  # mergekit's method, how many models, base or not, per-model parameters, global ones
    ("ties", 2, True, {"weight": [1.0, 0.5], "density": [0.4, 0.7]}, {"normalize": False, "rescale": True}),
    ("breadcrumbs_ties", 2, True, {"weight": [1.0, 0.5], "density": [0.5, 0.8], "gamma": [0.02, 0.1]},
     {"lambda": 0.9}),
    ("linear", 2, False, {"weight": [1.0, 0.5]}, {"normalize": False}),
    ("sce", 3, True, {}, {"select_topk": 0.5}),
    ("model_stock", 3, True, {}, {"filter_wise": True}),
    ("nuslerp", 2, False, {"weight": [1.0, 2.0]}, {"nuslerp_flatten": False}),
    ("multislerp", 3, True, {"weight": [1.0, 2.0, 1.0]}, {}),
    ("karcher", 3, False, {}, {"max_iter": 5}),
    ("nearswap", 1, True, {}, {"t": 0.01}),
    ("arcee_fusion", 1, True, {}, {}),
    ("ramplus_tl", 3, True, {}, {"epsilon": 0.01}),
]


@pytest.mark.parametrize("kit_method, count, with_base, per_model, shared", RECIPES)
def test_whole_merges_equal_mergekit_yaml(cli, tmp_path, llamas, monkeypatch, kit_method, count, with_base,
                                          per_model, shared):
    pytest.importorskip("mergekit")
    import yaml
    from conftest import load_any
    from mergekit.config import MergeConfiguration
    from mergekit.merge import MergeOptions, run_merge

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    models = []
    for i in range(count):
        entry = {"model": str(llamas / f"m{i}")}
        if per_model:
            entry["parameters"] = {k: v[i] for k, v in per_model.items()}
        models.append(entry)
    recipe = {"merge_method": kit_method, "dtype": "float32", "models": models}
    if with_base:
        recipe["base_model"] = str(llamas / "base")
    if shared:
        recipe["parameters"] = shared
    run_merge(MergeConfiguration.model_validate(yaml.safe_load(yaml.safe_dump(recipe))), str(tmp_path / "kit"),
              options=MergeOptions(lazy_unpickle=True, copy_tokenizer=False))
    args = ["--method", methods.method_of_mergekit(kit_method)]
    for name, value in {**per_model, **shared}.items():
        option = methods.option_of(methods.MERGEKIT_PARAMETERS.get(name, name))
        if isinstance(value, bool):
            args.append(option if value else "--no-" + option[2:])
        else:
            args += [option, ",".join(map(str, value)) if isinstance(value, list) else str(value)]
    if with_base:
        args += ["--base", str(llamas / "base")]
    out = tmp_path / "ours.safetensors"
    result = cli("merge", *(llamas / f"m{i}" for i in range(count)), *args, "-o", out)
    assert result.code == 0, result.err
    kit_out, got = load_any(tmp_path / "kit" / "model.safetensors"), load_any(out)
    assert sorted(kit_out) == sorted(got)
    for name in kit_out:
        torch.testing.assert_close(got[name], kit_out[name], rtol=1e-4, atol=1e-5, msg=name)


# ---- every method on empty, one-column and scalar tensors, with nan and inf ---------------------------

@pytest.mark.parametrize("method", list(methods.METHODS))
def test_every_method_takes_empty_thin_and_scalar_tensors_and_nan_without_a_warning(method):
    import warnings

    spec = methods.METHODS[method]
    count = spec.max_models or max(spec.min_models, 3)
    taken = {p.name for p in spec.parameters}
    given = {"t": 0.5} if "t" in taken else {}
    given.update({k: v for k, v in (("density", 0.5), ("epsilon", 0.1), ("select_topk", 0.5)) if k in taken})
    if method.startswith("ram"):
        given["epsilon"] = 1e-5
    for shape in [(0, 4), (0,), (5, 1), (1,), ()]:
        for poisoned in (False, True):
            inputs = tensors(shape, count, base=spec.needs_base)
            if poisoned and inputs[-1].numel():
                inputs[-1].view(-1)[0] = float("nan")
                inputs[-1].view(-1)[-1] = float("inf") if inputs[-1].numel() > 1 else float("nan")
            with warnings.catch_warnings():
                warnings.simplefilter("error")
                assert ours(method, inputs, given).shape == inputs[0].shape
