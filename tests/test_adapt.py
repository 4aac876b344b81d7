"""merge --into --on-mismatch adapt: each shape adapter against a reference written here from
timm's and transformers' formulas, end to end into the changed model (strict=True), and the
rules' choice (name first, then shape; ties kept), refusals of degenerate shapes, and
--grid / --prefix-tokens refused where they do nothing."""

from __future__ import annotations

import math
from collections import OrderedDict

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from conftest import assert_one_error_line, load_any


# ---- references, as timm writes them --------------------------------------------------------

def timm_adapt_input_conv(in_chans: int, w: torch.Tensor) -> torch.Tensor:
    """timm.models._manipulate.adapt_input_conv, for a 3-channel weight."""
    w = w.float()
    if in_chans == 1:
        return w.sum(dim=1, keepdim=True)
    repeat = int(math.ceil(in_chans / 3))
    return w.repeat(1, repeat, 1, 1)[:, :in_chans, :, :] * (3 / float(in_chans))


def timm_resample_abs_pos_embed(posemb, new_size, num_prefix_tokens=1):
    """timm.layers.pos_embed.resample_abs_pos_embed with its defaults (bicubic, antialias)."""
    hw = int(math.sqrt(posemb.shape[1] - num_prefix_tokens))
    prefix, grid = posemb[:, :num_prefix_tokens], posemb[:, num_prefix_tokens:]
    dim = grid.shape[-1]
    grid = grid.float().reshape(1, hw, hw, -1).permute(0, 3, 1, 2)
    grid = F.interpolate(grid, size=new_size, mode="bicubic", antialias=True)
    grid = grid.permute(0, 2, 3, 1).reshape(1, -1, dim)
    return torch.cat([prefix, grid], dim=1)


class Stem(nn.Module):
    def __init__(self, channels=3, classes=1000):
        super().__init__()
        self.conv = nn.Conv2d(channels, 6, 3)
        self.bn = nn.BatchNorm2d(6)
        self.fc = nn.Linear(6, classes)

    def forward(self, x):
        return self.fc(self.bn(self.conv(x)).mean((2, 3)))


class TinyViT(nn.Module):
    def __init__(self, grid=4, dim=8, classes=5):
        super().__init__()
        self.patch = nn.Conv2d(3, dim, 2, stride=2)
        self.cls_token = nn.Parameter(torch.randn(1, 1, dim))
        self.pos_embed = nn.Parameter(torch.randn(1, 1 + grid * grid, dim))
        self.head = nn.Linear(dim, classes)

    def forward(self, x):
        tokens = self.patch(x).flatten(2).transpose(1, 2)
        tokens = torch.cat([self.cls_token.expand(len(x), -1, -1), tokens], 1) + self.pos_embed
        return self.head(tokens[:, 0])


def save(model: nn.Module, path) -> None:
    torch.save(model.state_dict(), path)


# ---- input channels ---------------------------------------------------------------------------

@pytest.mark.parametrize("channels", [1, 2, 4, 6, 9])
def test_input_channels_as_timm_and_equal_channel_inputs_answer_as_before(cli, tmp_path, channels):
    torch.manual_seed(0)
    old = Stem().eval()
    save(old, tmp_path / "rgb.pth")
    save(Stem(channels=channels, classes=10), tmp_path / "template.pth")
    out = tmp_path / "out.pth"
    report = cli("merge", tmp_path / "rgb.pth", "--into", tmp_path / "template.pth", "--on-mismatch", "adapt",
                 "-o", out, "--json").json()
    assert report["adapted"] == [{"name": "conv.weight", "rule": "channels", "from": [6, 3, 3, 3],
                                  "to": [6, channels, 3, 3]}]
    assert report["kept_from_template"] == ["fc.weight", "fc.bias"] and "classifier head" in report["kept_reasons"]["fc.weight"]
    new = Stem(channels=channels, classes=10).eval()
    new.load_state_dict(load_any(out), strict=True)
    if channels in (1, 4, 6):  # timm's own rule (4: repeat and scale; 1: sum)
        torch.testing.assert_close(new.conv.weight.detach(), timm_adapt_input_conv(channels, old.conv.weight.detach()))
    if channels % 3 == 0 or channels == 1:  # the property the rule is for
        gray = torch.randn(2, 1, 7, 7)
        before = old.bn(old.conv(gray.expand(-1, 3, -1, -1)))
        after = new.bn(new.conv(gray.expand(-1, channels, -1, -1)))
        torch.testing.assert_close(after, before, rtol=1e-5, atol=1e-5)


