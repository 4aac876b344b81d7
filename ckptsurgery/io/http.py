"""HTTP for remote inputs (io/remote.py): one GET of a byte range, redirects followed, failures
retried, every answer held to what was asked before its body is read.

What a server (or whatever stands between us and it) says is checked, not trusted:
- a 206 must name, in `Content-Range`, exactly the bytes asked for (or, asked past the end, fewer
  from the same start); its body is read into a buffer of that size, never of a size it claims;
- a 200 body is read to at most `limit` bytes (a whole download streams into a file instead);
- a redirect's target must be http(s), an https URL never leads to http, and the token goes only
  to the scheme and host it belongs to (`Location.origin`), never across a redirect to a CDN;
- time is bounded: each socket read by the timeout (`CKPTSURGERY_HTTP_TIMEOUT`, 30 s), the status
  and headers of an answer by twice that, and a body must arrive at `MIN_RATE` or faster (after the
  timeout's grace) — a server that drips a byte a second fails, it does not hold the command;
- a connection whose answer was not read to its end is not used again.

A failed connection, a short body, a 5xx or 429 answer is tried `RETRIES` more times (after 0.2,
0.4, 0.8 s), unless the caller has given up (`cancelled`), then refused in one line."""

from __future__ import annotations

import functools
import http.client
import os
import re
import socket
import ssl
import threading
import time
from dataclasses import dataclass
from urllib.parse import urljoin, urlsplit

from ..errors import CkptError

RETRIES = 3  # more tries after a failed connection or a 5xx/429 answer
MAX_REDIRECTS = 5
MIN_RATE = 64 << 10  # bytes/s a body must keep up, after the timeout's grace
SMALL_BODY = 64 << 10  # what is read of a redirect's or an error's body
PIECE = 8 << 20  # what a whole download reads at once

_CONTENT_RANGE = re.compile(r"bytes (\d{1,19})-(\d{1,19})/(\d{1,19})")
_REDIRECTS = {301, 302, 303, 307, 308}


def content_range(headers: dict[str, str]) -> tuple[int, int, int] | None:
    """(first, last, total) of a `Content-Range: bytes first-last/total`, or None."""
    match = _CONTENT_RANGE.fullmatch(headers.get("content-range", "").strip())
    return None if match is None else (int(match.group(1)), int(match.group(2)), int(match.group(3)))


@dataclass(frozen=True)
class Location:
    """Where a remote file is: its URL, the name errors show (no query: a signed URL's secret),
    the token and the (scheme, host) it may be sent to, and for `hf://` its repository and path."""

    url: str
    shown: str
    token: str | None = None
    origin: tuple[str, str] | None = None  # (scheme, netloc) the token belongs to
    hub: object = None  # remote.HubRepo
    filename: str | None = None

    def may_carry_token(self, url: str) -> bool:
        parts = urlsplit(url)
        return self.token is not None and (parts.scheme, parts.netloc.lower()) == self.origin


def origin_of(url: str) -> tuple[str, str]:
    parts = urlsplit(url)
    return parts.scheme, parts.netloc.lower()


def shown(url: str) -> str:
    """A URL as errors and reports show it: without its query and fragment."""
    return url.split("?", 1)[0].split("#", 1)[0]


@dataclass
class Answer:
    status: int
    headers: dict[str, str]  # lower-case names, the last hop's
    body: bytes | bytearray
    commit: str | None  # X-Repo-Commit, from any hop (the Hub puts it on its redirect)
    url: str = ""  # where the bytes came from, after redirects


class NotFound(CkptError):
    """A 404: `shown` names what was not found."""

    def __init__(self, where: str):
        super().__init__(f"{where}: not found (404)")
        self.shown = where


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


class Sink:
    """A whole download's body, written to a file as it arrives."""

    def __init__(self, out):
        self.out, self.total = out, 0

    def write(self, piece) -> None:
        self.out.write(piece)
        self.total += len(piece)


# ---- connections ---------------------------------------------------------------------------------

class _Connections(threading.local):
    def __init__(self):
        self.open: dict[tuple[str, str], http.client.HTTPConnection] = {}


