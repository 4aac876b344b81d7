"""Finding the state dict inside whatever a .pth file holds: a plain state dict, a training
checkpoint that nests one under a key, or a whole pickled nn.Module (inert placeholders); and
putting a value at its path in a nested state dict, as torch's DCP loader does (place_in_tree)."""

from __future__ import annotations

import sys
from collections import OrderedDict
from typing import Any

from ..errors import CkptError
from .model import TensorRef, check_key
from .pickled import Device, Global, InertGlobal, InertObject, PickledSet, TorchSize

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


def module_state(obj: Any) -> dict | None:
    """The attribute dict of a pickled nn.Module placeholder, or None if obj is not one."""
    if isinstance(obj, InertObject) and type(obj.state) is dict and "_parameters" in obj.state:
        return obj.state
    return None


MIN_MODULE_WORK = 100_000  # modules and names a walk may visit, at least; more for big models


MAX_MODULE_DEPTH = 1000  # real models nest a few dozen modules; names grow with the depth


def module_state_dict(module: InertObject, where: str = "") -> OrderedDict[str, TensorRef]:
    """Walk a pickled module the way `model.state_dict()` would: each module's parameters, then
    its persistent buffers, then its children, depth first. A submodule shared by two parents is
    listed under both names, as torch does; a module inside itself (a cycle) is not entered again."""
    out: OrderedDict[str, TensorRef] = OrderedDict()
    # an explicit stack (a hostile file may nest modules deeply), with an exit marker after each
    # module's children so that `on_path` holds exactly the modules being descended through
    stack: list = [(module, "", 0)]
    on_path: set[int] = set()
    # a module shared at every level repeats 2**depth times: the work may be a few times what
    # a walk without repeats would do (its distinct modules and entries), never more
    budget = max(MIN_MODULE_WORK, 8 * _distinct_work(module))
    visits = 0
    while stack:
        item = stack.pop()
        if type(item) is int:  # the exit marker of the module with this id
            on_path.discard(item)
            continue
        mod, prefix, depth = item
        state = module_state(mod)
        if state is None or id(mod) in on_path:
            continue
        visits += 1
        if visits > budget:
            raise CkptError(f"{where}the pickled module repeats shared submodules into more than {budget:,} "
                            f"modules and names; refused")
        if depth > MAX_MODULE_DEPTH:
            raise CkptError(f"{where}the pickled module nests submodules more than {MAX_MODULE_DEPTH} deep")
        on_path.add(id(mod))
        stack.append(id(mod))
        skip = state.get("_non_persistent_buffers_set")
        skip = {n for n in skip if type(n) is str} if isinstance(skip, (set, list, tuple)) else set()
        for table, drop in (("_parameters", set()), ("_buffers", skip)):
            entries = state.get(table)
            if type(entries) not in (dict, OrderedDict):
                continue
            visits += len(entries)  # names count as work too: a shared module's tensors repeat
            for name, value in entries.items():
                if isinstance(value, TensorRef) and type(name) is str and name not in drop:
                    check_key(prefix + name, where)
                    out[prefix + name] = value
        children = state.get("_modules")
        if type(children) in (dict, OrderedDict):
            stack.extend((child, f"{prefix}{name}.", depth + 1) for name, child in reversed(children.items())
                         if type(name) is str)
    return out


def _distinct_work(module: InertObject) -> int:
    """Modules and table entries reachable from `module`, each counted once."""
    seen, stack, work = set(), [module], 0
    while stack:
        state = module_state(mod := stack.pop())
        if state is None or id(mod) in seen:
            continue
        seen.add(id(mod))
        work += 1 + sum(len(state.get(t)) for t in ("_parameters", "_buffers")
                        if type(state.get(t)) in (dict, OrderedDict))
        children = state.get("_modules")
        if type(children) in (dict, OrderedDict):
            stack.extend(children.values())
    return work


# Where torch's own modules keep non-tensor values in a state dict: `get_extra_state()`
# (TransformerEngine, ...) and the packed weights of torch.ao quantized Linear/Conv layers
# (`fc._packed_params.dtype`, `fc._packed_params._packed_params`).
NON_TENSOR_PARTS = ("_extra_state", "_packed_params")


