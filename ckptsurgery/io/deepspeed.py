"""Reader for DeepSpeed ZeRO checkpoint folders: the fp32 weights that DeepSpeed's own
`zero_to_fp32.py` reconstructs, put together tensor by tensor from the ranks' flat partitions,
without DeepSpeed and without the whole model in memory.

A folder holds `latest` (the tag, e.g. `global_step1`) and the tag's folder, or is the tag's
folder itself: `mp_rank_00_model_states.pt` (stage 1 and 2) or
`zero_pp_rank_<r>_mp_rank_00_model_states.pt` (stage 3, one per rank), and
`[bf16_]zero_pp_rank_<r>_mp_rank_00_optim_states.pt`, one per data-parallel rank. All are
torch.save archives, read with the restricted unpickler (DeepSpeed's ZeroStageEnum,
LossScaler and fragment_address stay placeholders). The model states give the names and shapes
of the trainable parameters per group (`param_shapes`, in flat order), the buffers
(`buffer_names`, values in `module`), the frozen parameters and the tied names
(`shared_params`); the optimizer states give each rank's fp32 partition of every group.

- Stage 1 and 2: a group's flat fp32 vector is its ranks' partitions (`single_partition_of_fp32_groups`,
  padding already cut) one after another; the parameters lie in it in `param_shapes` order, each
  followed by its `param_alignment_paddings` entry. A parameter within one partition is a view
  of it; one that spans two is put together when written.
- Stage 3: every parameter is split on its own, ceil(numel / ranks) elements per rank, the last
  rank(s) padded; each rank's `fp32_flat_groups` hold its shares one after another (a share may
  straddle two sub-groups). A parameter is its ranks' shares joined, cut to its size.

Dtypes are those zero_to_fp32 writes (`convert_zero_checkpoint_to_fp32_state_dict`, which the
`zero_to_fp32.py` script beside every checkpoint runs; DeepSpeed 0.19.8): every floating tensor
float32 — the trained parameters, the buffers and the frozen parameters, which a bf16 or fp16 run
stores in its own dtype — and every other tensor in its own. Its `dtype=` (float16, bfloat16) is
`--dtype` on the output: every floating tensor cast from the float32 read here, the same values as
DeepSpeed's cast from the stored ones. (`get_fp32_state_dict_from_zero_checkpoint`, the function
that returns a state dict in memory, leaves frozen parameters in the model's dtype; the values are
the same.)
"""

from __future__ import annotations

import bisect
import os
import re
from typing import Any

from ..dtypes import BY_NAME, FLOAT, FLOAT8
from ..errors import CkptError
from .formats import Format
from .model import (
    Checkpoint, MappedFile, Storage, TensorRef, check_key, chunked_tensor, computed_tensor, contiguous_strides,
    joined_tensor, numel_of, standalone,
)
from .pickled import How, InertObject, TorchSize
from .torch_zip import load_torch_zip
from .unpickler import brief

_MODEL_STATES = re.compile(r"(?:zero_pp_rank_(\d+)_)?mp_rank_(\d+)_model_states\.pt")
_OPTIM_STATES = re.compile(r"(?:bf16_)?zero_pp_rank_(\d+)_mp_rank_(\d+)_optim_states\.pt")
_ZERO_STAGE = "deepspeed.runtime.zero.config.ZeroStageEnum"


def step_folder(folder: str) -> str | None:
    """Where the states of the checkpoint lie: FOLDER/<tag> when FOLDER holds `latest`, FOLDER
    itself when it holds them, else None (not a DeepSpeed folder)."""
    latest = os.path.join(folder, "latest")
    if os.path.isfile(latest):
        with open(latest, "rb") as f:
            tag = f.read(257).decode("utf-8", "replace").strip()
        if not tag or len(tag) > 256 or "/" in tag or tag in (".", "..") or "\0" in tag:
            raise CkptError(f"{latest}: names the tag {tag[:40]!r}, which is not a folder name")
        folder = os.path.join(folder, tag)
        if not os.path.isdir(folder):
            raise CkptError(f"{latest}: names {tag!r}, which is not a folder beside it")
        return folder
    return folder if _holds_states(os.listdir(folder)) else None


