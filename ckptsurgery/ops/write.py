"""The one way every operation writes: `write_checkpoint` plans the output (format, casts, tied
names, shards, what is left out) as one `WriteOptions` says, refuses what cannot be written
before anything is, and streams the tensors through each format's writer (io/safetensors.py,
io/torch_zip.py, io/dcp.py; io/formats.py's OUTPUTS names them) — `jobs` shards at once, in
threads, and under torchrun each rank its share of them (`ranks.py`) — into files staged beside
their places and renamed there together (io/write.py)."""

from __future__ import annotations

import json
import os
import threading
from collections import OrderedDict
from contextlib import suppress
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any, Callable

from .. import core
from ..dtypes import DType
from ..errors import CkptError, UsageError
from ..io import Checkpoint, TensorRef, collection_paused
from ..io.formats import BY_OPTION, OutputFormat
from ..io.pickled import inert_names
from ..io.tree import extras
from ..io.safetensors import check_safetensors, write_safetensors
from ..io.write import (
    StagedOutputs, cast_target, check_writable, output_format, plan_safetensors, plan_shards, shard_names,
)
from .options import WriteOptions, check_write_options, default_jobs
from .ranks import Ranks
from .reports import WriteReport

if TYPE_CHECKING:
    from ..io.dcp import DcpWriter


def _write(f, fmt: OutputFormat, source: "_Source", tensors: dict[str, TensorRef], cast: DType | None,
           progress, whole: bool, keep_metadata: bool, others: dict, inputs: list[Checkpoint],
           metadata: dict[str, str] | None, plan: tuple | None = None) -> None:
    """One output file: the whole checkpoint, or (`whole=False`) one shard's plain state dict.
    `metadata`: a safetensors file's entries besides `format` and the alias record (each shard
    carries them all). `plan`: what plan_safetensors gave for `tensors`, checked (else planned here)."""
    if fmt is OutputFormat.SAFETENSORS:
        write_safetensors(f, tensors, metadata or {}, cast, progress, plan)
    else:
        from ..io.pickler import PickleRefused  # the .pth machinery, imported when a .pth is written
        from ..io.torch_zip import write_torch

        payload = source.payload(tensors, keep_metadata, others) if whole else OrderedDict(tensors)
        try:
            write_torch(f, payload, cast, progress, cast_only=tensors, inputs=[c.events for c in inputs])
        except PickleRefused as e:
            raise CkptError(f"{source.path}: cannot be written as a .pth: {e}") from None


FOLDER_FILE = "model.safetensors"  # what an output named DIR/ is written as, as save_pretrained names it


def _in_folder(options: WriteOptions) -> WriteOptions:
    """`-o DIR/` (a trailing slash) is a folder output: DIR/model.safetensors, or DIR itself for a
    format that is a folder (--format dcp)."""
    if not options.output.endswith(("/", os.sep)):
        return options
    if options.format is not None:
        return replace(options, output=options.output.rstrip("/" + os.sep) or options.output)
    return replace(options, output=os.path.join(options.output, FOLDER_FILE))


def _output_format(options: WriteOptions) -> OutputFormat:
    if options.format is not None:
        if options.format not in BY_OPTION:
            raise UsageError(f"--format {options.format!r}: choose one of {', '.join(BY_OPTION)}")
        return OutputFormat(options.format)
    return output_format(options.output)

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
        built = dict(pairs)
        if len(built) != len(pairs):  # the first key seen twice, found in one pass (not keys.count per key)
            seen: set = set()
            twice = next(k for k, _ in pairs if k in seen or seen.add(k))
            raise UsageError(f"{where}: key {core.short_repr(twice)} is given twice; which one is meant?")
        return built

    return build


