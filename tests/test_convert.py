"""`convert` through the real entry point: round trips, casts, ties, shards, determinism; what a
.pth output keeps (tensor attributes, odd storages, _extra_state of shards), and what --dtype
leaves alone (entries outside the state dict, a quantized tensor's scales)."""

import hashlib
import json
import os

import pytest
import torch
from safetensors import safe_open

from conftest import assert_same_tensors, load_any
from test_hostile_opcodes import assert_clean


def digest(path) -> str:
    return hashlib.sha256(open(path, "rb").read()).hexdigest()


@pytest.mark.parametrize("fixture", ["zip_pth", "legacy_pth", "odd_tensors_pth", "gpu_tagged_pth"])
def test_pth_to_safetensors_and_back_bit_exact(cli, tmp_path, request, fixture):
    src = request.getfixturevalue(fixture)
    ref = torch.load(src, map_location="cpu", weights_only=True)
    st, back = tmp_path / "out.safetensors", tmp_path / "back.pth"
    assert cli("convert", src, "-o", st).code == 0
    assert_same_tensors(ref, load_any(st), ordered=False)
    with safe_open(str(st), "pt") as f:
        assert f.metadata()["format"] == "pt"
        assert list(f.keys()) == sorted(ref)  # safetensors lists sorted; our header keeps order
    assert cli("convert", st, "-o", back).code == 0
    assert_same_tensors(ref, load_any(back))


def test_whole_module_converts_to_state_dict(cli, tmp_path, pickled_module):
    path, truth, sd_path = pickled_module
    out = tmp_path / "sd.safetensors"
    assert cli("convert", path, "-o", out).code == 0
    assert_same_tensors(torch.load(sd_path, weights_only=True), load_any(out), ordered=False)
    pth = tmp_path / "sd.pth"
    assert cli("convert", path, "-o", pth).code == 0
    loaded = load_any(pth)  # weights_only=True: the user's class is not needed any more
    assert list(loaded) == truth["names"]


def test_nested_carried_through_to_pth(cli, tmp_path, nested_pth):
    out = tmp_path / "copy.ckpt"
    assert cli("convert", nested_pth, "-o", out).code == 0
    a = torch.load(nested_pth, weights_only=True)
    b = torch.load(out, weights_only=True)
    assert list(a) == list(b) and a["epoch"] == b["epoch"] and a["best"] == b["best"] and a["tag"] == b["tag"]
    assert_same_tensors(a["state_dict"], b["state_dict"])
    assert a["optimizer"]["param_groups"] == b["optimizer"]["param_groups"]
    for key, state in a["optimizer"]["state"].items():
        for name, value in state.items():
            assert torch.equal(value, b["optimizer"]["state"][key][name])


def test_nested_to_safetensors_reports_left_out(cli, tmp_path, nested_pth):
    out = tmp_path / "w.safetensors"
    result = cli("convert", nested_pth, "-o", out, "--json")
    assert result.code == 0
    report = result.json()
    assert report["root"] == "state_dict"
    assert report["extras_left_out"] == ["epoch", "optimizer", "best", "tag"]
    human = cli("convert", nested_pth, "-o", tmp_path / "x.safetensors")
    assert "left out" in human.err and "optimizer" in human.err and human.out == ""


def test_state_dict_metadata_survives(cli, tmp_path, zip_pth, net):
    out = tmp_path / "again.pth"
    cli("convert", zip_pth, "-o", out)
    loaded = torch.load(out, weights_only=True)
    assert loaded._metadata == net.state_dict()._metadata
    net.load_state_dict(loaded, strict=True)


@pytest.mark.parametrize("flag, dtype", [("fp16", torch.float16), ("bf16", torch.bfloat16), ("fp32", torch.float32)])
@pytest.mark.parametrize("suffix", [".safetensors", ".pth"])
def test_dtype_casts_floating_only(cli, tmp_path, odd_tensors_pth, flag, dtype, suffix):
    out = tmp_path / f"cast{suffix}"
    assert cli("convert", odd_tensors_pth, "-o", out, "--dtype", flag).code == 0
    ref = torch.load(odd_tensors_pth, weights_only=True)
    got = load_any(out)
    for name, value in ref.items():
        if value.is_floating_point():
            assert got[name].dtype == dtype and torch.equal(got[name], value.to(dtype)), name
        else:
            assert got[name].dtype == value.dtype and torch.equal(got[name], value), name


def test_bad_dtype_is_usage_error(cli, tmp_path, zip_pth):
    result = cli("convert", zip_pth, "-o", tmp_path / "x.pth", "--dtype", "fp8")
    assert result.code == 2 and "'fp8' is not one of 'fp32', 'fp16', 'bf16'" in result.err


