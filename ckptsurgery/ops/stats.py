"""`inspect --stats`: per tensor the min, max, mean and std of its finite values and its NaN and
infinity counts, streamed in chunks — with numpy straight from the mapped file for plain dtypes
whose bytes lie in order (torch is not imported), else through torch (quantized, strided and
computed tensors).

A tensor is cut into segments, the segments of all tensors are spread over the cores (forked
workers, else threads), and each tensor's segments are merged in order (Chan et al.'s merge of
moments): the figures are the same whatever the number of workers, and one large tensor (an
embedding) keeps every core busy."""

from __future__ import annotations

import math
import struct
from typing import Callable, Iterator

from ..io import TensorRef

_SEGMENT = 1 << 22  # elements one task covers
_CHUNK = 1 << 16  # elements a step from a mapped file: a step's arrays stay in the CPU's cache
_ROW = 8192  # elements of one BLAS dot product (see _sum_of_squares)
_TORCH_CHUNK = 1 << 22  # elements a step through torch: bounded memory whatever the tensor's size

# dtypes whose bytes numpy reads as they lie in the file (bfloat16 through methods' decode)
_NUMPY_DTYPES = {"float16": "<f2", "float32": "<f4", "float64": "<f8", "int8": "i1", "uint8": "u1",
                 "int16": "<i2", "uint16": "<u2", "int32": "<i4", "uint32": "<u4", "int64": "<i8",
                 "uint64": "<u8", "bool": "?", "bfloat16": None}

NO_STATS = {"min": None, "max": None, "mean": None, "std": None, "nan": None, "inf": None}


class Moments:
    """min, max, mean and the sum of squared deviations of the finite values seen so far, and the
    NaN and infinity counts; chunks merged as Chan et al. merge moments."""

    def __init__(self):
        self.count, self.mean, self.m2, self.nan, self.inf = 0, 0.0, 0.0, 0, 0
        self.low, self.high = math.inf, -math.inf

    def add(self, n: int, low: float, high: float, mean: float, m2: float) -> None:
        if not n:
            return
        self.low, self.high = min(self.low, low), max(self.high, high)
        delta, total = mean - self.mean, self.count + n
        self.mean += delta * n / total
        self.m2 += m2 + delta * delta * self.count * n / total
        self.count = total

    def absorb(self, other: Moments) -> None:
        """Merge the moments of the values after these."""
        self.nan, self.inf = self.nan + other.nan, self.inf + other.inf
        self.add(other.count, other.low, other.high, other.mean, other.m2)

    def report(self) -> dict:
        if not self.count:
            return {"min": None, "max": None, "mean": None, "std": None, "nan": self.nan, "inf": self.inf}
        std = math.sqrt(self.m2 / (self.count - 1)) if self.count > 1 else 0.0
        finite = lambda x: x if math.isfinite(x) else None  # noqa: E731  (sums of values near 1e308 overflow)
        return {"min": self.low, "max": self.high, "mean": finite(self.mean), "std": finite(std),
                "nan": self.nan, "inf": self.inf}


def tensor_stats(t: TensorRef) -> dict:
    """min/max/mean/std over finite values, and NaN/Inf counts, of one tensor (one thread)."""
    return _merged([task() for task in _tasks(t)])


def each_stats(tensors: list[TensorRef]) -> Iterator[dict]:
    """tensor_stats of each, in order, their segments spread over the cores (at most 4): over
    forked processes where every tensor lies in a mapped local file (on Linux), else threads."""
    from .options import default_jobs

    tasks = [(i, task) for i, t in enumerate(tensors) for task in _tasks(t)]
    # fewer values than one segment: less work than starting a worker
    jobs = min(default_jobs(), len(tasks)) if sum(t.numel for t in tensors) > _SEGMENT else 1
    pool = None
    if jobs < 2:
        found = (task() for _, task in tasks)
    elif _forkable(tensors):
        found = _in_processes([task for _, task in tasks], jobs)
    else:  # numpy and torch let go of the GIL while they go over the values
        from concurrent.futures import ThreadPoolExecutor

        pool = ThreadPoolExecutor(jobs, thread_name_prefix="ckptsurgery-stats")
        found = pool.map(lambda task: task(), (task for _, task in tasks))
    try:
        done, current = [], 0
        for (i, _), moments in zip(tasks, found):
            if i != current:
                yield _merged(done)
                done, current = [], i
            done.append(moments)
        if tasks:
            yield _merged(done)
    finally:
        if pool is not None:
            pool.shutdown(cancel_futures=True)
        else:
            getattr(found, "close", lambda: None)()  # the processes' generator stops its workers


def _forkable(tensors: list[TensorRef]) -> bool:
    """Whether forked workers may take these tensors' segments: on Linux (fork is sound there
    and the mapped pages are shared), every tensor's bytes in order in a local mapped file, read
    by numpy alone (no torch, no network in a child). Threads would do the same work, but each
    numpy call lets the GIL go and takes it back, and on two cores the threads spent as much time
    waiting for it as they saved (docs/performance.md)."""
    import sys

    from ..io.model import MappedFile, mapped_range

    if not sys.platform.startswith("linux"):
        return False
    for t in tensors:
        placed = mapped_range(t) if t.dtype.name in _NUMPY_DTYPES else None
        if placed is None or type(placed[0]) is not MappedFile:
            return False
    return True


