"""A local HTTP server for the remote-input tests: files from a folder, with Range support, on
127.0.0.1, counting what it serves. It can also play the Hugging Face Hub (`/ORG/REPO/resolve/
REV/FILE` answered with a redirect to a CDN path and `X-Repo-Commit`) and misbehave on demand:
ignore Range, ask for a token, fail a number of times, close early, change a file mid-run."""

from __future__ import annotations

import json
import os
import re
import threading
import time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import unquote, urlsplit

_RANGE = re.compile(r"bytes=(\d+)-(\d*)")


@dataclass
class Behaviour:
    ignore_range: bool = False
    token: str | None = None  # a request without `Authorization: Bearer TOKEN` gets 401
    fail_times: int = 0  # answer 503 this many times first
    truncate: bool = False  # send fewer bytes than Content-Range says, then close
    hub_commit: str = "0123456789abcdef0123456789abcdef01234567"
    redirect_host: str | None = None  # the CDN's host:port (e.g. "localhost:PORT"); None: same host
    change_after: int | None = None  # after this many range requests, the file's ETag changes
    no_etag: bool = False
    redirect_loop: bool = False  # every request is redirected to itself
    redirect_to: str | None = None  # every request outside /cdn/ is redirected there (an absolute URL)
    redirect_body: int = 0  # bytes of text in a redirect's body
    hub_direct: bool = False  # the Hub answers resolve itself, no redirect (a file outside LFS)
    lie_range: str | None = None  # the Content-Range sent with every 206, whatever was asked
    drip: float | None = None  # seconds between the body's bytes (the status and headers come at once)
    header_drip: float | None = None  # seconds between header lines


@dataclass
class Served:
    requests: list = field(default_factory=list)  # (path, Range header, status, body bytes)
    authorizations: list = field(default_factory=list)  # (path, Authorization header or None)

    @property
    def bytes(self) -> int:
        return sum(r[3] for r in self.requests)


