"""Small files read whole beside checkpoints — a shard index, a model's config.json, an adapter's
config, rename's map: bounded in size before they are read, and parsed as JSON into one clear line
when they are not (bad bytes, bad JSON, JSON nested too deeply for the parser)."""

from __future__ import annotations

import json
import os
import stat

from ..errors import CkptError


def read_small(path: str, limit: int, too_large: str, missing: str | None = None) -> bytes:
    """The bytes of a regular file of at most `limit` bytes. One CkptError line for a larger one
    ("{path}: {too_large}"), a missing one ("{path}: {missing}", when given), one that is not a
    regular file (a FIFO would block the read) or that cannot be read."""
    try:
        if not stat.S_ISREG(os.stat(path).st_mode):
            raise CkptError(f"{path}: not a regular file")
        with open(path, "rb") as f:
            raw = f.read(limit + 1)
    except FileNotFoundError:
        raise CkptError(f"{path}: {missing or 'no such file'}") from None
    except OSError as e:
        raise CkptError(f"{path}: cannot read ({e.strerror or e})") from None
    if len(raw) > limit:
        raise CkptError(f"{path}: {too_large}")
    return raw


def parse_json(path: str, raw: bytes, not_json: str, encoding: str = "utf-8") -> object:
    """The JSON value of a file's bytes: one CkptError line, "{path}: {not_json} (why)", for bytes
    that are not `encoding` or not JSON, or JSON nested too deeply for the parser (which would
    raise RecursionError)."""
    try:
        return json.loads(raw.decode(encoding))
    except ValueError as e:  # UnicodeDecodeError is a ValueError
        raise CkptError(f"{path}: {not_json} ({str(e)[:200]})") from None
    except RecursionError:
        raise CkptError(f"{path}: {not_json} (nested too deeply)") from None