def test_input_channels_keep_the_template_dtype(cli, tmp_path):
    torch.save({"conv.weight": torch.randn(2, 3, 1, 1)}, tmp_path / "a.pth")
    torch.save({"conv.weight": torch.zeros(2, 5, 1, 1, dtype=torch.bfloat16)}, tmp_path / "t.pth")
    assert cli("merge", tmp_path / "a.pth", "--into", tmp_path / "t.pth", "--on-mismatch", "adapt",
               "-o", tmp_path / "o.pth").code == 0
    assert load_any(tmp_path / "o.pth")["conv.weight"].dtype == torch.bfloat16


# ---- position embeddings ----------------------------------------------------------------------

def test_position_embedding_resampled_as_timm_for_a_bigger_image(cli, tmp_path):
    torch.manual_seed(0)
    old = TinyViT(grid=4).eval()
    save(old, tmp_path / "vit224.pth")
    save(TinyViT(grid=6), tmp_path / "template.pth")
    out = tmp_path / "vit336.pth"
    report = cli("merge", tmp_path / "vit224.pth", "--into", tmp_path / "template.pth", "--on-mismatch", "adapt",
                 "-o", out, "--json").json()
    assert report["adapted"] == [{"name": "pos_embed", "rule": "position", "from": [1, 17, 8], "to": [1, 37, 8],
                                  "prefix_tokens": 1, "grid": [[4, 4], [6, 6]]}]
    new = TinyViT(grid=6).eval()
    new.load_state_dict(load_any(out), strict=True)
    want = timm_resample_abs_pos_embed(old.pos_embed.detach(), (6, 6))
    torch.testing.assert_close(new.pos_embed.detach(), want)
    assert torch.equal(new.pos_embed[0, 0], old.pos_embed[0, 0])  # the class token as it was
    old_grid = old.pos_embed[0, 1:].reshape(4, 4, -1)
    new_grid = new.pos_embed[0, 1:].reshape(6, 6, -1)
    for (i, j), (k, m) in (((0, 0), (0, 0)), ((0, 3), (0, 5)), ((3, 0), (5, 0)), ((3, 3), (5, 5))):
        nearest = min(range(16), key=lambda n: float((old_grid.reshape(16, -1)[n] - new_grid[k, m]).norm()))
        assert nearest == i * 4 + j  # each corner of the new grid is nearest its old corner
    assert new(torch.randn(1, 3, 12, 12)).shape == (1, 5)


def test_position_embedding_options_and_refusals(cli, tmp_path):
    torch.save({"position_embeddings": torch.randn(16, 4)}, tmp_path / "a.pth")  # [H·W, D], no prefix
    torch.save({"position_embeddings": torch.zeros(24, 4)}, tmp_path / "t.pth")  # a 4 × 6 grid
    args = ["merge", tmp_path / "a.pth", "--into", tmp_path / "t.pth", "--on-mismatch", "adapt", "-o", tmp_path / "o.pth"]
    assert_one_error_line(cli(*args), "no count of prefix tokens", "--grid H,W")
    report = cli(*args, "--grid", "4,6", "--json").json()
    assert report["adapted"][0]["grid"] == [[4, 4], [4, 6]] and report["adapted"][0]["prefix_tokens"] == 0
    want = F.interpolate(torch.load(tmp_path / "a.pth")["position_embeddings"].reshape(1, 4, 4, 4).permute(0, 3, 1, 2),
                         size=(4, 6), mode="bicubic", antialias=True).permute(0, 2, 3, 1).reshape(24, 4)
    torch.testing.assert_close(load_any(tmp_path / "o.pth")["position_embeddings"], want)
    assert_one_error_line(cli(*args, "--grid", "4,5", "--force"), "16 position tokens less 4 prefix tokens")
    assert_one_error_line(cli(*args, "--grid", "4,5", "--prefix-tokens", "0", "--force"), "--grid 4,5 holds 20 tokens")
    assert_one_error_line(cli(*args, "--grid", "4x6", "--force"), "--grid '4x6'", code=2)


