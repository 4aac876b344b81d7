"""Review 12: hostile adapters and careless use of `merge --method`, `merge --lora` and
`extract-lora`. Every test here fails on the code as reviewed; each docstring says what is wrong
and what should happen instead."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file, save_file

from conftest import ROOT, assert_one_error_line, load_any

PREFIX = "base_model.model."


def make_adapter(folder, config=None, tensors=None, raw_config: str | None = None):
    """A hand-made PEFT folder: r=2, alpha=4 on `lin` (A [2, 3], B [4, 2]) unless told otherwise."""
    folder.mkdir(parents=True, exist_ok=True)
    doc = {"peft_type": "LORA", "r": 2, "lora_alpha": 4, "target_modules": ["lin"]}
    doc.update(config or {})
    (folder / "adapter_config.json").write_text(raw_config if raw_config is not None else json.dumps(doc))
    if tensors is None:
        tensors = {f"{PREFIX}lin.lora_A.weight": torch.ones(2, 3), f"{PREFIX}lin.lora_B.weight": torch.ones(4, 2)}
    save_file(tensors, str(folder / "adapter_model.safetensors"))
    return folder


def make_base(path, **shapes):
    shapes = shapes or {"lin.weight": (4, 3)}
    save_file({k.replace("__", "."): torch.zeros(*s) for k, s in shapes.items()}, str(path))
    return path


def assert_no_crash(result):
    """Either it worked, or it refused with one clean line (never the catch-all)."""
    if result.code != 0:
        assert_one_error_line(result, code=result.code)
    assert "Traceback" not in result.err and "Warning" not in result.err, result.err


def run_cli(args, timeout, data_limit=None):
    """The real console entry point in a subprocess (a hang or a memory blow-up must not take
    the test run down with it)."""

    def limit():
        if data_limit is not None:
            import resource

            resource.setrlimit(resource.RLIMIT_DATA, (data_limit, data_limit))

    env = {**os.environ, "PYTHONPATH": ROOT}
    env.pop("CKPTSURGERY_DEBUG", None)
    return subprocess.run([sys.executable, "-c", "from ckptsurgery.cli import main; main()", *map(str, args)],
                          capture_output=True, text=True, timeout=timeout, preexec_fn=limit, env=env)


# ---- merge --lora: hostile adapter_config.json ------------------------------------------------

@pytest.mark.parametrize("config", [
    {"r": 10 ** 400},  # a JSON integer: Python makes it an int that math.isfinite cannot take
    {"lora_alpha": 10 ** 400},
    {"target_modules": "(unclosed"},  # a regex string that does not compile
    {"target_modules": [1, "lin"]},  # not strings
    {"target_modules": [["lin"]]},
], ids=["r-huge-int", "alpha-huge-int", "target-bad-regex", "target-int", "target-nested-list"])
def test_adapter_config_wrong_types_are_one_clear_line(cli, tmp_path, config):
    """A hostile adapter_config.json (huge int r/lora_alpha, target_modules a broken regex or a list of non-strings) hits the catch-all (OverflowError/re.error/TypeError, lora.py _number/_targets); it should be refused as a bad config in one line."""
    adapter = make_adapter(tmp_path / "adapter", config)
    base = make_base(tmp_path / "base.safetensors")
    result = cli("merge", base, "--lora", adapter, "-o", tmp_path / "out.safetensors")
    assert_one_error_line(result, "adapter_config.json")
    assert not (tmp_path / "out.safetensors").exists()


def test_deeply_nested_adapter_config_is_one_clear_line(cli, tmp_path):
    """A 200 KB adapter_config.json nested 100 000 deep raises RecursionError, which lora.py _read_json does not catch (catch-all line); it should say the config is not readable JSON."""
    raw = '{"peft_type": "LORA", "r": 2, "lora_alpha": 4, "x": ' + "[" * 100_000 + "]" * 100_000 + "}"
    adapter = make_adapter(tmp_path / "adapter", raw_config=raw)
    base = make_base(tmp_path / "base.safetensors")
    result = cli("merge", base, "--lora", adapter, "-o", tmp_path / "out.safetensors")
    assert_one_error_line(result, "adapter_config.json")


def test_catastrophic_rank_pattern_does_not_hang(tmp_path):
    """rank_pattern (and target_modules as a string) are run as Python regexes against module names the same file chooses: `(a+)+b` against a 40-letter name backtracks 2^40 times (lora.py pattern_key); the tool hangs instead of refusing or bounding the match."""
    name = "a" * 40
    adapter = make_adapter(tmp_path / "adapter", {"rank_pattern": {"(a+)+b": 2}, "target_modules": None},
                           {f"{PREFIX}{name}.lora_A.weight": torch.ones(2, 3),
                            f"{PREFIX}{name}.lora_B.weight": torch.ones(4, 2)})
    base = tmp_path / "base.safetensors"
    save_file({f"{name}.weight": torch.zeros(4, 3)}, str(base))
    try:
        result = run_cli(["merge", base, "--lora", adapter, "-o", tmp_path / "out.safetensors"], timeout=8)
    except subprocess.TimeoutExpired:
        pytest.fail("merge --lora hung on a 1 KB adapter_config.json's rank_pattern")
    assert result.returncode in (0, 1), result.stderr


# ---- merge --lora: names --------------------------------------------------------------------

def test_kohya_te_with_another_digit_is_not_a_stop_iteration(cli, tmp_path):
    """`lora_te4_…` passes _KOHYA_KEY (`te\\d?`) but no entry of _KOHYA_PREFIXES starts it, so _KohyaResolver.__call__'s next() raises StopIteration (catch-all line 'StopIteration: '); it should resolve the name (any te<digit>_) or refuse it in one line."""
    base = make_base(tmp_path / "base.safetensors", fc__weight=(4, 3))
    lora = tmp_path / "te4.safetensors"
    save_file({"lora_te4_fc.lora_down.weight": torch.ones(2, 3), "lora_te4_fc.lora_up.weight": torch.ones(4, 2)},
              str(lora))
    result = cli("merge", base, "--lora", lora, "-o", tmp_path / "out.safetensors")
    assert_no_crash(result)
    assert "StopIteration" not in result.err


