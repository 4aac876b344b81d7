"""What every output shares. Each format's writer (formats.OUTPUTS) streams tensor after tensor
from the memory-mapped inputs, so memory does not grow with the checkpoint, and writes beside
the output, renamed into place at the end (StagedOutputs), so no partial file is ever seen at
the output path."""

from __future__ import annotations

import errno
import os
import re
import threading
from contextlib import contextmanager
from operator import attrgetter
from typing import Any, BinaryIO, Callable, Iterator

from ..dtypes import DType
from ..errors import CkptError, UsageError
from .formats import OUTPUTS, OutputFormat, detect_format
from .model import JoinedSource, MappedFile, RangeSource, Storage, TensorRef, contiguous_strides
from .tensors import cast_bytes

CHUNK = 16 * 1024 * 1024
Progress = Callable[[int], None]


# ---- sizes and shards ----------------------------------------------------------------------

_SIZE_UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
               "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}


def parse_size(text: str | int) -> int:
    """'2GB' -> 2*10**9, '500MiB' -> 500*2**20 (Hugging Face's convention), '1000' -> 1000."""
    if type(text) is int:
        text = str(text)
    if not isinstance(text, str):
        raise UsageError(f"size {text!r}: expected text like 2GB or a number of bytes")
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([A-Za-z]*)\s*", text)
    unit = match and match.group(2).upper()
    if not match or unit not in _SIZE_UNITS:
        raise UsageError(f"size {text!r}: expected a number with an optional unit like 2GB or 500MiB")
    size = int(float(match.group(1)) * _SIZE_UNITS[unit])
    if size <= 0:
        raise UsageError(f"size {text!r} must be positive")
    return size


def plan_shards(sizes: list[tuple[str, int]], limit: int) -> list[list[str]]:
    """Fill shards greedily in key order; an item larger than the limit gets a shard of its own."""
    shards: list[list[str]] = []
    used = limit + 1
    for name, size in sizes:
        if used + size > limit or not shards:
            shards.append([])
            used = 0
        shards[-1].append(name)
        used += size
    return shards


def shard_names(output: str, count: int) -> tuple[list[str], str]:
    """Hugging Face's names: model.safetensors -> model-00001-of-00003.safetensors and
    model.safetensors.index.json."""
    folder, name = os.path.split(output)
    stem, ext = os.path.splitext(name)
    shards = [os.path.join(folder, f"{stem}-{i:05d}-of-{count:05d}{ext}") for i in range(1, count + 1)]
    return shards, output + ".index.json"


def output_format(path: str) -> OutputFormat:
    """The format an output's name picks by its extension."""
    lower = path.lower()
    for spec in OUTPUTS.values():
        if spec.extensions and lower.endswith(spec.extensions):
            return spec.format
    *others, last = (ext for spec in OUTPUTS.values() for ext in spec.extensions)
    raise CkptError(f"{path}: cannot tell the output format; end the name with {', '.join(others)} or {last}")


def check_parent(path: str) -> list[str]:
    """The folders an output at `path` needs made, outermost first (StagedOutputs makes them, as
    save_pretrained does, and removes them again if the write fails); refused where something
    that is not a folder stands in the way."""
    missing = []
    parent = os.path.dirname(os.path.abspath(path))
    while not os.path.isdir(parent):
        if os.path.lexists(parent):  # a file, or a link to nothing
            raise CkptError(f"{parent}: is not a folder, so {path} cannot be written in it")
        missing.append(parent)
        parent = os.path.dirname(parent)
    return missing[::-1]


def check_writable(paths: list[str], force: bool, index: str | None = None) -> list[str]:
    """Refuse to replace anything at `paths` without --force (a dangling symlink counts: the
    rename would replace it). `index`: where a sharded output of this name keeps its index
    (OUT.index.json). Returns the files of an earlier sharded output there that this write does
    not replace, to remove once it is committed."""
    for path in paths:
        if os.path.isdir(path):
            raise CkptError(f"{path}: is a folder; give a file name")
        if os.path.lexists(path) and not force:
            raise CkptError(f"{path}: already exists; pass --force to overwrite it")
        check_parent(path)
    if index is None or not os.path.lexists(index) or os.path.isdir(index):  # a folder is no earlier output
        return []
    if not force:  # a single file beside an index of the same name: which one would a loader take?
        raise CkptError(f"{index}: an earlier sharded output of the same name; pass --force to replace it "
                        f"(its shards are removed)")
    return _stale_files(index, paths)


