"""What every command shares: option aliases, output helpers, the progress bar."""

from __future__ import annotations

import functools
import inspect
import json
import math
import os
import sys
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, replace
from enum import Enum
from typing import Annotated, Any, Callable, Iterator, Optional

from ..dtypes import CAST_TARGETS
from ..io.formats import BY_OPTION, is_remote
from ..ops.options import ReadOptions, WriteOptions
from ..ops.ranks import DEFAULT_TIMEOUT
from ..ops.reports import WriteReport
from .declare import Argument, CommandApp, Option

InputArg = Annotated[str, Argument(
    metavar="INPUT", help="Checkpoint: .pth/.pt/.bin/.ckpt, .safetensors, a shard index or a Hugging Face folder, a "
                          "DCP, DeepSpeed (ZeRO) or accelerate folder, a .gguf file, or remote: an https:// URL of "
                          "a .safetensors file or index, hf://ORG/REPO[@REV][/FILE].", show_default=False)]
RootOpt = Annotated[Optional[str], Option(
    "--root", metavar="KEY", help="Key of the state dict inside a nested .pth ('' = top level). Detected by default.")]
DequantizeOpt = Annotated[bool, Option(
    "--dequantize", help="Read scaled FP8 weights (weight_scale_inv blocks, per-tensor or per-channel weight_scale) as "
                         "bfloat16 (or --dtype where the command has it); their scales are left out.")]
FullDownloadOpt = Annotated[bool, Option(
    "--allow-full-download", help="A remote input whose server ignores range requests is downloaded whole (into a "
                                  "temporary file) instead of refused.")]
JsonOpt = Annotated[bool, Option("--json", help="Print one JSON document on stdout, nothing else.")]
QuietOpt = Annotated[bool, Option("-q", "--quiet", help="Nothing on stderr but errors.")]


def _start_reading(inputs: list, allow_full_download: bool, named_inside: bool = False) -> None:
    """Before a command opens its inputs: a fresh record of what remote inputs fetch, and whether
    one may be downloaded whole. `--allow-full-download` without a remote input is refused
    (`named_inside`: inputs a file names, a recipe's models, may be remote: not read here)."""
    if not named_inside and not any(map(is_remote, inputs)):
        if allow_full_download:
            from ..errors import UsageError

            raise UsageError("--allow-full-download applies to remote inputs (https://, hf://) only")
        remote = sys.modules.get("ckptsurgery.io.remote")
        if remote is not None:  # an earlier command in this process read remote inputs: not this one's record
            remote.start_reading(False)
        return
    from ..io.remote import start_reading

    start_reading(allow_full_download)


def hf_names_line(done) -> str:
    """What --names hf did, in one line."""
    line = f"--names hf: {count(done.renamed, 'tensor')} under Hugging Face names ({done.architecture})"
    if done.unpermuted:
        line += f", {count(len(done.unpermuted), 'q/k projection')} un-permuted"
    if done.left_out:
        line += "; " + listing("left out (no Hugging Face name)", done.left_out)
    return line


def with_fetched(report):
    """The report with what its remote inputs fetched (unchanged when none was remote)."""
    remote = sys.modules.get("ckptsurgery.io.remote")
    ledger = remote.current_ledger() if remote is not None else None
    if ledger is None or not ledger.files:
        return report
    from ..ops.reports import Fetched

    files = [{"url": url, "size": size, "bytes": got, "requests": n} for url, (size, got, n) in ledger.files.items()]
    return replace(report, fetched=Fetched(bytes=ledger.bytes, requests=ledger.requests, files=files,
                                           full_downloads=list(ledger.full_downloads)))


def fetched_line(fetched) -> str:
    files = fetched.files
    line = f"fetched {human_bytes(fetched.bytes)} in {count(fetched.requests, 'request')} from {count(len(files), 'remote file')}"
    if fetched.full_downloads:
        line += f" ({count(len(fetched.full_downloads), 'file')} downloaded whole: the server ignores range requests)"
    return line


def command_app() -> CommandApp:
    """The record of one command module's command (cli/declare.py): the command line imports a
    command's module only when that command runs."""
    return CommandApp()


