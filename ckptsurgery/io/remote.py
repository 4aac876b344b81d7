"""Inputs that are not on this disk: `https://…` (or `http://…`) URLs of a `.safetensors` file or
of a `*.safetensors.index.json`, and `hf://ORG/REPO[@REV][/FILE]` on the Hugging Face Hub.

Nothing is downloaded whole. A file is opened by one Range request for its first `HEAD_BYTES`
(the format's magic, the safetensors header length, and the total size from `Content-Range`),
its header by one more when it is longer; tensors are fetched as the byte ranges the writer
copies (the writer joins adjacent tensors into one range), in pieces of `PIECE` bytes with
`IN_FLIGHT` of them in flight. Every answer is checked against the first: the same total size,
ETag and date, and for `hf://` the same commit (the revision is pinned to the commit the first
answer names, so a branch that moves mid-run is read as it was). The HTTP itself, and what it
refuses of a server, is io/http.py's.

Refused with one line (exit 1), nothing written: 404, 401/403 (with how to log in), a server that
ignores Range (it would send the whole file; `--allow-full-download` lets it, into a temporary
file), a short or changed answer, and a connection that keeps failing (`RETRIES` more tries,
then the last error). Redirects are followed with the Range kept (the Hub answers `resolve` with
a redirect to its CDN); a token is sent only to the host it belongs to, never across a redirect
to another host, and an https URL is never redirected to http.

The token for `hf://`: `HF_TOKEN`, else huggingface_hub's stored login (`hf auth login`) when
huggingface_hub is installed. The endpoint: `HF_ENDPOINT` (default https://huggingface.co)."""

from __future__ import annotations

import bisect
import os
import posixpath
import re
import tempfile
import threading
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from contextvars import ContextVar, copy_context
from dataclasses import dataclass, field
from typing import Iterator
from urllib.parse import quote, unquote, urljoin, urlsplit

from ..errors import CkptError
from .http import Answer, Location, NotFound, Sink, content_range, origin_of, refused, request, shown
from .model import Checkpoint, MappedFile, RangeSource

HEAD_BYTES = 512  # the first request: as much as format detection reads of a local file
PIECE = 8 << 20  # bytes of one range request when a long range is streamed (4 in flight: ~32 MB held)
IN_FLIGHT = 4  # range requests in flight while a long range is streamed
READ_AHEAD = 256 << 10  # a view of fewer bytes fetches this many from its start, for the views after it
INDEX_LIMIT = 16 << 20  # as io/sharded.py: far above any real index
DEFAULT_ENDPOINT = "https://huggingface.co"
# hf://ORG/REPO with no file: these are looked for in this order, as transformers and diffusers do
HF_WEIGHTS = ("model.safetensors.index.json", "model.safetensors",
              "diffusion_pytorch_model.safetensors.index.json", "diffusion_pytorch_model.safetensors")
_REPO_PART = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,95}")  # the Hub's names of users, orgs and repositories
_REPO_TYPES = ("datasets", "spaces")  # hf://datasets/ORG/REPO/..., as huggingface_hub's HfFileSystem

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

def sibling(where: Location, name: str) -> Location:
    """A file beside `where` (a shard beside its index); `name` is a plain file name."""
    shown_as = where.shown.rsplit("/", 1)[0] + "/" + name
    if where.hub is not None:
        filename = posixpath.join(posixpath.dirname(where.filename or ""), name)
        return Location(where.hub.url(filename), shown_as, where.token, where.origin, where.hub, filename)
    return Location(urljoin(where.url, quote(name)), shown_as, where.token, where.origin)


def pinned(where: Location) -> Location:
    """The same file at the commit its repository is pinned to."""
    if where.hub is None or where.filename is None:
        return where
    return Location(where.hub.url(where.filename), where.shown, where.token, where.origin, where.hub, where.filename)


def pinned_by(where: Location, answer: Answer) -> Location:
    """`where`, its repository pinned to the commit `answer` names when none is pinned yet (the
    first answer of an `hf://` run): every later URL names that commit."""
    if where.hub is not None and where.hub.commit is None and answer.commit:
        where.hub.commit = answer.commit
        return pinned(where)
    return where


