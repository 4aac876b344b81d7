"""`ckptsurgery lora`: fold and extract (the same operations as `merge --lora` and `extract-lora`),
merge several adapters into one (held to peft's `add_weighted_adapter`, "cat" and "svd", and to the
best rank-R approximation computed with torch.linalg.svd), resize one (held to the SVD of its ΔW),
convert between PEFT folders and kohya files (folding either gives the same weights); outputs
peft loads; refusals in one line."""

from __future__ import annotations

import json
import warnings

import pytest
import torch
from safetensors.torch import load_file, save_file
from torch import nn

from conftest import assert_one_error_line

peft = pytest.importorskip("peft")
pytest.importorskip("transformers")

from peft import LoraConfig, PeftModel, get_peft_model  # noqa: E402
from transformers.pytorch_utils import Conv1D  # noqa: E402


class Tiny(nn.Module):
    """A linear (not square), a square linear, a conv, an embedding and a GPT-2 Conv1D."""

    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(6, 5)
        self.sq = nn.Linear(5, 5, bias=False)
        self.conv = nn.Conv2d(3, 4, 3)
        self.emb = nn.Embedding(9, 4)
        self.gpt = Conv1D(7, 5)  # weight [5, 7]: [in, out]


def tiny() -> Tiny:
    torch.manual_seed(0)
    return Tiny()


def make_adapter(folder, targets, seed, **config):
    """A peft adapter on Tiny with every factor random (peft starts B at 0)."""
    with warnings.catch_warnings():  # peft's, about Conv1D and lora_bias: not the command's stderr
        warnings.simplefilter("ignore")
        model = get_peft_model(tiny(), LoraConfig(target_modules=targets, **config))
        g = torch.Generator().manual_seed(seed)
        for name, p in model.named_parameters():
            if "lora_" in name:
                p.data = torch.randn(p.shape, generator=g) * 0.3
        model.save_pretrained(str(folder))
    return folder


@pytest.fixture
def two(tmp_path):
    """Two adapters of different ranks, alphas and targets (rsLoRA one of them), and the base."""
    a = make_adapter(tmp_path / "a", ["lin", "sq", "conv", "emb"], 1, r=2, lora_alpha=3)
    b = make_adapter(tmp_path / "b", ["lin", "sq", "emb", "gpt"], 2, r=3, lora_alpha=5, use_rslora=True)
    save_file(tiny().state_dict(), tmp_path / "base.safetensors")
    return a, b, tmp_path / "base.safetensors"


def folded(cli, base, adapter, out):
    result = cli("lora", "fold", base, adapter, "-o", out, "--force")
    assert result.code == 0, result.err
    return load_file(out)


def peft_combined(adapters, weights, how, **options) -> dict:
    """peft's own: the adapters loaded into one model, add_weighted_adapter, merged."""
    model = PeftModel.from_pretrained(tiny(), str(adapters[0]), adapter_name="a0")
    for i, path in enumerate(adapters[1:], 1):
        model.load_adapter(str(path), adapter_name=f"a{i}")
    model.add_weighted_adapter([f"a{i}" for i in range(len(adapters))], weights, "mix", combination_type=how,
                               **options)
    model.set_adapter("mix")
    return {k: v.detach().clone() for k, v in model.merge_and_unload(adapter_names=["mix"]).state_dict().items()}


def assert_close(got: dict, ref: dict, rtol=1e-5, atol=1e-6):
    assert sorted(got) == sorted(ref)
    for k in ref:
        assert torch.allclose(got[k], ref[k], rtol=rtol, atol=atol), (k, float((got[k] - ref[k]).abs().max()))


def deltas(base: dict, adapters) -> list[dict]:
    """Each adapter's ΔW (scale included) per base key, from peft's merge_and_unload."""
    out = []
    for path in adapters:
        merged = PeftModel.from_pretrained(tiny(), str(path)).merge_and_unload().state_dict()
        out.append({k: merged[k] - base[k] for k in base})
    return out


# ---- lora merge --------------------------------------------------------------------------------