_connections = _Connections()


def timeout() -> float:
    try:
        return max(0.05, float(os.environ.get("CKPTSURGERY_HTTP_TIMEOUT", "30")))
    except ValueError:
        return 30.0


def _connection(scheme: str, netloc: str) -> http.client.HTTPConnection:
    conn = _connections.open.get((scheme, netloc))
    if conn is None:
        if scheme == "https":
            conn = http.client.HTTPSConnection(netloc, timeout=timeout(), context=ssl.create_default_context())
        else:
            conn = http.client.HTTPConnection(netloc, timeout=timeout())
        _connections.open[(scheme, netloc)] = conn
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


class _Expired(TimeoutError):
    pass


class _Watchdog:
    """Shuts a connection's socket when an answer's status and headers, or a range's body, take
    longer than `seconds` (a server that sends a header line, or a byte, every few seconds never
    trips the socket's own timeout)."""

    def __init__(self, conn: http.client.HTTPConnection, seconds: float):
        self.conn, self.fired = conn, False
        self.timer = threading.Timer(seconds, self._fire)
        self.timer.daemon = True

    def _fire(self) -> None:
        self.fired = True
        sock = self.conn.sock
        if sock is not None:
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass

    def __enter__(self) -> "_Watchdog":
        self.timer.start()
        return self

    def __exit__(self, kind, error, trace) -> None:
        self.timer.cancel()
        if self.fired and error is not None and not isinstance(error, CkptError):
            raise _Expired() from None


# ---- one request ---------------------------------------------------------------------------------

def request(where: Location, start: int, end: int | None, limit: int, sink: Sink | None = None,
            cancelled: threading.Event | None = None) -> Answer:
    """GET `where` for bytes [start, end] (end None: to the end; start None: no Range, the whole
    file into `sink`), following redirects, retrying a failed connection or a 5xx/429 answer. A 200
    answer's body is read to at most `limit` bytes; a 206's must be the range asked for."""
    delay = 0.2
    for attempt in range(RETRIES + 1):
        try:
            answer = _follow(where, start, end, limit, sink)
        except (OSError, http.client.HTTPException) as e:
            if attempt == RETRIES or sink is not None and sink.total or cancelled is not None and cancelled.is_set():
                raise CkptError(f"{where.shown}: {_describe(e)} (after {attempt + 1} "
                                f"{'try' if attempt == 0 else 'tries'})") from None
        except (ValueError, UnicodeError) as e:  # a URL http.client cannot send (a bad host, non-ASCII)
            raise CkptError(f"{where.shown}: not a URL that can be requested ({str(e)[:80]})") from None
        else:
            if answer.status != 429 and answer.status < 500 or attempt == RETRIES:
                return answer
        if cancelled is not None and cancelled.wait(delay):
            raise CkptError(f"{where.shown}: given up (another request of this run failed)")
        if cancelled is None:
            time.sleep(delay)
        delay *= 2
    raise AssertionError("unreachable")


def _describe(e: BaseException) -> str:
    if isinstance(e, _Expired):
        return "timed out (the answer did not arrive within its deadline)"
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
    return f"connection failed ({type(e).__name__}: {str(e)[:80]})"


def _follow(where: Location, start: int | None, end: int | None, limit: int, sink: Sink | None) -> Answer:
    url, commit = where.url, None
    headers = {"Accept-Encoding": "identity", "User-Agent": _user_agent()}
    if start is not None:
        headers["Range"] = f"bytes={start}-{'' if end is None else end}"
    for _ in range(MAX_REDIRECTS + 1):
        parts = urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.netloc:
            raise CkptError(f"{where.shown}: redirected to {shown(url)[:100]!r}, not an http(s) URL")
        sent = dict(headers)
        if where.may_carry_token(url):  # only to its own scheme and host: never to a CDN, never over http
            sent["Authorization"] = f"Bearer {where.token}"
        conn = _connection(parts.scheme, parts.netloc)
        try:
            with _Watchdog(conn, 2 * timeout()):
                conn.request("GET", (parts.path or "/") + (f"?{parts.query}" if parts.query else ""), headers=sent)
                response = conn.getresponse()
            got = {k.lower(): v for k, v in response.getheaders()}
            commit = got.get("x-repo-commit", commit)
            if response.status in _REDIRECTS and "location" in got:
                _read_small(response)
                _done_with(response, parts)
                target = urljoin(url, got["location"])
                if parts.scheme == "https" and urlsplit(target).scheme != "https":
                    raise CkptError(f"{where.shown}: redirected from https to {shown(target)[:100]}; refused")
                url = target
                continue
            body = _read_body(where, conn, response, got, (start, end), limit, sink)
            _done_with(response, parts)
            return Answer(response.status, got, body, commit, url)
        except BaseException:
            _drop_connection(parts.scheme, parts.netloc)
            raise
    raise CkptError(f"{where.shown}: more than {MAX_REDIRECTS} redirects")