# ---- vocabulary rows, heads, what no rule fits -------------------------------------------------

def test_a_grown_vocabulary_keeps_its_rows_and_ties(cli, tmp_path):
    emb = torch.randn(10, 4)
    torch.save({"embed_tokens.weight": emb, "lm_head.weight": emb, "lm_head.bias": torch.randn(10)}, tmp_path / "a.pth")
    grown = torch.zeros(13, 4)
    torch.save({"embed_tokens.weight": grown, "lm_head.weight": grown, "lm_head.bias": torch.zeros(13)}, tmp_path / "t.pth")
    out = tmp_path / "o.safetensors"
    report = cli("merge", tmp_path / "a.pth", "--into", tmp_path / "t.pth", "--on-mismatch", "adapt", "-o", out,
                 "--json").json()
    assert {a["name"]: a["rule"] for a in report["adapted"]} == {"embed_tokens.weight": "rows",
                                                                  "lm_head.weight": "rows", "lm_head.bias": "rows"}
    assert report["tied"] == {"lm_head.weight": "embed_tokens.weight"}  # tied in the template: tied still
    got = load_any(tmp_path / "o.safetensors")
    assert torch.equal(got["embed_tokens.weight"][:10], emb)
    torch.testing.assert_close(got["embed_tokens.weight"][10:], emb.mean(0).expand(3, 4))
    bias = torch.load(tmp_path / "a.pth")["lm_head.bias"]
    torch.testing.assert_close(got["lm_head.bias"], torch.cat([bias, bias.mean().expand(3)]))
    torch.save({"embed_tokens.weight": torch.zeros(7, 4)}, tmp_path / "cut.pth")
    assert cli("merge", tmp_path / "a.pth", "--into", tmp_path / "cut.pth", "--on-mismatch", "adapt",
               "-o", tmp_path / "cut_out.pth").code == 0
    assert torch.equal(load_any(tmp_path / "cut_out.pth")["embed_tokens.weight"], emb[:7])


def test_what_no_rule_fits_is_an_error_unless_otherwise(cli, tmp_path):
    torch.save(Stem().state_dict(), tmp_path / "a.pth")
    template = Stem()
    template.bn = nn.BatchNorm2d(8)
    template.conv = nn.Conv2d(3, 8, 3)
    torch.save(template.state_dict(), tmp_path / "t.pth")
    args = ["merge", tmp_path / "a.pth", "--into", tmp_path / "t.pth", "--on-mismatch", "adapt"]
    failed = cli(*args, "-o", tmp_path / "o.pth")
    assert_one_error_line(failed, "no adapter fits", "conv.weight [6, 3, 3, 3] -> [8, 3, 3, 3]", "bn.weight [6] -> [8]",
                          "--otherwise")
    assert not (tmp_path / "o.pth").exists()
    report = cli(*args, "--otherwise", "overlap", "-o", tmp_path / "o.pth", "--json").json()
    assert {m["name"]: m["policy"] for m in report["mismatched"]}["bn.weight"] == "overlap"
    assert "fc.weight" in report["copied"]  # 1000 -> 1000 classes: nothing to adapt


@pytest.mark.parametrize("args, message", [
    (["--on-mismatch", "skip", "--otherwise", "skip"], "--otherwise applies to --on-mismatch adapt only"),
    (["--on-mismatch", "overlap", "--grid", "2,2"], "--grid applies to --on-mismatch adapt only"),
    (["--on-mismatch", "adapt", "--prefix-tokens", "-1"], "--prefix-tokens -1"),
    (["--on-mismatch", "adapt", "--otherwise", "adapt"], "'adapt' is not one of"),
])
def test_adapt_options_are_refused_elsewhere(cli, tmp_path, zip_pth, args, message):
    result = cli("merge", zip_pth, "--into", zip_pth, *args, "-o", tmp_path / "m.pth")
    assert result.code == 2 and message in result.err