_RESULT = struct.Struct("<qddddqq")  # a segment's Moments: count, mean, m2, min, max, NaN and infinity counts


def _in_processes(tasks: list[Callable[[], Moments]], jobs: int) -> Iterator[Moments]:
    """Each task's Moments, in order: task k computed by forked worker k % jobs (worker 0: this
    process). A worker writes its results down a pipe as it goes and leaves by os._exit (no
    cleanup of this process's runs in it). A worker that stopped early, whatever the reason, is
    not trusted further: its remaining tasks are computed here, so an error is raised here, as
    one line, and the figures never depend on the workers."""
    import os
    import signal

    workers: list = []  # (pid, reading end of its pipe), or (None, None) where none could start
    try:
        for w in range(1, jobs):
            try:
                reading, writing = os.pipe()
            except OSError:  # no descriptors to be had (a limit): its tasks are computed here
                workers.append((None, None))
                continue
            # Ctrl-C and SIGTERM wait until the worker is on the list, so that a stop kills and reaps
            # it (in a process with other threads one of them may still take the signal meanwhile)
            blocked = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT, signal.SIGTERM})
            try:
                pid = os.fork()
            except OSError:  # no process to be had (a limit): likewise
                signal.pthread_sigmask(signal.SIG_SETMASK, blocked)
                os.close(reading)
                os.close(writing)
                workers.append((None, None))
                continue
            if pid == 0:
                _work(tasks[w::jobs], reading, writing, blocked)
            try:
                os.close(writing)
                workers.append((pid, os.fdopen(reading, "rb")))
            finally:
                signal.pthread_sigmask(signal.SIG_SETMASK, blocked)
        for k, task in enumerate(tasks):
            w = k % jobs
            found = _received(workers[w - 1][1]) if w else None
            yield found if found is not None else task()
    finally:
        for pid, reading in workers:
            if pid is None:
                continue
            reading.close()
            try:
                os.kill(pid, signal.SIGKILL)  # gone already, but for a stop before the end (Ctrl-C)
                os.waitpid(pid, 0)
            except (ProcessLookupError, ChildProcessError):  # reaped already: SIGCHLD ignored (inherited)
                pass


def _work(tasks: list[Callable[[], Moments]], reading: int, writing: int, blocked) -> None:
    """A forked worker's life: its tasks' Moments down the pipe, then os._exit (never this
    process's cleanup: its temporary files, its output, are the command's)."""
    import os
    import signal

    code = 1
    try:
        signal.signal(signal.SIGINT, signal.SIG_DFL)  # not the command's handlers
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        signal.pthread_sigmask(signal.SIG_SETMASK, blocked)
        os.close(reading)
        with os.fdopen(writing, "wb", buffering=0) as out:
            for task in tasks:
                m = task()
                out.write(_RESULT.pack(m.count, m.mean, m.m2, m.low, m.high, m.nan, m.inf))
        code = 0
    finally:
        os._exit(code)


def _received(reading) -> Moments | None:
    """The next Moments a worker sent; None once it sent no more (it stopped early, or never
    started: `reading` None)."""
    data = reading.read(_RESULT.size) if reading is not None else b""
    if len(data) != _RESULT.size:
        return None
    m = Moments()
    m.count, m.mean, m.m2, m.low, m.high, m.nan, m.inf = _RESULT.unpack(data)
    return m


def _merged(pieces: list[Moments | None]) -> dict:
    if any(piece is None for piece in pieces):  # complex, packed or opaque elements
        return dict(NO_STATS)
    whole = Moments()
    for piece in pieces:
        whole.absorb(piece)
    return whole.report()


def _tasks(t: TensorRef) -> list[Callable[[], Moments | None]]:
    """The work of one tensor's stats: a task per segment of a mapped tensor, else one."""
    from ..io.model import mapped_range

    placed = mapped_range(t) if t.dtype.name in _NUMPY_DTYPES else None
    if placed is None:
        return [lambda: _torch_moments(t)]
    source, first = placed
    return [lambda start=start: _mapped_moments(t, source, first, start, min(start + _SEGMENT, t.numel))
            for start in range(0, max(t.numel, 1), _SEGMENT)]  # an empty tensor too: one task