def test_cat_equals_peft_cat_and_the_weighted_sum_and_peft_loads_it(cli, tmp_path, two):
    a, b, base = two
    result = cli("lora", "merge", a, b, "--weights", "0.7,-1.2", "--combine", "cat", "-o", tmp_path / "cat", "--json")
    assert result.code == 0, result.err
    doc = result.json()
    assert doc["combine"] == "cat" and doc["rank"] is None and doc["weights"] == [0.7, -1.2]
    rows = {m["name"]: m for m in doc["modules"]}
    assert rows["lin"]["ranks"] == [2, 3] and rows["lin"]["rank"] == 5 and rows["lin"]["alpha"] == 5
    assert rows["conv"]["ranks"] == [2, 0] and rows["gpt"]["ranks"] == [0, 3]  # as peft: only the adapters that have it
    assert all(m["error"] == 0 for m in doc["modules"])
    ours = folded(cli, base, tmp_path / "cat", tmp_path / "cat.safetensors")
    assert_close(ours, peft_combined([a, b], [0.7, -1.2], "cat"))
    start = load_file(base)
    d = deltas(start, [a, b])
    assert_close(ours, {k: start[k] + 0.7 * d[0][k] - 1.2 * d[1][k] for k in start})
    loaded = PeftModel.from_pretrained(tiny(), str(tmp_path / "cat")).merge_and_unload().state_dict()
    assert_close({k: v.detach() for k, v in loaded.items()}, ours)


def best_rank(matrix: torch.Tensor, rank: int) -> torch.Tensor:
    u, s, vh = torch.linalg.svd(matrix.double(), full_matrices=False)
    return (u[:, :rank] * s[:rank]) @ vh[:rank]


def test_svd_is_the_best_rank_r_approximation_of_the_weighted_sum_as_peft_svd(cli, tmp_path, two):
    a, b, base = two
    result = cli("lora", "merge", a, b, "--weights", "0.5,1", "--combine", "svd", "--rank", "2", "-o", tmp_path / "svd",
                 "--json")
    assert result.code == 0, result.err
    doc = result.json()
    assert doc["rank"] == 2 and {m["rank"] for m in doc["modules"]} == {2}
    ours = folded(cli, base, tmp_path / "svd", tmp_path / "svd.safetensors")
    start = load_file(base)
    d = deltas(start, [a, b])
    errors = {m["name"]: m["error"] for m in doc["modules"]}
    for name, key in (("lin", "lin.weight"), ("sq", "sq.weight"), ("conv", "conv.weight"), ("emb", "emb.weight"),
                      ("gpt", "gpt.weight")):
        total = 0.5 * d[0][key] + d[1][key]
        flat = total.T if name in ("emb", "gpt") else total.flatten(1)  # B·A's orientation
        best = best_rank(flat, 2)
        best = (best.T if name in ("emb", "gpt") else best.reshape(total.shape)).float()
        assert torch.allclose(ours[key], start[key] + best, atol=1e-5), name
        s = torch.linalg.svdvals(flat.double())
        assert errors[name] == pytest.approx(float(s[2:].norm() / s.norm()), rel=1e-4, abs=1e-6)
    # peft's svd (full_matrices, no clamp) reaches the same approximation
    assert_close(ours, peft_combined([a, b], [0.5, 1.0], "svd", svd_rank=2), rtol=1e-4, atol=1e-5)
    loaded = PeftModel.from_pretrained(tiny(), str(tmp_path / "svd")).merge_and_unload().state_dict()
    assert_close({k: v.detach() for k, v in loaded.items()}, ours)


