"""Fixtures build tiny checkpoints in tmp_path, in every format the tool reads; the helpers here
(the in-process `cli`, `assert_one_error_line`, the reference readers `load_any` and
`torch_loads`, torchrun and DeepSpeed runners) are shared by several test modules."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from collections import OrderedDict
from pathlib import Path

import pytest
import torch
from torch import nn

from ckptsurgery.cli import main


class Net(nn.Module):
    """The fine-tuning model of docs/architecture.md: liner1 and liner10 test the module-name patterns."""

    def __init__(self, classes: int = 4):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)
        self.bn = nn.BatchNorm2d(4)
        self.liner1 = nn.Linear(4, 5)
        self.liner10 = nn.Linear(5, classes)

    def forward(self, x):
        x = self.bn(self.conv(x)).mean((2, 3))
        return self.liner10(torch.relu(self.liner1(x)))


@pytest.fixture
def net() -> Net:
    torch.manual_seed(0)
    return Net()


@pytest.fixture
def state_dict(net) -> OrderedDict:
    return net.state_dict()


@pytest.fixture
def zip_pth(tmp_path, state_dict):
    path = tmp_path / "model.pth"
    torch.save(state_dict, path)
    return path


@pytest.fixture
def legacy_pth(tmp_path, state_dict):
    path = tmp_path / "legacy.pth"
    torch.save(state_dict, path, _use_new_zipfile_serialization=False)
    return path


@pytest.fixture
def nested_pth(tmp_path, net):
    """A training checkpoint: state dict under "state_dict", optimizer state beside it."""
    opt = torch.optim.Adam(net.parameters())
    net(torch.randn(2, 3, 5, 5)).sum().backward()
    opt.step()
    path = tmp_path / "train.ckpt"
    torch.save({"epoch": 7, "state_dict": net.state_dict(), "optimizer": opt.state_dict(),
                "best": 0.25, "tag": b"\x00\xffbytes"}, path)
    return path


@pytest.fixture
def safetensors_file(tmp_path, state_dict):
    from safetensors.torch import save_file

    path = tmp_path / "model.safetensors"
    save_file(dict(state_dict), str(path), metadata={"source": "test"})
    return path


@pytest.fixture(scope="session")
def pickled_module(tmp_path_factory):
    """`torch.save(model)` of a class that lives only in a script the tool cannot import; one
    layer frozen and one non-persistent buffer, to check the walk matches model.state_dict()."""
    folder = tmp_path_factory.mktemp("usercode")
    script = folder / "train_secret.py"
    script.write_text(textwrap.dedent("""
        import json, sys, torch
        from torch import nn
        class SecretNet(nn.Module):
            def __init__(self):
                super().__init__()
                self.features = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU())
                self.head = nn.Linear(4, 2)
                self.register_buffer("scratch", torch.zeros(3), persistent=False)
                self.register_buffer("scale", torch.ones(1))
        torch.manual_seed(0)
        m = SecretNet()
        for p in m.features.parameters():
            p.requires_grad = False
        torch.save(m, sys.argv[1])
        torch.save(m, sys.argv[1] + ".legacy", _use_new_zipfile_serialization=False)
        sd = m.state_dict()
        json.dump({"names": list(sd), "frozen": [n for n, p in m.named_parameters() if not p.requires_grad]},
                  open(sys.argv[2], "w"))
        torch.save(sd, sys.argv[3])
    """))
    path, truth, sd_path = folder / "whole.pth", folder / "truth.json", folder / "sd.pth"
    subprocess.run([sys.executable, str(script), str(path), str(truth), str(sd_path)], check=True, cwd=folder)
    return path, json.loads(truth.read_text()), sd_path


@pytest.fixture
def flat(tmp_path):
    """A flat .pth: module.a.weight, module.b.bias (a DataParallel prefix) and c."""
    path = tmp_path / "flat.pth"
    torch.save({"module.a.weight": torch.ones(2), "module.b.bias": torch.zeros(3), "c": torch.arange(3)}, path)
    return path


@pytest.fixture
def gpu_tagged_pth(tmp_path, state_dict, monkeypatch):
    """Storages tagged cuda:0, as a checkpoint saved on a GPU is (this machine has none)."""
    import torch.serialization as ser

    path = tmp_path / "gpu.pth"
    monkeypatch.setattr(ser, "location_tag", lambda storage: "cuda:0")
    torch.save(state_dict, path)
    monkeypatch.undo()
    return path


@pytest.fixture
def tied_pth(tmp_path):
    torch.manual_seed(0)
    emb = nn.Embedding(6, 4)
    sd = OrderedDict([("embed.weight", emb.weight.data), ("mid.weight", torch.randn(4, 4)),
                      ("lm_head.weight", emb.weight.data)])
    path = tmp_path / "tied.pth"
    torch.save(sd, path)
    return path


@pytest.fixture
def odd_tensors_pth(tmp_path):
    """bf16, fp16, int, bool, a 0-d tensor, an empty tensor and a non-contiguous view."""
    torch.manual_seed(0)
    base = torch.arange(12, dtype=torch.float32).reshape(3, 4)
    sd = OrderedDict([
        ("bf", torch.randn(3, 5).to(torch.bfloat16)),
        ("half", torch.randn(4).half()),
        ("ids", torch.arange(5)),
        ("mask", torch.tensor([True, False, True])),
        ("scalar", torch.tensor(3.5)),
        ("empty", torch.zeros(0, 3)),
        ("transposed", base.t()),
    ])
    path = tmp_path / "odd.pth"
    torch.save(sd, path)
    return path


@pytest.fixture
def limited_heap():
    """Cap the heap at 2 GiB above what the process uses: a huge allocation fails fast instead
    of eating the machine (and fails the test)."""
    import resource

    soft, hard = resource.getrlimit(resource.RLIMIT_DATA)
    with open("/proc/self/status") as f:
        used = next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmData:"))
    resource.setrlimit(resource.RLIMIT_DATA, (used + 2 * 2**30, hard))
    yield
    resource.setrlimit(resource.RLIMIT_DATA, (soft, hard))


class Result:
    def __init__(self, code: int, out: str, err: str):
        self.code, self.out, self.err = code, out, err

    def json(self):
        return json.loads(self.out)


@pytest.fixture
def cli(capsys, monkeypatch):
    """Run the real entry point (`ckptsurgery.cli:main`) in-process."""

    def run(*args) -> Result:
        assert_parsed_as_typer_does([*map(str, args)])
        monkeypatch.setattr(sys, "argv", ["ckptsurgery", *map(str, args)])
        code = 0
        try:
            main()
        except SystemExit as e:
            code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
        captured = capsys.readouterr()
        return Result(code, captured.out, captured.err)

    return run


def assert_parsed_as_typer_does(args: list[str]) -> None:
    """Where the command line's own parser (cli/declare.parse) takes `args`, Typer takes them too
    and hands the command the very same values: every command line the suite runs through the
    `cli` fixture is checked (the parser leaves anything else to Typer)."""
    from ckptsurgery.cli import parsed, typer_app

    found = parsed(args)
    if found is None:
        return
    command, given = found
    click = typer_app.click_command(args[0])
    rest = args[1:]
    if command.name != args[0]:  # a group's command: `lora fold ...`
        click, rest = click.get_command(None, rest[0]), rest[1:]
    captured = {}
    original = typer_app.run_command
    typer_app.run_command = lambda command, values: captured.update(command=command, values=values)
    try:
        # the group's context settings (-h), as the command gets them under it: Click keeps a
        # command's help option from the first context it is made in
        with click.make_context(command.name, list(rest), **typer_app.app.info.context_settings) as ctx:
            click.invoke(ctx)
    finally:
        typer_app.run_command = original
    assert captured["command"] is command, (args, captured)
    # repr: a NaN given as a value equals itself there
    assert repr(sorted(captured["values"].items(), key=str)) == repr(sorted(given.items(), key=str)), \
        (args, captured["values"], given)


def assert_one_error_line(result, *fragments, code=1):
    """A refusal: exit `code` (1; diff's trouble and wrong usage: 2), exactly one line
    `ckptsurgery: error: ...` on stderr, not the catch-all."""
    assert result.code == code, (result.code, result.err)
    assert result.err.startswith("ckptsurgery: error: ") and result.err.count("\n") == 1, result.err
    assert "CKPTSURGERY_DEBUG" not in result.err and "Traceback" not in result.err, result.err
    for fragment in fragments:
        assert fragment in result.err, (fragment, result.err)


ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run_ranks(count: int, *command, cwd, env=None, expect_failure: bool = False):
    """`torchrun --nproc-per-node COUNT COMMAND` (gloo on 127.0.0.1, a free port) with this
    checkout first on PYTHONPATH; COMMAND is a script and its arguments, or "-m", a module and
    its arguments. Returns (the finished torchrun, [(stdout, stderr)] of each rank in rank order).
    Tried up to three times: gloo now and then aborts a rank as it shuts down ("terminate called
    without an active exception") after the work is done. `expect_failure`: a run counts when
    torchrun fails and no rank crashed."""
    import glob
    import socket
    import tempfile

    env = dict(os.environ if env is None else env)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [ROOT, env.get("PYTHONPATH")]))
    for _ in range(3):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        with tempfile.TemporaryDirectory() as logs:
            run = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(count),
                                  "--master-addr", "127.0.0.1", "--master-port", str(port), "--log-dir", logs,
                                  "--redirects", "3", *map(str, command)],
                                 capture_output=True, text=True, timeout=300, cwd=cwd, env=env)
            ranks, started = [], True
            for rank in range(count):
                found = glob.glob(os.path.join(logs, "*", "attempt_0", str(rank)))
                started = started and bool(found)
                read = lambda name: open(os.path.join(found[0], name)).read() if found else ""  # noqa: E731
                ranks.append((read("stdout.log"), read("stderr.log")))
        crashed = "terminate called" in run.stderr + "".join(err for _, err in ranks) or "SIGABRT" in run.stderr
        # a failure counts when every rank ran: torchrun failing to start them (its port taken
        # meanwhile, on a busy machine) is tried again
        if (run.returncode != 0 and not crashed and started) if expect_failure else run.returncode == 0:
            break
    assert (run.returncode != 0) == expect_failure, run.stderr[-3000:] + "".join(err for _, err in ranks)[-3000:]
    return run, ranks


def run_two_ranks(script, *args, cwd, env=None) -> subprocess.CompletedProcess:
    """`script ARGS` on two local ranks: see run_ranks."""
    return run_ranks(2, script, *args, cwd=cwd, env=env)[0]


DEEPSPEED_TRAIN = textwrap.dedent("""
    import sys, torch, deepspeed, deepspeed.ops
    from torch import nn
    # the CPU accelerator would compile its shared-memory all-reduce with g++: use plain gloo
    deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False

    class Tiny(nn.Module):
        def __init__(self):
            super().__init__()
            self.emb = nn.Embedding(7, 5)
            self.lin = nn.Linear(5, 3)
            self.ln = nn.LayerNorm(3)
            self.head = nn.Linear(5, 7, bias=False)
            self.head.weight = self.emb.weight  # tied
            self.scale = nn.Parameter(torch.tensor([0.5]))  # (1,): DeepSpeed cannot broadcast a 0-d parameter
            self.odd = nn.Parameter(torch.randn(1, 3, 1))  # 63 trainable elements: nothing divides evenly
            self.frozen = nn.Parameter(torch.randn(2, 3), requires_grad=False)
            self.register_buffer("counter", torch.arange(3, dtype=torch.float32))
            self.register_buffer("scratch", torch.zeros(2), persistent=False)

        def forward(self, ids):
            e = self.emb(ids)
            h = self.ln(self.lin(e)) * self.scale + self.odd.view(3) + self.counter
            return h.pow(2).mean() + self.head(e).float().logsumexp(-1).mean() + self.frozen.sum() * 0

    stage, dtype, out = int(sys.argv[1]), sys.argv[2], sys.argv[3]
    deepspeed.init_distributed(dist_backend="gloo")
    rank = torch.distributed.get_rank()
    torch.manual_seed(1234)
    model = Tiny()
    frozen = model.frozen.data.clone()  # before ZeRO-3 partitions it away
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    config = {"train_micro_batch_size_per_gpu": 1, "zero_optimization": {"stage": stage},
              "zero_allow_untested_optimizer": True, "steps_per_print": 1000}
    if dtype == "bf16":
        config["bf16"] = {"enabled": True}
    if stage == 3:
        config["zero_optimization"]["stage3_param_persistence_threshold"] = 0
    engine, _, _, _ = deepspeed.initialize(model=model, optimizer=opt, config=config)
    torch.manual_seed(100 + rank)
    engine.backward(engine(torch.randint(0, 7, (1, 4))))
    engine.step()
    engine.save_checkpoint(out)
    torch.distributed.barrier()
    if rank == 0:
        from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint
        reference = get_fp32_state_dict_from_zero_checkpoint(out)
        torch.save({k: v.clone() for k, v in reference.items()}, out + "/reference_fp32.pt")
        torch.save(frozen, out + "/frozen.pt")
    torch.distributed.barrier()
""")


@pytest.fixture(scope="session")
def deepspeed_checkpoint(tmp_path_factory):
    """make(stage, dtype) -> a ZeRO checkpoint folder DeepSpeed wrote from two CPU ranks (made once
    per session), holding beside its `latest` and tag folder zero_to_fp32's reference_fp32.pt
    and the frozen parameter as it was (frozen.pt)."""
    made: dict = {}

    def make(stage: int, dtype: str = "fp32"):
        if (stage, dtype) not in made:
            folder = tmp_path_factory.mktemp(f"zero{stage}{dtype}")
            script = folder / "train.py"
            script.write_text(DEEPSPEED_TRAIN)
            out = folder / "ckpt"
            run_two_ranks(script, stage, dtype, out, cwd=folder,
                          env={**os.environ, "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1"})
            made[(stage, dtype)] = out
        return made[(stage, dtype)]

    return make


def rewrite_dcp_metadata(folder, change) -> None:
    """Edit a real DCP .metadata in place (a trusted test file: plain pickle is fine here)."""
    import pickle

    path = folder / ".metadata"
    meta = pickle.loads(path.read_bytes())
    change(meta)
    path.write_bytes(pickle.dumps(meta, protocol=4))


def dcp_storage(meta, fqn):
    """The _StorageInfo of `fqn`'s (first) chunk or value."""
    return next(v for k, v in meta.storage_data.items() if k.fqn == fqn)


def load_any(path):
    """The reference reader: what torch or safetensors themselves load."""
    path = str(path)
    if path.endswith(".safetensors"):
        from safetensors.torch import load_file

        return load_file(path)
    return torch.load(path, map_location="cpu", weights_only=True)


def load_folder(folder) -> dict:
    """Every tensor of a folder's .safetensors files (a model folder, sharded or not), by name."""
    from safetensors.torch import load_file

    tensors = {}
    for path in sorted(Path(folder).glob("*.safetensors")):
        tensors.update(load_file(path))
    return tensors


def run_mergekit(text: str, out) -> dict:
    """mergekit 0.1.5's run_merge (what mergekit-yaml runs) of a recipe's text into `out`, in the
    current folder (a recipe's model paths are relative to it); the tensors it wrote."""
    import yaml
    from mergekit.config import MergeConfiguration
    from mergekit.io.tasks import LoaderCache
    from mergekit.merge import MergeOptions, run_merge

    # mergekit keeps a loader per model path as the recipe writes it, for the process: a relative
    # name in another test's folder would read that test's tensors
    LoaderCache().loaders.clear()
    run_merge(MergeConfiguration.model_validate(yaml.safe_load(text)), str(out),
              options=MergeOptions(lazy_unpickle=True, copy_tokenizer=False, write_model_card=False,
                                   clone_tensors=True))
    return load_folder(out)


def torch_loads(path) -> tuple[bool, str]:
    """torch.load(weights_only=True) in a fresh interpreter, then repr() of what it gave (a
    quantized tensor without a quantizer loads, and fails on first use): (ok, error line)."""
    code = ("import sys, torch\n"
            "try:\n    obj = torch.load(sys.argv[1], weights_only=True); repr(obj); print('OK')\n"
            "except Exception as e:\n    print('ERR', type(e).__name__, str(e).splitlines()[0][:200] if str(e) else '')")
    out = subprocess.run([sys.executable, "-c", code, str(path)], capture_output=True, text=True, timeout=120).stdout
    return out.startswith("OK"), out.strip()


def assert_same_tensors(a: dict, b: dict, ordered: bool = True) -> None:
    assert (list(a) == list(b)) if ordered else (sorted(a) == sorted(b))
    for name in a:
        assert a[name].dtype == b[name].dtype, name
        assert a[name].shape == b[name].shape, name
        assert torch.equal(a[name], b[name]), name