def test_long_dotted_key_is_not_a_quadratic_allocation(tmp_path):
    """An 80 KB base whose one key has 40 000 dots makes _KohyaResolver (and _PeftResolver.tails, _suffixes) build every dotted tail: ~3 GB for 80 KB, growing as the square (lora.py _suffixes); names should be matched without materialising all tails (e.g. index by the last k parts, or cap the depth as --tree does)."""
    key = ".".join(["a"] * 40_000) + ".weight"
    base = tmp_path / "base.safetensors"
    save_file({key: torch.zeros(4, 3), "fc.weight": torch.zeros(4, 3)}, str(base))
    lora = tmp_path / "k.safetensors"
    save_file({"lora_unet_fc.lora_down.weight": torch.ones(2, 3), "lora_unet_fc.lora_up.weight": torch.ones(4, 2)},
              str(lora))
    out = tmp_path / "out.safetensors"
    result = run_cli(["merge", base, "--lora", lora, "-o", out], timeout=60, data_limit=1536 * 2**20)
    assert result.returncode in (0, 1), result.stderr
    assert "MemoryError" not in result.stderr, result.stderr
    if result.returncode == 0:
        assert torch.equal(load_file(str(out))["fc.weight"], torch.full((4, 3), 2.0))


def test_adapter_file_given_by_name_is_the_file_folded(cli, tmp_path):
    """`--lora run/adapter_model.step500.safetensors` (any name starting `adapter_model.`) silently folds run/adapter_model.safetensors instead — and a name that does not exist at all is accepted (lora.py read_adapter/_read_peft); the file named should be the one read, or refused if missing."""
    adapter = make_adapter(tmp_path / "run")  # adapter_model.safetensors: A = 1
    step = tmp_path / "run" / "adapter_model.step500.safetensors"
    save_file({f"{PREFIX}lin.lora_A.weight": torch.full((2, 3), 10.0),
               f"{PREFIX}lin.lora_B.weight": torch.ones(4, 2)}, str(step))
    base = make_base(tmp_path / "base.safetensors")
    out = tmp_path / "out.safetensors"
    assert cli("merge", base, "--lora", step, "-o", out).code == 0
    # scale alpha/r = 2; B·A = 2·10 per entry
    assert torch.equal(load_file(str(out))["lin.weight"], torch.full((4, 3), 40.0))
    missing = cli("merge", base, "--lora", adapter / "adapter_model.typo", "-o", tmp_path / "o2.safetensors")
    assert_one_error_line(missing, "adapter_model.typo")