def test_svd_rank_defaults_to_the_largest_and_cat_of_kohya_files_is_a_kohya_file(cli, tmp_path):
    g = torch.Generator().manual_seed(4)
    rnd = lambda *s: torch.randn(*s, generator=g)  # noqa: E731
    base = {"blocks.0.proj.weight": rnd(6, 4), "blocks.0.conv.weight": rnd(5, 3, 3, 3)}
    save_file(base, tmp_path / "base.safetensors")
    one = {"lora_unet_blocks_0_proj.lora_down.weight": rnd(2, 4), "lora_unet_blocks_0_proj.lora_up.weight": rnd(6, 2),
           "lora_unet_blocks_0_proj.alpha": torch.tensor(1.0)}
    other = {"lora_unet_blocks_0_proj.lora_down.weight": rnd(3, 4), "lora_unet_blocks_0_proj.lora_up.weight": rnd(6, 3),
             "lora_unet_blocks_0_conv.lora_down.weight": rnd(2, 3, 3, 3),
             "lora_unet_blocks_0_conv.lora_up.weight": rnd(5, 2, 1, 1)}
    save_file(one, tmp_path / "one.safetensors")
    save_file(other, tmp_path / "other.safetensors")
    out = tmp_path / "both.safetensors"
    result = cli("lora", "merge", tmp_path / "one.safetensors", tmp_path / "other.safetensors", "--combine", "cat",
                 "-o", out)
    assert result.code == 0, result.err
    assert "wrote" in result.err and "2 modules" in result.err
    written = load_file(out)
    assert written["lora_unet_blocks_0_proj.lora_down.weight"].shape == (5, 4)
    expected = {k: v.clone() for k, v in base.items()}
    expected["blocks.0.proj.weight"] += 0.5 * one["lora_unet_blocks_0_proj.lora_up.weight"] @ one[
        "lora_unet_blocks_0_proj.lora_down.weight"] + other["lora_unet_blocks_0_proj.lora_up.weight"] @ other[
        "lora_unet_blocks_0_proj.lora_down.weight"]
    expected["blocks.0.conv.weight"] += (other["lora_unet_blocks_0_conv.lora_up.weight"].flatten(1) @ other[
        "lora_unet_blocks_0_conv.lora_down.weight"].flatten(1)).reshape(5, 3, 3, 3)
    assert_close(folded(cli, tmp_path / "base.safetensors", out, tmp_path / "f.safetensors"), expected, atol=1e-5)
    svd = cli("lora", "merge", tmp_path / "one.safetensors", tmp_path / "other.safetensors", "--combine", "svd",
              "-o", tmp_path / "svd.safetensors", "--json").json()
    assert svd["rank"] == 3 and [m["rank"] for m in svd["modules"]] == [3, 2]  # the conv's sum has rank 2


# ---- lora resize -------------------------------------------------------------------------------

def test_resize_is_the_truncated_svd_of_its_delta_with_its_scale_kept(cli, tmp_path):
    adapter = make_adapter(tmp_path / "a", ["lin", "sq", "conv", "emb", "gpt"], 3, r=4, lora_alpha=6)
    save_file(tiny().state_dict(), tmp_path / "base.safetensors")
    result = cli("lora", "resize", adapter, "--rank", "2", "-o", tmp_path / "r2", "--json")
    assert result.code == 0, result.err
    doc = result.json()
    rows = {m["name"]: m for m in doc["modules"]}
    assert all(m["ranks"] == [4] and m["rank"] == 2 and m["alpha"] == pytest.approx(1.5 * 2) for m in rows.values())
    config = json.loads((tmp_path / "r2" / "adapter_config.json").read_text())
    assert config["r"] == 2 and config["lora_alpha"] == 3
    start = load_file(tmp_path / "base.safetensors")
    (d,) = deltas(start, [adapter])
    ours = folded(cli, tmp_path / "base.safetensors", tmp_path / "r2", tmp_path / "r2.safetensors")
    for name in rows:
        key = f"{name}.weight"
        flat = d[key].T if name in ("emb", "gpt") else d[key].flatten(1)
        s = torch.linalg.svdvals(flat.double())
        # the error is the discarded singular values' norm, relative to ΔW's
        assert rows[name]["error"] == pytest.approx(float(s[2:].norm() / s.norm()), rel=1e-5)
        got = (ours[key] - start[key]).double()
        got = got.T if name in ("emb", "gpt") else got.flatten(1)
        assert float((flat.double() - got).norm()) == pytest.approx(float(s[2:].norm()), rel=1e-3)
    assert PeftModel.from_pretrained(tiny(), str(tmp_path / "r2")) is not None


