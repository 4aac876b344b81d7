"""Interrupted and failed writes, with real signals and a really full disk: never a partial file
at the output path, never temporary debris after a clean exit, an old output left intact."""

import json
import os
import shutil
import signal
import subprocess
import sys
import time

import pytest
import torch

EXE = shutil.which("ckptsurgery") or os.path.join(os.path.dirname(sys.executable), "ckptsurgery")


@pytest.fixture(scope="module")
def big_input(tmp_path_factory):
    """1 GiB of float32 in 8 tensors, as a sparse file: instant to make, seconds to convert."""
    path = tmp_path_factory.mktemp("big") / "big.safetensors"
    header = {f"t{i}": {"dtype": "F32", "shape": [2**25], "data_offsets": [i * 2**27, (i + 1) * 2**27]}
              for i in range(8)}
    raw = json.dumps(header).encode()
    raw += b" " * (-len(raw) % 8)
    with open(path, "wb") as f:
        f.write(len(raw).to_bytes(8, "little") + raw)
        f.truncate(8 + len(raw) + 8 * 2**27)
    return path


def start_and_signal(args, folder, sig) -> subprocess.Popen:
    """Start a write, wait until its temporary file holds data, then send `sig`."""
    proc = subprocess.Popen([EXE, *map(str, args)], stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        temps = [n for n in os.listdir(folder) if n.endswith(".ckptsurgery-tmp")]
        if temps and os.path.getsize(folder / temps[0]) > 2**20:
            proc.send_signal(sig)
            break
        assert proc.poll() is None, "the write finished before it could be interrupted"
        time.sleep(0.005)
    proc.wait(timeout=60)
    return proc


@pytest.mark.parametrize("sig, code", [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_ctrl_c_or_sigterm_mid_write(tmp_path, big_input, sig, code):
    out = tmp_path / "out.pth"
    proc = start_and_signal(["convert", big_input, "-o", out], tmp_path, sig)
    assert proc.returncode == code  # 128 + the signal, as a shell reports a process it stopped
    assert b"Traceback" not in proc.stderr.read()
    assert os.listdir(tmp_path) == []  # no output, no temporary debris


def test_sigkill_mid_write_leaves_nothing_at_the_output(tmp_path, big_input):
    out = tmp_path / "out.pth"
    proc = start_and_signal(["convert", big_input, "-o", out], tmp_path, signal.SIGKILL)
    assert proc.returncode == -signal.SIGKILL
    assert not out.exists()  # a killed process cannot clean up its temporary file, but OUT is untouched


def test_sigkill_over_existing_output_keeps_the_old_file(tmp_path, big_input):
    out = tmp_path / "out.pth"
    torch.save({"old": torch.arange(10)}, out)
    before = out.read_bytes()
    proc = start_and_signal(["convert", big_input, "-o", out, "--force"], tmp_path, signal.SIGKILL)
    assert proc.returncode == -signal.SIGKILL
    assert out.read_bytes() == before
    assert torch.equal(torch.load(out, weights_only=True)["old"], torch.arange(10))


@pytest.fixture
def tiny_disk(tmp_path):
    mount = tmp_path / "disk"
    mount.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(mount)], capture_output=True)
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {done.stderr.decode().strip()}")
    yield mount
    subprocess.run(["umount", str(mount)], check=True)


@pytest.mark.parametrize("suffix", [".pth", ".safetensors"])
def test_disk_full(cli, tmp_path, tiny_disk, suffix):
    src = tmp_path / "w.pth"
    torch.save({"w": torch.zeros(1024, 1024)}, src)  # 4 MB into a 1 MB disk
    result = cli("convert", src, "-o", tiny_disk / f"o{suffix}")
    assert result.code == 1 and "No space left on device" in result.err and "nothing was written" in result.err
    assert os.listdir(tiny_disk) == []


def test_permission_denied(cli, tmp_path, zip_pth):
    result = cli("convert", zip_pth, "-o", "/sys/ckptsurgery-test.safetensors")
    assert result.code == 1 and "Permission denied" in result.err and len(result.err.splitlines()) == 1
    assert not os.path.exists("/sys/ckptsurgery-test.safetensors")
