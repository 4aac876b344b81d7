"""merge --into --on-mismatch adapt: each shape adapter against a reference written here from
timm's and transformers' formulas, end to end into the changed model (strict=True), and the
rules' choice and refusals."""

from __future__ import annotations

import math

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
