"""ckptsurgery drop: remove keys or whole modules, or top-level entries beside the state dict."""

from __future__ import annotations

from typing import Annotated

from .. import ops
from .common import InputArg, InputOptions, OutputOptions, command_app, input_options, listing, output_options
from .declare import Argument


app = command_app()


@app.command()
@output_options()
@input_options()
def drop(
    input: InputArg,
    patterns: Annotated[list[str], Argument(
        metavar="PATTERN...",
        help="Keys or whole modules to remove (glob, module name, or re:REGEX); a pattern that selects no key of "
             "the state dict removes the top-level entries it names beside it (optimizer, lr_scheduler) from a "
             ".pth output.", show_default=False)],
    inp: InputOptions = None,
    *,
    out: OutputOptions,
) -> None:
    """Remove keys or whole modules, or top-level entries beside the state dict (a training checkpoint's optimizer).

    Examples:
        ckptsurgery drop resnet.pth fc -o backbone.pth
        ckptsurgery drop train.ckpt optimizer 're:num_batches_tracked$' -o slim.ckpt
        ckptsurgery drop a.safetensors fc -o b.safetensors --metadata license=mit
    """
    read = inp.reading(input)
    with out.writing() as write:
        report = ops.drop_keys(input, patterns, write, root=inp.root, read=read)
    details = [listing("dropped", report.dropped)] if report.dropped or not report.dropped_outside else []
    if report.dropped_outside:
        details.append(listing("dropped beside the state dict", report.dropped_outside))
    out.finish(report, details)
