"""`--names hf`: a GGUF input's tensors under their Hugging Face names, an input option as
`--dequantize` is (it changes what is read, before any command selects, renames or writes).

A GGUF file names its tensors llama.cpp's way (`blk.3.attn_q.weight`). For the architectures in
`SUPPORTED`, each GGUF tensor kind has one canonical Hugging Face name (`TEMPLATES`:
`blk.{bid}.attn_q` -> `model.layers.{bid}.self_attn.q_proj`), and each is checked with the gguf
package's own table (`gguf.TensorNameMap(arch, n).get_name(hf_name)` must give the GGUF name back):
the mapping is the one gguf's tables give, for exactly the names they give it. `.weight` and
`.bias` are carried. A tensor with no Hugging Face name (llama.cpp's `rope_freqs.weight`, a kind
gguf's table does not map for that architecture) is left out, and the report lists it.

llama.cpp's convert_hf_to_gguf.py permutes a Llama-family model's q and k projections (weights and
biases) into the interleaved rotary layout its kernels use (`LlamaModel.permute`: per head, the two
halves of the head's rows interleaved; k with the key/value head count). GGUF architecture `llama`
(also what Mistral GGUFs use) is read back with the inverse, one head's rows a chunk: a plain
tensor's rows are read where they lie in the mapped file, a quantized one's dequantized a head at
a time. qwen2 and qwen3 are not permuted by llama.cpp, and are not here.

A caller asks with `ReadOptions(names="hf")` (ops/options.py): every input an operation opens
(ops/inputs.py's `open_input`) that is a GGUF file is read with Hugging Face names, and the report's
`hf_names` says what was done. Any other architecture is refused in one line; the command line
refuses `--names hf` when no input is a GGUF file (`check_inputs`: wrong usage)."""

from __future__ import annotations

import re
from collections import OrderedDict
from dataclasses import replace

from ..errors import CkptError, UsageError
from ..kinds import Kind
from .reports import HfNames


class Names(Kind):
    """Whose tensor names a GGUF input is read with."""

    GGUF = "gguf"
    HF = "hf"


SUPPORTED = ("llama", "qwen2", "qwen3")  # GGUF's general.architecture; each verified against transformers
PERMUTED = frozenset({"llama"})  # the architectures whose q/k llama.cpp permutes (LlamaModel.permute)

# GGUF tensor kind -> its canonical Hugging Face name ({bid}: the block); gguf's table checks each
TEMPLATES: dict[str, str] = {
    "token_embd": "model.embed_tokens",
    "output": "lm_head",
    "output_norm": "model.norm",
    "blk.{bid}.attn_norm": "model.layers.{bid}.input_layernorm",
    "blk.{bid}.attn_q": "model.layers.{bid}.self_attn.q_proj",
    "blk.{bid}.attn_k": "model.layers.{bid}.self_attn.k_proj",
    "blk.{bid}.attn_v": "model.layers.{bid}.self_attn.v_proj",
    "blk.{bid}.attn_output": "model.layers.{bid}.self_attn.o_proj",
    "blk.{bid}.attn_q_norm": "model.layers.{bid}.self_attn.q_norm",
    "blk.{bid}.attn_k_norm": "model.layers.{bid}.self_attn.k_norm",
    "blk.{bid}.ffn_norm": "model.layers.{bid}.post_attention_layernorm",
    "blk.{bid}.ffn_gate": "model.layers.{bid}.mlp.gate_proj",
    "blk.{bid}.ffn_up": "model.layers.{bid}.mlp.up_proj",
    "blk.{bid}.ffn_down": "model.layers.{bid}.mlp.down_proj",
}
_NAME = re.compile(r"(?:blk\.(?P<bid>0|[1-9][0-9]{0,5})\.)?(?P<kind>[a-z_]+)(?P<suffix>\.weight|\.bias)")
_Q, _K = "attn_q", "attn_k"


def _gguf_table(arch: str, blocks: int):
    """gguf's own HF -> GGUF name table for `arch`, for blocks 0..blocks-1."""
    from ..io.gguf import _gguf

    gguf = _gguf()
    ids = [key for key, name in gguf.MODEL_ARCH_NAMES.items() if name == arch]
    if not ids:
        raise CkptError(f"the gguf package installed has no architecture {arch!r}: upgrade it "
                        f"(pip install -U gguf)")
    return gguf.get_tensor_name_map(ids[0], blocks)


def _architecture(ckpt) -> str:
    arch = ckpt.metadata.get("general.architecture")
    if not isinstance(arch, str):
        raise CkptError(f"{ckpt.path}: --names hf: the file has no general.architecture; its tensors cannot be "
                        f"named for Hugging Face (read them with GGUF's names: omit --names hf)")
    if arch not in SUPPORTED:
        raise CkptError(f"{ckpt.path}: --names hf: GGUF architecture {arch[:40]!r} is not one ckptsurgery maps to "
                        f"Hugging Face names ({', '.join(SUPPORTED)}); omit --names hf to keep GGUF's names")
    return arch


def _count(ckpt, arch: str, what: str, bid: int, default: int | None = None) -> int:
    """A head count from the metadata (`<arch>.attention.<what>`): one number, or one per block."""
    key = f"{arch}.attention.{what}"
    value = ckpt.metadata.get(key, default)
    if isinstance(value, list):
        value = value[bid] if bid < len(value) else None
    if type(value) is not int or value <= 0:
        raise CkptError(f"{ckpt.path}: --names hf: {key} is {str(value)[:40]}, not a positive head count; the q/k "
                        f"projections cannot be un-permuted")
    return value


