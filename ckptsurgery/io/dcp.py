"""Reader for torch.distributed.checkpoint (DCP) folders: `.metadata` and `__<rank>_<n>.distcp`
files, as `torch.distributed.checkpoint.save` writes them from one process or many (FSDP,
DTensor, torchtitan, torchtune).

- `.metadata` is a `pickle.dump` (protocol 4) of torch's dataclasses. It is read with the
  restricted unpickler: every class is a placeholder whose recorded state we check and read —
  or, where it is made of torch's own records written the way torch writes them and nothing
  else, by dcp_pickles.fast_metadata, which reads the same at ~6 µs a key instead of ~70
  (_read_fast; any other file, and any refusal, is the restricted unpickler's).
  `state_dict_metadata` maps each flat key to a tensor (dtype, full size, chunks: offsets and
  sizes) or to bytes (any other value); `storage_data` maps (key, chunk offset) to the byte range
  of a `.distcp` file holding it; `planner_data` maps each flat key to its path in the nested
  state dict (`('model', 'emb.weight')`), which decides the root as in a nested `.pth`.
- Each chunk is a complete `torch.save` archive at its byte range (or, written without
  torch.save, the chunk's raw bytes). The archive is opened, and the chunk checked against the
  metadata, only when the tensor's bytes are asked for (convert, --stats, diff): listing a
  folder needs the dtype and sizes `.metadata` gives (ChunkStorage); an archive laid out as
  torch.save lays one out is read without zipfile (lean_archive). A tensor saved from many
  ranks is one tensor of its full size here, put together from its chunks only then too.
- Values other than tensors (step counters, optimizer hyperparameters) are `torch.save`
  archives of arbitrary objects, read with the restricted unpickler like any `.pth` (bytes in
  another form are read as torch.load reads them: dcp_chunks.legacy_value).
- torch runs `.metadata` and every value unrestricted: the placeholders of both, in the order
  torch meets them, are the folder's events (dcp_pickles.payload_events leaves out only torch's
  own records), listed by inspect and held against a .pth output's.
"""

from __future__ import annotations

import io
import os
import stat
from typing import Any

from ..errors import CkptError
from .dcp_chunks import (
    ChunkGroup, ChunkStorage, Refused, chunked, lean_archive, lean_storage, legacy_value, read_streaming, short,
    template_of,
)
from .dcp_pickles import DCP_META as _META
from .dcp_pickles import STORAGE_INFO as _STORAGE_INFO
from .dcp_pickles import BYTES, FastMetadata, Unfollowed, fast_metadata, payload_events
from .formats import Format
from .model import (
    INT64_MAX, Checkpoint, MappedFile, Storage, TensorRef, check_key, contiguous_strides, numel_of, standalone,
)
from .pickled import FrozenRecord, Global, GlobalKind, How, InertGlobal, InertObject, TorchSize
from .torch_zip import load_torch_zip, write_torch
from .tree import find_root, place_in_tree
from .unpickler import MAX_NESTING, MetadataUnpickler, brief, safe_load
from .write import cast_target, check_parent, plan_shards

METADATA = ".metadata"
MAX_METADATA = 1 << 30


class _DcpUnpickler(MetadataUnpickler):
    key_classes = frozenset({_META + "MetadataIndex"})


def is_dcp(folder: str) -> bool:
    return os.path.isfile(os.path.join(folder, METADATA))


def _no_persistent_ids(pid):
    raise CkptError("a persistent id in DCP metadata, which never holds any")


def _fields(obj: Any, cls: str, where: str) -> dict:
    """The state of a placeholder instance of `cls` built the way pickle.dump builds a dataclass
    (NEWOBJ with no arguments, then BUILD with a dict of fields)."""
    state = {} if type(obj) is InertObject and obj.state is None else getattr(obj, "state", None)  # no fields: no BUILD
    if not (type(obj) is InertObject and obj.qualname() == cls and obj.how is How.NEWOBJ and not obj.args
            and type(state) is dict and all(type(k) is str for k in state)):
        raise CkptError(f"{where}: expected a {cls.rsplit('.', 1)[-1]} record, found {_what(obj)}")
    return state


def _what(obj: Any) -> str:
    if isinstance(obj, (InertObject, InertGlobal)):
        return obj.qualname()
    return f"a {type(obj).__name__}"


def _ints(value: Any, what: str, where: str) -> tuple[int, ...]:
    if type(value) not in (tuple, list, TorchSize) or not all(type(v) is int and 0 <= v <= INT64_MAX for v in value):
        raise CkptError(f"{where}: {what} is not a list of integers from 0 to 2**63 - 1")
    return tuple(value)


