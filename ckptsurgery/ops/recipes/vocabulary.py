"""`tokenizer_source:` over models of different vocabularies, as mergekit 0.1.5 aligns them
(tokenizer/build.py, tokenizer/embed.py): by token string.

The output vocabulary is the tokenizer source's (for `base`, the reference's), stripped to the
tokens whose id is below that model's `vocab_size` (config.json; else the tokenizer's size), as
`get_stripped_tokenizer`. Each model's vocabulary is its tokens below its own `vocab_size`. A
vocabulary tensor (a tensor outside the layers whose row count is its model's vocabulary: the
embeddings, the head) is permuted to the output's: row i is the model's row of output token i;
a token the model lacks takes mergekit's default (`assign_embedding_sources`), from the models of
that tensor: the row of the one model that has it, zeros when none has it, the base's row when
the base has it, else the mean of the rows of the models that have it.

Vocabularies are read from each folder's tokenizer.json (its `model.vocab` and `added_tokens`),
parsed and checked, never executed: no transformers, no tokenizers."""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from ...errors import CkptError
from ...io import TensorRef
from ...io.model import computed_tensor
from ...io.small_files import parse_json, read_small
from ...kinds import Kind

TOKENIZER_JSON = "tokenizer.json"
MAX_TOKENIZER = 64 << 20  # the largest known (Gemma's) is 33 MB; parsed, it takes several times that
MAX_TOKEN_ID = (1 << 31) - 1  # past it, not a vocabulary's id (the largest are about 2^18)


class RowSource(Kind):
    """Where the row of a token a model lacks comes from (mergekit's assign_embedding_sources)."""

    ONE = "one"  # exactly one of the tensor's models has the token: that model's row
    ZERO = "zero"  # none has it
    BASE = "base"  # the base has it: the base's row
    MEAN = "mean"  # else the mean of the rows of the models that have it


_SAID = {RowSource.ZERO: "zeros", RowSource.BASE: "from the base", RowSource.MEAN: "averaged"}  # in the notes


def read_vocabulary(folder: str | None) -> dict[str, int] | None:
    """token -> id of the folder's tokenizer.json (its model's vocabulary, then its added tokens
    over it, as `get_vocab()`), None when there is none; a CkptError line for a file too large,
    not JSON, or whose vocabulary is not strings to ids in range."""
    path = os.path.join(folder, TOKENIZER_JSON) if folder else None
    if path is None or not os.path.isfile(path):
        return None
    data = parse_json(path, read_small(path, MAX_TOKENIZER, f"larger than {MAX_TOKENIZER >> 20} MB; not a "
                                                           f"tokenizer.json"), "not a tokenizer.json")
    model = data.get("model") if isinstance(data, dict) else None
    vocab = model.get("vocab") if isinstance(model, dict) else None
    if isinstance(vocab, dict):
        pairs = list(vocab.items())
    elif isinstance(vocab, list):  # Unigram: [piece, score] pairs, the id the place
        pairs = [(e[0] if isinstance(e, list) and len(e) == 2 else None, i) for i, e in enumerate(vocab)]
    else:
        raise CkptError(f"{path}: not a tokenizer.json (no model.vocab)")
    added = data.get("added_tokens", [])
    if not isinstance(added, list):
        raise CkptError(f"{path}: not a tokenizer.json (added_tokens is not a list)")
    pairs += [(a.get("content"), a.get("id")) if isinstance(a, dict) else (None, None) for a in added]
    for n, (token, index) in enumerate(pairs):
        if not isinstance(token, str):
            raise CkptError(f"{path}: not a tokenizer.json (entry {n} of its vocabulary and added tokens is not a "
                            f"token)")
        if type(index) is not int or not 0 <= index <= MAX_TOKEN_ID:
            raise CkptError(f"{path}: not a tokenizer.json (token {token[:40]!r} has id {str(index)[:40]}, not an "
                            f"integer from 0 to {MAX_TOKEN_ID})")
    return dict(pairs)


def vocabulary_size(config: Mapping | None, vocabulary: Mapping[str, int]) -> int:
    """A model's vocabulary rows: its config's vocab_size (of its text_config too), else the tokenizer's."""
    for where in (config or {}, (config or {}).get("text_config")):
        if isinstance(where, Mapping) and type(where.get("vocab_size")) is int and where["vocab_size"] > 0:
            return where["vocab_size"]
    return len(vocabulary)


@dataclass(frozen=True)
class Alignment:
    """The output vocabulary (`tokens` rows, `source`'s) and, per model, its vocabulary's rows
    and where each output token lies among them (-1: it lacks the token)."""

    source: str
    tokens: int
    sizes: Mapping[Any, int]
    permutations: Mapping[Any, Any]  # model -> numpy int64 array of `tokens` rows
    beyond: int = 0  # tokens of the source's tokenizer.json at or past its vocab_size (not in the output)

    def is_vocabulary(self, model: Any, t: TensorRef) -> bool:
        # > 0: a model of no tokens has no rows to permute (a tensor of no rows is no vocabulary's)
        return model in self.sizes and len(t.shape) >= 1 and t.shape[0] == self.sizes[model] > 0


