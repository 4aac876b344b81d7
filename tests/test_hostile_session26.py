"""Hostile inputs to `convert hf://ORG/REPO -o DIR/ --dequantize`, recipes' `hf://` models and
vocabulary alignment by token: each once fell through to the catch-all line
("ckptsurgery: error: ValueError: ... (set CKPTSURGERY_DEBUG=1 ...)")."""

from __future__ import annotations

import json
import os

import pytest
import torch
from remote_server import RangeServer
from safetensors.torch import save_file


@pytest.fixture
def hub(tmp_path, monkeypatch):
    """A stand-in Hub serving tmp_path/served (repositories at ORG/REPO), and that folder."""
    root = tmp_path / "served"
    root.mkdir()
    with RangeServer(str(root)) as server:
        monkeypatch.setenv("HF_ENDPOINT", server.url)
        monkeypatch.delenv("HF_TOKEN", raising=False)
        monkeypatch.setenv("HF_TOKEN_PATH", str(tmp_path / "no-token-here"))
        monkeypatch.setenv("CKPTSURGERY_HTTP_TIMEOUT", "5")
        yield root


def _no_catch_all(result) -> None:
    assert "CKPTSURGERY_DEBUG" not in result.err and "Traceback" not in result.err, result.err


def test_a_remote_config_naming_a_module_that_is_not_text_fetches_the_others(cli, hub, tmp_path):
    """auto_map's "\\udc80mod.X" (a lone surrogate, valid in JSON) made a URL that cannot be
    encoded: the whole convert fell through to the catch-all. Such a name is no file's."""
    repo = hub / "org" / "surrogate"
    repo.mkdir(parents=True)
    save_file({"w": torch.ones(4)}, str(repo / "model.safetensors"))
    (repo / "config.json").write_text('{"auto_map": {"AutoModel": "\\udc80mod.X", "AutoConfig": "modeling_x.C"}}')
    (repo / "modeling_x.py").write_text("class C: pass\n")
    out = tmp_path / "out"
    result = cli("convert", "hf://org/surrogate", "-o", f"{out}/", "--dequantize")
    _no_catch_all(result)
    assert result.code == 0, result.err
    assert sorted(os.listdir(out)) == ["config.json", "model.safetensors", "modeling_x.py"]


def test_a_config_holding_a_lone_surrogate_is_written_escaped(cli, hub, tmp_path):
    """json.loads reads "\\udc80" into a string UTF-8 cannot encode: writing the updated
    config.json fell through to the catch-all. It is written \\u-escaped: the same JSON value."""
    config = '{"model_type": "x", "name": "a\\udc80b"}'
    repo = hub / "org" / "surrogate-config"
    repo.mkdir(parents=True)
    save_file({"w": torch.ones(4)}, str(repo / "model.safetensors"))
    (repo / "config.json").write_text(config)
    for source in ("hf://org/surrogate-config", repo):
        out = tmp_path / ("remote" if isinstance(source, str) else "local")
        result = cli("convert", source, "-o", f"{out}/", "--dequantize")
        _no_catch_all(result)
        assert result.code == 0, result.err
        written = json.loads((out / "config.json").read_text())
        assert written["name"] == "a\udc80b"


def test_models_of_empty_vocabularies_leave_their_tensors_of_no_rows_as_they_are(cli, tmp_path, monkeypatch):
    """Two models whose tokenizer.json holds no token (and no vocab_size): each has a vocabulary
    of 0 rows, so each tensor of 0 rows looked like a vocabulary tensor to align, and permuting it
    raised in numpy (reshape of 0 rows) — the catch-all. A tensor of no rows is no vocabulary's."""
    monkeypatch.chdir(tmp_path)
    for name, tokens, rows in (("src", {"x": 0, "y": 1}, 2), ("e1", {}, 0), ("e2", {}, 0)):
        os.mkdir(name)
        save_file({"embed.weight": torch.ones(rows, 4), "layers.0.w": torch.ones(4, 4), "empty": torch.ones(0)},
                  f"{name}/model.safetensors")
        (tmp_path / name / "config.json").write_text(json.dumps({"num_hidden_layers": 1}))
        (tmp_path / name / "tokenizer.json").write_text(json.dumps({"model": {"vocab": tokens}, "added_tokens": []}))
    (tmp_path / "r.yml").write_text("models:\n  - model: e1\n  - model: e2\nmerge_method: linear\n"
                                    "parameters: {weight: 0.5}\ntokenizer_source: src\n")
    result = cli("merge", "--config", "r.yml", "-o", "out/")
    _no_catch_all(result)
    assert result.code == 0, result.err


@pytest.mark.parametrize("command", ["convert", "merge"])
def test_a_config_json_linking_out_of_its_folder_is_refused_not_written_into_the_output(cli, tmp_path, monkeypatch,
                                                                                        command):
    """A model folder whose config.json links to a JSON file of secrets elsewhere (a registry
    login, a cloud credential): the output — a folder made to be published — got that file's
    content as its config.json. Links out of the folder are refused, as for the tokenizer's."""
    monkeypatch.chdir(tmp_path)
    os.mkdir("home")
    secret = '{"auths": {"registry.example": {"auth": "c2VjcmV0OnRva2Vu"}}}'
    (tmp_path / "home" / "docker-config.json").write_text(secret)
    for name in ("m1", "m2"):
        os.mkdir(name)
        save_file({"embed.weight": torch.ones(3, 2), "layers.0.w": torch.ones(2, 2)}, f"{name}/model.safetensors")
        os.symlink("../home/docker-config.json", f"{name}/config.json")
    (tmp_path / "r.yml").write_text("models:\n  - model: m1\n  - model: m2\nmerge_method: linear\n"
                                    "parameters: {weight: 0.5}\n")
    args = ("convert", "m1", "-o", "out/", "--dequantize") if command == "convert" else \
        ("merge", "--config", "r.yml", "-o", "out/")
    result = cli(*args)
    _no_catch_all(result)
    assert result.code == 1 and "links out of its folder" in result.err, result.err
    assert not os.path.exists("out")


