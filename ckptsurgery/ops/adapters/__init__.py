"""Adapters without the model's code: fold them into a base checkpoint (`merge --lora`) and
extract one from the difference between two checkpoints (`extract-lora`).

One module per concern:

    kinds.py     the adapter kinds: Layout and Format (str Enums), Module, Adapter, and
                 AdapterFormat — what an adapter format declares
    read.py      FORMATS, the one table of adapter formats, and read_adapter
    peft.py      the PEFT folder format: reader and resolver (extract.py writes it too)
    kohya.py     the kohya .safetensors format: reader and resolver
    patterns.py  pattern safety: the regular expressions of an adapter's config, checked
                 before they are run, and run as peft runs them under a budget
    backtracking.py  a bound on the work of Python's matcher for a pattern, which
                 patterns.py asks before it runs one
    fold.py      fold_into: the adapters' ΔW added to the base's weights, by layout
    extract.py   extract_lora: a truncated SVD per weight, written as a PEFT folder

Adding an adapter kind (DoRA, LoHa, LoKr, IA3, LyCORIS, diffusers) is one module with its
`recognises`, `read` and resolver (peft.py and kohya.py are the examples), one kinds.Format
member, and one entry in read.FORMATS — folding and the reports follow from the table.

    from ckptsurgery.ops import WriteOptions
    from ckptsurgery.ops.adapters import extract_lora, fold_into, read_adapter
    report = extract_lora("base.safetensors", "tuned.safetensors", WriteOptions("adapter"), rank=16)
"""

from .extract import EMBEDDING_NAMES, extract_lora, is_embedding, parse_ranks
from .fold import Folded, delta, fold_into, parse_scales
from .kinds import Adapter, AdapterFormat, Format, Layout, Module
from .patterns import check_file_pattern, pattern_key
from .peft import PEFT_CONFIG, PEFT_PREFIX, PEFT_WEIGHTS
from .read import FORMATS, read_adapter

__all__ = ["EMBEDDING_NAMES", "FORMATS", "PEFT_CONFIG", "PEFT_PREFIX", "PEFT_WEIGHTS", "Adapter", "AdapterFormat",
           "Folded", "Format", "Layout", "Module", "check_file_pattern", "delta", "extract_lora", "fold_into",
           "is_embedding", "parse_ranks", "parse_scales", "pattern_key", "read_adapter"]