def _done_with(response, parts) -> None:
    """The connection is used again only when its answer was read to its end (a body read by
    `read1` to its last byte is not closed by http.client: closed here, so the next request may go)."""
    if response.will_close or response.length or response.chunked and not response.isclosed():
        _drop_connection(parts.scheme, parts.netloc)
    else:
        response.close()


def _read_small(response) -> bytes:
    return _read_upto(response, SMALL_BODY)


def _read_body(where: Location, conn, response, headers: dict[str, str], asked: tuple[int | None, int | None],
               limit: int, sink: Sink | None) -> bytes | bytearray:
    start, end = asked
    if response.status == 206 and start is not None:
        found = content_range(headers)
        if found is None:
            raise CkptError(f"{where.shown}: the server's answer to a range request has no valid Content-Range")
        first, last, total = found
        asked_last = last if end is None else end
        if (first != start or last < first or last > asked_last or last >= total
                or last < asked_last and last != total - 1):  # fewer bytes than asked, and not for the end
            raise CkptError(f"{where.shown}: the server sent bytes {first}-{last} of {total} for {start}-"
                            f"{'' if end is None else end}")
        if end is None and last - first + 1 > limit:
            raise CkptError(f"{where.shown}: larger than {limit:,} bytes; refused")
        want = last - first + 1
        return _read_range(conn, response, want)
    if response.status == 200 and sink is not None:
        if not (headers.get("content-length") or "").isdigit():  # an endless body would fill the disk
            raise CkptError(f"{where.shown}: the server sends the file without saying its length; refused")
        began, got = time.monotonic(), 0
        while piece := response.read1(PIECE):  # what one system call brings: the rate is checked as it comes
            sink.write(piece)
            got += len(piece)
            _keep_up(began, got)
        declared = headers.get("content-length")
        if declared is not None and declared.isdigit() and int(declared) != got:
            raise http.client.IncompleteRead(b"", int(declared) - got)
        return b""
    if response.status == 200:
        return _read_upto(response, limit)
    return _read_small(response)  # an error page: never more than a little


def _read_range(conn, response, want: int) -> bytearray:
    """A 206's `want` bytes, read into place (no second copy of an 8 MiB piece); a body that does
    not arrive within the timeout plus `want` at MIN_RATE is cut off by the watchdog."""
    body = bytearray(want)
    view, got = memoryview(body), 0
    with _Watchdog(conn, 2 * timeout() + want / MIN_RATE):
        while got < want:
            n = response.readinto(view[got:])
            if not n:
                raise http.client.IncompleteRead(bytes(view[:got]), want - got)
            got += n
    return body


def _read_upto(response, limit: int) -> bytearray:
    """At most `limit` bytes of a body (an index, an error page), read as they come: one system
    call at a time, so that a body that arrives slower than MIN_RATE is caught between them."""
    body, began = bytearray(), time.monotonic()
    while len(body) < limit:
        piece = response.read1(min(limit - len(body), 1 << 20))
        if not piece:
            break
        body += piece
        _keep_up(began, len(body))
    return body


def _keep_up(began: float, got: int) -> None:
    if time.monotonic() - began > timeout() + got / MIN_RATE:
        raise socket.timeout("the answer arrives too slowly")