def _plan_metadata(options: WriteOptions, holds: bool, source: "_Source", cast: bool = False) -> tuple[dict | None, dict]:
    """The metadata written (besides `format` and the alias record; None where the output holds
    none) and the report's `metadata`, `metadata_dropped` and `metadata_not_text`. Options that cannot apply are refused."""
    metadata = options.metadata
    if metadata is not None or options.no_metadata:
        if not holds:
            raise UsageError(f"{METADATA_OPTIONS} apply to .safetensors outputs only: {options.output} is not one "
                             f"(a .pth or DCP output holds no metadata map)")
        metadata = core.check_metadata(dict(metadata or {}), "metadata")
    kept = source.metadata
    layout = kept.get(core.METADATA_FORMAT_KEY)
    if layout not in (None, "pt"):  # "tf", "flax", "mlx": names and layouts torch does not load as they are
        raise CkptError(f"{source.path}: its metadata says format "
                        f"{str(layout)[:20]!r}, not PyTorch's 'pt'; writing it as a PyTorch checkpoint would "
                        f"mislabel it: convert it to PyTorch first (e.g. with transformers)")
    meta, dropped = core.plan_metadata(kept, metadata, options.no_metadata, holds, cast=cast,
                                       sharded=options.max_shard_size is not None)
    shown = None if meta is None else dict(sorted({**meta, core.METADATA_FORMAT_KEY: "pt"}.items()))
    not_text = [k for k in dropped if not isinstance(kept[k], str)] if meta is not None else []
    return meta, {"metadata": shown, "metadata_dropped": dropped, "metadata_not_text": not_text or None}


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
    # here: the pool's module imports logging, and most writes are one file
    from concurrent.futures import FIRST_EXCEPTION, ThreadPoolExecutor, wait

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


def _dcp_report(source: "_Source", tensors: dict[str, TensorRef], options: WriteOptions, cast: DType | None,
                writer: DcpWriter, mine: list[int], metadata_report: dict) -> WriteReport:
    from ..io.dcp import METADATA

    stored = [(n, t, cast_target(t.dtype, cast)) for n, t in tensors.items()]
    ranks = options.ranks
    files = [options.output]
    if ranks:
        files = ([os.path.join(options.output, writer.files[i][0]) for i in mine]
                 + ([os.path.join(options.output, METADATA)] if ranks.leader else []))
    elif not options.dry_run:
        files = [os.path.join(options.output, name) for name, _ in writer.files] + [os.path.join(options.output, METADATA)]
    return WriteReport(
        input=source.path, output=options.output, format=OutputFormat.DCP.value, root=source.root, tensors=len(tensors),
        total_bytes=sum(t.numel * d.itemsize for _, t, d in stored), dtype=cast.name if cast else None,
        kept_dtype=[n for n, t, d in stored if cast and d is not cast], tied={}, extras_left_out=[], files=files,
        dry_run=options.dry_run, removed=[], **metadata_report,
        **({"rank": ranks.rank, "world_size": ranks.world_size} if ranks else {}))


def _write_dcp(source: "_Source", tensors: dict[str, TensorRef], options: WriteOptions, cast: DType | None,
               others: dict, jobs: int, metadata_report: dict) -> WriteReport:
    """A DCP folder: the whole checkpoint (the state dict and what lies outside its root), each
    entry under its flattened key. Under torchrun rank 0 stages the folder, every rank writes
    its data files into it, and rank 0 writes .metadata and renames the folder into place."""
    from ..io.dcp import DcpWriter, check_dcp_writable  # its reader and writer: imported by DCP outputs alone

    output, ranks = options.output, options.ranks
    check_dcp_writable(output, options.force or options.dry_run)
    payload = source.payload(tensors, keep_metadata=False, others=others)
    prefix = f"{source.root}." if source.root else ""
    writer = DcpWriter(payload, cast_names={prefix + n for n in tensors}, cast=cast,
                       max_file_size=options.max_shard_size)
    mine = _mine(len(writer.files), ranks)
    report = _dcp_report(source, tensors, options, cast, writer, mine, metadata_report)
    if options.dry_run:
        return replace(report, needs_force=_needs_force([output], options))
    share = sum(writer.nbytes(i) for i in mine)
    tick = options.progress(share, _label(ranks, output)) if options.progress else None

    def fill(folder: str) -> dict:
        tasks = [lambda advance, i=i: writer.write_file(folder, i, advance) for i in mine]
        return _merged(_run_concurrently(tasks, jobs, tick))

    # .metadata last: the folder is whole only with it
    _fill_staged_folder(output, ranks, fill, last=lambda folder, places: writer.write_metadata(folder, _merged(places)))
    return report


@dataclass(frozen=True)
class FolderOutput:
    """A file output written inside a folder of its own, beside other files (a merged model's
    folder): the whole folder is staged, filled and renamed into place in one step, replacing an
    earlier one whole (--force). `names`: the other files; `write_files(staged)` writes them."""

    path: str
    names: list[str]
    write_files: Callable[[str], Any]

    def check(self, options: WriteOptions) -> None:
        if os.path.lexists(self.path) and not os.path.isdir(self.path):
            raise CkptError(f"{self.path}: is a file; the output is a folder")
        if os.path.lexists(self.path) and not (options.force or options.dry_run):
            raise CkptError(f"{self.path}: already exists; pass --force to replace it")

    def inside(self, staged: str) -> Callable[[str], str]:
        """A final path in the folder -> the same path in the staged folder."""
        return lambda path: os.path.join(staged, os.path.relpath(path, self.path))