def hf_names(ckpt):
    """`ckpt` (a GGUF file's Checkpoint) with its tensors under their Hugging Face names, Llama's q/k
    projections un-permuted; what was done (`HfNames`). Nothing is read but the header."""
    from ..io.formats import Format

    if ckpt.format != Format.GGUF:
        raise UsageError(f"{ckpt.path}: --names hf maps a GGUF file's tensor names; this is {ckpt.format}, whose "
                         f"names are kept as they are")
    arch = _architecture(ckpt)
    table = _gguf_table(arch, 1)  # one block: a block's names are the same for every block
    mapped = {kind: table.get_name(template.format(bid=0)) == kind.format(bid=0)  # gguf's table gives it
              for kind, template in TEMPLATES.items()}
    tensors: OrderedDict = OrderedDict()
    left_out, unpermuted = [], []
    for name, t in ckpt.tensors.items():
        m = _NAME.fullmatch(name)
        hf = None
        if m:
            kind = m["kind"] if m["bid"] is None else "blk.{bid}." + m["kind"]
            bid = 0 if m["bid"] is None else int(m["bid"])
            if mapped.get(kind):
                hf = TEMPLATES[kind].format(bid=bid) + m["suffix"]
        if hf is None:
            left_out.append(name)
            continue
        if arch in PERMUTED and m["kind"] in (_Q, _K):
            heads = _count(ckpt, arch, "head_count", bid)
            if m["kind"] == _K:
                heads = _count(ckpt, arch, "head_count_kv", bid, heads)
            t = unpermuted_tensor(t, heads, f"{ckpt.path}: {name}")
            unpermuted.append(hf)
        tensors[hf] = t
    report = HfNames(architecture=arch, renamed=len(tensors), unpermuted=unpermuted, left_out=left_out)
    return replace(ckpt, tensors=tensors), report


def unpermuted_tensor(t, heads: int, where: str):
    """The inverse of llama.cpp's `LlamaModel.permute(W, n_head=heads)` (which is
    `W.reshape(n, 2, rows//n//2, *rest).swapaxes(1, 2).reshape(W.shape)`):
    `W.reshape(n, rows//n//2, 2, *rest).swapaxes(1, 2).reshape(W.shape)`, a chunked tensor of one
    head's rows a chunk, each read from that head's rows alone."""
    from ..io.model import chunked_tensor, mapped_range, numel_of

    shape = tuple(t.shape)
    rows = shape[0] if shape else 0
    if not shape or rows % (2 * heads):
        raise CkptError(f"{where}: shape {list(shape)} does not split into {heads} heads of an even number of rows; "
                        f"it cannot be un-permuted")
    half = rows // heads // 2
    row_bytes = numel_of(shape[1:]) * t.dtype.itemsize
    head_bytes = 2 * half * row_bytes
    placed = mapped_range(t)

    def head_rows(h: int) -> memoryview:
        if placed is not None:
            source, start = placed
            return source.view(start + h * head_bytes, head_bytes)
        return memoryview(t.data())[h * head_bytes: (h + 1) * head_bytes]  # a computed tensor: made whole each time

    def make(h: int) -> bytes:
        import numpy as np

        rows_in = np.frombuffer(head_rows(h), np.uint8).reshape(half, 2, row_bytes)
        return rows_in.swapaxes(0, 1).tobytes()  # row (i, a) of the head -> row (a, i)

    out = chunked_tensor(shape, t.dtype, [head_bytes] * heads, make)
    out.encoded = t.encoded  # a quantized tensor's type in the file, as inspect shows it
    return out


# ---- the input option (ReadOptions.names, ops/inputs.py) ---------------------------------------

def hf_names_of(ckpt):
    """`ckpt` under Hugging Face names when it is a GGUF file (with what was done), else as it is
    (and None): `--names hf` leaves the names of an input of another format alone."""
    from ..io.formats import Format

    if ckpt.format != Format.GGUF:
        return ckpt, None
    return hf_names(ckpt)


def combined(dones: list[HfNames]) -> HfNames | None:
    """What --names hf did to several GGUF inputs (a merge's, a diff's)."""
    if not dones:
        return None
    if len(dones) == 1:
        return dones[0]
    archs = list(dict.fromkeys(d.architecture for d in dones))
    return HfNames(architecture=", ".join(archs), renamed=sum(d.renamed for d in dones),
                   unpermuted=[n for d in dones for n in d.unpermuted], left_out=[n for d in dones for n in d.left_out])


def check_inputs(inputs: list) -> None:
    """`--names hf` needs a GGUF input: refused (UsageError) when each input is found to be something else.
    An input that cannot be told (missing, remote) is left for opening to judge."""
    from ..io.formats import Format, detect_format, is_remote

    found = []
    for path in inputs:
        if path is None:
            continue
        if not isinstance(path, str) or is_remote(path):
            return
        try:
            found.append((path, detect_format(path)))
        except CkptError:
            return
    if found and not any(fmt == Format.GGUF for _, fmt in found):
        path, fmt = found[0]
        what = f"{path} is {fmt}" if len(found) == 1 else f"none of the inputs is ({path} is {fmt})"
        raise UsageError(f"--names hf maps a GGUF file's tensor names to Hugging Face's, and {what}; "
                         f"omit --names hf")