def test_energy_picks_the_smallest_rank_reaching_it(cli, tmp_path):
    from ckptsurgery.ops.adapters.lowrank import energy_rank

    s = torch.tensor([3.0, 2.0, 1.0])  # s² = 9, 4, 1 of 14: 0.643, 0.929, 1
    assert [energy_rank(s, e) for e in (0.5, 9 / 14, 0.9, 13 / 14, 0.93, 1.0)] == [1, 1, 2, 2, 3, 3]
    assert energy_rank(torch.zeros(3), 0.5) == 1
    q, _ = torch.linalg.qr(torch.randn(8, 3, generator=torch.Generator().manual_seed(0)))
    p, _ = torch.linalg.qr(torch.randn(6, 3, generator=torch.Generator().manual_seed(1)))
    lora = {"lora_unet_x.lora_up.weight": (q * s).contiguous(), "lora_unet_x.lora_down.weight": p.T.contiguous(),
            "lora_unet_x.alpha": torch.tensor(1.5)}
    save_file(lora, tmp_path / "x.safetensors")
    for energy, rank in (("0.9", 2), ("0.95", 3), ("0.5", 1)):
        doc = cli("lora", "resize", tmp_path / "x.safetensors", "--energy", energy, "-o", tmp_path / f"{energy}.safetensors",
                  "--json").json()
        assert doc["energy"] == float(energy) and doc["modules"][0]["rank"] == rank
        assert doc["modules"][0]["alpha"] == pytest.approx(0.5 * rank)  # scale 1.5/3 kept
    assert float(load_file(tmp_path / "0.9.safetensors")["lora_unet_x.alpha"]) == pytest.approx(1.0)


def test_extract_with_energy_finds_a_differences_rank(cli, tmp_path):
    g = torch.Generator().manual_seed(5)
    base = {"a.weight": torch.randn(12, 10, generator=g), "b.weight": torch.randn(8, 8, generator=g)}
    tuned = {"a.weight": base["a.weight"] + torch.randn(12, 3, generator=g) @ torch.randn(3, 10, generator=g),
             "b.weight": base["b.weight"] + torch.randn(8, 1, generator=g) @ torch.randn(1, 8, generator=g)}
    save_file(base, tmp_path / "base.safetensors")
    save_file(tuned, tmp_path / "tuned.safetensors")
    doc = cli("lora", "extract", tmp_path / "base.safetensors", tmp_path / "tuned.safetensors", "--energy", "0.999999",
              "-o", tmp_path / "x", "--json").json()
    assert doc["energy"] == 0.999999 and [p["rank"] for p in doc["extracted"]] == [3, 1]
    assert all(p["error"] < 1e-3 for p in doc["extracted"])
    back = folded(cli, tmp_path / "base.safetensors", tmp_path / "x", tmp_path / "back.safetensors")
    assert_close(back, tuned, atol=1e-4)
    assert PeftModel is not None and json.loads((tmp_path / "x" / "adapter_config.json").read_text())["rank_pattern"]


# ---- lora fold / extract: the same as merge --lora and extract-lora -------------------------------

def test_fold_and_extract_are_merge_lora_and_extract_lora(cli, tmp_path, two):
    a, b, base = two
    assert cli("merge", base, "--lora", a, "--lora", b, "--lora-scale", "0.5", "-o", tmp_path / "m.safetensors").code == 0
    result = cli("lora", "fold", base, a, b, "--scale", "0.5", "-o", tmp_path / "f.safetensors", "--json")
    assert result.code == 0 and result.json()["mode"] == "lora"
    assert (tmp_path / "m.safetensors").read_bytes() == (tmp_path / "f.safetensors").read_bytes()
    assert cli("extract-lora", base, tmp_path / "m.safetensors", "--rank", "3", "-o", tmp_path / "e1").code == 0
    assert cli("lora", "extract", base, tmp_path / "m.safetensors", "--rank", "3", "-o", tmp_path / "e2").code == 0
    for name in ("adapter_config.json", "adapter_model.safetensors"):
        assert (tmp_path / "e1" / name).read_bytes() == (tmp_path / "e2" / name).read_bytes()
    assert_one_error_line(cli("lora", "fold", base, a, b, "--scale", "1", "--scale", "2", "--scale", "3",
                              "-o", tmp_path / "x.safetensors"), "--scale given 3", code=2)