def alignment(source: str, vocabularies: Mapping[Any, tuple[dict[str, int], int]],
              source_vocabulary: tuple[dict[str, int], int]) -> Alignment:
    """Each model's (vocabulary, rows) aligned to the source's, its vocabulary stripped to its rows;
    refused in one line when the ids of the source's kept tokens are not 0 … N − 1."""
    import numpy as np

    vocabulary, rows = source_vocabulary
    kept = {token: i for token, i in vocabulary.items() if i < rows}
    ids = sorted(set(kept.values()))
    if not kept or len(ids) != len(kept) or ids[-1] != len(ids) - 1:
        raise CkptError(f"{source}: its tokenizer.json's tokens below vocab_size {rows} do not have the ids 0 to "
                        f"{len(kept) - 1}, each once: they cannot be the output's rows")
    order = sorted(kept, key=kept.__getitem__)
    permutations = {}
    for model, (theirs, size) in vocabularies.items():
        permutations[model] = np.array([i if (i := theirs.get(token, -1)) < size else -1 for token in order],
                                       dtype=np.int64)
    return Alignment(source, len(order), {m: size for m, (_, size) in vocabularies.items()}, permutations,
                     sum(1 for i in vocabulary.values() if i >= rows))


def row_sources(permutations: Sequence[Any], base: int | None) -> dict[int, tuple[RowSource, tuple[int, ...]]]:
    """Output id -> (where its row comes from, which models) for each token some model lacks."""
    import numpy as np

    table = np.stack(permutations)
    sources = {}
    for token in np.flatnonzero((table < 0).any(axis=0)).tolist():
        have = tuple(np.flatnonzero(table[:, token] >= 0).tolist())
        if len(have) == 1:
            sources[token] = (RowSource.ONE, have)
        elif not have:
            sources[token] = (RowSource.ZERO, ())
        elif base is not None and base in have:
            sources[token] = (RowSource.BASE, (base,))
        else:
            sources[token] = (RowSource.MEAN, have)
    return sources


def aligned_tensors(key: str, inputs: Sequence[TensorRef], permutations: Sequence[Any],
                    sources: Mapping[int, tuple[RowSource, tuple[int, ...]]]) -> list[TensorRef]:
    """Each input's rows permuted to the output vocabulary, the ones it lacks made as `sources`
    says: computed when written, one tensor's rows in memory (an input whose rows are the
    output's already is itself)."""
    unchanged = [_unchanged(t, p) for t, p in zip(inputs, permutations)]
    if not all(unchanged) and any(not t.dtype.floating or t.quant is not None for t in inputs):
        raise CkptError(f"{key}: rows of {', '.join(sorted({t.dtype.name for t in inputs}))} cannot be aligned to "
                        f"another vocabulary (only floating ones)")
    return [t if same else computed_tensor((len(p), *t.shape[1:]), t.dtype,
                                           lambda i=i: _permuted(i, inputs, permutations, sources))
            for i, (t, p, same) in enumerate(zip(inputs, permutations, unchanged))]


def _permuted(index: int, inputs: Sequence[TensorRef], permutations: Sequence[Any], sources: Mapping) -> Any:
    """Input `index`'s rows in the output's order, with the default rows of the tokens it lacks."""
    import numpy as np

    from ..methods import decode, encode

    def rows(i: int):  # an input's rows as bytes, each input read once
        if i not in held:
            held[i] = np.frombuffer(inputs[i].data(), np.uint8).reshape(inputs[i].shape[0], -1)
        return held[i]

    held: dict[int, Any] = {}
    t, p, mine = inputs[index], permutations[index], rows(index)
    out = np.empty((len(p), mine.shape[1]), np.uint8)
    have = p >= 0
    out[have] = mine[p[have]]
    wide = "float64" if any(i.dtype.name == "float64" for i in inputs) else "float32"
    for token in np.flatnonzero(~have).tolist():
        kind, models = sources[token]
        values = np.zeros(t.numel // t.shape[0], wide)
        for m in models:  # summed in order, then divided: mergekit's mean
            values += decode(rows(m)[permutations[m][token]], inputs[m].dtype.name, wide)
        if kind is RowSource.MEAN:
            values /= len(models)
        out[token] = np.frombuffer(encode(values, t.dtype.name), np.uint8)
    return out.reshape(-1).data


def alignment_note(alignment: Alignment, names: Sequence[str], inputs: Sequence[TensorRef],
                   permutations: Sequence[Any], sources: Mapping[int, tuple[RowSource, tuple[int, ...]]]) -> str:
    """How a tensor's rows were aligned, per model whose rows changed: "rows aligned to m0's
    vocabulary of 64 by token: wide from 72 rows; narrow from 60 rows, lacks 4: 3 from the base, 1 zeros"."""
    import numpy as np

    parts = []
    for name, t, p in zip(names, inputs, permutations):
        if _unchanged(t, p):
            continue
        counts: dict[str, int] = {}
        for token in np.flatnonzero(p < 0).tolist():
            kind, models = sources[token]
            said = f"from {names[models[0]]}" if kind is RowSource.ONE else _SAID[kind]
            counts[said] = counts.get(said, 0) + 1
        lacks = f", lacks {sum(counts.values())}: " + ", ".join(f"{n} {said}" for said, n in counts.items())
        parts.append(f"{name} from {t.shape[0]} rows" + (lacks if counts else ""))
    return f"rows aligned to {alignment.source}'s vocabulary of {alignment.tokens} by token: {'; '.join(parts)}"


def _unchanged(t: TensorRef, p) -> bool:
    """The input's rows are the output's already (the same tokens at the same ids)."""
    import numpy as np

    return t.shape[0] == len(p) and bool(np.array_equal(p, np.arange(len(p))))
