"""merge --config RECIPE -o DIR under torchrun: each rank computes and writes its share of the
shards into the folder rank 0 stages, rank 0 the index and the folder's other files, and the
folder appears whole, byte for byte what one process writes; a refusal or a failure on one rank
leaves nothing. Real two-rank runs (gloo on 127.0.0.1) on two tiny Llama-shaped folders."""

from __future__ import annotations

import json
import os

import pytest
import torch
from safetensors.torch import save_file

from conftest import run_ranks

LAYERS = 5
SLERP = """\
slices:
  - sources:
      - model: a
        layer_range: [0, 5]
      - model: b
        layer_range: [0, 5]
merge_method: slerp
base_model: a
parameters:
  t:
    - filter: self_attn
      value: [0, 0.5, 1]
    - value: 0.3
dtype: bfloat16
"""
SHARD = "8KB"  # about 29 KB of bfloat16 weights: four shards


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """Folders a and b (a Llama's keys, config.json, a tokenizer file) and the recipe merging them."""
    root = tmp_path_factory.mktemp("ranks")
    shapes = {"model.embed_tokens.weight": (64, 16), "model.norm.weight": (16,), "lm_head.weight": (64, 16)}
    for i in range(LAYERS):
        for name in ("q", "k", "v", "o"):
            shapes[f"model.layers.{i}.self_attn.{name}_proj.weight"] = (16, 16)
        for name, shape in (("gate", (32, 16)), ("up", (32, 16)), ("down", (16, 32))):
            shapes[f"model.layers.{i}.mlp.{name}_proj.weight"] = shape
        shapes[f"model.layers.{i}.input_layernorm.weight"] = (16,)
    for seed, name in enumerate("ab"):
        g = torch.Generator().manual_seed(seed)
        (root / name).mkdir()
        save_file({k: torch.randn(s, generator=g) for k, s in shapes.items()}, root / name / "model.safetensors")
        config = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "num_hidden_layers": LAYERS,
                  "hidden_size": 16, "torch_dtype": "float32"}
        (root / name / "config.json").write_text(json.dumps(config))
        (root / name / "tokenizer_config.json").write_text('{"model_max_length": 32}\n')
    (root / "slerp.yml").write_text(SLERP)
    return root


def contents(folder) -> dict[str, bytes]:
    return {name: (folder / name).read_bytes() for name in sorted(os.listdir(folder))}


def merge_on_ranks(models, *args, expect_failure=False, script=None):
    """`torchrun --nproc-per-node 2 -m ckptsurgery merge --config slerp.yml ARGS --json`, run in
    the models' folder (or `script` in place of -m ckptsurgery): each rank's (report or None, stderr)."""
    command = [script] if script else ["-m", "ckptsurgery"]
    _, ranks = run_ranks(2, *command, "merge", "--config", "slerp.yml", *args, "--json", cwd=models,
                         expect_failure=expect_failure)
    return [(json.loads(out) if out.strip() else None, err) for out, err in ranks]


def test_two_ranks_write_the_folder_one_process_writes(cli, models, tmp_path, monkeypatch):
    """Over an earlier folder (--force): replaced whole, as one process replaces it."""
    monkeypatch.chdir(models)
    alone, shared = tmp_path / "alone", tmp_path / "shared"
    single = cli("merge", "--config", "slerp.yml", "-o", alone, "--max-shard-size", SHARD, "--json").json()
    assert single["shards"] >= 3
    shared.mkdir()
    (shared / "stale.txt").write_text("old")
    reports = [r for r, _ in merge_on_ranks(models, "-o", shared, "--max-shard-size", SHARD, "--force")]
    assert contents(shared) == contents(alone)
    assert sorted(os.listdir(tmp_path)) == ["alone", "shared"]  # nothing staged left beside it
    # shard i is rank i % 2's; the index and the folder's other files rank 0's
    files = [f.replace(str(alone), str(shared)) for f in single["files"]]
    shards = files[:single["shards"]]
    assert reports[0]["files"] == shards[0::2] + files[single["shards"]:]
    assert reports[1]["files"] == shards[1::2]
    assert [(r["rank"], r["world_size"]) for r in reports] == [(0, 2), (1, 2)]