def _stale_files(index: str, keep: list[str]) -> list[str]:
    """The old index (unless rewritten) and the shards it names that are not in `keep`: only
    plain names beside it, and only files that could be shards; never anything else."""
    from .sharded import load_index, plain_name

    keep_abs = {os.path.abspath(p) for p in keep}
    stale = [] if os.path.abspath(index) in keep_abs else [index]
    try:
        names = set(load_index(index)["weight_map"].values())
    except CkptError:  # unreadable: its shards are unknown, so none is removed
        return stale
    for name in sorted(filter(plain_name, names)):
        path = os.path.join(os.path.dirname(index), name)
        if os.path.abspath(path) in keep_abs or not os.path.lexists(path):
            continue
        try:
            if detect_format(path).spec.shard:
                stale.append(path)
        except CkptError:
            pass
    return stale


def _keep_aside(path: str, aside: str) -> bool:
    """Keep what is at `path` at `aside` too; True when by a hard link (it stays at `path`), False
    when moved (a folder, or a file system without hard links)."""
    if not os.path.isdir(path) or os.path.islink(path):
        try:
            os.link(path, aside, follow_symlinks=False)
            return True
        except OSError:
            pass
    os.rename(path, aside)
    return False


def _temporary_beside(path: str) -> str:
    """Where a file or folder for `path` is staged: beside it, hidden, under a name nobody can
    guess (16 random hex digits), so that nobody can plant a link there in advance."""
    folder, name = os.path.split(os.path.abspath(path))
    return os.path.join(folder, f".{name}.{os.urandom(8).hex()}.ckptsurgery-tmp")


_STAGED_NAME = re.compile(r"\.[^/]+\.[0-9a-f]{16}\.ckptsurgery-tmp")  # the names _temporary_beside makes


