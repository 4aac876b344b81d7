"""Inputs that are not on this disk: `https://…` (or `http://…`) URLs of a `.safetensors` file or
of a `*.safetensors.index.json`, and `hf://ORG/REPO[@REV][/FILE]` on the Hugging Face Hub.

Nothing is downloaded whole. A file is opened by one Range request for its first `HEAD_BYTES`
(the format's magic, the safetensors header length, and the total size from `Content-Range`),
its header by one more when it is longer; tensors are fetched as the byte ranges the writer
copies (the writer joins adjacent tensors into one range), in pieces of `PIECE` bytes with
`IN_FLIGHT` of them in flight. Every answer is checked against the first: the same total size and
ETag, and for `hf://` the same commit (the revision is pinned to the commit the first answer
names, so a branch that moves mid-run is read as it was).

Refused with one line (exit 1), nothing written: 404, 401/403 (with how to log in), a server that
ignores Range (it would send the whole file; `--allow-full-download` lets it, into a temporary
file), a short or changed answer, and a connection that keeps failing (`RETRIES` more tries,
then the last error). Redirects are followed with the Range kept (the Hub answers `resolve` with
a redirect to its CDN); a token is sent only to the host it belongs to, never across a redirect
to another host, and an https URL is never redirected to http.

The token for `hf://`: `HF_TOKEN`, else huggingface_hub's stored login (`hf auth login`) when
huggingface_hub is installed. The endpoint: `HF_ENDPOINT` (default https://huggingface.co)."""

from __future__ import annotations

import functools
import http.client
import json
import os
import posixpath
import re
import socket
import ssl
import tempfile
import threading
import time
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from contextvars import ContextVar, copy_context
from dataclasses import dataclass, field
from typing import Iterator
from urllib.parse import quote, urljoin, urlsplit

from ..errors import CkptError
from .model import Checkpoint, MappedFile, RangeSource

HEAD_BYTES = 512  # the first request: as much as format detection reads of a local file
PIECE = 8 << 20  # bytes of one range request when a long range is streamed (4 in flight: ~32 MB held)
IN_FLIGHT = 4  # range requests in flight while a long range is streamed
READ_AHEAD = 256 << 10  # a view of fewer bytes fetches this many from its start, for the views after it
RETRIES = 3  # more tries after a failed connection or a 5xx/429 answer
MAX_REDIRECTS = 5
INDEX_LIMIT = 16 << 20  # as io/sharded.py: far above any real index
DEFAULT_ENDPOINT = "https://huggingface.co"
# hf://ORG/REPO with no file: these are looked for in this order, as transformers and diffusers do
HF_WEIGHTS = ("model.safetensors.index.json", "model.safetensors",
              "diffusion_pytorch_model.safetensors.index.json", "diffusion_pytorch_model.safetensors")

_SCHEMES = ("https://", "http://", "hf://")
_CONTENT_RANGE = re.compile(r"bytes (\d+)-(\d+)/(\d+)")
_REDIRECTS = {301, 302, 303, 307, 308}


def is_remote(path: str) -> bool:
    return isinstance(path, str) and path.startswith(_SCHEMES)


# ---- what a run fetched (the reports' `fetched`) ---------------------------------------------

@dataclass
class FetchLedger:
    """What the remote inputs of one run cost: per file, its size, the bytes received and the
    range requests made. Shared by the threads that fetch."""

    files: dict[str, list[int]] = field(default_factory=dict)  # url -> [size, bytes, ranges]
    full_downloads: list[str] = field(default_factory=list)
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def opened(self, url: str, size: int) -> None:
        with self._lock:
            self.files.setdefault(url, [size, 0, 0])

    def received(self, url: str, nbytes: int) -> None:
        with self._lock:
            entry = self.files.setdefault(url, [0, 0, 0])
            entry[1] += nbytes
            entry[2] += 1

    @property
    def bytes(self) -> int:
        return sum(entry[1] for entry in self.files.values())

    @property
    def requests(self) -> int:
        return sum(entry[2] for entry in self.files.values())


