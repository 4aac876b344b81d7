"""Every command fetches each byte range of a remote input it needs once (issue 21 §3): what
reads a tensor twice — diff (its hash, then its values), inspect --stats --hash (one pass each),
a DoRA fold (its norms, then its rows), extract-lora — keeps it between the reads (ops/spools.py:
in memory when small, else a temporary file with no name), and leaves none behind. Reports and
outputs are the local run's. Served by tests/remote_server.py on 127.0.0.1."""

from __future__ import annotations

import json
import os

import pytest
import torch
from safetensors.torch import save_file

from conftest import assert_one_error_line
from remote_server import RangeServer, files_bytes, hub_models, no_debris, recorded_spools, spools_in_tmp, use_hub

import ckptsurgery.io.http as http
import ckptsurgery.ops.spools as spooling


def _model(seed: int, same_as: int | None = None) -> dict[str, torch.Tensor]:
    """Tensors past the remote reader's 256 KiB read-ahead (else a window fetched for one serves
    the next, and nothing is fetched twice to see), and small ones. `same_as`: the large
    `layers.0.weight` is that seed's (equal bytes on both sides of a diff)."""
    g = torch.Generator().manual_seed(seed)
    tensors = {"bias": torch.randn(96, generator=g),
               "embed.weight": torch.randn(640, 128, generator=g),  # 320 KiB: spooled (IN_MEMORY is 64 KiB here)
               "layers.0.weight": torch.randn(384, 256, generator=g),  # 384 KiB
               "layers.1.weight": torch.randn(512, 384, generator=g).to(torch.bfloat16),  # 384 KiB
               "norm.weight": torch.randn(64, generator=g).to(torch.bfloat16)}  # kept in memory
    if same_as is not None:
        tensors["layers.0.weight"] = _model(same_as)["layers.0.weight"]
    return tensors


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    root = tmp_path_factory.mktemp("served")
    hub_models(root, {"a": _model(0), "b": _model(1, same_as=0)})
    with RangeServer(str(root)) as server:
        yield server, root


@pytest.fixture
def server(served, monkeypatch, tmp_path):
    server, root = served
    server.reset()
    use_hub(monkeypatch, server, root)
    spools_in_tmp(monkeypatch, tmp_path)
    return server


@pytest.fixture
def spools(monkeypatch):
    return recorded_spools(monkeypatch)


def _failing_after_the_first_spool(server, spools, monkeypatch) -> None:
    """The server answers 503 to everything once a first temporary file is made (no retries)."""
    make = spooling._temporary_file

    def then_fail(folder):
        if spools:
            server.behaviour.fail_times = 100
        return make(folder)

    monkeypatch.setattr(spooling, "_temporary_file", then_fail)
    monkeypatch.setattr(http, "RETRIES", 0)




def _report(result, *drop) -> dict:
    report = json.loads(result.out)
    for key in ("fetched", *drop):
        report.pop(key, None)
    return report


# ---- diff -------------------------------------------------------------------------------------

@pytest.mark.parametrize("options", [[], ["--atol", "1e-3"], ["--rtol", "1e-2"]])
def test_diff_of_remote_inputs_fetches_each_tensor_once(cli, server, served, spools, tmp_path, options):
    _, root = served
    local = cli("diff", root / "a.safetensors", root / "b.safetensors", *options, "--json")
    assert local.code == 1, local.err
    assert not spools  # a local input is read twice where it lies
    result = cli("diff", f"{server.url}/a.safetensors", "hf://org/b", *options, "--json")
    assert result.code == 1, result.err
    assert _report(result, "a", "b") == _report(local, "a", "b")
    fetched = json.loads(result.out)["fetched"]["bytes"]
    assert fetched <= files_bytes(root, "a.safetensors", "org/b/model.safetensors"), fetched
    assert spools and {folder for folder, _ in spools} == {str(tmp_path / "tmp")}  # no output: tempfile's folder
    assert all(file.closed for _, file in spools)
    no_debris(tmp_path / "tmp")


