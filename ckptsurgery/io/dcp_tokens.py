"""A pickle read token by token, for dcp_pickles.fast_metadata, which reads a DCP `.metadata`
made of torch's own records: its opcodes where they lie, each frame's header skipped where it
falls between two tokens (pickle.dump never puts one inside a token: there, it gives up), its memo — each index holding what the restricted unpickler's would,
or OPAQUE where no reference may reach — and the few tokens torch's records are made of, each
read as the restricted unpickler reads it. Anything else is Unfollowed: the restricted unpickler
reads the file. `literal` spells out a run of bytes read before as a regular expression, so that
its later copies are recognised at C speed."""

from __future__ import annotations

import re
from array import array
from bisect import bisect_right
from typing import Any

from .model import INT64_MAX, numel_of
from .pickled import Global, GlobalKind, TorchSize
from .unpickler import ALLOWED, is_dotted_name


class Unfollowed(Exception):
    """`.metadata` is not (only) torch's own records as torch writes them: the restricted
    unpickler reads it."""


class Known:
    """A global of torch's records (a class, or a function their pickles call), or what such a
    call makes: never imported, never called, and what it stands for is known."""

    __slots__ = ("name",)

    def __init__(self, name: str):
        self.name = name


OPAQUE = Known("<a record, dict, list or tuple>")  # a memo slot no reference may name
SIZE = ALLOWED[("torch", "Size")]  # the allow-listed torch.Size: a REDUCE of it makes a TorchSize
TEXT = frozenset(b"\x8cXhj")  # SHORT_BINUNICODE, BINUNICODE, BINGET, LONG_BINGET
NUMBER = frozenset(b"KMJ\x8a")  # BININT1, BININT2, BININT, LONG1


def frame_headers(data) -> int:
    """Where the first frame's header (FRAME and its 8-byte length) lies in a protocol 4 or 5
    pickle made of frames, as pickle.dump writes it: one after the other from the third byte to
    the end (checked here; Tokens.past finds each next one from the one before: no list of them,
    which at 9 bytes a frame would be 4 times a file of empty frames). A frame only says how much
    to read at once — the restricted unpickler skips its header wherever it sits — and
    pickle.dump puts whole opcodes in each (checked: Tokens.past)."""
    if len(data) < 2 or data[0] != 0x80 or data[1] not in (4, 5):
        raise Unfollowed("not a protocol 4 or 5 pickle")
    pos, end = 2, len(data)
    while pos < end:
        empty = EMPTY_FRAMES(data, pos)
        if empty is not None:
            pos = empty.end()
            continue
        if data[pos] != 0x95 or pos + 9 > end:
            raise Unfollowed("opcodes outside a frame")
        size = int.from_bytes(data[pos + 1 : pos + 9], "little")
        if size > _MAX_FRAME or pos + 9 + size > end:
            raise Unfollowed("a frame that runs past the end")
        pos += 9 + size
    if end <= 2:
        raise Unfollowed("no frame")
    return 2


_MAX_FRAME = 1 << 30  # as MetadataUnpickler.load_frame
EMPTY_FRAMES = re.compile(b"(?:\\x95\\x00{8})++").match  # (pickle.dump writes none: a hostile file's, skipped at once)
def read_number(b: bytes, pos: int) -> tuple[int, int]:
    """An integer as BININT1, BININT2, BININT or LONG1 write it."""
    code = b[pos]
    if code == 0x4B:
        return b[pos + 1], pos + 2
    if code == 0x4D:
        end = pos + 3
        value = int.from_bytes(b[pos + 1 : end], "little")
    elif code == 0x4A:
        end = pos + 5
        value = int.from_bytes(b[pos + 1 : end], "little", signed=True)
    elif code == 0x8A:
        end = pos + 2 + b[pos + 1]
        value = int.from_bytes(b[pos + 2 : end], "little", signed=True)
    else:
        raise Unfollowed("not an integer")
    if end > len(b):
        raise Unfollowed("an integer past the end")
    return value, end


NUMBERS = {  # an integer's whole token (as read_number reads it) -> the integer
    0x4B: lambda token: token[1],
    0x4D: lambda token: token[1] | token[2] << 8,
    0x4A: lambda token: int.from_bytes(token[1:], "little", signed=True),
    0x8A: lambda token: int.from_bytes(token[2:], "little", signed=True),
}


def counted(most: int) -> bytes:
    """A length byte and that many bytes (DOTALL spelled [\\s\\S])."""
    return b"(?>" + b"|".join(re.escape(bytes([n])) + b"[\\s\\S]{%d}" % n for n in range(most + 1)) + b")"