# ---- lora convert ------------------------------------------------------------------------------

def test_convert_round_trip_folds_the_same_and_peft_loads_it(cli, tmp_path):
    adapter = make_adapter(tmp_path / "a", ["lin", "sq", "conv"], 6, r=3, lora_alpha=4, rank_pattern={"conv": 2})
    base = tmp_path / "base.safetensors"
    save_file(tiny().state_dict(), base)
    result = cli("lora", "convert", adapter, "--to", "kohya", "-o", tmp_path / "k.safetensors", "--json")
    assert result.code == 0, result.err
    assert result.json()["names"] == {"lin": "lora_unet_lin", "sq": "lora_unet_sq", "conv": "lora_unet_conv"}
    kohya = load_file(tmp_path / "k.safetensors")
    assert float(kohya["lora_unet_conv.alpha"]) == 4 and kohya["lora_unet_conv.lora_down.weight"].shape == (2, 3, 3, 3)
    back = cli("lora", "convert", tmp_path / "k.safetensors", "--to", "peft", "--base", base, "-o", tmp_path / "p",
               "--json")
    assert back.code == 0, back.err
    assert back.json()["names"] == {"lora_unet_lin": "lin", "lora_unet_sq": "sq", "lora_unet_conv": "conv"}
    original = folded(cli, base, adapter, tmp_path / "o.safetensors")
    for converted in (tmp_path / "k.safetensors", tmp_path / "p"):
        again = folded(cli, base, converted, tmp_path / "c.safetensors")
        assert all(torch.equal(again[k], original[k]) for k in original)
    loaded = PeftModel.from_pretrained(tiny(), str(tmp_path / "p")).merge_and_unload().state_dict()
    assert_close({k: v.detach() for k, v in loaded.items()}, original)
    # with --base the kohya names are held to the base: a prefixed base names them whole
    prefixed = {f"model.{k}": v for k, v in load_file(base).items()}
    save_file(prefixed, tmp_path / "prefixed.safetensors")
    named = cli("lora", "convert", adapter, "--to", "kohya", "--base", tmp_path / "prefixed.safetensors",
                "-o", tmp_path / "k2.safetensors", "--json").json()["names"]
    assert named == {"lin": "lora_unet_lin", "sq": "lora_unet_sq", "conv": "lora_unet_conv"}


# ---- refusals, dry runs ------------------------------------------------------------------------