def test_diff_failing_midway_is_one_line_and_leaves_no_spool(cli, server, served, spools, tmp_path, monkeypatch):
    make = spooling._temporary_file

    def then_fail(folder):  # the server fails once the first tensor is held in a spool
        if spools:
            server.behaviour.fail_times = 100
        return make(folder)

    monkeypatch.setattr(spooling, "_temporary_file", then_fail)
    monkeypatch.setattr(http, "RETRIES", 0)  # the 503 at once, not after three more tries
    result = cli("diff", f"{server.url}/a.safetensors", "hf://org/b")
    assert_one_error_line(result, "503", code=2)
    assert spools and all(file.closed for _, file in spools)
    no_debris(tmp_path / "tmp")


# ---- inspect --stats --hash -------------------------------------------------------------------

def test_inspect_stats_and_hash_of_a_remote_file_fetch_it_once(cli, server, served, spools, tmp_path):
    _, root = served
    local = cli("inspect", root / "a.safetensors", "--stats", "--hash", "--json")
    assert local.code == 0, local.err
    assert not spools
    result = cli("inspect", "hf://org/a", "--stats", "--hash", "--json")
    assert result.code == 0, result.err
    assert _report(result, "path", "input") == _report(local, "path", "input")
    fetched = json.loads(result.out)["fetched"]["bytes"]
    assert fetched <= files_bytes(root, "org/a/model.safetensors"), fetched
    assert spools and {folder for folder, _ in spools} == {str(tmp_path / "tmp")}
    assert all(file.closed for _, file in spools)
    no_debris(tmp_path / "tmp")


def test_inspect_failing_midway_is_one_line_and_leaves_no_spool(cli, server, served, spools, tmp_path, monkeypatch):
    _failing_after_the_first_spool(server, spools, monkeypatch)
    result = cli("inspect", f"{server.url}/a.safetensors", "--stats", "--hash")
    assert_one_error_line(result, "503")
    assert spools and all(file.closed for _, file in spools)
    no_debris(tmp_path / "tmp")


# ---- merge --lora with DoRA (a norm per column: every row measured before the rows are made) -------

def _dora(folder, columns: bool = True):
    """A PEFT DoRA adapter on layers.0 and layers.1: taken as fan_in_fan_out weights ([in, out], as
    transformers' Conv1D; `columns`), a magnitude per column, measured over every row first; else
    as nn.Linear's, a magnitude per row (its norm made with each chunk, from the base's rows)."""
    folder.mkdir()
    (folder / "adapter_config.json").write_text(json.dumps(
        {"peft_type": "LORA", "r": 2, "lora_alpha": 2, "use_dora": True, "fan_in_fan_out": columns,
         "target_modules": ["layers.0", "layers.1"]}))
    g = torch.Generator().manual_seed(7)
    prefix = "base_model.model."
    tensors = {}
    for name, (rows, cols) in (("layers.0", (384, 256)), ("layers.1", (512, 384))):
        if not columns:
            rows, cols = cols, rows
        tensors[f"{prefix}{name}.lora_A.weight"] = torch.randn(2, rows, generator=g) * 0.1
        tensors[f"{prefix}{name}.lora_B.weight"] = torch.randn(cols, 2, generator=g) * 0.1
        tensors[f"{prefix}{name}.lora_magnitude_vector"] = 1 + torch.rand(cols, generator=g)
    save_file(tensors, str(folder / "adapter_model.safetensors"))
    return folder


@pytest.mark.parametrize("output, columns", [("model.safetensors", True), ("model.pth", True),
                                             ("model.safetensors", False)])
def test_a_dora_fold_into_a_remote_base_fetches_each_weight_once(cli, server, served, spools, tmp_path, output,
                                                                 columns):
    _, root = served
    dora = _dora(tmp_path / "dora", columns)
    assert cli("merge", root / "a.safetensors", "--lora", dora, "-o", tmp_path / f"local-{output}").code == 0
    assert not spools
    (tmp_path / "out").mkdir()
    result = cli("merge", "hf://org/a", "--lora", dora, "-o", tmp_path / "out" / output, "--json")
    assert result.code == 0, result.err
    assert (tmp_path / "out" / output).read_bytes() == (tmp_path / f"local-{output}").read_bytes()
    fetched = json.loads(result.out)["fetched"]["bytes"]
    assert fetched <= files_bytes(root, "org/a/model.safetensors"), fetched
    assert len(spools) == 2 and all(file.closed for _, file in spools)  # the two weights DoRA rescales
    assert {folder for folder, _ in spools} == {str(tmp_path / "out")}  # beside the output, as a merge's
    no_debris(tmp_path / "out", tmp_path / "tmp")


