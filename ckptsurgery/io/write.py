"""Writers. Both stream tensor after tensor from the memory-mapped inputs, so memory does not
grow with the checkpoint, and both write beside the output and rename it into place at the end,
so no partial file is ever seen at the output path."""

from __future__ import annotations

import errno
import json
import os
import struct
from collections import OrderedDict
from contextlib import contextmanager
from typing import Any, BinaryIO, Callable, Iterator

from ..dtypes import DType
from ..errors import CkptError
from .model import MappedFile, Storage, TensorRef
from .pickler import TorchPickler
from .safetensors import ALIASES_KEY
from ..tensors import cast_bytes
from .zipwriter import ZipWriter

CHUNK = 16 * 1024 * 1024
Progress = Callable[[int], None]

TORCH_SUFFIXES = (".pth", ".pt", ".bin", ".ckpt")


def output_format(path: str) -> str:
    lower = path.lower()
    if lower.endswith(".safetensors"):
        return "safetensors"
    if lower.endswith(TORCH_SUFFIXES):
        return "torch"
    raise CkptError(f"{path}: cannot tell the output format; end the name with .safetensors, "
                    f".pth, .pt, .bin or .ckpt")


def check_writable(paths: list[str], force: bool) -> None:
    for path in paths:
        if os.path.isdir(path):
            raise CkptError(f"{path}: is a folder; give a file name")
        if os.path.exists(path) and not force:
            raise CkptError(f"{path}: already exists; pass --force to overwrite it")
        parent = os.path.dirname(os.path.abspath(path))
        if not os.path.isdir(parent):
            raise CkptError(f"{parent}: no such folder for the output")


class StagedOutputs:
    """Files written beside their final paths and renamed into place together by `commit()`.
    Until then nothing at any output path changes; any failure removes every staged file.
    A sharded output is several files: none of them replaces the old set unless all were written."""

    def __init__(self):
        self._staged: list[tuple[str, str]] = []  # (temporary, final)

    @contextmanager
    def stage(self, path: str) -> Iterator[BinaryIO]:
        folder, name = os.path.split(os.path.abspath(path))
        temp = os.path.join(folder, f".{name}.{os.getpid()}.ckptsurgery-tmp")
        self._staged.append((temp, path))
        try:
            with open(temp, "wb") as f:
                yield f
        except OSError as e:
            if e.filename in (None, temp):  # not an input's error
                raise CkptError(f"{path}: cannot write ({e.strerror or e}); nothing was written") from None
            raise

    def commit(self) -> None:
        for temp, path in self._staged:
            os.replace(temp, path)
        self._staged.clear()

    def abort(self) -> None:
        for temp, _ in self._staged:
            try:
                os.unlink(temp)
            except FileNotFoundError:
                pass
        self._staged.clear()

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
    """The dtype a tensor is written in: --dtype applies to floating tensors only."""
    return cast if cast is not None and dtype.floating else dtype


# ---- safetensors ---------------------------------------------------------------------------

def plan_safetensors(tensors: dict[str, TensorRef], cast: DType | None) -> tuple[list, list]:
    """Names stored, and [alias, target, position] for tied names stored once."""
    stored, aliases, first = [], [], {}
    for position, (name, t) in enumerate(tensors.items()):
        key = t.view_key()
        if key in first and t.numel > 0:
            aliases.append([name, first[key], position])
        else:
            first.setdefault(key, name)
            stored.append((name, t, cast_target(t.dtype, cast)))
    return stored, aliases


def write_safetensors(f: BinaryIO, tensors: dict[str, TensorRef], metadata: dict[str, str],
                      cast: DType | None = None, progress: Progress | None = None) -> None:
    stored, aliases = plan_safetensors(tensors, cast)
    meta = {k: v for k, v in metadata.items() if k != ALIASES_KEY}
    meta["format"] = "pt"
    if aliases:
        meta[ALIASES_KEY] = json.dumps(aliases, separators=(",", ":"))
    header: dict[str, Any] = {"__metadata__": dict(sorted(meta.items()))}
    offset = 0
    for name, t, dtype in stored:
        size = t.numel * dtype.itemsize
        header[name] = {"dtype": dtype.safetensors, "shape": list(t.shape), "data_offsets": [offset, offset + size]}
        offset += size
    raw = json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode("utf-8")
    raw += b" " * ((-len(raw)) % 8)  # the library pads the header to 8 bytes
    f.write(struct.pack("<Q", len(raw)) + raw)
    for _, t, dtype in stored:
        _write_tensor(f, t, dtype, progress)


def _write_tensor(f: BinaryIO, t: TensorRef, dtype: DType, progress: Progress | None) -> None:
    if dtype is t.dtype and t.is_contiguous and isinstance(t.storage.source, MappedFile):
        start, nbytes = t.byte_range()
        if nbytes:
            _copy_range(t.storage.source.fileno(), start, nbytes, f, progress)
        return
    data = t.data()
    if dtype is not t.dtype:
        data = cast_bytes(data, t.dtype, dtype)
    for chunk in _chunks(data, progress):
        f.write(chunk)


# ---- torch zip -----------------------------------------------------------------------------

ARCHIVE = "archive"  # the inner folder's name; torch.save would use the output's file name


def write_torch(f: BinaryIO, obj: Any, cast: DType | None = None, progress: Progress | None = None) -> None:
    """Pickle `obj` (tensor references anywhere inside) into torch's zip format."""
    storages: OrderedDict[int, tuple[Storage, str, DType]] = OrderedDict()

    def storage_record(storage: Storage) -> tuple[str, str, int]:
        if id(storage) not in storages:
            storages[id(storage)] = (storage, str(len(storages)), cast_target(storage.dtype, cast))
        _, key, dtype = storages[id(storage)]
        return key, dtype.storage, storage.numel

    data_pkl = TorchPickler(storage_record).dumps(obj)
    archive = ZipWriter(f)
    archive.add_bytes(f"{ARCHIVE}/data.pkl", data_pkl)
    archive.add_bytes(f"{ARCHIVE}/.format_version", b"1")
    archive.add_bytes(f"{ARCHIVE}/.storage_alignment", b"64")
    archive.add_bytes(f"{ARCHIVE}/byteorder", b"little")
    for storage, key, dtype in storages.values():
        data = storage.view()
        if dtype is not storage.dtype:
            data = cast_bytes(data, storage.dtype, dtype)
        archive.add(f"{ARCHIVE}/data/{key}", _chunks(data, progress), storage.numel * dtype.itemsize)
    archive.add_bytes(f"{ARCHIVE}/version", b"3\n")
    archive.close()


def torch_payload(checkpoint, tensors: dict[str, TensorRef], keep_metadata: bool = True) -> Any:
    """The object a .pth output holds: the original object with its root replaced by `tensors`
    (everything else carried through), or just the state dict. `keep_metadata`: keep the state
    dict's `_metadata` (module versions by module name) — wrong once keys are renamed."""
    state = OrderedDict(tensors)
    obj, root = checkpoint.obj, checkpoint.root
    original = obj if root == "" else obj.get(root) if isinstance(obj, dict) and root else None
    if keep_metadata and isinstance(original, OrderedDict) and "_metadata" in vars(original):
        state._metadata = original._metadata  # load_state_dict reads module versions from it
    if obj is None or root == "" or not isinstance(obj, dict):
        return state
    out = type(obj)()
    if getattr(obj, "__dict__", None):
        out.__dict__.update(obj.__dict__)
    for key, value in obj.items():
        out[key] = state if key == root else value
    return out