class _Reader:
    """The data files of one folder, opened as first named, in that order (torch reads the
    values of a folder file by file, in the order the files first appear); each byte range read
    once, however many keys name it."""

    def __init__(self, folder: str, events: list):
        self.folder = folder
        self.files: dict[str, MappedFile] = {}
        self.events = events  # what torch's load runs, in order: .metadata's first, then the values'
        self.repeated = [0]  # stride-0 bytes: one allowance for the whole folder, as for one .pth
        self._loaded: dict[tuple, Any] = {}
        self._unpickled: dict[tuple, Any] = {}
        self._lazy: dict[tuple, TensorRef] = {}  # (file, offset, length) -> the first chunk's tensor there
        self._templates: dict[bytes, TensorRef | None] = {}  # a chunk's data.pkl -> its tensor (template)
        self._rank: dict[str, int] = {}
        self._groups: dict[tuple, ChunkGroup] = {}  # (dtype, sizes, path before the last step) -> its group
        self._lengths: dict[int, int] = {}  # chunks' lengths, one int each (they repeat from key to key)

    def release(self) -> None:
        """A reader given up on (read_dcp reads the folder again): its files closed, and what it
        read let go now — its tensors' groups name it, so the garbage collector would free it
        (its values too) only when it next runs, while the next reader reads them again."""
        for source in self.files.values():
            source.close()
        for cache in (self._loaded, self._unpickled, self._lazy, self._templates, self._groups):
            cache.clear()

    def file(self, name: Any, where: str) -> MappedFile:
        """A `.distcp` file of the folder, named by a plain file name (never a path elsewhere)."""
        if type(name) is str and name in self.files:  # checked when first named
            return self.files[name]
        if type(name) is not str or name in ("", ".", "..") or "/" in name or "\0" in name or name == METADATA:
            raise CkptError(f"{where}: names the data file {brief(name)!r}, which is not a file name in the folder")
        if name not in self.files:
            path = os.path.join(self.folder, name)
            try:
                mode = os.stat(path).st_mode
            except OSError:
                raise CkptError(f"{where}: its data file {name} is missing from {self.folder}") from None
            if not stat.S_ISREG(mode):
                raise CkptError(f"{where}: its data file {name} is not a regular file")
            self.files[name] = MappedFile(path)
            self._rank[path] = len(self._rank)
        return self.files[name]

    def locate(self, info: Any, where: str) -> tuple[MappedFile, int, int]:
        state = _fields(info, _STORAGE_INFO, where)
        if state.get("transform_descriptors"):  # compressed or otherwise transformed by a storage extension
            raise CkptError(f"{where}: stored through the DCP extensions {brief(state['transform_descriptors'])}, "
                            f"which ckptsurgery does not read")
        return self.place(state.get("relative_path"), state.get("offset"), state.get("length"), where)

    def place(self, name: Any, offset: Any, length: Any, where: str) -> tuple[MappedFile, int, int]:
        """(file, offset, length) of a byte range a _StorageInfo records, checked to lie in the file."""
        source = self.file(name, where)
        if type(offset) is not int or type(length) is not int or offset < 0 or length < 0 or offset + length > source.size:
            raise CkptError(f"{where}: its byte range {brief(offset)}+{brief(length)} lies outside {source.path}")
        return source, offset, length

    def rank(self, place: tuple) -> int:
        """Where the place's file came first among the folder's files."""
        return self._rank[place[0].path]

    def archive(self, place: tuple, where: str, record: bool = True) -> tuple[bool, Any, list]:
        """(True, the object of the torch.save archive at `place`, its placeholder events), or
        (False, None, []) where the range holds no archive (a chunk's raw bytes). `record`: add
        its events to the folder's (a value's: read with the folder; a chunk holding any is
        refused, and is read later, when its bytes are asked for — the folder's events are
        settled by then)."""
        source, offset, length = place
        key = (source.path, offset, length)
        if key not in self._loaded:
            if length >= 4 and bytes(source.view(offset, 4)) == b"PK\x03\x04":
                if record:
                    value, events = load_torch_zip(source, offset, length, where, self.repeated)
                    self.events += events
                else:
                    value, events = self._chunk_archive(source, offset, length, where)
                self._loaded[key] = (True, value, events)
            else:
                self._loaded[key] = (False, None, [])
        return self._loaded[key]

    def _chunk_archive(self, source: MappedFile, offset: int, length: int, where: str) -> tuple[Any, list]:
        """load_torch_zip of a chunk's archive — without zipfile where it is laid out as
        torch.save lays out one tensor's, and holds a data.pkl already read: its tensor is that
        pickle's, on this archive's storage record (see lean_archive)."""
        lean = lean_archive(source.view(offset, length))
        template = self._templates.get(lean[0], _UNREAD) if lean is not None else None
        if template is _UNREAD:  # a pickle not seen yet: read as always, and learn from it
            value, events = load_torch_zip(source, offset, length, where, self.repeated)
            self._templates[lean[0]] = template_of(value, events, lean[0], where)
            return value, events
        if template is not None:
            storage = lean_storage(source, offset, length, lean, template.storage)
            if storage is not None:
                return TensorRef(storage, template.offset, template.shape, template.stride, template.dtype,
                                 template.requires_grad, template.plain_grad), []
        return load_torch_zip(source, offset, length, where, self.repeated)  # it says what is wrong

    def chunk(self, where: str, place: tuple, dtype, sizes: tuple[int, ...]) -> TensorRef:
        """One chunk's tensor: the torch.save archive at its byte range, or its raw bytes. torch
        loads a chunk with weights_only=True: a plain, contiguous tensor, nothing else."""
        archived, value, events = self.archive(place, where, record=False)
        if archived:
            if (events or not isinstance(value, TensorRef) or value.wrap is not None or value.param_state is not None
                    or value.quant is not None or not value.is_contiguous or value.math_bits):
                raise CkptError(f"{where}: a chunk that is not one plain contiguous tensor "
                                f"(torch's DCP loader refuses it too)")
            if value.dtype is not dtype or value.shape != sizes:
                raise CkptError(f"{where}: its chunk holds {value.dtype.name} {_dims(value.shape)}, "
                                f"not the {dtype.name} {_dims(sizes)} the metadata records")
            return value
        source, offset, length = place
        tensor = TensorRef(Storage(source, offset, length), 0, sizes, contiguous_strides(sizes), dtype)
        tensor.validate(where)
        if tensor.nbytes != length:
            raise CkptError(f"{where}: its chunk holds {length} bytes, not the {tensor.nbytes} of "
                            f"{dtype.name} {_dims(sizes)}")
        return tensor

    def lazy_chunk(self, place: tuple, dtype, sizes: tuple[int, ...], key: str, laid: tuple = (),
                   share: bool = True, path: tuple | None = None) -> TensorRef:
        """The chunk at `place` (its file and byte range checked), of the dtype and sizes the
        metadata records, read (`chunk`) when its bytes are first asked for. Keys naming one
        byte range as one dtype and size share one tensor, as when read at once (`share`: False
        where no two keys name one range). `laid`: the sizes' (strides, nbytes) where known;
        `path`: the key's planner path, where known (the key is kept as its last step, which the
        tree holds anyway: see ChunkGroup)."""
        tensor = self._lazy.get(place) if share else None
        if tensor is not None and tensor.dtype is dtype and tensor.shape == sizes:
            return tensor
        made = TensorRef(None, 0, sizes, laid[0] if laid else contiguous_strides(sizes), dtype)
        source, offset, length = place
        made.storage = ChunkStorage.of_chunk(laid[1] if laid else made.nbytes,
                                             self.group(dtype, sizes, path[:-1] if path is not None else ()),
                                             source, offset, self._lengths.setdefault(length, length),
                                             path[-1] if path is not None else key)
        if share and tensor is None:
            self._lazy[place] = made
        return made

    def group(self, dtype, sizes: tuple[int, ...], before: tuple) -> ChunkGroup:
        """The ChunkGroup of one-chunk tensors of `dtype` and `sizes` whose paths begin `before`."""
        group = self._groups.get((dtype, sizes, before))
        if group is None:
            prefix = ".".join(map(str, before)) + "." if before else ""
            group = self._groups[dtype, sizes, before] = ChunkGroup(self, dtype, sizes, prefix)
        return group

    def value(self, place: tuple, where: str) -> Any:
        """A value other than a tensor. torch's loader torch.loads its bytes with
        weights_only=False: a torch.save archive, or else torch's legacy format, whose pickles it
        unpickles unrestricted whatever they hold (see dcp_chunks.legacy_value)."""
        archived, value, _ = self.archive(place, where)
        if archived:
            return value
        source, offset, length = place
        key = (source.path, offset, length)
        if key not in self._unpickled:
            value, events = legacy_value(source, offset, length, where, self.repeated)
            self.events += events
            self._unpickled[key] = value
        return self._unpickled[key]


