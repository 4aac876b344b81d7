"""diff and tied names: a name one side stores once (a tied head kept once by `save_pretrained` or
safetensors' `save_model`) is the same tensor as its partner on the other side, not a difference."""

from __future__ import annotations

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file, save_model

from ckptsurgery.ops import diff_checkpoints


@pytest.fixture(scope="module")
def tiny_tied_models():
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    gpt2 = transformers.GPT2LMHeadModel(transformers.GPT2Config(
        n_layer=1, n_embd=8, n_head=2, vocab_size=16, n_positions=8, bos_token_id=0, eos_token_id=0))
    llama = transformers.LlamaForCausalLM(transformers.LlamaConfig(
        vocab_size=16, hidden_size=8, intermediate_size=8, num_hidden_layers=1, num_attention_heads=2,
        num_key_value_heads=2, max_position_embeddings=8, tie_word_embeddings=True))
    return {"gpt2": (gpt2, "transformer.wte.weight"), "llama": (llama, "model.embed_tokens.weight")}


@pytest.mark.parametrize("kind", ["gpt2", "llama"])
def test_tied_head_against_its_save_pretrained_copy_is_identical(cli, tmp_path, capsys, tiny_tied_models, kind):
    """torch.save(model.state_dict()) holds lm_head.weight as a view of the embeddings; the
    save_pretrained safetensors stores the embeddings alone. Either way round: exit 0, the head
    reported as tied, not as only in one side."""
    model, embeddings = tiny_tied_models[kind]
    sd = model.state_dict()
    assert sd["lm_head.weight"].data_ptr() == sd[embeddings].data_ptr()
    torch.save(sd, tmp_path / "model.pth")
    model.save_pretrained(str(tmp_path / "hf"))
    capsys.readouterr()  # what transformers printed is not ours
    assert not (tmp_path / "hf" / "pytorch_model.bin").exists()
    for a, b, side in ((tmp_path / "model.pth", tmp_path / "hf", "a"), (tmp_path / "hf", tmp_path / "model.pth", "b")):
        result = cli("diff", a, b, "--json")
        assert result.code == 0, result.out
        doc = result.json()
        assert doc["identical"] is True and doc["only_in_a"] == [] and doc["only_in_b"] == []
        assert doc["tied"] == [{"name": "lm_head.weight", "side": side, "tied_to": embeddings, "by": "storage"}]
        assert doc["equal"] == len(sd) - 1
    human = cli("diff", tmp_path / "model.pth", tmp_path / "hf")
    assert human.code == 0 and f"tied: B holds it as {embeddings}" in human.out and "only in" not in human.out
    assert human.out.rstrip().endswith(", 0 difference(s), 1 tied name(s) stored on one side only")


def test_tied_name_counts_only_as_the_same_view_of_an_equal_tensor(cli, tmp_path, tied_pth):
    """Handmade: A ties lm_head.weight to embed.weight (one storage); B stores embed.weight once.
    Equal there: tied, exit 0. A slice of the same bytes is another tensor, and so is a tie to a
    tensor B holds with other values: those stay `only in A`, exit 1."""
    sd = torch.load(tied_pth, weights_only=True)
    stored_once = tmp_path / "once.safetensors"
    save_file({"embed.weight": sd["embed.weight"], "mid.weight": sd["mid.weight"]}, str(stored_once))
    doc = diff_checkpoints(str(tied_pth), str(stored_once)).to_json()
    assert doc["identical"] is True and doc["only_in_a"] == []
    assert doc["tied"] == [{"name": "lm_head.weight", "side": "a", "tied_to": "embed.weight", "by": "storage"}]

    w = torch.randn(6, 4)
    sliced = tmp_path / "sliced.pth"
    torch.save({"qkv": w, "q": w[:2], "k": w.t()}, sliced)
    save_file({"qkv": w}, str(tmp_path / "qkv.safetensors"))
    result = cli("diff", sliced, tmp_path / "qkv.safetensors", "--json")
    assert result.code == 1 and result.json()["only_in_a"] == ["q", "k"] and result.json()["tied"] == []

    save_file({"embed.weight": sd["embed.weight"] + 1, "mid.weight": sd["mid.weight"]}, str(stored_once))
    result = cli("diff", tied_pth, stored_once, "--json")
    doc = result.json()
    assert result.code == 1 and doc["only_in_a"] == ["lm_head.weight"] and doc["tied"] == []
    assert [c["name"] for c in doc["value_changed"]] == ["embed.weight"]


def test_name_that_save_model_dropped_and_recorded_is_tied_when_its_values_are_equal(cli, tmp_path):
    """safetensors' save_model keeps one of two tied names and records `{dropped: kept}` in its
    metadata. A side holding the dropped name as a separate copy (no shared storage) is tied by
    that record when the values are equal (within --atol across dtypes), and differs otherwise."""

    class Tied(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.embed = torch.nn.Embedding(6, 4)
            self.head = torch.nn.Linear(4, 6, bias=False)
            self.head.weight = self.embed.weight

    torch.manual_seed(0)
    model = Tied()
    saved = tmp_path / "saved.safetensors"
    save_model(model, str(saved))
    with safe_open(str(saved), "pt") as f:  # which name save_model keeps is its choice
        (kept,) = f.keys()
        dropped = ({"embed.weight", "head.weight"} - {kept}).pop()
        assert f.metadata()[dropped] == kept
    copies = {k: v.clone() for k, v in model.state_dict().items()}  # equal values, no tie
    torch.save(copies, tmp_path / "copies.pth")
    result = cli("diff", saved, tmp_path / "copies.pth", "--json")
    assert result.code == 0, result.out
    assert result.json()["tied"] == [{"name": dropped, "side": "b", "tied_to": kept, "by": "metadata"}]

    torch.save({**copies, dropped: copies[dropped].double()}, tmp_path / "wider.pth")
    doc = cli("diff", tmp_path / "wider.pth", saved, "--atol", "1e-9", "--json").json()
    assert doc["identical"] is True and doc["tied"][0]["side"] == "a"
    assert doc["dtype_changed"] == [{"name": dropped, "a": "float64", "b": "float32", "max_abs_diff": 0.0}]

    torch.save({**copies, dropped: copies[dropped] + 1}, tmp_path / "other.pth")
    result = cli("diff", tmp_path / "other.pth", saved, "--json")
    assert result.code == 1 and result.json()["only_in_a"] == [dropped] and result.json()["tied"] == []