class StagedOutputs:
    """Files written beside their final paths and renamed into place together by `commit()`.
    Until then nothing at any output path changes; any failure removes every staged file.
    A sharded output is several files: none of them replaces the old set unless all were written.
    `remove`: files of an earlier output to delete once the new ones are in place."""

    def __init__(self, remove: list[str] = ()):
        self._staged: list[tuple[str, str]] = []  # (temporary, final)
        self._remove = list(remove)
        self._made: list[str] = []  # folders made for the outputs, outermost first: removed on failure
        # writer threads stage files while the main thread may commit or abort (a second Ctrl-C
        # cuts short the wait for them): once it has, nothing new is staged, so nothing is left
        self._lock = threading.Lock()
        self._closed = False

    def make_folders(self, path: str) -> None:
        """Make the folders `path` needs (recorded: removed again on failure). Under torchrun the
        leader makes them before the others stage anything, so that it is the one to remove them."""
        with self._lock:
            self._make_folders(path)

    def _make_folders(self, path: str) -> None:
        for folder in check_parent(path):
            try:
                os.mkdir(folder, 0o777)
            except FileExistsError:  # another thread's: not ours to remove
                continue
            self._made.append(folder)

    def _create(self, path: str, temp: str, make: Callable[[], Any]) -> Any:
        """`make()` the staged `temp` for `path` (and the folders it needs) and list it, unless the
        set is closed already."""
        with self._lock:
            if self._closed:
                raise CkptError(f"{path}: the write was stopped; nothing was written")
            self._make_folders(path)
            made = make()
            self._staged.append((temp, path))  # only now is it ours to remove
            return made

    def stage_folder(self, path: str) -> str:
        """A new folder beside `path`, filled by the caller, renamed into place by commit(); an
        old folder there (checked by the caller) is set aside first and removed after."""
        temp = _temporary_beside(path)
        try:
            self._create(path, temp, lambda: os.mkdir(temp, 0o777))
        except OSError as e:
            raise CkptError(f"{path}: cannot write ({e.strerror or e}); nothing was written") from None
        return temp

    @property
    def staged(self) -> list[tuple[str, str]]:
        """(temporary, final) of every file staged so far."""
        return list(self._staged)

    def adopt(self, pairs: list[tuple[str, str]], order: list[str]) -> None:
        """Take on files other processes staged (the other ranks of a torchrun job), to commit or
        remove with ours; commit() renames them all in `order` (final paths: an index last)."""
        position = {path: i for i, path in enumerate(order)}
        for temp, path in pairs:  # only what this process would have staged for the same output
            folder, name = os.path.split(os.path.abspath(path))
            if path not in position or not _STAGED_NAME.fullmatch(os.path.relpath(temp, folder)) \
                    or not os.path.basename(temp).startswith(f".{name}."):
                raise CkptError(f"{path}: another rank staged {temp!r} for it, which is not among the files "
                                f"planned here (did the ranks run different commands?); nothing was written")
        self._staged = sorted({*self._staged, *pairs}, key=lambda pair: position[pair[1]])

    def hand_over(self) -> None:
        """Forget the staged files: another process (rank 0) now renames or removes them."""
        self._staged.clear()
        self._remove.clear()

    @contextmanager
    def stage(self, path: str) -> Iterator[BinaryIO]:
        # created exclusively and never through a symlink: no link can redirect the write
        temp = _temporary_beside(path)
        try:
            fd = self._create(path, temp, lambda: os.open(
                temp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o666))
            with os.fdopen(fd, "wb") as f:
                yield f
        except OSError as e:
            if e.filename in (None, temp):  # not an input's error
                raise CkptError(f"{path}: cannot write ({e.strerror or e}); nothing was written") from None
            raise

    def commit(self) -> None:
        """Rename every staged file into place. Whatever was at a final path is kept aside —
        a file as a second hard link, so that it stays at its path until the new one replaces
        it in one step; a folder moved, as one cannot replace a folder in one step — and removed
        only once all are in place: if a rename fails, the ones done are undone and the old
        output is back, whole."""
        with self._lock:
            self._closed = True
        done: list[tuple[str, str, str | None, bool]] = []  # (temporary, final, old one kept at, by a link)
        try:
            for temp, path in self._staged:
                aside, linked = None, False
                if os.path.lexists(path):
                    aside = f"{temp}.old"
                    linked = _keep_aside(path, aside)
                try:
                    os.replace(temp, path)  # a symlink at `path` is replaced, never its target
                except BaseException:
                    if linked:
                        os.unlink(aside)  # the old file never left `path`
                    elif aside:
                        os.rename(aside, path)
                    raise
                done.append((temp, path, aside, linked))
        except BaseException:
            for temp, path, aside, linked in reversed(done):  # back as it was
                if linked:
                    os.replace(aside, path)  # the old file over the new one, in one step
                else:
                    os.rename(path, temp)  # the new one staged again, then the old one back
                    if aside:
                        os.rename(aside, path)
            self.abort()  # no temporary file is left behind; nothing old is removed
            raise
        self._staged.clear()
        self._made.clear()  # the folders now hold the output
        for _, path, aside, _ in done:
            try:
                if aside and os.path.isdir(aside) and not os.path.islink(aside):
                    import shutil  # here: its import (bz2, lzma) is a start-up cost, and this is rare

                    shutil.rmtree(aside)
                elif aside:
                    os.unlink(aside)
            except OSError as e:
                raise CkptError(f"{path}: the new output is written but the old one, set aside at {aside}, could not "
                                f"be removed ({e.strerror}); remove it by hand") from None
        for path in self._remove:
            try:
                os.unlink(path)
            except FileNotFoundError:
                pass
            except OSError as e:
                raise CkptError(f"{path}: the new output is written but this file of the old one could not "
                                f"be removed ({e.strerror}); remove it by hand") from None
        self._remove.clear()

    def abort(self) -> None:
        with self._lock:
            self._closed = True
        for temp, _ in self._staged:
            try:
                if os.path.isdir(temp) and not os.path.islink(temp):
                    import shutil

                    shutil.rmtree(temp)
                else:
                    os.unlink(temp)
            except FileNotFoundError:
                pass
        for folder in reversed(self._made):  # innermost first; one that holds anything else stays
            try:
                os.rmdir(folder)
            except OSError:
                pass
        self._made.clear()
        self._staged.clear()
        self._remove.clear()

    def __enter__(self) -> "StagedOutputs":
        return self

    def __exit__(self, kind, error, trace) -> None:
        if kind is None:
            self.commit()
        else:
            self.abort()