def test_tied_weights_stored_once_and_restored(cli, tmp_path, tied_pth):
    st, back = tmp_path / "tied.safetensors", tmp_path / "back.pth"
    report = cli("convert", tied_pth, "-o", st, "--json").json()
    assert report["tied"] == {"lm_head.weight": "embed.weight"}
    with safe_open(str(st), "pt") as f:
        assert sorted(f.keys()) == ["embed.weight", "mid.weight"]
    assert cli("convert", st, "-o", back).code == 0
    restored = torch.load(back, weights_only=True)
    assert list(restored) == ["embed.weight", "mid.weight", "lm_head.weight"]
    assert restored["lm_head.weight"].data_ptr() == restored["embed.weight"].data_ptr()
    listing = cli("inspect", st, "--json").json()
    assert [t["shares_with"] for t in listing["tensors"]] == [None, None, "embed.weight"]


def test_noncontiguous_written_contiguous(cli, tmp_path, odd_tensors_pth):
    out = tmp_path / "o.safetensors"
    cli("convert", odd_tensors_pth, "-o", out)
    got = load_any(out)["transposed"]
    assert got.is_contiguous() and torch.equal(got, torch.arange(12.0).reshape(3, 4).t())


def test_refuses_to_overwrite_without_force(cli, tmp_path, zip_pth):
    out = tmp_path / "o.safetensors"
    out.write_bytes(b"precious")
    result = cli("convert", zip_pth, "-o", out)
    assert result.code == 1 and "--force" in result.err and out.read_bytes() == b"precious"
    assert cli("convert", zip_pth, "-o", out, "--force").code == 0
    assert load_any(out)


def test_dry_run_writes_nothing(cli, tmp_path, zip_pth):
    out = tmp_path / "o.safetensors"
    result = cli("convert", zip_pth, "-o", out, "--dry-run")
    assert result.code == 0 and "would write" in result.out and not out.exists()
    assert cli("convert", zip_pth, "-o", out, "--dry-run", "--json").json()["dry_run"] is True
    assert os.listdir(tmp_path) == ["model.pth"]


@pytest.mark.parametrize("suffix", [".safetensors", ".pth"])
def test_deterministic_bytes(cli, tmp_path, nested_pth, suffix):
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    first, second = tmp_path / "a" / f"x{suffix}", tmp_path / "b" / f"y{suffix}"
    cli("convert", nested_pth, "-o", first)
    cli("convert", nested_pth, "-o", second)
    assert digest(first) == digest(second)
    cli("convert", nested_pth, "-o", first, "--force")
    assert digest(first) == digest(second)


@pytest.mark.parametrize("suffix, pattern", [(".safetensors", "model-{:05d}-of-{:05d}.safetensors"),
                                             (".bin", "model-{:05d}-of-{:05d}.bin")])
def test_sharded_output(cli, tmp_path, zip_pth, suffix, pattern):
    out = tmp_path / "out" / f"model{suffix}"
    out.parent.mkdir()
    report = cli("convert", zip_pth, "-o", out, "--max-shard-size", "200B", "--json").json()
    count = report["shards"]
    assert count > 2
    names = sorted(os.listdir(out.parent))
    expected = sorted([pattern.format(i, count) for i in range(1, count + 1)] + [f"model{suffix}.index.json"])
    assert names == expected
    index = json.loads((out.parent / f"model{suffix}.index.json").read_text())
    ref = torch.load(zip_pth, weights_only=True)
    assert index["metadata"]["total_size"] == sum(v.numel() * v.element_size() for v in ref.values())
    assert sorted(index["weight_map"]) == sorted(ref)
    for name, shard in index["weight_map"].items():  # every shard loads with the reference loader
        assert torch.equal(load_any(out.parent / shard)[name], ref[name])
    listing = cli("inspect", out.parent, "--json").json()  # and reads back as one checkpoint
    assert listing["format"].startswith("sharded-") and listing["total_params"] == sum(v.numel() for v in ref.values())


def test_tensor_bigger_than_shard_gets_its_own(cli, tmp_path, zip_pth):
    out = tmp_path / "m.safetensors"
    report = cli("convert", zip_pth, "-o", out, "--max-shard-size", "1", "--json").json()
    assert report["shards"] == len(torch.load(zip_pth, weights_only=True))


def test_single_shard_writes_plain_file(cli, tmp_path, zip_pth):
    out = tmp_path / "m.safetensors"
    report = cli("convert", zip_pth, "-o", out, "--max-shard-size", "10GB", "--json").json()
    assert report["files"] == [str(out)] and "shards" not in report
    assert sorted(os.listdir(tmp_path)) == ["m.safetensors", "model.pth"]