def test_a_dora_fold_failing_midway_is_one_line_and_leaves_nothing(cli, server, served, spools, tmp_path,
                                                                     monkeypatch):
    _failing_after_the_first_spool(server, spools, monkeypatch)
    (tmp_path / "out").mkdir()
    result = cli("merge", "hf://org/a", "--lora", _dora(tmp_path / "dora"), "-o", tmp_path / "out" / "m.safetensors")
    assert_one_error_line(result, "503")
    assert spools and all(file.closed for _, file in spools)
    assert os.listdir(tmp_path / "out") == []
    no_debris(tmp_path / "out", tmp_path / "tmp")


def test_a_recipe_of_a_remote_model_with_dora_fetches_each_weight_once(cli, server, served, spools, tmp_path,
                                                                       monkeypatch):
    _, root = served
    dora = _dora(tmp_path / "dora")
    recipe = ("models:\n  - model: {p}a+" + str(dora) + "\n  - model: {p}b\nmerge_method: linear\n"
              "parameters:\n  weight: 0.5\ndtype: float32\n")
    for i, name in enumerate(("a", "b")):
        (tmp_path / name).mkdir()
        save_file(_model(i, same_as=0 if i else None), str(tmp_path / name / "model.safetensors"),
                  metadata={"format": "pt"})
    monkeypatch.chdir(tmp_path)
    (tmp_path / "local.yml").write_text(recipe.format(p=""))
    assert cli("merge", "--config", tmp_path / "local.yml", "-o", tmp_path / "local.safetensors").code == 0
    assert not spools
    (tmp_path / "remote.yml").write_text(recipe.format(p="hf://org/"))
    result = cli("merge", "--config", tmp_path / "remote.yml", "-o", tmp_path / "out" / "remote.safetensors",
                 "--json")
    assert result.code == 0, result.err
    assert (tmp_path / "out" / "remote.safetensors").read_bytes() == (tmp_path / "local.safetensors").read_bytes()
    weights = [f for f in json.loads(result.out)["fetched"]["files"] if f["url"].endswith(".safetensors")]
    fetched = sum(f["bytes"] for f in weights)
    assert fetched <= files_bytes(root, "org/a/model.safetensors", "org/b/model.safetensors"), fetched
    assert len(spools) == 2 and {folder for folder, _ in spools} == {str(tmp_path / "out")}
    assert all(file.closed for _, file in spools)
    no_debris(tmp_path / "out", tmp_path / "tmp")


# ---- extract-lora ---------------------------------------------------------------------------

@pytest.mark.parametrize("options", [["--rank", "4"], ["--rank", "4", "--embeddings"]])
def test_extract_lora_from_remote_inputs_fetches_each_tensor_once(cli, server, served, spools, tmp_path, options):
    _, root = served
    local = cli("extract-lora", root / "a.safetensors", root / "b.safetensors", *options, "-o", tmp_path / "local",
                "--json")
    assert local.code == 0, local.err
    assert not spools
    (tmp_path / "out").mkdir()
    result = cli("extract-lora", "hf://org/a", f"{server.url}/b.safetensors", *options, "-o",
                 tmp_path / "out" / "lora", "--json")
    assert result.code == 0, result.err
    for name in ("adapter_config.json", "adapter_model.safetensors"):
        assert (tmp_path / "out" / "lora" / name).read_bytes() == (tmp_path / "local" / name).read_bytes()
    # extract-lora's report says nothing of it: counted where it is served (the 206 answers' bodies)
    fetched = sum(nbytes for _, _, status, nbytes in server.served.requests if status == 206)
    assert fetched <= files_bytes(root, "org/a/model.safetensors", "b.safetensors"), fetched
    # one file beside the output holds every weight kept from its comparison to its SVD
    assert len(spools) == 1 and {folder for folder, _ in spools} == {str(tmp_path / "out")}
    assert all(file.closed for _, file in spools)
    no_debris(tmp_path / "out" / "lora", tmp_path / "tmp")
    assert os.listdir(tmp_path / "out") == ["lora"]