@dataclass
class HubRepo:
    """An `hf://` repository at one revision; `commit` is pinned by the first answer that names it."""

    endpoint: str
    repo: str  # ORG/REPO, or datasets/ORG/REPO
    revision: str
    commit: str | None = None

    def url(self, filename: str) -> str:
        revision = self.commit or self.revision
        return f"{self.endpoint}/{self.repo}/resolve/{quote(revision, safe='')}/{quote(filename)}"

    def location(self, filename: str, token: str | None) -> Location:
        """One of its files, shown as hf://REPO/FILE, the token sent to the Hub's host alone."""
        return Location(self.url(filename), f"hf://{self.repo}/{filename}", token, origin_of(self.endpoint), self,
                        filename)


def endpoint() -> str:
    """HF_ENDPOINT (default https://huggingface.co), checked to be an http(s) URL."""
    value = os.environ.get("HF_ENDPOINT", DEFAULT_ENDPOINT).rstrip("/")
    parts = urlsplit(value)
    if parts.scheme not in ("http", "https") or not parts.netloc:
        raise CkptError(f"HF_ENDPOINT {value[:60]!r} is not an http(s) URL: give https://HOST")
    return value


def parse_hf(path: str) -> tuple[HubRepo, str | None]:
    """`hf://[datasets/|spaces/]ORG/REPO[@REV][/FILE]` into the repository and the file (None: find
    the weights). A revision with a slash is given encoded (`@refs%2Fpr%2F1`), or as `@refs/pr/N`."""
    parts = path[len("hf://"):].split("/")
    kind = parts.pop(0) + "/" if parts and parts[0] in _REPO_TYPES else ""
    if len(parts) < 2:
        raise CkptError(f"{path}: give hf://ORG/REPO[@REVISION][/FILE]")
    name, at, revision = parts[1].partition("@")
    rest = parts[2:]
    if revision == "refs" and len(rest) >= 2 and rest[0] == "pr" and rest[1].isdigit():
        revision, rest = f"refs/pr/{rest[1]}", rest[2:]  # a pull request's ref, as huggingface_hub writes it
    revision = unquote(revision)
    if not (_REPO_PART.fullmatch(parts[0]) and _REPO_PART.fullmatch(name)) or ".." in parts[0] + name:
        raise CkptError(f"{path}: {parts[0]}/{name} is not a repository name (letters, digits, '-', '_', '.')")
    if at and (not revision or not revision.isprintable() or revision != revision.strip()):
        raise CkptError(f"{path}: an empty or blank revision after @")
    filename = "/".join(rest) or None
    if filename is not None and (any(p in ("", ".", "..") for p in rest) or not filename.isprintable()):
        raise CkptError(f"{path}: {filename!r} is not a file path inside the repository")
    return HubRepo(endpoint(), f"{kind}{parts[0]}/{name}", revision or "main"), filename