def _holds_states(names: list[str]) -> bool:
    return any(_MODEL_STATES.fullmatch(n) for n in names) and any(_OPTIM_STATES.fullmatch(n) for n in names)


def is_deepspeed(folder: str) -> bool:
    return os.path.isfile(os.path.join(folder, "latest")) or _holds_states(os.listdir(folder))


class _Files:
    def __init__(self, folder: str):
        self.folder = folder
        self.sources: list[MappedFile] = []
        self.events: list = []  # the placeholders the state files name: inspect lists them

    def load(self, name: str) -> Any:
        path = os.path.join(self.folder, name)
        if not os.path.isfile(path):
            raise CkptError(f"{path}: missing, or not a regular file")
        source = MappedFile(path)
        self.sources.append(source)
        obj, events = load_torch_zip(source, 0, source.size, path)
        self.events += events
        if type(obj) is not dict:
            raise CkptError(f"{path}: holds {type(obj).__name__}, not DeepSpeed's dict of states")
        return obj


def _ranked(names: list[str], pattern: re.Pattern, what: str, where: str) -> list[str]:
    """The files of ranks 0..n-1, in rank order; only the first model-parallel rank."""
    found = {}
    for name in names:
        match = pattern.fullmatch(name)
        if match:
            rank, mp_rank = match.group(1), int(match.group(2))
            if mp_rank:
                raise CkptError(f"{where}: a tensor- or pipeline-parallel checkpoint ({name}); "
                                f"ckptsurgery reads data-parallel ZeRO checkpoints only")
            found.setdefault(int(rank or 0), []).append(name)
    if not found or sorted(found) != list(range(len(found))) or any(len(v) > 1 for v in found.values()):
        raise CkptError(f"{where}: its {what} files are not one per rank 0..N-1 ({', '.join(sorted(names))[:200]})")
    return [found[r][0] for r in range(len(found))]


def read_deepspeed(folder: str) -> Checkpoint:
    where = step_folder(folder)
    if where is None:
        raise CkptError(f"{folder}: not a DeepSpeed checkpoint folder (no `latest`, no model and optim states)")
    names = os.listdir(where)
    files = _Files(where)
    optim = [files.load(n) for n in _ranked(names, _OPTIM_STATES, "optimizer state", where)]
    states = [_optimizer_states(o, where) for o in optim]
    stage = _stage(states[0], where)
    world = len(states)
    count = states[0].get("partition_count")
    counts = count if type(count) is list else [count]
    if not all(type(c) is int for c in counts) or max(counts, default=0) != world:
        raise CkptError(f"{where}: {world} optimizer state files for a partition count of {brief(count)}")
    model_names = _ranked(names, _MODEL_STATES, "model state", where)
    if (stage == 3) != (len(model_names) == world and _MODEL_STATES.fullmatch(model_names[0]).group(1) is not None):
        raise CkptError(f"{where}: model state files {', '.join(model_names)[:200]} do not fit ZeRO stage {stage}")
    models = [files.load(n) for n in (model_names if stage == 3 else model_names[:1])]
    first = models[0]
    module = _dict(first.get("module"), "module", where)
    param_shapes = first.get("param_shapes")
    if type(param_shapes) is not list or not all(isinstance(g, dict) for g in param_shapes):
        raise CkptError(f"{where}: param_shapes is not a list of name -> shape tables")
    param_shapes = [_shapes(g, where) for g in param_shapes]

    for name in module:
        check_key(name, f"{where}: ")
    buffer_names = first.get("buffer_names") or []
    shared = first.get("shared_params") or {}
    if type(buffer_names) is not list or not all(type(n) is str for n in buffer_names):
        raise CkptError(f"{where}: buffer_names is not a list of names")
    if type(shared) is not dict or not all(type(k) is str and type(v) is str for k, v in shared.items()):
        raise CkptError(f"{where}: shared_params is not a table of tied names")
    tensors: dict[str, TensorRef] = {}
    for name in buffer_names:
        buffer = module.get(name)
        if not isinstance(buffer, TensorRef):
            raise CkptError(f"{where}: buffer {name!r} is not in the module's states")
        tensors[name] = _as_fp32(buffer)
    trainable = {n for group in param_shapes for n in group}
    tensors.update(_frozen(stage, models, module, trainable, set(tensors), shared, where))
    if stage == 3:
        tensors.update(_stage3(param_shapes, [s.get("fp32_flat_groups") for s in states], world, where))
    else:
        tensors.update(_stage12(param_shapes, [s.get("single_partition_of_fp32_groups") for s in states],
                                states[0].get("param_alignment_paddings"), [s.get("group_paddings") for s in states],
                                where))
    for alias, source in shared.items():
        if alias in tensors:
            raise CkptError(f"{where}: shared_params ties {alias!r}, which is stored itself")
        if source in tensors:  # a tied name: the same tensor, stored once
            tensors[alias] = tensors[source]
    return Checkpoint(folder, Format.DEEPSPEED, tensors, None, None, sources=files.sources, events=files.events)