def test_refusals_are_one_line(cli, tmp_path, two):
    a, b, base = two
    out = tmp_path / "out"
    assert_one_error_line(cli("lora", "merge", a, "--combine", "cat", "-o", out), "two adapters or more", code=2)
    assert_one_error_line(cli("lora", "merge", a, b, "--combine", "cat", "--rank", "2", "-o", out),
                          "--rank applies to --combine svd only", code=2)
    assert_one_error_line(cli("lora", "merge", a, b, "--combine", "cat", "--weights", "1", "-o", out),
                          "one finite number per adapter (2)", code=2)
    assert_one_error_line(cli("lora", "merge", a, b, "--combine", "svd", "--rank", "5", "-o", out),
                          "--rank 5: larger than conv allows", "its B·A is 4×27, of rank at most 4", code=2)
    for bad in ("0", "-1"):
        assert_one_error_line(cli("lora", "resize", a, "--rank", bad, "-o", out), "1 or more", code=2)
    assert_one_error_line(cli("lora", "resize", a, "--rank", "6", "-o", out), "larger than conv allows", code=2)
    for bad in ("0", "1.5", "-0.2", "nan"):
        assert_one_error_line(cli("lora", "resize", a, "--energy", bad, "-o", out), "must be in (0, 1]", code=2)
    assert_one_error_line(cli("lora", "resize", a, "--rank", "1", "--energy", "0.5", "-o", out), "give one", code=2)
    assert_one_error_line(cli("lora", "resize", a, "-o", out), "give --rank R", code=2)
    assert_one_error_line(cli("lora", "convert", a, "--to", "peft", "-o", out), "already a peft adapter", code=2)
    assert_one_error_line(cli("lora", "convert", a, "--to", "kohya", "-o", tmp_path / "k.safetensors"),
                          "emb: its layout is embedding")
    save_file({"lora_unet_lin.lora_down.weight": torch.ones(1, 6), "lora_unet_lin.lora_up.weight": torch.ones(5, 1)},
              tmp_path / "k.safetensors")
    assert_one_error_line(cli("lora", "convert", tmp_path / "k.safetensors", "--to", "peft", "-o", out), "--base BASE",
                          code=2)
    assert_one_error_line(cli("lora", "merge", a, tmp_path / "k.safetensors", "--combine", "cat", "-o", out),
                          "convert one first")
    assert not out.exists()


def test_other_kinds_and_shapes_that_differ_are_refused_naming_them(cli, tmp_path):
    with_bias = make_adapter(tmp_path / "bias", ["lin"], 1, r=2, lora_alpha=2, lora_bias=True)
    assert_one_error_line(cli("lora", "resize", with_bias, "--rank", "1", "-o", tmp_path / "o"),
                          "lin: a LoRA bias (lora_bias)")
    dora = make_adapter(tmp_path / "dora", ["lin"], 1, r=2, lora_alpha=2, use_dora=True)
    assert_one_error_line(cli("lora", "merge", dora, with_bias, "--combine", "cat", "-o", tmp_path / "o"),
                          "lin: a module of kind dora")
    saved = make_adapter(tmp_path / "saved", ["lin"], 1, r=2, lora_alpha=2, modules_to_save=["sq"])
    assert_one_error_line(cli("lora", "resize", saved, "--rank", "1", "-o", tmp_path / "o"),
                          "sq.weight is a whole tensor (modules_to_save")
    g = torch.Generator().manual_seed(0)
    save_file({"lora_unet_x.lora_down.weight": torch.randn(2, 4, generator=g),
               "lora_unet_x.lora_up.weight": torch.randn(3, 2, generator=g)}, tmp_path / "one.safetensors")
    save_file({"lora_unet_x.lora_down.weight": torch.randn(2, 5, generator=g),
               "lora_unet_x.lora_up.weight": torch.randn(3, 2, generator=g)}, tmp_path / "other.safetensors")
    assert_one_error_line(cli("lora", "merge", tmp_path / "one.safetensors", tmp_path / "other.safetensors",
                              "--combine", "svd", "-o", tmp_path / "o.safetensors"),
                          "lora_unet_x:", "A [2, 4]", "A [2, 5]", "different models")
    assert not (tmp_path / "o").exists() and not (tmp_path / "o.safetensors").exists()


def test_dry_run_writes_nothing_and_force_replaces(cli, tmp_path, two):
    a, b, _ = two
    out = tmp_path / "merged"
    dry = cli("lora", "merge", a, b, "--combine", "svd", "-o", out, "--dry-run")
    assert dry.code == 0 and dry.out.startswith(f"would write {out}: 5 modules, 2 adapters merged (combine svd, rank 3)")
    assert not out.exists()
    assert cli("lora", "merge", a, b, "--combine", "svd", "-o", out).code == 0
    assert_one_error_line(cli("lora", "resize", a, "--rank", "1", "-o", out), "pass --force")
    assert "would need --force" in cli("lora", "resize", a, "--rank", "1", "-o", out, "--dry-run").out
    assert cli("lora", "resize", a, "--rank", "1", "-o", out, "--force").code == 0
    assert json.loads((out / "adapter_config.json").read_text())["r"] == 1