def command_group(name: str, help: str) -> CommandApp:
    """The record of a group of commands (`lora fold`, `lora merge`, ...): one module, registered
    in cli/__init__'s COMMANDS under `name` as a single command is."""
    return CommandApp(name, help, group=True)


def choice(name: str, values) -> type[Enum]:
    """A real choice: a wrong value exits 2, and --help lists the values."""
    return Enum(name, {value: value for value in values}, type=str)


def printable(text: str) -> str:
    """Names come from the file: escape control characters (a key holding an ANSI escape must
    not drive the terminal, nor a newline split a line)."""
    if text.isprintable():  # the common case, checked in C: 100,000 names stay fast
        return text
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in text)


def _finite(value):
    """`value` with every NaN or infinity replaced by the string "nan", "inf" or "-inf"."""
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite(v) for v in value]
    return value


def _strict_encoder():
    """JSON text of one value, no NaN/Infinity tokens (ValueError instead), non-ASCII as is: the C
    encoder made once, where the stdlib has it — JSONEncoder.encode makes one per call, which
    costs more than the encoding itself for 200 000 small records."""
    try:
        from json.encoder import c_make_encoder, encode_basestring

        iterencode = c_make_encoder(None, None, encode_basestring, None, ": ", ", ", False, False, False)
        return lambda value: "".join(iterencode(value, 0))
    except (ImportError, TypeError):  # no C encoder (another Python): the public route
        return json.JSONEncoder(ensure_ascii=False, allow_nan=False).encode


def print_json(doc: dict) -> None:
    """One strict JSON document (no NaN/Infinity tokens, which jq and most parsers refuse: such
    numbers are written as the strings "nan", "inf", "-inf"); a list of records (tensors, tree
    rows) prints one record per line. `Records` (inspect's tensors) are made and written one at a
    time: the text of 100,000 records is never held whole."""
    from ..ops.reports import Records

    strict = _strict_encoder()

    def dump(value) -> str:
        try:
            return strict(value)
        except ValueError:  # a non-finite float somewhere: the rare path
            return strict(_finite(value))

    def escaped(value) -> str:  # a lone surrogate (from a file) cannot be written as UTF-8: \u escapes
        return json.dumps(_finite(value), allow_nan=False)

    def fits(text: str) -> bool:
        try:
            return text.isascii() or bool(text.encode("utf-8"))
        except UnicodeEncodeError:
            return False

    def pieces(dump) -> list:
        """The document's text in pieces; a (non-empty) `Records` stands for its records."""
        out = ["{\n"]
        for i, (key, value) in enumerate(doc.items()):
            head = ("  " if not i else ",\n  ") + dump(key) + ": "
            if isinstance(value, Records) and len(value):
                out += [head + "[\n", value, "\n  ]"]
            elif isinstance(value, list) and value and all(isinstance(v, dict) for v in value):
                out.append(head + "[\n" + ",\n".join("    " + dump(v) for v in value) + "\n  ]")
            else:
                out.append(head + dump(list(value) if isinstance(value, Records) else value))
        return out + ["\n}\n"]

    parts = pieces(dump)
    if not all(fits(part) for part in parts if type(part) is str):
        dump, parts = escaped, pieces(escaped)
    write = sys.stdout.write
    for part in parts:
        if type(part) is str:
            write(part)
            continue
        for i, record in enumerate(part):
            text = dump(record)
            # (never: readers refuse keys that are not valid text, the only text a record holds)
            write(("    " if not i else ",\n    ") + (text if fits(text) else escaped(record)))


def note(message: str, quiet: bool) -> None:
    """One line for the person at the terminal: stderr, unless --quiet. A newline inside the
    message (from a name in the file) is escaped, never a second line."""
    if not quiet:
        sys.stderr.write(printable(message) + "\n")


def console(stderr: bool = False):
    """A Rich console on stdout (results) or stderr (messages)."""
    from rich.console import Console

    stream = sys.stderr if stderr else sys.stdout
    # In a pipe Rich would assume 80 columns and fold the table; results should not be cut.
    width = None if stream.isatty() else int(os.environ.get("COLUMNS", "160"))
    # markup and emoji off: "[bold]x" and "fc:thumbs_up:" are names to show, not styles or emoji
    return Console(file=stream, width=width, highlight=False, markup=False, emoji=False)


