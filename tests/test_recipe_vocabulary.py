"""`tokenizer_source:` over models of different vocabularies: the embeddings and the head aligned by
token string, held to mergekit-yaml's own output (run_merge on the same recipe and the same tiny
Llama folders, each with its own WordLevel tokenizer saved by transformers: tokens overlapping in
part, at other ids); mergekit's default rows for a token a model lacks; hostile tokenizer.json
files refused in one line."""

from __future__ import annotations

import json

import pytest
import torch

from conftest import load_folder as load
from conftest import run_mergekit

from ckptsurgery.dtypes import CAST_TARGETS
from ckptsurgery.errors import CkptError
from ckptsurgery.io.model import computed_tensor
from ckptsurgery.ops import WriteOptions, merge_recipe
from ckptsurgery.ops.recipes.vocabulary import RowSource, aligned_tensors, alignment, read_vocabulary, row_sources

transformers = pytest.importorskip("transformers")
tokenizers = pytest.importorskip("tokenizers")

WORDS = [f"w{i}" for i in range(16)]
VOCABULARIES = {  # each model's tokens, in id order: some shared, some not, in other orders
    "base": ["<unk>", *WORDS[:10]],
    "m1": ["<unk>", *reversed(WORDS[3:10]), "w10", "w11", "w12", "<tool>"],
    "m2": ["<unk>", "w5", "w1", "w12", "w10", "w13", "w0", "w2", "<eot>", "<tool>"],
}
TOKENS_ALONE = ["w14", "<unk>", "w3", "w10", "w15", "w1"]  # the tokenizer of a folder without weights


def save_tokenizer(folder, tokens) -> None:
    """A WordLevel tokenizer of `tokens` (those in <> but <unk>, last: added tokens, in tokenizer.json's
    added_tokens and not its model.vocab), saved as transformers saves one."""
    words = [t for t in tokens if t == "<unk>" or not t.startswith("<")]
    model = tokenizers.models.WordLevel({t: i for i, t in enumerate(words)}, unk_token="<unk>")
    tokenizer = tokenizers.Tokenizer(model)
    tokenizer.pre_tokenizer = tokenizers.pre_tokenizers.Whitespace()
    fast = transformers.PreTrainedTokenizerFast(tokenizer_object=tokenizer, unk_token="<unk>")
    fast.add_tokens(tokens[len(words):], special_tokens=True)
    fast.save_pretrained(folder)
    assert fast.get_vocab() == {t: i for i, t in enumerate(tokens)}


@pytest.fixture(scope="module")
def worded(tmp_path_factory):
    """base, m1, m2: tiny Llamas whose vocabularies are VOCABULARIES' (their rows those tokens)."""
    folder = tmp_path_factory.mktemp("worded")
    for i, (name, tokens) in enumerate(VOCABULARIES.items()):
        config = transformers.LlamaConfig(vocab_size=len(tokens), hidden_size=8, intermediate_size=16,
                                          num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=2,
                                          max_position_embeddings=16, tie_word_embeddings=False)
        torch.manual_seed(i)
        transformers.LlamaForCausalLM(config).save_pretrained(folder / name)
        save_tokenizer(folder / name, tokens)
    save_tokenizer(folder / "tok", TOKENS_ALONE)
    return folder


RECIPES = {
    "linear": "models:\n  - model: base\n    parameters: {weight: 0.5}\n  - model: m1\n    parameters: {weight: 0.3}\n"
              "  - model: m2\n    parameters: {weight: 0.2}\nmerge_method: linear\nbase_model: base\ndtype: float32\n",
    "task_arithmetic": "models:\n  - model: m1\n    parameters: {weight: 0.7}\n  - model: m2\n"
                       "    parameters: {weight: 0.4}\nmerge_method: task_arithmetic\nbase_model: base\n"
                       "dtype: float32\n",
    "passthrough": "slices:\n  - sources:\n      - model: base\n        layer_range: [0, 1]\n  - sources:\n"
                   "      - model: m1\n        layer_range: [1, 2]\nmerge_method: passthrough\ndtype: float32\n",
}