# regular expressions of whole tokens (DOTALL spelled [\s\S]), which runs of them are made of; a
# repeat is possessive (what follows it never begins as what it repeats): a greedy one keeps a
# backtracking state an item — ~60 B for each 2-byte integer of a size of 100,000 dimensions. A
# SHORT_BINUNICODE MEMOIZE as a string without a 0x94 byte spells it: one with such a byte is read
# token by token each time (the match stops short of the token, and is never trusted).
STRING_RE = b"\\x8c[\\s\\S][^\\x94]*+\\x94"
REF_RE = b"(?:h[\\s\\S]|j[\\s\\S]{4})"  # BINGET, LONG_BINGET
TEXT_RE = b"(?:" + STRING_RE + b"|" + REF_RE + b")"
GLOBAL_RE = b"(?:" + REF_RE + b"|" + TEXT_RE + TEXT_RE + b"\\x93\\x94)"  # STACK_GLOBAL MEMOIZE
NUMBER_RE = b"(?:K[\\s\\S]|M[\\s\\S]{2}|J[\\s\\S]{4}|\\x8a" + counted(8) + b")"
NUMBERS_RE = (b"(?:\\)|" + NUMBER_RE + b"\\x85\\x94|" + NUMBER_RE * 2 + b"\\x86\\x94|" + NUMBER_RE * 3
              + b"\\x87\\x94|\\(" + NUMBER_RE + b"*+t\\x94)")  # a tuple of integers
SIZE_RE = b"(?:" + REF_RE + b"|" + GLOBAL_RE + NUMBERS_RE + b"\\x85\\x94R\\x94)"  # torch.Size((...))
RECORD_RE = GLOBAL_RE + b"\\)\\x81\\x94"  # EMPTY_TUPLE NEWOBJ MEMOIZE
FIELDS_RE = b"\\}\\x94\\("  # EMPTY_DICT MEMOIZE MARK
MAX_RUNS = 1 << 16  # runs of bytes remembered, of each kind: a file of nothing but new ones costs no more
MAX_LITERALS = 256  # runs spelled out as expressions, of each kind
# the longest run spelled out (torch's are a few hundred bytes): a literal's compiled expression
# keeps ~18 B a byte, and ~110 B a byte while it is compiled (~1 s a MB) — a hostile file's long run
# (a size of 100,000 dimensions, in one long frame) is recognised by the dictionary of runs alone
MAX_LITERAL = 2048
REF_GROUP = b"(h[\\s\\S]|j[\\s\\S]{4})"  # a memo reference
NUMBER_GROUP = b"(K[\\s\\S]|M[\\s\\S]{2}|J[\\s\\S]{4}|\\x8a" + counted(8) + b")"


class _Repeated:
    """A run of memo slots that repeat `items` (after a `value` of each repeat's own, where
    `keyed`): what a run of entries, paths or storage records torch writes alike adds."""

    __slots__ = ("items", "keyed", "period", "values")

    def __init__(self, items: tuple, keyed: bool):
        self.items, self.keyed, self.period, self.values = items, keyed, len(items) + keyed, []