@dataclass(frozen=True)
class RemoteSettings:
    allow_full_download: bool = False
    ledger: FetchLedger | None = None


_settings: ContextVar[RemoteSettings] = ContextVar("ckptsurgery_remote", default=RemoteSettings())


@contextmanager
def remote_inputs(allow_full_download: bool = False) -> Iterator[FetchLedger]:
    """Remote inputs opened inside this block may be downloaded whole when their server ignores
    Range (`allow_full_download`), and count what they fetch in the ledger it yields."""
    ledger = FetchLedger()
    token = _settings.set(RemoteSettings(allow_full_download, ledger))
    try:
        yield ledger
    finally:
        _settings.reset(token)


def start_reading(allow_full_download: bool = False) -> None:
    """The command line's start: from here, a fresh ledger (`fetched`), and whether a file may be
    downloaded whole. (A library caller uses `remote_inputs` instead.)"""
    _settings.set(RemoteSettings(allow_full_download, FetchLedger()))


def current_ledger() -> FetchLedger | None:
    """The ledger in effect (the command line's, since `start_reading`)."""
    return _settings.get().ledger


# ---- locations -------------------------------------------------------------------------------

@dataclass(frozen=True)
class Location:
    """Where a remote file is: its URL, the name errors show, the token its host takes, and for
    `hf://` its repository and its path there."""

    url: str
    shown: str
    token: str | None = None
    hub: "HubRepo | None" = None
    filename: str | None = None

    def sibling(self, name: str) -> "Location":
        """A file beside this one (a shard beside its index); `name` is a plain file name."""
        shown = self.shown.rsplit("/", 1)[0] + "/" + name
        if self.hub is not None:
            filename = posixpath.join(posixpath.dirname(self.filename or ""), name)
            return Location(self.hub.url(filename), shown, self.token, self.hub, filename)
        return Location(urljoin(self.url, quote(name)), shown, self.token)

    def pinned(self) -> "Location":
        """The same file at the commit its repository is pinned to."""
        if self.hub is None or self.filename is None:
            return self
        return Location(self.hub.url(self.filename), self.shown, self.token, self.hub, self.filename)


@dataclass
class HubRepo:
    """An `hf://` repository at one revision; `commit` is pinned by the first answer that names it."""

    endpoint: str
    repo: str
    revision: str
    commit: str | None = None

    def url(self, filename: str) -> str:
        revision = self.commit or self.revision
        return f"{self.endpoint}/{self.repo}/resolve/{quote(revision, safe='')}/{quote(filename)}"


def parse_hf(path: str) -> tuple[HubRepo, str | None]:
    """`hf://ORG/REPO[@REV][/FILE]` into the repository and the file (None: find the weights)."""
    rest = path[len("hf://"):]
    parts = rest.split("/")
    if len(parts) < 2 or not parts[0] or not parts[1]:
        raise CkptError(f"{path}: give hf://ORG/REPO[@REVISION][/FILE]")
    name, _, revision = parts[1].partition("@")
    if not name or (_ and not revision):
        raise CkptError(f"{path}: give hf://ORG/REPO[@REVISION][/FILE] (an empty revision after @)")
    filename = "/".join(parts[2:]) or None
    if filename is not None and any(p in ("", ".", "..") for p in parts[2:]):
        raise CkptError(f"{path}: {filename!r} is not a file path inside the repository")
    endpoint = os.environ.get("HF_ENDPOINT", DEFAULT_ENDPOINT).rstrip("/")
    return HubRepo(endpoint, f"{parts[0]}/{name}", revision or "main"), filename


def hub_token() -> str | None:
    """HF_TOKEN, else huggingface_hub's stored login when it is installed."""
    token = os.environ.get("HF_TOKEN")
    if token:
        return token
    try:
        from huggingface_hub import get_token
    except ImportError:
        return None
    try:
        return get_token()
    except Exception:  # a stored login it cannot read is no login
        return None


# ---- HTTP ------------------------------------------------------------------------------------

