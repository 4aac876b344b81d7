"""The reader layer against torch's own loader, format by format, and files torch writes today
(a storage recorded typed and untyped, a module registered twice, torch.ao quantized state dicts)."""

import json
import subprocess
import sys

import pytest
import torch
from safetensors.torch import save_file
from torch import nn

from ckptsurgery import open_checkpoint
from ckptsurgery.errors import CkptError
from ckptsurgery.io import detect_format
from conftest import torch_loads


def as_torch(ckpt):
    return {name: t.to_torch() for name, t in ckpt.tensors.items()}


def test_zip_state_dict_matches_torch_load(zip_pth, state_dict):
    with open_checkpoint(zip_pth) as ckpt:
        assert ckpt.format == "torch-zip" and ckpt.root == "" and ckpt.inert == []
        got = as_torch(ckpt)
    assert list(got) == list(state_dict)
    for name in state_dict:
        assert torch.equal(got[name], state_dict[name]) and got[name].dtype == state_dict[name].dtype


def test_legacy_format_matches(legacy_pth, state_dict):
    assert detect_format(str(legacy_pth)) == "torch-legacy"
    with open_checkpoint(legacy_pth) as ckpt:
        assert ckpt.format == "torch-legacy"
        got = as_torch(ckpt)
    for name in state_dict:
        assert torch.equal(got[name], state_dict[name])


def test_format_comes_from_bytes_not_extension(tmp_path, state_dict):
    odd = tmp_path / "weights.safetensors"  # really a torch zip
    torch.save(state_dict, odd)
    with open_checkpoint(odd) as ckpt:
        assert ckpt.format == "torch-zip"


def test_nested_checkpoint_root_detected_and_extras(nested_pth, net):
    with open_checkpoint(nested_pth) as ckpt:
        assert ckpt.root == "state_dict"
        assert list(ckpt.tensors) == list(net.state_dict())
        assert ckpt.obj["epoch"] == 7 and ckpt.obj["tag"] == b"\x00\xffbytes"


def test_root_override_and_errors(nested_pth, zip_pth):
    with open_checkpoint(nested_pth, root="state_dict") as ckpt:
        assert ckpt.root == "state_dict"
    with pytest.raises(CkptError, match="no key 'model'"):
        open_checkpoint(nested_pth, root="model")
    with pytest.raises(CkptError, match="does not hold a state dict"):
        open_checkpoint(nested_pth, root="epoch")
    with pytest.raises(CkptError, match="does not hold a state dict"):
        open_checkpoint(nested_pth, root="")
    with open_checkpoint(zip_pth, root="") as ckpt:
        assert ckpt.root == ""


@pytest.mark.parametrize("key", ["model", "model_state", "state_dict_ema", "my_weights"])
def test_root_detection_keys(tmp_path, state_dict, key):
    path = tmp_path / "n.pth"
    torch.save({key: state_dict, "step": 3}, path)
    with open_checkpoint(path) as ckpt:
        assert ckpt.root == key and len(ckpt.tensors) == len(state_dict)


@pytest.mark.parametrize("suffix", ["", ".legacy"])
def test_whole_pickled_module_without_its_class(pickled_module, suffix):
    path, truth, _ = pickled_module
    with open_checkpoint(f"{path}{suffix}") as ckpt:
        assert list(ckpt.tensors) == truth["names"]  # same names, same order as model.state_dict()
        assert "scratch" not in ckpt.tensors  # non-persistent buffer
        assert "__main__.SecretNet" in ckpt.inert
        frozen = [n for n, t in ckpt.tensors.items() if t.requires_grad is False]
        assert frozen == truth["frozen"]
        assert ckpt.tensors["head.weight"].requires_grad is True
        assert ckpt.tensors["scale"].requires_grad is None  # a buffer is a plain tensor


def test_gpu_tagged_storages_load_on_cpu(gpu_tagged_pth, state_dict):
    with pytest.raises(RuntimeError):  # proves the file really is tagged for a GPU
        torch.load(gpu_tagged_pth, weights_only=True)
    with open_checkpoint(gpu_tagged_pth) as ckpt:
        assert torch.equal(ckpt.tensors["liner1.weight"].to_torch(), state_dict["liner1.weight"])


