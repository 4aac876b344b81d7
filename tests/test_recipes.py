"""The fine-tuning recipes of docs/cookbook.md, end to end: each result loads into the new
nn.Module with strict=True and runs, and the output the cookbook shows is what the command prints."""

import os
import shutil
import subprocess
import sys
from collections import OrderedDict

import pytest
import torch
from torch import nn

from conftest import ROOT, Net, load_any


class Backbone(nn.Module):
    """Net without its classifier: the 'delete a layer' target."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)
        self.bn = nn.BatchNorm2d(4)
        self.liner1 = nn.Linear(4, 5)

    def forward(self, x):
        return self.liner1(self.bn(self.conv(x)).mean((2, 3)))


class NewHead(Backbone):
    """Net with liner10 deleted and a new layer `classifier` added."""

    def __init__(self):
        super().__init__()
        self.classifier = nn.Linear(5, 3)

    def forward(self, x):
        return self.classifier(super().forward(x))


class RGBDNet(Net):
    """Net whose first convolution takes 4 input channels instead of 3."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(4, 4, 3)


def strict_load_and_run(model: nn.Module, path, channels: int = 3) -> nn.Module:
    model.load_state_dict(load_any(path), strict=True)
    model.eval()
    out = model(torch.randn(2, channels, 6, 6))
    assert torch.isfinite(out).all()
    return model


@pytest.fixture
def pretrained(tmp_path):
    torch.manual_seed(1)
    path = tmp_path / "pretrained.pth"
    torch.save(Net().state_dict(), path)
    return path


def template_of(model: nn.Module, path) -> str:
    torch.save(model.state_dict(), path)
    return str(path)


@pytest.mark.parametrize("how", ["drop", "keep", "like"])
def test_delete_a_layer(cli, tmp_path, pretrained, how):
    out = tmp_path / "backbone.safetensors"
    if how == "drop":
        result = cli("drop", pretrained, "liner10", "-o", out)
    elif how == "keep":
        result = cli("filter", pretrained, "--keep", "conv", "--keep", "bn", "--keep", "liner1", "-o", out)
    else:
        result = cli("filter", pretrained, "--like", template_of(Backbone(), tmp_path / "t.pth"), "-o", out)
    assert result.code == 0, result.err
    model = strict_load_and_run(Backbone(), out)
    ref = torch.load(pretrained, weights_only=True)
    assert torch.equal(model.liner1.weight, ref["liner1.weight"])  # liner1 kept, liner10 gone


def test_delete_one_layer_and_add_another(cli, tmp_path, pretrained):
    torch.manual_seed(5)
    fresh = NewHead()
    template = template_of(fresh, tmp_path / "new.pth")
    out = tmp_path / "ft.pth"
    report = cli("merge", pretrained, "--into", template, "-o", out, "--json").json()
    assert report["kept_from_template"] == ["classifier.weight", "classifier.bias"]
    assert report["left_out"] == ["liner10.weight", "liner10.bias"]
    assert report["mismatched"] == [] and report["renamed"] == {}
    model = strict_load_and_run(NewHead(), out)
    assert torch.equal(model.classifier.weight, fresh.classifier.weight)  # the new layer's fresh init
    assert torch.equal(model.conv.weight, torch.load(pretrained)["conv.weight"])


def test_input_grew_from_3_to_4_channels(cli, tmp_path, pretrained):
    torch.manual_seed(7)
    fresh = RGBDNet()
    template = template_of(fresh, tmp_path / "rgbd.pth")
    out = tmp_path / "rgbd_ft.pth"
    old = torch.load(pretrained)["conv.weight"]

    refused = cli("merge", pretrained, "--into", template, "-o", out)
    assert refused.code == 1 and "conv.weight [4, 3, 3, 3] -> [4, 4, 3, 3]" in refused.err and not out.exists()

    skipped = cli("merge", pretrained, "--into", template, "-o", out, "--on-mismatch", "skip", "--json").json()
    assert skipped["mismatched"] == [{"name": "conv.weight", "source_shape": [4, 3, 3, 3],
                                      "template_shape": [4, 4, 3, 3], "policy": "skip"}]
    model = strict_load_and_run(RGBDNet(), out, channels=4)
    assert torch.equal(model.conv.weight, fresh.conv.weight)

    cli("merge", pretrained, "--into", template, "-o", out, "--on-mismatch", "overlap", "--force")
    model = strict_load_and_run(RGBDNet(), out, channels=4)
    assert torch.equal(model.conv.weight[:, :3], old)  # the pretrained RGB filters
    assert torch.equal(model.conv.weight[:, 3:], fresh.conv.weight[:, 3:])  # the new channel: fresh init


