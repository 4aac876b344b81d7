"""A pickle read token by token, for dcp_pickles.fast_metadata, which reads a DCP `.metadata`
made of torch's own records: its opcodes without their frames (each frame boundary checked to
fall between two tokens), its memo — each index holding what the restricted unpickler's would,
or OPAQUE where no reference may reach — and the few tokens torch's records are made of, each
read as the restricted unpickler reads it. Anything else is Unfollowed: the restricted unpickler
reads the file. `literal` spells out a run of bytes read before as a regular expression, so that
its later copies are recognised at C speed."""

from __future__ import annotations

import re
from typing import Any

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


def unframed(data) -> tuple[bytes, list[int]]:
    """The opcodes of a protocol 4 or 5 pickle without its frames, and where each frame began
    among them. A frame only says how much to read at once — the restricted unpickler skips it
    wherever it sits — and pickle.dump puts whole opcodes in each (checked: Tokens.crossed)."""
    if len(data) < 2 or data[0] != 0x80 or data[1] not in (4, 5):
        raise Unfollowed("not a protocol 4 or 5 pickle")
    parts, bounds, pos, total, end = [], [], 2, 0, len(data)
    while pos < end:
        if data[pos] != 0x95 or pos + 9 > end:
            raise Unfollowed("opcodes outside a frame")
        size = int.from_bytes(data[pos + 1 : pos + 9], "little")
        if size > _MAX_FRAME or pos + 9 + size > end:
            raise Unfollowed("a frame that runs past the end")
        bounds.append(total)
        parts.append(data[pos + 9 : pos + 9 + size])
        total += size
        pos += 9 + size
    return b"".join(parts), bounds


_MAX_FRAME = 1 << 30  # as MetadataUnpickler.load_frame
_ARGUMENT = {0x68: 1, 0x6A: 4, 0x4B: 1, 0x4D: 2, 0x4A: 4}  # bytes after the opcode
_ALONE = frozenset(b"()}]\x94\x81usbaet\x85\x86\x87R\x88\x89N\x93.")  # opcodes without an argument


def token_end(b: bytes, pos: int) -> int:
    """Where the token at `pos` ends (only the opcodes Tokens reads)."""
    code = b[pos]
    if code in _ARGUMENT:
        return pos + 1 + _ARGUMENT[code]
    if code in (0x8C, 0x8A):
        return pos + 2 + b[pos + 1]
    if code == 0x58:
        return pos + 5 + int.from_bytes(b[pos + 1 : pos + 5], "little")
    if code in _ALONE:
        return pos + 1
    raise Unfollowed(f"opcode {code:#04x}")


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


# regular expressions of whole tokens (DOTALL spelled [\s\S]), which runs of them are made of. A
# SHORT_BINUNICODE MEMOIZE as a string without a 0x94 byte spells it: one with such a byte is read
# token by token each time (the match stops short of the token, and is never trusted).
STRING_RE = b"\\x8c[\\s\\S][^\\x94]*+\\x94"
REF_RE = b"(?:h[\\s\\S]|j[\\s\\S]{4})"  # BINGET, LONG_BINGET
TEXT_RE = b"(?:" + STRING_RE + b"|" + REF_RE + b")"
GLOBAL_RE = b"(?:" + REF_RE + b"|" + TEXT_RE + TEXT_RE + b"\\x93\\x94)"  # STACK_GLOBAL MEMOIZE
NUMBER_RE = b"(?:K[\\s\\S]|M[\\s\\S]{2}|J[\\s\\S]{4}|\\x8a" + counted(8) + b")"
NUMBERS_RE = (b"(?:\\)|" + NUMBER_RE + b"\\x85\\x94|" + NUMBER_RE * 2 + b"\\x86\\x94|" + NUMBER_RE * 3
              + b"\\x87\\x94|\\(" + NUMBER_RE + b"*t\\x94)")  # a tuple of integers
