"""What torch's DCP loader unpickles without restriction, read by the restricted unpickler:
`.metadata` (torch's FileSystemReader.read_metadata is a plain pickle.load; the bytes of values
that are not torch.save archives, which its loader torch.loads with weights_only=False, are
dcp_chunks.legacy_value's). Nothing here runs; it says what torch would run — the placeholder
events a folder's reader lists and orders (see io/dcp.py, torch_zip.check_not_more_executable).
And fast_metadata: a `.metadata` made of torch's own records, as torch writes them and nothing
else, read without a Python call per opcode (any other is the restricted unpickler's) — into
tables, or streamed into the table of tensors (dcp_chunks.Stream)."""

from __future__ import annotations

import re
from typing import Any

from .model import INT64_MAX, Storage, TensorRef
from .pickled import Global, GlobalKind, How, InertGlobal, InertObject
from .dcp_tokens import (
    FIELDS_RE, GLOBAL_RE, MAX_RUNS, NUMBER, NUMBER_GROUP, NUMBER_RE, NUMBERS, OPAQUE, RECORD_RE, REF_GROUP, SIZE_RE, TEXT,
    TEXT_RE, Known, Restart, StreamedEntries, StreamedPaths, StreamedPlaces, Tokens, Unfollowed, entry_spec,
)
from .unpickler import MAX_HASH_WORK, MAX_NESTING

DCP_META = "torch.distributed.checkpoint.metadata."  # the module of torch's records, as .metadata names it
STORAGE_INFO = "torch.distributed.checkpoint.filesystem._StorageInfo"


# ---- what torch runs: .metadata's own imports and calls --------------------------------------------
# torch's FileSystemReader.read_metadata is a plain pickle.load: every import and call `.metadata`
# makes runs. Those that build the records torch writes, the way torch writes them, neither run
# code from the file nor fail, and are left out; every other one — a payload in a field no reader
# looks at, a getattr/import_module chain, a record built so that torch's load of it fails — is
# an event of the folder: listed by inspect, and met first by an unsafe load (torch reads
# .metadata before any value), see torch_zip.check_not_more_executable.

_RECORDS = frozenset([DCP_META + name for name in ("Metadata", "TensorStorageMetadata", "BytesStorageMetadata",
                                                "ChunkStorageMetadata", "MetadataIndex", "StorageMeta")]
                     + [STORAGE_INFO])  # dataclasses: NEWOBJ, then BUILD with a dict of fields
_PROPERTIES = DCP_META + "TensorProperties"  # NEWOBJ, then BUILD with the 5-tuple of its __getstate__
_MEMORY_FORMAT = DCP_META + "_MEM_FORMAT_ENCODING"
_LAYOUTS = frozenset(f"torch.{name}" for name in ("strided", "sparse_coo", "sparse_csr", "sparse_csc", "sparse_bsr",
                                                  "sparse_bsc", "_mkldnn", "jagged"))
_PATHS = frozenset(f"{module}.{name}" for module in ("pathlib", "pathlib._local")
                   for name in ("PosixPath", "PurePosixPath"))  # StorageMeta.checkpoint_id


def _text_args(args: tuple) -> bool:
    return all(type(a) is str for a in args)


# callee -> whether torch makes a call with these arguments without fail
_CALLS = {
    "torch.serialization._get_layout": lambda args: len(args) == 1 and type(args[0]) is str and args[0] in _LAYOUTS,
    _MEMORY_FORMAT: lambda args: len(args) == 1 and type(args[0]) is int and 0 <= args[0] <= 2,
    **{name: _text_args for name in _PATHS},
}
_IMPORTS = _RECORDS | {_PROPERTIES, "pathlib.WindowsPath", "pathlib._local.WindowsPath", *_CALLS,
                       *(f"torch.{name}" for name in ("strided", "contiguous_format", "channels_last",
                                                      "channels_last_3d", "preserve_format"))}


def _torch_made(event: Any, own: dict[int, str]) -> bool:
    """Whether `event` is one of the imports and calls of a `.metadata` as torch writes it (`own`:
    the names of the placeholders of _IMPORTS, by id)."""
    if id(event) in own:
        return True
    name = own.get(id(event.callee)) if type(event) is InertObject else None
    if name is None or event.listitems or event.dictitems:
        return False
    state = event.state
    if event.how is How.NEWOBJ and not event.args:
        if name in _RECORDS:
            return state is None or type(state) is dict
        if name == _PROPERTIES and type(state) is tuple and len(state) == 5:
            memory = state[3]
            return (type(memory) is InertObject and own.get(id(memory.callee)) == _MEMORY_FORMAT
                    and _torch_made(memory, own))
        return False
    check = _CALLS.get(name)
    return event.how is How.REDUCE and state is None and check is not None and check(event.args)


