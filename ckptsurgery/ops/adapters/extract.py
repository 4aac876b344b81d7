"""Extracting an adapter (`extract-lora`): a PEFT adapter folder whose fold into BASE
approximates TUNED. Per weight, the truncated SVD of ΔW = TUNED − BASE (ΔWᵀ for the layouts
kinds.TRANSPOSED): A = √S·Vh, B = U·√S with lora_alpha = r, so that folding it back gives the
best rank-r approximation of ΔW (Eckart–Young), with relative error √(Σ dropped s²) / √(Σ s²).
The output is the PEFT format (peft.py); a weight's kinds.Layout names its factors."""

from __future__ import annotations

import math
import os
from collections import Counter
from dataclasses import dataclass, field
from typing import Callable, Mapping

from ... import core
from ...errors import CkptError, UsageError
from ...io import Checkpoint, TensorRef, open_checkpoint
from ...io.model import computed_tensor
from ..options import WriteOptions, check_write_options
from ..reports import ExtractReport, Extracted
from ..spools import Spools, output_folder
from .kinds import TRANSPOSED, Layout
from .lowrank import REPEATED_LIMIT, check_rank, energy_rank
from .lowrank import interruptible as _interruptible
from .lowrank import stored as _stored
from .output import Written, check_folder, peft_config, write_peft
from .peft import PEFT_CONFIG, PEFT_WEIGHTS

# Module names (the last part) of embedding tables: a 2-D weight whose rows are looked up, not a
# matrix applied to inputs; peft adapts them with lora_embedding_A/B.
EMBEDDING_NAMES = frozenset({
    "embed_tokens", "wte", "wpe", "word_embeddings", "position_embeddings", "token_type_embeddings",
    "embeddings", "embedding", "shared", "embed_in", "tok_embeddings", "embed_positions", "embed", "emb",
    "tok_emb", "pos_emb", "word_emb", "token_embedding", "position_embedding", "relative_attention_bias",
})

# what an adapter folder is not: a .pth, shards, a DCP folder, a job's ranks, an input's metadata
NOT_FOR_ADAPTERS = ("format", "max_shard_size", "jobs", "no_metadata", "ranks")


def is_embedding(module: str) -> bool:
    return module.rsplit(".", 1)[-1] in EMBEDDING_NAMES


def parse_ranks(ranks: list[str] | list | int | None) -> tuple[int, list[tuple[str, int]]]:
    """`--rank 16 --rank 'attn*=32'` -> (16, [("attn*", 32)]): one default and any number of
    PATTERN=R; a weight takes the rank of the last pattern that selects its key."""
    if isinstance(ranks, int) and not isinstance(ranks, bool):
        ranks = [str(ranks)]
    default, patterns = None, []
    for text in ranks or []:
        text = str(text)
        pattern, sep, value = text.rpartition("=")
        try:
            rank = int(value)
        except ValueError:
            raise UsageError(f"--rank {text!r}: expected R or PATTERN=R with R a whole number") from None
        if rank < 1:
            raise UsageError(f"--rank {text!r}: a rank must be 1 or more")
        if sep:
            if not pattern:
                raise UsageError(f"--rank {text!r}: an empty pattern selects nothing")
            core.compile_pattern(pattern)
            patterns.append((pattern, rank))
        elif default is not None:
            raise UsageError(f"--rank given twice without a pattern ({default} and {rank}): give one default")
        else:
            default = rank
    if default is None:
        raise UsageError("--rank R is required (the default rank; PATTERN=R overrides it for some weights)")
    return default, patterns


@dataclass
class _Planned:
    """One module to extract (the report's Extracted without its error)."""

    name: str
    key: str
    kind: Layout
    shape: list[int]
    rank: int
    requested_rank: int
    clamped: bool


@dataclass
class _Settings:
    default: int  # the default rank
    matchers: list[tuple[Callable[[str], bool], int]]  # --rank PATTERN=R
    transposed: list[Callable[[str], bool]]  # --fan-in-fan-out
    embeddings: bool
    spools: Spools | None = None  # where a remote weight is kept from its comparison to its SVD