def test_1000_to_10_class_head(cli, tmp_path):
    torch.manual_seed(2)
    big = tmp_path / "imagenet.pth"
    torch.save(Net(classes=1000).state_dict(), big)
    template = template_of(Net(classes=10), tmp_path / "ten.pth")
    out = tmp_path / "ten_ft.safetensors"
    report = cli("merge", big, "--into", template, "-o", out, "--on-mismatch", "overlap", "--json").json()
    assert [m["name"] for m in report["mismatched"]] == ["liner10.weight", "liner10.bias"]
    model = strict_load_and_run(Net(classes=10), out)
    assert torch.equal(model.liner10.weight, torch.load(big)["liner10.weight"][:10])


def test_strip_module_prefix(cli, tmp_path, pretrained):
    ddp = tmp_path / "ddp.pth"
    sd = torch.load(pretrained)
    torch.save({"epoch": 9, "model": OrderedDict(("module." + k, v) for k, v in sd.items())}, ddp)
    out = tmp_path / "plain.pth"
    report = cli("rename", ddp, "--strip-prefix", "module.", "-o", out, "--json").json()
    assert report["untouched"] == [] and report["renamed"]["module.conv.weight"] == "conv.weight"
    loaded = torch.load(out, weights_only=True)
    assert loaded["epoch"] == 9  # carried through
    model = Net()
    model.load_state_dict(loaded["model"], strict=True)
    # and merge --into finds the same keys without renaming first
    direct = tmp_path / "direct.pth"
    report = cli("merge", ddp, "--into", template_of(Net(), tmp_path / "t.pth"), "-o", direct, "--json").json()
    assert len(report["renamed"]) == len(sd) and report["copied"] == []
    strict_load_and_run(Net(), direct)


def test_average_last_three_checkpoints(cli, tmp_path):
    paths, models = [], []
    for epoch in range(3):
        torch.manual_seed(epoch)
        model = Net()
        models.append(model.state_dict())
        paths.append(tmp_path / f"epoch{epoch}.pth")
        torch.save({"epoch": epoch, "state_dict": model.state_dict()}, paths[-1])
    out = tmp_path / "swa.pth"
    assert cli("merge", *paths, "--average", "-o", out).code == 0
    loaded = torch.load(out, weights_only=True)
    assert loaded["epoch"] == 0  # the first source's entries travel
    model = Net()
    model.load_state_dict(loaded["state_dict"], strict=True)
    expected = sum(m["liner1.weight"] for m in models) / 3
    assert torch.allclose(model.liner1.weight, expected, atol=1e-6)
    assert model.bn.num_batches_tracked == models[0]["bn.num_batches_tracked"]


def fine_tunes(tmp_path, names):
    """A base Net and fine-tunes of it: a few SGD steps each on random data."""
    torch.manual_seed(0)
    base = Net(classes=10)
    torch.save(base.state_dict(), tmp_path / "base.pth")
    tuned = {}
    for name in names:
        net = Net(classes=10)
        net.load_state_dict(base.state_dict())
        opt = torch.optim.SGD(net.parameters(), lr=0.1)
        for _ in range(5):
            loss = nn.functional.cross_entropy(net(torch.randn(8, 3, 8, 8)), torch.randint(0, 10, (8,)))
            opt.zero_grad()
            loss.backward()
            opt.step()
        tuned[name] = net.state_dict()
        torch.save(tuned[name], tmp_path / f"{name}.pth")
    return base.state_dict(), tuned