def _dims(shape: tuple[int, ...]) -> str:
    text = str(list(shape))
    return text if len(text) <= 80 else text[:77] + "..."


FAST = True  # read `.metadata` with dcp_pickles.fast_metadata where it follows it (tests turn it off)


def read_dcp(folder: str, root: str | None) -> Checkpoint:
    meta_path = os.path.join(folder, METADATA)
    meta_file = MappedFile(meta_path)
    if not 0 < meta_file.size <= MAX_METADATA:
        raise CkptError(f"{meta_path}: {'empty' if not meta_file.size else 'larger than 1 GiB'}; not DCP metadata")
    try:
        try:
            streamed = read_streaming(_Reader(folder, []), root, meta_file) if FAST else None
        except Refused:  # the tables' way would refuse it too: read below for the words
            streamed, fast = None, None
        else:
            fast = _fast_metadata(meta_file) if FAST and streamed is None else None
        if streamed is not None:
            return streamed
        if fast is not None:
            try:
                return _read_fast(folder, root, fast)
            except CkptError:  # read again below, where the restricted unpickler's records name what is wrong
                pass
        # in memory (at most 1 GiB): io.BytesIO reads in C, and never hands out more than is left
        data = meta_file.buffer()[:]
    finally:
        meta_file.close()
    obj, events = safe_load(io.BytesIO(data), _no_persistent_ids, meta_path, _DcpUnpickler)
    del data
    meta = _fields(obj, _META + "Metadata", meta_path)
    entries, storage_data = meta.get("state_dict_metadata"), meta.get("storage_data")
    planner = meta.get("planner_data") or {}
    if type(entries) is not dict or type(storage_data) is not dict or type(planner) is not dict:
        raise CkptError(f"{meta_path}: metadata without its state_dict_metadata and storage_data tables")
    places: dict[tuple, Any] = {}  # (key, chunk offsets or None) -> _StorageInfo
    for index, info in storage_data.items():
        if not (isinstance(index, FrozenRecord) and index.qualname == _META + "MetadataIndex"):
            raise CkptError(f"{meta_path}: storage_data keyed by {_what(index)}, not MetadataIndex")
        fields = dict(index.fields)
        offset = fields.get("offset")
        places[(fields.get("fqn"), None if offset is None else _ints(offset, "an offset", meta_path))] = info

    reader = _Reader(folder, payload_events(events))
    values: dict[str, Any] = {}
    paths: dict[str, tuple] = {}
    deferred = []  # the non-tensor values, read once every data file is known: in torch's order
    for position, (key, entry) in enumerate(entries.items()):
        check_key(key, f"{meta_path}: ")
        where = f"{folder}: {short(key)}"
        paths[key] = _planner_path(planner, key, where)
        if type(entry) is InertObject and entry.qualname() == _META + "BytesStorageMetadata":
            _fields(entry, _META + "BytesStorageMetadata", where)
            info = places.get((key, None))
            if info is None:
                raise CkptError(f"{where}: the metadata does not say where its bytes lie")
            deferred.append((position, key, reader.locate(info, where), where))
        else:
            values[key] = _tensor(reader, places, key, _fields(entry, _META + "TensorStorageMetadata", where), where)
    # an unsafe load meets the values' placeholders file by file (torch's FileSystemReader
    # groups its reads by file, in the order the files first appear), so their events come in
    # that order: see write.check_not_more_executable
    for _, key, place, where in sorted(deferred, key=lambda item: (reader.rank(item[2]), item[0])):
        values[key] = reader.value(place, where)
    tree: dict = {}
    budget = [len(entries) + 1024]  # list slots the planner paths may create
    for key, path in paths.items():
        place_in_tree(tree, path, values[key], f"{folder}: {short(key)}", budget)
    root_key, tensors, others = find_root(tree, root, folder, same=True)
    return Checkpoint(folder, Format.DCP, tensors, root_key, tree, sources=list(reader.files.values()),
                      others=others, events=reader.events)


