"""mergekit's own examples/*.yml, as they are (mergekit at a6e4028, the examples of 0.1.5 unchanged
there), run by mergekit-yaml (run_merge) and by `merge --config` on tiny seeded 40-layer Llama
folders named as the recipes name their models (`psmathur/orca_mini_v3_13b` is a local folder:
nothing is fetched), and held to each other tensor by tensor. The only change to a recipe is none:
the models are substituted by the folders, not the text.

mergekit computes in the recipe's `dtype` (float16, bfloat16), we in float32 from inputs rounded
to it: values agree within that dtype's resolution. Where a method selects (ties' magnitude cut
and sign vote, arcee_fusion's score threshold), an entry whose score lies within that resolution
of the cut may go the other way, and rounded inputs make equal scores common. There, the
reference is mergekit-yaml itself in float32 on the inputs rounded to the recipe's dtype: ours
equals it but for a cut between equal scores (≤ 0.2 % of the values), and differs from the
verbatim run no more than mergekit's two runs differ from each other (+ 0.2 %)."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch

from conftest import load_folder as load
from conftest import run_mergekit

from ckptsurgery.ops import WriteOptions, merge_recipe

transformers = pytest.importorskip("transformers")
pytest.importorskip("mergekit")

LAYERS = 40  # the examples slice 13B models' 40 layers: [0, 24] + [20, 40], [0, 40]

EXAMPLES = {
    "arcee_fusion": """\
models:
  - model: model_a
  - model: model_b
merge_method: arcee_fusion
base_model: model_a
dtype: bfloat16
""",
    "bio-merge": """\
models:
  - model: mistralai/Mistral-7B-Instruct-v0.2
    parameters:
      density: 0.5
      weight: 0.5
  - model: BioMistral/BioMistral-7B
    parameters:
      density: 0.5
      weight: 0.5
merge_method: ties
base_model: mistralai/Mistral-7B-v0.1
parameters:
  normalize: false
  int8_mask: true
dtype: float16
""",
    "gradient-slerp": """\
slices:
  - sources:
      - model: psmathur/orca_mini_v3_13b
        layer_range: [0, 40]
      - model: garage-bAInd/Platypus2-13B
        layer_range: [0, 40]
# or, the equivalent models: syntax:
# models:
#   - model: psmathur/orca_mini_v3_13b
#   - model: garage-bAInd/Platypus2-13B
merge_method: slerp
base_model: psmathur/orca_mini_v3_13b
parameters:
  t:
    - filter: self_attn
      value: [0, 0.5, 0.3, 0.7, 1]
    - filter: mlp
      value: [1, 0.5, 0.7, 0.3, 0]
    - value: 0.5 # fallback for rest of tensors
dtype: float16
""",
    "linear": """\
models:
  - model: psmathur/orca_mini_v3_13b
    parameters:
      weight: 1.0
  - model: WizardLM/WizardLM-13B-V1.2
    parameters:
      weight: 0.3
  - model: garage-bAInd/Platypus2-13B
    parameters:
      weight: 0.5
merge_method: linear
dtype: float16
""",
    "orcamini-platy-44layer": """\
slices:
  - sources:
    - model: psmathur/orca_mini_v3_13b
      layer_range: [0, 24]
  - sources:
    - model: garage-bAInd/Platypus2-13B
      layer_range: [20, 40]
merge_method: passthrough
dtype: float16
""",
    "ties": """\
models:
  - model: psmathur/orca_mini_v3_13b
    parameters:
      density: [1, 0.7, 0.1] # density gradient
      weight: 1.0
  - model: garage-bAInd/Platypus2-13B
    parameters:
      density: 0.5
      weight: [0, 0.3, 0.7, 1] # weight gradient
  - model: WizardLM/WizardMath-13B-V1.0
    parameters:
      density: 0.33
      weight:
        - filter: mlp
          value: 0.5
        - value: 0
merge_method: ties
base_model: TheBloke/Llama-2-13B-fp16
parameters:
  normalize: true
  int8_mask: true
