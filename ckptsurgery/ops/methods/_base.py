"""The base of every merge method: what a method declares, and the chunk by chunk merge of one key
that its math plugs into.

A key is merged CHUNK elements at a time (widened to float32, or float64 when an input is
float64): any chunk of the result can be computed on its own, so a writer streams the output and
memory holds a few chunks. What a chunk needs from the whole tensor (TIES' cut, DARE's norms,
SLERP's angle) is measured once, by `measure`, before the first chunk.

numpy, not torch: the math is elementwise, and torch's import alone takes longer than merging a
1 GB model. Nothing here knows about files or names — apart from the key, which seeds DARE's
draws, so that a mask does not depend on the order keys are computed in, nor on how many threads
or ranks compute them."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any, ClassVar

from ._parameters import Parameter

Read = Callable[[int, int], Any]  # (first element, count) -> a wide array of one input's values

CHUNK = 1 << 18  # elements of one chunk: 1 MiB of float32 per input, so that a chunk's arrays stay
# in the CPU's cache (2²⁰ took ~30 % longer for task arithmetic on 3 × 1 GB). The package's
# `methods.CHUNK` is what merges are made with (by_method passes it): a test may set a small one.


def tensor_seed(seed: int, key: str, model: int, chunk: int) -> int:
    """The draws of one model's delta for one chunk of one key: SHA-256 of
    "{seed}\\0{model}\\0{key}\\0{chunk}", its first 8 bytes little-endian, top bit cleared."""
    import hashlib  # here: every merge imports this module, the random methods alone draw

    digest = hashlib.sha256(f"{seed}\0{model}\0{key}\0{chunk}".encode("utf-8", "surrogatepass")).digest()
    return int.from_bytes(digest[:8], "little") & (2**63 - 1)


DRAW_BLOCK = 1 << 18  # the draws of a key come in blocks of this many elements, whatever the chunk size


def uniform_draws(seed: int, key: str, model: int, start: int, count: int):
    """The uniform draws (uint32s) of one model for elements [start, start + count) of a key:
    element e's is in block b = e // DRAW_BLOCK, drawn by a PCG64 seeded with
    `tensor_seed(seed, key, model, b)` — its raw 64-bit outputs read as little-endian uint32s,
    the (e mod DRAW_BLOCK)-th of them. So a draw depends on the element, not on how the tensor
    is cut into chunks to be computed."""
    import numpy as np

    parts = []
    done = 0
    while done < count:
        block, offset = divmod(start + done, DRAW_BLOCK)
        n = min(count - done, DRAW_BLOCK - offset)
        generator = np.random.PCG64(tensor_seed(seed, key, model, block))
        if offset // 2:
            generator.advance(offset // 2)
        first = offset % 2
        raw = generator.random_raw((first + n + 1) // 2).astype("<u8", copy=False).view("<u4")
        parts.append(raw[first:first + n])
        done += n
    return parts[0] if len(parts) == 1 else np.concatenate(parts) if parts else np.empty(0, "<u4")


def below(probability: float):
    """The uint32 a draw must be below to be kept with this probability: ⌊p·2³²⌋."""
    import numpy as np

    return np.uint32(min(int(probability * 2**32), 2**32 - 1)) if probability < 1 else None


class MergeMethod:
    """A merge method. A subclass in a module of this package declares one (the class attributes
    below; a class without a `name` is a base for others) and gives its math: `measure` (over
    the whole tensor, once) and `merge_chunk(j, values, out)`: chunk j of the result from the
    inputs' values there (`values`, as `reads` orders them), into `out` when given, the inputs
    left as read. The registry finds it there, and refuses a method without a merge_chunk.

    An instance merges one key: `params` are that key's values (`Parameters.for_tensor`);
    `reads` are [base, model...] when the method needs a base, else [model...], `numel`
    elements each; `chunk(j)` is elements [j·chunk_size, (j+1)·chunk_size) of the result (any
    `chunk_size` gives the same result: random draws come in fixed blocks, `uniform_draws`)."""

    name: ClassVar[str] = ""  # --method NAME
    summary: ClassVar[str] = ""  # what it computes, one line, for the docs' table
    needs_base: ClassVar[bool] = False
    base_optional: ClassVar[bool] = False  # --base may be given or not (nuslerp, multislerp): `has_base` says which
    without_base: ClassVar[str | None] = None  # when --base is refused: what the method goes from instead
    min_models: ClassVar[int] = 1
    max_models: ClassVar[int | None] = None
    parameters: ClassVar[tuple[Parameter, ...]] = ()  # in the order they are checked and reported
    listing_order: ClassVar[int] = 1000  # where --help, messages and the docs list it (then by name)
    differs: ClassVar[str] = ""  # where it differs from mergekit 0.1.5 and why, for the docs' table

    @classmethod
    def check(cls, values: dict[str, Any]) -> None:
        """Checks across the resolved values (each was checked alone): raises a UsageError."""

    def __init__(self, params: Mapping[str, Any], key: str, reads: list[Read], numel: int, wide: str,
                 chunk_size: int = CHUNK, shape: tuple[int, ...] | None = None, has_base: bool | None = None):
        defaults = {p.name: p.default for p in self.parameters if not p.required}  # what `params` leaves out
        self.params = {**defaults, **params}
        self.key, self.reads, self.numel, self.wide = key, reads, numel, wide
        self.chunk_size = chunk_size
        self.shape = tuple(shape) if shape is not None else (numel,)  # the tensor's, for methods that need rows
        self.has_base = self.needs_base if has_base is None else has_base  # reads[0] is the base
        self._prepared = False
        self._buffers: dict = {}

    @property
    def models(self) -> int:
        """How many models are merged (the base not counted)."""
        return len(self.reads) - (1 if self.has_base else 0)

    def each(self, name: str, default: Any = None) -> list:
        """A per-model parameter's values, one per model, whether one value or a list was given."""
        value = self.params.get(name, default)
        return list(value) if isinstance(value, (list, tuple)) else [value] * self.models

    @property
    def note(self) -> str | None:
        """What the report notes about this key once merged (e.g. slerp's fallback); None: nothing."""
        return None

    @property
    def chunks(self) -> int:
        return -(-self.numel // self.chunk_size)

    def span(self, j: int) -> tuple[int, int]:
        start = j * self.chunk_size
        return start, min(self.chunk_size, self.numel - start)

    def measure(self) -> None:
        """What every chunk needs from the whole tensor, measured once (nothing, by default)."""

    def prepare(self) -> None:
        import numpy as np

        if self._prepared:
            return
        with np.errstate(all="ignore"):  # inf and nan in, inf and nan out, as torch would: no warning
            self.measure()
        self._prepared = True

    def chunk(self, j: int, out=None):
        """Elements [j·chunk_size, (j+1)·chunk_size) of the result, in the wide dtype — into `out`
        (an array of the chunk's length) when given, so that a writer can reuse one buffer."""
        import numpy as np

        self.prepare()
        start, count = self.span(j)
        with np.errstate(all="ignore"):
            result = self.merge_chunk(j, [read(start, count) for read in self.reads], out)
        if j == self.chunks - 1:
            self._buffers.clear()  # the tensor is done: its scratch is not kept for the next
        return result

    def scratch(self, k: int, count: int):
        """Scratch array k for a chunk of `count` elements, the same memory from chunk to chunk
        (a fresh array per step costs more in page faults than the arithmetic)."""
        import numpy as np

        if k not in self._buffers:
            self._buffers[k] = np.empty(min(self.chunk_size, self.numel), self.wide)
        return self._buffers[k][:count]

    def buffer(self, name, count: int, dtype):
        """Like `scratch`, an array of another dtype (bool masks, float64 products), by name."""
        import numpy as np

        if name not in self._buffers:
            self._buffers[name] = np.empty(min(self.chunk_size, self.numel), dtype)
        return self._buffers[name][:count]


class DeltaMethod(MergeMethod):
    """A method whose math takes the models' deltas from the base, δᵢ = θᵢ − base, as new arrays
    (`deltas`; reads[0] is the base): model-stock, sce. Those that subtract into scratch arrays
    of their own (ram, the task arithmetic family) declare `needs_base` themselves."""

    needs_base = True

    @staticmethod
    def deltas(values: list) -> list:
        """δᵢ of one chunk's values, [base, θ₁, …]: new arrays, the values left as read."""
        import numpy as np

        return [np.subtract(theta, values[0]) for theta in values[1:]]


class BaseOptional(MergeMethod):
    """A method of points vᵢ that are the models θᵢ or, with --base, their deltas θᵢ − base,
    the base added back to the result (nuslerp, multislerp)."""

    base_optional = True

    def points(self, values: list) -> list:
        """vᵢ of one chunk's values ([base, θ₁, …] with a base, else [θ₁, …]), the values left as read."""
        if not self.has_base:
            return list(values)
        return DeltaMethod.deltas(values)

    def add_base(self, result, values: list):
        """`result` (a combination of the vᵢ), with the base added back when there is one."""
        if self.has_base:
            result += values[0]
        return result