def test_an_existing_folder_is_refused_on_every_rank_before_anything_is_read(models, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    script = tmp_path / "no_reads.py"  # fails if a rank opens a model
    script.write_text("from ckptsurgery.ops.merge import recipe\n"
                      "def refused(*args):\n    raise AssertionError('a model was opened')\n"
                      "recipe._open_models = refused\n"
                      "from ckptsurgery.cli import main\nmain()\n")
    ranks = merge_on_ranks(models, "-o", out, "--max-shard-size", SHARD, expect_failure=True, script=script)
    for _, err in ranks:
        lines = [line for line in err.splitlines() if line.startswith("ckptsurgery: error:")]
        assert len(lines) == 1 and "already exists; pass --force" in lines[0] and "Traceback" not in err, err
    assert contents(out) == {"keep.txt": b"mine"} and sorted(os.listdir(tmp_path)) == ["no_reads.py", "out"]


RANK1_FAILS_ON_ITS_SHARD = """\
import os, time
from contextlib import contextmanager
from ckptsurgery.io import write
rank = int(os.environ["RANK"])
real_stage = write.StagedOutputs.stage
@contextmanager
def stage(self, path):
    with real_stage(self, path) as f:
        if rank == 1 and "-of-" in os.fspath(path):  # its first shard staged in rank 0's folder: a full disk
            time.sleep(0.5)
            raise OSError(28, "No space left on device", path)
        yield f
write.StagedOutputs.stage = stage
from ckptsurgery.cli import main
main()
"""


def test_a_failure_on_one_rank_leaves_nothing(models, tmp_path):
    """Rank 1 fails writing its shard into the folder rank 0 staged (in a folder rank 0 made): no
    staged folder, no folder made for it, and every rank says which rank failed."""
    script = tmp_path / "faulty.py"
    script.write_text(RANK1_FAILS_ON_ITS_SHARD)
    out = tmp_path / "new" / "out"
    ranks = merge_on_ranks(models, "-o", out, "--max-shard-size", SHARD, expect_failure=True, script=script)
    assert os.listdir(tmp_path) == ["faulty.py"]
    errors = [[line for line in err.splitlines() if line.startswith("ckptsurgery: error:")] for _, err in ranks]
    assert errors[1] and "No space left on device" in errors[1][-1], errors
    assert all("rank 1 of 2 failed, so nothing was written" in line for line in errors[0]), errors
    assert all(report is None for report, _ in ranks)


def test_the_dry_run_on_ranks_shows_each_ranks_share(models, tmp_path, monkeypatch):
    """A dry run takes no step together: each rank's report alone, its files as the real run's."""
    from ckptsurgery.ops import WriteOptions, merge_recipe
    from ckptsurgery.ops.ranks import Ranks

    monkeypatch.chdir(models)

    def unused(value):
        raise AssertionError("a dry run exchanges nothing")

    out = str(tmp_path / "out")
    shares = [merge_recipe("slerp.yml", WriteOptions(out, dry_run=True, max_shard_size=SHARD,
                                                     ranks=Ranks(rank, 2, unused))).files for rank in (0, 1)]
    alone = merge_recipe("slerp.yml", WriteOptions(out, dry_run=True, max_shard_size=SHARD))
    assert os.listdir(tmp_path) == []
    assert sorted(shares[0] + shares[1]) == sorted(alone.files) and len(shares[1]) == alone.shards // 2
    assert shares[0][-1] == os.path.join(out, "tokenizer_config.json")


def test_weights_alone_on_ranks_are_rank_0s_one_file(cli, models, tmp_path, monkeypatch):
    """-o FILE.safetensors without --max-shard-size is one file: rank 0 writes it, as for any command."""
    monkeypatch.chdir(models)
    assert cli("merge", "--config", "slerp.yml", "-o", tmp_path / "alone.safetensors").code == 0
    reports = [r for r, _ in merge_on_ranks(models, "-o", tmp_path / "shared.safetensors")]
    assert (tmp_path / "shared.safetensors").read_bytes() == (tmp_path / "alone.safetensors").read_bytes()
    assert [r["files"] for r in reports] == [[str(tmp_path / "shared.safetensors")], []]
    assert sorted(os.listdir(tmp_path)) == ["alone.safetensors", "shared.safetensors"]
