"""A minimal zip writer for torch's archive layout: stored (uncompressed) records, each record's
data aligned to 64 bytes as torch's own writer does (so torch can memory-map it), fixed
timestamps, zip64 where sizes demand it. Deterministic by construction."""

from __future__ import annotations

import struct
import zlib
from typing import BinaryIO, Iterable

ALIGN = 64
_DOS_DATE = (0 << 9) | (1 << 5) | 1  # 1980-01-01, the zip epoch: no wall-clock time in the file
_U32 = 0xFFFFFFFF
_PAD_ID = b"FB"  # the padding extra field torch's writer uses
SMALL_RECORD = 1 << 20  # bytes: a record this small is held in memory to checksum it first


def _check_size(name: str, written: int, size: int) -> None:
    if written != size:
        raise ValueError(f"record {name}: wrote {written} bytes, expected {size}")


_LOCAL = struct.Struct("<IHHHHHIIIHH")  # a record's local header
_CENTRAL = struct.Struct("<IHHHHHHIIIHHHHHII")  # its entry in the central directory
_PADS = [_PAD_ID + struct.pack("<H", pad) + b"Z" * pad for pad in range(ALIGN)]
# a record without zip64 (all but those past 4 GB): the fields that never change packed once, the
# rest by one call with few arguments (a state dict may hold 200 000 records)
_PLAIN_LOCAL = struct.Struct("<14sIIIHH")  # the fixed fields, crc, sizes, name and extra lengths
_PLAIN_LOCAL_FIXED = _LOCAL.pack(0x04034B50, 20, 0, 0, 0, _DOS_DATE, 0, 0, 0, 0, 0)[:14]
_PLAIN_CENTRAL = struct.Struct("<16sIIIH12xI")  # the fixed fields, crc, sizes, name length, zeros, offset
_PLAIN_CENTRAL_FIXED = _CENTRAL.pack(0x02014B50, 0x031E, 20, 0, 0, 0, _DOS_DATE, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0)[:16]


def _central_entry(raw_name: bytes, crc: int, size: int, offset: int) -> bytes:
    """A record's entry in the central directory, zip64 where its size or offset demands."""
    if size < _U32 and offset < _U32:
        return _PLAIN_CENTRAL.pack(_PLAIN_CENTRAL_FIXED, crc, size, size, len(raw_name), offset) + raw_name
    extra = struct.pack("<HHQQQ", 1, 24, size, size, offset)
    return _CENTRAL.pack(0x02014B50, 0x031E, 45, 0, 0, 0, _DOS_DATE, crc, _U32, _U32, len(raw_name), len(extra),
                         0, 0, 0, 0, _U32) + raw_name + extra


class ZipWriter:
    """Writes an archive at the stream's current position; every offset it records counts from
    there, so an archive inside a bigger file (a DCP chunk) reads as one on its own. The writer
    counts what it writes instead of asking the stream (a state dict may hold 200 000 records)."""

    def __init__(self, f: BinaryIO):
        self._f = f
        self._base = f.tell()
        self._offset = 0  # where the next record starts, from _base
        # the central directory, an entry added as each record's crc is known: one buffer, not an
        # object kept per record (a state dict may hold 200 000)
        self._directory = bytearray()
        self._count = 0

    def add(self, name: str, chunks: Iterable[bytes | memoryview], size: int) -> None:
        """Write one record of `size` bytes, streamed from `chunks`. The header holds the
        checksum: a small record's is computed first; a large one's is written in afterwards
        (seeking back costs a flush, and a state dict may hold 200 000 small storages)."""
        f = self._f
        if size <= SMALL_RECORD:
            data = b"".join(chunks)
            _check_size(name, len(data), size)
            self.add_bytes(name, data)
            return
        raw_name, offset = name.encode("utf-8"), self._offset
        f.write(self._header(raw_name, size, 0))
        crc, written = 0, 0
        for chunk in chunks:
            crc = zlib.crc32(chunk, crc)
            written += len(chunk)
            f.write(chunk)
        _check_size(name, written, size)
        self._offset += size
        f.seek(self._base + offset + 14)
        f.write(struct.pack("<I", crc))
        f.seek(self._base + self._offset)
        self._directory += _central_entry(raw_name, crc, size, offset)
        self._count += 1

    def _header(self, raw_name: bytes, size: int, crc: int) -> bytes:
        """A record's local header, padded so that its data starts 64-byte aligned; counted."""
        offset = self._offset
        zip64 = size >= _U32
        extra = struct.pack("<HHQQ", 1, 16, size, size) if zip64 else b""
        extra += _PADS[(-(offset + 30 + len(raw_name) + len(extra) + 4)) % ALIGN]
        small = _U32 if zip64 else size
        header = _LOCAL.pack(0x04034B50, 45 if zip64 else 20, 0, 0, 0, _DOS_DATE, crc, small, small, len(raw_name),
                             len(extra)) + raw_name + extra
        self._offset += len(header)
        return header

    def add_bytes(self, name: str, data: bytes | memoryview) -> None:
        """Write one record whose bytes are at hand."""
        raw_name, size, crc, offset = name.encode("utf-8"), len(data), zlib.crc32(data), self._offset
        header = self._header(raw_name, size, crc)
        self._directory += _central_entry(raw_name, crc, size, offset)
        self._count += 1
        self._offset += size
        self._f.write(header + data if size < 4096 else header)  # a small record: one write
        if size >= 4096:
            self._f.write(data)

    def add_small(self, records: Iterable[tuple[str, bytes | memoryview]]) -> None:
        """Write records whose bytes are at hand and small (SMALL_RECORD at most): what add_bytes
        writes for each, in one loop and a write per megabyte (a state dict may hold 200 000)."""
        pending, directory, offset, flushed = [], self._directory, self._offset, self._offset
        count = self._count
        for name, data in records:
            raw_name, size, crc = name.encode("utf-8"), len(data), zlib.crc32(data)
            length = len(raw_name)
            extra = _PADS[(-(offset + 34 + length)) % ALIGN]
            pending += (_PLAIN_LOCAL.pack(_PLAIN_LOCAL_FIXED, crc, size, size, length, len(extra)), raw_name, extra,
                        data)
            # _central_entry's plain case, written out: a call per record costs more than the rest
            directory += (_PLAIN_CENTRAL.pack(_PLAIN_CENTRAL_FIXED, crc, size, size, length, offset) + raw_name
                          if offset < _U32 else _central_entry(raw_name, crc, size, offset))
            count += 1
            offset += 30 + length + len(extra) + size
            if offset - flushed >= SMALL_RECORD:  # joined a megabyte at a time
                self._f.write(b"".join(pending))
                pending.clear()
                flushed = offset
        self._f.write(b"".join(pending))
        self._offset, self._count = offset, count

    def close(self) -> None:
        start, directory, count, f = self._offset, self._directory, self._count, self._f
        f.write(directory)
        cd_size = len(directory)
        end = start + cd_size
        if count >= 0xFFFF or start >= _U32 or cd_size >= _U32:
            f.write(struct.pack("<IQHHIIQQQQ", 0x06064B50, 44, 0x031E, 45, 0, 0, count, count, cd_size, start))
            f.write(struct.pack("<IIQI", 0x07064B50, 0, end, 1))
            f.write(struct.pack("<IHHHHIIH", 0x06054B50, 0, 0, 0xFFFF, 0xFFFF, _U32, _U32, 0))
        else:
            f.write(struct.pack("<IHHHHIIH", 0x06054B50, 0, 0, count, count, cd_size, start, 0))