def test_otherwise_also_takes_what_a_rule_claims_but_cannot_fit(cli, tmp_path):
    """A position embedding whose grid cannot be told, an integer table a rule names: errors by
    default, --otherwise's policy with it; a source matched through `module.` is named."""
    torch.save({"module.pos_embed": torch.randn(1, 17, 4), "module.wte.weight": torch.randn(5, 4).long()},
               tmp_path / "a.pth")
    torch.save({"pos_embed": torch.zeros(1, 23, 4), "wte.weight": torch.zeros(6, 4, dtype=torch.long)},
               tmp_path / "t.pth")
    args = ["merge", tmp_path / "a.pth", "--into", tmp_path / "t.pth", "--on-mismatch", "adapt"]
    assert_one_error_line(cli(*args, "-o", tmp_path / "o.pth"), "module.pos_embed -> ", "no count of prefix tokens")
    report = cli(*args, "--otherwise", "skip", "-o", tmp_path / "o.pth", "--json").json()
    assert {m["name"]: m["policy"] for m in report["mismatched"]} == {"pos_embed": "skip", "wte.weight": "skip"}
    torch.save({"module.pos_embed": torch.randn(1, 17, 4)}, tmp_path / "b.pth")
    torch.save({"pos_embed": torch.zeros(1, 26, 4)}, tmp_path / "u.pth")
    report = cli("merge", tmp_path / "b.pth", "--into", tmp_path / "u.pth", "--on-mismatch", "adapt",
                 "-o", tmp_path / "p.pth", "--json").json()
    assert report["adapted"][0]["source"] == "module.pos_embed" and report["adapted"][0]["grid"] == [[4, 4], [5, 5]]


# ---- the rule choice: name first, then shape; ties; degenerate shapes; options that do nothing ----

def _adapt(cli, tmp_path, source: dict, template: dict, *options, suffix=".pth"):
    torch.save(OrderedDict(source), tmp_path / "src.pth")
    torch.save(OrderedDict(template), tmp_path / "tpl.pth")
    out = tmp_path / f"out{suffix}"
    result = cli("merge", tmp_path / "src.pth", "--into", tmp_path / "tpl.pth", "--on-mismatch", "adapt",
                 "-o", out, "--json", *options)
    return result, out


def test_a_position_named_4d_grid_embedding_is_never_adapted_as_input_channels(cli, tmp_path):
    """SAM / ViTDet keep their position embedding as a grid, `image_encoder.pos_embed`
    [1, H, W, D]. A non-square image size changes H alone (64x64 -> 48x64), and the tensor then
    falls through the position rule (which wants [1, N, D] or [N, D]) to the *shape* rule for
    convolutions: it is "adapted (channels)" — rows repeated cyclically and scaled by 64/48 —
    and written silently. The issue says the rules go by name first precisely so that a position
    embedding is never taken for a convolution. Cause: core.adapt_rules, the `elif len(old) in
    (3, 4, 5) and differs == [1]` branch is reached by a POSITION_NAMES key whose shape the
    position rule did not accept. A key claimed by name should get that rule or none (None: an
    error, or --otherwise)."""
    torch.manual_seed(0)
    result, _ = _adapt(cli, tmp_path, {"image_encoder.pos_embed": torch.randn(1, 4, 4, 8)},
                       {"image_encoder.pos_embed": torch.randn(1, 3, 4, 8)})
    adapted = result.json()["adapted"] if result.code == 0 else []
    assert not any(a["rule"] == "channels" for a in adapted), adapted