@pytest.mark.parametrize("method", RECIPES)
@pytest.mark.parametrize("source", ["base", "m2", "m1", "tok"])
def test_aligned_vocabularies_equal_mergekit_yaml(worded, tmp_path, monkeypatch, method, source):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    text = RECIPES[method] + f"tokenizer_source: {source}\n"
    for name in ("m1", "m2", "base", "tok"):  # absolute: mergekit caches its loaders by a model's path as written
        text = text.replace(f": {name}\n", f": {worded / name}\n")
    (tmp_path / "r.yml").write_text(text)
    report = merge_recipe(tmp_path / "r.yml", WriteOptions(str(tmp_path / "ours")))
    want, got = run_mergekit(text, tmp_path / "kit"), load(tmp_path / "ours")
    assert sorted(got) == sorted(want)
    for key in want:
        torch.testing.assert_close(got[key], want[key], rtol=1e-5, atol=1e-6, msg=key)
    tokens = TOKENS_ALONE if source == "tok" else VOCABULARIES[source]
    rows = len(tokens)
    assert got["model.embed_tokens.weight"].shape[0] == rows
    vocab_size = json.loads((tmp_path / "ours" / "config.json").read_text())["vocab_size"]
    assert vocab_size == json.loads((tmp_path / "kit" / "config.json").read_text())["vocab_size"] == rows
    named = worded / ("base" if source == "base" else source)
    assert report.tensor_notes and all(note.startswith(f"rows aligned to {named}'s vocabulary of {rows} by token")
                                       for note in report.tensor_notes.values())
    _, info = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "ours", output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
    assert transformers.AutoTokenizer.from_pretrained(tmp_path / "ours").get_vocab() == {
        t: i for i, t in enumerate(tokens)}


def test_the_note_says_where_each_models_rows_came_from(worded, tmp_path, monkeypatch):
    monkeypatch.chdir(worded)
    (tmp_path / "r.yml").write_text(RECIPES["linear"] + "tokenizer_source: m2\n")
    report = merge_recipe(tmp_path / "r.yml", WriteOptions(str(tmp_path / "out")))
    # base lacks w12, w10 and <tool> (m1's and m2's: averaged), w13 and <eot> (m2's alone); m1 lacks
    # w0, w1, w2 (the base's), w13 and <eot>; m2's rows are the output's: not named
    note = ("rows aligned to m2's vocabulary of 10 by token: base from 11 rows, lacks 5: 3 averaged, 2 from m2; "
            "m1 from 12 rows, lacks 5: 3 from the base, 2 from m2")
    assert report.tensor_notes == {"lm_head.weight": note, "model.embed_tokens.weight": note}
    assert report.config_changes["vocab_size"] == 10


def rows(values, dtype="float32"):
    t = torch.tensor(values, dtype=torch.float32)
    return computed_tensor(tuple(t.shape), CAST_TARGETS[dtype], lambda: t.numpy().tobytes())


def test_the_default_row_of_a_token_a_model_lacks_is_mergekits():
    """Output tokens a b c d e: a in every model; b in the base and m1 (m2 takes the base's); c in
    m1 and m2 (the base takes their mean); d in m2 only (every model takes m2's); e in none (zeros)."""
    import numpy as np

    vocabularies = {"base": ({"a": 0, "b": 1}, 2), "m1": ({"c": 0, "b": 1, "a": 2}, 3),
                    "m2": ({"d": 0, "c": 1, "a": 2}, 3)}
    aligned = alignment("out", vocabularies, ({"a": 0, "b": 1, "c": 2, "d": 3, "e": 4}, 5))
    permutations = [aligned.permutations[m] for m in vocabularies]
    assert [p.tolist() for p in permutations] == [[0, 1, -1, -1, -1], [2, 1, 0, -1, -1], [2, -1, 1, 0, -1]]
    sources = row_sources(permutations, base=0)
    assert sources == {1: (RowSource.BASE, (0,)), 2: (RowSource.MEAN, (1, 2)), 3: (RowSource.ONE, (2,)),
                       4: (RowSource.ZERO, ())}
    inputs = [rows([[1, 1], [2, 2]]), rows([[30, 30], [20, 20], [10, 10]]), rows([[400, 400], [300, 300], [100, 100]])]
    got = [np.frombuffer(bytes(t.data()), np.float32).reshape(5, 2)[:, 0].tolist()
           for t in aligned_tensors("w", inputs, permutations, sources)]
    assert got == [[1, 2, 165, 400, 0], [10, 20, 30, 400, 0], [100, 2, 300, 400, 0]]
    assert row_sources(permutations, base=None)[1] == (RowSource.MEAN, (0, 1))  # no base: b is averaged


