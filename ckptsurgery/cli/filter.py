"""ckptsurgery filter: keep the keys patterns select, or exactly the keys a template has."""

from __future__ import annotations

from typing import Annotated, Optional

from .. import ops
from .common import InputArg, InputOptions, OutputOptions, command_app, input_options, listing, output_options
from .declare import Option


app = command_app()


@app.command("filter")
@output_options()
@input_options()
def filter_command(
    input: InputArg,
    keep: Annotated[Optional[list[str]], Option(
        "--keep", metavar="PATTERN", help="Keep keys matching PATTERN (glob, module name, or re:REGEX); repeatable.")] = None,
    like: Annotated[Optional[str], Option(
        "--like", metavar="TEMPLATE",
        help="Keep the keys this template checkpoint has; a key whose shape differs from the template's is an "
             "error (dtypes that differ are reported).")] = None,
    skip_mismatched: Annotated[bool, Option(
        "--skip-mismatched", help="With --like: leave out the keys whose shape differs from the template's "
                                  "(merge --into fits them instead).")] = False,
    inp: InputOptions = None,
    *,
    out: OutputOptions,
) -> None:
    """Keep selected keys, or the keys a template has in the template's shapes (the `if k in model_dict` recipe).

    Examples:
        ckptsurgery filter pretrained.pth -o matching.pth --like new_model.pth
        ckptsurgery filter old.pth --like new.pth --skip-mismatched -o fit.pth
        ckptsurgery filter hf://org/vlm --keep vision_tower -o vision.safetensors
    """
    read = inp.reading(input, like)
    with out.writing() as write:
        report = ops.filter_keys(input, write, keep=keep, like=like, root=inp.root, skip_mismatched=skip_mismatched,
                                 read=read)
    details = [listing("left out", report.left_out)] if report.left_out else []
    if report.shape_mismatched:
        details.append(listing("their shape differs from the template's (--skip-mismatched)",
                               [f"{m['name']} {_shape(m['shape'])} (template {_shape(m['template_shape'])})"
                                for m in report.shape_mismatched]))
    if report.missing_from_input:
        details.append(listing("template keys the input lacks", report.missing_from_input))
    if report.dtype_mismatched:
        details.append(listing("dtype differs from the template's, written as is (load_state_dict casts)",
                               [f"{m['name']} {m['dtype']} (template {m['template_dtype']})"
                                for m in report.dtype_mismatched]))
    out.finish(report, details)


def _shape(shape: list[int] | None) -> str:
    return "(not a tensor)" if shape is None else str(shape)