@pytest.mark.parametrize("kind", ["kohya", "peft"])
def test_two_modules_of_one_adapter_on_one_weight_are_refused(cli, tmp_path, kind):
    """Two modules of ONE adapter that resolve to the same base weight (kohya lora_te1_x and lora_te2_x on a one-encoder base; peft `lin` and `m.lin` via the prefix rule) are both folded — the delta is applied twice and the report says '1 weights' (lora.py fold); it should refuse, naming both."""
    if kind == "kohya":
        base = make_base(tmp_path / "base.safetensors", text_model__fc__weight=(4, 3))
        adapter = tmp_path / "dup.safetensors"
        save_file({f"lora_te{i}_text_model_fc.{p}": t for i in (1, 2)
                   for p, t in (("lora_down.weight", torch.ones(2, 3)), ("lora_up.weight", torch.ones(4, 2)))},
                  str(adapter))
    else:
        base = make_base(tmp_path / "base.safetensors")
        adapter = make_adapter(tmp_path / "dup", {"target_modules": None},
                               {f"{PREFIX}{m}.lora_{ab}.weight": torch.ones(*s) for m in ("lin", "m.lin")
                                for ab, s in (("A", (2, 3)), ("B", (4, 2)))})
    result = cli("merge", base, "--lora", adapter, "-o", tmp_path / "out.safetensors")
    assert_one_error_line(result)
    assert not (tmp_path / "out.safetensors").exists()


# ---- merge --method -------------------------------------------------------------------------

@pytest.mark.parametrize("weights", ["1e-50,1e-50", "1e300,1e300"])
def test_linear_weights_outside_float32_do_not_make_nan(cli, tmp_path, weights):
    """--method linear multiplies float32 values by the raw weights (methods.py TensorMerge._chunk): 1e-50 rounds to 0 and 1e300 to inf, so equal accepted finite weights give NaN everywhere instead of the plain mean; normalise the weights (w/Σw, in float64) before the multiply, or refuse them."""
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


# ---- extract-lora ---------------------------------------------------------------------------

@pytest.mark.parametrize("layout", ["dtype", "transposed"])
def test_extract_complex_tensors_print_no_warning(tmp_path, layout):
    """A complex tensor that differs in dtype (or is a non-contiguous view) goes through lora.py _differs' `as_torch(a).float()`, and torch prints 'UserWarning: Casting complex values to real discards the imaginary part' on stderr; compare without the cast (e.g. view_as_real / torch.equal)."""
    torch.manual_seed(0)
    if layout == "dtype":
        c_base, c_tuned = torch.randn(3, dtype=torch.complex64), torch.randn(3, dtype=torch.complex128)
    else:
        c_base, c_tuned = torch.randn(3, 2, dtype=torch.complex64).t(), torch.randn(2, 3, dtype=torch.complex64)
    torch.save({"fc.weight": torch.randn(4, 3), "c": c_base}, tmp_path / "base.pth")
    torch.save({"fc.weight": torch.randn(4, 3), "c": c_tuned}, tmp_path / "tuned.pth")
    # in a subprocess: in-process, pytest's warning capture would hide what a user sees on stderr
    result = run_cli(["extract-lora", tmp_path / "base.pth", tmp_path / "tuned.pth", "--rank", "2", "-o", tmp_path / "x"],
                     timeout=60)
    assert result.returncode == 0, result.stderr
    assert "Warning" not in result.stderr, result.stderr


def test_extract_float32_difference_near_max_does_not_write_inf_factors(cli, tmp_path):
    """A finite float32 difference near float32's max has a singular value above it: the float32 SVD (lora.py _SvdCache.factors) gives inf, and the adapter is written with -inf factors while the report states a relative error of 0.0; compute in float64 (or check the factors are finite and refuse)."""
    torch.save({"fc.weight": torch.zeros(4, 3)}, tmp_path / "base.pth")
    torch.save({"fc.weight": torch.full((4, 3), 3e38)}, tmp_path / "tuned.pth")
    out = tmp_path / "x"
    result = cli("extract-lora", tmp_path / "base.pth", tmp_path / "tuned.pth", "--rank", "1", "-o", out)
    if result.code == 0:
        factors = load_file(str(out / "adapter_model.safetensors"))
        assert all(bool(torch.isfinite(t).all()) for t in factors.values()), factors
    else:
        assert_one_error_line(result, "fc.weight")