def test_extract_lora_keeps_only_the_weights_it_can_extract(cli, server, served, tmp_path, monkeypatch):
    """A weight no LoRA can adapt — 1-D, or an embedding without --embeddings — is compared once
    and never read again: it is not streamed into the temporary file (which holds the planned
    weights, as documented), only what may be planned is."""
    spooled = []
    spool = spooling.Spools.spool

    def recorded(self, source, first, nbytes):
        spooled.append(nbytes)
        return spool(self, source, first, nbytes)

    monkeypatch.setattr(spooling.Spools, "spool", recorded)
    (tmp_path / "out").mkdir()
    result = cli("extract-lora", "hf://org/a", f"{server.url}/b.safetensors", "--rank", "4", "-o",
                 tmp_path / "out" / "lora", "--json")
    assert result.code == 0, result.err
    assert [n["name"] for n in json.loads(result.out)["not_extracted"]] == ["bias", "embed.weight", "norm.weight"]
    assert sorted(spooled) == [384 * 256 * 4] * 2 + [512 * 384 * 2] * 2  # layers.0 (the same: released) and layers.1 of each side


def test_extract_lora_dry_run_of_remote_inputs_holds_nothing(cli, server, served, spools, tmp_path):
    """A dry run reads each weight once, to compare it, and never again (no SVD is made): nothing
    is kept for a second read — no temporary file holding the planned weights of both sides."""
    _, root = served
    local = cli("extract-lora", root / "a.safetensors", root / "b.safetensors", "--rank", "4", "--dry-run",
                "-o", tmp_path / "local", "--json")
    assert local.code == 0, local.err
    (tmp_path / "out").mkdir()
    result = cli("extract-lora", "hf://org/a", f"{server.url}/b.safetensors", "--rank", "4", "--dry-run",
                 "-o", tmp_path / "out" / "lora", "--json")
    assert result.code == 0, result.err
    assert _report(result, "output", "files", "base", "tuned") == _report(local, "output", "files", "base", "tuned")
    assert not spools
    fetched = sum(nbytes for _, _, status, nbytes in server.served.requests if status == 206)
    assert fetched <= files_bytes(root, "org/a/model.safetensors", "b.safetensors"), fetched
    assert os.listdir(tmp_path / "out") == []


def test_extract_lora_failing_midway_is_one_line_and_leaves_nothing(cli, server, served, spools, tmp_path,
                                                                      monkeypatch):
    make = spooling._temporary_file

    def then_fail(folder):  # one file holds every tensor kept: the server fails as it is made
        server.behaviour.fail_times = 100
        return make(folder)

    monkeypatch.setattr(spooling, "_temporary_file", then_fail)
    monkeypatch.setattr(http, "RETRIES", 0)
    (tmp_path / "out").mkdir()
    result = cli("extract-lora", "hf://org/a", f"{server.url}/b.safetensors", "--rank", "4", "--embeddings",
                 "-o", tmp_path / "out" / "lora")
    assert_one_error_line(result, "503")
    assert spools and all(file.closed for _, file in spools)
    assert os.listdir(tmp_path / "out") == []
    no_debris(tmp_path / "out", tmp_path / "tmp")