def _fast_metadata(meta_file: MappedFile) -> FastMetadata | None:
    """`.metadata` read by fast_metadata, or None where it does not follow it."""
    try:
        return fast_metadata(meta_file.buffer())  # read where it lies: no copy of it
    except Unfollowed:
        return None


def _read_fast(folder: str, root: str | None, meta: FastMetadata) -> Checkpoint:
    """read_dcp, from what fast_metadata read: each check read_dcp makes of the records that
    fast_metadata has not made already, the same tensors and values, the same tree. Any
    refusal here is read_dcp's to word (the caller reads the folder again the general way)."""
    reader = _Reader(folder, [])  # torch's own records make no events
    try:
        return _read_fast_with(reader, root, meta)
    except CkptError:
        reader.release()
        raise


def _read_fast_with(reader: _Reader, root: str | None, meta: FastMetadata) -> Checkpoint:
    folder, planner, places = reader.folder, meta.planner, meta.storage
    where = folder  # the words of a refusal here are never shown (see _read_fast)
    layouts: dict[int, tuple] = {}  # id(spec) -> (strides, nbytes, spec): specs repeat from key to key
    tree: dict = {}
    budget = [len(meta.entries) + 1024]
    parents: dict[str, dict] = {}  # the first step of two-step paths -> the dict place_in_tree made there
    deferred = []
    for position, (key, spec) in enumerate(meta.entries.items()):
        path = planner.pop(key, None)  # (popped, here and below: the tables shrink as the checkpoint grows)
        if path is None:
            path = (key,)
        else:  # (its steps are checked as they are read)
            try:
                named = ".".join(path)
            except TypeError:  # a list index among them
                named = ".".join(map(str, path))
            if named != key:
                raise CkptError(f"{where}: its planner path names another key")
        if spec is BYTES:
            info = places.pop((key, None), None)
            if info is None:
                raise CkptError(f"{where}: the metadata does not say where its bytes lie")
            deferred.append((position, key, reader.place(*info, where), f"{folder}: {short(key)}", path))
            value = _UNREAD  # (read below, in torch's order: its place in the tree is kept meanwhile)
        else:
            dtype, size, chunks = spec  # checked as read: sizes, chunks fitting and tiling the size
            if len(chunks) == 1 and chunks[0][1] == size:  # saved from one process (chunked's first case)
                info = places.pop((key, chunks[0][0]), None)
                if info is None:
                    raise CkptError(f"{where}: the metadata does not say where its chunk lies")
                laid = layouts.get(id(spec))
                if laid is None:
                    laid = layouts[id(spec)] = (contiguous_strides(size), TensorRef(None, 0, size, (), dtype).nbytes,
                                                spec)
                value = reader.lazy_chunk(reader.place(*info, where), dtype, size, key, laid, meta.shared, path)
            else:
                pieces = []
                for offsets, sizes in chunks:
                    info = places.pop((key, offsets), None)
                    if info is None:  # (or a second chunk at the same offsets: they overlap)
                        raise CkptError(f"{where}: the metadata does not say where its chunk lies")
                    pieces.append((offsets, sizes, reader.place(*info, where)))
                value = chunked(reader, key, dtype, size, pieces)
        if len(path) == 2:  # the common case, as place_in_tree would: a dict under the same first step already made
            node = parents.get(path[0])
            if node is not None and type(path[1]) is str and path[1] not in node:
                node[path[1]] = value
                continue
        place_in_tree(tree, path, value, where, budget)
        if len(path) == 2 and type(path[0]) is str and type(path[1]) is str:
            parents[path[0]] = tree[path[0]]
    for _, key, place, where, path in sorted(deferred, key=lambda item: (reader.rank(item[2]), item[0])):
        node = tree
        for step in path[:-1]:
            node = node[step]
        node[path[-1]] = reader.value(place, where)
    root_key, tensors, others = find_root(tree, root, folder, same=True)
    return Checkpoint(folder, Format.DCP, tensors, root_key, tree, sources=list(reader.files.values()),
                      others=others, events=reader.events)