def test_extract_float64_large_values_report_a_real_error(cli, tmp_path):
    """For a float64 rank-1 difference of 1e200s, s² overflows in lora.py _SvdCache.factors and the relative error is reported as nan (JSON "nan") though the rank-1 extraction is exact; scale by the largest singular value before squaring."""
    torch.save({"fc.weight": torch.zeros(4, 3, dtype=torch.float64)}, tmp_path / "base.pth")
    torch.save({"fc.weight": torch.full((4, 3), 1e200, dtype=torch.float64)}, tmp_path / "tuned.pth")
    result = cli("extract-lora", tmp_path / "base.pth", tmp_path / "tuned.pth", "--rank", "1", "-o", tmp_path / "x",
                 "--json")
    assert result.code == 0, result.err
    error = result.json()["extracted"][0]["error"]
    assert isinstance(error, float) and error < 1e-6, error


def test_extract_force_does_not_delete_what_is_not_the_adapter(cli, tmp_path):
    """extract-lora --force over a folder that holds adapter_config.json replaces the whole folder (lora.py _check_folder + stage_folder): a trainer's output dir loses its checkpoint-*/ subfolders and tokenizer files; it should replace only the adapter's two files, or refuse a folder holding anything else."""
    base = make_base(tmp_path / "base.safetensors")
    torch.manual_seed(0)
    save_file({"lin.weight": torch.randn(4, 3)}, str(tmp_path / "tuned.safetensors"))
    run = make_adapter(tmp_path / "run")
    (run / "checkpoint-500").mkdir()
    (run / "checkpoint-500" / "optimizer.pt").write_bytes(b"weeks of training")
    (run / "tokenizer.json").write_text("{}")
    result = cli("extract-lora", base, tmp_path / "tuned.safetensors", "--rank", "1", "-o", run, "--force")
    if result.code == 0:
        assert (run / "checkpoint-500" / "optimizer.pt").exists() and (run / "tokenizer.json").exists()
    else:
        assert_one_error_line(result)
        assert (run / "checkpoint-500" / "optimizer.pt").exists()


def test_extract_from_a_tied_base_does_not_claim_an_exact_round_trip(cli, tmp_path):
    """BASE ties emb/head (one storage), TUNED changed head only: extract-lora reports head with relative error 0.0 and emb 'unchanged', but folding the adapter back into BASE (which keeps the tie, as peft does) moves emb.weight by 1.0 — the report's promise is false; a weight tied in BASE but not in TUNED should be refused or listed as not extractable (lora.py extract_lora, 'tied in BASE only: each its own')."""
    torch.manual_seed(0)
    emb = torch.randn(6, 4)
    torch.save({"emb.weight": emb, "head.weight": emb}, tmp_path / "base.pth")
    head = emb.clone()
    head[0] += 1.0
    torch.save({"emb.weight": emb.clone(), "head.weight": head}, tmp_path / "tuned.pth")
    extracted = cli("extract-lora", tmp_path / "base.pth", tmp_path / "tuned.pth", "--rank", "4",
                    "-o", tmp_path / "x", "--json")
    if extracted.code != 0:
        assert_one_error_line(extracted, "head")
        return
    if any(n["name"].startswith("head") for n in extracted.json()["not_extracted"]):
        return
    assert cli("merge", tmp_path / "base.pth", "--lora", tmp_path / "x", "-o", tmp_path / "back.pth").code == 0
    back = load_any(tmp_path / "back.pth")
    assert torch.allclose(back["head.weight"], head, atol=1e-5)
    assert torch.allclose(back["emb.weight"], emb, atol=1e-5), "emb.weight moved though TUNED left it unchanged"


def test_one_module_saved_with_and_without_an_adapter_name_is_refused(cli, tmp_path):
    """`lin.lora_A.weight` beside `lin.lora_A.default.weight`: folding either silently would be a guess."""
    base = make_base(tmp_path / "base.safetensors", **{"lin.weight": (3, 2)})
    make_adapter(tmp_path / "ad", {"r": 1, "lora_alpha": 1}, {
        "base_model.model.lin.lora_A.weight": torch.ones(1, 2),
        "base_model.model.lin.lora_A.default.weight": torch.full((1, 2), 2.0),
        "base_model.model.lin.lora_B.weight": torch.ones(3, 1),
    })
    result = cli("merge", base, "--lora", tmp_path / "ad", "-o", tmp_path / "o.safetensors")
    assert_one_error_line(result, "module lin has two A weights")
    assert not (tmp_path / "o.safetensors").exists()