# what copy_file_range answers where the kernel or file system cannot do it
_NO_COPY_RANGE = {errno.ENOSYS, errno.EXDEV, errno.EOPNOTSUPP, errno.EINVAL, errno.EBADF, errno.ETXTBSY}


def _copy_range(source_fd: int, offset: int, nbytes: int, out: BinaryIO, progress: Progress | None) -> None:
    """Copy bytes between files in the kernel: no trip through Python's memory."""
    out.flush()
    out_fd = out.fileno()
    position = out.tell()
    while nbytes > 0:
        step = min(nbytes, 1 << 30)
        try:
            done = os.copy_file_range(source_fd, out_fd, step, offset, position)
        except OSError as e:
            if e.errno not in _NO_COPY_RANGE:  # a full disk is an error, not a reason to retry
                raise
            done = 0
        if done <= 0:  # no kernel support here: fall back to a read/write loop
            data = os.pread(source_fd, min(step, CHUNK), offset)
            if not data:
                raise CkptError("input ended before the tensor's bytes did")
            done = os.pwrite(out_fd, data, position)
        offset, position, nbytes = offset + done, position + done, nbytes - done
        if progress:
            progress(done)
    out.seek(position)


def _chunks(view: memoryview | bytes, progress: Progress | None) -> Iterator[memoryview]:
    view = memoryview(view).cast("B")
    for start in range(0, len(view), CHUNK):
        chunk = view[start : start + CHUNK]
        yield chunk
        if progress:
            progress(len(chunk))


def cast_target(dtype: DType, cast: DType | None) -> DType:
    """The dtype a tensor is written in: --dtype casts full-precision floating tensors only
    (float8 without its scale, quantized and integer tensors keep theirs)."""
    return cast if cast is not None and dtype.floating else dtype


# ---- tensors, one after another ---------------------------------------------------------------

def plan_safetensors(tensors: dict[str, TensorRef], cast: DType | None) -> tuple[list, list]:
    """Names stored, and [alias, target, position] for tied names stored once."""
    shared = _shared_storages(tensors.values())
    if not shared:  # the usual state dict: no two names view one storage
        if cast is None:
            return [(name, t, t.dtype) for name, t in tensors.items()], []
        return [(name, t, cast_target(t.dtype, cast)) for name, t in tensors.items()], []
    stored, aliases, first = [], [], {}
    for position, (name, t) in enumerate(tensors.items()):
        if id(t.storage) in shared:  # only views of a shared storage can be one another
            key = t.view_key()
            if key in first and t.numel > 0:
                aliases.append([name, first[key], position])
                continue
            first.setdefault(key, name)
        stored.append((name, t, cast_target(t.dtype, cast)))
    return stored, aliases


def _shared_storages(tensors) -> set[int]:
    """ids of the storages that more than one of `tensors` views."""
    keys = list(map(id, map(attrgetter("storage"), tensors)))
    seen, shared = set(keys), set()
    if len(seen) == len(keys):
        return shared
    seen.clear()
    for key in keys:
        if key in seen:
            shared.add(key)
        seen.add(key)
    return shared


def write_tensors(f: BinaryIO, stored: list, progress: Progress | None) -> None:
    """The bytes of each of `stored` ((name, tensor, dtype written), as plan_safetensors gives
    them), one after another, from where they lie: runs of an input's bytes copied at once."""
    runs = _Runs(f, progress)
    for _, t, dtype in stored:
        runs.add(t, dtype)
    runs.flush()


_DIRECT = (MappedFile, JoinedSource)  # sources whose bytes are copied as they lie (and RangeSource's kinds)
SMALL_COPY = 1 << 16  # bytes: a run shorter than this is copied through memory, not by the kernel