_UNREAD = object()  # a value's place in the tree before it is read: anything place_in_tree would find there


def _at(tree: dict, steps: tuple) -> dict:
    """The dict at `steps` (str keys, each a dict) of a tree place_in_tree built."""
    for step in steps:
        tree = tree[step]
    return tree


def _dtype(properties: Any, where: str):
    """The dtype of a TensorProperties record (pickled by its __getstate__ as a tuple); only
    strided tensors."""
    if not (type(properties) is InertObject and properties.qualname() == _META + "TensorProperties"
            and properties.how is How.NEWOBJ and type(properties.state) is tuple and len(properties.state) == 5):
        raise CkptError(f"{where}: tensor properties that are not a TensorProperties record")
    dtype, layout = properties.state[:2]
    if not (isinstance(dtype, Global) and dtype.kind is GlobalKind.DTYPE):
        raise CkptError(f"{where}: a tensor of dtype {_what(dtype)}, which ckptsurgery does not know")
    strided = (type(layout) is InertObject and layout.qualname() == "torch.serialization._get_layout"
               and layout.args == ("torch.strided",)) or (isinstance(layout, InertGlobal) and layout.qualname() == "torch.strided")
    if not strided:
        raise CkptError(f"{where}: a tensor whose layout is not torch.strided (sparse?), which ckptsurgery does not read")
    return dtype.dtype