def test_tokens_past_vocab_size_are_stripped_and_ids_must_be_the_rows():
    aligned = alignment("out", {"m": ({"a": 1, "b": 0, "pad": 2}, 2)}, ({"a": 0, "b": 1, "pad": 2}, 2))
    assert aligned.tokens == 2 and aligned.beyond == 1 and aligned.permutations["m"].tolist() == [1, 0]
    with pytest.raises(CkptError, match="out: its tokenizer.json's tokens below vocab_size 3 do not have the ids"):
        alignment("out", {}, ({"a": 0, "b": 2, "c": 2}, 3))


@pytest.mark.parametrize("content, message", [
    ("{", "not a tokenizer.json"),
    ('{"model": {"type": "BPE"}}', r"not a tokenizer.json \(no model.vocab\)"),
    ('{"model": {"vocab": {"a": -1}}}', "token 'a' has id -1, not an integer"),
    ('{"model": {"vocab": {"a": 99999999999}}}', "token 'a' has id 99999999999"),
    ('{"model": {"vocab": {"a": true}}}', "token 'a' has id True"),
    ('{"model": {"vocab": {"a": 0}}, "added_tokens": [{"id": "x", "content": "b"}]}', "token 'b' has id x"),
    ('{"model": {"vocab": {"a": 0}}, "added_tokens": 7}', "added_tokens is not a list"),
    ('{"model": {"vocab": {"a": 0}}, "added_tokens": [{"id": 1}]}', "entry 1 of its vocabulary and added tokens"),
    ("[" * 100000, "nested too deeply"),
])
def test_a_hostile_tokenizer_json_is_refused_in_one_line(tmp_path, content, message):
    (tmp_path / "tokenizer.json").write_text(content)
    with pytest.raises(CkptError, match=message) as refused:
        read_vocabulary(str(tmp_path))
    assert "\n" not in str(refused.value)


def test_a_huge_tokenizer_json_is_refused_unread(tmp_path, monkeypatch):
    from ckptsurgery.ops.recipes import vocabulary

    monkeypatch.setattr(vocabulary, "MAX_TOKENIZER", 1 << 20)
    (tmp_path / "tokenizer.json").write_bytes(b" " * ((1 << 20) + 1))
    with pytest.raises(CkptError, match="larger than 1 MB; not a tokenizer.json"):
        read_vocabulary(str(tmp_path))


def test_a_model_without_tokenizer_json_is_refused_when_a_source_model_needs_it(worded, tmp_path, monkeypatch):
    import shutil

    monkeypatch.chdir(tmp_path)
    for name in ("base", "m2"):
        shutil.copytree(worded / name, tmp_path / name)
    (tmp_path / "base" / "tokenizer.json").unlink()
    (tmp_path / "r.yml").write_text("models:\n  - model: base\n  - model: m2\nmerge_method: linear\n"
                                    "tokenizer_source: m2\n")
    with pytest.raises(CkptError, match=r"^base: no tokenizer.json, needed to align .* by token string "
                                        r"\(tokenizer_source: m2\); save its tokenizer"):
        merge_recipe(tmp_path / "r.yml", WriteOptions(str(tmp_path / "out")))


@pytest.mark.parametrize("content, fragment", [
    ('{"model": {"vocab": {"a": 0, "b": 4294967296}}}', "token 'b' has id 4294967296, not an integer"),
    ('{"model": {"vocab": ["a", "b"]}}', "m2/tokenizer.json: not a tokenizer.json (entry 0 of its vocabulary"),
])
def test_merge_config_refuses_a_models_hostile_tokenizer_json_in_one_line(cli, worded, tmp_path, content, fragment):
    import shutil

    from conftest import assert_one_error_line

    for name in ("base", "m2"):
        shutil.copytree(worded / name, tmp_path / name)
    (tmp_path / "m2" / "tokenizer.json").write_text(content)
    (tmp_path / "r.yml").write_text(f"models:\n  - model: {tmp_path / 'base'}\n  - model: {tmp_path / 'm2'}\n"
                                    f"merge_method: linear\ntokenizer_source: base\n")
    assert_one_error_line(cli("merge", "--config", tmp_path / "r.yml", "-o", tmp_path / "out"), fragment)
    assert not (tmp_path / "out").exists()