@pytest.mark.parametrize("name, old, new", [
    ("decoder_pos_embed", (1, 17, 8), (1, 37, 8)),  # MAE's decoder position embedding, 4x4 -> 6x6 grid
    ("reg_token", (1, 4, 8), (1, 8, 8)),  # timm's register tokens: 4 -> 8 registers
])
def test_a_3d_token_tensor_that_is_not_a_weight_is_never_adapted_as_input_channels(cli, tmp_path, name, old, new):
    """The channels rule is meant for "any other 4-D (or 3-D/5-D) *weight* whose second dimension
    alone differs (a convolution)", but core.adapt_rules applies it to any 3/4/5-D tensor: MAE's
    `decoder_pos_embed` [1, 1+H·W, D] (a position embedding the name list misses) and timm's
    `reg_token` [1, R, D] are "adapted (channels)" — token rows repeated cyclically and scaled by
    I/N (the position grid is tiled, each register halved) — exit 0, no warning. Cause:
    core.adapt_rules, the channels branch has no `name.endswith("weight")` (and a [1, N, D]
    tensor with a leading 1 is a token array far more often than a 1-output convolution).
    Fix: require a weight name for the channels rule (and treat names containing pos_embed /
    position_embedding as position embeddings), so these become "no rule fits"."""
    torch.manual_seed(0)
    result, _ = _adapt(cli, tmp_path, {name: torch.randn(*old)}, {name: torch.randn(*new)})
    adapted = result.json()["adapted"] if result.code == 0 else []
    assert not any(a["rule"] == "channels" for a in adapted), adapted


@pytest.mark.parametrize("name", ["gpt_neox.embed_in.weight", "tok_embeddings.weight"])
def test_the_input_embeddings_of_gpt_neox_and_meta_llama_are_grown_like_the_others(cli, tmp_path, name):
    """TOKEN_NAMES lists GPT-NeoX's output layer `embed_out` but not its input embedding
    `gpt_neox.embed_in.weight` (Pythia, GPT-NeoX — transformers' get_input_embeddings), nor Meta's
    reference-format `tok_embeddings.weight` (Llama, Mistral consolidated checkpoints). Growing
    their vocabulary with --on-mismatch adapt, the embedding — the last 2-D weight whose rows
    differ — is taken for "a classifier head": exit 0, and the learned embeddings are replaced by
    the template's fresh values (with an `embed_out`/`output` after it, it is an error instead,
    and `output.weight` becomes the "head"). Cause: core.TOKEN_NAMES, and the last-weight head
    rule in core.adapt_rules claiming anything unnamed. Fix: add `embed_in` and `tok_embeddings`
    (and CLIP's `token_embedding`, Meta's `output`), and keep the last-weight fallback for
    weights named like no embedding."""
    torch.manual_seed(0)
    result, out = _adapt(cli, tmp_path, {name: torch.randn(10, 4)}, {name: torch.zeros(12, 4)})
    assert result.code == 0, result.err
    assert [(a["name"], a["rule"]) for a in result.json()["adapted"]] == [(name, "rows")]


def test_a_tied_output_embedding_is_not_split_off_as_a_fresh_classifier_head(cli, tmp_path):
    """BERT's MLM decoder `cls.predictions.decoder.weight` is tied to
    `bert.embeddings.word_embeddings.weight` (one storage in the source and in the template).
    With a grown vocabulary the embedding gets rule "rows" (by name) but the decoder, unnamed
    and the last 2-D weight whose rows differ, gets "head": the template's *fresh* values. The
    output holds the two names with different values; the template's tie is broken, and
    `load_state_dict` into the tied model copies the decoder last — the learned embeddings are
    overwritten with the fresh ones. The cookbook promises "Weights tied in the template stay
    tied". Cause: ops/merge.py `_into_template` applies each name's rule on its own; `made` only
    shares a result between names that got an adapter. Fix: names that share one view in both
    the source and the template take one rule (the first name's), and so one tensor."""
    torch.manual_seed(0)
    old, new = torch.randn(10, 4), torch.randn(12, 4)
    result, out = _adapt(cli, tmp_path,
                         {"bert.embeddings.word_embeddings.weight": old, "cls.predictions.decoder.weight": old},
                         {"bert.embeddings.word_embeddings.weight": new, "cls.predictions.decoder.weight": new})
    assert result.code == 0, result.err
    sd = load_any(out)
    assert torch.equal(sd["cls.predictions.decoder.weight"], sd["bert.embeddings.word_embeddings.weight"])