@dataclass
class Answer:
    status: int
    headers: dict[str, str]  # lower-case names, the last hop's
    body: bytes | bytearray
    commit: str | None  # X-Repo-Commit, from any hop (the Hub puts it on its redirect)
    url: str = ""  # where the bytes came from, after redirects


class _Connections(threading.local):
    def __init__(self):
        self.open: dict[tuple[str, str], http.client.HTTPConnection] = {}


_connections = _Connections()


def _timeout() -> float:
    try:
        return max(0.05, float(os.environ.get("CKPTSURGERY_HTTP_TIMEOUT", "30")))
    except ValueError:
        return 30.0


def _connection(scheme: str, netloc: str) -> http.client.HTTPConnection:
    key = (scheme, netloc)
    conn = _connections.open.get(key)
    if conn is None:
        if scheme == "https":
            conn = http.client.HTTPSConnection(netloc, timeout=_timeout(), context=ssl.create_default_context())
        else:
            conn = http.client.HTTPConnection(netloc, timeout=_timeout())
        _connections.open[key] = conn
    return conn


def _drop_connection(scheme: str, netloc: str) -> None:
    conn = _connections.open.pop((scheme, netloc), None)
    if conn is not None:
        conn.close()


@functools.cache
def _user_agent() -> str:
    from importlib.metadata import PackageNotFoundError, version  # io does not import the package itself

    try:
        return f"ckptsurgery/{version('ckptsurgery')}"
    except PackageNotFoundError:
        return "ckptsurgery"


def request(where: Location, start: int, end: int | None, limit: int) -> Answer:
    """GET `where` for bytes [start, end] (None: to the end), following redirects, retrying a
    failed connection or a 5xx/429 answer. A 200 answer's body is read only up to `limit` bytes
    (a server ignoring Range would otherwise send the whole file): more than that is left unread."""
    delay = 0.2
    for attempt in range(RETRIES + 1):
        try:
            answer = _follow(where, start, end, limit)
        except (OSError, http.client.HTTPException) as e:
            if attempt == RETRIES:
                raise CkptError(f"{where.shown}: {_describe(e)} (after {RETRIES + 1} tries)") from None
        else:
            if answer.status != 429 and answer.status < 500 or attempt == RETRIES:
                return answer
        time.sleep(delay)
        delay *= 2
    raise AssertionError("unreachable")


def _describe(e: BaseException) -> str:
    if isinstance(e, ConnectionRefusedError):
        return "connection refused"
    if isinstance(e, (socket.timeout, TimeoutError)):
        return "timed out"
    if isinstance(e, ssl.SSLError):
        return f"TLS failed ({e.reason or e})"
    if isinstance(e, socket.gaierror):
        return "unknown host"
    if isinstance(e, http.client.IncompleteRead):
        return "the connection closed before the answer was complete"
    return f"connection failed ({type(e).__name__}: {e})"


def _follow(where: Location, start: int, end: int | None, limit: int, sink: "_Sink | None" = None) -> Answer:
    url, first_host, commit = where.url, urlsplit(where.url).netloc, None
    headers = {"Range": f"bytes={start}-{'' if end is None else end}", "Accept-Encoding": "identity",
               "User-Agent": _user_agent()}
    for _ in range(MAX_REDIRECTS + 1):
        parts = urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.netloc:
            raise CkptError(f"{where.shown}: redirected to {url[:100]!r}, not an http(s) URL")
        sent = dict(headers)
        if where.token and parts.netloc == first_host:  # never to another host (a CDN)
            sent["Authorization"] = f"Bearer {where.token}"
        conn = _connection(parts.scheme, parts.netloc)
        try:
            conn.request("GET", (parts.path or "/") + (f"?{parts.query}" if parts.query else ""), headers=sent)
            response = conn.getresponse()
            got = {k.lower(): v for k, v in response.getheaders()}
            commit = got.get("x-repo-commit", commit)
            if response.status in _REDIRECTS and "location" in got:
                response.read(64 << 10)  # a redirect's body is a line of text
                if response.will_close:
                    _drop_connection(parts.scheme, parts.netloc)
                target = urljoin(url, got["location"])
                if parts.scheme == "https" and target.startswith("http://"):
                    raise CkptError(f"{where.shown}: redirected from https to http ({target[:100]}); refused")
                url = target
                continue
            body = _read_body(response, got, limit, sink)
            if response.will_close or response.status == 200 and len(body) >= limit:
                _drop_connection(parts.scheme, parts.netloc)
            return Answer(response.status, got, body, commit, url)
        except BaseException:
            _drop_connection(parts.scheme, parts.netloc)
            raise
    raise CkptError(f"{where.shown}: more than {MAX_REDIRECTS} redirects")


