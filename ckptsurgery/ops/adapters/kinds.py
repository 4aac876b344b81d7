"""The adapter kinds, declared once: the layouts a module's factors can have (`Layout`), the
adapter formats (`Format`), and what a format brings (`AdapterFormat`: how it is recognised,
its reader, how its module names resolve against a base's keys). The table of formats is
`read.FORMATS`; this module holds the types every other module of the package shares.

A new adapter kind (DoRA, LoHa, LoKr, IA3, LyCORIS, diffusers) is one module holding its reader
and resolver, a `Format` member, and one entry in `read.FORMATS`; a new way of making ΔW from
factors is a `Layout` member and its case in `fold.delta` and `fold._check_shapes`."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Protocol

from ...io import Checkpoint, TensorRef
from ...kinds import Kind


class Layout(Kind):
    """How a module's factors A, B make ΔW (see fold.delta); the value is the report's `kind`."""

    LINEAR = "linear"  # ΔW = B·A                         A [r, in], B [out, r]
    LINEAR_T = "linear-t"  # ΔW = (B·A)ᵀ: the weight is stored [in, out] (peft's fan_in_fan_out, GPT-2's Conv1D)
    CONV = "conv"  # ΔW = (B.flatten(1)·A.flatten(1)).view(W.shape)   A [r, in, k…], B [out, r, 1…]
    EMBEDDING = "embedding"  # ΔW = (B·A)ᵀ                 lora_embedding_A [r, vocab], _B [dim, r]


TRANSPOSED = (Layout.EMBEDDING, Layout.LINEAR_T)  # ΔW = (B·A)ᵀ
FLAT = (Layout.LINEAR, Layout.LINEAR_T)  # 2-D factors whose orientation the base's shape may tell


class Format(Kind):
    """An adapter format; the value is the report's `format`. Each has one entry in read.FORMATS."""

    PEFT = "peft"  # a peft adapter folder: adapter_config.json + adapter_model.safetensors (or .bin)
    KOHYA = "kohya"  # one .safetensors file of lora_unet_…/lora_te…_ keys with lora_down/lora_up/alpha


@dataclass
class Module:
    """One adapted weight of an adapter: its low-rank factors, scale and layout."""

    name: str  # as the adapter names it: a module name (peft) or the underscore name (kohya)
    a: TensorRef
    b: TensorRef
    scale: float  # α/r (α/√r): the user's --lora-scale is applied on top
    layout: Layout
    bias: TensorRef | None = None  # peft lora_bias: B's bias, added (× scale) to the base bias


@dataclass
class Adapter:
    """An adapter read by its format's reader, open until `close` (its tensors are read lazily)."""

    path: str
    format: Format
    modules: list[Module]
    replaced: dict[str, TensorRef] = field(default_factory=dict)  # peft modules_to_save, trained biases
    config: dict = field(default_factory=dict)
    checkpoints: list[Checkpoint] = field(default_factory=list)

    def close(self) -> None:
        for ckpt in self.checkpoints:
            ckpt.close()


class Resolver(Protocol):
    """An adapter's names onto a base's keys (made from the base's keys, one per adapter)."""

    def module_key(self, name: str) -> str | None:
        """The base key a module's ΔW folds into (None: the base has none)."""

    def __call__(self, name: str) -> str | None:
        """The base key a whole tensor of the adapter (`Adapter.replaced`) replaces."""

    def check(self, where: str) -> dict | None:
        """Once every name is resolved: refuse what does not hold together; the prefix read
        past (`{"added"|"removed": prefix, "keys": n}`, the report's `prefix`) or None."""


@dataclass(frozen=True)
class AdapterFormat:
    """One adapter format: its entry in read.FORMATS.

    Args:
        name: the Format member (the report's `format`).
        recognises: whether a path given to `--lora` is of this format, from the path alone;
            the table is tried in order and its last entry takes whatever is left.
        read: path -> Adapter, its checkpoints open until Adapter.close (a reader that raises
            closes what it opened).
        resolver: the base's keys -> a Resolver for one adapter.
    """

    name: Format
    recognises: Callable[[str], bool]
    read: Callable[[str], Adapter]
    resolver: Callable[[list[str]], Resolver]


MAX_PREFIX_DEPTH = 64  # tails of a name below this many levels only: real module names have ~15


def suffixes(name: str) -> list[str]:
    """`a.b.c` -> [`b.c`, `c`]: the dotted tails of a name, those at most MAX_PREFIX_DEPTH dots
    deep (so that a hostile name of 40 000 dots is not 40 000 copies of itself)."""
    if name.count(".") > MAX_PREFIX_DEPTH:
        return []
    return [name[i + 1:] for i, c in enumerate(name) if c == "."]