def test_a_template_tie_is_kept_when_the_source_stores_the_tied_weight_once(cli, tmp_path):
    """A Hugging Face `.safetensors` stores tied weights once (`lm_head.weight` is left out when
    it is `model.embed_tokens.weight`); the template saved with `torch.save(model.state_dict())`
    holds both names on one storage. After a grown vocabulary, `model.embed_tokens.weight` is
    adapted from the learned rows while `lm_head.weight` — one tensor with it in the template —
    is written as the template's fresh values; loading the output into the tied model copies
    `lm_head.weight` last and throws the learned embeddings away. The cookbook says "Weights
    tied in the template stay tied". Cause: ops/merge.py `_into_template` fills each template
    name independently (`merged[name] = tt` for a name the source lacks). Fix: a template name
    the sources lack whose view is shared with a filled name takes that name's result."""
    from safetensors.torch import save_file

    torch.manual_seed(0)
    save_file({"model.embed_tokens.weight": torch.randn(10, 4)}, str(tmp_path / "src.safetensors"))
    fresh = torch.randn(12, 4)
    torch.save(OrderedDict([("model.embed_tokens.weight", fresh), ("lm_head.weight", fresh)]), tmp_path / "tpl.pth")
    out = tmp_path / "out.pth"
    result = cli("merge", tmp_path / "src.safetensors", "--into", tmp_path / "tpl.pth", "--on-mismatch", "adapt",
                 "-o", out)
    assert result.code == 0, result.err
    sd = load_any(out)
    assert torch.equal(sd["lm_head.weight"], sd["model.embed_tokens.weight"])


def test_rows_grown_from_an_empty_source_are_not_nan(cli, tmp_path):
    """A source embedding with no rows ([0, D]) grown to [3, D]: "new rows get the mean of the old
    rows" — of none — so every row is NaN, written with exit 0 and no word. Cause:
    ops/adapt.py `adapt_rows`, `t.mean(dim=0)` of an empty tensor. Fix: with no old rows there
    is nothing to adapt: refuse it as a mismatch no rule fits (core.adapt_rules: old[0] > 0)."""
    result, out = _adapt(cli, tmp_path, {"wte.weight": torch.zeros(0, 4)}, {"wte.weight": torch.ones(3, 4)})
    if result.code == 0:
        assert not torch.isnan(load_any(out)["wte.weight"]).any()
    else:
        assert_one_error_line(result, "wte.weight")


@pytest.mark.parametrize("source, template, options", [
    # --prefix-tokens equal to the source's token count: a 0x0 grid (F.interpolate raises)
    ((1, 1, 4), (1, 5, 4), ("--prefix-tokens", "1")),
    # a 0-wide embedding: reshape(1, -1, 0) raises
    ((1, 17, 0), (1, 37, 0), ()),
], ids=["zero-grid", "zero-dim"])
def test_degenerate_position_embeddings_get_one_clear_error(cli, tmp_path, source, template, options):
    """A position embedding whose grid (or width) is empty passes every check, `--dry-run` says it
    would be written, and the real run ends in the catch-all (`ckptsurgery: error:
    RuntimeError: Input and output sizes should be greater than 0 ... (set CKPTSURGERY_DEBUG=1
    for a traceback)`), raised from inside the writer. Cause: core.prefix_and_grids accepts
    `old - prefix == 0` (square(0) is 0, not None) and ops/adapt.py `adapt_position` reshapes
    with -1 for D = 0. Fix: refuse, before writing, a grid of 0 tokens on either side and an
    empty embedding, with one line naming the key."""
    result, _ = _adapt(cli, tmp_path, {"pos_embed": torch.randn(*source)}, {"pos_embed": torch.randn(*template)},
                       *options)
    assert_one_error_line(result, "pos_embed")


@pytest.mark.parametrize("source, template", [((2, 0, 1, 1), (2, 3, 1, 1)), ((2, 3, 1, 1), (2, 0, 1, 1))],
                         ids=["from-0-channels", "to-0-channels"])