def hub_token() -> str | None:
    """HF_TOKEN, else huggingface_hub's stored login when it is installed; stripped as
    huggingface_hub strips it, and refused (never shown) when it is not one line of text."""
    token = os.environ.get("HF_TOKEN")
    if not token:
        try:
            from huggingface_hub import get_token
        except ImportError:
            return None
        try:
            token = get_token()
        except Exception:  # a stored login it cannot read is no login
            return None
    token = (token or "").strip()
    if not token:
        return None
    if not all(33 <= ord(c) < 127 for c in token):
        raise CkptError("the Hugging Face token (HF_TOKEN, or the stored login) holds spaces or characters that "
                        "cannot be sent in a header; set it again")
    return token


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

    def __init__(self, where: Location, first: Answer, asked: str, ledger: FetchLedger | None):
        self.where, self.path, self.ledger = where, where.shown, ledger
        found = content_range(first.headers)
        if first.status != 206 or found is None or found[0] != 0:
            raise CkptError(f"{self.path}: the server's answer to a range request has no valid Content-Range")
        self.size = found[2]
        self.etag, self.modified = first.headers.get("etag"), first.headers.get("last-modified")
        self.head = first.body
        if len(self.head) != min(HEAD_BYTES, self.size):
            raise CkptError(f"{self.path}: the server sent {len(self.head)} bytes for the first "
                            f"{min(HEAD_BYTES, self.size)}")
        self._direct = self._at(first.url, asked)
        self.data_start = self.size  # where tensor data starts (set once the header is read): no read-ahead before
        self.ends: list[int] = []  # where its tensors end, in order (set with data_start): a window stops at one
        self._window: tuple[int, bytes | bytearray] = (0, b"")
        self._window_lock = threading.Lock()
        self.failed = threading.Event()  # a fetch failed: the others stop retrying
        if ledger is not None:
            ledger.opened(self.path, self.size)
            ledger.received(self.path, len(first.body))

    def _at(self, url: str, asked: str) -> Location | None:
        """Where to ask next: the URL an answer came from when a redirect led there (the token only
        to its own scheme and host); None when no redirect did (ask the file's own, pinned, URL)."""
        if not url or url in (asked, self.where.url):
            return None
        carry = self.where.may_carry_token(url)
        return Location(url, self.path, self.where.token if carry else None, self.where.origin)

    def fetch(self, offset: int, nbytes: int) -> bytes | bytearray:
        """Bytes [offset, offset + nbytes), by one range request, checked against the file as first seen.
        Asked where the last answer came from (the Hub's CDN, past its redirect), and again at the
        file's own URL when that fails (a signed CDN URL expires)."""
        if nbytes <= 0:
            return b""
        last = offset + nbytes - 1
        direct = self._direct
        try:
            answer = request(direct, offset, last, 0, cancelled=self.failed) if direct is not None else None
            if answer is None or answer.status != 206:
                answer = request(self.where, offset, last, 0, cancelled=self.failed)
                if answer.status == 206:
                    self._direct = self._at(answer.url, self.where.url)
        except CkptError:
            self.failed.set()
            raise
        if answer.status != 206:
            self.failed.set()
            raise refused(self.where, answer) if answer.status != 200 else CkptError(
                f"{self.path}: the server stopped answering range requests")
        found = content_range(answer.headers)
        if (found is None or found[2] != self.size or answer.headers.get("etag") != self.etag
                or answer.headers.get("last-modified") != self.modified
                or self.where.hub is not None and answer.commit not in (None, self.where.hub.commit)):
            self.failed.set()
            raise CkptError(f"{self.path}: the file changed while being read (its size, ETag, date or commit "
                            f"differs from the first answer's); run again")
        if found[0] != offset or len(answer.body) != nbytes:
            self.failed.set()
            raise CkptError(f"{self.path}: the server sent bytes {found[0]}-{found[1]} for {offset}-{last}")
        if self.ledger is not None:
            self.ledger.received(self.path, nbytes)
        return answer.body

    def view(self, offset: int, nbytes: int) -> memoryview:
        if offset < 0 or nbytes < 0 or offset + nbytes > self.size:
            raise CkptError(f"{self.path}: data at {offset}+{nbytes} lies past the end of the file")
        if nbytes == 0:
            return memoryview(b"")
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
        served from the last window fetched when it holds them, else from a new window of up to
        READ_AHEAD bytes from `offset` — one request for a run of small tensors, not one each —
        ending where a tensor ends (`ends`): never the first bytes of a larger one after them,
        which is fetched again when it is read."""
        with self._window_lock:
            start, window = self._window
            if start <= offset and offset + nbytes <= start + len(window):
                return memoryview(window)[offset - start : offset - start + nbytes]
        end = min(offset + READ_AHEAD, self.size)
        last = bisect.bisect_right(self.ends, end) - 1  # the last tensor the window holds whole
        if last >= 0 and self.ends[last] >= offset + nbytes:
            end = self.ends[last]
        window = self.fetch(offset, end - offset)
        with self._window_lock:
            self._window = (offset, window)
        return memoryview(window)[:nbytes]

    def stream(self, offset: int, nbytes: int) -> Iterator[memoryview]:
        """[offset, offset + nbytes) in pieces of at most PIECE bytes, in order, IN_FLIGHT fetched at
        once; a failed piece stops the others' retries (`failed`)."""
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
        except BaseException:
            self.failed.set()
            raise
        finally:
            for future in pending:
                future.cancel()