dtype: float16
""",
}

# the models the examples name, fine-tunes of one base (the base models among them too)
MODELS = ["psmathur/orca_mini_v3_13b", "garage-bAInd/Platypus2-13B", "WizardLM/WizardLM-13B-V1.2",
          "WizardLM/WizardMath-13B-V1.0", "mistralai/Mistral-7B-Instruct-v0.2", "BioMistral/BioMistral-7B",
          "model_a", "model_b"]
BASES = ["TheBloke/Llama-2-13B-fp16", "mistralai/Mistral-7B-v0.1"]
# output layers per example
OUTPUT_LAYERS = {"orcamini-platy-44layer": 44}


@pytest.fixture(scope="module")
def hub(tmp_path_factory):
    """A folder holding every model the examples name, as save_pretrained writes it: tiny, seeded."""
    folder = tmp_path_factory.mktemp("hub")
    config = transformers.LlamaConfig(vocab_size=32, hidden_size=8, intermediate_size=16, num_hidden_layers=LAYERS,
                                      num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=16,
                                      tie_word_embeddings=False)
    torch.manual_seed(0)
    base = transformers.LlamaForCausalLM(config)
    for name in BASES:
        base.save_pretrained(folder / name)
    for name in MODELS:
        tuned = transformers.LlamaForCausalLM(config)
        tuned.load_state_dict({k: v + 0.05 * torch.randn_like(v) for k, v in base.state_dict().items()})
        tuned.save_pretrained(folder / name)
    return folder



MODEL_NAMES = MODELS + BASES
SELECTING = {"ties", "bio-merge", "arcee_fusion"}  # methods whose cut may fall between equal scores
RESOLUTION = {torch.float16: (2e-3, 2e-3), torch.bfloat16: (2e-2, 4e-3)}  # rtol, atol of one rounding



def rounded_hub(hub: Path, dtype: torch.dtype, into: Path) -> Path:
    """The hub's models with every tensor rounded to `dtype` and stored as float32 again."""
    from safetensors.torch import save_file

    for name in MODEL_NAMES:
        (into / name).mkdir(parents=True)
        shutil.copy(hub / name / "config.json", into / name / "config.json")
        save_file({k: v.to(dtype).float() for k, v in load(hub / name).items()}, into / name / "model.safetensors",
                  metadata={"format": "pt"})
    return into


def apart(x: torch.Tensor, y: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    return ~torch.isclose(x.float(), y.float(), rtol=RESOLUTION[dtype][0], atol=RESOLUTION[dtype][1])


@pytest.mark.parametrize("name", EXAMPLES)
def test_mergekits_example_gives_mergekits_tensors(hub, tmp_path, monkeypatch, name):
    """Ours in the recipe's dtype, every key mergekit-yaml writes, its values (as the module
    docstring says for the methods that select); the output loads with every key and the
    example's layer count."""
    import yaml

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    text = EXAMPLES[name]
    dtype = getattr(torch, yaml.safe_load(text)["dtype"])
    (tmp_path / "r.yml").write_text(text)
    monkeypatch.chdir(hub)
    want = run_mergekit(text, tmp_path / "kit")
    report = merge_recipe(tmp_path / "r.yml", WriteOptions(str(tmp_path / "ours")))
    got = load(tmp_path / "ours")
    assert sorted(got) == sorted(want) and all(t.dtype == dtype for t in got.values())
    if name in SELECTING:
        monkeypatch.chdir(rounded_hub(hub, dtype, tmp_path / "rounded"))
        exact = run_mergekit(text.replace(f"dtype: {dtype}".replace("torch.", ""), "dtype: float32"),
                             tmp_path / "kit32")
        total = sum(t.numel() for t in want.values())
        off_exact = sum(int(apart(got[k], exact[k], dtype).sum()) for k in want)
        off_kit = sum(int(apart(got[k], want[k], dtype).sum()) for k in want)
        kit_self = sum(int(apart(exact[k], want[k], dtype).sum()) for k in want)
        # measured: 0.04–0.1 % off the float32 run; arcee_fusion's verbatim run is 5 % off its own float32 run
        assert off_exact <= 0.002 * total, (off_exact, total)
        assert off_kit <= kit_self + 0.002 * total, (off_kit, kit_self, total)
    else:
        for key in want:
            assert not apart(got[key], want[key], dtype).any(), key
    layers = OUTPUT_LAYERS.get(name, LAYERS)
    assert report.layers == layers
    model, info = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "ours", output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and model.config.num_hidden_layers == layers