@dataclass
class _Survey:
    """BASE against TUNED: what to extract and what not."""

    plan: list[_Planned] = field(default_factory=list)
    not_extracted: list[dict] = field(default_factory=list)
    tied: dict[str, str] = field(default_factory=dict)  # name -> the key extracted for it
    unchanged: int = 0
    held: dict[str, tuple[TensorRef, TensorRef]] = field(default_factory=dict)  # key -> (BASE's, TUNED's), read


def extract_lora(base: str, tuned: str, write: WriteOptions, *, rank: list[str] | int | None = None,
                 energy: float | None = None, embeddings: bool = False, fan_in_fan_out: list[str] | None = None,
                 root: str | None = None) -> ExtractReport:
    """A PEFT adapter folder at `write.output` (adapter_config.json + adapter_model.safetensors)
    whose fold into BASE approximates TUNED: a truncated SVD of TUNED − BASE per 2-D (linear) and
    conv weight, and per embedding with `embeddings`. `rank`: R, or a list of R and PATTERN=R
    (default 8); or `energy` E: per weight the smallest rank keeping E of its squared singular values.
    `fan_in_fan_out`: patterns of the 2-D weights stored [in, out], as transformers' Conv1D stores
    them (GPT-2's c_attn, c_proj, c_fc) — a state dict does not record a module's class. Written
    whole or not at all (a staged folder). `write.metadata`: entries of adapter_model.safetensors'
    metadata; the adapter carries none of BASE's or TUNED's (their title, architecture or hashes
    describe a whole model, not a difference). `write`'s format, max_shard_size, jobs,
    no_metadata and ranks do not apply to an adapter folder and are refused."""
    write = check_write_options(write)
    write.refuse(*NOT_FOR_ADAPTERS, why="cannot be used with an adapter folder (extract-lora writes "
                                        "adapter_config.json and one adapter_model.safetensors, with no metadata "
                                        "of BASE's or TUNED's)")
    default, patterns = _ranks(rank, energy)
    metadata = core.check_metadata(_entries(write.metadata), "metadata")
    transposed = [core.compile_pattern(p) for p in fan_in_fan_out or []]
    check_folder(write.output, write.force or write.dry_run)  # a dry run says it would need --force
    with (open_checkpoint(base, root) as b, open_checkpoint(tuned, root) as t,
          Spools(output_folder(write.output), shared=True) as spools):
        for pattern in [p for p, _ in patterns] + list(fan_in_fan_out or []):
            core.select(b.tensors, [pattern])  # a pattern selecting nothing is a typo: said loudly
        read_again = not write.dry_run or energy is not None  # an SVD (or --energy's pass) reads a weight again
        settings = _Settings(default, [(core.compile_pattern(p), r) for p, r in patterns], transposed, embeddings,
                             spools if read_again else None)
        survey = _survey(b, t, settings)
        if energy is not None:
            _energy_ranks(b, t, survey.plan, energy, survey.held)
            default = Counter(p.rank for p in survey.plan).most_common(1)[0][0] if survey.plan else 1
        if not survey.plan and not write.dry_run:
            raise CkptError(f"{tuned}: no 2-D or conv weight differs from {base}; nothing to extract"
                            + (f" (not extracted: {', '.join(n['name'] for n in survey.not_extracted[:8])})"
                               if survey.not_extracted else ""))
        errors = {} if write.dry_run else _write_adapter(b, t, survey, default, write, metadata, spools)
        # built once the work is done: every error is known
        return ExtractReport(
            base=base, tuned=tuned, output=write.output,
            files=[os.path.join(write.output, PEFT_CONFIG), os.path.join(write.output, PEFT_WEIGHTS[0])],
            dry_run=write.dry_run, rank=default, energy=energy, rank_patterns=dict(patterns), embeddings=embeddings,
            fan_in_fan_out=list(fan_in_fan_out or []),
            extracted=[Extracted(name=p.name, key=p.key, kind=p.kind.value, shape=p.shape, rank=p.rank,
                                 requested_rank=p.requested_rank, clamped=p.clamped, error=errors.get(p.key))
                       for p in survey.plan],
            not_extracted=survey.not_extracted, tied=survey.tied, unchanged=survey.unchanged,
            only_in_base=[k for k in b.tensors if k not in t.tensors],
            only_in_tuned=[k for k in t.tensors if k not in b.tensors],
            metadata=dict(sorted({**metadata, core.METADATA_FORMAT_KEY: "pt"}.items())),
            needs_force=[write.output] if write.dry_run and not write.force and os.path.lexists(write.output)
            else None,
        )