def human_bytes(n: int) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if n < 1000 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return str(n)


@contextmanager
def progress_bar(quiet: bool) -> Iterator:
    """A factory of progress callbacks, or None where no bar belongs (a pipe, --quiet)."""
    if quiet or not sys.stderr.isatty():
        yield None
        return
    from rich.console import Console
    from rich.progress import BarColumn, DownloadColumn, Progress, TextColumn, TransferSpeedColumn

    columns = (TextColumn("{task.description}", markup=False), BarColumn(), DownloadColumn(), TransferSpeedColumn())
    with Progress(*columns, console=Console(stderr=True, emoji=False), transient=True) as bar:
        def start(total: int, label: str):
            task = bar.add_task(label, total=total)
            return lambda n: bar.advance(task, n)

        yield start


@contextmanager
def failures_exit(code: int) -> Iterator[None]:
    """Any failure inside exits with `code` (diff: 2, so that "different" is never a typo)."""
    try:
        yield
    except Exception as e:
        e.exit_code = code  # read where the app turns failures into exit codes (cli/__init__.py)
        raise


def finish_write(report: WriteReport, as_json: bool, quiet: bool, details: list[str] = ()) -> None:
    """How every writing command ends: the JSON report; or a summary — on stdout for --dry-run
    (it is the result), on stderr otherwise (the file is the result)."""
    report = with_fetched(report)
    if as_json:
        print_json(report.to_json())
        return
    verb = "would write" if report.dry_run else "wrote"
    # names are escaped before they are joined: each entry of `lines` is exactly one line
    lines = [f"{verb} {', '.join(map(printable, report.files))}: {count(report.tensors, 'tensor')}, "
             f"{human_bytes(report.total_bytes)}", *details]
    if report.dequantized is not None:
        lines.append(dequantized_line(report.dequantized))
    if report.hf_names is not None:
        lines.append(hf_names_line(report.hf_names))
    if report.fetched is not None:
        lines.append(fetched_line(report.fetched))
    if report.tied:
        lines.append(f"{len(report.tied)} tied name(s) stored once: "
                     + ", ".join(f"{printable(a)} = {printable(b)}" for a, b in report.tied.items()))
    if report.kept_dtype:
        lines.append(listing("kept their dtype (--dtype casts float16/bfloat16/float32/float64 only)",
                             summarised(report.kept_dtype)))
    if report.extras_left_out:
        lines.append("left out (safetensors holds tensors only): " + ", ".join(map(printable, report.extras_left_out)))
    lines += _metadata_lines(report)
    if report.inert:
        lines.append(listing("warning: the output carries the input's inert placeholders (not run here; an unsafe "
                             "torch.load would import them)", report.inert))
    if report.removed:
        lines.append(f"{'would remove' if report.dry_run else 'removed'} the earlier sharded output: "
                     + ", ".join(map(printable, report.removed)))
    if report.needs_force:
        lines.append(listing("would need --force: already there", report.needs_force))
    if report.dry_run:
        sys.stdout.write("".join(printable(line) + "\n" for line in lines))
    else:
        for line in lines:
            note(line, quiet)


def dequantized_line(done) -> str:
    """What --dequantize did, in one line; a note when the input had nothing to dequantize."""
    if not done.tensors:
        return "note: --dequantize: no float8 weight with a scale in the input; written as it is"
    schemes = ", ".join(f"{n} in blocks of {done.block_size[0]}×{done.block_size[1]}" if scheme == "block"
                        else f"{n} {scheme}" for scheme, n in done.schemes.items())
    line = (f"dequantized {count(len(done.tensors), 'float8 weight')} to {done.dtype} ({schemes}); "
            f"left out {count(len(done.scales_dropped), 'scale')}")
    if done.input_scales_dropped:
        line += f" and {count(len(done.input_scales_dropped), 'activation scale')} (input_scale)"
    return line