def test_zero_input_channels_get_one_clear_error(cli, tmp_path, source, template):
    """A convolution with 0 input channels on either side reaches ops/adapt.py `adapt_channels`,
    which divides by them: `ckptsurgery: error: ZeroDivisionError: ...` — the catch-all, from
    inside the writer, after a `--dry-run` that said it would be written. Fix: core.adapt_rules
    gives no rule when either channel count is 0 (then the usual "no adapter fits" error, or
    --otherwise)."""
    result, _ = _adapt(cli, tmp_path, {"conv.weight": torch.randn(*source)},
                       {"conv.weight": torch.randn(*template)})
    assert_one_error_line(result, "conv.weight")


def test_a_grid_that_changes_the_aspect_ratio_is_applied_or_refused(cli, tmp_path):
    """A ViT trained on a square 16x16 grid fine-tuned at a 8x32 grid: the token count (1 + 256) is
    the same, so the shapes match, the key is `copied` unchanged and `--grid 8,32` is ignored
    with exit 0 — the embedding is laid out for the wrong grid. timm's resample_abs_pos_embed
    resamples whenever the new size is not the old square one, equal counts or not. Cause:
    ops/merge.py `_into_template` runs adapters only for shape mismatches, and --grid is never
    checked against what was adapted. Fix: resample a position embedding whose --grid differs
    from the (square) source grid even when the counts agree — or at least refuse a --grid that
    no adapted key used (exit 2)."""
    torch.manual_seed(0)
    result, _ = _adapt(cli, tmp_path, {"pos_embed": torch.randn(1, 257, 4)}, {"pos_embed": torch.randn(1, 257, 4)},
                       "--grid", "8,32")
    if result.code == 0:
        assert [a["name"] for a in result.json()["adapted"]] == ["pos_embed"], result.json()
    else:
        assert_one_error_line(result, "--grid", code=2)


def test_prefix_tokens_and_grid_are_refused_when_no_position_embedding_is_adapted(cli, tmp_path):
    """`--prefix-tokens 3 --grid 2,8` on a merge with no position embedding at all (only a
    classifier head changes): exit 0, both options silently unused. The tool's promise is that
    options that do not apply are refused (exit 2), as a rename rule that changes no key is.
    Cause: ops/merge.py `merge()` checks only that --on-mismatch is adapt. Fix: after the rules
    are chosen, refuse --prefix-tokens / --grid when no key got the position rule."""
    result, _ = _adapt(cli, tmp_path, {"fc.weight": torch.randn(3, 4)}, {"fc.weight": torch.randn(5, 4)},
                       "--prefix-tokens", "3", "--grid", "2,8")
    assert_one_error_line(result, "--prefix-tokens", code=2)


def test_kept_rows_and_prefix_tokens_of_a_float64_checkpoint_are_bit_exact(cli, tmp_path):
    """"Keeps the rows both have" (transformers' resize_token_embeddings copies them:
    `new.weight[:n] = old.weight[:n]`) and "keep the P prefix tokens" (timm's
    resample_abs_pos_embed concatenates the prefix in its own dtype, untouched). For a float64
    source and template both go through float32 and come back rounded (|Δ| ~ 1e-8): the old
    vocabulary rows and the class token are no longer the learned values. Cause: ops/adapt.py
    `adapt_rows` and `adapt_position` call `.float()` on the whole tensor. Fix: compute only the
    new rows / the resampled grid in float32 (or in float64 when that is the dtype), and copy the
    kept rows and prefix tokens in the source's dtype."""
    torch.manual_seed(0)
    rows = torch.randn(5, 3, dtype=torch.float64) / 3
    pos = torch.randn(1, 5, 3, dtype=torch.float64) / 3  # a class token and a 2x2 grid
    result, out = _adapt(cli, tmp_path, {"wte.weight": rows, "pos_embed": pos},
                         {"wte.weight": torch.zeros(6, 3, dtype=torch.float64),
                          "pos_embed": torch.zeros(1, 10, 3, dtype=torch.float64)})
    assert result.code == 0, result.err
    sd = load_any(out)
    assert torch.equal(sd["wte.weight"][:5], rows)
    assert torch.equal(sd["pos_embed"][:, 0], pos[:, 0])
