"""`lora convert ADAPTER --to peft|kohya [--base BASE]`: a PEFT folder as a kohya .safetensors
file (lora_down = A, lora_up = B, alpha = scale·r, underscore names), or back. The factors are
copied as they are (a 1×1 conv's reshaped to the base weight's rank); folding the converted
adapter gives the weights folding the original gives.

Names: peft's dotted module names become kohya's `lora_unet_<name with dots made underscores>`
(`lora_te_` for a CLIP text encoder's `text_model.…`). With --base, each is held to the kohya
resolver (kohya.py, through read.FORMATS): it must name, in BASE, the weight the peft name names
(else the base key's whole name is used, else refused). kohya's underscore names cannot be made
dotted without the model: `--to peft` needs BASE, whose module each kohya name resolves to names
the peft module."""

from __future__ import annotations

import math
from contextlib import ExitStack

from ...errors import CkptError, UsageError
from ...io import TensorRef, open_checkpoint
from ...io.model import computed_tensor
from ..options import WriteOptions, check_write_options
from ..reports import LoraConvertReport
from .kinds import Format, Layout, Module, Resolver
from .lowrank import adapter_write, plain_modules, write_adapter
from .output import Written
from .read import FORMATS, read_adapter, resolver


def convert_adapter(adapter: str, write: WriteOptions, *, to: str, base: str | None = None,
                    root: str | None = None) -> LoraConvertReport:
    """The adapter at `write.output` in format `to` ("peft": a folder, "kohya": a .safetensors
    file); `base` (needed for "peft" from kohya) names the modules."""
    write = check_write_options(write)
    if to not in (Format.PEFT, Format.KOHYA):
        raise UsageError(f"--to {to!r}: expected one of {Format.PEFT}, {Format.KOHYA}")
    to = Format(to)
    metadata = adapter_write(write)
    with ExitStack() as stack:
        opened = stack.enter_context(read_adapter(adapter))
        if opened.format == to:
            raise UsageError(f"{adapter}: already a {to} adapter; nothing to convert")
        if to == Format.PEFT and base is None:
            raise UsageError(f"{adapter}: kohya's underscore names say no module's dotted name by themselves; give "
                             f"--base BASE (the checkpoint it folds into) to name its modules")
        keys = list(stack.enter_context(open_checkpoint(base, root)).tensors.items()) if base else None
        modules = plain_modules(opened)
        made = [(_to_kohya if to == Format.KOHYA else _to_peft)(m, opened, keys) for m in modules]
        _refuse_one_name_twice(modules, made, adapter)
        files, needs_force = write_adapter(made, to, write, metadata)
    return LoraConvertReport(output=write.output, format=to.value, files=files, dry_run=write.dry_run,
                             metadata=dict(sorted({**metadata, "format": "pt"}.items())), needs_force=needs_force,
                             adapter=adapter, source_format=opened.format.value, base=base,
                             names={m.name: w.name for m, w in zip(modules, made)})


def _refuse_one_name_twice(modules: list[Module], made: list[Written], adapter: str) -> None:
    """Two modules named alike in the output (`a.b_c` and `a_b.c` both `lora_unet_a_b_c`) would be one."""
    seen: dict[str, str] = {}
    for m, w in zip(modules, made):
        if w.name in seen:
            raise CkptError(f"{adapter}: {seen[w.name]} and {m.name} would both be {w.name}; give --base BASE to "
                            f"tell them apart, or rename one")
        seen[w.name] = m.name


def _kohya_resolver(keys: list[str]) -> Resolver:
    return next(f for f in FORMATS if f.name == Format.KOHYA).resolver(keys)


def _kohya_name(body: str) -> str:
    return ("lora_te_" if body.startswith("text_model.") else "lora_unet_") + body.replace(".", "_")


def _to_kohya(m: Module, opened, keys: list[tuple[str, TensorRef]] | None) -> Written:
    name, layout = _kohya_name(m.name), m.layout
    if keys is not None:  # the name must come back to the weight the peft name folds into
        names = [k for k, _ in keys]
        key = resolver(opened, names).module_key(m.name)
        if key is None:
            raise CkptError(f"{opened.path}: {m.name} matches no weight of the base; is it the right base?")
        out, inner = m.b.shape[0], math.prod(m.a.shape[1:])
        if layout == Layout.LINEAR_T and tuple(dict(keys)[key].shape) == (out, inner) and out != inner:
            layout = Layout.LINEAR  # the base shows an nn.Linear weight: peft's saved fan_in_fan_out was another's
        back = _kohya_resolver(names)
        name = next((n for n in (name, _kohya_name(key[: -len(".weight")])) if _resolves(back, n) == key), None)
        if name is None:
            raise CkptError(f"{opened.path}: {m.name}: no kohya name comes back to the base's {key} alone (its "
                            f"dots made underscores match another module too); rename the base")
    if layout not in (Layout.LINEAR, Layout.CONV):
        raise CkptError(f"{opened.path}: {m.name}: its layout is {layout}; kohya's format holds linear and conv "
                        f"LoRA modules only (lora_down/lora_up of a weight stored [out, in…])")
    return Written(name, m.a, m.b, m.a.shape[0], m.scale * m.a.shape[0], layout)


def _resolves(back: Resolver, name: str) -> str | None:
    try:
        return back.module_key(name)
    except CkptError:  # more than one module of the base: not this name
        return None


def _to_peft(m: Module, opened, keys: list[tuple[str, TensorRef]]) -> Written:
    key = _kohya_resolver([k for k, _ in keys]).module_key(m.name)
    if key is None:
        raise CkptError(f"{opened.path}: {m.name} matches no weight of the base; is it the right base?")
    weight = dict(keys)[key]
    r, shape = m.a.shape[0], tuple(weight.shape)
    out, inner = m.b.shape[0], m.a.numel // r
    if len(shape) > 2:  # conv: A [r, in, k…], B [out, r, 1…]
        layout, a_shape, b_shape = Layout.CONV, (r, *shape[1:]), (out, r, *[1] * (len(shape) - 2))
        fits = shape[0] == out and m.a.numel == r * math.prod(shape[1:])
    else:  # linear, or stored [in, out] (transformers' Conv1D: peft's fan_in_fan_out)
        layout = Layout.LINEAR if shape == (out, inner) else Layout.LINEAR_T
        a_shape, b_shape = (r, inner), (out, r)
        fits = shape in ((out, inner), (inner, out))
    if not fits or m.b.numel != out * r:
        raise CkptError(f"{opened.path}: {m.name}: factors A {list(m.a.shape)}, B {list(m.b.shape)} do not make the "
                        f"base's {key} {list(shape)}; is it the right base?")
    return Written(key[: -len(".weight")], _reshaped(m.a, a_shape), _reshaped(m.b, b_shape), r, m.scale * r, layout)


def _reshaped(t: TensorRef, shape: tuple) -> TensorRef:
    """`t` with `shape` (the same elements): itself, or its bytes under the new shape."""
    if tuple(t.shape) == tuple(shape):
        return t

    def make():
        from ...io.tensors import as_torch, to_bytes

        return to_bytes(as_torch(t).contiguous())

    return computed_tensor(shape, t.dtype, make)