class _Runs:
    """Writes tensors one after another; those whose bytes lie back to back in one input file
    are copied by one call (200 000 small tensors would otherwise be 200 000 copies)."""

    def __init__(self, f: BinaryIO, progress: Progress | None):
        self.f, self.progress = f, progress
        self.run: list | None = None  # [source, start, nbytes] not yet copied

    def add(self, t: TensorRef, dtype: DType) -> None:
        source = t.storage.source
        if not (dtype is t.dtype and (type(source) in _DIRECT or isinstance(source, RangeSource)) and t.is_plain
                and (t.stride == contiguous_strides(t.shape) or t.is_contiguous)):
            self.flush()
            _write_computed(self.f, t, dtype, self.progress)
            return
        start, nbytes = t.byte_range()
        if not nbytes:  # an empty view, wherever it points (torch allows any offset): no bytes
            return
        run = self.run
        if run and run[0] is source and run[1] + run[2] == start:
            run[2] += nbytes
            return
        self.flush()
        self.run = [source, start, nbytes]

    def flush(self) -> None:
        if not self.run:
            return
        source, start, nbytes = self.run
        self.run = None
        if nbytes < SMALL_COPY and isinstance(source, MappedFile):  # cheaper than a system call
            self.f.write(source.view(start, nbytes))
            if self.progress:
                self.progress(nbytes)
        else:
            _write_range(self.f, source, start, nbytes, self.progress)


def _write_computed(f: BinaryIO, t: TensorRef, dtype: DType, progress: Progress | None) -> None:
    """A tensor whose bytes are not a plain range of an input: gathered, resolved or cast. A
    joined tensor (chunks computed when read, as a GGUF tensor's dequantized blocks) is cast
    piece by piece, never joined whole."""
    if dtype is not t.dtype and isinstance(t.storage.source, JoinedSource) and t.is_plain and t.is_contiguous:
        start, nbytes = t.byte_range()
        pieces = list(_leaf_ranges(t.storage.source, start, nbytes))
        if all(size % t.dtype.itemsize == 0 for _, _, size in pieces):  # no element split between pieces
            for leaf, offset, size in pieces:
                for chunk in _chunks(cast_bytes(leaf.view(offset, size), t.dtype, dtype), progress):
                    f.write(chunk)
            return
    data = t.data()
    if dtype is not t.dtype:
        data = cast_bytes(data, t.dtype, dtype)
    for chunk in _chunks(data, progress):
        f.write(chunk)


def _leaf_ranges(source, start: int, nbytes: int) -> Iterator[tuple[Any, int, int]]:
    """(source, offset, nbytes) of [start, start + nbytes), a joined source's ranges unfolded:
    writers take them one at a time, never the whole run in memory."""
    if isinstance(source, JoinedSource):
        for inner, offset, size in source.ranges(start, nbytes):
            yield from _leaf_ranges(inner, offset, size)
    else:
        yield source, start, nbytes


def _write_range(f: BinaryIO, source, start: int, nbytes: int, progress: Progress | None) -> None:
    """Bytes of a mapped file (copied by the kernel) or of a joined source, range by range."""
    for leaf, offset, size in _leaf_ranges(source, start, nbytes):
        if isinstance(leaf, MappedFile):
            if size:
                with leaf.descriptor() as fd:
                    _copy_range(fd, offset, size, f, progress)
        elif isinstance(leaf, RangeSource):  # fetched: several pieces in flight, written in order
            for piece in leaf.stream(offset, size):
                f.write(piece)
                if progress:
                    progress(len(piece))
        else:
            for chunk in _chunks(leaf.view(offset, size), progress):
                f.write(chunk)


def _storage_chunks(storage: Storage, progress: Progress | None) -> Iterator[memoryview]:
    """A storage's bytes in pieces of at most CHUNK, a joined one range by range."""
    for leaf, offset, size in _leaf_ranges(storage.source, storage.offset, storage.nbytes):
        if isinstance(leaf, RangeSource):
            for piece in leaf.stream(offset, size):
                yield from _chunks(piece, progress)
        else:
            yield from _chunks(leaf.view(offset, size), progress)