def test_a_shared_spool_file_uses_the_space_released_last_again(tmp_path):
    """extract-lora holds every weight it compares, and releases at once those it does not
    extract: their space at the file's end is used again, so the file holds the planned ones."""
    from ckptsurgery.io.model import RangeSource

    class Served(RangeSource):
        path, data = "served", os.urandom(300_000)
        size = len(data)

        def view(self, offset, nbytes):
            return memoryview(self.data)[offset:offset + nbytes]

        def stream(self, offset, nbytes):
            yield self.view(offset, nbytes)

    source = Served()
    with spooling.Spools(str(tmp_path), shared=True) as spools:
        kept = spools.spool(source, 0, 100_000)
        dropped = spools.spool(source, 100_000, 100_000)
        end = spools._end
        spools.release(dropped)
        again = spools.spool(source, 200_000, 100_000)
        assert spools._end == end
        assert bytes(kept.view(0, 100_000)) == source.data[:100_000]
        assert bytes(again.view(0, 100_000)) == source.data[200_000:]
    assert kept.map.closed and again.map.closed
    no_debris(tmp_path)


def test_a_tensor_kept_at_its_first_read_is_released_only_once_viewed(tmp_path, monkeypatch):
    """Spools.later: a read that has the spool in hand but has not viewed it yet, when another
    thread releases the tensor (its last chunk made: a recipe's folded tensor read for two output
    keys, their shards written at once), still views the tensor's bytes — the release waits for the
    view, and the mapping stays until the view goes — not a closed mapping."""
    import threading

    from ckptsurgery.dtypes import by_name
    from ckptsurgery.io.model import RangeSource, Storage, TensorRef

    class Served(RangeSource):
        path, data = "served", os.urandom(200_000)
        size = len(data)

        def view(self, offset, nbytes):
            return memoryview(self.data)[offset:offset + nbytes]

        def stream(self, offset, nbytes):
            yield self.view(offset, nbytes)

    monkeypatch.setattr(spooling, "IN_MEMORY", 64 << 10)
    source = Served()
    t = TensorRef(Storage(source, 0, source.size), 0, (50_000,), (1,), by_name("float32"))
    viewing, go, read = threading.Event(), threading.Event(), []
    view = spooling.Spool.view

    def slow_view(self, offset, nbytes):  # the reading thread, between the spool in hand and its view
        if threading.current_thread().name == "reader":
            viewing.set()
            go.wait(5)
        return view(self, offset, nbytes)

    with spooling.Spools(str(tmp_path)) as spools:
        spooling.Spool.view = slow_view
        try:
            held = spools.later(t)
            reader = threading.Thread(target=lambda: read.append(bytes(held.storage.source.view(0, 1000))),
                                      name="reader")
            reader.start()
            assert viewing.wait(5)
            releaser = threading.Thread(target=spools.release, args=(held,))
            releaser.start()
            releaser.join(0.3)  # a release that does not wait closes the mapping here
            go.set()
            reader.join(5)
            releaser.join(5)
        finally:
            spooling.Spool.view = view
    assert read == [source.data[:1000]]
    no_debris(tmp_path)


@pytest.mark.parametrize("command", ["diff", "inspect", "dora", "extract"])
def test_an_interrupted_command_leaves_no_spool(server, served, spools, tmp_path, monkeypatch, command):
    """Ctrl-C as the second tensor is streamed into a temporary file: every one made is closed,
    nothing is left in the output's folder or tempfile's."""
    from ckptsurgery import ops
    from ckptsurgery.ops import WriteOptions

    write = spooling._write_into
    calls = []

    def interrupted(*args):
        calls.append(1)
        if len(calls) > 1:
            raise KeyboardInterrupt
        return write(*args)

    monkeypatch.setattr(spooling, "_write_into", interrupted)
    a, b = "hf://org/a", f"{server.url}/b.safetensors"
    out = tmp_path / "out"
    out.mkdir()
    run = {"diff": lambda: ops.diff_checkpoints(a, b),
           "inspect": lambda: ops.inspect_checkpoint(a, stats=True, hash=True),
           "dora": lambda: ops.fold_adapters(a, [str(_dora(tmp_path / "dora"))],
                                             WriteOptions(str(out / "m.safetensors"))),
           "extract": lambda: ops.extract_lora(a, b, WriteOptions(str(out / "lora")), rank=4, embeddings=True)}
    with pytest.raises(KeyboardInterrupt):
        run[command]()
    assert spools and all(file.closed for _, file in spools)
    assert os.listdir(out) == []
    no_debris(out, tmp_path / "tmp")
