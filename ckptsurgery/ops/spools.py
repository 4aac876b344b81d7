"""A remote tensor read twice, fetched once: what merge (its methods' measure pass, then the
chunks), a DoRA fold (the norms, then the rows), diff (a hash, then the values) and inspect
(`--stats`, then `--hash`) share.

A tensor whose bytes are fetched by range requests (io/remote.py) is kept between the reads: in
memory when it is small (`IN_MEMORY`), else streamed once into a temporary file with no name
(removed from its folder as it is made, on POSIX), mapped, so its pages are the page cache's and
not this process's memory — in the output's folder when there is one (a /tmp in memory would
hold what the file is there to keep out of it), else tempfile's. Each is closed once its reads
are done (`Spools.release`), and every one still open when the command ends, fails or is
interrupted (`Spools.close`, the command's ExitStack). A tensor of a local file is never kept:
it is read twice where it lies (`Spools.hold` hands it back as it is)."""

from __future__ import annotations

import os
import threading

from ..errors import CkptError
from ..io import TensorRef
from ..io.model import JoinedSource, RangeSource, Storage, mapped_range

IN_MEMORY = 1 << 20  # a remote tensor read more than once of at most this many bytes is kept in memory


def output_folder(output: str) -> str:
    """The folder an output (a file, or a folder output) is staged in: where its command's
    spools go."""
    return os.path.dirname(os.path.abspath(output))


def fetched_by_range(source) -> bool:
    """Whether reading `source` fetches its bytes over the network (a remote file, or a joined
    tensor with a piece on one)."""
    if isinstance(source, JoinedSource):
        return any(fetched_by_range(piece) for piece, _, _ in source.pieces)
    return isinstance(source, RangeSource)


def remote_range(t: TensorRef):
    """(source, byte offset) of a tensor whose bytes lie in order on a source fetched by range
    requests; None for any other (a local file's, a computed one)."""
    in_order = mapped_range(t)
    return in_order if in_order is not None and fetched_by_range(in_order[0]) else None


class Spool:
    """A tensor's bytes in a temporary file with no name, mapped."""

    def __init__(self, file, nbytes: int, offset: int = 0, owns: bool = True):
        import mmap

        self.file, self.owns = file, owns  # owns: closed with it (else the Spools' shared file)
        self.map = mmap.mmap(file.fileno(), nbytes, access=mmap.ACCESS_READ, offset=offset)

    def view(self, offset: int, nbytes: int) -> memoryview:
        return memoryview(self.map)[offset:offset + nbytes]

    def close(self) -> None:
        try:
            self.map.close()
        except BufferError:  # a view still alive: unmapped when it goes (the file has no name to leave)
            pass
        if self.owns:
            self.file.close()


class InMemory:
    """A small tensor's bytes, kept: viewed as a spool is."""

    def __init__(self, data):
        self.data = memoryview(data)

    def view(self, offset: int, nbytes: int) -> memoryview:
        return self.data[offset:offset + nbytes]