SIZE_RE = b"(?:" + REF_RE + b"|" + GLOBAL_RE + NUMBERS_RE + b"\\x85\\x94R\\x94)"  # torch.Size((...))
RECORD_RE = GLOBAL_RE + b"\\)\\x81\\x94"  # EMPTY_TUPLE NEWOBJ MEMOIZE
FIELDS_RE = b"\\}\\x94\\("  # EMPTY_DICT MEMOIZE MARK
MAX_RUNS = 1 << 16  # runs of bytes remembered, of each kind: a file of nothing but new ones costs no more
MAX_LITERALS = 256  # runs spelled out as expressions, of each kind
REF_GROUP = b"(h[\\s\\S]|j[\\s\\S]{4})"  # a memo reference
NUMBER_GROUP = b"(K[\\s\\S]|M[\\s\\S]{2}|J[\\s\\S]{4}|\\x8a" + counted(8) + b")"


class Tokens:
    """One read of a pickle's opcodes: `b` (frames left out; `bounds`: where frames began),
    `memo` (what the restricted unpickler's memo would hold at each index, or OPAQUE where a
    reference may not reach: a record, a dict, a list, a tuple other than a torch.Size, what a
    later reference could change or nest without end). `known`: the globals (qualified name ->
    Known) the subclass reads; `tally`: items a subclass counts, undone with a rollback."""

    known: dict[str, Known] = {}

    def __init__(self, body: bytes, bounds: list[int]):
        self.b, self.bounds, self.next = body, bounds, 0
        self.bound = bounds[0] if bounds else len(body) + 1
        self.memo: list = []
        self.tally = 0

    # -- frames: each boundary must fall between two tokens ----------------------------------------
    def crossed(self, start: int, end: int) -> None:
        """[start, end) is whole tokens, read: a frame boundary in it must begin one of them
        (pickle.dump never splits a token; the restricted unpickler would read other opcodes)."""
        while self.bound < end:
            if self.bound < start:  # in opcodes read without this check: never trust them
                raise Unfollowed("a frame boundary in opcodes not checked")
            if self.bound > start:
                pos = start
                while pos < self.bound:
                    pos = token_end(self.b, pos)
                if pos != self.bound:
                    raise Unfollowed("a frame boundary inside a token")
            self.next += 1
            self.bound = self.bounds[self.next] if self.next < len(self.bounds) else len(self.b) + 1

    def rollback(self, state: tuple) -> None:
        memo_len, self.next, self.bound, self.tally = state
        del self.memo[memo_len:]

    def mark(self) -> tuple:
        return len(self.memo), self.next, self.bound, self.tally

    # -- tokens ---------------------------------------------------------------------------------------
    def expect(self, pos: int, code: bytes) -> int:
        end = pos + len(code)
        if self.b[pos:end] != code:
            raise Unfollowed(f"not {code!r} at {pos}")
        if end > self.bound:
            self.crossed(pos, end)
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
        if end > self.bound:
            self.crossed(pos, end)
        return self.memo[index], end

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
            if end + 1 > self.bound:
                self.crossed(pos, end + 1)
            return value, end + 1
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
        if end > self.bound:
            self.crossed(pos, end)
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
            value, end = self.ref(pos)
            if type(value) is TorchSize:
                return value, end
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

    def items(self, pos: int, item, run) -> tuple[dict, int]:
        """A dict: EMPTY_DICT MEMOIZE, then batches of items, MARK ... SETITEMS or one ... SETITEM
        (as pickle.dump writes them: 1000 at most, a last batch of one alone). `run(pos, out)`
        reads as many items as it knows in a row (runs of bytes seen before), `item(pos)` one
        item, any."""
        pos = self.expect(pos, b"}\x94")
        self.memo.append(OPAQUE)
        b, out = self.b, {}
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
        once, for a few hundred runs at most; None past those)."""
        made = cache.get(key)
        if made is None and len(cache) < MAX_LITERALS:
            made = cache[key] = (re.compile(b"".join(
                part if index % 2 == 0 else re.escape(part) for index, part in enumerate(parts))).match, run)
        return made