def _tensor(reader: _Reader, places: dict, key: str, state: dict, where: str) -> TensorRef:
    dtype = _dtype(state.get("properties"), where)
    size = _ints(state.get("size"), "its size", where)
    whole = numel_of(size)
    if whole * dtype.itemsize > INT64_MAX:
        raise CkptError(f"{where}: a size of {_dims(size)} holds more bytes than torch can address")
    chunks = state.get("chunks")
    if type(chunks) is not list:
        raise CkptError(f"{where}: no list of chunks")
    pieces, volume = [], 0
    for chunk in chunks:
        fields = _fields(chunk, _META + "ChunkStorageMetadata", where)
        offsets = _ints(fields.get("offsets"), "a chunk offset", where)
        sizes = _ints(fields.get("sizes"), "a chunk size", where)
        if len(offsets) != len(size) or len(sizes) != len(size) or any(
                o + s > n for o, s, n in zip(offsets, sizes, size)):
            raise CkptError(f"{where}: a chunk at {_dims(offsets)} of size {_dims(sizes)} does not fit its "
                            f"tensor of size {_dims(size)}")
        info = places.get((key, offsets))
        if info is None:
            raise CkptError(f"{where}: the metadata does not say where its chunk at {_dims(offsets)} lies")
        pieces.append((offsets, sizes, reader.locate(info, where)))
        volume += numel_of(sizes)
        if volume > whole:
            break
    if volume != whole:
        raise CkptError(f"{where}: its chunks hold {'more' if volume > whole else 'fewer'} elements than its "
                        f"size {_dims(size)}")
    return chunked(reader, key, dtype, size, pieces)


MAX_PATH_DEPTH = MAX_NESTING  # steps of a planner path: a real state dict nests a few levels


def _planner_path(planner: dict, key: str, where: str) -> tuple:
    """The path of `key` in the nested state dict (planner_data; the key alone where it has
    none), checked against the key: torch's loader puts the value at the path, then flattens the
    state dict again and reads each flat key's data under the steps joined by dots — metadata
    whose path names another key (two tensors' paths swapped, one renamed) is refused there, and
    here, before a value is put under another's name."""
    path = planner.get(key, (key,))
    if type(path) not in (tuple, list) or not path:
        raise CkptError(f"{where}: its planner path is not a list of keys")
    if len(path) > MAX_PATH_DEPTH:
        raise CkptError(f"{where}: its planner path is {len(path)} steps deep, more than the {MAX_PATH_DEPTH} "
                        f"a state dict may nest; refused")
    if not all(type(p) in (str, int) for p in path):
        raise CkptError(f"{where}: its planner path is not a list of keys")
    named = ".".join(map(str, path))
    if named != key:
        raise CkptError(f"{where}: its planner path (planner_data) names another key, {short(named)!r}: the "
                        f"metadata contradicts itself (torch's loader refuses it too)")
    return tuple(path)


# ---- writing ---------------------------------------------------------------------------------

DCP_VERSION = "1.0.0"  # Metadata.version as torch 2.13 writes it


def check_dcp_writable(folder: str, force: bool) -> None:
    """A DCP output is a folder: refuse to replace anything there without --force, and even with
    it anything but a DCP folder that holds nothing else — `.metadata` and the `*.distcp` data
    files torch writes — or an empty one: --force must not delete another's files (a run's
    notes, its logs) with the checkpoint they sit beside."""
    if os.path.lexists(folder):
        if not force:
            raise CkptError(f"{folder}: already exists; pass --force to overwrite it")
        if not os.path.isdir(folder) or os.path.islink(folder):
            raise CkptError(f"{folder}: exists and is not a folder; a DCP output is a folder")
        names = os.listdir(folder)
        if names and not is_dcp(folder):
            raise CkptError(f"{folder}: a folder that is not a DCP checkpoint; not replacing it, even with --force")
        others = sorted(_shown(folder, name) for name in names if not _dcp_file(folder, name))
        if others:
            raise CkptError(f"{folder}: holds more than a DCP checkpoint ({', '.join(others[:5])}"
                            f"{' …' if len(others) > 5 else ''}); not replacing it, even with --force: "
                            f"write the checkpoint to a folder of its own")
    check_parent(folder)