class Memo:
    """The memo of a pickle read by Tokens, as the restricted unpickler's would be (a list, by
    index) but kept in segments: slots read one at a time in a list, and the ~25 slots a key a
    run of torch's records adds as one _Repeated segment — the items they repeat once, and the
    one value of each repeat that differs (the key): 8 bytes a key, not ~200 (2.6 million slots at
    100,000 keys)."""

    __slots__ = ("starts", "segments", "n", "tail", "tail_start")

    def __init__(self):
        self.starts: list[int] = []  # where each segment begins
        self.segments: list = []  # a list of slots, or a _Repeated
        self.n = 0
        self.tail: list | None = None  # the last segment, when it is a list
        self.tail_start = 0

    def __len__(self) -> int:
        return self.n

    def _new_tail(self) -> list:
        tail = self.tail = []
        self.tail_start = self.n
        self.starts.append(self.n)
        self.segments.append(tail)
        return tail

    def append(self, value) -> None:
        (self.tail if self.tail is not None else self._new_tail()).append(value)
        self.n += 1

    def __iadd__(self, values):
        tail = self.tail if self.tail is not None else self._new_tail()
        tail += values
        self.n += len(values)
        return self

    def repeat(self, items: tuple, value=None, keyed: bool = False) -> _Repeated:
        """`value` (where `keyed`), then `items`: one more repeat of a run; its segment (a run
        loop adds the next repeats to it itself — `values`, `n` — while it is the last)."""
        last = self.segments[-1] if self.tail is None and self.segments else None
        if last is None or last.items is not items or last.keyed is not keyed:
            last = _Repeated(items, keyed)
            self.tail = None
            self.starts.append(self.n)
            self.segments.append(last)
        if keyed:
            last.values.append(value)
        self.n += last.period
        return last

    def keyed(self, index: int) -> tuple | None:
        """(first slot, end, period, values) of the segment where slot `index` is a repeat's own
        value, or None: a run loop looks keys up there itself (`values[(index - first) // period]`,
        where `first <= index < end` and `(index - first) % period == 0`)."""
        if not 0 <= index < self.n or (self.tail is not None and index >= self.tail_start):
            return None
        at = bisect_right(self.starts, index) - 1
        segment, first = self.segments[at], self.starts[at]
        if type(segment) is list or not segment.keyed or (index - first) % segment.period:
            return None
        return first, self.starts[at + 1] if at + 1 < len(self.starts) else self.n, segment.period, segment.values

    def __setitem__(self, index: int, value) -> None:
        """A slot read one at a time, or a repeat's own value, made another (`value`)."""
        if self.tail is not None and index >= self.tail_start:
            self.tail[index - self.tail_start] = value
            return
        at = bisect_right(self.starts, index) - 1
        segment, offset = self.segments[at], index - self.starts[at]
        if type(segment) is list:
            segment[offset] = value
            return
        repeat, slot = divmod(offset, segment.period)
        if not (segment.keyed and slot == 0):
            raise Unfollowed("a memo slot shared by a run")
        segment.values[repeat] = value

    def __getitem__(self, index):
        if type(index) is slice:
            return [self[i] for i in range(*index.indices(self.n))]
        if index < 0:
            index += self.n
        if not 0 <= index < self.n:
            raise IndexError("memo index out of range")
        if self.tail is not None and index >= self.tail_start:
            return self.tail[index - self.tail_start]
        at = bisect_right(self.starts, index) - 1
        segment, offset = self.segments[at], index - self.starts[at]
        if type(segment) is list:
            return segment[offset]
        repeat, slot = divmod(offset, segment.period)
        if segment.keyed:
            return segment.values[repeat] if slot == 0 else segment.items[slot - 1]
        return segment.items[slot]

    def __delitem__(self, index: slice) -> None:
        """`del memo[n:]`: back to its first n slots (a rollback)."""
        n = index.indices(self.n)[0]
        if n >= self.n:
            return
        at = bisect_right(self.starts, n) - 1  # the segment slot n lies in
        segment, offset, kept = self.segments[at], n - self.starts[at], []
        if type(segment) is list:
            del segment[offset:]
        else:
            repeat, slot = divmod(offset, segment.period)
            kept = [self[i] for i in range(n - slot, n)]  # a repeat cut short: its first slots, as a list
            del segment.values[repeat:]
            if not repeat:
                at -= 1
        del self.starts[at + 1 :], self.segments[at + 1 :]
        self.n, self.tail = n - len(kept), None
        if self.segments and type(self.segments[-1]) is list:
            self.tail, self.tail_start = self.segments[-1], self.starts[-1]
        if kept:
            self += kept


