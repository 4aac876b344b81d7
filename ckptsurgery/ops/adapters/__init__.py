"""Adapters without the model's code: fold them into a base checkpoint (`merge --lora`) and
extract one from the difference between two checkpoints (`extract-lora`).

One module per concern:

    kinds.py     the types they share: Format, AdapterKind and Layout (str Enums), Module,
                 Adapter, AdapterFormat (what a format declares), FoldKind (what a kind
                 declares) and Step (a change to a base tensor's rows)
    read.py      the two tables, FORMATS (adapter formats) and KINDS (adapter kinds), and
                 read_adapter
    kind_lora.py LoRA: W + s·ΔW, ΔW = B·A by layout (linear, linear-t, conv, embedding); LoCon's core
    kind_dora.py DoRA: m ⊙ (W + s·ΔW)/‖W + s·ΔW‖, the norm per output; LyCORIS's dora_scale;
                 ProductKind, the check LoHa and LoKr share
    kind_ia3.py  IA3: W ⊙ l along its outputs (or a feed-forward layer's inputs), the bias too
    kind_loha.py LoHa: W + s·(w1_a·w1_b) ⊙ (w2_a·w2_b), Tucker cores for convs
    kind_lokr.py LoKr: W + s·w1 ⊗ w2, each side whole or a product, a core for convs
    kind_full.py full: W + diff, b + diff_b (LyCORIS's `full`)
    peft.py      the PEFT folder format: reader and resolver (extract.py writes it too)
    kohya.py     the kohya/LyCORIS .safetensors format: reader (LoRA, LoCon with lora_mid, LoHa,
                 LoKr, full, dora_scale) and resolver
    patterns.py  pattern safety: the regular expressions of an adapter's config, checked
                 before they are run, and run as peft runs them under a budget
    backtracking.py  a bound on the work of Python's matcher for a pattern, which
                 patterns.py asks before it runs one
    fold.py      fold_into: each module's kind's steps on the base's weights, by row chunks
    extract.py   extract_lora: a truncated SVD per weight, written as a PEFT folder

Adding an adapter kind is one module kind_<name>.py declaring a kinds.FoldKind, one
kinds.AdapterKind member and one entry in read.KINDS; adding a format is one module with its
`recognises`, `read` and resolver (peft.py and kohya.py are the examples), one kinds.Format
member, and one entry in read.FORMATS — folding and the reports follow from the tables.

    from ckptsurgery.ops import WriteOptions
    from ckptsurgery.ops.adapters import extract_lora, fold_into, read_adapter
    report = extract_lora("base.safetensors", "tuned.safetensors", WriteOptions("adapter"), rank=16)
"""

from .extract import EMBEDDING_NAMES, extract_lora, is_embedding, parse_ranks
from .fold import Folded, delta, fold_into, parse_scales
from .kinds import Adapter, AdapterFormat, AdapterKind, FoldKind, Format, Layout, Module, Step
from .patterns import check_file_pattern, pattern_key
from .peft import PEFT_CONFIG, PEFT_PREFIX, PEFT_WEIGHTS
from .read import FORMATS, KINDS, read_adapter

__all__ = ["EMBEDDING_NAMES", "FORMATS", "KINDS", "PEFT_CONFIG", "PEFT_PREFIX", "PEFT_WEIGHTS", "Adapter",
           "AdapterFormat", "AdapterKind", "FoldKind", "Folded", "Format", "Layout", "Module", "Step",
           "check_file_pattern", "delta", "extract_lora", "fold_into", "is_embedding", "parse_ranks", "parse_scales",
           "pattern_key", "read_adapter"]