def _dcp_file(folder: str, name: str) -> bool:
    """Whether `name` in `folder` is a file torch's DCP writer makes: `.metadata` or a `*.distcp`
    data file (a link to one too: replacing the folder removes the link, never its target)."""
    if name != METADATA and not name.endswith(".distcp"):
        return False
    try:
        return not stat.S_ISDIR(os.lstat(os.path.join(folder, name)).st_mode)
    except OSError:
        return False


def _shown(folder: str, name: str) -> str:
    """A name in a folder as a refusal shows it: a folder's with a trailing /."""
    return name + "/" if os.path.isdir(os.path.join(folder, name)) and not os.path.islink(os.path.join(folder, name)) \
        else name


# A DAG of containers (one dict held twice, by two dicts each held twice, ...) flattens into
# exponentially many entries, as torch's own traversal would: containers may be walked more often
# than they are distinct only up to this many times in all.
MAX_REVISITS = 1_000_000


def flatten(obj: Any) -> list[tuple[str, tuple, Any]]:
    """(flat key, path, value) for every leaf, as torch's DCP flattens a state dict (its
    `traverse_state_dict`): dicts are walked, lists only when they hold tensors or dicts (see
    `_walked`), and a key is the path's steps joined by dots. Linear in what it returns: a
    container's path is built once, when a leaf in it needs it, from links to its parents (each
    level copying its parent's path made a 200,000-level one take a minute). Deeper than
    MAX_PATH_DEPTH is refused (a container inside itself too), as a reader refuses such a path."""
    out: list[tuple[str, tuple, Any]] = []
    lists: dict[int, bool] = {}  # id -> whether the list is walked (_walked)
    seen: set[int] = set()
    revisits = 0
    top = [None, None, 0, ()]  # a container's link: [parent's link, step, depth, its path once built]
    stack = [(top, str(k), v) for k, v in reversed(list(obj.items()))] if isinstance(obj, dict) else [(top, "", obj)]
    while stack:  # an explicit stack: a hostile input may nest deeper than Python recurses
        parent, step, value = stack.pop()
        if isinstance(value, dict):
            children = [(str(k), v) for k, v in value.items()]
        elif type(value) is list and _walked(value, lists):
            children = list(enumerate(value))
        else:
            path = _path(parent) + (step,)
            out.append((".".join(map(str, path)), path, value))
            continue
        link = [parent, step, parent[2] + 1, None]
        if id(value) in seen:
            revisits += 1
            if revisits > MAX_REVISITS:
                raise CkptError(f"{short('.'.join(map(str, _path(link))))}: the checkpoint holds the same "
                                f"containers inside each other over and over, which a DCP checkpoint would "
                                f"write out exponentially many times; refused")
        seen.add(id(value))
        if link[2] >= MAX_PATH_DEPTH and children:
            raise CkptError(f"{short('.'.join(map(str, _path(link))))}: nests more than {MAX_PATH_DEPTH} levels "
                            f"deep, which a DCP checkpoint cannot hold (nor ckptsurgery read back)")
        stack.extend((link, step, v) for step, v in reversed(children))
    keys = [k for k, _, _ in out]
    if len(set(keys)) != len(keys):
        raise CkptError("two entries flatten to one DCP key (a key with a dot beside a nested one)")
    return out


def _path(link: list) -> tuple:
    """The path of the container at `link`, built once: from the nearest parent whose path is."""
    if link[3] is None:
        steps, node = [], link
        while node[3] is None:
            steps.append(node[1])
            node = node[0]
        link[3] = node[3] + tuple(reversed(steps))
    return link[3]


def _walked(root: list, lists: dict[int, bool]) -> bool:
    """Whether torch's traversal walks into the list `root` (its `_is_terminal` is false): it
    holds a tensor, a dict, or a list it walks into. Each list is judged once (`lists`, by id),
    without recursion; a list inside itself counts, there, as not walked."""
    stack = [(root, False)]
    while stack:
        value, judged = stack.pop()
        if id(value) in lists:
            continue
        if judged:
            lists[id(value)] = any(isinstance(v, (TensorRef, dict)) or (type(v) is list and lists.get(id(v), False))
                                   for v in value)
        else:
            stack.append((value, True))
            stack.extend((v, False) for v in value if type(v) is list and id(v) not in lists)
    return lists[id(root)]


