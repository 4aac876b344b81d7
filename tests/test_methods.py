"""merge --method: each method against a reference written here from the formulas of
docs/merging.md, against mergekit 0.1.5's own output on a tiny Llama, and through the CLI's
contract (options that do not apply, inputs that disagree, sharded and folder inputs, weights
and seeds taken and reported as given)."""

from __future__ import annotations

import hashlib
import math

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from ckptsurgery.ops import methods

from conftest import assert_one_error_line, load_any

SHAPES = {"a.weight": (6, 5), "a.bias": (6,), "b.weight": (3, 2, 3, 3), "scalar": ()}


def make_models(tmp_path, count: int = 3, dtype=torch.float32, spread: float = 0.1):
    """A base and `count` fine-tunes of it (small changes), plus an int buffer that differs."""
    g = torch.Generator().manual_seed(1)
    base = {k: torch.randn(s, generator=g).to(dtype) for k, s in SHAPES.items()}
    base["steps"] = torch.tensor([7])
    paths = [tmp_path / "base.pth"]
    torch.save(base, paths[0])
    models = []
    for i in range(count):
        sd = {k: (v + spread * torch.randn(v.shape, generator=g).to(dtype)) if v.is_floating_point() else v + i + 1
              for k, v in base.items()}
        models.append(sd)
        paths.append(tmp_path / f"m{i}.pth")
        torch.save(sd, paths[-1])
    return base, models, paths[0], paths[1:]


# ---- references, written from the formulas ---------------------------------------------------

def ref_linear(thetas, weights):
    return sum(w * t.double() for t, w in zip(thetas, weights)) / sum(weights)


def ref_keep_top(delta, density):
    if density >= 1:
        return delta
    k = max(1, int(density * delta.numel()))
    order = torch.argsort(delta.abs().reshape(-1), descending=True, stable=True)
    mask = torch.zeros(delta.numel(), dtype=torch.bool)
    mask[order[:k]] = True
    return delta * mask.reshape(delta.shape)


def ref_seed(seed, name, model, chunk):
    text = f"{seed}\0{model}\0{name}\0{chunk}"
    return int.from_bytes(hashlib.sha256(text.encode()).digest()[:8], "little") % 2**63