def _split_state_dict(obj: Any, explicit: bool, where: str, same: bool = False):
    """(tensors, others) if `obj` is a state dict, else None. A state dict maps string keys to
    tensors; besides tensors it may hold the values of NON_TENSOR_PARTS, or — under an explicit
    --root — any value, carried through .pth outputs as they were. `same`: a plain dict of
    tensors alone is its own `tensors` (no copy: a reader's tree it built, which nothing changes)."""
    if type(obj) not in (dict, OrderedDict):
        return None
    if same and type(obj) is dict and obj and all(isinstance(v, TensorRef) for v in obj.values()):
        for key in obj:
            check_key(key, where)
        return obj, OrderedDict()
    tensors: OrderedDict[str, TensorRef] = OrderedDict()
    others: OrderedDict[str, Any] = OrderedDict()
    for key, value in obj.items():
        if isinstance(value, TensorRef):
            tensors[key] = value
        elif explicit or (type(key) is str and any(part in NON_TENSOR_PARTS for part in key.split("."))):
            others[key] = value
        else:
            return None
    if not tensors:
        return None
    for key in obj:
        check_key(key, where)
    return tensors, others


def as_state_dict(obj: Any, explicit: bool = False, where: str = "", same: bool = False):
    """(tensors, others) of a state dict or a pickled module, else None (`same`: see _split_state_dict)."""
    found = _split_state_dict(obj, explicit, where, same)
    if found is not None:
        return found
    if module_state(obj) is not None:
        return module_state_dict(obj, where), OrderedDict()
    return None


def _maybe_state_dict(value: Any) -> bool:
    """A cheap test for the root search: a dict whose values are tensors, or a pickled module
    (not walked: modules may share children, and walking each would be quadratic)."""
    if module_state(value) is not None:
        return True
    return type(value) in (dict, OrderedDict) and any(isinstance(v, TensorRef) for v in value.values())


def find_root(obj: Any, root: str | None, where: str, same: bool = False):
    """(root key, state dict, non-tensor entries of the state dict). `root` None means detect;
    '' means the top level. `same`: a state dict that is a plain dict of tensors alone is
    returned as it is, not copied (a reader's own tree: io/dcp.py's, ~90 bytes a key)."""
    prefix = f"{where}: "
    if root is not None:
        if root == "":
            found = as_state_dict(obj, True, prefix, same)
        else:
            if type(obj) not in (dict, OrderedDict) or root not in obj:
                from .unpickler import brief

                keys = ", ".join(repr(brief(k)) for k in list(obj)[:10]) if isinstance(obj, dict) else "none"
                raise CkptError(f"{where}: no key {root!r} at the top level (keys: {keys})")
            found = as_state_dict(obj[root], True, prefix, same)
        if found is None:
            hint = ""
            flat = type(obj) in (dict, OrderedDict) and any(isinstance(v, TensorRef) for v in obj.values())
            if root == "" and type(obj) in (dict, OrderedDict) and not flat:
                hint = (": its top level holds no tensor of its own (leave out --root to find the state dict "
                        "inside it; `drop` removes the entries beside it by name)")
            raise CkptError(f"{where}: --root {root!r} does not hold a state dict of tensors{hint}")
        return (root, *found)

    top = as_state_dict(obj, False, prefix, same)
    if top is not None:
        return ("", *top)
    if type(obj) in (dict, OrderedDict):
        for key in ROOT_KEYS:
            if key in obj and (found := as_state_dict(obj[key], False, prefix, same)) is not None:
                return (key, *found)
        verdicts: dict[int, bool] = {}  # one value may sit under many keys: judge it once
        for value in obj.values():
            if id(value) not in verdicts:
                verdicts[id(value)] = _maybe_state_dict(value)
        candidates = [k for k, v in obj.items() if type(k) is str and verdicts[id(v)]]
        if len(candidates) == 1 and (found := as_state_dict(obj[candidates[0]], False, prefix, same)) is not None:
            return (candidates[0], *found)
        if len(candidates) > 1:
            raise CkptError(f"{where}: several entries hold state dicts ({', '.join(candidates[:10])}); "
                            f"choose one with --root")
        if not obj:
            return "", OrderedDict(), OrderedDict()
    unsupported = _unsupported_tensor_kinds(obj)
    if unsupported:
        raise CkptError(f"{where}: holds tensors of a kind ckptsurgery does not read "
                        f"({', '.join(unsupported)}: sparse, nested or other special tensors)")
    raise CkptError(f"{where}: found no state dict of tensors; name its key with --root KEY")