def _metadata_lines(report: WriteReport) -> list[str]:
    dropped = report.metadata_dropped
    if dropped and report.metadata is None:
        return [listing("metadata left out (a .pth or DCP output holds none)", dropped)]
    if not dropped:
        return []
    from ..core import METADATA_CONTENT_HASHES

    hashes = [k for k in dropped if k in METADATA_CONTENT_HASHES]
    not_text = report.metadata_not_text or []
    lines = [listing("metadata dropped (content hashes, not recomputed for the bytes written)", hashes)] if hashes else []
    if not_text:
        lines.append(listing("metadata left out (not text: safetensors metadata holds text only)", not_text))
    rest = [k for k in dropped if k not in hashes and k not in not_text]
    if rest:
        lines.append(listing("metadata dropped (--no-metadata)", rest))
    return lines


MAX_ROWS = 2000  # a table longer than this is for a program: the rest is in --json


def print_table(columns: tuple[str, ...], rows: list[tuple[str, ...]], stderr: bool, what: str) -> None:
    """A table of at most MAX_ROWS rows (the caller puts what matters first), then one line for
    the rest; long names wrap, never cut."""
    from rich.table import Table

    table = Table(box=None, show_edge=False, pad_edge=False)
    for column in columns:
        table.add_column(column, overflow="fold")
    for row in rows[:MAX_ROWS]:
        table.add_row(*row)
    out = console(stderr)
    out.print(table)
    if len(rows) > MAX_ROWS:
        out.print(f"... {len(rows) - MAX_ROWS:,} more {what} not listed: --json lists them all")


def count(n: int, noun: str) -> str:
    """"1 tensor", "2 tensors"."""
    return f"{n} {noun}{'' if n == 1 else 's'}"


def summarised(names: list[str], least: int = 3) -> list[str]:
    """Names, with each last part that `least` or more of them share said once ("*.num_batches_tracked
    (20)"): the routine summed up, the rest by name, in order of first appearance."""
    by_last: dict[str, list[str]] = {}
    for name in names:
        by_last.setdefault(name.rsplit(".", 1)[-1], []).append(name)
    shown, said = [], set()
    for name in names:
        last = name.rsplit(".", 1)[-1]
        if len(by_last[last]) < least:
            shown.append(name)
        elif last not in said:
            said.add(last)
            shown.append(f"*.{last} ({len(by_last[last])})")
    return shown


def listing(label: str, names: list[str], limit: int = 12) -> str:
    """One line naming (escaped) the first `limit` names."""
    shown = ", ".join(map(printable, names[:limit])) + (f" … (+{len(names) - limit})" if len(names) > limit else "")
    return f"{label} ({len(names)}): {shown}" if names else f"{label}: none"


# --dtype: what convert and merge cast floating tensors to
CastTo = choice("CastTo", CAST_TARGETS)


# ---- the output options every writing command shares -------------------------------------------

# --format: the output formats a name does not pick (io/formats.py's OUTPUTS says which)
OutputFormatChoice = choice("OutputFormat", BY_OPTION)

OUTPUT = "Output"  # the --help panel of the shared output options

