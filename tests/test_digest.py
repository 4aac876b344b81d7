"""inspect --hash: a SHA-256 per tensor over dtype, shape and row-major bytes, the same in every
format, and a fingerprint of the state dict — their exact preimages (docs/reading-and-writing.md)
checked byte for byte; diff compares tensors by the same hashes."""

from __future__ import annotations

import hashlib

import pytest
import torch

from conftest import assert_one_error_line


def known_sha256(t: torch.Tensor) -> str:
    """The preimage, written out: tag, dtype, shape, then the row-major little-endian bytes."""
    shape = ",".join(map(str, t.shape))
    data = t.contiguous().reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b""
    return hashlib.sha256(f"ckptsurgery.tensor.v1\n{str(t.dtype)[6:]}\n{shape}\n".encode() + data).hexdigest()


def known_fingerprint(hashes: dict[str, str]) -> str:
    h = hashlib.sha256(b"ckptsurgery.state_dict.v1\n")
    for name in sorted(hashes, key=lambda n: n.encode()):
        h.update(f"{len(name.encode())}:{name} {hashes[name]}\n".encode())
    return h.hexdigest()


STATE = {
    "w": torch.arange(6, dtype=torch.float32).reshape(2, 3),
    "half": torch.tensor([1.5, -2.0], dtype=torch.bfloat16),
    "step": torch.tensor(3),
    "empty": torch.zeros(0, 4),
    "été.b": torch.tensor([True, False]),
}


def test_hashes_and_fingerprint_are_the_documented_preimages(cli, tmp_path):
    path = tmp_path / "m.pth"
    torch.save(STATE, path)
    doc = cli("inspect", path, "--hash", "--json").json()
    got = {t["name"]: t["sha256"] for t in doc["tensors"]}
    assert got == {name: known_sha256(t) for name, t in STATE.items()}
    assert doc["fingerprint"] == known_fingerprint(got)
    human = cli("inspect", path, "--hash")
    assert human.code == 0 and got["w"] in human.out and f"fingerprint {doc['fingerprint']}" in human.out


def test_the_same_tensors_hash_alike_in_every_format(cli, tmp_path):
    pth, legacy = tmp_path / "m.pth", tmp_path / "legacy.pth"
    torch.save(STATE, pth)
    torch.save(STATE, legacy, _use_new_zipfile_serialization=False)
    outputs = [pth, legacy, tmp_path / "m.safetensors", tmp_path / "back.pth"]
    assert cli("convert", pth, "-o", outputs[2]).code == 0
    assert cli("convert", outputs[2], "-o", outputs[3]).code == 0
    (tmp_path / "sharded").mkdir()
    assert cli("convert", pth, "-o", tmp_path / "sharded" / "model.safetensors", "--max-shard-size", "30").code == 0
    outputs.append(tmp_path / "sharded")
    prints = {cli("inspect", p, "--hash", "--json").json()["fingerprint"] for p in outputs}
    assert len(prints) == 1


def test_a_view_hashes_as_its_values_and_tied_names_alike(cli, tmp_path):
    base = torch.arange(12, dtype=torch.float32).reshape(3, 4)
    path = tmp_path / "views.pth"
    torch.save({"t": base.t(), "row": base[1], "tied_a": base, "tied_b": base}, path)
    doc = cli("inspect", path, "--hash", "--json").json()
    got = {t["name"]: t["sha256"] for t in doc["tensors"]}
    assert got["t"] == known_sha256(base.t().contiguous()) and got["row"] == known_sha256(base[1])
    assert got["tied_a"] == got["tied_b"] == known_sha256(base)


def test_quantized_tensors_hash_their_scales_too(cli, tmp_path):
    ints = torch.tensor([1.0, 2.0, 3.0])
    a, b = tmp_path / "a.pth", tmp_path / "b.pth"
    torch.save({"q": torch.quantize_per_tensor(ints, 0.5, 0, torch.qint8)}, a)
    torch.save({"q": torch.quantize_per_tensor(ints * 2, 1.0, 0, torch.qint8)}, b)  # the same ints
    ha, hb = (cli("inspect", p, "--hash", "--json").json()["tensors"][0]["sha256"] for p in (a, b))
    assert ha != hb
    assert cli("diff", a, b).code == 1


def test_keys_select_what_the_fingerprint_covers_and_tree_needs_json(cli, tmp_path):
    path = tmp_path / "m.pth"
    torch.save(STATE, path)
    doc = cli("inspect", path, "--hash", "--keys", "w", "--json").json()
    assert doc["fingerprint"] == known_fingerprint({"w": known_sha256(STATE["w"])})
    assert_one_error_line(cli("inspect", path, "--hash", "--tree"), "--hash lists tensors", code=2)
    assert "tree" in cli("inspect", path, "--hash", "--tree", "--json").json()


@pytest.mark.parametrize("flip", [None, 5])
def test_diff_compares_by_the_hashes(cli, tmp_path, flip):
    data = torch.randn(1000)
    a, b = tmp_path / "a.safetensors", tmp_path / "b.pth"
    from safetensors.torch import save_file

    save_file({"x": data}, str(a))
    changed = data.clone()
    if flip is not None:
        changed.view(torch.int32)[flip] ^= 1  # one bit of one element
    torch.save({"x": changed}, b)
    result = cli("diff", a, b, "--json")
    assert result.code == (0 if flip is None else 1)
    assert result.json()["identical"] is (flip is None)