class DownloadedFile(MappedFile):
    """A remote file whose server ignores Range, downloaded whole into a temporary file
    (`--allow-full-download`); removed when closed."""

    def __init__(self, shown_as: str, local: str):
        super().__init__(local)
        self.path = shown_as  # what errors name; the map is of `self.local`

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
    asked = where.url
    answer = request(where, 0, HEAD_BYTES - 1, 0)
    if answer.status in (200, 206):
        where = pinned_by(where, answer)
    if answer.status == 200:
        if not settings.allow_full_download:
            raise CkptError(f"{where.shown}: the server ignores range requests and would send the whole file; "
                            f"download it first, or pass --allow-full-download")
        return _download(where, settings.ledger)
    if answer.status != 206:
        raise refused(where, answer)
    return RemoteFile(where, answer, asked, settings.ledger)


def _download(where: Location, ledger: FetchLedger | None) -> DownloadedFile:
    """The whole file (a GET without Range: a 200 is all that is taken), into a temporary file
    removed when the DownloadedFile is closed; it must arrive at the rate every answer must."""
    fd, local = tempfile.mkstemp(prefix="ckptsurgery-download-")
    try:
        with os.fdopen(fd, "wb") as out:
            sink = Sink(out)
            answer = request(where, None, None, 0, sink=sink)
            if answer.status != 200:
                raise refused(where, answer)
    except BaseException:
        os.unlink(local)
        raise
    if ledger is not None:
        ledger.opened(where.shown, sink.total)
        ledger.received(where.shown, sink.total)
        ledger.full_downloads.append(where.shown)
    return DownloadedFile(where.shown, local)


def fetch_text(where: Location, limit: int, what: str = "a shard index") -> tuple[bytes, Location]:
    """A small file whole (an index JSON): one request for at most `limit` + 1 bytes, more refused;
    and its location, pinned to the commit the answer names (`hf://`)."""
    answer = request(where, 0, limit, limit + 1)
    if answer.status not in (200, 206):
        raise refused(where, answer)
    where = pinned_by(where, answer)
    if len(answer.body) > limit:
        raise CkptError(f"{where.shown}: larger than {limit >> 20} MiB; not {what}")
    ledger = _settings.get().ledger
    if ledger is not None:
        ledger.opened(where.shown, len(answer.body))
        ledger.received(where.shown, len(answer.body))
    return bytes(answer.body), where


def config_beside(path: str, limit: int, commit: str | None = None) -> tuple[str, bytes | None]:
    """The `config.json` beside a remote input (a repository's at its root, or beside the file it
    names; beside a URL's file), as it is shown and its bytes — None when there is none (404).
    `commit`: the one the input's weights were read at (`commit_of`), for `hf://`."""
    if path.startswith("hf://"):
        hub, filename = parse_hf(path)
        hub.commit = commit
        where = hub.location(posixpath.join(posixpath.dirname(filename or ""), "config.json"), hub_token())
    else:
        where = sibling(Location(path, shown(path)), "config.json")
    try:
        raw, _ = fetch_text(where, limit)
    except NotFound:
        return where.shown, None
    return where.shown, raw


def commit_of(ckpt: Checkpoint) -> str | None:
    """The commit an `hf://` checkpoint's tensors were read at (None: not read from the Hub)."""
    # its files first: once dequantized, every tensor may be computed, none on a RemoteFile
    tensors = (getattr(t.storage, "source", None) for t in ckpt.tensors.values())
    for source in (*ckpt.sources, *tensors):
        if isinstance(source, RemoteFile) and source.where.hub is not None and source.where.hub.commit:
            return source.where.hub.commit
    return None


def repository_files(path: str, names: list[str], limit: int, commit: str | None) -> dict[str, bytes]:
    """The small files `names` (config.json, the tokenizer's) of the repository `path` names that it
    holds, fetched at once — at `commit` when given (the commit its weights were read at), else at
    the commit the first answer names; a name it lacks (404) is left out."""
    hub, _ = parse_hf(path)
    hub.commit = commit
    token = hub_token()

    def fetch(name: str) -> bytes | None:
        try:
            return fetch_text(hub.location(name, token), limit, f"a model's {name}")[0]
        except NotFound:
            return None

    found, names = {}, list(names)
    while names and hub.commit is None:  # one at a time until an answer pins the commit the others are
        name = names.pop(0)  # fetched at (a name the repository lacks answers 404, which may pin none)
        found[name] = fetch(name)
    context = copy_context()  # the ledger, in the threads too
    found.update(zip(names, _fetch_pool().map(lambda name: context.copy().run(fetch, name), names)))
    return {name: raw for name, raw in found.items() if raw is not None}