def _dict(value: Any, what: str, where: str) -> dict:
    if not isinstance(value, dict):
        raise CkptError(f"{where}: {what} is not a table")
    return value


def _optimizer_states(obj: dict, where: str) -> dict:
    return _dict(obj.get("optimizer_state_dict"), "optimizer_state_dict", where)


def _stage(state: dict, where: str) -> int:
    stage = state.get("zero_stage")
    if type(stage) is InertObject and stage.qualname() == _ZERO_STAGE and stage.how is How.REDUCE:
        stage = stage.args[0] if len(stage.args) == 1 else None
    if stage not in (1, 2, 3) or type(stage) is not int:
        raise CkptError(f"{where}: ZeRO stage {brief(stage)}; ckptsurgery reads stages 1, 2 and 3")
    return stage


def _shapes(group: dict, where: str) -> dict[str, tuple[int, ...]]:
    out = {}
    for name, shape in group.items():
        check_key(name, f"{where}: ")
        if type(shape) not in (tuple, list, TorchSize) or not all(type(s) is int and 0 <= s < 2**62 for s in shape):
            raise CkptError(f"{where}: {name!r} has the shape {brief(shape)}")
        out[name] = tuple(shape)
    return out


def _flat(value: Any, what: str, where: str) -> TensorRef:
    if not isinstance(value, TensorRef) or value.dtype.name != "float32" or len(value.shape) != 1 \
            or not value.is_contiguous or value.math_bits:
        raise CkptError(f"{where}: {what} is not a flat float32 tensor")
    return value


_CAST_CHUNK = 4 * 1024 * 1024  # elements cast at a time: 16 MB of float32 in memory per chunk


def _as_fp32(t: TensorRef) -> TensorRef:
    """The tensor as zero_to_fp32 writes it (buffers and frozen parameters): float32 when torch
    counts it as floating — float64/16, bfloat16 and the float8s — else as it is. The cast is
    made chunk by chunk as the output is written (a frozen bf16 embedding is never whole in
    memory as float32); packed float4, which torch cannot cast, is kept."""
    if t.dtype.kind not in (FLOAT, FLOAT8) or t.dtype.packed > 1 or t.dtype.name == "float32":
        return standalone(t)
    from .tensors import cast_bytes

    fp32 = BY_NAME["float32"]
    if t.quant is not None or t.math_bits or not t.is_contiguous:  # not from DeepSpeed: whole
        return computed_tensor(t.shape, fp32, lambda: cast_bytes(t.data(), t.dtype, fp32))
    source, start, itemsize = t.storage.source, t.storage.offset + t.offset * t.dtype.itemsize, t.dtype.itemsize
    counts = [min(_CAST_CHUNK, t.numel - i) for i in range(0, t.numel, _CAST_CHUNK)]

    def chunk(j: int) -> bytearray:
        return cast_bytes(source.view(start + j * _CAST_CHUNK * itemsize, counts[j] * itemsize), t.dtype, fp32)

    return chunked_tensor(t.shape, fp32, [n * fp32.itemsize for n in counts], chunk)


