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


class ZipWriter:
    """Writes an archive at the stream's current position; every offset it records counts from
    there, so an archive inside a bigger file (a DCP chunk) reads as one on its own."""

    def __init__(self, f: BinaryIO):
        self._f = f
        self._base = f.tell()
        self._entries: list[tuple[bytes, int, int, int]] = []  # name, crc, size, header offset

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
        offset = self._header(name, size, 0)
        crc, written = 0, 0
        for chunk in chunks:
            crc = zlib.crc32(chunk, crc)
            written += len(chunk)
            f.write(chunk)
        _check_size(name, written, size)
        end = f.tell()
        f.seek(self._base + offset + 14)
        f.write(struct.pack("<I", crc))
        f.seek(end)
        raw_name, _, _, _ = self._entries[-1]
        self._entries[-1] = (raw_name, crc, size, offset)

    def _header(self, name: str, size: int, crc: int) -> int:
        """Write a record's local header, padded so that its data starts 64-byte aligned, and
        list the record; return the header's offset."""
        f = self._f
        raw_name = name.encode("utf-8")
        offset = f.tell() - self._base
        zip64 = size >= _U32
        extra = struct.pack("<HHQQ", 1, 16, size, size) if zip64 else b""
        used = offset + 30 + len(raw_name) + len(extra) + 4
        pad = (-used) % ALIGN
        extra += _PAD_ID + struct.pack("<H", pad) + b"Z" * pad
        small = _U32 if zip64 else size
        f.write(struct.pack("<IHHHHHIIIHH", 0x04034B50, 45 if zip64 else 20, 0, 0, 0, _DOS_DATE,
                            crc, small, small, len(raw_name), len(extra)) + raw_name + extra)
        self._entries.append((raw_name, crc, size, offset))
        return offset

    def add_bytes(self, name: str, data: bytes | memoryview) -> None:
        """Write one record whose bytes are at hand."""
        self._header(name, len(data), zlib.crc32(data))
        self._f.write(data)

    def close(self) -> None:
        f = self._f
        start = f.tell() - self._base
        for raw_name, crc, size, offset in self._entries:
            big = size >= _U32 or offset >= _U32
            extra = b""
            if big:
                extra = struct.pack("<HHQQQ", 1, 24, size, size, offset)
            small = _U32 if big else size
            f.write(struct.pack("<IHHHHHHIIIHHHHHII", 0x02014B50, 0x031E, 45 if big else 20, 0, 0, 0,
                                _DOS_DATE, crc, small, small, len(raw_name), len(extra), 0, 0, 0, 0,
                                _U32 if big else offset))
            f.write(raw_name + extra)
        end = f.tell() - self._base
        count, cd_size = len(self._entries), end - start
        if count >= 0xFFFF or start >= _U32 or cd_size >= _U32:
            f.write(struct.pack("<IQHHIIQQQQ", 0x06064B50, 44, 0x031E, 45, 0, 0, count, count, cd_size, start))
            f.write(struct.pack("<IIQI", 0x07064B50, 0, end, 1))
            f.write(struct.pack("<IHHHHIIH", 0x06054B50, 0, 0, 0xFFFF, 0xFFFF, _U32, _U32, 0))
        else:
            f.write(struct.pack("<IHHHHIIH", 0x06054B50, 0, 0, count, count, cd_size, start, 0))