def _fill_staged_folder(path: str, ranks: Ranks | None, fill: Callable[[str], Any],
                        last: Callable[[str, list], None] | None = None) -> None:
    """Stage the folder `path` whole — under torchrun rank 0 stages it and hands its temporary
    name to the others at `checked` — and have every rank `fill(staged)` it; rank 0 then runs
    `last(staged, [each rank's result])`, and renames the folder into place (after `written`
    under torchrun). A rank that fails tells the others first: the folder is rank 0's and
    shared, and every rank stops writing into it before it goes."""
    leader = ranks is None or ranks.leader
    with StagedOutputs() as outputs:
        staged = outputs.stage_folder(path) if leader else None
        if ranks:
            staged = ranks.step("checked", staged)[0]
        try:
            result = fill(staged)
        except Exception as e:
            if ranks:
                with suppress(CkptError):
                    ranks.finish(e)
            raise
        results = ranks.step("written", result) if ranks else [result]
        if leader and last is not None:
            last(staged, results)
        if ranks:
            if leader:
                outputs.commit()
            ranks.step("committed")


def _needs_force(paths: list[str], options: WriteOptions) -> list[str] | None:
    """The paths a dry run found taken, which the real run would need --force to replace."""
    if options.force:
        return None
    return [path for path in paths if os.path.lexists(path)] or None


class _Source:
    """What an output carries over from the checkpoint it is made from (`ckpt`), or nothing
    (`ckpt` None: a fresh output, such as an adapter's weights): the name errors give, the
    root, the entries inside and outside it that are not tensors, and the metadata."""

    def __init__(self, ckpt: Checkpoint | None, output: str):
        self.ckpt = ckpt
        self.path = ckpt.path if ckpt is not None else output
        self.root = ckpt.root if ckpt is not None else None
        self.others = ckpt.others if ckpt is not None else {}
        self.metadata = ckpt.metadata if ckpt is not None else {}

    def outside(self) -> list[str]:
        return list(extras(self.ckpt.obj, self.ckpt.root)) if self.ckpt is not None else []

    def payload(self, tensors: dict[str, TensorRef], keep_metadata: bool, others: dict):
        if self.ckpt is None:
            return OrderedDict([*tensors.items(), *others.items()])
        from ..io.torch_zip import torch_payload

        return torch_payload(self.ckpt, tensors, keep_metadata, others)


class _FilePlan:
    """A file output planned before anything is written: what each tensor is stored as, the
    names stored once, the shards and their files."""

    def __init__(self, source: _Source, tensors: dict[str, TensorRef], options: WriteOptions, fmt: OutputFormat,
                 cast: DType | None, shards: list[list[str]] | None = None):
        self.tensors, self.fmt = tensors, fmt
        self.stored, self.aliases = plan_safetensors(tensors, cast)
        if cast and fmt is OutputFormat.TORCH:  # a .pth casts whole storages: see castable_storages
            from ..io.torch_zip import castable_storages

            castable = castable_storages(tensors)
            self.stored = [(n, t, d if id(t.storage) in castable else t.dtype) for n, t, d in self.stored]
        if fmt is OutputFormat.SAFETENSORS:
            try:
                check_safetensors(self.stored)  # before anything is written, and under --dry-run too
            except CkptError as e:
                raise CkptError(f"{source.path}: {e}") from None
        self.sizes = _sizes(self.stored)
        self.total = sum(size for _, size in self.sizes)
        limit = options.max_shard_size
        # no tensors: no shards to plan, one (empty) file
        self.shards = plan_shards(self.sizes, limit) if limit and self.sizes else [[n for n, _ in self.sizes]]
        if shards is not None and limit is None:  # the caller's grouping (an input's shards), in its order
            self.shards = _given_shards(shards, [n for n, _ in self.sizes])
        self.sharded = len(self.shards) > 1
        self.files, self.index = (shard_names(options.output, len(self.shards)) if self.sharded
                                  else ([options.output], None))
        self.everything = self.files + [self.index] if self.sharded else self.files
        self.tied = {alias: target for alias, target, _ in self.aliases}
        self._number = ({name: number for number, names in enumerate(self.shards) for name in names}
                        if self.sharded else {})

    def parts(self, mine: list[int]) -> tuple[list[dict], int]:
        """Each file's tensors (a shard holds its tensors plus the tied names that point at
        them) and the bytes of the files in `mine`."""
        if not self.sharded:
            return [self.tensors], self.total if mine else 0
        parts = [OrderedDict() for _ in self.shards]
        for name, t in self.tensors.items():
            parts[self.shard_of(name)][name] = t
        size_of = dict(self.sizes)
        return parts, sum(size_of[name] for i in mine for name in self.shards[i])

    def shard_of(self, name: str) -> int:
        """The number of the shard a name (or the name it is tied to) is written in."""
        return self._number[self.tied.get(name, name)]

    def index_body(self) -> bytes:
        # key order, not sorted as Hugging Face writes it: reading back keeps the model's order
        weight_map = {name: os.path.basename(self.files[self.shard_of(name)]) for name in self.tensors}
        # total_size only, as Hugging Face writes it: transformers acts on what an index's
        # metadata says (its `dtype` picks the dtype a model loads in); the shards carry the rest
        body = {"metadata": {"total_size": self.total}, "weight_map": weight_map}
        return (json.dumps(body, indent=2) + "\n").encode()