class Tokens:
    """One read of a pickle's opcodes where they lie: `b` (the whole pickle, its frames' headers
    among the opcodes; `bound`: where the next header lies, skipped by `past`),
    `memo` (what the restricted unpickler's memo would hold at each index, or OPAQUE where a
    reference may not reach: a record, a dict, a list, a tuple other than a torch.Size, what a
    later reference could change or nest without end). `known`: the globals (qualified name ->
    Known) the subclass reads; `tally`: items a subclass counts, undone with a rollback."""

    known: dict[str, Known] = {}

    def __init__(self, data):
        self.b, self.bound = data, frame_headers(data)
        self.memo = Memo()
        self.tally = 0

    # -- frames: each header must fall between two tokens ------------------------------------------
    def past(self, start: int, end: int) -> int:
        """Where the token after [start, end) starts — whole tokens, just read, that reach the
        next frame's header (`end >= bound`): after the header(s) there. A header inside them is
        one inside a token (pickle.dump never splits one; the restricted unpickler would read
        other opcodes): Unfollowed. A run of several items read at once checks `end > bound`
        first, and reads them again token by token instead."""
        if end > self.bound:
            raise Unfollowed("a frame boundary inside a token")
        b = self.b
        while end == self.bound:  # (the next header: after this one's frame, or none at the end)
            empty = EMPTY_FRAMES(b, end)
            if empty is not None:
                end = empty.end()
                if end == len(b):
                    self.bound = end + 1
                    break
            end += 9
            self.bound = end + int.from_bytes(b[end - 8 : end], "little")
            if self.bound == len(b):
                self.bound += 1
        return end

    def start(self) -> int:
        """Where the first opcode lies: after the first frame's header (and any empty frames)."""
        return self.past(self.bound, self.bound)

    def rollback(self, state: tuple) -> None:
        memo_len, self.bound, self.tally = state
        del self.memo[memo_len:]

    def mark(self) -> tuple:
        return len(self.memo), self.bound, self.tally

    # -- tokens ---------------------------------------------------------------------------------------
    def expect(self, pos: int, code: bytes) -> int:
        end = pos + len(code)
        if self.b[pos:end] != code:
            raise Unfollowed(f"not {code!r} at {pos}")
        if end >= self.bound:
            end = self.past(pos, end)
        return end

    def ref(self, pos: int) -> tuple[Any, int]:
        """What a memo reference names (never an OPAQUE slot)."""
        b = self.b
        if b[pos] == 0x68:  # BINGET
            index, end = b[pos + 1], pos + 2
        else:  # LONG_BINGET
            index, end = int.from_bytes(b[pos + 1 : pos + 5], "little"), pos + 5
        if end > len(b) or index >= len(self.memo) or self.memo[index] is OPAQUE:
            raise Unfollowed("a memo reference to what torch never refers to")
        value = self.memo[index]
        if end >= self.bound:
            end = self.past(pos, end)
        return value, end

    def text(self, pos: int) -> tuple[str, int]:
        """A string: SHORT_BINUNICODE or BINUNICODE then MEMOIZE, or a reference to one."""
        b = self.b
        code = b[pos]
        if code in (0x8C, 0x58):
            start = pos + (2 if code == 0x8C else 5)
            end = start + (b[pos + 1] if code == 0x8C else int.from_bytes(b[pos + 1 : start], "little"))
            if b[end : end + 1] != b"\x94":
                raise Unfollowed("a string that is not memoized")
            try:
                value = str(b[start:end], "utf-8")  # strict: a lone surrogate is the restricted reader's
            except UnicodeDecodeError:
                raise Unfollowed("a string that is not UTF-8") from None
            self.memo.append(value)
            end += 1
            if end >= self.bound:
                end = self.past(pos, end)
            return value, end
        if code in (0x68, 0x6A):
            value, end = self.ref(pos)
            if type(value) is str:
                return value, end
        raise Unfollowed("not a string")

    def field(self, pos: int, name: str) -> int:
        value, pos = self.text(pos)
        if value != name:
            raise Unfollowed(f"a field {value[:40]!r} where torch writes {name!r}")
        return pos

    def number(self, pos: int) -> tuple[int, int]:
        value, end = read_number(self.b, pos)
        if end >= self.bound:
            end = self.past(pos, end)
        return value, end

    def glob(self, pos: int) -> tuple[Any, int]:
        """A global as the restricted unpickler's find_class gives it — one of torch's records or
        the functions their pickles call, torch.Size or a dtype, no other — named by STACK_GLOBAL
        (memoized) or by a reference to one."""
        if self.b[pos] in (0x68, 0x6A):
            module, pos = self.ref(pos)
            if type(module) is not str:  # the global itself, not its module's name
                if not (type(module) is Known or type(module) is Global or module is SIZE):  # (or what one made)
                    raise Unfollowed("a reference that names no global")
                return module, pos
        else:
            module, pos = self.text(pos)
        name, pos = self.text(pos)
        pos = self.expect(pos, b"\x93\x94")
        if not (is_dotted_name(module) and is_dotted_name(name)):
            raise Unfollowed("a global that is not a Python name")
        allowed = ALLOWED.get((module, name))
        if allowed is not None:
            if not (allowed is SIZE or (isinstance(allowed, Global) and allowed.kind is GlobalKind.DTYPE)):
                raise Unfollowed(f"{module}.{name}, which torch's records never name")
            value = allowed
        else:
            value = self.known.get(f"{module}.{name}")
            if value is None:
                raise Unfollowed(f"{module[:60]}.{name[:60]}, which torch's records never name")
        self.memo.append(value)
        return value, pos

    def record(self, pos: int, cls: Known) -> int:
        """`cls` EMPTY_TUPLE NEWOBJ MEMOIZE: a dataclass as pickle.dump makes one."""
        value, pos = self.glob(pos)
        if value is not cls:
            raise Unfollowed(f"a record that is not a {cls.name}")
        pos = self.expect(pos, b")\x81\x94")
        self.memo.append(OPAQUE)
        return pos

    def state(self, pos: int) -> int:
        """EMPTY_DICT MEMOIZE MARK: the fields of a record, two or more, follow."""
        pos = self.expect(pos, b"}\x94(")
        self.memo.append(OPAQUE)
        return pos

    def call(self, pos: int, argument) -> tuple[Any, int]:
        """One argument (read by `argument`), TUPLE1 MEMOIZE REDUCE MEMOIZE: the caller adds what
        the call makes to the memo."""
        value, pos = argument(pos)
        pos = self.expect(pos, b"\x85\x94")
        self.memo.append(OPAQUE)  # the arguments' tuple
        return value, self.expect(pos, b"R\x94")

    def numbers(self, pos: int) -> tuple[tuple, int]:
        """A tuple of integers: EMPTY_TUPLE, or TUPLE1-3 or MARK ... TUPLE, then MEMOIZE."""
        b, values = self.b, []
        if b[pos] == 0x29:  # EMPTY_TUPLE, never memoized
            return (), self.expect(pos, b")")
        if b[pos] == 0x28:  # MARK
            pos = self.expect(pos, b"(")
            while b[pos] != 0x74:
                value, pos = self.number(pos)
                values.append(value)
            pos = self.expect(pos, b"t\x94")
        else:
            while len(values) < 3 and b[pos] in NUMBER:
                value, pos = self.number(pos)
                values.append(value)
            pos = self.expect(pos, bytes([0x84 + len(values)]) + b"\x94" if values else b"?")
        self.memo.append(OPAQUE)
        return tuple(values), pos

    def size(self, pos: int) -> tuple[TorchSize, int]:
        """A torch.Size: REDUCE of the allow-listed torch.Size on a tuple of integers, or a
        reference to one."""
        if self.b[pos] in (0x68, 0x6A):
            state = self.mark()  # (a frame's header after it is skipped: undone if it is not one)
            value, end = self.ref(pos)
            if type(value) is TorchSize:
                return value, end
            self.rollback(state)
        fn, pos = self.glob(pos)
        if fn is not SIZE:
            raise Unfollowed("not a torch.Size")
        dims, pos = self.call(pos, self.numbers)
        value = TorchSize(dims)
        self.memo.append(value)
        return value, pos

    def flag(self, pos: int) -> int:
        if self.b[pos] not in (0x88, 0x89):  # NEWTRUE, NEWFALSE
            raise Unfollowed("not a bool")
        return self.expect(pos, self.b[pos : pos + 1])

    def single(self, pos: int, item) -> tuple | None:
        """One (key, value, end) then SETITEM (a batch of one), or None: the dict has ended (what
        was read is undone)."""
        state = self.mark()
        try:
            key, value, end = item(pos)
            if self.b[end : end + 1] == b"s":
                return key, value, self.expect(end, b"s")
        except Unfollowed:
            pass
        self.rollback(state)
        return None

    def items(self, pos: int, item, run, out=None) -> tuple[Any, int]:
        """A dict: EMPTY_DICT MEMOIZE, then batches of items, MARK ... SETITEMS or one ... SETITEM
        (as pickle.dump writes them: 1000 at most, a last batch of one alone). `run(pos, out)`
        reads as many items as it knows in a row (runs of bytes seen before), `item(pos)` one
        item, any. `out`: where the items go (`out[key] = value`; a new dict by default)."""
        pos = self.expect(pos, b"}\x94")
        self.memo.append(OPAQUE)
        b, out = self.b, {} if out is None else out
        while True:
            if b[pos] == 0x28:  # MARK
                pos = self.expect(pos, b"(")
                while b[pos] != 0x75:  # SETITEMS
                    pos = run(pos, out)
                    if b[pos] != 0x75:
                        key, value, pos = item(pos)
                        out[key] = value
                pos = self.expect(pos, b"u")
                continue
            single = self.single(pos, item)
            if single is None:
                return out, pos
            key, value, pos = single
            out[key] = value

    def literal(self, cache: dict, key, run: tuple, *parts: bytes) -> tuple | None:
        """(match, run): `parts` as a regular expression, its fixed runs spelled out (compiled
        once, for a few hundred runs of MAX_LITERAL bytes at most; None past those)."""
        made = cache.get(key)
        if made is None and len(cache) < MAX_LITERALS and sum(map(len, parts)) <= MAX_LITERAL:
            made = cache[key] = (re.compile(b"".join(
                part if index % 2 == 0 else re.escape(part) for index, part in enumerate(parts))).match, run)
        return made