def _unsupported_tensor_kinds(obj: Any) -> list[str]:
    """Torch's rebuild functions we leave inert (sparse, nested, meta tensors...), found among
    the values of the object and of its dict entries."""
    found = set()
    values = list(obj.values()) if type(obj) in (dict, OrderedDict) else []
    for value in list(values):
        if type(value) in (dict, OrderedDict):
            values.extend(value.values())
    for value in values:
        if isinstance(value, InertObject) and value.module.startswith("torch."):
            found.add(value.qualname())
    return sorted(found)


def describe(value: Any) -> str:
    """A short type name for an entry outside the root, as `inspect` reports it: the name the
    user knows (torch.Size, a placeholder's class), never one of our own classes."""
    if isinstance(value, InertObject):
        return value.qualname()
    if isinstance(value, (Global, InertGlobal)):
        return f"{value!r}" if isinstance(value, Global) else value.qualname()
    if isinstance(value, TensorRef):
        return "tensor"
    unpickler = sys.modules.get(f"{__package__}.unpickler")  # a storage is only met in a pickle it read
    if unpickler is not None and isinstance(value, unpickler.StorageHandle):
        return f"torch.{value.dtype.storage if value.dtype else 'UntypedStorage'}"
    return {TorchSize: "torch.Size", Device: "torch.device", PickledSet: "set"}.get(type(value), type(value).__name__)


def extras(obj: Any, root: str) -> dict[str, str]:
    """Top-level entries outside the root."""
    if root == "" or type(obj) not in (dict, OrderedDict):
        return {}
    from .unpickler import brief  # here: a safetensors reader does without the unpickler (start-up)

    return {brief(k, 200): describe(v) for k, v in obj.items() if k != root}


def outside_names(obj: Any, root: str | None) -> list[str]:
    """The text keys of the top-level entries outside the root (what `drop` can remove), in order."""
    if not root or type(obj) not in (dict, OrderedDict):
        return []
    return [k for k in obj if type(k) is str and k != root]


def without_entries(obj: Any, names: set[str]) -> Any:
    """A copy of the top-level dict `obj` without the entries `names`: the same type, the same
    order, and its `_metadata` if it has one. The values are the same objects (nothing copied)."""
    out = type(obj)((k, v) for k, v in obj.items() if not (type(k) is str and k in names))
    if type(obj) is OrderedDict and "_metadata" in vars(obj):
        out._metadata = obj._metadata
    return out


def place_in_tree(tree: dict, path: tuple, value: Any, where: str, budget: list[int]) -> None:
    """Put `value` at `path` (checked by _planner_path) in the nested state dict, as torch's
    own unflattening does: a dict per string step, a list per integer step (an optimizer's
    param_groups). `budget`: the list slots left to create (a path may not make us allocate a
    million-slot list)."""
    node: Any = tree
    for step, nxt in zip(path, path[1:]):
        child = _child(node, step, where)
        if child is None:
            child = [] if type(nxt) is int else {}
            _set(node, step, child, where, budget)
        elif type(child) is not (list if type(nxt) is int else dict):
            raise CkptError(f"{where}: its planner path crosses a value")
        node = child
    if _child(node, path[-1], where) is not None:
        raise CkptError(f"{where}: two keys have one planner path")
    _set(node, path[-1], value, where, budget)


def _child(node: Any, step: Any, where: str) -> Any:
    if type(node) is dict:
        if type(step) is not str:
            raise CkptError(f"{where}: its planner path mixes list and dict steps")
        return node.get(step)
    if type(step) is not int or step < 0:
        raise CkptError(f"{where}: its planner path has a bad list index")
    return node[step] if step < len(node) else None


def _set(node: Any, step: Any, value: Any, where: str, budget: list[int]) -> None:
    if type(node) is dict:
        node[step] = value
        return
    grow = step + 1 - len(node)
    if grow > budget[0]:
        raise CkptError(f"{where}: its planner path has a list index far beyond the entries there are")
    budget[0] -= max(grow, 0)
    node.extend([None] * grow)
    node[step] = value