def _joined(pieces: list[tuple[TensorRef, int, int]], shape: tuple[int, ...]) -> TensorRef:
    """A tensor of `shape` made of element ranges [start, stop) of flat tensors, read in place:
    a storage of just its bytes when one range holds them, else the ranges joined as written."""
    dtype = pieces[0][0].dtype
    ranges = [(flat.storage.source, flat.storage.offset + (flat.offset + start) * dtype.itemsize,
               (stop - start) * dtype.itemsize) for flat, start, stop in pieces]
    if len(ranges) == 1:
        source, offset, nbytes = ranges[0]
        storage = Storage(source, offset, nbytes, pieces[0][0].storage.key, pieces[0][0].storage.location)
        return TensorRef(storage, 0, shape, contiguous_strides(shape), dtype)
    return joined_tensor(shape, dtype, ranges)


class _Laid:
    """Flat tensors laid one after another: element ranges of the whole, found by bisection."""

    def __init__(self, flats: list[TensorRef]):
        self.flats, self.starts, total = flats, [], 0
        for flat in flats:
            self.starts.append(total)
            total += flat.shape[0]
        self.total = total

    def slices(self, start: int, stop: int) -> list[tuple[TensorRef, int, int]]:
        pieces = []
        i = max(bisect.bisect_right(self.starts, start) - 1, 0)
        while i < len(self.flats) and self.starts[i] < stop:
            base, size = self.starts[i], self.flats[i].shape[0]
            lo, hi = max(start, base), min(stop, base + size)
            if lo < hi:
                pieces.append((self.flats[i], lo - base, hi - base))
            i += 1
        return pieces


def _group_list(value: Any, groups: int, i: int) -> list:
    """Entry i of a per-group list, or [] where the checkpoint has none."""
    return value[i] if type(value) is list and len(value) == groups and type(value[i]) is list else []


def _stage12(param_shapes, partitions, paddings, group_paddings, where: str) -> dict[str, TensorRef]:
    tensors = {}
    for i, group in enumerate(param_shapes):
        flats = []
        for rank, groups in enumerate(partitions):
            if type(groups) is not list or len(groups) != len(param_shapes):
                raise CkptError(f"{where}: rank {rank} has {brief(groups)} fp32 partitions for "
                                f"{len(param_shapes)} parameter groups")
            flats.append(_flat(groups[i], f"rank {rank}'s fp32 partition {i}", where))
        laid = _Laid(flats)
        pads = _group_list(paddings, len(param_shapes), i)
        if not all(type(p) is int and 0 <= p < 2**31 for p in pads):
            raise CkptError(f"{where}: param_alignment_paddings of group {i} are not small non-negative counts")
        offset = 0
        for j, (name, shape) in enumerate(group.items()):
            numel = numel_of(shape)
            if offset + numel > laid.total:
                raise CkptError(f"{where}: {name} runs past the {laid.total} fp32 elements of group {i}")
            tensors[name] = _joined(laid.slices(offset, offset + numel), shape) if numel else \
                computed_tensor(shape, flats[0].dtype, bytes)
            offset += numel + (pads[j] if j < len(pads) else 0)
        # the partitions hold the parameters and nothing else (DeepSpeed cuts the group's end
        # padding before saving; older versions left it and said how much in group_paddings)
        cut = sum(p[i] for p in group_paddings if type(p) is list and i < len(p) and type(p[i]) is int)
        if offset not in (laid.total, laid.total - cut):
            raise CkptError(f"{where}: the parameters of group {i} take {offset} fp32 elements, "
                            f"its partitions hold {laid.total}")
    return tensors


