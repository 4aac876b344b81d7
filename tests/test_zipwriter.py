"""The zip writer: what zipfile reads back (names, checksums, bytes, each record's data 64-byte
aligned), and the zip64 central entry of a record that starts past 4 GB, which add_small writes
on a path of its own."""

from __future__ import annotations

import io
import struct
import zipfile

from ckptsurgery.io import zipwriter
from ckptsurgery.io.zipwriter import ALIGN, ZipWriter

RECORDS = {"archive/data.pkl": b"\x80\x02}q\x00.", "archive/data/0": bytes(range(16)),
           "archive/data/1": b"", "archive/data/2": b"x" * 5000}


def test_records_read_back_aligned(monkeypatch):
    monkeypatch.setattr(zipwriter, "SMALL_RECORD", 64)  # the large-record path (crc written afterwards) too
    f = io.BytesIO(b"prefix")  # an archive inside a bigger file counts its offsets from its start
    f.seek(6)
    writer = ZipWriter(f)
    writer.add_bytes("archive/data.pkl", RECORDS["archive/data.pkl"])
    writer.add_small([("archive/data/0", RECORDS["archive/data/0"]), ("archive/data/1", b"")])
    writer.add("archive/data/2", [b"x" * 3000, memoryview(b"x" * 2000)], 5000)
    writer.close()
    inner = io.BytesIO(f.getvalue()[6:])
    with zipfile.ZipFile(inner) as archive:
        assert [i.filename for i in archive.infolist()] == list(RECORDS)
        for info in archive.infolist():
            assert archive.read(info) == RECORDS[info.filename]  # checks the crc too
            raw = inner.getvalue()
            name_len, extra_len = struct.unpack_from("<HH", raw, info.header_offset + 26)
            assert (info.header_offset + 30 + name_len + extra_len) % ALIGN == 0


def test_a_small_record_past_4_gb_has_a_zip64_central_entry():
    writer = ZipWriter(io.BytesIO())
    writer._offset = 2**32 + 7  # as if 4 GB had been written before it
    writer.add_small([("archive/data/9", b"abcd")])
    entry = bytes(writer._directory)
    assert entry == zipwriter._central_entry(b"archive/data/9", zipwriter.zlib.crc32(b"abcd"), 4, 2**32 + 7)
    assert struct.unpack_from("<H", entry, 6) == (45,)  # the version needed: zip64
    assert struct.unpack_from("<I", entry, 42) == (0xFFFFFFFF,)  # the offset is in the extra field
    assert entry.endswith(struct.pack("<HHQQQ", 1, 24, 4, 4, 2**32 + 7))
    below = ZipWriter(io.BytesIO())
    below.add_small([("archive/data/9", b"abcd")])
    assert below._directory == zipwriter._central_entry(b"archive/data/9", zipwriter.zlib.crc32(b"abcd"), 4, 0)