class Spools:
    """The temporary files a command streams its remote tensors into when it reads them more than
    once: in `folder`, else tempfile's. Each is closed once its tensor's reads are done
    (`release`), and all that are left when the command ends (`close`, as a context manager):
    failed or interrupted. `shared`: every tensor in one temporary file, small ones too (a
    command that keeps many tensors at once: memory flat, one file however many); the space of
    those released last is used again, the file's disk freed when the Spools close."""

    def __init__(self, folder: str | None = None, shared: bool = False):
        self.folder, self.shared = folder, shared
        self._open: set[Spool] = set()
        self._lock = threading.Lock()
        self._file, self._folder, self._end = None, None, 0  # `shared`: the file, its folder, where the next goes
        self._tail: list[tuple[Spool, int]] = []  # `shared`: its spools in the file's order, and where each starts

    def __enter__(self) -> Spools:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def keep(self, source, first: int, nbytes: int) -> InMemory | Spool:
        """Bytes [first, first + nbytes) of `source`, fetched once, to `view`: in memory when at
        most IN_MEMORY bytes, else in a new spool (`spool`)."""
        if nbytes == 0 or nbytes <= IN_MEMORY and not self.shared:
            return InMemory(bytes(source.view(first, nbytes)))
        return self.spool(source, first, nbytes)

    def spool(self, source, first: int, nbytes: int) -> Spool:
        """Bytes [first, first + nbytes) of `source`, fetched once (streamed in pieces) into a new spool."""
        if self.shared:
            return self._appended(source, first, nbytes)
        file, folder = self._made()
        disk = _disk(folder, nbytes)
        try:
            _write_into(file, disk, source, first, nbytes)
            spool = disk(Spool, file, nbytes)
        except BaseException:
            file.close()
            raise
        with self._lock:
            self._open.add(spool)
        return spool

    def _appended(self, source, first: int, nbytes: int) -> Spool:
        """`spool` into the one shared file: appended at a page boundary, mapped there."""
        import mmap

        with self._lock:
            if self._file is None:
                self._file, self._folder = self._made()
            disk = _disk(self._folder, nbytes)
            disk(self._file.seek, self._end)
            _write_into(self._file, disk, source, first, nbytes)
            spool = disk(Spool, self._file, nbytes, self._end, False)
            page = mmap.ALLOCATIONGRANULARITY
            self._tail.append((spool, self._end))
            self._end = -(-(self._end + nbytes) // page) * page
            self._open.add(spool)
        return spool

    def _made(self):
        try:
            return _temporary_file(self.folder)
        except OSError as e:
            raise CkptError(f"cannot make a temporary file for a remote tensor read twice: {e.strerror or e}; "
                            f"set TMPDIR to a writable folder") from None

    def hold(self, t: TensorRef) -> TensorRef:
        """`t` itself when reading it twice costs nothing more (a local file's, a computed one);
        else the same tensor on its bytes fetched once (`keep`), whose reads view them as a mapped
        file's (`io.model.mapped_range`): `release` it once read."""
        in_order = remote_range(t)
        if in_order is None:
            return t
        return _on(self.keep(*in_order, t.nbytes), t)

    def later(self, t: TensorRef) -> TensorRef:
        """As `hold`, but fetched only at its first read (a tensor a writer computes from when it
        is written): `t` itself when reading it twice costs nothing more. `release` it once read;
        a read after that fetches it again."""
        in_order = remote_range(t)
        if in_order is None:
            return t
        return _on(_Later(self, *in_order, t.nbytes), t)

    def release(self, kept) -> None:
        """Close what `keep`, `spool`, `hold` or `later` made (in memory, or a tensor not held:
        nothing to close)."""
        if isinstance(kept, TensorRef):
            pieces = kept.storage.source.pieces if isinstance(kept.storage.source, JoinedSource) else []
            kept = next((piece for piece, _, _ in pieces if isinstance(piece, (Spool, _Later))), None)
            if isinstance(kept, _Later):
                kept.release()
                return
        if not isinstance(kept, Spool):
            return
        with self._lock:
            self._open.discard(kept)
            while self._tail and self._tail[-1][0] not in self._open:  # the file's end is free again
                self._end = self._tail.pop()[1]
        kept.close()

    def close(self) -> None:
        with self._lock:
            spools, self._open = list(self._open), set()
            shared, self._file, self._end, self._tail = self._file, None, 0, []
        for spool in spools:
            spool.close()
        if shared is not None:
            shared.close()


def _disk(folder: str, nbytes: int):
    """step(*args) -> its result, a disk's failure said as such in one line (the network's are
    io/remote's)."""
    def disk(step, *args):
        try:
            return step(*args)
        except OSError as e:
            raise CkptError(f"{folder}: cannot hold a remote tensor read twice ({nbytes} bytes) in a "
                            f"temporary file there: {e.strerror or e}; free space, or set TMPDIR") from None

    return disk


def _write_into(file, disk, source, first: int, nbytes: int) -> None:
    """Bytes [first, first + nbytes) of `source` written at the file's position, flushed."""
    for piece, offset, size in (source.ranges(first, nbytes) if isinstance(source, JoinedSource)
                                else [(source, first, nbytes)]):
        _copy_into(lambda data: disk(file.write, data), piece, offset, size)
    disk(file.flush)


def _on(held, t: TensorRef) -> TensorRef:
    """`t` on the bytes `held` holds (viewed as a mapped file's: `io.model.mapped_range`)."""
    storage = Storage(JoinedSource([(held, 0, t.nbytes)]), 0, t.nbytes, t.storage.key, t.storage.location)
    return TensorRef(storage, 0, t.shape, t.stride, t.dtype, requires_grad=t.requires_grad)


class _Later:
    """A remote tensor's bytes, fetched once at the first read (`Spools.keep`) and viewed from
    there until released."""

    path = "<held>"

    def __init__(self, spools: Spools, source, first: int, nbytes: int):
        self.spools, self.source, self.first, self.nbytes = spools, source, first, nbytes
        self.kept = None
        self.lock = threading.Lock()

    def view(self, offset: int, nbytes: int) -> memoryview:
        with self.lock:  # viewed before a release in another thread closes it (then mapped until the view goes)
            if self.kept is None:
                self.kept = self.spools.keep(self.source, self.first, self.nbytes)
            return self.kept.view(offset, nbytes)

    def release(self) -> None:
        with self.lock:
            kept, self.kept = self.kept, None
        if kept is not None:
            self.spools.release(kept)


def _copy_into(write, source, offset: int, nbytes: int) -> None:
    """Bytes [offset, offset + nbytes) of `source` handed to `write`: a remote file's streamed in
    pieces (several fetched at once), the others' viewed."""
    if not isinstance(source, RangeSource):
        write(source.view(offset, nbytes))
        return
    pieces = source.stream(offset, nbytes)
    try:
        for piece in pieces:
            write(piece)
    finally:
        close = getattr(pieces, "close", None)
        if close is not None:  # the pieces still in flight cancelled now, not when it is collected
            close()


def _temporary_file(folder: str | None):
    """A temporary file with no name in `folder`, or in tempfile's when None or when the folder
    takes none; and the folder it is in."""
    import tempfile

    if folder is not None:
        try:
            return tempfile.TemporaryFile(prefix=".ckptsurgery-spool-", dir=folder), folder
        except OSError:
            pass
    return tempfile.TemporaryFile(prefix="ckptsurgery-spool-"), tempfile.gettempdir()