# ---- streaming (dcp_pickles._Fast with a sink): the tables' stand-ins ------------------------------

class Restart(Unfollowed):
    """A `.metadata` streaming does not take (see _Fast): read it into tables (fast_metadata
    without a sink) instead."""


class StreamedEntries:
    """state_dict_metadata, streamed: each entry's key's memo index and its spec, in order. A
    tensor of several chunks is a Restart as soon as it is read (an FSDP folder's first entry,
    most often), not once the entries and paths before it are. `keys`: the keys read, until
    `done` — a key twice is a Restart there: torch's pickle.load (and the restricted unpickler)
    keeps one entry of a dict, its later value, and one path and record of it, where streaming
    would make a tensor of each (two paths naming one key, ("a.b",) and ("a", "b"), meet
    nowhere in the tree)."""

    __slots__ = ("at", "specs", "taken", "keys")

    def __init__(self):
        self.at, self.specs, self.taken, self.keys = array("q"), [], {}, set()

    def __setitem__(self, key: tuple, spec) -> None:
        if id(spec) not in self.taken:  # (specs repeat from key to key: each looked at once)
            if type(spec) is tuple and (len(spec[2]) != 1 or spec[2][0][1] != spec[1]):
                raise Restart("a tensor of several chunks")
            self.taken[id(spec)] = spec
        self.at.append(key[0])
        self.specs.append(spec)
        self.keys.add(key[1])

    def done(self) -> int:
        """The entries read (the planner's paths follow): how many; a key twice is a Restart."""
        if len(self.keys) != len(self.at):
            raise Restart("a key twice in state_dict_metadata")
        self.keys = set()
        return len(self.at)


