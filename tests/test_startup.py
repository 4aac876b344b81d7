"""Start-up: a command imports its own machinery and nothing else's (issue 18 §4). Each case runs
the real entry point in a fresh interpreter and lists the modules it ended with."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

PROBE = """
import json, sys
sys.argv = ["ckptsurgery", *sys.argv[1:]]
from ckptsurgery.cli import main
code = 0
try:
    main()
except SystemExit as e:
    code = e.code
sys.stderr.write("\\nMODULES " + json.dumps([code, sorted(sys.modules)]) + "\\n")
"""

# what each command must not import: other commands, merge methods, the DCP machinery, torch
ELSEWHERE = ("ckptsurgery.cli.merge", "ckptsurgery.cli.rename", "ckptsurgery.ops.methods", "ckptsurgery.ops.merge",
             "ckptsurgery.io.dcp", "torch")
# what only --help, completion and wrong usage need (cli/declare.py): a run does without
TYPER = ("typer", "click", "ckptsurgery.cli.typer_app", "ckptsurgery.cli.help")


def modules_after(*args) -> set[str]:
    proc = subprocess.run([sys.executable, "-c", PROBE, *map(str, args)], capture_output=True, text=True, check=True)
    code, modules = json.loads(proc.stderr.rsplit("MODULES ", 1)[1])
    assert code in (0, None), proc.stderr
    return set(modules)


@pytest.mark.parametrize("command", ["inspect", "convert", "drop"])
def test_a_command_imports_neither_the_other_commands_nor_the_dcp_machinery_nor_torch(command, flat, tmp_path):
    args = {"inspect": [flat, "--json"], "convert": [flat, "-o", tmp_path / "o.safetensors"],
            "drop": [flat, "c", "-o", tmp_path / "o.pth"]}[command]
    loaded = modules_after(command, *args)
    assert f"ckptsurgery.cli.{command}" in loaded
    assert not {m for m in loaded if m.startswith(ELSEWHERE)}, sorted(m for m in loaded if m.startswith(ELSEWHERE))
    assert not {m for m in loaded if m.startswith((*TYPER, "rich"))}  # nor Rich: nothing drawn in a pipe


def test_version_imports_no_command_and_no_reader():
    loaded = modules_after("--version")
    assert not {m for m in loaded if m.startswith(("ckptsurgery.cli.", "ckptsurgery.ops.", "ckptsurgery.io", "typer"))}


def test_help_lists_every_command_in_order(cli, monkeypatch):
    from ckptsurgery.cli import COMMANDS

    monkeypatch.setenv("COLUMNS", "200")
    text = cli("--help").out
    positions = [text.index(f"│ {name} ") for name in COMMANDS]
    assert positions == sorted(positions) and list(COMMANDS)[:2] == ["inspect", "filter"]


def test_a_mistyped_command_names_the_near_one(cli):
    from conftest import assert_one_error_line

    assert_one_error_line(cli("inspct", "x.pth"), "No such command 'inspct'; did you mean 'inspect'?", code=2)


def test_a_plain_merge_imports_neither_adapters_nor_recipes_nor_numpy(flat, tmp_path):
    """merge's modes import their machinery when they run: a union is a few dictionary lookups."""
    loaded = modules_after("merge", flat, flat, "--on-conflict", "first", "-o", tmp_path / "o.pth")
    assert not {m for m in loaded if m.startswith(("ckptsurgery.ops.adapters", "ckptsurgery.ops.recipes", "numpy",
                                                  "torch"))}


def test_gguf_is_imported_only_when_a_gguf_file_is_read(flat, tmp_path):
    """The gguf package (an extra) is loaded by reading a .gguf with a quantized tensor, and by
    nothing else (a file of plain tensors alone is read without it); reading one loads numpy
    (gguf's own) but not torch."""
    gguf = pytest.importorskip("gguf")
    import numpy as np

    assert not {m for m in modules_after("inspect", flat, "--json") if m == "gguf" or m.startswith("gguf.")}
    path = tmp_path / "tiny.gguf"
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_tensor("w", np.ones(4, np.float32))
    q = gguf.quants.quantize(np.ones((1, 32), np.float32), gguf.GGMLQuantizationType.Q8_0)
    w.add_tensor("q", q, raw_shape=q.shape, raw_dtype=gguf.GGMLQuantizationType.Q8_0)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    loaded = modules_after("inspect", path, "--json")
    assert "gguf" in loaded and "ckptsurgery.io.gguf" in loaded
    assert not {m for m in loaded if m.startswith(ELSEWHERE)}, sorted(m for m in loaded if m.startswith(ELSEWHERE))