def _read_body(response, headers: dict[str, str], limit: int, sink: "_Sink | None" = None) -> bytes:
    if response.status == 206:
        match = _CONTENT_RANGE.fullmatch(headers.get("content-range", "").strip())
        if not match:
            return response.read(0)  # checked by the caller, which names the fault
        want = int(match.group(2)) - int(match.group(1)) + 1
        body = bytearray(want)  # read into place: no second copy of a 16 MB piece
        view, got = memoryview(body), 0
        while got < want:
            n = response.readinto(view[got:])
            if not n:
                raise http.client.IncompleteRead(bytes(view[:got]), want - got)
            got += n
        return body
    if response.status == 200 and sink is not None:
        while piece := response.read(PIECE):
            sink.write(piece)
        return b""
    if response.status == 200:
        return response.read(limit)
    return response.read(64 << 10)  # an error page: never more than a little


class NotFound(CkptError):
    """A 404: `shown` names what was not found."""

    def __init__(self, shown: str):
        super().__init__(f"{shown}: not found (404)")
        self.shown = shown


def refused(where: Location, answer: Answer) -> CkptError:
    """The one line for an answer that is not the bytes asked for."""
    status = answer.status
    if status == 404:
        return NotFound(where.shown)
    if status in (401, 403):
        if where.hub is not None:
            return CkptError(f"{where.shown}: access denied ({status}): the repository is private, gated or "
                             f"does not exist; log in with `hf auth login` (or set HF_TOKEN) and accept its "
                             f"terms on the Hub if it is gated")
        return CkptError(f"{where.shown}: access denied ({status})")
    if status == 416:
        return CkptError(f"{where.shown}: the server has fewer bytes than the file had (416): it changed or "
                         f"was truncated while being read")
    return CkptError(f"{where.shown}: the server answered {status}")


# ---- a remote file ---------------------------------------------------------------------------

_pool: ThreadPoolExecutor | None = None
_pool_lock = threading.Lock()


def _fetch_pool() -> ThreadPoolExecutor:
    global _pool
    with _pool_lock:
        if _pool is None:
            _pool = ThreadPoolExecutor(max_workers=IN_FLIGHT, thread_name_prefix="ckptsurgery-fetch")
        return _pool