def _ranks(rank: list[str] | int | None, energy: float | None) -> tuple[int, list[tuple[str, int]]]:
    """(default rank, [(PATTERN, R)]) of --rank (8 when not given); with --energy (0: each
    weight's whole rank, until _energy_ranks chooses it) no --rank."""
    if energy is None:
        return parse_ranks(8 if rank is None else rank)
    check_rank(None, energy)
    if rank is not None:
        raise UsageError("--rank and --energy are two ways of choosing the rank: give one")
    return 0, []


def _entries(metadata: Mapping[str, str] | None) -> dict:
    """WriteOptions.metadata as the dict core.check_metadata checks (anything else it refuses)."""
    return dict(metadata) if isinstance(metadata, Mapping) else metadata or {}


def _survey(b: Checkpoint, t: Checkpoint, settings: _Settings) -> _Survey:
    """Every weight of BASE against TUNED, a tie group (one storage) at a time."""
    survey = _Survey()
    groups: dict[tuple, list[str]] = {}
    for name, tb in b.tensors.items():
        groups.setdefault(tb.view_key(), []).append(name)
    for names in groups.values():
        shared = [n for n in names if n in t.tensors]
        # names tied in both: one difference, extracted once; tied in BASE only: each its own
        if len({t.tensors[n].view_key() for n in shared}) == 1:
            _survey_group(b, t, shared, settings, survey)
            continue
        for n in shared:  # a LoRA folded into one of them changes them all, in BASE's one storage
            if _differs(b.tensors[n], t.tensors[n]):
                survey.not_extracted.append({"name": n, "reason": f"tied in BASE to {', '.join(x for x in names if x != n)} "
                                                                  f"but not in TUNED: no LoRA can change one alone"})
            else:
                survey.unchanged += 1
    return survey


def _survey_group(b: Checkpoint, t: Checkpoint, group: list[str], settings: _Settings, survey: _Survey) -> None:
    """Names tied in both BASE and TUNED (or one name): planned once, or why not."""
    key = _choose(group, settings.embeddings)
    tb, tt = b.tensors[key], t.tensors[key]
    if tb.shape != tt.shape:
        survey.not_extracted.append({"name": key, "reason": f"shape differs: {list(tb.shape)} in BASE, "
                                                            f"{list(tt.shape)} in TUNED"})
        return
    if not (tb.dtype.floating and tt.dtype.floating and tb.is_plain and tt.is_plain):
        if _differs(tb, tt):
            survey.not_extracted.append({"name": key, "reason": f"not floating point ({tb.dtype.name})"})
        else:
            survey.unchanged += 1
        return
    kind = _kind(key, tb.shape, settings.embeddings)
    # compared here, factored when written: a remote weight that may be planned fetched once, kept
    held = _held(tb, tt, settings.spools if isinstance(kind, Layout) else None)
    if not _differs(*held):
        _release(held, settings.spools)
        survey.unchanged += 1
        return
    for other in group:
        if other != key:
            survey.tied[other] = key
    if kind == Layout.LINEAR and any(match(key) for match in settings.transposed):
        kind = Layout.LINEAR_T  # [in, out]: factored as its transpose, peft's fan_in_fan_out
    if not isinstance(kind, Layout):
        survey.not_extracted.append({"name": key, "reason": kind})
        return
    _check_stored(key, tb, tt)
    survey.held[key] = held
    rows, cols = (tb.shape[1], tb.shape[0]) if kind in TRANSPOSED else (tb.shape[0], math.prod(tb.shape[1:]))
    want = settings.default or min(rows, cols)  # 0: --energy, which chooses within the whole rank
    for match, r in settings.matchers:
        if match(key):
            want = r
    survey.plan.append(_Planned(name=key[: -len(".weight")], key=key, kind=kind, shape=list(tb.shape),
                                rank=min(want, rows, cols), requested_rank=want, clamped=want > min(rows, cols)))