def test_json_reports_are_their_declared_fields(cli, tmp_path, two):
    from dataclasses import fields

    from ckptsurgery.ops.reports import LoraConvertReport, LoraMergeReport, LoraModule, LoraResizeReport

    a, b, base = two
    docs = {LoraMergeReport: cli("lora", "merge", a, b, "--combine", "cat", "-o", tmp_path / "m", "--json").json(),
            LoraResizeReport: cli("lora", "resize", a, "--energy", "0.9", "-o", tmp_path / "r", "--json").json(),
            LoraConvertReport: cli("lora", "convert", make_adapter(tmp_path / "c", ["lin", "conv"], 7, r=2, lora_alpha=2),
                                   "--to", "kohya", "--base", base, "-o", tmp_path / "k.safetensors", "--json").json()}
    for cls, doc in docs.items():
        declared = [f.name for f in fields(cls)]
        always = [f.name for f in fields(cls) if not f.metadata["omit_if_none"]]
        assert list(doc) == [n for n in declared if n in doc] and set(always) <= set(doc)
        assert all(list(m) == [f.name for f in fields(LoraModule)] for m in doc.get("modules", []))
    assert docs[LoraResizeReport]["energy"] == 0.9 and "rank" not in docs[LoraResizeReport]
    assert next(m for m in docs[LoraMergeReport]["modules"] if m["name"] == "lin") == {"name": "lin", "kind": "linear", "shape": [5, 6], "ranks": [2, 3],
                                                   "rank": 5, "alpha": 5, "error": 0}
    assert docs[LoraMergeReport]["files"] == [str(tmp_path / "m" / "adapter_config.json"),
                                              str(tmp_path / "m" / "adapter_model.safetensors")]
    assert docs[LoraConvertReport]["base"] == str(base) and docs[LoraConvertReport]["source_format"] == "peft"


def test_non_finite_factors_are_refused_naming_the_module(cli, tmp_path):
    save_file({"lora_unet_x.lora_down.weight": torch.tensor([[1.0, float("nan")]]),
               "lora_unet_x.lora_up.weight": torch.ones(3, 1)}, tmp_path / "nan.safetensors")
    assert_one_error_line(cli("lora", "resize", tmp_path / "nan.safetensors", "--rank", "1", "-o", tmp_path / "o.safetensors"),
                          "lora_unet_x: its factors hold NaN or infinite values")


def test_the_group_imports_neither_the_other_commands_nor_merge_methods(tmp_path):
    from test_startup import ELSEWHERE, TYPER, modules_after

    save_file({"lora_unet_x.lora_down.weight": torch.ones(1, 2), "lora_unet_x.lora_up.weight": torch.ones(3, 1)},
              tmp_path / "x.safetensors")
    loaded = modules_after("lora", "resize", tmp_path / "x.safetensors", "--rank", "1", "-o", tmp_path / "o.safetensors")
    assert "ckptsurgery.cli.lora" in loaded
    assert not {m for m in loaded if m.startswith((*ELSEWHERE[:-1], *TYPER))}  # torch it needs


def test_convert_refuses_two_modules_that_would_have_one_name(cli, tmp_path):
    folder = tmp_path / "a"
    folder.mkdir()
    ones = {f"base_model.model.{name}.lora_{ab}.weight": torch.ones(shape) for name in ("a.b_c", "a_b.c")
            for ab, shape in (("A", (1, 2)), ("B", (3, 1)))}
    save_file(ones, folder / "adapter_model.safetensors")
    (folder / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": 1, "lora_alpha": 1,
                                                            "target_modules": ["a.b_c", "a_b.c"]}))
    assert_one_error_line(cli("lora", "convert", folder, "--to", "kohya", "-o", tmp_path / "k.safetensors"),
                          "a.b_c and a_b.c would both be lora_unet_a_b_c")
    assert not (tmp_path / "k.safetensors").exists()