class RemoteFile(RangeSource):
    """A file fetched by byte ranges, read as a mapped file is: `view(offset, nbytes)`, and
    `stream(offset, nbytes)` for the writer (pieces in order, several fetched at once)."""

    def __init__(self, where: Location, first: Answer, ledger: FetchLedger | None):
        self.where, self.path, self.ledger = where, where.shown, ledger
        match = _CONTENT_RANGE.fullmatch(first.headers.get("content-range", "").strip())
        if first.status != 206 or not match or int(match.group(1)) != 0:
            raise CkptError(f"{self.path}: the server's answer to a range request has no valid Content-Range")
        self.size = int(match.group(3))
        self.etag = first.headers.get("etag")
        self.head = first.body
        if len(self.head) != min(HEAD_BYTES, self.size):
            raise CkptError(f"{self.path}: the server sent {len(self.head)} bytes for the first "
                            f"{min(HEAD_BYTES, self.size)}")
        self._direct = self._at(first.url)
        self.data_start = self.size  # where tensor data starts (set once the header is read): no read-ahead before
        self._window: tuple[int, bytes | bytearray] = (0, b"")
        self._window_lock = threading.Lock()
        if ledger is not None:
            ledger.opened(self.path, self.size)
            ledger.received(self.path, len(first.body))

    def _at(self, url: str) -> Location | None:
        """Where to ask next: the URL an answer came from, when a redirect led there (the token
        only if it is the same host); None when it is the file's own URL."""
        if not url or url == self.where.url:
            return None
        same_host = urlsplit(url).netloc == urlsplit(self.where.url).netloc
        return Location(url, self.path, self.where.token if same_host else None)

    def fetch(self, offset: int, nbytes: int) -> bytes:
        """Bytes [offset, offset + nbytes), by one range request, checked against the file as first seen.
        Asked where the last answer came from (the Hub's CDN, past its redirect), and again at the
        file's own URL when that fails (a signed CDN URL expires)."""
        direct = self._direct
        answer = request(direct, offset, offset + nbytes - 1, 0) if direct is not None else None
        if answer is None or answer.status != 206:
            answer = request(self.where, offset, offset + nbytes - 1, 0)
            if answer.status == 206:
                self._direct = self._at(answer.url)
        if answer.status != 206:
            raise refused(self.where, answer) if answer.status != 200 else CkptError(
                f"{self.path}: the server stopped answering range requests")
        match = _CONTENT_RANGE.fullmatch(answer.headers.get("content-range", "").strip())
        if (not match or int(match.group(3)) != self.size or answer.headers.get("etag") != self.etag
                or self.where.hub is not None and answer.commit not in (None, self.where.hub.commit)):
            raise CkptError(f"{self.path}: the file changed while being read (its size, ETag or commit "
                            f"differs from the first answer's); run again")
        if int(match.group(1)) != offset or len(answer.body) != nbytes:
            raise CkptError(f"{self.path}: the server sent bytes {match.group(1)}-{match.group(2)} for "
                            f"{offset}-{offset + nbytes - 1}")
        if self.ledger is not None:
            self.ledger.received(self.path, nbytes)
        return answer.body

    def view(self, offset: int, nbytes: int) -> memoryview:
        if offset < 0 or nbytes < 0 or offset + nbytes > self.size:
            raise CkptError(f"{self.path}: data at {offset}+{nbytes} lies past the end of the file")
        if offset + nbytes <= len(self.head):
            return memoryview(self.head)[offset : offset + nbytes]
        if offset < len(self.head):  # a header longer than the first answer: only the rest is fetched
            held = len(self.head) - offset
            return memoryview(self.head[offset:] + self.view(len(self.head), nbytes - held))
        if nbytes < READ_AHEAD and offset >= self.data_start:
            return self._small(offset, nbytes)
        if nbytes <= PIECE:
            return memoryview(self.fetch(offset, nbytes))
        joined = bytearray()
        for piece in self.stream(offset, nbytes):
            joined += piece
        return memoryview(joined)

    def _small(self, offset: int, nbytes: int) -> memoryview:
        """A small tensor's bytes (a .pth output copies them one at a time, a norm after a bias):
        served from the last window fetched when it holds them, else from a new window of
        READ_AHEAD bytes from `offset` — one request for a run of small tensors, not one each."""
        with self._window_lock:
            start, window = self._window
            if start <= offset and offset + nbytes <= start + len(window):
                return memoryview(window)[offset - start : offset - start + nbytes]
        window = self.fetch(offset, min(READ_AHEAD, self.size - offset))
        with self._window_lock:
            self._window = (offset, window)
        return memoryview(window)[:nbytes]

    def stream(self, offset: int, nbytes: int) -> Iterator[memoryview]:
        """[offset, offset + nbytes) in pieces of at most PIECE bytes, in order, IN_FLIGHT fetched at once."""
        starts = iter(range(offset, offset + nbytes, PIECE))
        pending: deque = deque()
        pool = _fetch_pool()

        def more() -> None:
            start = next(starts, None)
            if start is not None:
                pending.append(pool.submit(self.fetch, start, min(PIECE, offset + nbytes - start)))

        for _ in range(IN_FLIGHT):
            more()
        try:
            while pending:
                piece = pending.popleft().result()
                more()
                yield memoryview(piece)
        finally:
            for future in pending:
                future.cancel()