def test_a_config_vocab_size_that_is_a_list_is_compared_not_hashed(cli, tmp_path, monkeypatch):
    """tokenizer_source naming another model, a model without tokenizer.json: the configs'
    vocab_size values were put in a set, and a list ([2]) fell through to the catch-all
    (unhashable type). It differs from the other model's 2: refused in one line."""
    monkeypatch.chdir(tmp_path)
    for name, size in (("src", 2), ("m1", [2]), ("m2", 2)):
        os.mkdir(name)
        save_file({"embed.weight": torch.ones(2, 4), "layers.0.w": torch.ones(4, 4)}, f"{name}/model.safetensors")
        (tmp_path / name / "config.json").write_text(json.dumps({"num_hidden_layers": 1, "vocab_size": size}))
        if name != "m1":
            (tmp_path / name / "tokenizer.json").write_text(json.dumps({"model": {"vocab": {"x": 0, "y": 1}}}))
    (tmp_path / "r.yml").write_text("models:\n  - model: m1\n  - model: m2\nmerge_method: linear\n"
                                    "parameters: {weight: 0.5}\ntokenizer_source: src\n")
    result = cli("merge", "--config", "r.yml", "-o", "out/")
    _no_catch_all(result)
    assert result.code == 1 and "m1: no tokenizer.json" in result.err, result.err


def test_a_repository_whose_every_tensor_is_dequantized_has_its_files_fetched_at_the_weights_commit(
        cli, hub, tmp_path, monkeypatch):
    """commit_of looked for the commit on the tensors' storages: once every tensor is dequantized
    (computed), none lay on a remote file, and config.json, the tokenizer's files and the index
    were fetched at the branch (`main`), which may have moved since the weights were read."""
    repo = hub / "org" / "all-fp8"
    repo.mkdir(parents=True)
    g = torch.Generator().manual_seed(1)
    save_file({"a.weight": (torch.randn(128, 128, generator=g) * 4).to(torch.float8_e4m3fn),
               "a.weight_scale_inv": torch.rand(1, 1, generator=g) + 0.5}, str(repo / "model.safetensors"))
    (repo / "config.json").write_text(json.dumps({"quantization_config": {"weight_block_size": [128, 128]}}))
    (repo / "tokenizer.json").write_text('{"model": {"vocab": {}}}')
    with RangeServer(str(hub)) as server:  # its own, to count the requests of this run alone
        monkeypatch.setenv("HF_ENDPOINT", server.url)
        result = cli("convert", "hf://org/all-fp8", "-o", f"{tmp_path / 'out'}/", "--dequantize")
        asked = [r[0].split("/resolve/")[1] for r in server.served.requests if "/resolve/" in r[0]]
    assert result.code == 0, result.err
    # the weights are looked for at the branch (the index first, absent); all else at their commit
    assert [a for a in asked if not a.startswith(f"{server.behaviour.hub_commit}/")] == [
        "main/model.safetensors.index.json", "main/model.safetensors"], asked
    assert sorted(os.listdir(tmp_path / "out")) == ["config.json", "model.safetensors", "tokenizer.json"]


def test_a_recipe_models_fetched_file_refused_names_its_repository(cli, hub, tmp_path, monkeypatch):
    """A recipe's hf:// model whose config.json is not a JSON object: the refusal named
    /tmp/ckptsurgery-hub-XXXX/config.json (a temporary folder, gone by then), not which model."""
    monkeypatch.chdir(tmp_path)
    for name, config in (("bad-config", "[1, 2]"), ("good", '{"num_hidden_layers": 1}')):
        repo = hub / "org" / name
        repo.mkdir(parents=True)
        save_file({"embed.weight": torch.ones(3, 2), "layers.0.w": torch.ones(2, 2)}, str(repo / "model.safetensors"))
        (repo / "config.json").write_text(config)
    (tmp_path / "r.yml").write_text("models:\n  - model: hf://org/bad-config\n  - model: hf://org/good\n"
                                    "merge_method: linear\nparameters: {weight: 0.5}\n")
    result = cli("merge", "--config", "r.yml", "-o", "out/")
    _no_catch_all(result)
    assert result.code == 1 and "org--bad-config" in result.err and "not a JSON object" in result.err, result.err


def test_a_tokenizer_source_on_the_hub_holding_none_of_its_files_is_refused_by_name(cli, hub, tmp_path, monkeypatch):
    """A mistyped `tokenizer_source: hf://org/typo` fetched nothing and said "no tokenizer.json", or
    wrote a folder without a tokenizer."""
    monkeypatch.chdir(tmp_path)
    for name in ("a", "b"):
        repo = hub / "org" / name
        repo.mkdir(parents=True)
        save_file({"embed.weight": torch.ones(3, 2), "layers.0.w": torch.ones(2, 2)}, str(repo / "model.safetensors"))
        (repo / "config.json").write_text('{"num_hidden_layers": 1}')
    (tmp_path / "r.yml").write_text("models:\n  - model: hf://org/a\n  - model: hf://org/b\nmerge_method: linear\n"
                                    "parameters: {weight: 0.5}\ntokenizer_source: hf://org/typo\n")
    result = cli("merge", "--config", "r.yml", "-o", "out/")
    _no_catch_all(result)
    assert result.code == 1 and "hf://org/typo: none of config.json" in result.err, result.err
    assert not (tmp_path / "out").exists()