def test_model_soup_of_fine_tunes(cli, tmp_path):
    _, tuned = fine_tunes(tmp_path, ["ft-cifar", "ft-svhn", "ft-mnist"])
    out = tmp_path / "soup.pth"
    assert cli("merge", *(tmp_path / f"{n}.pth" for n in tuned), "--method", "linear", "-o", out).code == 0
    model = strict_load_and_run(Net(classes=10), out)
    want = sum(sd["conv.weight"] for sd in tuned.values()) / 3
    assert torch.allclose(model.conv.weight, want, atol=1e-6)


def test_task_arithmetic_and_ties_add_skills_to_their_base(cli, tmp_path):
    base, tuned = fine_tunes(tmp_path, ["ft-cifar", "ft-svhn"])
    models = [tmp_path / "ft-cifar.pth", tmp_path / "ft-svhn.pth"]
    ties = tmp_path / "multi.safetensors"
    assert cli("merge", *models, "--base", tmp_path / "base.pth", "--method", "ties", "--density", "0.5",
               "--weights", "1,0.8", "-o", ties).code == 0
    strict_load_and_run(Net(classes=10), ties)
    forget = tmp_path / "forget.pth"  # a negative weight subtracts a task vector
    assert cli("merge", models[1], "--base", tmp_path / "base.pth", "--method", "task-arithmetic",
               "--weights", "-1", "-o", forget).code == 0
    model = strict_load_and_run(Net(classes=10), forget)
    want = 2 * base["liner1.weight"] - tuned["ft-svhn"]["liner1.weight"]
    assert torch.allclose(model.liner1.weight, want, atol=1e-6)


def test_makefile_rule_prepares_checkpoint_once(tmp_path, pretrained):
    """A CI step: the rule builds the fine-tuning checkpoint, a second `make` has nothing to do,
    and the output is byte-identical when rebuilt."""
    exe = shutil.which("ckptsurgery") or os.path.join(os.path.dirname(sys.executable), "ckptsurgery")
    template_of(NewHead(), tmp_path / "new_model.pth")
    (tmp_path / "Makefile").write_text(
        "CKPT ?= ckptsurgery\n"
        "finetune.safetensors: pretrained.pth new_model.pth\n"
        "\t$(CKPT) merge pretrained.pth --into new_model.pth -o $@ --force -q\n")
    run = lambda: subprocess.run(["make", f"CKPT={exe}"], cwd=tmp_path, capture_output=True, text=True)
    first = run()
    assert first.returncode == 0, first.stderr
    built = (tmp_path / "finetune.safetensors").read_bytes()
    assert "is up to date" in run().stdout
    os.utime(tmp_path / "pretrained.pth")
    os.utime(tmp_path / "finetune.safetensors", (1, 1))
    assert run().returncode == 0 and (tmp_path / "finetune.safetensors").read_bytes() == built
    strict_load_and_run(NewHead(), tmp_path / "finetune.safetensors")


def test_cookbook_average_recipe_prints_what_the_command_prints(cli, tmp_path):
    """docs/cookbook.md "Average the last three checkpoints" shows `merge ... --average` printing
    "averaged 10 tensors with weights 0.333333, ..." and "taken from the first source (not
    floating)"; since --average became --method linear the command prints "merged 10 tensors by
    linear (weights 1,1,1)" and "taken from the first model". Issue 10 "Done means": recipes
    "with their real output". Fix: re-run the recipe and paste its output."""
    text = open(os.path.join(ROOT, "docs", "cookbook.md")).read()
    section = text.split("## Average the last three checkpoints", 1)[1]
    block = section.split("```\n$ ", 1)[1].split("```", 1)[0]  # the first command block, after the snippet
    printed = block.split("\n$ ", 1)[0].splitlines()[1:]  # what the first command ($ merge ...) printed
    shown = [line for line in printed if line and not line.startswith("wrote")]
    assert shown
    paths = []
    for epoch in (7, 8, 9):
        torch.manual_seed(epoch)
        paths.append(tmp_path / f"epoch{epoch}.pth")
        torch.save(Net().state_dict(), paths[-1])
    result = cli("merge", *paths, "--average", "-o", tmp_path / "swa.pth")
    assert result.code == 0, result.err
    for line in shown:
        assert line in result.err, (line, result.err)