class DownloadedFile(MappedFile):
    """A remote file whose server ignores Range, downloaded whole into a temporary file
    (`--allow-full-download`); removed when closed."""

    def __init__(self, shown: str, local: str):
        super().__init__(local)
        self.path = shown  # what errors name; the map is of `self.local`

    def close(self) -> None:
        super().close()
        try:
            os.unlink(self.local)
        except OSError:
            pass


def open_remote(where: Location):
    """The remote file at `where`: a RemoteFile, or, when its server ignores Range and that is
    allowed, a DownloadedFile."""
    settings = _settings.get()
    answer = request(where, 0, HEAD_BYTES - 1, 0)
    if where.hub is not None and where.hub.commit is None and answer.commit and answer.status in (200, 206):
        where.hub.commit = answer.commit  # pinned: every later URL names this commit
        where = where.pinned()
    if answer.status == 200:
        if not settings.allow_full_download:
            raise CkptError(f"{where.shown}: the server ignores range requests and would send the whole file; "
                            f"download it first, or pass --allow-full-download")
        return _download(where, settings.ledger)
    if answer.status != 206:
        raise refused(where, answer)
    return RemoteFile(where, answer, settings.ledger)


class _Sink:
    """A 200 answer's body, written to a file as it arrives (a whole download)."""

    def __init__(self, out):
        self.out, self.total = out, 0

    def write(self, piece: bytes) -> None:
        self.out.write(piece)
        self.total += len(piece)


def _download(where: Location, ledger: FetchLedger | None) -> DownloadedFile:
    """The whole file, into a temporary file (removed when the DownloadedFile is closed)."""
    fd, local = tempfile.mkstemp(prefix="ckptsurgery-download-")
    try:
        with os.fdopen(fd, "wb") as out:
            sink = _Sink(out)
            try:
                answer = _follow(where, 0, None, 0, sink)
            except (OSError, http.client.HTTPException) as e:
                raise CkptError(f"{where.shown}: {_describe(e)}") from None
            if answer.status != 200:
                raise refused(where, answer)
            declared = answer.headers.get("content-length")
            if declared is not None and declared.isdigit() and int(declared) != sink.total:
                raise CkptError(f"{where.shown}: the download ended after {sink.total} of {declared} bytes")
    except BaseException:
        os.unlink(local)
        raise
    if ledger is not None:
        ledger.opened(where.shown, sink.total)
        ledger.received(where.shown, sink.total)
        ledger.full_downloads.append(where.shown)
    return DownloadedFile(where.shown, local)


def fetch_text(where: Location, limit: int) -> tuple[bytes, Location]:
    """A small file whole (an index JSON): one request for at most `limit` + 1 bytes, more refused;
    and its location, pinned to the commit the answer names (`hf://`)."""
    answer = request(where, 0, limit, limit + 1)
    if answer.status not in (200, 206):
        raise refused(where, answer)
    if where.hub is not None and where.hub.commit is None and answer.commit:
        where.hub.commit = answer.commit
        where = where.pinned()
    if len(answer.body) > limit:
        raise CkptError(f"{where.shown}: larger than {limit >> 20} MiB; not a shard index")
    if answer.status == 200:
        declared = answer.headers.get("content-length")
        if declared is not None and declared.isdigit() and int(declared) != len(answer.body):
            raise CkptError(f"{where.shown}: the answer ended after {len(answer.body)} of {declared} bytes")
    ledger = _settings.get().ledger
    if ledger is not None:
        ledger.opened(where.shown, len(answer.body))
        ledger.received(where.shown, len(answer.body))
    return answer.body, where


def parse_json(where: Location, raw: bytes) -> object:
    try:
        return json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, ValueError) as e:
        raise CkptError(f"{where.shown}: not valid JSON ({str(e)[:100]})") from None
    except RecursionError:
        raise CkptError(f"{where.shown}: not valid JSON (nested too deeply)") from None


# ---- reading a remote checkpoint -------------------------------------------------------------