class DcpWriter:
    """A DCP checkpoint of `obj` (a state dict, possibly nested), written in parts so that
    threads or ranks can share the work: the data files, each on its own and in any order
    (`write_file`), then `.metadata` from where every value landed (`write_metadata`). One
    `.distcp` file, or several when `max_file_size` splits them, filled in key order; each value
    a torch.save archive at its byte range. `cast` applies to the tensors whose flat key is in
    `cast_names`."""

    def __init__(self, obj: Any, *, cast_names: set[str], cast, max_file_size: int | None = None):
        self.entries = flatten(obj)
        for key, _, value in self.entries:
            if isinstance(value, TensorRef) and not value.is_plain:
                raise CkptError(f"{key}: a {value.dtype.name} tensor; DCP checkpoints hold plain tensors only "
                                f"(write .pth instead)")
        sizes = [(key, value.nbytes if isinstance(value, TensorRef) else 0) for key, _, value in self.entries]
        groups = plan_shards(sizes, max_file_size) if max_file_size and sizes else [[k for k, _ in sizes]]
        self.files = [(f"__0_{number}.distcp", keys) for number, keys in enumerate(groups)]
        self._values = {key: value for key, _, value in self.entries}
        self._cast_names, self._cast = cast_names, cast

    def nbytes(self, number: int) -> int:
        """The tensor bytes of data file `number` (what a progress bar counts)."""
        return sum(v.nbytes for v in map(self._values.get, self.files[number][1]) if isinstance(v, TensorRef))

    def _stored(self, key: str, value: TensorRef):
        """(the tensor on its own storage, the dtype it is written in)."""
        value = standalone(value)
        return value, cast_target(value.dtype, self._cast) if key in self._cast_names else value.dtype

    def write_file(self, folder: str, number: int, progress=None) -> dict[str, tuple[str, int, int]]:
        """Write data file `number` into `folder`; return where each of its values lies:
        key -> (file name, offset, length)."""
        name, keys = self.files[number]
        places = {}
        with open(os.path.join(folder, name), "xb") as f:
            for key in keys:
                value = self._values[key]
                offset = f.tell()
                if isinstance(value, TensorRef):
                    value, dtype = self._stored(key, value)
                    events = write_torch(f, value, self._cast if dtype is not value.dtype else None, progress,
                                         cast_only={key: value})
                else:
                    events = write_torch(f, value)
                if events:  # torch's DCP loader reads values with weights_only=False: they would run
                    raise CkptError(f"{key}: holds {events[0].qualname()}, which torch's DCP loader would import "
                                    f"and run (it unpickles values unrestricted); write .pth, or drop the entry")
                places[key] = (name, offset, f.tell() - offset)
        return places

    def write_metadata(self, folder: str, places: dict[str, tuple[str, int, int]]) -> None:
        """`.metadata`, a pickle of torch's own dataclasses that `torch.distributed.checkpoint.load`
        reads, once every data file is written (`places`: what write_file returned, merged)."""
        import pickle

        import torch
        from torch.distributed.checkpoint.filesystem import _StorageInfo
        from torch.distributed.checkpoint.metadata import (
            BytesStorageMetadata, ChunkStorageMetadata, Metadata, MetadataIndex, StorageMeta, TensorProperties,
            TensorStorageMetadata,
        )

        state_dict_metadata, storage_data, planner_data = {}, {}, {}
        names = {name: name for name, _ in self.files}
        for key, path, value in self.entries:  # key order, whichever thread or rank wrote the value
            if isinstance(value, TensorRef):
                value, dtype = self._stored(key, value)
                size = torch.Size(value.shape)
                state_dict_metadata[key] = TensorStorageMetadata(
                    TensorProperties(dtype=getattr(torch, dtype.name)), size,
                    [ChunkStorageMetadata(offsets=torch.Size([0] * len(size)), sizes=size)])
                index = MetadataIndex(key, [0] * len(size), 0)
            else:
                state_dict_metadata[key] = BytesStorageMetadata()
                index = MetadataIndex(key)
            name, offset, length = places[key]
            # the file's own name object: pickle then writes each file name once, however many
            # values it holds, and however `places` reached this process (another rank's JSON)
            storage_data[index] = _StorageInfo(names[name], offset, length)
            planner_data[key] = path
        metadata = Metadata(state_dict_metadata=state_dict_metadata, planner_data=planner_data,
                            storage_data=storage_data, storage_meta=StorageMeta(), version=DCP_VERSION)
        with open(os.path.join(folder, METADATA), "xb") as f:
            f.write(pickle.dumps(metadata, protocol=4))
