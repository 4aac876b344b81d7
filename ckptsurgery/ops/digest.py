"""Content hashes: a SHA-256 per tensor over what it means (dtype, shape, row-major bytes), the
same whatever format holds it, and one fingerprint for a state dict. `inspect --hash` prints
them; `diff` compares tensors by them. The preimages are written out in docs/reading-and-writing.md.

    tensor:      "ckptsurgery.tensor.v1\\n" dtype "\\n" shape "\\n" [quantization "\\n"] bytes
    fingerprint: "ckptsurgery.state_dict.v1\\n" then, per name in the order of its UTF-8 bytes,
                 len(name) ":" name " " sha256-hex "\\n"   (len counted in UTF-8 bytes)

dtype is torch's name (`bfloat16`), shape the sizes joined by "," ("" for a 0-d tensor), bytes
the elements in row-major order, little-endian, as safetensors stores them and as a contiguous
`.pth` storage holds them. A quantized tensor (only `.pth` holds them) adds a line with its
scheme, and its scale and zero point (per channel: the axis and the SHA-256 of each).
"""

from __future__ import annotations

import hashlib
import struct
from typing import Iterator

from ..io import TensorRef

TENSOR_TAG = b"ckptsurgery.tensor.v1\n"
STATE_DICT_TAG = b"ckptsurgery.state_dict.v1\n"
_CHUNK = 16 * 1024 * 1024  # bytes handed to the hash at a time: it releases the GIL for each


def tensor_bytes(t: TensorRef) -> Iterator[memoryview]:
    """The tensor's row-major bytes in pieces: straight from the mapped file (or from each range
    of a joined one) when they lie there in order, else made once (a strided view, a computed
    tensor)."""
    from ..io.model import JoinedSource, mapped_range

    in_order = mapped_range(t)
    if in_order is not None:
        source, start = in_order
        nbytes = t.nbytes
        ranges = source.ranges(start, nbytes) if isinstance(source, JoinedSource) else [(source, start, nbytes)]
        for leaf, offset, size in ranges:
            for at in range(offset, offset + size, _CHUNK):
                yield leaf.view(at, min(_CHUNK, offset + size - at))
        return
    data = memoryview(t.data()).cast("B")
    for at in range(0, len(data), _CHUNK):
        yield data[at:at + _CHUNK]


def _quantization_line(t: TensorRef) -> bytes:
    q = t.quant
    if q.axis is None:  # the scale's bits: a NaN scale is itself
        return f"{q.scheme.name} {struct.pack('<d', q.scale).hex()} {q.zero_point}\n".encode()
    return f"{q.scheme.name} axis={q.axis} {tensor_sha256(q.scale)} {tensor_sha256(q.zero_point)}\n".encode()


def tensor_sha256(t: TensorRef) -> str:
    """The tensor's SHA-256 (hex): the same for the same dtype, shape and values in any format."""
    h = hashlib.sha256(TENSOR_TAG)
    h.update(f"{t.dtype.name}\n{','.join(map(str, t.shape))}\n".encode())
    if t.quant is not None:
        h.update(_quantization_line(t))
    for piece in tensor_bytes(t):
        h.update(piece)
    return h.hexdigest()


def fingerprint(hashes: dict[str, str]) -> str:
    """One SHA-256 (hex) for a state dict: over its names, in the order of their UTF-8 bytes, and
    each one's tensor hash."""
    h = hashlib.sha256(STATE_DICT_TAG)
    for encoded, name in sorted((name.encode("utf-8"), name) for name in hashes):
        h.update(b"%d:%s %s\n" % (len(encoded), encoded, hashes[name].encode()))
    return h.hexdigest()


def hashes_of(tensors: dict[str, TensorRef], progress=None, jobs: int | None = None) -> dict[str, str]:
    """Every tensor's hash, each distinct view hashed once (tied names share it), `jobs` at a
    time (default: one per core, at most 4): hashlib releases the GIL while it hashes."""
    from .options import default_jobs

    views: dict[tuple, TensorRef] = {}
    for t in tensors.values():
        views.setdefault(t.view_key(), t)
    jobs = default_jobs() if jobs is None else jobs
    digests = {}
    if jobs > 1 and len(views) > 1:
        from concurrent.futures import ThreadPoolExecutor

        with ThreadPoolExecutor(jobs, thread_name_prefix="ckptsurgery-hash") as pool:
            for (key, t), digest in zip(views.items(), pool.map(tensor_sha256, views.values())):
                digests[key] = digest
                if progress:
                    progress(t.nbytes)
    else:
        for key, t in views.items():
            digests[key] = tensor_sha256(t)
            if progress:
                progress(t.nbytes)
    return {name: digests[t.view_key()] for name, t in tensors.items()}