class RangeServer:
    """`with RangeServer(folder) as server:` serves `folder` at `server.url`."""

    def __init__(self, folder: str, port: int = 0):
        self.folder = folder
        self.behaviour = Behaviour()
        self.served = Served()
        self._lock = threading.Lock()
        self._ranges = 0
        server = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):
                pass

            def do_GET(self):
                server._answer(self)

        class Server(ThreadingHTTPServer):
            def handle_error(self, request, client_address):
                pass  # a client that hung up (a refused answer): not a test's stderr

        self.httpd = Server(("127.0.0.1", port), Handler)
        self.httpd.daemon_threads = True
        self.port = self.httpd.server_address[1]
        self.url = f"http://127.0.0.1:{self.port}"
        self._thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    def __enter__(self) -> "RangeServer":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()

    def reset(self) -> None:
        self.behaviour = Behaviour()
        self.served = Served()
        self._ranges = 0

    def _record(self, path: str, rng: str | None, status: int, nbytes: int) -> list:
        """The request, recorded when it arrives (in the test it belongs to: a dripping answer may
        end long after); its last item, the bytes sent, is set when they are."""
        entry = [path, rng, status, nbytes]
        if path == "/__served":
            return entry
        with self._lock:
            self.served.requests.append(entry)
        return entry

    def _answer(self, h: BaseHTTPRequestHandler) -> None:
        b = self.behaviour
        path = unquote(urlsplit(h.path).path)
        if path == "/__served":  # what was served since the last call, then reset (for bench/bench_remote.py)
            with self._lock:
                body = json.dumps({"bytes": self.served.bytes, "requests": len(self.served.requests)}).encode()
                self.served = Served()
            return self._send(h, path, None, 200, body, {"Content-Type": "application/json"})
        rng = h.headers.get("Range")
        with self._lock:
            self.served.authorizations.append((path, h.headers.get("Authorization")))
            failing = b.fail_times > 0
            if failing:
                b.fail_times -= 1
        if failing:
            return self._status(h, path, rng, 503)
        if b.redirect_loop or b.redirect_to and not path.startswith("/cdn/"):
            return self._redirect(h, path, rng, h.path if b.redirect_loop else b.redirect_to, {})
        hub = re.fullmatch(r"/([^/]+/[^/]+)/resolve/([^/]+)/(.+)", path)
        if hub:  # the Hub: check the token, then redirect to the CDN (or, hub_direct, answer itself)
            if b.token and h.headers.get("Authorization") != f"Bearer {b.token}":
                return self._status(h, path, rng, 401)
            repo, revision, filename = hub.groups()
            if revision not in ("main", b.hub_commit):
                return self._status(h, path, rng, 404)
            local = os.path.join(self.folder, repo, filename)
            if not os.path.isfile(local):
                return self._status(h, path, rng, 404, {"X-Repo-Commit": b.hub_commit})
            if not b.hub_direct:
                host = b.redirect_host or f"127.0.0.1:{self.port}"
                return self._redirect(h, path, rng, f"http://{host}/cdn/{repo}/{filename}?signature=secret",
                                      {"X-Repo-Commit": b.hub_commit})
        elif path.startswith("/cdn/"):
            local = os.path.join(self.folder, path[len("/cdn/"):])
        else:
            if b.token and h.headers.get("Authorization") != f"Bearer {b.token}":
                return self._status(h, path, rng, 401)
            local = os.path.join(self.folder, path.lstrip("/"))
        if not os.path.isfile(local):
            return self._status(h, path, rng, 404)
        size = os.path.getsize(local)
        etag = None if b.no_etag else f'"{size}-v1"'
        modified = "Mon, 07 Dec 2026 10:00:00 GMT"
        commit = {"X-Repo-Commit": b.hub_commit} if hub else {}
        match = _RANGE.fullmatch(rng or "") if not b.ignore_range else None
        if match is None:
            with open(local, "rb") as f:
                return self._send(h, path, rng, 200, f.read(), {"ETag": etag, "Accept-Ranges": "none", **commit})
        with self._lock:
            self._ranges += 1
            if b.change_after is not None and self._ranges > b.change_after:
                etag = None if b.no_etag else f'"{size}-v2"'
                modified = "Mon, 07 Dec 2026 11:00:00 GMT"
        start = int(match.group(1))
        end = min(int(match.group(2)) if match.group(2) else size - 1, size - 1)
        if start >= size:
            return self._status(h, path, rng, 416, {"Content-Range": f"bytes */{size}"})
        with open(local, "rb") as f:  # only the range: a bench serves files of gigabytes
            f.seek(start)
            body = f.read(end + 1 - start)
        headers = {"ETag": etag, "Last-Modified": modified, "Content-Range": b.lie_range or f"bytes {start}-{end}/{size}",
                   **commit}
        if b.truncate and len(body) > 16:
            self._record(path, rng, 206, len(body) // 2)
            h.send_response(206)
            for k, v in headers.items():
                if v is not None:
                    h.send_header(k, v)
            h.send_header("Content-Length", str(len(body)))
            h.end_headers()
            h.wfile.write(body[: len(body) // 2])
            h.close_connection = True
            return
        self._send(h, path, rng, 206, body, headers)

    def _redirect(self, h, path, rng, location: str, headers: dict) -> None:
        body = b"x" * self.behaviour.redirect_body
        self._record(path, rng, 302, 0)
        h.send_response(302)
        h.send_header("Location", location)
        for k, v in headers.items():
            h.send_header(k, v)
        h.send_header("Content-Length", str(len(body)))
        h.end_headers()
        h.wfile.write(body)

    def _send(self, h, path, rng, status, body: bytes, headers: dict) -> None:
        b = self.behaviour
        entry = self._record(path, rng, status, 0)
        h.send_response(status)
        for k, v in headers.items():
            if v is not None:
                h.send_header(k, v)
                if b.header_drip:
                    h.wfile.flush()
                    time.sleep(b.header_drip)
        h.send_header("Content-Length", str(len(body)))
        h.end_headers()
        try:
            if b.drip and status == 206:
                for i in range(len(body)):
                    h.wfile.write(body[i : i + 1])
                    h.wfile.flush()
                    time.sleep(b.drip)
            else:
                h.wfile.write(body)
            sent = len(body)
        except (BrokenPipeError, ConnectionResetError):  # the client stopped reading (a refused 200)
            sent = 0
            h.close_connection = True
        entry[3] = sent

    def _status(self, h, path, rng, status: int, headers: dict | None = None) -> None:
        self._send(h, path, rng, status, f"status {status}\n".encode(), headers or {})


if __name__ == "__main__":  # `python tests/remote_server.py FOLDER PORT`: serve until killed (the bench)
    import sys

    with RangeServer(sys.argv[1], int(sys.argv[2])) as server:
        threading.Event().wait()


# ---- what the tests of remote inputs share ----------------------------------------------------

def hub_models(root, models: dict) -> None:
    """Each of `models` (name -> tensors) as ROOT/NAME.safetensors (an https:// URL) and as the
    repository ROOT/org/NAME (hf://org/NAME, its model.safetensors), as a RangeServer serves them."""
    from safetensors.torch import save_file

    for name, tensors in models.items():
        save_file(tensors, os.path.join(str(root), f"{name}.safetensors"), metadata={"format": "pt"})
        os.makedirs(os.path.join(str(root), "org", name))
        save_file(tensors, os.path.join(str(root), "org", name, "model.safetensors"), metadata={"format": "pt"})


def use_hub(monkeypatch, server: RangeServer, root) -> None:
    """HF_ENDPOINT at `server`, no token from anywhere, a short timeout."""
    monkeypatch.setenv("HF_ENDPOINT", server.url)
    monkeypatch.delenv("HF_TOKEN", raising=False)
    monkeypatch.setenv("HF_TOKEN_PATH", os.path.join(str(root), "no-token-here"))
    monkeypatch.setenv("CKPTSURGERY_HTTP_TIMEOUT", "5")


def spools_in_tmp(monkeypatch, tmp_path) -> None:
    """Temporary files in tmp_path/tmp (tempfile's folder), and every tensor over 64 KiB spooled
    (not kept in memory): the tests' tensors of 320-384 KiB go to files."""
    import ckptsurgery.ops.spools as spooling

    monkeypatch.setattr(spooling, "IN_MEMORY", 64 << 10)
    (tmp_path / "tmp").mkdir()
    monkeypatch.setenv("TMPDIR", str(tmp_path / "tmp"))
    monkeypatch.setattr("tempfile.tempdir", None)


def recorded_spools(monkeypatch) -> list:
    """Every temporary file ops/spools.py makes from now on, with the folder it was made in, as made."""
    import ckptsurgery.ops.spools as spooling

    made: list = []
    make = spooling._temporary_file

    def recorded(folder):
        file, where = made_in = make(folder)
        made.append((where, file))
        return made_in

    monkeypatch.setattr(spooling, "_temporary_file", recorded)
    return made


def files_bytes(root, *names) -> int:
    """What reading the files' headers and every tensor once costs: per file, its first HEAD_BYTES
    (io/remote.py's first request) or its header when longer, and its tensors' bytes."""
    from ckptsurgery.io.remote import HEAD_BYTES

    total = 0
    for name in names:
        with open(root / name, "rb") as f:
            header = 8 + int.from_bytes(f.read(8), "little")
        total += max(HEAD_BYTES, header) + os.path.getsize(root / name) - header
    return total


def no_debris(*folders) -> None:
    """No temporary file in the folders, and none of theirs still open or mapped here (a file with
    no name holds its disk space until then)."""
    for folder in folders:
        names = os.listdir(folder)
        assert not [n for n in names if "ckptsurgery" in n or n.startswith(".")], names
    if not os.path.isdir("/proc/self/fd"):
        return
    held = []
    for fd in os.listdir("/proc/self/fd"):
        try:
            held.append(os.readlink(f"/proc/self/fd/{fd}"))
        except OSError:
            pass
    with open("/proc/self/maps") as maps:
        held += [line.split(maxsplit=5)[-1].strip() for line in maps if len(line.split()) == 6 or "(deleted)" in line]
    assert not [h for h in held if any(h.startswith(str(f) + os.sep) for f in folders)], held