def payload_events(events: list) -> list:
    """The events of a `.metadata`'s pickle that are not torch's own records (see above), in order."""
    own = {id(e): e.qualname() for e in events if type(e) is InertGlobal and e.qualname() in _IMPORTS}
    records = {key for key, name in own.items() if name in _RECORDS}
    newobj = How.NEWOBJ
    # the common case inline (a record: ~5 events per key of a 100,000-key folder), the rest asked
    return [e for e in events
            if not (type(e) is InertObject and id(e.callee) in records and e.how is newobj and not e.args
                    and (e.state is None or type(e.state) is dict) and not e.listitems and not e.dictitems)
            and not _torch_made(e, own)]


# ---- .metadata as torch writes it, read without a Python call per opcode --------------------------
# The restricted unpickler spends ~150 opcodes on an entry of a `.metadata`, a Python call each: ~70
# µs a key. torch writes every entry alike (the same records, their classes and field names memo
# references to where they first appeared), so most of an entry's bytes repeat verbatim from one
# entry to the next. fast_metadata reads a `.metadata` made of torch's own records written the way
# torch writes them, and nothing else: a run of bytes is read token by token the first time (what
# the restricted unpickler would build from it, held to every check read_dcp makes of it), its later
# copies recognised by a regular expression and a dictionary (dcp_tokens). Any other opcode, global,
# call, field or shape of record, a reference to anything but a string, a global or a torch.Size, a
# frame boundary inside a token: it gives up (Unfollowed), and the restricted unpickler reads the
# file, and reports what it holds, as always. What it follows makes no placeholder event but those
# of torch's own records (payload_events of it is empty) and reads as read_dcp reads it by the
# restricted unpickler (tests/test_dcp_scale.py holds the two to each other, on mutated files too).


_MEMFMT = Known("<a memory format>")  # what _MEM_FORMAT_ENCODING(0, 1 or 2) makes
_STRIDED = Known("torch.strided")  # torch.strided, named or made by _get_layout("torch.strided")
_GET_LAYOUT = "torch.serialization._get_layout"
_KNOWN = {name: Known(name) for name in (*_RECORDS, _PROPERTIES, _MEMORY_FORMAT, _GET_LAYOUT, *_PATHS)}
_KNOWN["torch.strided"] = _STRIDED
BYTES = Known("<bytes>")  # an entry that is a BytesStorageMetadata


def _record_names(*names: str) -> tuple:
    return tuple(_KNOWN[DCP_META + name] for name in names)


_METADATA, _TSM, _BSM, _CSM, _INDEX, _STORAGE_META, _TP = _record_names(
    "Metadata", "TensorStorageMetadata", "BytesStorageMetadata", "ChunkStorageMetadata", "MetadataIndex",
    "StorageMeta", "TensorProperties")
_INFO = _KNOWN[STORAGE_INFO]
_AFTER_STEP = (OPAQUE,)  # a path's last step, new, then its tuple: the memo slots path_run adds
_ZEROS = {rank: (0,) * rank for rank in range(65)}  # a one-chunk tensor's chunk offsets, by its rank
# a one-chunk ChunkStorage's place, in its own fields until it is read (dcp_chunks.ChunkGroup)
_RAW_SOURCE, _RAW_OFFSET, _RAW_KEY = (Storage.__dict__[name] for name in ("source", "offset", "key"))


class FastMetadata:
    """A `.metadata` as read_dcp reads its records: `entries` (key -> BYTES, or (dtype, size,
    ((chunk offsets, chunk sizes), ...)) with every integer from 0 to 2**63 - 1, the size's bytes
    within int64, the chunks fitting it and holding its elements), `planner` (key -> path of str
    and int steps, 1 to 200 of them) and `storage` ((key, chunk offsets or None) -> (file name,
    offset, length)), in the order of the records; `shared`: whether two records of `storage`
    name one byte range."""

    __slots__ = ("entries", "planner", "storage", "shared")

    def __init__(self, entries: dict, planner: dict, storage: dict):
        self.entries, self.planner, self.storage = entries, planner, storage
        self.shared = len(set(storage.values())) != len(storage)  # two records name one byte range