# name -> (annotation, default), in --help's order after the command's own options. A new output
# option is one entry here and the WriteOptions field of the same name (docs/architecture.md).
OUTPUT_OPTIONS: dict[str, tuple[Any, Any]] = {
    "output": (Annotated[str, Option("-o", "--output", metavar="OUT",
                                           help="Output file; its extension picks the format.", rich_help_panel=OUTPUT)], ...),
    "force": (Annotated[bool, Option("--force", help="Overwrite an existing output.", rich_help_panel=OUTPUT)], False),
    "dry_run": (Annotated[bool, Option("--dry-run", help="Report what would be written; write nothing.", rich_help_panel=OUTPUT)], False),
    "format": (Annotated[Optional[OutputFormatChoice], Option(
        "--format", help="dcp: write a folder at OUT in torch's distributed checkpoint format (otherwise OUT's extension decides).",
        show_default=False, rich_help_panel=OUTPUT)], None),
    "max_shard_size": (Annotated[Optional[str], Option(
        "--max-shard-size", metavar="SIZE",
        help="Write Hugging Face-style shards of at most this size (e.g. 2GB) and an index.", rich_help_panel=OUTPUT)], None),
    "jobs": (Annotated[Optional[int], Option(
        "--jobs", "-j", metavar="N", min=1, show_default=False,
        help="With --max-shard-size: write N shards at once (default: the measured best, see docs/performance.md).", rich_help_panel=OUTPUT)],
        None),
    "metadata": (Annotated[Optional[list[str]], Option(
        "--metadata", metavar="KEY=VALUE", show_default=False,
        help="Set (or replace) one entry of a .safetensors output's metadata; repeatable. The input's is kept otherwise.", rich_help_panel=OUTPUT)],
        None),
    "metadata_file": (Annotated[Optional[str], Option(
        "--metadata-file", metavar="FILE.json", show_default=False,
        help="Set the entries of this JSON object of strings (applied before --metadata).", rich_help_panel=OUTPUT)], None),
    "no_metadata": (Annotated[bool, Option(
        "--no-metadata",
        help="Keep none of the input's metadata (\"format\": \"pt\" and the tool's tie record are still written).", rich_help_panel=OUTPUT)],
        False),
    "rank_timeout": (Annotated[float, Option(
        "--rank-timeout", metavar="SECONDS",
        help="Under torchrun: how long a rank waits for the others, to join and at each step, before it fails.", rich_help_panel=OUTPUT)],
        DEFAULT_TIMEOUT),
    "json": (JsonOpt, False),
    "quiet": (QuietOpt, False),
}


# not WriteOptions fields: what the command line shows, and how this process joins a torchrun job
_DISPLAY = ("json", "quiet", "rank_timeout")


@dataclass(frozen=True)
class OutputOptions:
    """The shared output options as the command line gave them (`output_options` builds it):
    OUTPUT_OPTIONS' names and values. All but --json, -q and --metadata-file (read into
    --metadata's entries) are WriteOptions fields of the same name."""

    given: dict[str, Any]

    @property
    def json(self) -> bool:
        return self.given.get("json", False)

    @property
    def quiet(self) -> bool:
        return self.given.get("quiet", False)

    @property
    def dry_run(self) -> bool:
        return self.given.get("dry_run", False)

    @contextmanager
    def writing(self, ranks: bool = True) -> Iterator[WriteOptions]:
        """The WriteOptions the operation takes, with a progress bar (on a terminal) and, under
        torchrun, this process's rank (`ranks`: whether the command writes with several ranks)."""
        from ..ops.ranks import ranks_from_environment
        from ..ops.write import metadata_options

        fields = {name: value for name, value in self.given.items() if name not in _DISPLAY}
        fields["metadata"] = metadata_options(fields.get("metadata"), fields.pop("metadata_file", None))
        if fields.get("format") is not None:
            fields["format"] = fields["format"].value
        joining = ranks_from_environment(timeout=self.given.get("rank_timeout", DEFAULT_TIMEOUT)) if ranks \
            else nullcontext()
        with joining as place, \
                progress_bar(self.quiet or self.json) as progress:
            yield WriteOptions(**fields, progress=progress, ranks=place)

    def finish(self, report: WriteReport, details: list[str] = ()) -> None:
        finish_write(report, self.json, self.quiet, details)


# --names: ops/gguf_names.py's Names, spelled here (that module is imported only when hf is asked)
NamesChoice = choice("Names", ("gguf", "hf"))
NamesOpt = Annotated[NamesChoice, Option(
    "--names", help="A GGUF input's tensor names: gguf keeps llama.cpp's (blk.N.attn_q.weight); hf reads them under "
                    "Hugging Face's (llama — Mistral too —, qwen2, qwen3), Llama's q/k un-permuted.")]

# the input options every reading command shares: name -> (annotation, default)
INPUT_OPTIONS: dict[str, tuple[Any, Any]] = {
    "root": (RootOpt, None),
    "dequantize": (DequantizeOpt, False),
    "names": (NamesOpt, NamesChoice.gguf),
    "allow_full_download": (FullDownloadOpt, False),
}