def _sizes(stored: list) -> list[tuple[str, int]]:
    """(name, bytes written) of each stored tensor; each shape's element count computed once (a
    state dict of 200 000 tensors holds a few shapes)."""
    counts: dict[tuple[int, ...], int] = {}
    sizes = []
    for name, t, dtype in stored:
        count = counts.get(t.shape)
        if count is None:
            count = counts[t.shape] = t.numel
        sizes.append((name, count * dtype.itemsize))
    return sizes


def _given_shards(shards: list[list[str]], stored: list[str]) -> list[list[str]]:
    """The stored names grouped as `shards` say (empty groups dropped); a name no group holds goes
    with the last group."""
    left, groups = set(stored), []
    for names in shards:
        groups.append([name for name in dict.fromkeys(names) if name in left])
        left.difference_update(groups[-1])
    placed = set(stored) - left
    groups = [names for names in groups if names] or [[]]
    groups[-1] += [name for name in stored if name not in placed]
    return groups


def _file_report(source: _Source, plan: _FilePlan, options: WriteOptions, cast: DType | None, others: dict,
                 removed: list[str], mine: list[int], metadata_report: dict,
                 folder: FolderOutput | None) -> WriteReport:
    ranks = options.ranks
    leader = ranks is None or ranks.leader
    files = plan.everything
    if ranks:  # a single file is file 0: rank 0 writes it, and the index
        files = [plan.files[i] for i in mine] + ([plan.index] if plan.sharded and leader else [])
    if folder is not None and leader:  # rank 0 writes the folder's other files
        files = files + [os.path.join(folder.path, name) for name in folder.names]
    return WriteReport(
        input=source.path, output=options.output, format=plan.fmt.value, root=source.root,
        tensors=len(plan.tensors), total_bytes=plan.total, dtype=cast.name if cast else None,
        # --dtype leaves float8, quantized, integer and bool tensors as they are (and, in a .pth,
        # floating ones whose storage also backs those): say which
        kept_dtype=[n for n, t, d in plan.stored if cast and d is not cast], tied=plan.tied,
        extras_left_out=(source.outside() + list(others)
                         if plan.fmt is OutputFormat.SAFETENSORS or plan.sharded else []),
        files=files, dry_run=options.dry_run, **metadata_report,
        shards=len(plan.shards) if plan.sharded else None, removed=removed if leader else [],
        **({"rank": ranks.rank, "world_size": ranks.world_size} if ranks else {}))