class StreamedPaths:
    """planner_data, streamed: each key's path, in state_dict_metadata's order, makes its tensor
    (the sink's `tensor`), which takes the place of the key in the memo (storage_data names it)."""

    __slots__ = ("entries", "memo", "sink", "count")

    def __init__(self, entries: StreamedEntries, memo, sink):
        self.entries, self.memo, self.sink, self.count = entries, memo, sink, 0

    def __setitem__(self, key: tuple, path: tuple) -> None:
        index, name = key
        entries, at = self.entries, self.count
        if at >= len(entries.at) or entries.at[at] != index:
            raise Restart("planner_data not in state_dict_metadata's order")
        spec, entries.specs[at] = entries.specs[at], None
        self.count = at + 1
        self.memo[index] = self.sink.tensor(name, spec, path)


class StreamedPlaces:
    """storage_data, streamed: each record's place handed to its tensor (the sink's `place`)."""

    __slots__ = ("sink", "count")

    def __init__(self, sink):
        self.sink, self.count = sink, 0

    def __setitem__(self, key: tuple, info: tuple) -> None:
        self.sink.place(key[0], key[1], *info)
        self.count += 1

    def __len__(self) -> int:
        return self.count


def entry_spec(dtype, size: TorchSize, chunks: list) -> tuple:
    """(dtype, size, chunks) of a tensor entry, held to read_dcp's checks of its records (else
    Unfollowed: read_dcp reports it)."""
    if not all(0 <= v <= INT64_MAX for v in size):
        raise Unfollowed("a size out of range")
    size = tuple(size)
    whole, rank = numel_of(size), len(size)
    if whole * dtype.itemsize > INT64_MAX:
        raise Unfollowed("a size beyond int64")
    volume, out = 0, []
    for offsets, sizes in chunks:
        if not (len(offsets) == len(sizes) == rank and all(0 <= v <= INT64_MAX for v in offsets + sizes)
                and all(o + s <= n for o, s, n in zip(offsets, sizes, size))):
            raise Unfollowed("a chunk that does not fit")
        volume += numel_of(sizes)
        if volume > whole:
            raise Unfollowed("chunks holding more than the size")
        out.append((tuple(offsets), tuple(sizes)))
    if volume != whole:
        raise Unfollowed("chunks holding fewer elements than the size")
    return dtype, size, tuple(out)