def ref_dare(delta, density, seed, name, model, chunk=2**18):
    """Draws per chunk of 2**18 elements: PCG64's raw output as uint32s, as docs/merging.md says."""
    if density >= 1:
        return delta
    flat = delta.reshape(-1)
    draws = []
    for j, start in enumerate(range(0, flat.numel(), chunk)):
        n = min(chunk, flat.numel() - start)
        raw = np.random.PCG64(ref_seed(seed, name, model, j)).random_raw((n + 1) // 2)
        draws.append(raw.astype("<u8").view("<u4")[:n])
    keep = np.concatenate(draws) < int(density * 2**32) if draws else np.zeros(0, bool)
    kept = delta * torch.from_numpy(keep).reshape(delta.shape)
    before, after = delta.double().abs().sum(), kept.double().abs().sum()
    return kept if before < 1e-7 or after < 1e-7 else kept * float(before / after)


def ref_gta(name, base, thetas, weights, method, density=1.0, scale=1.0, seed=0):
    base = base.float()
    deltas = []
    for i, (t, w) in enumerate(zip(thetas, weights)):
        d = t.float() - base
        if method == "ties":
            d = ref_keep_top(d, density)
        elif method.startswith("dare"):
            d = ref_dare(d, density, seed, name, i)
        deltas.append(w * d)
    if method in ("ties", "dare-ties"):
        elected = torch.where(sum(deltas) >= 0, 1.0, -1.0)
        agree = [torch.sign(d) == elected for d in deltas]
        mixed = sum(d * a for d, a in zip(deltas, agree))
        if method == "ties":
            counted = sum(w * a.float() for w, a in zip(weights, agree))
            mixed = mixed / torch.where(counted == 0, 1.0, counted)
    else:
        mixed = sum(deltas)
    return base + scale * mixed


def ref_slerp(a, b, t):
    a64, b64 = a.double().reshape(-1), b.double().reshape(-1)
    na, nb = a64.norm().item(), b64.norm().item()
    na, nb = (na if na > 1e-8 else 1.0), (nb if nb > 1e-8 else 1.0)
    dot = max(-1.0, min(1.0, float((a64 / na) @ (b64 / nb))))
    if abs(dot) > 0.9995:
        return (1 - t) * a.double() + t * b.double()
    theta = math.acos(dot)
    return (math.sin((1 - t) * theta) * a.double() + math.sin(t * theta) * b.double()) / math.sin(theta)


def close(got, want, dtype=torch.float32):
    tol = {torch.float32: (1e-5, 1e-6), torch.bfloat16: (1e-2, 1e-2), torch.float16: (1e-3, 1e-3)}[dtype]
    assert got.dtype == dtype
    torch.testing.assert_close(got.double(), want.double().to(dtype).double(), rtol=tol[0], atol=tol[1])


# ---- each method against its reference -------------------------------------------------------

GTA = [("task-arithmetic", {}), ("task-arithmetic", {"scale": 0.7}), ("ties", {"density": 0.4}),
       ("ties", {"density": 1.0, "scale": 1.3}), ("dare-linear", {"density": 0.5, "seed": 3}),
       ("dare-ties", {"density": 0.3, "seed": 11, "scale": 0.9})]


@pytest.mark.parametrize("method, params", GTA)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_task_arithmetic_family_matches_the_formulas(cli, tmp_path, method, params, dtype):
    base, models, base_path, paths = make_models(tmp_path, dtype=dtype)
    weights = [1.0, 0.5, -0.25]
    args = ["merge", *paths, "--base", base_path, "--method", method, "--weights", ",".join(map(str, weights))]
    for option, value in params.items():
        args += [f"--{option}", str(value)]
    out = tmp_path / "out.safetensors"
    report = cli(*args, "-o", out, "--json").json()
    assert report["method"] == method and report["base"] == str(base_path)
    assert report["parameters"]["weights"] == weights and report["not_merged"] == ["steps"]
    got = load_any(out)
    for name in SHAPES:
        want = ref_gta(name, base[name], [m[name] for m in models], weights, method, **params)
        close(got[name], want, dtype)
    assert torch.equal(got["steps"], base["steps"])  # not floating: the base's


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_linear_and_average_are_the_weighted_mean(cli, tmp_path, dtype):
    _, models, _, paths = make_models(tmp_path, dtype=dtype)
    for args in (["--method", "linear"], ["--average"]):
        out = tmp_path / f"{args[0]}.pth"
        assert cli("merge", *paths, *args, "--weights", "3,1,2", "-o", out).code == 0
        got = load_any(out)
        for name in SHAPES:
            close(got[name], ref_linear([m[name] for m in models], [3, 1, 2]), dtype)
        assert torch.equal(got["steps"], models[0]["steps"])  # not floating: the first model's
    assert load_any(tmp_path / "--method.pth")["a.weight"].equal(load_any(tmp_path / "--average.pth")["a.weight"])


@pytest.mark.parametrize("t", [0.0, 0.3, 1.0])
def test_slerp_matches_the_formula(cli, tmp_path, t):
    _, models, _, paths = make_models(tmp_path, count=2, spread=1.0)
    out = tmp_path / "s.pth"
    report = cli("merge", *paths, "--method", "slerp", "--t", str(t), "-o", out, "--json").json()
    # a one-element tensor is always collinear with another
    assert report["parameters"] == {"t": t} and report["notes"] == {"scalar": "nearly collinear: interpolated linearly"}
    got = load_any(out)
    for name in SHAPES:
        if models[0][name].numel() > 1:
            close(got[name], ref_slerp(models[0][name], models[1][name], t))
    if t == 0.0:
        assert all(torch.allclose(got[k], models[0][k], atol=1e-6) for k in SHAPES)


def test_slerp_of_collinear_tensors_is_linear_and_noted(cli, tmp_path):
    a, b = tmp_path / "a.pth", tmp_path / "b.pth"
    w = torch.randn(4, 4)
    torch.save({"w": w, "v": torch.randn(5)}, a)
    torch.save({"w": -2 * w, "v": torch.randn(5)}, b)  # antipodal: |cos| = 1
    out = tmp_path / "s.pth"
    report = cli("merge", a, b, "--method", "slerp", "--t", "0.25", "-o", out, "--json").json()
    assert report["notes"] == {"w": "nearly collinear: interpolated linearly"}
    torch.testing.assert_close(load_any(out)["w"], 0.75 * w + 0.25 * (-2 * w))


def merge_arrays(method, params, arrays, chunk=None, monkeypatch=None):
    """The pure per-key merge on numpy arrays (float32), chunk by chunk."""
    if chunk is not None:
        monkeypatch.setattr(methods, "CHUNK", chunk)
    reads = [lambda start, count, a=a: a[start:start + count] for a in arrays]
    merge = methods.METHODS[method](dict(params), "w", reads, arrays[0].size, "float32", chunk_size=methods.CHUNK)
    return np.concatenate([merge.chunk(j) for j in range(merge.chunks)]) if merge.chunks else np.zeros(0), merge


@pytest.mark.parametrize("chunk", [None, 2, 3])
def test_ties_keeps_exactly_k_whatever_the_chunks(chunk, monkeypatch):
    delta = np.array([0.5, -0.5, 0.5, 0.25, -0.75, 0.0], np.float32)
    base = np.zeros(6, np.float32)
    before = delta.copy()
    got, _ = merge_arrays("ties", {"weights": [1.0], "density": 0.5, "scale": 1.0}, [base, delta], chunk, monkeypatch)
    # k = 3: -0.75, then the first two of the equal 0.5s
    assert got.tolist() == [0.5, -0.5, 0.0, 0.0, -0.75, 0.0]
    assert np.array_equal(delta, before) and not base.any()  # the inputs are left as read


def test_ties_divides_by_the_weights_that_agree_and_zeros_never_count():
    base = np.zeros(4, np.float32)
    thetas = [np.array([1.0, 2.0, 0.0, -1.0], np.float32), np.array([3.0, -1.0, 0.0, -3.0], np.float32)]
    got, _ = merge_arrays("ties", {"weights": [1.0, 1.0], "density": 1.0, "scale": 1.0}, [base, *thetas])
    # entry 0: both +, (1+3)/2; entry 1: Σ = +1 elects +, only 2 counts; entry 2: no counted weight
    assert got.tolist() == [2.0, 2.0, 0.0, -2.0]


@pytest.mark.parametrize("method, params", [
    ("slerp", {"t": 0.3}), ("linear", {"weights": [1.0, 3.0]}), ("ties", {"weights": [1.0, 2.0], "density": 0.3, "scale": 1.0}),
    ("dare-ties", {"weights": [1.0, 2.0], "density": 0.4, "scale": 1.0, "seed": 2}),
])
def test_chunks_computed_in_any_order_are_the_same(method, params, monkeypatch):
    rng = np.random.default_rng(0)
    arrays = [rng.standard_normal(10).astype(np.float32) for _ in range(2 if method in ("slerp", "linear") else 3)]
    forward, _ = merge_arrays(method, params, arrays, 4, monkeypatch)
    reads = [lambda start, count, a=a: a[start:start + count] for a in arrays]
    merge = methods.METHODS[method](dict(params), "w", reads, 10, "float32", chunk_size=methods.CHUNK)
    backward = [merge.chunk(j) for j in reversed(range(merge.chunks))]
    np.testing.assert_array_equal(np.concatenate(backward[::-1]), forward)
    # DARE's draws come in fixed blocks of 2**18 elements, whatever the chunks: no method depends on them
    np.testing.assert_allclose(merge_arrays(method, params, arrays)[0], forward, rtol=1e-6)


def test_encode_rounds_as_torch_does():
    values = torch.cat([torch.randn(10_000) * 10, torch.tensor([float("nan"), float("inf"), -float("inf"), 0.0, -0.0,
                                                                   65504.0, 1e-8, 3.4e38, -3.4e38, 1.00390625])])
    for name, dtype in (("bfloat16", torch.bfloat16), ("float16", torch.float16), ("float32", torch.float32)):
        data = methods.encode(values.numpy(), name)
        assert data == values.to(dtype).view(torch.int16 if dtype != torch.float32 else torch.int32).numpy().tobytes()
        back = methods.decode(data, name, "float32")
        np.testing.assert_array_equal(back, values.to(dtype).float().numpy())


# ---- DARE's randomness: seeded per key, whatever the order -----------------------------------

def test_dare_depends_on_seed_and_key_not_on_tensor_order(cli, tmp_path):
    base, models, base_path, paths = make_models(tmp_path)
    args = ["--method", "dare-ties", "--density", "0.5"]
    first, again, other_seed, reordered = (tmp_path / f"{n}.safetensors" for n in ("first", "again", "seed", "reordered"))
    assert cli("merge", *paths, "--base", base_path, *args, "-o", first).code == 0
    assert cli("merge", *paths, "--base", base_path, *args, "-o", again).code == 0
    assert first.read_bytes() == again.read_bytes()
    assert cli("merge", *paths, "--base", base_path, *args, "--seed", "1", "-o", other_seed).code == 0
    assert not torch.equal(load_any(first)["a.weight"], load_any(other_seed)["a.weight"])
    reversed_paths = []
    for p in [base_path, *paths]:
        sd = torch.load(p)
        reversed_paths.append(tmp_path / f"rev-{p.name}")
        torch.save(dict(reversed(list(sd.items()))), reversed_paths[-1])
    assert cli("merge", *reversed_paths[1:], "--base", reversed_paths[0], *args, "-o", reordered).code == 0
    want, got = load_any(first), load_any(reordered)
    assert list(got) == list(reversed(list(want)))  # the base's order ...
    assert all(torch.equal(got[k], want[k]) for k in want)  # ... and the same values per key


def test_dare_keeps_about_density_and_the_l1_norm():
    delta = np.random.default_rng(1).standard_normal(100_000).astype(np.float32)
    kept, _ = merge_arrays("dare-linear", {"weights": [1.0], "density": 0.2, "scale": 1.0, "seed": 5},
                           [np.zeros_like(delta), delta])
    assert abs(np.count_nonzero(kept) / kept.size - 0.2) < 0.01
    np.testing.assert_allclose(np.abs(kept).sum(dtype=np.float64), np.abs(delta).sum(dtype=np.float64), rtol=1e-5)


# ---- mergekit 0.1.5 on a tiny Llama ----------------------------------------------------------

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
    for i in range(2):
        tuned = transformers.LlamaForCausalLM(config)
        tuned.load_state_dict({k: v + 0.02 * torch.randn_like(v) for k, v in base.state_dict().items()})
        tuned.save_pretrained(folder / f"m{i}")
    return folder


MERGEKIT_CASES = [
    ("linear", "--method linear", "", {}),
    ("task_arithmetic", "--method task-arithmetic --scale 0.8", "lambda: 0.8", {}),
    ("ties", "--method ties --density 0.5", "", {"density": 0.5}),
    ("ties", "--method ties --density 0.3 --scale 1.2", "lambda: 1.2", {"density": 0.3}),
    ("slerp", "--method slerp --t 0.4", "t: 0.4", {}),
]


@pytest.mark.parametrize("kit_method, ours, shared, per_model", MERGEKIT_CASES)
def test_equal_to_mergekit(cli, tmp_path, llamas, kit_method, ours, shared, per_model, monkeypatch):
    pytest.importorskip("mergekit")
    import yaml
    from mergekit.config import MergeConfiguration
    from mergekit.merge import MergeOptions, run_merge

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    weights = [1.0, 0.5]
    with_base = kit_method not in ("linear",)
    models = "\n".join(f"  - model: {llamas / f'm{i}'}\n    parameters: {{weight: {w}"
                       + "".join(f", {k}: {v}" for k, v in per_model.items()) + "}" for i, w in enumerate(weights))
    if kit_method == "slerp":  # mergekit's slerp: the base at t = 0, the other model at t = 1
        models = f"  - model: {llamas / 'm0'}\n  - model: {llamas / 'm1'}"
    text = (f"merge_method: {kit_method}\ndtype: float32\nmodels:\n{models}\n"
            + (f"base_model: {llamas / ('m0' if kit_method == 'slerp' else 'base')}\n" if with_base else "")
            + (f"parameters: {{{shared}}}\n" if shared else ""))
    run_merge(MergeConfiguration.model_validate(yaml.safe_load(text)), str(tmp_path / "kit"),
              options=MergeOptions(lazy_unpickle=True, copy_tokenizer=False))
    args = ours.split()
    if kit_method not in ("slerp",):
        args += ["--weights", "1,0.5"]
    if kit_method in ("task_arithmetic", "ties"):
        args += ["--base", str(llamas / "base")]
    out = tmp_path / "ours.safetensors"
    assert cli("merge", llamas / "m0", llamas / "m1", *args, "-o", out).code == 0
    kit, got = load_any(tmp_path / "kit" / "model.safetensors"), load_any(out)
    assert sorted(kit) == sorted(got)
    for name in kit:
        torch.testing.assert_close(got[name], kit[name], rtol=1e-5, atol=1e-6, msg=name)


# ---- inputs: files, sharded indexes, folders; tied names ----------------------------------

def test_sharded_and_folder_inputs_give_the_same_bytes(cli, tmp_path):
    _, _, base_path, paths = make_models(tmp_path)
    sharded = tmp_path / "sharded"
    sharded.mkdir()
    assert cli("convert", paths[0], "-o", sharded / "model.safetensors", "--max-shard-size", "100").code == 0
    folder = tmp_path / "hf"
    folder.mkdir()
    assert cli("convert", base_path, "-o", folder / "model.safetensors").code == 0
    plain, mixed = tmp_path / "plain.safetensors", tmp_path / "mixed.safetensors"
    common = ["--method", "ties", "--density", "0.5"]
    assert cli("merge", *paths, "--base", base_path, *common, "-o", plain).code == 0
    assert cli("merge", sharded, *paths[1:], "--base", folder, *common, "-o", mixed).code == 0
    assert plain.read_bytes() == mixed.read_bytes()


def test_tied_names_stay_tied(cli, tmp_path):
    paths = []
    for i, value in enumerate([0.0, 1.0, 3.0]):
        emb = torch.full((3, 2), value)
        paths.append(tmp_path / f"t{i}.pth")
        torch.save({"embed.weight": emb, "lm_head.weight": emb}, paths[-1])
    out = tmp_path / "o.safetensors"
    report = cli("merge", *paths[1:], "--base", paths[0], "--method", "task-arithmetic", "-o", out, "--json").json()
    assert report["tied"] == {"lm_head.weight": "embed.weight"}
    assert torch.equal(load_any(out)["embed.weight"], torch.full((3, 2), 4.0))


def test_dtype_casts_and_mixed_float_inputs_merge(cli, tmp_path):
    base, models, base_path, paths = make_models(tmp_path, count=2)
    half = tmp_path / "half.pth"
    torch.save({k: v.half() if v.is_floating_point() else v for k, v in models[1].items()}, half)
    out = tmp_path / "o.pth"
    assert cli("merge", paths[0], half, "--base", base_path, "--method", "task-arithmetic", "--dtype", "bf16",
               "-o", out).code == 0
    got = load_any(out)
    assert got["a.weight"].dtype == torch.bfloat16 and got["steps"].dtype == torch.int64
    want = ref_gta("a.weight", base["a.weight"], [models[0]["a.weight"], models[1]["a.weight"].half()], [1, 1],
                   "task-arithmetic")
    close(got["a.weight"], want, torch.bfloat16)


def test_dry_run_reports_and_writes_nothing(cli, tmp_path):
    _, _, base_path, paths = make_models(tmp_path)
    out = tmp_path / "o.pth"
    result = cli("merge", *paths, "--base", base_path, "--method", "ties", "--dry-run")
    assert result.code == 2  # -o is required
    report = cli("merge", *paths, "--base", base_path, "--method", "ties", "-o", out, "--dry-run", "--json").json()
    assert report["dry_run"] and report["merged"] == 4 and report["notes"] == {} and not out.exists()


# ---- the contract: what each method takes ---------------------------------------------------

@pytest.mark.parametrize("args, message", [
    (["--method", "ties"], "--method ties needs --base BASE"),
    (["--method", "linear", "--base", "{b}"], "--base applies to --method task-arithmetic, ties, dare-linear, dare-ties"),
    (["--method", "slerp", "--t", "0.5", "--base", "{b}"], "slerp goes from the first model"),
    (["--method", "linear", "--density", "0.5"], "--density applies to --method task-arithmetic, ties, dare-linear, dare-ties, "),
    (["--method", "task-arithmetic", "--base", "{b}", "--seed", "1"], "--seed applies to --method dare-linear, dare-ties, "),
    (["--method", "ties", "--base", "{b}", "--t", "0.5"], "--t applies to --method slerp, nearswap only"),
    (["--method", "slerp", "--t", "0.5", "--weights", "1,1,1"], "--weights applies to --method linear"),
    (["--method", "slerp"], "--method slerp needs --t"),
    (["--method", "slerp", "--t", "1.5"], "--t 1.5: must be in [0, 1]"),
    (["--method", "ties", "--base", "{b}", "--density", "0"], "--density 0.0: must be in (0, 1]"),
    (["--method", "ties", "--base", "{b}", "--density", "nan"], "must be in (0, 1]"),
    (["--method", "ties", "--base", "{b}", "--scale", "inf"], "--scale inf: must be a finite number"),
    (["--method", "dare-ties", "--base", "{b}", "--seed", "-1"], "--seed -1: must be a whole number"),
    (["--method", "ties", "--average"], "--average is --method linear"),
    (["--method", "ties", "--into", "{b}"], "do not combine"),
    (["--method", "ties", "--base", "{b}", "--on-conflict", "last"], "--on-conflict applies to a plain merge only"),
    (["--base", "{b}"], "--base applies to --method (or --average) only"),
    (["--density", "0.5"], "--density applies to --method (or --average) only"),
    (["--method", "ties", "--base", "{b}", "--weights", "1"], "1 weights for 2 models"),
])
def test_options_that_do_not_apply_are_refused(cli, tmp_path, zip_pth, args, message):
    args = [a.replace("{b}", str(zip_pth)) for a in args]
    result = cli("merge", zip_pth, zip_pth, *args, "-o", tmp_path / "m.pth")
    assert_one_error_line(result, message, code=2)
    assert not (tmp_path / "m.pth").exists()


def test_slerp_takes_exactly_two_and_a_bad_method_lists_the_choices(cli, tmp_path, zip_pth):
    three = cli("merge", zip_pth, zip_pth, zip_pth, "--method", "slerp", "--t", "0.5", "-o", tmp_path / "m.pth")
    assert_one_error_line(three, "--method slerp takes exactly 2 model(s), not 3", code=2)
    bad = cli("merge", zip_pth, zip_pth, "--method", "magic", "-o", tmp_path / "m.pth")
    assert bad.code == 2 and "linear" in bad.err and "dare-ties" in bad.err
    assert "dare-linear" in cli("merge", "--help").out


def test_models_that_disagree_with_the_base_are_named(cli, tmp_path):
    base, models, base_path, paths = make_models(tmp_path, count=2)
    odd = tmp_path / "odd.pth"
    sd = dict(models[1])
    sd["a.weight"] = torch.zeros(7, 5)
    sd["steps"] = torch.tensor([1.5])
    del sd["a.bias"]
    torch.save(sd, odd)
    result = cli("merge", paths[0], odd, "--base", base_path, "--method", "ties", "-o", tmp_path / "m.pth")
    assert_one_error_line(result, "agree with the base", f"{odd} lacks a.bias", "a.weight [6, 5] vs [7, 5]",
                          "steps int64 vs float32", "merge --into")
    assert not (tmp_path / "m.pth").exists()


def test_inf_and_nan_pass_through_without_a_warning(cli, tmp_path):
    a, b, base = tmp_path / "a.pth", tmp_path / "b.pth", tmp_path / "base.pth"
    torch.save({"w": torch.tensor([float("inf"), 1.0, float("nan"), 7e4])}, a)
    torch.save({"w": torch.tensor([1.0, float("-inf"), 2.0, 7e4])}, b)
    torch.save({"w": torch.zeros(4)}, base)
    for args in (["--method", "ties", "--base", base, "--density", "0.5"], ["--method", "slerp", "--t", "0.5"],
                 ["--average", "--dtype", "fp16"]):
        result = cli("merge", a, b, *args, "-o", tmp_path / "o.pth", "--force")
        assert result.code == 0 and "Warning" not in result.err, result.err


def test_a_tensor_of_many_chunks_read_whole_is_each_chunk_once(tmp_path, monkeypatch):
    """The writer reuses one buffer for a merged tensor's chunks; a reader that asks for the whole
    tensor at once (a cast, a gather) must still get every chunk, not the last one repeated."""
    from ckptsurgery.io import open_checkpoint
    from ckptsurgery.ops.merge.by_method import merge_by_method

    monkeypatch.setattr(methods, "CHUNK", 4)
    a, b = tmp_path / "a.pth", tmp_path / "b.pth"
    torch.save({"w": torch.arange(10.0)}, a)
    torch.save({"w": torch.arange(10.0) * 3}, b)
    with open_checkpoint(a) as ca, open_checkpoint(b) as cb:
        params = methods.resolve_parameters("linear", 2, {"weights": [1.0, 1.0]})
        merged = merge_by_method([ca, cb], None, "linear", params, None).tensors
        whole = np.frombuffer(bytes(merged["w"].data()), np.float32)
    assert whole.tolist() == (torch.arange(10.0) * 2).tolist()


@pytest.mark.parametrize("method, kit_method", [("dare-ties", "dare_ties"), ("dare-linear", "dare_linear")])
def test_dare_equals_mergekit_given_the_same_masks(cli, tmp_path, monkeypatch, method, kit_method):
    """mergekit draws DARE's masks from torch's global generator, we from PCG64 per key and
    chunk: handed our masks, mergekit's own merge (rescale, sign election, sums) gives our output."""
    sparsify = pytest.importorskip("mergekit.sparsify")
    from mergekit.merge_methods.api import merge_tensors

    base, models, base_path, paths = make_models(tmp_path, count=2)
    out = tmp_path / "ours.safetensors"
    assert cli("merge", *paths, "--base", base_path, "--method", method, "--density", "0.4", "--seed", "7",
               "--weights", "1,0.6", "--scale", "0.9", "-o", out).code == 0
    got = load_any(out)
    for name in SHAPES:
        calls = iter(range(2))

        def our_masks(tensor, density, rescale_norm=None, name=name):
            keep = ref_dare(torch.ones(tensor.shape), density, 7, name, next(calls)) != 0
            return sparsify.rescaled_masked_tensor(tensor, keep.to(tensor.dtype), rescale_norm)

        monkeypatch.setattr(sparsify, "bernoulli", our_masks)
        kit = merge_tensors([base[name], models[0][name], models[1][name]], kit_method, base_index=0,
                            parameters={"weight": [1.0, 0.6], "density": 0.4, "lambda": 0.9})
        torch.testing.assert_close(got[name], kit, rtol=1e-5, atol=1e-6, msg=name)


@pytest.mark.parametrize("method", ["dare-linear", "ties"])
def test_a_tensor_of_several_chunks_matches_the_formula(cli, tmp_path, method):
    """600 000 elements: three chunks, the last one short; DARE's draws change from chunk to chunk."""
    g = torch.Generator().manual_seed(3)
    base = torch.randn(600_000, generator=g)
    thetas = [base + 0.1 * torch.randn(600_000, generator=g) for _ in range(2)]
    from safetensors.torch import save_file

    paths = [tmp_path / f"{i}.safetensors" for i in range(3)]
    for path, tensor in zip(paths, [base, *thetas]):
        save_file({"w": tensor}, str(path))
    out = tmp_path / "o.safetensors"
    assert cli("merge", *paths[1:], "--base", paths[0], "--method", method, "--density", "0.3", "-o", out).code == 0
    close(load_any(out)["w"], ref_gta("w", base, thetas, [1.0, 1.0], method, density=0.3))


# ---- weights and seeds as given --------------------------------------------------------------------

@pytest.mark.parametrize("weights", ["1e-50,1e-50", "1e300,1e300"])
def test_linear_weights_outside_float32_do_not_make_nan(cli, tmp_path, weights):
    """--method linear multiplies float32 values by the raw weights (ops/methods/linear.py): 1e-50 rounds to 0 and 1e300 to inf, so equal accepted finite weights give NaN everywhere instead of the plain mean; normalise the weights (w/Σw, in float64) before the multiply, or refuse them."""
    save_file({"w": torch.tensor([1.0, 2.0])}, str(tmp_path / "a.safetensors"))
    save_file({"w": torch.tensor([3.0, 4.0])}, str(tmp_path / "b.safetensors"))
    out = tmp_path / "out.safetensors"
    result = cli("merge", tmp_path / "a.safetensors", tmp_path / "b.safetensors", "--method", "linear",
                 "--weights", weights, "-o", out)
    if result.code == 0:
        assert torch.equal(load_file(str(out))["w"], torch.tensor([2.0, 3.0]))
    else:
        assert_one_error_line(result, "--weights", code=2)


def test_seed_is_reported_as_given(cli, tmp_path):
    """The human summary formats every parameter with :g (cli/merge.py), so `--seed 123456789` is reported as 'seed 1.23457e+08' — not the seed, and not enough to reproduce the run; integers should print as integers."""
    torch.manual_seed(0)
    for n in "abc":
        save_file({"w": torch.randn(5, 3)}, str(tmp_path / f"{n}.safetensors"))
    result = cli("merge", tmp_path / "a.safetensors", tmp_path / "b.safetensors", "--method", "dare-linear",
                 "--base", tmp_path / "c.safetensors", "--density", "0.5", "--seed", "123456789",
                 "-o", tmp_path / "out.safetensors")
    assert result.code == 0, result.err
    assert "seed 123456789" in result.err + result.out, result.err


# ---- shared machinery: the same numbers whatever the chunks -----------------------------------------

@pytest.mark.parametrize("shape, how", [((7, 5), "rows"), ((3, 4, 5), "rows"), ((40,), "rows"), ((6, 5), "whole"),
                                        ((6, 5), "columns")])
def test_vectors_multiply_is_values_times_spread(shape, how):
    """Vectors.multiply (a row at a time, broadcast) gives the bits of values * spread(...), for
    any chunk: partial rows at either end, chunks shorter than a row, whole rows."""
    from ckptsurgery.ops.methods._vectors import Vectors

    rng = np.random.default_rng(3)
    numel = math.prod(shape)
    values = rng.standard_normal(numel).astype(np.float32)
    vectors = Vectors(shape, numel, how)
    per_vector = rng.standard_normal(vectors.count).astype(np.float32)
    for start, count in [(0, numel), (0, 3), (2, 9), (5, 10), (4, numel - 4), (numel - 1, 1)]:
        want = values[start:start + count] * vectors.spread(start, count, per_vector)
        got = vectors.multiply(start, values[start:start + count].copy(), per_vector)
        assert got.tobytes() == np.asarray(want, np.float32).tobytes(), (start, count)


@pytest.mark.parametrize("stored", [1 << 20, 3])
def test_rank_window_in_float32_passes_selects_what_a_partition_of_the_whole_selects(stored, monkeypatch):
    """RankWindow in float32 finds its edges by histograms of the values' bits over the chunks
    (nothing whole held); the partition of the whole array (the path other dtypes take) is the
    reference: the same mask for every chunk, with ties at the edges, zeros, denormals, inf and
    NaN, any window, any chunk size, SCE's window from the count of nonzero values; the sums to
    float64 rounding. stored=3: the edges' keys too many to keep, a third pass counts them."""
    from ckptsurgery.ops.methods import _select

    monkeypatch.setattr(_select, "STORED", stored)
    rng = np.random.default_rng(5)
    pools = [lambda n: np.abs(rng.standard_normal(n)), lambda n: rng.integers(0, 4, n),
             lambda n: rng.choice(np.array([0, 1e-40, 1e-3, 2.5, np.inf, np.nan]), n),
             lambda n: np.where(rng.random(n) < 0.2, np.nan, np.abs(rng.standard_normal(n)))]
    for trial in range(250):
        n = int(rng.integers(1, 300))
        v = np.asarray(pools[trial % len(pools)](n), np.float32)
        size = int(rng.integers(1, n + 2))
        spans = [(s, min(size, n - s)) for s in range(0, n, size)]

        def values(j, out):
            start, count = spans[j]
            out[:] = v[start:start + count]

        if trial % 5 == 0:
            fraction = float(rng.random())
            a, b = (lambda nonzero: (0, int(nonzero * fraction))), None
        else:
            a = int(rng.integers(-1, n + 2))
            b = int(rng.integers(a, n + 3))
        got = _select.RankWindow._streamed(n, spans, values, a, b, True)
        want = _select.RankWindow._held(n, spans, values, "float32", a, b, True)
        for j, (start, count) in enumerate(spans):
            assert np.array_equal(got.keep(j, v[start:start + count]), want.keep(j, v[start:start + count])), (trial, j)
        if not math.isnan(want.total_sum):
            for x, y in ((got.kept_sum, want.kept_sum), (got.total_sum, want.total_sum)):
                assert x == y or abs(x - y) <= 1e-12 * abs(y), (trial, x, y)