def read_remote(path: str, root: str | None) -> Checkpoint:
    """The checkpoint at a URL or `hf://` path: a safetensors file, or an index and its
    safetensors shards — headers only until tensors are written."""
    if root:
        raise CkptError(f"{path}: --root {root!r}: a remote input is a safetensors file or index, with nothing "
                        f"nested to choose; omit --root")
    if path.startswith("hf://"):
        hub, filename = parse_hf(path)
        token = hub_token()
        if filename is None:
            return _read_hub_weights(path, hub, token)
        where = Location(hub.url(filename), path, token, hub, filename)
    else:
        parts = urlsplit(path)
        if not parts.netloc:
            raise CkptError(f"{path}: not a URL (give https://HOST/PATH)")
        endpoint = urlsplit(os.environ.get("HF_ENDPOINT", DEFAULT_ENDPOINT)).netloc
        where = Location(path, _shown(path), hub_token() if parts.netloc == endpoint else None)
    return _read_file(where)


def _shown(url: str) -> str:
    """A URL as errors and reports show it: without its query (a signed URL's secrets)."""
    return url.split("?", 1)[0].split("#", 1)[0]


def _read_hub_weights(path: str, hub: HubRepo, token: str | None) -> Checkpoint:
    for name in HF_WEIGHTS:
        where = Location(hub.url(name), f"{path.rstrip('/')}/{name}", token, hub, name)
        try:
            return _read_file(where)
        except NotFound as e:
            if e.shown != where.shown:  # a shard of an index found, not the weights looked for
                raise
    raise CkptError(f"{path}: none of {', '.join(HF_WEIGHTS)} at revision {hub.revision}; name the file: "
                    f"hf://{hub.repo}/FILE")


def _read_file(where: Location) -> Checkpoint:
    if urlsplit(where.url).path.endswith(".json"):
        raw, where = fetch_text(where, INDEX_LIMIT)
        return _read_index(where, raw)
    source = open_remote(where)
    return _read_safetensors(source.where if isinstance(source, RemoteFile) else where, source)


def _read_safetensors(where: Location, source) -> Checkpoint:
    from .safetensors import read_safetensors

    head = source.head if isinstance(source, RemoteFile) else bytes(source.view(0, min(HEAD_BYTES, source.size)))
    if not (len(head) >= 9 and head[8:9] == b"{"):
        source.close()
        what = "a GGUF file" if head[:4] == b"GGUF" else "a torch file" if head[:2] == b"PK" else "not safetensors"
        raise CkptError(f"{where.shown}: {what}; remote inputs are safetensors files, their *.index.json and "
                        f"hf:// repositories: download other files first")
    try:
        ckpt = read_safetensors(where.shown, source)
    except BaseException:
        source.close()
        raise
    if isinstance(source, RemoteFile):  # tensor data from here on: small views may read ahead
        source.data_start = 8 + int.from_bytes(head[:8], "little")
    return ckpt


def _read_index(where: Location, raw: bytes) -> Checkpoint:
    """An index and its shards, whose headers are fetched at once (a few requests each, each a
    round trip: one after another they would add up over a hundred shards)."""
    from .sharded import from_index, parse_index, plain_name

    index = parse_index(where.shown, raw)
    names = list(dict.fromkeys(index["weight_map"].values()))
    for shard_name in names:
        if not plain_name(shard_name):
            raise CkptError(f"{where.shown}: shard {shard_name!r} is not a plain file name beside the index; "
                            f"fix its weight_map")
        if where.sibling(shard_name).url == where.url:
            raise CkptError(f"{where.shown}: shard {shard_name!r} is the index itself")
    context = copy_context()  # the ledger and --allow-full-download, in the threads too
    with ThreadPoolExecutor(max_workers=2 * IN_FLIGHT, thread_name_prefix="ckptsurgery-headers") as pool:
        opening = {name: pool.submit(context.copy().run, _open_shard, where.sibling(name)) for name in names}
    try:
        return from_index(where.shown, index, lambda name: opening[name].result())
    except BaseException:
        for future in opening.values():
            if future.exception() is None:
                future.result().close()
        raise


def _open_shard(where: Location) -> Checkpoint:
    return _read_safetensors(where, open_remote(where))
