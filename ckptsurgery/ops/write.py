"""The one way every operation writes: `write_checkpoint` plans the output (format, casts, tied
names, shards, what is left out), refuses what cannot be written before anything is, and
streams the tensors through the writers of `io/write.py` — `jobs` shards at once, in threads,
and under torchrun each rank its share of them (`ranks.py`)."""

from __future__ import annotations

import json
import os
import threading
from collections import OrderedDict
from concurrent.futures import FIRST_EXCEPTION, ThreadPoolExecutor, wait
from contextlib import suppress
from typing import Any, Callable

from .. import core
from ..dtypes import DType
from ..errors import CkptError, UsageError
from ..io import Checkpoint, TensorRef
from ..io.dcp import METADATA, DcpWriter, check_dcp_writable
from ..io.pickler import PickleRefused
from ..io.tree import extras
from ..io.safetensors import check_safetensors, write_safetensors
from ..io.torch_zip import castable_storages, torch_payload, write_torch
from ..io.write import (
    StagedOutputs, cast_target, check_writable, output_format, plan_safetensors, plan_shards, shard_names,
)
from .ranks import Ranks

# progress(total_bytes, label) -> advance(n_bytes): how the CLI shows a bar; None shows none
ProgressFactory = Callable[[int, str], Callable[[int], None]]


def _write(f, fmt: str, ckpt: Checkpoint, tensors: dict[str, TensorRef], cast: DType | None,
           progress, whole: bool, keep_metadata: bool, others: dict, inputs: list[Checkpoint],
           metadata: dict[str, str] | None, plan: tuple | None = None) -> None:
    """One output file: the whole checkpoint, or (`whole=False`) one shard's plain state dict.
    `metadata`: a safetensors file's entries besides `format` and the alias record (each shard
    carries them all). `plan`: what plan_safetensors gave for `tensors`, checked (else planned here)."""
    if fmt == "safetensors":
        write_safetensors(f, tensors, metadata or {}, cast, progress, plan)
    else:
        payload = torch_payload(ckpt, tensors, keep_metadata, others) if whole else OrderedDict(tensors)
        try:
            write_torch(f, payload, cast, progress, cast_only=tensors, inputs=[c.events for c in inputs])
        except PickleRefused as e:
            raise CkptError(f"{ckpt.path}: cannot be written as a .pth: {e}") from None


FORMATS = ("dcp",)  # what --format chooses; the others follow the output's extension

METADATA_OPTIONS = "--metadata, --metadata-file and --no-metadata"


def metadata_options(pairs: list[str] | None = None, file: str | None = None) -> dict[str, str] | None:
    """The entries `--metadata-file FILE.json` and then `--metadata KEY=VALUE...` set (the command
    line wins), checked; None when neither is given."""
    if not pairs and file is None:
        return None
    entries: dict[str, str] = {}
    if file is not None:
        where = f"--metadata-file {file}"
        try:
            if not os.path.exists(file):
                raise UsageError(f"{where}: does not exist")
            if not os.path.isfile(file):  # a FIFO would block the read
                raise UsageError(f"{where}: not a regular file")
            with open(file, encoding="utf-8") as f:
                loaded = json.load(f, object_pairs_hook=_no_duplicate_keys(where))
        except OSError as e:
            raise UsageError(f"{where}: cannot read it ({e.strerror})") from None
        except (ValueError, RecursionError) as e:  # UnicodeDecodeError is a ValueError
            raise UsageError(f"{where}: not valid JSON ({str(e)[:80]})") from None
        entries.update(core.check_metadata(loaded, where))
    entries.update(core.parse_metadata_pairs(pairs or []))
    return entries


def _no_duplicate_keys(where: str):
    def build(pairs: list) -> dict:
        keys = [k for k, _ in pairs]
        if len(set(keys)) != len(keys):
            twice = next(k for k in keys if keys.count(k) > 1)
            raise UsageError(f"{where}: key {core.short_repr(twice)} is given twice; which one is meant?")
        return dict(pairs)

    return build


