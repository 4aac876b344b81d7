"""Seeded random mutations of small valid files of each format. Whatever the bytes, a command
ends with exit 0, or exit 1 and one known-error line: no traceback, no unforeseen exception
(the catch-all's 'set CKPTSURGERY_DEBUG=1' message), no hang, no huge allocation, and a failed
write leaves the output folder as it was."""

import os
import random
import signal

import pytest
import torch
from safetensors.torch import save_file

CASES_PER_FORMAT = int(os.environ.get("FUZZ_CASES", "120"))


def mutate(data: bytes, rng: random.Random) -> bytes:
    data = bytearray(data)
    kind = rng.choice(["flip", "flip", "truncate", "insert", "zero", "duplicate", "lengths"])
    if kind == "flip":
        for _ in range(rng.randint(1, 8)):
            data[rng.randrange(len(data))] = rng.randrange(256)
    elif kind == "truncate":
        del data[rng.randrange(len(data)):]
    elif kind == "insert":
        at = rng.randrange(len(data))
        data[at:at] = bytes(rng.randrange(256) for _ in range(rng.randint(1, 16)))
    elif kind == "zero":
        at = rng.randrange(len(data))
        data[at : at + rng.randint(1, 64)] = bytes(min(64, len(data) - at))
    elif kind == "duplicate":
        at = rng.randrange(len(data))
        data[at:at] = data[at : at + rng.randint(1, 128)]
    else:  # a length-like field set to something enormous
        at = rng.randrange(max(1, len(data) - 8))
        data[at : at + 8] = rng.choice([2**63 - 1, 2**40, 2**31 + 7]).to_bytes(8, "little")
    return bytes(data)


@pytest.fixture(scope="module")
def seeds(tmp_path_factory):
    folder = tmp_path_factory.mktemp("seeds")
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.BatchNorm1d(4))
    opt = torch.optim.SGD(net.parameters(), lr=0.1, momentum=0.9)
    net(torch.randn(2, 3)).sum().backward()
    opt.step()
    nested = {"epoch": 1, "state_dict": net.state_dict(), "optimizer": opt.state_dict()}
    torch.save(nested, folder / "zip.pth")
    torch.save(nested, folder / "legacy.pth", _use_new_zipfile_serialization=False)
    save_file(dict(net.state_dict()), str(folder / "st.safetensors"), metadata={"a": "b"})
    _gguf_seed(folder / "g.gguf")
    return {name: (folder / name).read_bytes() for name in ("zip.pth", "legacy.pth", "st.safetensors", "g.gguf")}


def _gguf_seed(path) -> None:
    """A GGUF file as llama.cpp's gguf-py writes it: metadata of each kind, a plain and a quantized tensor."""
    import gguf
    import numpy as np

    w = gguf.GGUFWriter(str(path), "llama")
    w.add_block_count(1)
    w.add_array("tokenizer.ggml.tokens", ["a", "b", "c"])
    w.add_array("tokenizer.ggml.scores", [0.5, 1.5, 2.5])
    w.add_tensor("blk.0.attn_norm.weight", np.arange(8, dtype=np.float16))
    q = gguf.quants.quantize(np.linspace(-1, 1, 64, dtype=np.float32).reshape(2, 32), gguf.GGMLQuantizationType.Q8_0)
    w.add_tensor("blk.0.attn_q.weight", q, raw_shape=q.shape, raw_dtype=gguf.GGMLQuantizationType.Q8_0)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def _alarm(signum, frame):
    raise TimeoutError("a fuzz case hung")


@pytest.mark.parametrize("seed_name", ["zip.pth", "legacy.pth", "st.safetensors", "g.gguf"])
def test_mutated_files(cli, tmp_path, seeds, seed_name, limited_heap):
    rng = random.Random(os.environ.get("FUZZ_SEED", "ckptsurgery") + seed_name)
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    previous = signal.signal(signal.SIGALRM, _alarm)
    outcomes = {0: 0, 1: 0}
    try:
        for case in range(CASES_PER_FORMAT):
            path = tmp_path / f"case{os.path.splitext(seed_name)[1]}"
            path.write_bytes(mutate(seeds[seed_name], rng))
            for args in (["inspect", path, "--json"], ["convert", path, "-o", out_dir / "o.safetensors"],
                         ["convert", path, "-o", out_dir / "o.pth"]):
                before = sorted(os.listdir(out_dir))
                signal.alarm(10)
                result = cli(*args)
                signal.alarm(0)
                where = (case, args[0], result.err)
                assert result.code in (0, 1), where
                assert "Traceback" not in result.err and "CKPTSURGERY_DEBUG" not in result.err, where
                if result.code == 1:
                    assert len(result.err.strip().splitlines()) == 1, where
                    assert sorted(os.listdir(out_dir)) == before, where  # the folder exactly as it was
                outcomes[result.code] += 1
                assert all(not n.startswith(".") for n in os.listdir(out_dir)), where  # no temporary debris
            for name in os.listdir(out_dir):
                os.unlink(out_dir / name)
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)
    assert outcomes[1] > 0  # the mutations did break files: the test exercised the error paths
