"""Finding the state dict inside whatever a .pth file holds: a plain state dict, a training
checkpoint that nests one under a key, or a whole pickled nn.Module (inert placeholders)."""

from __future__ import annotations

from collections import OrderedDict
from typing import Any

from ..errors import CkptError
from .model import TensorRef
from .unpickler import InertObject

# Keys under which training scripts nest the model's state dict, most specific first.
ROOT_KEYS = (
    "state_dict",  # Lightning, many research repos
    "model_state_dict",  # the PyTorch tutorial's recipe
    "model_state",
    "model",  # timm, DeiT, torchvision references
    "module",  # DeepSpeed
    "net",
    "network",
    "weights",
    "params",
    "state_dict_ema",  # timm's EMA copy: only when nothing above is there
    "model_ema",
    "ema",
)

_MAX_DEPTH = 200


def module_state(obj: Any) -> dict | None:
    """The attribute dict of a pickled nn.Module placeholder, or None if obj is not one."""
    if isinstance(obj, InertObject) and isinstance(obj.state, dict) and "_parameters" in obj.state:
        return obj.state
    return None


def module_state_dict(module: InertObject) -> OrderedDict[str, TensorRef]:
    """Walk a pickled module the way `model.state_dict()` would: each module's parameters, then
    its persistent buffers, then its children, depth first."""
    out: OrderedDict[str, TensorRef] = OrderedDict()
    seen: set[int] = set()

    def walk(mod: Any, prefix: str, depth: int) -> None:
        state = module_state(mod)
        if state is None or id(mod) in seen or depth > _MAX_DEPTH:
            return
        seen.add(id(mod))
        skip = state.get("_non_persistent_buffers_set") or set()
        for table, drop in (("_parameters", set()), ("_buffers", skip)):
            entries = state.get(table) or {}
            if not isinstance(entries, dict):
                continue
            for name, value in entries.items():
                if isinstance(value, TensorRef) and name not in drop:
                    out[prefix + str(name)] = value
        children = state.get("_modules") or {}
        if isinstance(children, dict):
            for name, child in children.items():
                walk(child, f"{prefix}{name}.", depth + 1)

    walk(module, "", 0)
    return out


def is_state_dict(obj: Any) -> bool:
    return isinstance(obj, dict) and bool(obj) and all(isinstance(v, TensorRef) for v in obj.values())


def as_state_dict(obj: Any) -> OrderedDict[str, TensorRef] | None:
    if is_state_dict(obj):
        return OrderedDict((str(k), v) for k, v in obj.items())
    if module_state(obj) is not None:
        return module_state_dict(obj)
    return None


def find_root(obj: Any, root: str | None, where: str) -> tuple[str, OrderedDict[str, TensorRef]]:
    """(root key, state dict). `root` None means detect; '' means the top level."""
    if root is not None:
        if root == "":
            found = as_state_dict(obj)
        else:
            if not isinstance(obj, dict) or root not in obj:
                keys = ", ".join(map(repr, list(obj)[:10])) if isinstance(obj, dict) else "none"
                raise CkptError(f"{where}: no key {root!r} at the top level (keys: {keys})")
            found = as_state_dict(obj[root])
        if found is None:
            raise CkptError(f"{where}: --root {root!r} does not hold a state dict of tensors")
        return root, found

    top = as_state_dict(obj)
    if top is not None:
        return "", top
    if isinstance(obj, dict):
        for key in ROOT_KEYS:
            if key in obj and (found := as_state_dict(obj[key])) is not None:
                return key, found
        candidates = [k for k, v in obj.items() if isinstance(k, str) and as_state_dict(v) is not None]
        if len(candidates) == 1:
            return candidates[0], as_state_dict(obj[candidates[0]])
        if candidates:
            raise CkptError(f"{where}: several entries hold state dicts ({', '.join(candidates)}); "
                            f"choose one with --root")
    if isinstance(obj, dict) and not obj:
        return "", OrderedDict()
    unsupported = _unsupported_tensor_kinds(obj)
    if unsupported:
        raise CkptError(f"{where}: holds tensors of a kind ckptsurgery does not read "
                        f"({', '.join(unsupported)}: quantized, sparse or other special tensors)")
    raise CkptError(f"{where}: found no state dict of tensors; name its key with --root KEY")


def _unsupported_tensor_kinds(obj: Any) -> list[str]:
    """Torch's rebuild functions we leave inert (quantized, sparse, nested, meta tensors...),
    found among the values of the object and of its dict entries."""
    found = set()
    values = list(obj.values()) if isinstance(obj, dict) else []
    for value in list(values):
        if isinstance(value, dict):
            values.extend(value.values())
    for value in values:
        if isinstance(value, InertObject) and type(value)._module.startswith("torch."):
            found.add(type(value).qualname())
    return sorted(found)


def describe(value: Any) -> str:
    """A short type name for an entry outside the root, as `inspect` reports it."""
    if isinstance(value, InertObject):
        return value.qualname()
    if isinstance(value, TensorRef):
        return "tensor"
    return type(value).__name__


def extras(obj: Any, root: str) -> dict[str, str]:
    """Top-level entries outside the root."""
    if root == "" or not isinstance(obj, dict):
        return {}
    return {str(k): describe(v) for k, v in obj.items() if k != root}