def test_sharded_input_converts_to_one_file(cli, tmp_path, zip_pth):
    shards = tmp_path / "shards"
    shards.mkdir()
    cli("convert", zip_pth, "-o", shards / "model.safetensors", "--max-shard-size", "300B")
    assert cli("convert", shards, "-o", tmp_path / "one.pth").code == 0
    assert_same_tensors(torch.load(zip_pth, weights_only=True), load_any(tmp_path / "one.pth"))


def test_unknown_output_extension(cli, tmp_path, zip_pth):
    result = cli("convert", zip_pth, "-o", tmp_path / "out.npz")
    assert result.code == 1 and "end the name with .safetensors" in result.err


def test_failed_write_leaves_no_file(cli, tmp_path, zip_pth, monkeypatch):
    """A write that fails halfway (here: the disk 'fills') leaves neither output nor temp file."""
    import ckptsurgery.io.write as write

    def disk_full(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(write, "_copy_range", disk_full)
    monkeypatch.setattr(write, "SMALL_COPY", 0)  # every tensor copied by the kernel, even small ones
    result = cli("convert", zip_pth, "-o", tmp_path / "o.safetensors")
    assert result.code == 1 and "No space left" in result.err and "Traceback" not in result.err
    assert os.listdir(tmp_path) == ["model.pth"]


@pytest.mark.parametrize("interrupt", [KeyboardInterrupt, lambda: SystemExit(143)], ids=["ctrl-c", "sigterm"])
def test_interrupted_write_leaves_nothing(cli, tmp_path, zip_pth, monkeypatch, interrupt):
    """Ctrl-C (or SIGTERM, which main() turns into the same unwinding) halfway through a write:
    non-zero exit, no output, no temporary file; an existing output is left as it was."""
    import ckptsurgery.io.torch_zip as torch_zip
    import ckptsurgery.io.write as write

    real = write._chunks
    calls = []

    def chunks_then_interrupt(view, progress):
        calls.append(1)
        if len(calls) == 3:
            raise interrupt()
        return real(view, progress)

    monkeypatch.setattr(write, "_chunks", chunks_then_interrupt)
    monkeypatch.setattr(torch_zip, "SMALL_RECORD", -1)  # every storage streamed in chunks, even small ones
    result = cli("convert", zip_pth, "-o", tmp_path / "o.pth")
    assert result.code != 0 and "Traceback" not in result.err
    assert os.listdir(tmp_path) == ["model.pth"]
    old = tmp_path / "old.pth"
    old.write_bytes(b"previous output")
    calls.clear()
    assert cli("convert", zip_pth, "-o", old, "--force").code != 0
    assert old.read_bytes() == b"previous output"
    assert sorted(os.listdir(tmp_path)) == ["model.pth", "old.pth"]


def test_failed_sharded_write_keeps_the_old_shards(cli, tmp_path, zip_pth, monkeypatch):
    """Shards are renamed into place together only once all are written: a failure on a later
    shard, even with --force over an older sharded output, leaves the old set whole."""
    import ckptsurgery.io.write as write

    out = tmp_path / "out" / "model.safetensors"
    out.parent.mkdir()
    assert cli("convert", zip_pth, "-o", out, "--max-shard-size", "300B").code == 0
    before = {n: (out.parent / n).read_bytes() for n in os.listdir(out.parent)}
    real, calls = write._copy_range, []

    def fail_later(*args, **kwargs):
        calls.append(1)
        if len(calls) > 4:
            raise OSError(28, "No space left on device")
        return real(*args, **kwargs)

    monkeypatch.setattr(write, "_copy_range", fail_later)
    monkeypatch.setattr(write, "SMALL_COPY", 0)  # every tensor copied by the kernel, even small ones
    result = cli("convert", zip_pth, "-o", out, "--max-shard-size", "300B", "--force", "--dtype", "fp32")
    assert result.code == 1 and "No space left" in result.err
    assert {n: (out.parent / n).read_bytes() for n in os.listdir(out.parent)} == before


def test_plain_tensor_requires_grad_survives_a_rewrite(cli, tmp_path):
    src = tmp_path / "g.pth"
    torch.save({"state_dict": {"w": torch.ones(2)}, "ema": torch.zeros(2, requires_grad=True)}, src)
    out = tmp_path / "copy.pth"
    assert cli("convert", src, "-o", out).code == 0
    loaded = torch.load(out, weights_only=True)
    assert loaded["ema"].requires_grad and not loaded["state_dict"]["w"].requires_grad


def test_storage_locations_are_written_back_as_read(cli, tmp_path, gpu_tagged_pth, state_dict):
    """A GPU-tagged .pth stays GPU-tagged: loadable with map_location, as its input is, and no more."""
    out = tmp_path / "copy.pth"
    assert cli("convert", gpu_tagged_pth, "-o", out).code == 0
    with pytest.raises(RuntimeError):
        torch.load(out, weights_only=True)
    assert_same_tensors(state_dict, torch.load(out, map_location="cpu", weights_only=True))


# ---- what a .pth output keeps ------------------------------------------------------------------

def test_tensor_attributes_survive_a_pth_round_trip(cli, tmp_path):
    """A tensor with a Python attribute (saved by torch via _rebuild_from_type_v2 with state) keeps it in a .pth output."""
    t = torch.arange(4.0)
    t.scale_hint = "per-row"
    src, out = tmp_path / "attr.pth", tmp_path / "out.pth"
    torch.save({"w": t}, src)
    assert torch.load(src, weights_only=True)["w"].__dict__ == {"scale_hint": "per-row"}
    assert cli("convert", src, "-o", out).code == 0
    assert torch.load(out, weights_only=True)["w"].__dict__ == {"scale_hint": "per-row"}


def test_untyped_storage_of_odd_size_converts(cli, tmp_path):
    """A uint16 tensor over a 5-byte UntypedStorage (torch writes and reads it) converts to .pth without the catch-all."""
    storage = torch.UntypedStorage(5)
    t = torch.tensor([], dtype=torch.uint16).set_(storage, 0, (2,), (1,))
    t.fill_(7)
    src, out = tmp_path / "odd.pth", tmp_path / "out.pth"
    torch.save({"w": t}, src)
    assert torch.equal(torch.load(src, weights_only=True)["w"], t)
    result = cli("convert", src, "-o", out)
    assert result.code == 0, result.err
    assert torch.equal(torch.load(out, weights_only=True)["w"], t)


def test_sharded_bin_extra_state_is_carried_or_reported(cli, tmp_path):
    """A sharded .bin whose shard holds a._extra_state: the .pth output carries it, or the report names it as left out."""
    folder = tmp_path / "sharded"
    folder.mkdir()
    torch.save({"a.weight": torch.ones(2), "a._extra_state": b"fp8-meta"}, folder / "m-1.bin")
    torch.save({"b.weight": torch.zeros(2)}, folder / "m-2.bin")
    (folder / "m.bin.index.json").write_text(json.dumps(
        {"metadata": {}, "weight_map": {"a.weight": "m-1.bin", "b.weight": "m-2.bin"}}))
    out = tmp_path / "out.pth"
    result = cli("convert", folder / "m.bin.index.json", "-o", out, "--json")
    assert result.code == 0, result.err
    got = torch.load(out, weights_only=True)
    assert got.get("a._extra_state") == b"fp8-meta" or "a._extra_state" in result.out, (list(got), result.out)


def test_dtype_cast_leaves_what_is_outside_the_state_dict_alone(cli, tmp_path, net):
    """--dtype bf16 casts the state dict only: an optimizer's step counter (257.0) must not become bf16 (256.0)."""
    opt = torch.optim.Adam(net.parameters())
    net(torch.randn(2, 3, 5, 5)).sum().backward()
    opt.step()
    state = opt.state_dict()
    for entry in state["state"].values():
        entry["step"] = torch.tensor(257.0)
    src, out = tmp_path / "train.pth", tmp_path / "bf16.pth"
    torch.save({"state_dict": net.state_dict(), "optimizer": state}, src)
    assert cli("convert", src, "-o", out, "--dtype", "bf16").code == 0
    got = torch.load(out, weights_only=True)
    assert got["state_dict"]["conv.weight"].dtype == torch.bfloat16
    step = got["optimizer"]["state"][0]["step"]
    assert step.dtype == torch.float32 and step.item() == 257.0, (step.dtype, step.item())


def test_dtype_cast_leaves_a_quantized_tensors_scales_alone(cli, tmp_path):
    """--dtype fp16 keeps q (reported in kept_dtype), so its per-channel scales — one storage with a float64 state-dict tensor — must not be cast either."""
    scales = torch.tensor([0.1, 0.2, 0.3], dtype=torch.float64)
    q = torch.quantize_per_channel(torch.randn(3, 4), scales, torch.tensor([0, 1, 2]), 0, torch.qint8)
    src, out = tmp_path / "q.pth", tmp_path / "out.pth"
    torch.save({"q": q, "q_scales": scales}, src)
    result = cli("convert", src, "-o", out, "--dtype", "fp16", "--json")
    assert_clean(result)
    if result.code == 0:
        assert "q" in result.json()["kept_dtype"]
        got = torch.load(out, weights_only=True)["q"]
        assert torch.equal(got.dequantize(), q.dequantize()), "q's values changed although it kept its dtype"