def fast_metadata(data, sink=None) -> FastMetadata | None:
    """`data` (a `.metadata`'s bytes) read as torch's records; Unfollowed where it is anything else.
    With a `sink` (dcp_chunks.Stream), its tensors are handed to it as they are read instead,
    and nothing is returned: see _Fast's streaming."""
    try:
        tables = _Fast(data, sink).metadata()
    except Unfollowed:
        raise
    except Exception as e:  # read past the end (IndexError), or what a malformed file may raise
        raise Unfollowed(f"{type(e).__name__}: {e}") from None
    return FastMetadata(*tables) if sink is None else None


def _patterns() -> dict:
    """Regular expressions over whole tokens (dcp_tokens) for the runs torch repeats: an entry's
    value, and an index with its storage info (its varying parts in groups). What one matches is
    read token by token the first time; only then is the match trusted."""
    text, glob, number, size, record, fields = TEXT_RE, GLOBAL_RE, NUMBER_RE, SIZE_RE, RECORD_RE, FIELDS_RE
    chunk = record + fields + text + size + text + size + b"ub"
    tensor = (record + fields + text + record + b"\\(" + glob + glob + b"(?:" + text + b"\\x85\\x94R\\x94)?[\\x88\\x89]"
              + glob + b"(?:" + number + b"\\x85\\x94R\\x94)?[\\x88\\x89]t\\x94b" + text + size + text
              + b"\\]\\x94(?:" + chunk + b"a|\\((?:" + chunk + b")++e)*+ub")
    index = (b"(?P<h>" + record + fields + text + b")(?P<f>" + text + b")(?P<t>" + text + b"(?:" + number + b"|N)(?:"
             + text + size + b")?ub)")
    info = (b"(?P<sh>" + record + fields + text * 3 + b")(?P<o>" + number + b")(?P<sm>" + text + b")(?P<n>" + number
            + b")ub")
    return {"entry": re.compile(b"(?:" + tensor + b"|" + record + b")"), "storage": re.compile(index + info),
            "keyed entry": re.compile(b"\\x8c([\\s\\S])([^\\x94]*+)\\x94((?:" + tensor + b"|" + record + b"))")}


_compiled: dict = {}