def _mapped_moments(t: TensorRef, source, first: int, begin: int, end: int) -> Moments:
    """Elements [begin, end) of a tensor whose bytes lie in order from `first` in `source`."""
    import numpy as np

    from ..io.model import MappedFile

    if t.dtype.name == "bfloat16":  # the method registry's codec, imported only then (it costs start-up)
        from .methods import decode
    moments, size, name = Moments(), t.dtype.itemsize, t.dtype.name
    floating = t.dtype.floating
    # a plain dtype's segment in a mapped file is one view (no copy); bfloat16, and bytes a view
    # would copy (a remote file's, a joined tensor's), are read a chunk at a time
    whole = None
    if name != "bfloat16" and type(source) is MappedFile:
        whole = np.frombuffer(source.view(first + begin * size, (end - begin) * size), _NUMPY_DTYPES[name])
    # float64 in a buffer reused by every chunk (a fresh array each chunk cost ~15% more)
    buffer = np.empty(min(_CHUNK, end - begin), np.float64)
    with np.errstate(all="ignore"):
        for start in range(begin, end, _CHUNK):
            count = min(_CHUNK, end - start)
            if whole is not None:
                x = whole[start - begin : start - begin + count]
            else:
                raw = source.view(first + start * size, count * size)
                x = decode(raw, name, "float32") if name == "bfloat16" else np.frombuffer(raw, _NUMPY_DTYPES[name])
            x = _as_numbers(x)
            wide = buffer[:count]
            np.copyto(wide, x)  # sums in float64; min and max in the values' own dtype (exact)
            total = float(np.add.reduce(wide))
            if not _add_one_pass(moments, x, wide, total):
                _add_two_pass(moments, x, wide, total, floating)
    return moments


def _as_numbers(x):
    import numpy as np

    return x.view(np.uint8) if x.dtype == np.bool_ else x


def _add_one_pass(moments: Moments, x, wide, total: float) -> bool:
    """Add a chunk's moments from its sum s (`total`) and sum of squares q (`wide`: its values in
    float64), m2 = q - s²/n: one pass for both sums of a tensor whose mean is small against its
    spread, as weights' are; its min and max from `x` while the chunk is in the CPU's cache (one
    pass over a whole segment for each cost two more reads of it from memory). False, with nothing added, where the subtraction would cancel more than 10 of float64's 53 bits (m2 < q/1024: a LayerNorm's weights about 1.0) or a sum is not finite
    (NaN, infinities, an overflow): the two passes then take the chunk."""
    import numpy as np

    squares, n = _sum_of_squares(wide), x.size
    m2 = squares - total * total / n
    if not (math.isfinite(total) and math.isfinite(squares)) or m2 * 1024 < squares:
        return False
    moments.add(n, float(np.minimum.reduce(x)), float(np.maximum.reduce(x)), total / n, m2)
    return True


def _sum_of_squares(wide) -> float:
    """Σ wide², by BLAS dot products over rows of _ROW elements: one fused pass (numpy's own
    multiply-then-sum is two), and rows short enough that OpenBLAS keeps each on the calling
    thread (past 10,000 elements it starts threads of its own, which cost more than the sum
    against this module's threads)."""
    import numpy as np

    rows = wide.size // _ROW
    whole = wide[: rows * _ROW].reshape(rows, _ROW)
    squares = float(np.add.reduce(_row_dots(whole))) if rows else 0.0
    tail = wide[rows * _ROW :]
    return squares + float(np.dot(tail, tail)) if tail.size else squares


def _row_dots(rows):
    import numpy as np

    if hasattr(np, "vecdot"):  # numpy >= 2: a BLAS dot per row
        return np.vecdot(rows, rows)
    return np.einsum("ij,ij->i", rows, rows)


def _add_two_pass(moments: Moments, x, wide, total: float, floating: bool) -> None:
    """Add a chunk's moments the careful way (`wide`: its values in float64): the mean, then the
    squared deviations from it, leaving NaN and infinities out of both (counted instead)."""
    import numpy as np

    # a sum of finite values of 16 or 32 bits cannot overflow a float64: a NaN or an infinity
    # among them is the only way to a sum that is not finite (or float64 values that overflow
    # it, which this path handles too)
    if floating and not math.isfinite(total):
        finite = np.isfinite(x)
        nan = int(np.isnan(x).sum())
        moments.nan, moments.inf = moments.nan + nan, moments.inf + x.size - int(finite.sum()) - nan
        x, wide = x[finite], wide[finite]
        total = float(np.add.reduce(wide))
    if x.size:
        mean = total / x.size
        m2 = _sum_of_squares(np.subtract(wide, mean, out=wide))
        moments.add(x.size, float(np.minimum.reduce(x)), float(np.maximum.reduce(x)), mean, m2)


def _torch_moments(t: TensorRef) -> Moments | None:
    import torch

    from ..io.tensors import values

    flat = values(t)
    if flat is None:  # complex, packed or opaque elements: no single number to summarise
        return None
    moments = Moments()
    for start in range(0, flat.numel(), _TORCH_CHUNK):
        chunk = flat[start : start + _TORCH_CHUNK].to(torch.float64)
        nan, inf = int(torch.isnan(chunk).sum()), int(torch.isinf(chunk).sum())
        moments.nan, moments.inf = moments.nan + nan, moments.inf + inf
        chunk = chunk[torch.isfinite(chunk)]
        if chunk.numel():
            mean = float(chunk.mean())
            moments.add(chunk.numel(), float(chunk.min()), float(chunk.max()), mean,
                        float(((chunk - mean) ** 2).sum()))
    return moments