def write_checkpoint(tensors: dict[str, TensorRef], options: WriteOptions, *, source: Checkpoint | None = None,
                     cast: DType | None = None, keep_metadata: bool = True, others: dict | None = None,
                     inputs: list[Checkpoint] | None = None, metadata_from: Checkpoint | None = None,
                     folder: FolderOutput | None = None, shards: list[list[str]] | None = None) -> WriteReport:
    """Write `tensors` (a state dict, possibly edited, of `source`) as `options` say; return what
    was written. Entries outside `source`'s root, and `others` (the root's non-tensor entries, by
    default the source's own), travel with .pth and DCP outputs; safetensors holds tensors only.
    `source` None: a fresh output (no root, nothing around the tensors, no metadata inherited).
    `inputs`: every checkpoint whose contents the output holds (by default `source`), for the
    rule that an output never runs more than its inputs. `cast`: the dtype floating tensors are
    written in. Safetensors metadata (see core.plan_metadata): `metadata_from`'s (by default
    `source`'s) is kept, or none with `options.no_metadata`; `options.metadata` sets entries on
    top. `options.ranks`: under torchrun this process writes its share of the files, listed in
    the report's `files`. An output whose folder does not exist gets it (removed again if the
    write fails); `-o DIR/` writes DIR/model.safetensors (sharded as Hugging Face names shards).
    `folder`: `options.output` lies in a folder of its own, written whole with other files. `shards`:
    without `options.max_shard_size`, the names of each shard (an input's own; see _given_shards)."""
    options = _in_folder(check_write_options(options))
    if folder is not None:
        options.refuse("format", why="does not apply to an output folder")
        folder.check(options)
    fmt = _output_format(options)
    origin = _Source(source, options.output)
    meta, metadata_report = _plan_metadata(options, fmt.spec.metadata,
                                           _Source(metadata_from, options.output) if metadata_from else origin,
                                           cast=cast is not None)
    jobs = _jobs(options.jobs, options.max_shard_size)
    others = origin.others if others is None else others
    if fmt is OutputFormat.DCP:
        return _write_dcp(origin, tensors, options, cast, others, jobs, metadata_report)
    inputs = ([] if source is None else [source]) if inputs is None else inputs
    with collection_paused():  # a tuple or two per tensor, kept: see collection_paused
        plan = _FilePlan(origin, tensors, options, fmt, cast, shards)
    # an earlier sharded output named after OUT: its shards that this write does not replace go
    index = options.output + ".index.json"
    # a dry run replaces nothing: what a real run would need --force for, it reports
    # a folder of its own is replaced whole: nothing in it to check or remove
    removed = check_writable(plan.everything, options.force or options.dry_run, index) if folder is None else []
    mine = _mine(len(plan.files), options.ranks)
    report = _file_report(origin, plan, options, cast, others, removed, mine, metadata_report, folder)
    # a .pth carries what it carries through; shards hold tensors alone, a DCP folder refuses placeholders
    if plan.fmt is OutputFormat.TORCH and not plan.sharded and any(c.events for c in inputs):
        report = replace(report, inert=inert_names(origin.payload(tensors, keep_metadata, others)) or None)
    if options.dry_run:
        # the index beside OUT is one of the files when sharded; else an earlier output's, to replace
        taken = [folder.path] if folder else list(dict.fromkeys([*plan.everything, index]))
        return replace(report, needs_force=_needs_force(taken, options))
    _write_files(origin, plan, options, cast, others, inputs, meta, removed, mine, jobs, keep_metadata, folder)
    return report


def _write_files(source: _Source, plan: _FilePlan, options: WriteOptions, cast: DType | None, others: dict,
                 inputs: list[Checkpoint], meta: dict | None, removed: list[str], mine: list[int], jobs: int,
                 keep_metadata: bool, folder: FolderOutput | None) -> None:
    """Stage the files this process writes, `jobs` at once, then rename them all into place."""
    ranks = options.ranks
    leader = ranks is None or ranks.leader
    parts, share = plan.parts(mine)
    tick = options.progress(share, _label(ranks, options.output)) if options.progress else None

    def write_all(outputs: StagedOutputs, where: Callable[[str], str] = lambda path: path) -> None:
        def write_file(number: int, advance) -> None:
            with outputs.stage(where(plan.files[number])) as f:
                _write(f, plan.fmt, source, parts[number], cast, advance, whole=not plan.sharded,
                       keep_metadata=keep_metadata, others=others, inputs=inputs, metadata=meta,
                       plan=None if plan.sharded else (plan.stored, plan.aliases))

        _run_concurrently([lambda advance, i=i: write_file(i, advance) for i in mine], jobs, tick)
        if plan.sharded and leader:
            with outputs.stage(where(plan.index)) as f:
                f.write(plan.index_body())

    if folder is not None:  # the folder staged whole; its files renamed into it, still out of sight
        def fill(staged: str) -> None:
            with StagedOutputs() as inside:
                write_all(inside, folder.inside(staged))
                if leader:
                    folder.write_files(staged)

        _fill_staged_folder(folder.path, ranks, fill)
        return
    with StagedOutputs(remove=removed if leader else []) as outputs:
        if ranks:
            if leader:  # the folders are rank 0's, as the files it renames into them: made before the others stage
                outputs.make_folders(plan.everything[0])
            ranks.step("checked")
        write_all(outputs)
        _commit_together(outputs, ranks, plan.everything)
