"""Remote inputs (io/remote.py): `https://`/`http://` URLs of safetensors files and indexes, and
`hf://ORG/REPO[@REV][/FILE]`, read by range requests from a local server on 127.0.0.1 that
counts what it serves (tests/remote_server.py) — and the same command on the local copy gives
the same bytes. Misbehaving servers: 404, 401, no Range support, short answers, a file that
changes mid-run, a refused or silent connection, redirects."""

from __future__ import annotations

import json
import os
import socket
import tempfile
import threading

import pytest
import torch
from safetensors.torch import save_file

from conftest import assert_one_error_line
from remote_server import RangeServer, use_hub

from ckptsurgery.io.remote import HEAD_BYTES, parse_hf, remote_inputs
from ckptsurgery import open_checkpoint

LAYERS = 4


def _model(seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    sd = {"embed.weight": torch.randn(96, 32, generator=g)}
    for i in range(LAYERS):
        sd[f"layers.{i}.attn.weight"] = torch.randn(32, 32, generator=g)
        sd[f"layers.{i}.mlp.weight"] = torch.randn(64, 32, generator=g).to(torch.bfloat16)
        sd[f"layers.{i}.norm.weight"] = torch.ones(32)
    sd["head.weight"] = torch.randn(10, 32, generator=g)
    return sd


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    """A folder of a file, a second model, a sharded model (index + 2 shards) and an hf repo, served."""
    root = tmp_path_factory.mktemp("served")
    a, b = _model(0), _model(1)
    save_file(a, str(root / "a.safetensors"), metadata={"format": "pt"})
    save_file(b, str(root / "b.safetensors"), metadata={"format": "pt"})
    names = list(a)
    half = len(names) // 2
    shards = {"model-00001-of-00002.safetensors": names[:half], "model-00002-of-00002.safetensors": names[half:]}
    repo = root / "org" / "repo"
    repo.mkdir(parents=True)
    for folder in (root / "sharded", repo):
        folder.mkdir(exist_ok=True)
        for shard, keys in shards.items():
            save_file({k: a[k] for k in keys}, str(folder / shard), metadata={"format": "pt"})
        index = {"metadata": {"total_size": 0}, "weight_map": {k: s for s, keys in shards.items() for k in keys}}
        (folder / "model.safetensors.index.json").write_text(json.dumps(index))
    single = root / "org" / "single"
    single.mkdir(parents=True)
    save_file(b, str(single / "model.safetensors"), metadata={"format": "pt"})
    with RangeServer(str(root)) as server:
        yield server, root


@pytest.fixture
def server(served, monkeypatch):
    server, root = served
    server.reset()
    use_hub(monkeypatch, server, root)
    return server


def _header_bytes(path) -> int:
    with open(path, "rb") as f:
        return 8 + int.from_bytes(f.read(8), "little")


def _inspected(cli, path) -> dict:
    result = cli("inspect", path, "--json")
    assert result.code == 0, result.err
    doc = json.loads(result.out)
    doc.pop("path")
    return doc


# ---- reading headers only --------------------------------------------------------------------

def test_inspect_of_a_url_lists_what_the_local_file_does_from_its_header_alone(cli, server, served):
    _, root = served
    remote = _inspected(cli, f"{server.url}/a.safetensors")
    fetched = remote.pop("fetched")
    assert remote == _inspected(cli, root / "a.safetensors")
    assert server.served.bytes == fetched["bytes"] == max(HEAD_BYTES, _header_bytes(root / "a.safetensors"))
    assert fetched["files"] == [{"url": f"{server.url}/a.safetensors", "size": os.path.getsize(root / "a.safetensors"),
                                 "bytes": fetched["bytes"], "requests": fetched["requests"]}]
    assert all(r[1] and r[1].startswith("bytes=") for r in server.served.requests)


def test_inspect_of_a_remote_index_fetches_the_index_and_each_shards_header_only(cli, server, served):
    _, root = served
    remote = _inspected(cli, f"{server.url}/sharded/model.safetensors.index.json")
    remote.pop("fetched")
    assert remote == _inspected(cli, root / "sharded" / "model.safetensors.index.json")
    shards = sorted(p for p in (root / "sharded").iterdir() if p.suffix == ".safetensors")
    headers = sum(max(HEAD_BYTES, _header_bytes(p)) for p in shards)
    assert server.served.bytes == headers + os.path.getsize(root / "sharded" / "model.safetensors.index.json")


def test_hf_repo_without_a_file_finds_its_index_and_pins_the_commit(cli, server, served):
    _, root = served
    result = cli("inspect", "hf://org/repo", "--json")
    assert result.code == 0, result.err
    doc = json.loads(result.out)
    assert doc["format"] == "sharded-safetensors" and len(doc["tensors"]) == 2 + 3 * LAYERS
    commit = server.behaviour.hub_commit
    hub = [path for path, *_ in server.served.requests if "/resolve/" in path]
    assert hub[0] == "/org/repo/resolve/main/model.safetensors.index.json"
    assert all(f"/resolve/{commit}/" in path for path in hub[1:]), hub  # every later request names the commit


def test_hf_repo_of_one_file_and_a_named_file_and_a_revision(cli, server, served):
    _, root = served
    single = _inspected(cli, "hf://org/single")
    single.pop("fetched")
    assert single == _inspected(cli, root / "org" / "single" / "model.safetensors")
    commit = server.behaviour.hub_commit
    assert cli("inspect", f"hf://org/repo@{commit}/model-00001-of-00002.safetensors").code == 0
    assert_one_error_line(cli("inspect", "hf://org/repo@v9"), "none of model.safetensors.index.json", "v9")


def test_hf_paths_are_parsed_as_huggingface_hub_resolves_them(monkeypatch):
    monkeypatch.setenv("HF_ENDPOINT", "https://hub.example/")
    repo, filename = parse_hf("hf://org/name@my-branch/unet/diffusion_pytorch_model.safetensors")
    assert (repo.repo, repo.revision, filename) == ("org/name", "my-branch", "unet/diffusion_pytorch_model.safetensors")
    assert repo.url(filename) == "https://hub.example/org/name/resolve/my-branch/unet/diffusion_pytorch_model.safetensors"
    assert parse_hf("hf://org/name")[0].revision == "main"
    for bad in ("hf://org", "hf://org/", "hf://org/name@", "hf://org/name/../x.safetensors"):
        with pytest.raises(Exception) as e:
            parse_hf(bad)
        assert "hf://" in str(e.value)


# ---- writing from remote inputs: the same bytes as from the local copy ------------------------

@pytest.mark.parametrize("extension", [".safetensors", ".pth"])
def test_convert_of_a_url_writes_the_bytes_the_local_copy_gives(cli, server, served, tmp_path, extension):
    _, root = served
    assert cli("convert", root / "a.safetensors", "-o", tmp_path / f"local{extension}").code == 0
    result = cli("convert", f"{server.url}/a.safetensors", "-o", tmp_path / f"remote{extension}", "--json")
    assert result.code == 0, result.err
    assert (tmp_path / f"remote{extension}").read_bytes() == (tmp_path / f"local{extension}").read_bytes()
    fetched = json.loads(result.out)["fetched"]
    assert fetched["bytes"] == os.path.getsize(root / "a.safetensors")
    # the first bytes, the rest of the header, then the 14 tensors: one range (.safetensors), or
    # read-ahead windows of the small tensors a .pth copies one at a time
    assert fetched["requests"] == 3


def test_filter_of_one_layer_fetches_that_layer_and_the_headers_only(cli, server, served, tmp_path):
    _, root = served
    index = "sharded/model.safetensors.index.json"
    assert cli("filter", root / index, "--keep", "layers.1", "-o", tmp_path / "local.safetensors").code == 0
    result = cli("filter", f"{server.url}/{index}", "--keep", "layers.1", "-o", tmp_path / "remote.safetensors")
    assert result.code == 0, result.err
    assert (tmp_path / "remote.safetensors").read_bytes() == (tmp_path / "local.safetensors").read_bytes()
    layer = sum(t.numel() * t.element_size() for k, t in _model(0).items() if k.startswith("layers.1."))
    shards = [p for p in (root / "sharded").iterdir() if p.suffix == ".safetensors"]
    headers = sum(max(HEAD_BYTES, _header_bytes(p)) for p in shards) + os.path.getsize(root / index)
    assert server.served.bytes <= headers + layer * 1.05
    assert "fetched" in result.err


def test_merge_and_diff_take_remote_inputs(cli, server, served, tmp_path):
    _, root = served
    local = [root / "a.safetensors", root / "b.safetensors"]
    remote = [f"{server.url}/a.safetensors", "hf://org/single"]
    assert cli("merge", *local, "--average", "-o", tmp_path / "local.safetensors").code == 0
    assert cli("merge", *remote, "--average", "-o", tmp_path / "remote.safetensors").code == 0
    assert (tmp_path / "remote.safetensors").read_bytes() == (tmp_path / "local.safetensors").read_bytes()
    assert cli("diff", remote[0], local[0]).code == 0
    assert cli("diff", remote[1], local[0], "-q").code == 1


def test_the_library_counts_what_a_block_fetches(server):
    with remote_inputs() as ledger:
        with open_checkpoint(f"{server.url}/a.safetensors") as ckpt:
            data = bytes(ckpt.tensors["head.weight"].data())
    assert torch.equal(torch.frombuffer(bytearray(data), dtype=torch.float32).view(10, 32), _model(0)["head.weight"])
    assert ledger.bytes == server.served.bytes and ledger.requests == 3  # the first 512 bytes, the rest of the header, the tensor


# ---- servers that misbehave: one line, exit 1, nothing written -------------------------------

def _refused(cli, tmp_path, source, *fragments, extra=()):
    out = tmp_path / "out.safetensors"
    result = cli("convert", source, "-o", out, *extra)
    assert_one_error_line(result, *fragments)
    assert not out.exists() and os.listdir(tmp_path) == []
    return result


def test_missing_file_is_one_line(cli, server, tmp_path):
    _refused(cli, tmp_path, f"{server.url}/nope.safetensors", "nope.safetensors: not found (404)")


def test_a_private_repo_says_how_to_log_in_and_the_token_goes_to_the_hub_only(cli, server, served, tmp_path, monkeypatch):
    server.behaviour.token = "s3cret"
    _refused(cli, tmp_path, "hf://org/single", "access denied (401)", "hf auth login", "HF_TOKEN")
    server.reset()
    server.behaviour.token = "s3cret"
    server.behaviour.redirect_host = f"localhost:{server.port}"  # the CDN: another host
    monkeypatch.setenv("HF_TOKEN", "s3cret")
    assert cli("convert", "hf://org/single", "-o", tmp_path / "out.safetensors").code == 0
    sent = server.served.authorizations
    assert all(auth == "Bearer s3cret" for path, auth in sent if "/resolve/" in path)
    assert all(auth is None for path, auth in sent if path.startswith("/cdn/")) and any(
        path.startswith("/cdn/") for path, _ in sent)


def test_a_server_that_ignores_range_is_refused_unless_a_full_download_is_allowed(cli, server, served, tmp_path,
                                                                                  tmp_path_factory, monkeypatch):
    _, root = served
    downloads = tmp_path_factory.mktemp("downloads")
    monkeypatch.setattr(tempfile, "tempdir", str(downloads))
    server.behaviour.ignore_range = True
    _refused(cli, tmp_path, f"{server.url}/a.safetensors", "ignores range requests", "--allow-full-download")
    out, local = tmp_path / "out.safetensors", tmp_path_factory.mktemp("local") / "out.safetensors"
    assert cli("convert", root / "a.safetensors", "-o", local).code == 0
    result = cli("convert", f"{server.url}/a.safetensors", "-o", out, "--allow-full-download", "--json")
    assert result.code == 0, result.err
    assert out.read_bytes() == local.read_bytes()
    assert json.loads(result.out)["fetched"]["full_downloads"] == [f"{server.url}/a.safetensors"]
    assert os.listdir(downloads) == []  # the temporary copy is gone


def test_allow_full_download_without_a_remote_input_is_wrong_usage(cli, served, tmp_path):
    _, root = served
    result = cli("convert", root / "a.safetensors", "-o", tmp_path / "o.safetensors", "--allow-full-download")
    assert_one_error_line(result, "--allow-full-download applies to remote inputs", code=2)


def test_short_answers_are_retried_then_refused(cli, server, tmp_path):
    server.behaviour.truncate = True
    _refused(cli, tmp_path, f"{server.url}/a.safetensors", "closed before the answer was complete", "4 tries")


def test_a_failing_server_is_retried(cli, server, tmp_path):
    server.behaviour.fail_times = 2
    assert cli("inspect", f"{server.url}/a.safetensors").code == 0
    assert [r[2] for r in server.served.requests][:3] == [503, 503, 206]


def test_a_file_that_changes_mid_run_is_refused(cli, server, tmp_path):
    server.behaviour.change_after = 1  # the first answer's ETag, then another
    _refused(cli, tmp_path, f"{server.url}/a.safetensors", "changed while being read")


def test_a_refused_connection_is_one_line_after_the_retries(cli, tmp_path):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # closed again: nothing listens there
    _refused(cli, tmp_path, f"http://127.0.0.1:{port}/a.safetensors", "connection refused", "after 4 tries")


def test_a_silent_server_times_out(cli, tmp_path, monkeypatch):
    monkeypatch.setenv("CKPTSURGERY_HTTP_TIMEOUT", "0.2")
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(8)
    held = []
    stop = threading.Event()

    def accept():
        listener.settimeout(0.1)
        while not stop.is_set():
            try:
                held.append(listener.accept()[0])  # accepted, never answered
            except OSError:
                pass

    thread = threading.Thread(target=accept, daemon=True)
    thread.start()
    try:
        _refused(cli, tmp_path, f"http://127.0.0.1:{listener.getsockname()[1]}/a.safetensors", "timed out")
    finally:
        stop.set()
        thread.join()
        listener.close()
        for conn in held:
            conn.close()


def test_hostile_indexes_name_no_file_outside_their_folder(cli, server, served, tmp_path):
    _, root = served
    (root / "evil").mkdir(exist_ok=True)
    for name, shard in (("up.json", "../a.safetensors"), ("self.json", "self.json"), ("abs.json", "/etc/passwd")):
        (root / "evil" / name).write_text(json.dumps({"weight_map": {"x": shard}}))
    _refused(cli, tmp_path, f"{server.url}/evil/up.json", "not a plain file name")
    _refused(cli, tmp_path, f"{server.url}/evil/abs.json", "not a plain file name")
    _refused(cli, tmp_path, f"{server.url}/evil/self.json", "is the index itself")


def test_remote_files_that_are_not_safetensors_are_refused_by_name(cli, server, served, tmp_path):
    _, root = served
    torch.save({"w": torch.ones(2)}, root / "w.pth")
    _refused(cli, tmp_path, f"{server.url}/w.pth", "a torch file", "download other files first")
    _refused(cli, tmp_path, f"{server.url}/a.safetensors", "--root", extra=("--root", "model"))


def test_a_redirect_loop_is_refused(cli, server, tmp_path):
    server.behaviour.redirect_loop = True
    _refused(cli, tmp_path, f"{server.url}/a.safetensors", "more than 5 redirects")


def test_after_the_hubs_redirect_ranges_are_asked_of_the_cdn_directly(cli, server, tmp_path):
    assert cli("convert", "hf://org/single", "-o", tmp_path / "out.safetensors").code == 0
    paths = [path for path, *_ in server.served.requests]
    hub = [p for p in paths if "/resolve/" in p]  # the index looked for (404), then the file's first bytes
    assert hub == ["/org/single/resolve/main/model.safetensors.index.json", "/org/single/resolve/main/model.safetensors"]
    assert sum(p.startswith("/cdn/") for p in paths) >= 2


# ---- what a hostile server or URL tries (the red team's findings, each a case) ---------------

def test_the_token_goes_only_to_the_endpoints_own_scheme_and_host(cli, server, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_TOKEN", "s3cret")
    monkeypatch.setenv("HF_ENDPOINT", f"https://127.0.0.1:{server.port}")  # the Hub over https: not this http URL
    assert cli("inspect", f"{server.url}/a.safetensors").code == 0
    assert all(auth is None for _, auth in server.served.authorizations)
    from ckptsurgery.io.http import Location

    where = Location("https://hub.example/x", "x", "s3cret", ("https", "hub.example"))
    assert where.may_carry_token("https://HUB.example/y") and not where.may_carry_token("HTTP://hub.example/y")
    assert not where.may_carry_token("https://hub.example:8443/y") and not where.may_carry_token("https://cdn.example/y")


def test_a_token_is_stripped_and_one_that_is_not_a_header_value_is_refused_unshown(cli, server, monkeypatch):
    server.behaviour.token = "s3cret"
    monkeypatch.setenv("HF_TOKEN", "s3cret\n")
    assert cli("inspect", "hf://org/single").code == 0
    monkeypatch.setenv("HF_TOKEN", "s3 cret")
    result = cli("inspect", "hf://org/single")
    assert_one_error_line(result, "the Hugging Face token")
    assert "cret" not in result.err


@pytest.mark.parametrize("lie", ["bytes 0-299999999/300000000", "bytes 10-5/48032", "bytes 0-511/" + "9" * 30,
                                 "bytes 3-514/48032"])
def test_a_content_range_that_is_not_what_was_asked_is_refused_before_its_body_is_read(cli, server, tmp_path, lie):
    server.behaviour.lie_range = lie
    _refused(cli, tmp_path, f"{server.url}/a.safetensors", "Content-Range" if "9" * 30 in lie else "the server sent")


def test_a_dripping_body_or_header_times_out(cli, server, tmp_path, monkeypatch):
    monkeypatch.setenv("CKPTSURGERY_HTTP_TIMEOUT", "0.3")
    server.behaviour.drip = 0.1
    _refused(cli, tmp_path, f"{server.url}/a.safetensors", "timed out")
    server.reset()
    server.behaviour.header_drip = 0.25
    _refused(cli, tmp_path, f"{server.url}/a.safetensors", "timed out")


def test_a_missing_shard_stops_the_others(cli, server, served, tmp_path):
    _, root = served
    (root / "evil").mkdir(exist_ok=True)
    (root / "evil" / "many.json").write_text(json.dumps({"weight_map": {f"t{i}": f"s{i}.safetensors" for i in range(200)}}))
    _refused(cli, tmp_path, f"{server.url}/evil/many.json", "s0.safetensors: not found (404)")
    assert len(server.served.requests) < 40


def test_urls_and_shard_names_that_cannot_be_requested_are_one_line(cli, server, served, tmp_path):
    _, root = served
    _refused(cli, tmp_path, "http://[::1/a.safetensors", "not a URL")
    _refused(cli, tmp_path, f"{server.url}/é.safetensors", "not a URL")
    (root / "evil").mkdir(exist_ok=True)
    (root / "evil" / "surrogate.json").write_text('{"weight_map": {"x": "a\\ud800.safetensors"}}')
    _refused(cli, tmp_path, f"{server.url}/evil/surrogate.json", "not a plain file name")
    server.behaviour.redirect_to = "ftp://elsewhere/a.safetensors?token=SECRET"
    result = _refused(cli, tmp_path, f"{server.url}/a.safetensors", "not an http(s) URL")
    assert "SECRET" not in result.err


def test_a_change_is_seen_by_its_date_when_the_server_sends_no_etag(cli, server, tmp_path):
    server.behaviour.no_etag = True
    server.behaviour.change_after = 1
    _refused(cli, tmp_path, f"{server.url}/a.safetensors", "changed while being read")


def test_an_empty_tensor_at_the_end_of_a_file_is_read_without_a_request(cli, server, served, tmp_path):
    _, root = served
    save_file({"big": torch.ones(70_000), "empty": torch.ones(0)}, str(root / "empty-last.safetensors"))
    out = tmp_path / "o.safetensors"
    assert cli("convert", f"{server.url}/empty-last.safetensors", "-o", out, "--dtype", "fp16").code == 0
    assert open_checkpoint(str(out)).tensors["empty"].shape == (0,)


def test_a_redirect_with_a_long_body_does_not_spoil_the_connection(cli, server, tmp_path):
    server.behaviour.redirect_to = f"{server.url}/cdn/a.safetensors"
    server.behaviour.redirect_body = 100_000
    assert cli("convert", f"{server.url}/a.safetensors", "-o", tmp_path / "o.safetensors").code == 0
    assert not [r for r in server.served.requests if r[2] >= 500]


def test_a_hub_file_served_without_a_redirect_is_still_read_at_the_pinned_commit(cli, server, tmp_path):
    server.behaviour.hub_direct = True
    assert cli("convert", "hf://org/single/model.safetensors", "-o", tmp_path / "o.safetensors").code == 0
    # this repository's requests (a thread of an earlier test may still be finishing one of its own)
    paths = [path for path, *_ in server.served.requests if path.startswith("/org/single/")]
    assert paths[0] == "/org/single/resolve/main/model.safetensors"
    assert all(f"/resolve/{server.behaviour.hub_commit}/" in p for p in paths[1:]), paths


def test_hf_paths_name_revisions_with_slashes_repository_types_and_refuse_the_rest(monkeypatch):
    monkeypatch.setenv("HF_ENDPOINT", "https://hub.example")
    repo, filename = parse_hf("hf://org/name@refs/pr/12/model.safetensors")
    assert (repo.revision, filename) == ("refs/pr/12", "model.safetensors")
    assert repo.url(filename) == "https://hub.example/org/name/resolve/refs%2Fpr%2F12/model.safetensors"
    assert parse_hf("hf://org/name@feature%2Fx/m.safetensors")[0].revision == "feature/x"
    assert parse_hf("hf://datasets/org/name/m.safetensors")[0].url("m.safetensors") == \
        "https://hub.example/datasets/org/name/resolve/main/m.safetensors"
    for bad in ("hf://org/re#po/x", "hf://org/re?po", "hf://../../m.safetensors", "hf://org/na me",
                "hf://org/name@ /x", "hf://org/ré/x"):
        with pytest.raises(Exception) as e:
            parse_hf(bad)
        assert type(e.value).__name__ == "CkptError", bad
    monkeypatch.setenv("HF_ENDPOINT", "huggingface.co")
    with pytest.raises(Exception, match="HF_ENDPOINT"):
        parse_hf("hf://org/name")


def test_dequantize_of_a_remote_release_takes_the_block_size_from_its_config(cli, server, served, tmp_path):
    _, root = served
    release = root / "org" / "fp8"
    release.mkdir(parents=True, exist_ok=True)
    g = torch.Generator().manual_seed(0)
    weight = (torch.randn(128, 128, generator=g) * 4).to(torch.float8_e4m3fn)
    save_file({"l.weight": weight, "l.weight_scale_inv": torch.rand(2, 2, generator=g) + 0.5},
              str(release / "model.safetensors"))
    (release / "config.json").write_text(json.dumps({"quantization_config": {"weight_block_size": [64, 64]}}))
    local = tmp_path / "local.safetensors"
    assert cli("convert", release / "model.safetensors", "-o", local, "--dequantize").code == 0
    for source in ("hf://org/fp8", f"{server.url}/org/fp8/model.safetensors"):
        out = tmp_path / "remote.safetensors"
        result = cli("convert", source, "-o", out, "--dequantize", "--json", "--force")
        assert result.code == 0, result.err
        done = json.loads(result.out)["dequantized"]
        assert done["block_size"] == [64, 64] and done["block_size_from"].endswith("config.json")
        assert out.read_bytes() == local.read_bytes()


def test_dequantize_of_a_remote_repository_to_a_folder_writes_the_folder_a_local_copy_gives(cli, server, served,
                                                                                           tmp_path):
    """config.json (quantization_config dropped), the tokenizer's and generation files and the
    remote code its auto_map names are fetched at the commit the weights were read at; the shards
    grouped as the repository's index groups them."""
    _, root = served
    release = root / "org" / "fp8-folder"
    release.mkdir(parents=True, exist_ok=True)
    g = torch.Generator().manual_seed(1)
    shards = {"model-00001-of-00002.safetensors": {
                  "a.weight": (torch.randn(128, 128, generator=g) * 4).to(torch.float8_e4m3fn),
                  "a.weight_scale_inv": torch.rand(1, 1, generator=g) + 0.5},
              "model-00002-of-00002.safetensors": {"norm.weight": torch.ones(8, dtype=torch.bfloat16)}}
    for name, tensors in shards.items():
        save_file(tensors, str(release / name), metadata={"format": "pt"})
    (release / "model.safetensors.index.json").write_text(json.dumps(
        {"metadata": {}, "weight_map": {k: name for name, tensors in shards.items() for k in tensors}}))
    (release / "config.json").write_text(json.dumps({"model_type": "x", "torch_dtype": "float8_e4m3fn",
                                                     "auto_map": {"AutoModel": "modeling_x.XModel"},
                                                     "quantization_config": {"weight_block_size": [128, 128]}}))
    for name, text in (("tokenizer.json", '{"model": {"vocab": {}}}'), ("generation_config.json", "{}"),
                       ("modeling_x.py", "class XModel: pass\n")):
        (release / name).write_text(text)
    local, remote = tmp_path / "local", tmp_path / "remote"
    assert cli("convert", release, "-o", f"{local}/", "--dequantize").code == 0
    server.reset()
    result = cli("convert", "hf://org/fp8-folder", "-o", f"{remote}/", "--dequantize", "--json")
    assert result.code == 0, result.err
    names = sorted(os.listdir(local))
    assert names == sorted(os.listdir(remote)) == sorted(
        ["config.json", "generation_config.json", "modeling_x.py", "tokenizer.json", "model.safetensors.index.json",
         "model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors"])
    for name in names:
        assert (local / name).read_bytes() == (remote / name).read_bytes(), name
    assert "quantization_config" not in json.loads((remote / "config.json").read_text())
    # the first answer pins the commit: every later file, weights or not, is asked for at it
    revisions = [r[0].split("/resolve/")[1].split("/")[0] for r in server.served.requests if "/resolve/" in r[0]]
    assert revisions[0] == "main" and set(revisions[1:]) == {server.behaviour.hub_commit}
    assert json.loads(result.out)["model_folder"]["copied"] == ["generation_config.json", "modeling_x.py",
                                                                "tokenizer.json"]


def test_a_remote_config_naming_many_remote_code_modules_has_the_first_sixteen_fetched(cli, server, served, tmp_path):
    _, root = served
    release = root / "org" / "many-modules"
    release.mkdir(parents=True, exist_ok=True)
    save_file({"w": torch.ones(4)}, str(release / "model.safetensors"))
    auto_map = {f"Auto{i}": f"mod{i}.X" for i in range(40)}
    (release / "config.json").write_text(json.dumps({"auto_map": auto_map}))
    result = cli("convert", "hf://org/many-modules", "-o", f"{tmp_path / 'out'}/", "--dequantize", "--json")
    assert result.code == 0, result.err
    assert json.loads(result.out)["model_folder"]["notes"] == [
        "config.json names 40 remote code modules: the first 16 fetched, the others not"]
    asked = {r[0].rsplit("/", 1)[1] for r in server.served.requests if "/mod" in r[0] and r[0].endswith(".py")}
    assert asked == {f"mod{i}.py" for i in range(16)}


def test_a_repositorys_files_are_fetched_at_one_commit_when_it_has_no_config(server, served):
    """A tokenizer-only repository (the recipe's tokenizer_source): config.json answers 404, which
    pins no commit; the files are asked one at a time until one answer pins it, then the rest at it."""
    from ckptsurgery.io.remote import repository_files
    from ckptsurgery.ops.model_folder import CONFIG, MAX_FETCHED, TOKENIZER_FILES

    _, root = served
    tok = root / "org" / "tokenizer-only"
    tok.mkdir(exist_ok=True)
    for name in ("tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja"):
        (tok / name).write_text(json.dumps({"name": name}))
    found = repository_files("hf://org/tokenizer-only", [CONFIG, *TOKENIZER_FILES], MAX_FETCHED, None)
    assert sorted(found) == ["chat_template.jinja", "special_tokens_map.json", "tokenizer_config.json"]
    commit = server.behaviour.hub_commit
    hub = [path for path, *_ in server.served.requests if "/resolve/" in path]
    pinned = hub.index("/org/tokenizer-only/resolve/main/tokenizer_config.json")  # the first file found
    assert all("/resolve/main/" in path for path in hub[:pinned + 1])
    assert all(f"/resolve/{commit}/" in path for path in hub[pinned + 1:]) and len(hub) > pinned + 1, hub
