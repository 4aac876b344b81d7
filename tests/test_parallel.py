"""Parallel writing: `--jobs N` shards written by threads, and the same command under torchrun
with the shards split between ranks. Both must write exactly what one process writes."""

from __future__ import annotations

import os
import random
import threading

from ckptsurgery.io import model
from ckptsurgery.io.model import MappedFile


# ---- the descriptor table under threads --------------------------------------------------------

def test_a_descriptor_in_use_is_never_closed_by_another_thread(tmp_path, monkeypatch):
    """Ten files, room for two descriptors, eight threads reading through them: each read must
    get its own file's bytes (a descriptor closed under a thread gives EBADF, or, its number
    reused, another file's bytes)."""
    monkeypatch.setattr(model, "MAX_OPEN_FILES", 2)
    rng = random.Random(0)
    files = []
    for i in range(10):
        data = rng.randbytes(1 << 16)
        (tmp_path / f"f{i}").write_bytes(data)
        files.append((MappedFile(str(tmp_path / f"f{i}")), data))
    failures = []

    def read(seed: int) -> None:
        pick = random.Random(seed)
        try:
            for _ in range(400):
                mapped, data = pick.choice(files)
                with mapped.descriptor() as fd:
                    start = pick.randrange(len(data) - 64)
                    os.sched_yield()  # let the others open and close files meanwhile
                    if os.pread(fd, 64, start) != data[start : start + 64]:
                        failures.append(f"wrong bytes from {mapped.path}")
        except OSError as e:
            failures.append(repr(e))

    threads = [threading.Thread(target=read, args=(seed,)) for seed in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert failures == []
    assert len(model._open_files) <= 2  # once nobody uses them, the table shrinks back to its limit
    for mapped, _ in files:
        mapped.close()
    assert model._open_files == {}