def _held(tb: TensorRef, tt: TensorRef, spools: Spools | None) -> tuple[TensorRef, TensorRef]:
    """BASE's and TUNED's weight, a remote one on its bytes fetched once (ops/spools.py: in memory
    when small, else a temporary file beside the output), kept until its SVD is made."""
    return (spools.hold(tb), spools.hold(tt)) if spools is not None else (tb, tt)


def _release(held, spools: Spools | None) -> None:
    if spools is not None:
        for t in held:
            spools.release(t)


def _differs(a: TensorRef, b: TensorRef) -> bool:
    if a.dtype is b.dtype and a.is_contiguous and b.is_contiguous:
        return a.data() != b.data()
    import torch

    from ...io.tensors import as_torch

    x, y = as_torch(a), as_torch(b)
    common = torch.promote_types(x.dtype, y.dtype)  # never through float: complex stays complex
    return not torch.equal(x.to(common), y.to(common))


def _check_stored(key: str, a: TensorRef, b: TensorRef) -> None:
    """Refuse a weight whose elements BASE and TUNED both hold far fewer of (REPEATED_LIMIT)."""
    numel = max(a.numel, b.numel)
    held = max(_stored(a), _stored(b))
    if numel > REPEATED_LIMIT and numel > 2 * held:
        shape = list(a.shape if a.numel == numel else b.shape)
        raise CkptError(f"{key}: a view of {held:,} stored value{'s' if held != 1 else ''} repeated as {shape} "
                        f"({numel:,} elements: stride 0 or overlapping strides) in BASE and TUNED; its SVD would cost "
                        f"far more than the files hold, so nothing was extracted (if it is a real weight, store it "
                        f"whole first: convert both files to .safetensors)")


def _choose(group: list[str], embeddings: bool) -> str:
    """Of names tied together, the one to extract the shared difference for: the first that
    can be expressed (lm_head, a linear layer, before a tied embedding unless --embeddings)."""
    for name in group:
        if name.endswith(".weight") and not (is_embedding(name[: -len(".weight")]) and not embeddings):
            return name
    return group[0]


def _kind(key: str, shape: tuple[int, ...], embeddings: bool) -> Layout | str:
    """linear, conv, embedding (a Layout) — or why the weight's difference cannot be a LoRA."""
    if len(shape) < 2 or len(shape) > 5:
        return f"{len(shape)}-D: a LoRA adapts 2-D and conv weights only"
    if not key.endswith(".weight"):
        return "not a layer's weight (a LoRA adapts the .weight of a layer)"
    module = key[: -len(".weight")]
    if len(shape) == 2 and is_embedding(module):
        return Layout.EMBEDDING if embeddings else "embedding (pass --embeddings to extract it as lora_embedding_A/B)"
    if 0 in shape:
        return "empty"
    return Layout.LINEAR if len(shape) == 2 else Layout.CONV


def _written(b: Checkpoint, t: Checkpoint, plan: list[_Planned], svd: "_SvdCache") -> list[Written]:
    """The adapter's modules, their factors each computed (from `svd`) when it is written; alpha = r."""
    written = []
    for p in plan:
        shape, k = p.shape, p.rank
        if p.kind in TRANSPOSED:  # W [in, out] (embedding: [vocab, dim]): A [r, in], B [out, r], ΔW = (B·A)ᵀ
            a_shape, b_shape = (k, shape[0]), (shape[1], k)
        else:
            a_shape, b_shape = (k, *shape[1:]), (shape[0], k, *([1] * (len(shape) - 2)))
        dtype = _factor_dtype(b.tensors[p.key], t.tensors[p.key])
        written.append(Written(p.name, computed_tensor(a_shape, dtype, svd.maker(p, "A", dtype)),
                               computed_tensor(b_shape, dtype, svd.maker(p, "B", dtype)), k, k, p.kind))
    return written


def _factor_dtype(a: TensorRef, b: TensorRef):
    """Factors are written in float32 (float64 when both inputs are), whatever the weights'
    dtype: their error is then the SVD's alone."""
    from ...dtypes import by_name

    return by_name("float64" if a.dtype.name == b.dtype.name == "float64" else "float32")