# ---- reading a remote checkpoint -------------------------------------------------------------

def read_remote(path: str, root: str | None) -> Checkpoint:
    """The checkpoint at a URL or `hf://` path: a safetensors file, or an index and its
    safetensors shards — headers only until tensors are written."""
    if root:
        raise CkptError(f"{path}: --root {root!r}: a remote input is a safetensors file or index, with nothing "
                        f"nested to choose; omit --root")
    if path.startswith("hf://"):
        hub, filename = parse_hf(path)
        token, origin = hub_token(), origin_of(hub.endpoint)
        if filename is None:
            return _read_hub_weights(path, hub, token, origin)
        return _read_file(Location(hub.url(filename), path, token, origin, hub, filename))
    try:
        parts = urlsplit(path)
        path.encode("ascii")
    except (ValueError, UnicodeError):
        raise CkptError(f"{shown(path)}: not a URL ckptsurgery can request (give https://HOST/PATH, its "
                        f"non-ASCII characters percent-encoded)") from None
    if not parts.hostname:
        raise CkptError(f"{shown(path)}: not a URL (give https://HOST/PATH)")
    hub_origin = origin_of(endpoint())  # a URL of the Hub's own scheme and host takes its token
    token = hub_token() if (parts.scheme, parts.netloc.lower()) == hub_origin else None
    return _read_file(Location(path, shown(path), token, hub_origin if token else None))


def _read_hub_weights(path: str, hub: HubRepo, token: str | None, origin: tuple[str, str]) -> Checkpoint:
    for name in HF_WEIGHTS:
        where = Location(hub.url(name), f"{path.rstrip('/')}/{name}", token, origin, hub, name)
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
    if isinstance(source, RemoteFile):  # tensor data from here on: small views may read ahead, to a tensor's end
        source.ends = sorted({t.storage.offset + t.storage.nbytes for t in ckpt.tensors.values()})
        source.data_start = 8 + int.from_bytes(head[:8], "little")
    return ckpt


def _read_index(where: Location, raw: bytes) -> Checkpoint:
    """An index and its shards, whose headers are fetched at once (a few requests each, each a
    round trip: one after another they would add up over a hundred shards). The first failure
    stops the rest: shards not yet asked for are not, and what was opened is closed."""
    from .sharded import from_index, parse_index, plain_name

    index = parse_index(where.shown, raw)
    names = list(dict.fromkeys(index["weight_map"].values()))
    for shard_name in names:
        if not plain_name(shard_name) or not shard_name.isprintable() or not _encodable(shard_name):
            raise CkptError(f"{where.shown}: shard {shard_name[:60]!r} is not a plain file name beside the index; "
                            f"fix its weight_map")
        if sibling(where, shard_name).url == where.url:
            raise CkptError(f"{where.shown}: shard {shard_name!r} is the index itself")
    context = copy_context()  # the ledger and --allow-full-download, in the threads too
    pool = ThreadPoolExecutor(max_workers=2 * IN_FLIGHT, thread_name_prefix="ckptsurgery-headers")
    opening = {name: pool.submit(context.copy().run, _open_shard, sibling(where, name)) for name in names}
    try:
        return from_index(where.shown, index, lambda name: opening[name].result())
    except BaseException:
        pool.shutdown(wait=True, cancel_futures=True)  # those under way finish (each bounded), then are closed
        for future in opening.values():
            if not future.cancelled() and future.exception() is None:
                future.result().close()
        raise
    finally:
        pool.shutdown(wait=False)


def _encodable(name: str) -> bool:
    try:
        name.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _open_shard(where: Location) -> Checkpoint:
    return _read_safetensors(where, open_remote(where))