def _plan_metadata(ckpt: Checkpoint, output: str, holds: bool, metadata: dict[str, str] | None,
                   no_metadata: bool, metadata_from: Checkpoint | None, cast: bool = False,
                   sharded: bool = False) -> tuple[dict | None, dict]:
    """The metadata written (besides `format` and the alias record; None where the output holds
    none) and the report's `metadata` and `metadata_dropped`. Options that cannot apply are refused."""
    if metadata is not None or no_metadata:
        if not holds:
            raise UsageError(f"{METADATA_OPTIONS} apply to .safetensors outputs only: {output} is not one "
                             f"(a .pth or DCP output holds no metadata map)")
        metadata = core.check_metadata(metadata or {}, "metadata")
    source = ckpt if metadata_from is None else metadata_from
    kept = source.metadata
    layout = kept.get(core.METADATA_FORMAT_KEY)
    if layout not in (None, "pt"):  # "tf", "flax", "mlx": names and layouts torch does not load as they are
        raise CkptError(f"{source.path}: its metadata says format "
                        f"{str(layout)[:20]!r}, not PyTorch's 'pt'; writing it as a PyTorch checkpoint would "
                        f"mislabel it: convert it to PyTorch first (e.g. with transformers)")
    meta, dropped = core.plan_metadata(kept, metadata, no_metadata, holds, cast=cast, sharded=sharded)
    shown = None if meta is None else dict(sorted({**meta, core.METADATA_FORMAT_KEY: "pt"}.items()))
    return meta, {"metadata": shown, "metadata_dropped": dropped}


MAX_DEFAULT_JOBS = 4  # more threads than this only add tensors in flight and seeks on one disk