@dataclass(frozen=True)
class InputOptions:
    """The shared input options as the command line gave them (`input_options` builds it): `root`,
    the `ReadOptions` the operation takes, and --allow-full-download (io/remote.py's)."""

    root: str | None
    read: ReadOptions
    allow_full_download: bool

    def reading(self, *inputs: str | None, check: bool = True, named_inside: bool = False) -> ReadOptions:
        """Before the command opens `inputs` (None: an input not given): what does not apply is
        refused (--names hf without a GGUF input, --allow-full-download without a remote one;
        `check` False: checked already, for an earlier input of the same command), and a fresh
        record of what remote inputs fetch starts (`named_inside`: its inputs are named in a file,
        a recipe, read once by the operation — a pipe cannot be read twice). The ReadOptions to
        hand on."""
        paths = [path for path in inputs if path is not None]
        if self.read.names == "hf" and check:
            from ..ops.gguf_names import check_inputs

            check_inputs(paths)
        _start_reading(paths, self.allow_full_download, named_inside)
        return self.read


def _input_options(given: dict) -> InputOptions:
    read = ReadOptions(dequantize=given.get("dequantize", False),
                       names=getattr(given.get("names"), "value", None) or "gguf")
    return InputOptions(given.get("root"), read, given.get("allow_full_download", False))


def input_options(*, omit: tuple[str, ...] = ()):
    """Give a command the shared input options (--root, --dequantize, --names,
    --allow-full-download), where its parameter `inp` stands, handed to it as one `inp: InputOptions`.
    `omit`: options that do not apply to the command."""
    wanted = {name: spec for name, spec in INPUT_OPTIONS.items() if name not in omit}
    return expanded_options("inp", wanted, _input_options)


def output_options(*, omit: tuple[str, ...] = (), **own: Any):
    """Give a command the shared output options: they are added to its signature (so Typer
    parses them and --help lists them: -o right after the arguments, the others after the
    command's own options) and handed to it as one `out: OutputOptions`. `omit`: options that do
    not apply to the command; `own`: the command's own annotation of an option (its -o, a help
    text that says what the option does there)."""
    wanted = {name: (own.get(name, annotation), default) for name, (annotation, default) in OUTPUT_OPTIONS.items()
              if name not in omit}
    return expanded_options("out", wanted, OutputOptions, first_after_arguments=True)


def expanded_options(keyword: str, options: dict[str, tuple[Any, Any]], build: Callable[[dict], Any],
                     first_after_arguments: bool = False):
    """A decorator that puts `options` (name -> (annotation, default; ... for required)) in a
    command's signature where its parameter `keyword` stands, and hands the command, as
    `keyword`, `build({name: value})` of what was given: options declared elsewhere (a table,
    a registry) become the command's without being spelled in it."""
    def decorate(command):
        own = list(inspect.signature(command, eval_str=True).parameters.values())
        clash = sorted(set(options) & {p.name for p in own})
        if clash:  # a declaration elsewhere (a merge method's parameter) took the name of one of the command's options
            raise TypeError(f"{command.__name__}: {', '.join(clash)}: already an option of the command; "
                            f"declare {'them' if len(clash) > 1 else 'it'} under another name")
        at = [p.name for p in own].index(keyword)
        added = [inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, annotation=annotation,
                                   default=inspect.Parameter.empty if default is ... else default)
                 for name, (annotation, default) in options.items()]
        rest = [p.replace(kind=inspect.Parameter.KEYWORD_ONLY) for p in own[:at] + own[at + 1:]]
        if first_after_arguments:
            arguments = sum(1 for p in own[:at] if p.default is inspect.Parameter.empty)
            parameters = [*rest[:arguments], *added[:1], *rest[arguments:], *added[1:]]
        else:
            parameters = [*rest[:at], *added, *rest[at:]]

        @functools.wraps(command)
        def run(**given):
            built = build({name: given.pop(name) for name in options})
            return command(**given, **{keyword: built})

        run.__signature__ = inspect.Signature(parameters)
        run.__annotations__ = {p.name: p.annotation for p in parameters}
        return run

    return decorate