def test_tied_weights_share(tied_pth):
    with open_checkpoint(tied_pth) as ckpt:
        shares = ckpt.shares_with()
    assert shares == {"embed.weight": None, "mid.weight": None, "lm_head.weight": "embed.weight"}


def test_bf16_noncontiguous_and_odd_tensors(odd_tensors_pth):
    ref = torch.load(odd_tensors_pth, weights_only=True)
    with open_checkpoint(odd_tensors_pth) as ckpt:
        assert not ckpt.tensors["transposed"].is_contiguous
        assert ckpt.tensors["bf"].dtype.name == "bfloat16"
        for name, t in ckpt.tensors.items():
            got = t.to_torch()
            assert got.dtype == ref[name].dtype and torch.equal(got, ref[name]), name


def test_safetensors_reader(safetensors_file, state_dict):
    with open_checkpoint(safetensors_file) as ckpt:
        assert ckpt.format == "safetensors" and ckpt.metadata == {"source": "test"}
        for name in state_dict:
            assert torch.equal(ckpt.tensors[name].to_torch(), state_dict[name])


def _shard(tmp_path, state_dict, kind):
    names = list(state_dict)
    half = len(names) // 2
    parts = {f"part-1.{kind}": names[:half], f"part-2.{kind}": names[half:]}
    for file, keys in parts.items():
        sub = {k: state_dict[k] for k in keys}
        if kind == "safetensors":
            save_file(sub, str(tmp_path / file))
        else:
            torch.save(sub, tmp_path / file)
    index = {"metadata": {"total_size": 1}, "weight_map": {k: f for f, ks in parts.items() for k in ks}}
    (tmp_path / f"model.{kind}.index.json").write_text(json.dumps(index))
    return tmp_path / f"model.{kind}.index.json"


@pytest.mark.parametrize("kind, fmt", [("safetensors", "sharded-safetensors"), ("bin", "sharded-torch")])
def test_sharded_index_and_folder(tmp_path, state_dict, kind, fmt):
    index = _shard(tmp_path, state_dict, kind)
    for path in (index, tmp_path):
        with open_checkpoint(path) as ckpt:
            assert ckpt.format == fmt and list(ckpt.tensors) == list(state_dict)
            assert torch.equal(ckpt.tensors["bn.running_var"].to_torch(), state_dict["bn.running_var"])


def test_sharded_index_naming_a_missing_tensor(tmp_path, state_dict):
    index = _shard(tmp_path, state_dict, "safetensors")
    doc = json.loads(index.read_text())
    doc["weight_map"]["ghost"] = "part-1.safetensors"
    index.write_text(json.dumps(doc))
    with pytest.raises(CkptError, match="'ghost' is not in its shard"):
        open_checkpoint(index)


def test_listing_reads_no_tensor_data(tmp_path):
    """A 1 GiB sparse tensor: listing it must not fault its pages in (peak RSS stays small)."""
    header = json.dumps({"big": {"dtype": "F32", "shape": [2**28], "data_offsets": [0, 2**30]}}).encode()
    header += b" " * (-len(header) % 8)
    path = tmp_path / "big.safetensors"
    with open(path, "wb") as f:
        f.write(len(header).to_bytes(8, "little") + header)
        f.truncate(8 + len(header) + 2**30)
    # VmHWM, not ru_maxrss: the latter survives exec and would report pytest's own size
    code = ("import sys; from ckptsurgery.cli import main; sys.argv=['c','inspect',sys.argv[1],'--json']\n"
            "try: main()\nexcept SystemExit: pass\n"
            "print([l for l in open('/proc/self/status') if l.startswith('VmHWM')][0].split()[1], file=sys.stderr)")
    done = subprocess.run([sys.executable, "-c", code, str(path)], capture_output=True, text=True)
    assert json.loads(done.stdout)["total_bytes"] == 2**30
    assert int(done.stderr.split()[-1]) < 200_000  # KiB: far below the tensor's 1 GiB