def _write_adapter(b: Checkpoint, t: Checkpoint, survey: _Survey, r: int, write: WriteOptions,
                   metadata: dict[str, str], spools: Spools | None = None) -> dict[str, float]:
    """The adapter folder, staged and renamed into place whole. Returns each weight's relative
    error (key -> error), known once its factors are written."""
    svd = _SvdCache(b, t, survey.held, spools)
    written = _written(b, t, survey.plan, svd)
    write_peft(written, write, metadata, peft_config(written, r, r))
    return svd.errors


def _difference(base: Checkpoint, tuned: Checkpoint, p: _Planned, held: dict | None = None):
    """TUNED − BASE of one planned weight, as the matrix its LoRA factors (ΔWᵀ for TRANSPOSED);
    read from `held` (key -> BASE's, TUNED's) when the survey kept it."""
    import torch

    from ...io.tensors import as_torch

    tb, tt = (held or {}).get(p.key) or (base.tensors[p.key], tuned.tensors[p.key])
    wide = torch.float64 if tb.dtype.name == tt.dtype.name == "float64" else torch.float32
    d = as_torch(tt).to(wide) - as_torch(tb).to(wide)
    if not bool(torch.isfinite(d).all()):
        raise CkptError(f"{p.key}: TUNED − BASE holds NaN or infinite values; cannot extract a LoRA")
    return d.T if p.kind in TRANSPOSED else d.reshape(d.shape[0], -1)


def _energy_ranks(base: Checkpoint, tuned: Checkpoint, plan: list[_Planned], energy: float,
                  held: dict | None = None) -> None:
    """--energy E: each planned weight's rank, the smallest keeping E of its ΔW's squared singular
    values (a pass of singular values alone, before the SVDs the factors are made of)."""
    import torch

    for p in plan:
        s = _interruptible(torch.linalg.svdvals, _difference(base, tuned, p, held))
        p.rank = p.requested_rank = energy_rank(s, energy)


class _SvdCache:
    """One SVD per weight, made when its A is written and kept until its B is; the relative
    error of each weight's rank-r approximation in `errors` (key -> error)."""

    def __init__(self, base: Checkpoint, tuned: Checkpoint, held: dict | None = None, spools: Spools | None = None):
        self.base, self.tuned, self.held, self.spools = base, tuned, held if held is not None else {}, spools
        self.done: dict[str, dict] = {}
        self.errors: dict[str, float] = {}

    def factors(self, p: _Planned):
        import torch

        if p.key in self.done:
            return self.done[p.key]
        tb, tt = self.base.tensors[p.key], self.tuned.tensors[p.key]
        difference = _difference(self.base, self.tuned, p, self.held)  # a new tensor: views nothing kept
        _release(self.held.pop(p.key, ()), self.spools)  # what was kept of BASE's and TUNED's is done with
        u, s, vh = _interruptible(torch.linalg.svd, difference, full_matrices=False)
        k = p.rank
        top = float(s[0]) if s.numel() else 0.0  # relative to the largest: s² cannot overflow
        share = (s.double() / top) ** 2 if top > 0 else s.double()
        total = float(share.sum())
        self.errors[p.key] = math.sqrt(float(share[k:].sum()) / total) if total > 0 else 0.0
        root = s[:k].sqrt()
        a = root[:, None] * vh[:k]  # √S·Vh  [r, in]
        b = u[:, :k] * root[None, :]  # U·√S  [out, r]
        dtype = torch.float64 if tb.dtype.name == tt.dtype.name == "float64" else torch.float32
        if not (bool(torch.isfinite(a.to(dtype)).all()) and bool(torch.isfinite(b.to(dtype)).all())):
            raise CkptError(f"{p.key}: its LoRA factors do not fit in {str(dtype)[6:]} (TUNED − BASE near the "
                            f"dtype's largest values); cannot extract it")
        self.done[p.key] = {"A": a, "B": b}
        return self.done[p.key]

    def maker(self, p: _Planned, which: str, dtype):
        def make():
            import torch

            from ...io.tensors import to_bytes

            made = self.factors(p)
            value = made.pop(which)
            if not made:
                del self.done[p.key]
            return to_bytes(value.to(getattr(torch, dtype.name)).contiguous())

        return make