def fold_without_torch(tmp_path, dtype: str, out_features: int, config, factor: str, value, module: str,
                       tol32: float) -> None:
    """A two-Linear base in `dtype` with a peft adapter (`config`; its `factor` parameters set to
    `value(randn)`) folded by `merge BASE --lora`: `module` is imported, torch is not, and the
    output is peft's merge_and_unload (`tol32` in float32; bf16: peft merges in bf16 itself, so
    its result may be one bf16 step from ours)."""
    torch = pytest.importorskip("torch")
    from safetensors.torch import load_file, save_file

    peft = pytest.importorskip("peft")
    torch.manual_seed(0)
    base = torch.nn.Sequential(torch.nn.Linear(8, 6), torch.nn.Linear(6, out_features, bias=False))
    base = base.to(getattr(torch, dtype))
    base_sd = {k: v.clone() for k, v in base.state_dict().items()}
    model = peft.get_peft_model(base, config(peft))
    g = torch.Generator().manual_seed(1)
    for name, p in model.named_parameters():
        if factor in name:
            p.data = value(torch.randn(p.shape, generator=g)).to(p.dtype)
    model.save_pretrained(str(tmp_path / "adapter"))
    save_file(base_sd, tmp_path / "base.safetensors")
    reference = {k: v.clone() for k, v in model.merge_and_unload().state_dict().items()}
    loaded = modules_after("merge", tmp_path / "base.safetensors", "--lora", tmp_path / "adapter",
                           "-o", tmp_path / "out.safetensors", "-q")
    assert module in loaded
    assert not {m for m in loaded if m == "torch" or m.startswith("torch.")}, sorted(m for m in loaded
                                                                                  if m.startswith("torch"))
    out = load_file(tmp_path / "out.safetensors")
    assert sorted(out) == sorted(reference)
    for k, ref in reference.items():
        assert out[k].dtype == ref.dtype
        tol = tol32 if dtype == "float32" else 1e-2
        assert torch.allclose(out[k].float(), ref.float(), atol=tol, rtol=tol), k


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_a_plain_lora_fold_imports_no_torch(dtype, tmp_path):
    """merge BASE --lora PEFT_FOLDER of a plain LoRA on Linear weights computes in numpy (issue
    20 §3): torch is not imported, and the output is peft's merge_and_unload within float32
    rounding (bf16: rounded once from float32)."""
    fold_without_torch(tmp_path, dtype, 6, lambda peft: peft.LoraConfig(r=2, lora_alpha=4, target_modules=["0", "1"]),
                       "lora_", lambda r: r * 0.3, "ckptsurgery.ops.adapters.fold", 1e-5)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_an_ia3_fold_imports_no_torch(dtype, tmp_path):
    """merge BASE --lora IA3_FOLDER (outputs and feedforward inputs of Linear weights, a bias)
    computes in numpy (issue 20 §3): torch is not imported, and the output is peft's
    merge_and_unload within float32 rounding (bf16: rounded once from float32)."""
    fold_without_torch(tmp_path, dtype, 4,
                       lambda peft: peft.IA3Config(target_modules=["0", "1"], feedforward_modules=["1"]),
                       "ia3_", lambda r: 1 + r * 0.3, "ckptsurgery.ops.adapters.kind_ia3", 1e-6)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_a_dora_fold_imports_no_torch(dtype, tmp_path):
    """merge BASE --lora DORA_FOLDER (peft's use_dora on Linear weights: row norms) computes in
    numpy (issue 20 §3): torch is not imported, and the output is peft's merge_and_unload within
    float32 rounding (bf16: peft merges in bf16 itself, so its result may be a bf16 step from ours)."""
    fold_without_torch(tmp_path, dtype, 6,
                       lambda peft: peft.LoraConfig(r=2, lora_alpha=4, target_modules=["0", "1"], use_dora=True),
                       "lora_", lambda r: r * 0.3, "ckptsurgery.ops.adapters.kind_dora", 1e-5)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_a_loha_fold_imports_no_torch(dtype, tmp_path):
    """merge BASE --lora LOHA_FOLDER computes the Hadamard product in numpy: no torch, peft's merge."""
    fold_without_torch(tmp_path, dtype, 6, lambda peft: peft.LoHaConfig(r=2, alpha=4, target_modules=["0", "1"]),
                       "hada_", lambda r: r * 0.3, "ckptsurgery.ops.adapters.kind_loha", 1e-5)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("form", [dict(r=1), dict(r=1, decompose_both=True, decompose_factor=4), dict(r=8)])
def test_a_lokr_fold_imports_no_torch(dtype, form, tmp_path):
    """merge BASE --lora LOKR_FOLDER (w1 whole and w2_a·w2_b; both decomposed; both whole)
    computes the Kronecker rows in numpy: no torch, peft's merge."""
    fold_without_torch(tmp_path, dtype, 4, lambda peft: peft.LoKrConfig(alpha=2, target_modules=["0", "1"], **form),
                       "lokr_", lambda r: r * 0.3, "ckptsurgery.ops.adapters.kind_lokr", 1e-5)


@pytest.mark.parametrize("alpha_dtype", ["float32", "bfloat16", "int64"])
def test_a_kohya_file_with_an_alpha_folds_without_torch(alpha_dtype, tmp_path):
    """A kohya/LyCORIS LoHa file whose modules carry `alpha` (as LyCORIS saves them): its alpha is
    read from its bytes, not through torch, so the fold imports no torch; the result is
    W + (α/r)·(w1a·w1b)⊙(w2a·w2b), computed here directly."""
    torch = pytest.importorskip("torch")
    from safetensors.torch import load_file, save_file

    g = torch.Generator().manual_seed(0)
    w = torch.randn(6, 8, generator=g)
    f = {n: torch.randn(*s, generator=g) for n, s in
         (("hada_w1_a", (6, 2)), ("hada_w1_b", (2, 8)), ("hada_w2_a", (6, 2)), ("hada_w2_b", (2, 8)))}
    adapter = {f"lora_unet_proj.{n}": t for n, t in f.items()}
    adapter["lora_unet_proj.alpha"] = torch.tensor(3).to(getattr(torch, alpha_dtype))
    save_file({"proj.weight": w}, tmp_path / "base.safetensors")
    save_file(adapter, tmp_path / "loha.safetensors")
    loaded = modules_after("merge", tmp_path / "base.safetensors", "--lora", tmp_path / "loha.safetensors",
                           "-o", tmp_path / "out.safetensors", "-q")
    assert "ckptsurgery.ops.adapters.kind_loha" in loaded
    assert not {m for m in loaded if m == "torch" or m.startswith("torch.")}
    expected = w + 3 / 2 * (f["hada_w1_a"] @ f["hada_w1_b"]) * (f["hada_w2_a"] @ f["hada_w2_b"])
    assert torch.allclose(load_file(tmp_path / "out.safetensors")["proj.weight"], expected, atol=1e-5)