@pytest.mark.parametrize("fixture", ["zip_pth", "legacy_pth", "safetensors_file", "nested_pth"])
def test_inspect_does_not_import_torch(request, fixture):
    path = request.getfixturevalue(fixture)
    code = ("import sys; from ckptsurgery.cli import main; sys.argv=['ckptsurgery','inspect',sys.argv[1],'--json'];"
            "\ntry: main()\nexcept SystemExit: pass\nassert 'torch' not in sys.modules, 'torch was imported'")
    done = subprocess.run([sys.executable, "-c", code, str(path)], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["total_params"] > 0


def test_index_json_with_a_brace_at_byte_8_is_an_index(tmp_path, state_dict):
    save_file(dict(state_dict), str(tmp_path / "m.safetensors"))
    index = tmp_path / "i.index.json"
    raw = '{"x":   {}, "weight_map": ' + json.dumps({k: "m.safetensors" for k in state_dict}) + "}"
    assert raw[8] == "{"
    index.write_text(raw)
    with open_checkpoint(index) as ckpt:
        assert ckpt.format == "sharded-safetensors" and list(ckpt.tensors) == list(state_dict)


def test_safetensors_whose_length_starts_with_a_brace(tmp_path):
    """A header of 123 bytes makes the file's first byte "{": still safetensors, not JSON."""
    path = tmp_path / "brace.safetensors"
    header = json.dumps({"w": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}}).encode()
    header += b" " * (123 - len(header))
    path.write_bytes(len(header).to_bytes(8, "little") + header + b"\0\0\0\0")
    assert path.read_bytes()[:1] == b"{"
    with open_checkpoint(path) as ckpt:
        assert ckpt.format == "safetensors" and list(ckpt.tensors) == ["w"]


# ---- an unsharded Hugging Face model folder ----------------------------------------------------

def test_a_model_folder_without_an_index_reads_its_one_weights_file(cli, tmp_path, state_dict):
    from conftest import assert_one_error_line

    folder = tmp_path / "hf"
    folder.mkdir()
    (folder / "config.json").write_text("{}")
    torch.save({k: v + 1 for k, v in state_dict.items()}, folder / "pytorch_model.bin")
    assert cli("inspect", folder, "--json").json()["path"] == str(folder / "pytorch_model.bin")
    save_file(dict(state_dict), str(folder / "model.safetensors"))  # preferred, as transformers does
    doc = cli("inspect", folder, "--json").json()
    assert doc["path"] == str(folder / "model.safetensors") and doc["format"] == "safetensors"
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "config.json").write_text("{}")
    assert_one_error_line(cli("inspect", empty), "no *.index.json and none of model.safetensors")


# ---- what torch writes today, read as torch reads it ---------------------------------------

def test_typed_and_untyped_records_of_one_storage_are_read(cli, tmp_path):
    """torch saves a float8 tensor and its uint8 view as UntypedStorage + ByteStorage records of one key; torch reads it, so must we."""
    w = torch.linspace(-1, 1, 8).to(torch.float8_e4m3fn)
    src = tmp_path / "mixed.pth"
    torch.save({"f8": w, "raw": w.view(torch.uint8)}, src)
    assert torch_loads(src)[0]
    assert cli("inspect", src).code == 0


class _SharedBlock(nn.Module):
    def __init__(self):
        super().__init__()
        block = nn.Linear(2, 2)
        self.enc = block
        self.dec = block


def test_pickled_module_with_a_shared_submodule_lists_every_name(cli, tmp_path):
    """torch.save(model) where one submodule is registered twice: the names are model.state_dict()'s, all four."""
    model = _SharedBlock()
    src = tmp_path / "shared.pth"
    torch.save(model, src)
    result = cli("inspect", src, "--json")
    assert result.code == 0, result.err
    assert [t["name"] for t in result.json()["tensors"]] == list(model.state_dict())


def test_ao_quantized_state_dict_is_found_without_root(cli, tmp_path):
    """The state_dict of a torch.ao.quantization-converted model (dtype and packed-params entries beside tensors) is read without --root ''."""
    import torch.ao.quantization as tq

    model = nn.Sequential(tq.QuantStub(), nn.Linear(4, 2), tq.DeQuantStub()).eval()
    model.qconfig = tq.get_default_qconfig("fbgemm")
    prepared = tq.prepare(model)
    prepared(torch.randn(8, 4))
    src = tmp_path / "ao.pth"
    torch.save(tq.convert(prepared).state_dict(), src)
    assert torch_loads(src)[0]
    result = cli("inspect", src, "--json")
    assert result.code == 0, result.err