def _stage3(param_shapes, flat_groups, world: int, where: str) -> dict[str, TensorRef]:
    ranks = []
    for rank, groups in enumerate(flat_groups):
        if type(groups) is not list or not groups:
            raise CkptError(f"{where}: rank {rank} has no fp32_flat_groups")
        ranks.append(_Laid([_flat(g, f"rank {rank}'s fp32 flat group", where) for g in groups]))
    held = min(laid.total for laid in ranks)
    tensors, offset = {}, 0
    for group in param_shapes:
        for name, shape in group.items():
            numel = numel_of(shape)
            share = -(-numel // world)  # ceil: the last rank(s) padded
            if offset + share > held:
                raise CkptError(f"{where}: {name} runs past the fp32 elements a rank holds")
            pieces = [p for laid in ranks for p in laid.slices(offset, offset + share)]
            cut, kept = [], 0  # the joined shares, cut to the parameter's size
            for flat, start, stop in pieces:
                take = min(stop - start, numel - kept)
                if take > 0:
                    cut.append((flat, start, start + take))
                    kept += take
            tensors[name] = _joined(cut, shape) if numel else computed_tensor(shape, ranks[0].flats[0].dtype, bytes)
            offset += share
    if any(laid.total != offset for laid in ranks):
        raise CkptError(f"{where}: the parameters take {offset} fp32 elements per rank, the ranks hold "
                        f"{', '.join(str(laid.total) for laid in ranks)}")
    return tensors


def _frozen(stage: int, models: list[dict], module: dict, trainable: set, buffers: set, shared: dict,
            where: str) -> dict[str, TensorRef]:
    """Frozen parameters, float32 as zero_to_fp32 writes them (from the model's dtype, which a
    bf16 or fp16 run stores): whole in rank 0's `frozen_param_fragments` (stage 2), split across
    the ranks' fragments like stage 3's (stage 3), and at stage 1 — where zero_to_fp32 drops
    them — whole in `module`, the names that are neither trained, buffers nor tied."""
    first = models[0]
    shapes = first.get("frozen_param_shapes")
    if stage == 1 or shapes is None:
        names = [n for n in module if n not in trainable and n not in buffers and n not in shared]
        return {n: _as_fp32(module[n]) for n in names if isinstance(module[n], TensorRef)}
    shapes = _shapes(_dict(shapes, "frozen_param_shapes", where), where)
    out = {}
    for name, shape in shapes.items():
        fragments = [_dict(m.get("frozen_param_fragments"), "frozen_param_fragments", where).get(name) for m in models]
        if not all(isinstance(f, TensorRef) and f.is_contiguous and not f.math_bits and f.quant is None
                   for f in fragments):
            raise CkptError(f"{where}: frozen parameter {name!r} has no plain fragment on every rank")
        if stage == 2:
            if fragments[0].shape != shape:
                raise CkptError(f"{where}: frozen parameter {name!r} is stored as {list(fragments[0].shape)}")
            out[name] = _as_fp32(fragments[0])
            continue
        numel = numel_of(shape)
        share = -(-numel // len(models))
        flats = [TensorRef(f.storage, f.offset, (f.numel,), (1,), f.dtype) for f in fragments]
        if len({f.dtype.name for f in flats}) != 1 or any(f.numel != share for f in flats):
            raise CkptError(f"{where}: frozen parameter {name!r}: fragments that are not {share} elements "
                            f"on each rank")
        out[name] = _as_fp32(_joined(_Laid(flats).slices(0, numel), shape) if numel else fragments[0])
    return out