class _Fast(Tokens):
    """One read of a `.metadata` (dcp_tokens.Tokens): its sections, each item read token by
    token the first time its bytes are met (entry, path_tokens, place), later copies in runs
    (entry_run, path_run, place_run). `tally`: storage_data's items read.

    Streaming (a `sink`): no tables. The entries are kept as their keys' memo indexes and their
    specs; each planner path, in the entries' order, makes its key's tensor (sink.tensor, which
    puts it in the tree), and the tensor takes the key's place in the memo, so the key's string
    is gone once its path is read; each storage record names its tensor through the memo and
    hands it its place (sink.place). Items' keys are (memo index, key) there. Anything else — an
    entry that is not one chunk, paths in another order or missing, a record naming a string —
    is a Restart: the tables' way reads it."""

    known = _KNOWN

    def __init__(self, data, sink=None):
        if not _compiled:
            _compiled.update(_patterns())
        super().__init__(data)
        self.sink = sink
        if sink is not None:
            self.streamed = StreamedEntries()
            self.streamed_paths = StreamedPaths(self.streamed, self.memo, sink)
        self.entry_runs: dict[bytes, tuple] = {}  # an entry's value's bytes -> (spec, memo items)
        self.entry_literals: dict = {}  # a run -> (match of it spelled out, its run): see literal
        self.storage_literals: dict = {}
        self.path_literals: dict = {}
        self.entry_literal = self.storage_literal = self.path_literal = None  # the last used
        self.storage_runs: dict[tuple, tuple] = {}  # an index and info's fixed parts -> what they hold

    def metadata(self) -> tuple[dict, dict, dict]:
        """FastMetadata's entries, planner and storage."""
        b = self.b
        pos = self.state(self.record(self.start(), _METADATA))
        read = {"state_dict_metadata": self.entries, "planner_data": self.planner, "storage_data": self.storage,
                "storage_meta": self.storage_meta, "version": self.version}
        fields: dict = {}
        while b[pos] != 0x75:  # SETITEMS
            name, pos = self.text(pos)
            if name in fields or name not in read:
                raise Unfollowed(f"a Metadata field {name[:40]!r}")
            fields[name], pos = read[name](pos)
        self.expect(pos, b"ub.")  # what follows STOP is never read, by either reader
        entries, storage = fields.get("state_dict_metadata"), fields.get("storage_data")
        if entries is None or storage is None:
            raise Unfollowed("metadata without its tables")
        if self.sink is not None and self.streamed_paths.count != len(self.streamed.at):
            raise Restart("keys without a planner path")
        return entries, fields.get("planner_data") or {}, storage

    # -- state_dict_metadata: key -> tensor (dtype, size, chunks) or bytes ------------------------------
    def entries(self, pos: int) -> tuple[dict, int]:
        return self.items(pos, self.entry, self.entry_run, self.streamed if self.sink is not None else None)

    def entry_run(self, pos: int, out: dict) -> int:
        """Entries as torch writes them after the first few: a new key, then a value whose bytes
        were read before (entry_runs) — those of the entry before first, spelled out (literal)."""
        b, memo, runs, bound = self.b, self.memo, self.entry_runs, self.bound
        generic, literal = _compiled["keyed entry"].match, self.entry_literal
        streaming, last = self.sink is not None, None
        if streaming:
            indexes, specs, taken, seen = out.at, out.specs, out.taken, out.keys.add
        while True:
            m = literal[0](b, pos) if literal is not None else None
            if m is not None:
                size, key = m.groups()
                run = literal[1]
            else:
                m = generic(b, pos)
                if m is None:
                    break
                size, key, value = m.groups()
                run = runs.get(value)
                if run is None:
                    break
                literal = self.literal(self.entry_literals, value, run, b"\\x8c([\\s\\S])([^\\x94]*+)\\x94", value)
            if size[0] != len(key):
                break
            try:
                key = str(key, "utf-8")
            except UnicodeDecodeError:
                break
            end = m.end()
            if end >= bound:
                if end > bound:  # a frame's header among them: read token by token (entry)
                    break
                end = self.past(pos, end)
                bound = self.bound
            if streaming:  # StreamedEntries, inline
                spec = run[0]
                if id(spec) not in taken:
                    out[(memo.n, key)] = spec  # (looked at there)
                else:
                    indexes.append(memo.n)
                    specs.append(spec)
                    seen(key)
            else:
                out[key] = run[0]
            if last is not None and last.items is run[1]:  # (the memo's last segment: see Memo.repeat)
                last.values.append(key)
                memo.n += last.period
            else:
                last = memo.repeat(run[1], key, True)
            pos = end
        self.entry_literal = literal
        return pos

    def entry(self, pos: int) -> tuple[Any, Any, int]:
        index = len(self.memo)
        if self.sink is not None:
            if self.b[pos] not in (0x8C, 0x58):  # a key named before
                raise Restart("a key that is not a new string")
            key, pos = self.text(pos)
            key = (index, key)
        else:
            key, pos = self.text(pos)
        m = _compiled["entry"].match(self.b, pos)
        run = self.entry_runs.get(m.group()) if m and m.end() <= self.bound else None
        if run is None:  # first seen: read token by token
            saved = len(self.memo)
            spec, end = self.entry_value(pos)
            if m and end == m.end() and len(self.entry_runs) < MAX_RUNS:
                self.entry_runs[m.group()] = (spec, tuple(self.memo[saved:]))
            return key, spec, end
        spec, items = run
        self.memo += items
        end = m.end()
        if end == self.bound:
            end = self.past(pos, end)
        return key, spec, end

    def entry_value(self, pos: int) -> tuple[Any, int]:
        """A BytesStorageMetadata (BYTES: no fields, no BUILD) or a TensorStorageMetadata: its
        properties (a strided dtype), size and chunks, checked as read_dcp checks them."""
        cls, pos = self.glob(pos)
        pos = self.expect(pos, b")\x81\x94")
        self.memo.append(OPAQUE)
        if cls is _BSM:
            return BYTES, pos
        if cls is not _TSM:
            raise Unfollowed("an entry that is neither a tensor nor bytes")
        pos = self.record(self.field(self.state(pos), "properties"), _TP)
        pos = self.expect(pos, b"(")  # __getstate__'s tuple: dtype, layout, requires_grad, memory format, pin_memory
        dtype, pos = self.glob(pos)
        if not (isinstance(dtype, Global) and dtype.kind is GlobalKind.DTYPE):
            raise Unfollowed("a dtype that is not one")
        layout, pos = self.glob(pos)
        if layout is _KNOWN[_GET_LAYOUT]:
            name, pos = self.call(pos, self.text)
            if name != "torch.strided":
                raise Unfollowed("a layout other than torch.strided")
            self.memo.append(_STRIDED)
        elif layout is not _STRIDED:
            raise Unfollowed("a layout other than torch.strided")
        pos = self.flag(pos)
        memory, pos = self.glob(pos)
        if memory is _KNOWN[_MEMORY_FORMAT]:
            code, pos = self.call(pos, self.number)
            if not 0 <= code <= 2:
                raise Unfollowed("a memory format torch never writes")
            self.memo.append(_MEMFMT)
        elif memory is not _MEMFMT:
            raise Unfollowed("not a memory format")
        pos = self.expect(self.flag(pos), b"t\x94b")
        self.memo.append(OPAQUE)  # the tuple
        size, pos = self.size(self.field(pos, "size"))
        pos = self.expect(self.field(pos, "chunks"), b"]\x94")
        self.memo.append(OPAQUE)  # the list
        b, chunks = self.b, []
        while b[pos] != 0x75:  # SETITEMS: the fields end
            if b[pos] == 0x28:  # MARK ... APPENDS
                pos = self.expect(pos, b"(")
                while b[pos] != 0x65:
                    chunk, pos = self.chunk(pos)
                    chunks.append(chunk)
                pos = self.expect(pos, b"e")
            else:  # one, APPEND
                chunk, pos = self.chunk(pos)
                chunks.append(chunk)
                pos = self.expect(pos, b"a")
        return entry_spec(dtype.dtype, size, chunks), self.expect(pos, b"ub")

    def chunk(self, pos: int) -> tuple[tuple, int]:
        pos = self.field(self.state(self.record(pos, _CSM)), "offsets")
        offsets, pos = self.size(pos)
        sizes, pos = self.size(self.field(pos, "sizes"))
        return (offsets, sizes), self.expect(pos, b"ub")

    # -- planner_data: key -> path ---------------------------------------------------------------------
    def planner(self, pos: int) -> tuple[dict | None, int]:
        if self.b[pos] == 0x4E:  # NONE
            return None, self.expect(pos, b"N")
        if self.sink is not None:  # as dcp._read_fast_with's (a key twice: a Restart, see StreamedEntries)
            self.sink.budget = [self.streamed.done() + 1024]
        return self.items(pos, self.path_tokens, self.path_run, self.streamed_paths if self.sink is not None else None)

    def path_run(self, pos: int, out: dict) -> int:
        """Keys and paths as torch writes most: a reference to the key, then up to three steps,
        each a string (new, or a reference) or a small integer, TUPLE1-3 MEMOIZE — those whose
        steps but a new last one are spelled as the one before's first (literal). At anything
        else, or any doubt, it stops (path_tokens reads that one)."""
        b, memo, bound, literal = self.b, self.memo, self.bound, self.path_literal
        streaming, last = self.sink is not None, None
        first = end_keys = 0  # where the keys' memo slots were last found (Memo.keyed)
        period, keys = 1, None
        if streaming:  # (the tensors made as paths are read: see StreamedPaths)
            paths = out
            at, entries, specs, make = paths.count, paths.entries.at, paths.entries.specs, self.sink.tensor
        while True:
            m = literal[0](b, pos) if literal is not None else None
            if m is not None:
                ref, size, text = m.groups()
                index = ref[1] if ref[0] == 0x68 else int.from_bytes(ref[1:], "little")
                slot = (index - first) // period
                if not (first <= index < end_keys and first + slot * period == index):
                    found = memo.keyed(index)
                    if found is not None:
                        first, end_keys, period, keys = found
                        slot = (index - first) // period
                    else:
                        slot = -1
                key = keys[slot] if slot >= 0 else memo[index] if index < len(memo) else None
                if type(key) is str and size[0] == len(text):
                    try:
                        step = str(text, "utf-8")
                    except UnicodeDecodeError:
                        step = None
                    end = m.end()
                    if step is not None and end <= bound:  # (a frame's header among them: path_fast)
                        if end == bound:
                            end = self.past(pos, end)
                            bound = self.bound
                        if last is not None:  # (the memo's last segment: see Memo.repeat)
                            last.values.append(step)
                            memo.n += 2
                        else:
                            last = memo.repeat(_AFTER_STEP, step, True)
                        path = literal[1] + (step,)
                        if streaming:
                            if at >= len(entries) or entries[at] != index:
                                paths.count = at
                                raise Restart("planner_data not in state_dict_metadata's order")
                            spec, specs[at] = specs[at], None
                            at += 1
                            made = make(key, spec, path)
                            if slot >= 0:
                                keys[slot] = made
                            else:
                                memo[index] = made
                        else:
                            out[key] = path
                        pos = end
                        continue
            last = None
            read = self.path_fast(pos)
            if read is None:
                break
            index, key, steps, end, shape = read
            if streaming:
                paths.count = at
                out[(index, key)] = steps
                at = paths.count
            else:
                out[key] = steps
            if shape is not None:
                literal = self.literal(self.path_literals, shape, steps[:-1], REF_GROUP, shape[0],
                                       b"\\x8c([\\s\\S])([^\\x94]*+)\\x94", shape[1], b"")
            pos, bound = end, self.bound
        if streaming:
            paths.count = at
        self.path_literal = literal
        return pos

    def path_fast(self, pos: int) -> tuple | None:
        """One key and path of path_run's form, or None (and nothing read): (the key's memo index,
        key, path, end,
        (the bytes of the steps before a new last one, the closing TUPLE MEMOIZE) where it ends
        so, else None)."""
        b, memo, start, saved = self.b, self.memo, pos, len(self.memo)
        code = b[pos]
        if code == 0x6A:
            index, pos = int.from_bytes(b[pos + 1 : pos + 5], "little"), pos + 5
        elif code == 0x68:
            index, pos = b[pos + 1], pos + 2
        else:
            return None
        key, key_index = (memo[index] if index < saved else None), index
        steps, after_key, new = [], pos, None  # new: where the first new string starts
        while type(key) is str and len(steps) <= 3:
            code = b[pos]
            if code == 0x8C:
                end = pos + 2 + b[pos + 1]
                if b[end] != 0x94:
                    break
                try:
                    step = str(b[pos + 2 : end], "utf-8")
                except UnicodeDecodeError:
                    break
                memo.append(step)
                new = pos if new is None else -1
                pos = end + 1
            elif code == 0x68 or code == 0x6A:
                index = b[pos + 1] if code == 0x68 else int.from_bytes(b[pos + 1 : pos + 5], "little")
                step = memo[index] if index < saved else None
                if type(step) is not str:
                    break
                new = -1 if new is not None else None
                pos += 2 if code == 0x68 else 5
            elif code == 0x4B:  # BININT1: a list index
                step, pos, new = b[pos + 1], pos + 2, -1
            elif code - 0x84 == len(steps) and steps and b[pos + 1] == 0x94:  # TUPLE1-3 MEMOIZE
                end = pos + 2
                if end > self.bound:  # a frame's header among them: read token by token (path_tokens)
                    break
                memo.append(OPAQUE)
                shape = (b[after_key:new], b[pos:end]) if new is not None and new >= 0 else None
                return key_index, key, tuple(steps), self.past(start, end) if end == self.bound else end, shape
            else:
                break
            steps.append(step)
        del memo[saved:]
        return None

    def path_tokens(self, pos: int) -> tuple[Any, tuple, int]:
        b = self.b
        if self.sink is not None:  # (index, key): a reference to an entry's key
            if b[pos] not in (0x68, 0x6A):
                raise Restart("a planner key that is not an entry's")
            index = b[pos + 1] if b[pos] == 0x68 else int.from_bytes(b[pos + 1 : pos + 5], "little")
            key, pos = self.text(pos)
            key = (index, key)
        else:
            key, pos = self.text(pos)
        b, steps = self.b, []
        marked = b[pos] == 0x28
        if marked:
            pos = self.expect(pos, b"(")
        while b[pos] in TEXT or b[pos] in NUMBER:
            step, pos = self.text(pos) if b[pos] in TEXT else self.number(pos)
            steps.append(step)
            if len(steps) > MAX_NESTING or not marked and len(steps) > 3:
                raise Unfollowed("a planner path deeper than a state dict nests")
        if not steps:
            raise Unfollowed("an empty planner path")
        pos = self.expect(pos, (b"t" if marked else bytes([0x84 + len(steps)])) + b"\x94")
        self.memo.append(OPAQUE)
        return key, tuple(steps), pos

    # -- storage_data: (key, chunk offsets) -> (file, offset, length) ------------------------------------
    def storage(self, pos: int) -> tuple[dict, int]:
        self.tally = 0
        streaming = self.sink is not None
        places, pos = self.items(pos, self.place, self.place_run, StreamedPlaces(self.sink) if streaming else None)
        if len(places) != self.tally:  # two indexes of one chunk: which one counts is subtle; not here
            raise Unfollowed("two storage records for one chunk")
        # each index's offset is a tuple the restricted unpickler hashes as it makes the key
        if (self.tally if streaming else sum(offsets is not None for _, offsets in places)) > MAX_HASH_WORK:
            raise Unfollowed("as many keys as the restricted unpickler refuses")
        return places, pos

    def place_run(self, pos: int, out: dict) -> int:
        """Indexes and their storage info as torch writes them after the first few: their fixed
        parts read before (storage_runs) — those of the one before first, spelled out (literal) —
        a reference to a key, two integers."""
        b, memo, runs, bound = self.b, self.memo, self.storage_runs, self.bound
        generic, literal, count = _compiled["storage"].match, self.storage_literal, 0
        streaming, last = self.sink is not None, None
        named = str if not streaming else TensorRef  # what a record's key is in the memo (streaming: its tensor)
        first = end_keys = 0  # where the keys' memo slots were last found (Memo.keyed)
        period, keys = 1, None
        if streaming:
            lasts, sink = self.sink.last, self.sink
        while True:
            m = literal[0](b, pos) if literal is not None else None
            if m is not None:
                fqn, offset, length = m.groups()
                run = literal[1]
            else:
                m = generic(b, pos)
                if m is None:
                    break
                head, fqn, tail, info_head, offset, info_middle, length = m.groups()
                parts = (head, tail, info_head, info_middle)
                run = runs.get(parts)
                if run is None:
                    break
                literal = self.literal(self.storage_literals, parts, run, b"", head, REF_GROUP, tail + info_head,
                                       NUMBER_GROUP, info_middle, NUMBER_GROUP + b"ub")
            if fqn[0] == 0x8C:
                break
            index = fqn[1] if fqn[0] == 0x68 else int.from_bytes(fqn[1:], "little")
            slot = (index - first) // period
            if not (first <= index < end_keys and first + slot * period == index):
                found = memo.keyed(index)
                if found is not None:
                    first, end_keys, period, keys = found
                    slot = (index - first) // period
                else:
                    slot = -1
            key = keys[slot] if slot >= 0 else memo[index] if index < len(memo) else None
            if type(key) is not named:
                break
            end = m.end()
            if end >= bound:
                if end > bound:  # a frame's header among them: read token by token (place)
                    break
                end = self.past(pos, end)
                bound = self.bound
            items, _, offsets, relative_path = run
            if last is not None and last.items is items:  # (the memo's last segment: see Memo.repeat)
                memo.n += last.period
            else:
                last = memo.repeat(items)
            offset, length = NUMBERS[offset[0]](offset), NUMBERS[length[0]](length)
            if streaming:  # Stream.place, inline
                storage = key.storage
                if _RAW_OFFSET.__get__(storage, Storage) is not None:
                    raise Unfollowed("two storage records for one chunk")
                if offsets != _ZEROS.get(len(key.shape)):
                    raise Restart("a storage record of a chunk the entry does not have")
                before = lasts.get(relative_path)
                if before is not None and offset <= before:
                    sink.ordered = False
                lasts[relative_path] = offset
                _RAW_SOURCE.__set__(storage, relative_path)
                _RAW_OFFSET.__set__(storage, offset)
                _RAW_KEY.__set__(storage, length)
            else:
                out[key, offsets] = (relative_path, offset, length)
            count += 1
            pos = end
        self.tally += count
        if streaming:
            out.count += count
        self.storage_literal = literal
        return pos

    def place(self, pos: int) -> tuple[tuple, tuple, int]:
        """One index and its storage info, token by token (what place_run does not take: the
        first of their kind, a key the entries did not name), remembered for place_run."""
        m = _compiled["storage"].match(self.b, pos)
        key, info, ends, parts, end = self.place_tokens(pos)
        if (m and ends == tuple(m.end(group) for group in range(1, 8)) and ends[-1] + 2 == m.end() == end
                and len(self.storage_runs) < MAX_RUNS):  # the expression's parts are the tokens' (no header among them)
            head, _, tail, info_head, _, info_middle, _ = m.groups()
            self.storage_runs[(head, tail, info_head, info_middle)] = parts
        self.tally += 1
        return key, info, end

    def place_tokens(self, pos: int) -> tuple:
        """A MetadataIndex (fqn, index, offset) and its _StorageInfo (relative_path, offset,
        length), token by token: (key, info, where each part the regular expression names ends
        (the last before the closing SETITEMS BUILD), what those parts hold)."""
        memo, b, ends = self.memo, self.b, []
        start = len(memo)
        pos = self.field(self.state(self.record(pos, _INDEX)), "fqn")
        head = tuple(memo[start:])
        ends.append(pos)
        fqn, pos = self.text(pos) if self.sink is None else self.tensor_named(pos)
        ends.append(pos)
        start, fields = len(memo), {}
        while b[pos] != 0x75:
            name, pos = self.text(pos)
            if name in fields or name not in ("index", "offset"):
                raise Unfollowed(f"an index field {name[:40]!r}")
            if b[pos] == 0x4E:  # NONE
                fields[name], pos = None, self.expect(pos, b"N")
            else:
                fields[name], pos = self.number(pos) if name == "index" else self.size(pos)
        pos = self.expect(pos, b"ub")
        tail = tuple(memo[start:])
        ends.append(pos)
        offsets = fields.get("offset")
        if offsets is not None:
            if not all(0 <= v <= INT64_MAX for v in offsets):
                raise Unfollowed("an offset out of range")
            offsets = tuple(offsets)
        start = len(memo)
        pos = self.field(self.state(self.record(pos, _INFO)), "relative_path")
        relative_path, pos = self.text(pos)
        pos = self.field(pos, "offset")
        info_head, start = tuple(memo[start:]), len(memo)
        ends.append(pos)
        offset, pos = self.number(pos)
        ends.append(pos)
        pos = self.field(pos, "length")
        info_middle = tuple(memo[start:])
        ends.append(pos)
        length, pos = self.number(pos)
        ends.append(pos)
        end = self.expect(pos, b"ub")
        after_fqn = tail + info_head + info_middle  # the memo items after the key's
        return ((fqn, offsets), (relative_path, offset, length), tuple(ends),
                (head + after_fqn, after_fqn, offsets, relative_path), end)

    def tensor_named(self, pos: int) -> tuple[TensorRef, int]:
        """Streaming: the tensor a reference to its key names (in the memo in its key's place)."""
        if self.b[pos] not in (0x68, 0x6A):
            raise Restart("a storage record naming a new string")
        state = self.mark()
        value, end = self.ref(pos)
        if type(value) not in self.sink.named:  # (a tensor, or a value: see dcp_chunks.Stream)
            self.rollback(state)
            raise Restart("a storage record naming what is not an entry's key")
        return value, end

    # -- storage_meta and version: nothing read_dcp reads, and no call but a path's -------------------
    def storage_meta(self, pos: int) -> tuple[None, int]:
        b = self.b
        if b[pos] == 0x4E:
            return None, self.expect(pos, b"N")
        pos = self.state(self.record(pos, _STORAGE_META))
        while b[pos] != 0x75:
            _, pos = self.text(pos)
            code = b[pos]
            if code == 0x4E:
                pos = self.expect(pos, b"N")
            elif code in TEXT:  # a string, or checkpoint_id as a path
                called = self.path_call(pos)
                pos = self.text(pos)[1] if called is None else called
            elif code == 0x5D:  # EMPTY_LIST: the modules' names
                pos = self.expect(pos, b"]\x94")
                self.memo.append(OPAQUE)
                if b[pos] == 0x28:
                    pos = self.expect(pos, b"(")
                    while b[pos] != 0x65:
                        _, pos = self.text(pos)
                    pos = self.expect(pos, b"e")
                else:
                    state = self.mark()
                    try:
                        _, end = self.text(pos)
                        pos = self.expect(end, b"a")
                    except Unfollowed:
                        self.rollback(state)
            else:
                raise Unfollowed("a storage_meta field torch does not write")
        return None, self.expect(pos, b"ub")

    def path_call(self, pos: int) -> int | None:
        """checkpoint_id as a PosixPath of strings (a tuple of them, REDUCE MEMOIZE), where it is
        one (else None, nothing read)."""
        state = self.mark()
        try:
            fn, pos = self.glob(pos)
            if type(fn) is not Known or fn.name not in _PATHS:
                raise Unfollowed("a call of something other than a path")
            b = self.b
            if b[pos] == 0x29:  # EMPTY_TUPLE: PosixPath()
                pos = self.expect(pos, b")")
            else:  # TUPLE1-3 or MARK ... TUPLE of strings, MEMOIZE
                marked = b[pos] == 0x28
                if marked:
                    pos = self.expect(pos, b"(")
                count = 0
                while b[pos] in TEXT and (marked or count < 3):
                    _, pos = self.text(pos)
                    count += 1
                pos = self.expect(pos, (b"t" if marked else bytes([0x84 + count]) if count else b"?") + b"\x94")
                self.memo.append(OPAQUE)
            pos = self.expect(pos, b"R\x94")
            self.memo.append(OPAQUE)
            return pos
        except Unfollowed:
            self.rollback(state)
            return None

    def version(self, pos: int) -> tuple[None, int]:
        if self.b[pos] == 0x4E:
            return None, self.expect(pos, b"N")
        return None, self.text(pos)[1]