def default_jobs(environ=os.environ) -> int:
    """Shards written at once when --jobs is not given: one per core this process may use (a
    torchrun job's ranks on one machine share them), at most MAX_DEFAULT_JOBS. Measured in
    docs/performance.md ("Many shards"): writing .pth shards (a CRC-32 of every byte) scales with
    the cores, safetensors shards (kernel copies) gain a little, more threads than cores lose."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    try:
        ranks_here = max(1, int(environ.get("LOCAL_WORLD_SIZE", "1")))
    except ValueError:
        ranks_here = 1
    return max(1, min(MAX_DEFAULT_JOBS, cores // ranks_here))


def _jobs(jobs: int | None, max_shard_size: int | None) -> int:
    """The number of shards to write at once; --jobs is refused where there is one file."""
    if jobs is None:
        return default_jobs()
    if type(jobs) is not int or jobs < 1:
        raise UsageError(f"--jobs {jobs!r}: give a number of shards to write at once, 1 or more")
    if max_shard_size is None:
        raise UsageError("--jobs applies to sharded outputs only (give --max-shard-size): one file is written "
                         "by one thread")
    return jobs


class _Stopped(Exception):
    """Raised in a writer thread at its next progress tick once another thread has failed."""


def _run_concurrently(tasks: list[Callable[[Any], Any]], jobs: int, progress) -> list:
    """Run `tasks` (each called with a progress callback), at most `jobs` at once in threads —
    copy_file_range, file writes and CRCs release the GIL — and return their results in order.
    A failure (or Ctrl-C) stops the others at their next tick, and is raised only once every
    thread has stopped: nothing is still writing when the caller removes the staged files."""
    if jobs == 1 or len(tasks) <= 1:
        return [task(progress) for task in tasks]
    stop = threading.Event()

    def tick(n: int) -> None:
        if stop.is_set():
            raise _Stopped
        if progress:
            progress(n)

    pool = ThreadPoolExecutor(max_workers=min(jobs, len(tasks)), thread_name_prefix="ckptsurgery-write")
    futures = [pool.submit(task, tick) for task in tasks]
    try:
        wait(futures, return_when=FIRST_EXCEPTION)
    finally:
        stop.set()  # after a success every task is done already
        pool.shutdown(wait=True, cancel_futures=True)
    for future in futures:
        error = None if future.cancelled() else future.exception()
        if error is not None and not isinstance(error, _Stopped):
            raise error
    return [future.result() for future in futures]


def _mine(count: int, ranks: Ranks | None) -> list[int]:
    """The output files (numbered in the output's order) this process writes: all of them, or
    under torchrun file i when i % WORLD_SIZE is its rank."""
    return [i for i in range(count) if ranks is None or ranks.owns(i)]


def _commit_together(outputs: StagedOutputs, ranks: Ranks | None, order: list[str]) -> None:
    """Under torchrun, once every rank has staged its files, rank 0 renames them all into place
    in `order` (the index last) and the others learn that it did; alone, leaving the
    StagedOutputs block commits."""
    if ranks is None:
        return
    staged = ranks.step("written", outputs.staged)
    if ranks.leader:
        outputs.adopt([tuple(pair) for pairs in staged for pair in pairs], order)
        outputs.commit()
    else:
        outputs.hand_over()
    ranks.step("committed")


def _merged(parts: list[dict]) -> dict:
    """One dict of the keys of all `parts` (each file's, each rank's), in order."""
    return {key: value for part in parts for key, value in part.items()}


def _label(ranks: Ranks | None, output: str) -> str:
    where = f" (rank {ranks.rank})" if ranks else ""
    return f"writing {os.path.basename(output)}{where}"


def _write_dcp(ckpt: Checkpoint, tensors: dict[str, TensorRef], output: str, cast: DType | None,
               max_shard_size: int | None, force: bool, dry_run: bool, progress, others: dict,
               jobs: int, ranks: Ranks | None, metadata_report: dict) -> dict:
    """A DCP folder: the whole checkpoint (the state dict and what lies outside its root), each
    entry under its flattened key. Under torchrun rank 0 stages the folder, every rank writes
    its data files into it, and rank 0 writes .metadata and renames the folder into place."""
    check_dcp_writable(output, force)
    payload = torch_payload(ckpt, tensors, keep_metadata=False, others=others)
    prefix = f"{ckpt.root}." if ckpt.root else ""
    stored = [(n, t, cast_target(t.dtype, cast)) for n, t in tensors.items()]
    writer = DcpWriter(payload, cast_names={prefix + n for n in tensors}, cast=cast, max_file_size=max_shard_size)
    leader = ranks is None or ranks.leader
    mine = _mine(len(writer.files), ranks)
    report = {
        "input": ckpt.path, "output": output, "format": "dcp", "root": ckpt.root, "tensors": len(tensors),
        "total_bytes": sum(t.numel * d.itemsize for _, t, d in stored), "dtype": cast.name if cast else None,
        "kept_dtype": [n for n, t, d in stored if cast and d is not cast], "tied": {}, "extras_left_out": [],
        "files": [output], "dry_run": dry_run, "removed": [], **metadata_report,
    }
    if ranks:
        report.update(files=[os.path.join(output, writer.files[i][0]) for i in mine]
                      + ([os.path.join(output, METADATA)] if leader else []), rank=ranks.rank,
                      world_size=ranks.world_size)
    if dry_run:
        return report
    share = sum(writer.nbytes(i) for i in mine)
    tick = progress(share, _label(ranks, output)) if progress else None
    with StagedOutputs() as outputs:
        folder = outputs.stage_folder(output) if leader else None
        if ranks:
            folder = ranks.step("checked", folder)[0]
        tasks = [lambda advance, i=i: writer.write_file(folder, i, advance) for i in mine]
        try:
            places = _merged(_run_concurrently(tasks, jobs, tick))
        except Exception as e:
            if ranks:  # the folder is rank 0's and shared: every rank stops writing into it before it goes
                with suppress(CkptError):
                    ranks.finish(e)
            raise
        if ranks:
            places = _merged(ranks.step("written", places))
        if leader:
            writer.write_metadata(folder, places)  # last: the folder is whole only with it
        if ranks:
            if leader:
                outputs.commit()
            ranks.step("committed")
    if not ranks:
        report["files"] = [os.path.join(output, name) for name, _ in writer.files] + [os.path.join(output, METADATA)]
    return report


def write_checkpoint(ckpt: Checkpoint, tensors: dict[str, TensorRef], output: str, *,
                     cast: DType | None = None, max_shard_size: int | None = None, force: bool = False,
                     dry_run: bool = False, progress: ProgressFactory | None = None,
                     keep_metadata: bool = True, others: dict | None = None,
                     inputs: list[Checkpoint] | None = None, format: str | None = None,
                     jobs: int | None = None, ranks: Ranks | None = None, metadata: dict[str, str] | None = None,
                     no_metadata: bool = False, metadata_from: Checkpoint | None = None) -> dict:
    """Write `tensors` (the state dict, possibly edited) of `ckpt` to `output`; return a report.
    Entries outside the root, and `others` (the root's non-tensor entries, by default the
    checkpoint's own), travel with .pth and DCP outputs; safetensors holds tensors only.
    `inputs`: every checkpoint whose contents the output holds (by default `ckpt`), for the rule
    that an output never runs more than its inputs. `format`: "dcp" writes a DCP folder at
    `output`; by default the output's extension decides. `jobs`: shards written at once (with
    `max_shard_size` only). `ranks`: this process's place in a torchrun job (`ranks_from_environment`),
    which writes its share of the files; its report lists those in `files`.
    Safetensors metadata (see core.plan_metadata): the input's (`metadata_from`'s, by default
    `ckpt`'s) is kept, or none with `no_metadata`; `metadata` sets entries on top. The report's
    `metadata` is what the output holds besides the alias record, `metadata_dropped` the input's
    keys it does not carry."""
    if format is not None and format not in FORMATS:
        raise UsageError(f"--format {format!r}: choose one of {', '.join(FORMATS)}")
    fmt = "dcp" if format == "dcp" else output_format(output)
    meta, metadata_report = _plan_metadata(ckpt, output, fmt == "safetensors", metadata, no_metadata, metadata_from,
                                           cast=cast is not None, sharded=max_shard_size is not None)
    jobs = _jobs(jobs, max_shard_size)
    if format == "dcp":
        return _write_dcp(ckpt, tensors, output, cast, max_shard_size, force, dry_run, progress,
                          ckpt.others if others is None else others, jobs, ranks, metadata_report)
    inputs = [ckpt] if inputs is None else inputs
    others = ckpt.others if others is None else others
    stored, aliases = plan_safetensors(tensors, cast)
    if cast and fmt == "torch":  # a .pth casts whole storages: see castable_storages
        castable = castable_storages(tensors)
        stored = [(n, t, d if id(t.storage) in castable else t.dtype) for n, t, d in stored]
    if fmt == "safetensors":
        try:
            check_safetensors(stored)  # before anything is written, and under --dry-run too
        except CkptError as e:
            raise CkptError(f"{ckpt.path}: {e}") from None
    sizes = [(name, t.numel * dtype.itemsize) for name, t, dtype in stored]
    total = sum(size for _, size in sizes)
    # no tensors: no shards to plan, one (empty) file
    shards = plan_shards(sizes, max_shard_size) if max_shard_size and sizes else [[n for n, _ in sizes]]
    outside = list(extras(ckpt.obj, ckpt.root)) + list(others)
    report = {
        "input": ckpt.path, "output": output, "format": fmt, "root": ckpt.root,
        "tensors": len(tensors), "total_bytes": total,
        "dtype": cast.name if cast else None,
        # --dtype leaves float8, quantized, integer and bool tensors as they are (and, in a .pth,
        # floating ones whose storage also backs those): say which
        "kept_dtype": [n for n, t, d in stored if cast and d is not cast],
        "tied": {alias: target for alias, target, _ in aliases},
        "extras_left_out": outside if fmt == "safetensors" or len(shards) > 1 else [],
        "files": [output], "dry_run": dry_run, **metadata_report,
    }
    sharded = len(shards) > 1
    files, index = shard_names(output, len(shards)) if sharded else ([output], None)
    everything = files + [index] if sharded else files
    report["files"] = everything
    if sharded:
        report["shards"] = len(shards)
    # an earlier sharded output named after OUT: its shards that this write does not replace go
    report["removed"] = check_writable(everything, force, output + ".index.json")
    leader = ranks is None or ranks.leader
    mine = _mine(len(files), ranks)
    if ranks:  # a single file is file 0: rank 0 writes it, and the index
        report.update(files=[files[i] for i in mine] + ([index] if sharded and leader else []),
                      removed=report["removed"] if leader else [], rank=ranks.rank, world_size=ranks.world_size)
    if dry_run:
        return report
    owner = report["tied"]
    if sharded:  # each shard holds its tensors plus the tied names that point at them
        shard_of = {name: number for number, names in enumerate(shards) for name in names}
        parts = [OrderedDict() for _ in shards]
        for name, t in tensors.items():
            parts[shard_of[owner.get(name, name)]][name] = t
        size_of = dict(sizes)
        share = sum(size_of[name] for i in mine for name in shards[i])
    else:
        parts, share = [tensors], total if mine else 0
    tick = progress(share, _label(ranks, output)) if progress else None
    with StagedOutputs(remove=report["removed"] if leader else []) as outputs:
        if ranks:
            ranks.step("checked")

        def write_file(number: int, advance) -> None:
            with outputs.stage(files[number]) as f:
                _write(f, fmt, ckpt, parts[number], cast, advance, whole=not sharded, keep_metadata=keep_metadata,
                       others=others, inputs=inputs, metadata=meta, plan=None if sharded else (stored, aliases))

        _run_concurrently([lambda advance, i=i: write_file(i, advance) for i in mine], jobs, tick)
        if sharded and leader:
            # key order, not sorted as Hugging Face writes it: reading back keeps the model's order
            weight_map = {name: os.path.basename(files[shard_of[owner.get(name, name)]]) for name in tensors}
            # total_size only, as Hugging Face writes it: transformers acts on what an index's
            # metadata says (its `dtype` picks the dtype a model loads in); the shards carry the rest
            body = {"metadata": {"total_size": total}, "weight_map": weight_map}
            with outputs.stage(index) as f:
                f.write((json.dumps(body, indent=2) + "\n").encode())
        _commit_together(outputs, ranks, everything)
    return report
