"""The pure functions under the commands, called directly: key patterns and selection, sizes and
shard plans, --tree's folding of numbered siblings, rename rules, key alignment for merge --into,
the overlap of two shapes, and the adapt rules with their prefix tokens and grids."""

import re

import pytest

from ckptsurgery import core
from ckptsurgery.io.write import parse_size, plan_shards
from ckptsurgery.ops.inspect import fold_runs
from ckptsurgery.errors import CkptError, UsageError

KEYS = ["conv.weight", "conv.bias", "liner1.weight", "liner1.bias", "liner10.weight", "liner10.bias",
        "layer1.0.bias", "layer2.3.bias", "head"]


@pytest.mark.parametrize("pattern, expected", [
    ("liner1", ["liner1.weight", "liner1.bias"]),  # a module, never liner10
    ("head", ["head"]),
    ("liner1.bias", ["liner1.bias"]),
    ("layer*.bias", ["layer1.0.bias", "layer2.3.bias"]),  # * spans dots
    ("*.weight", ["conv.weight", "liner1.weight", "liner10.weight"]),
    ("liner1?.*", ["liner10.weight", "liner10.bias"]),
    ("re:^liner1\\.", ["liner1.weight", "liner1.bias"]),
    ("re:bias$", ["conv.bias", "liner1.bias", "liner10.bias", "layer1.0.bias", "layer2.3.bias"]),
])
def test_patterns(pattern, expected):
    assert core.select(KEYS, [pattern]) == expected


def test_select_keeps_key_order_and_unions():
    assert core.select(KEYS, ["liner10", "conv"]) == ["conv.weight", "conv.bias", "liner10.weight", "liner10.bias"]


def test_pattern_that_selects_nothing_is_an_error():
    with pytest.raises(CkptError, match="'linear1', 'fc' selected no key"):
        core.select(KEYS, ["conv", "linear1", "fc"])


def test_bad_regex_is_an_error():
    with pytest.raises(CkptError, match="not a valid regular expression"):
        core.select(KEYS, ["re:("])


@pytest.mark.parametrize("text, size", [("2GB", 2 * 10**9), ("500MiB", 500 * 2**20), ("1000", 1000),
                                        ("1.5kb", 1500), (" 3 MB ", 3 * 10**6)])
def test_parse_size(text, size):
    assert parse_size(text) == size


@pytest.mark.parametrize("text", ["", "GB", "2 parsecs", "-1GB", "0"])
def test_parse_size_rejects(text):
    with pytest.raises(CkptError):
        parse_size(text)


def test_plan_shards_greedy_in_order_and_big_items_alone():
    sizes = [("a", 4), ("b", 4), ("c", 3), ("huge", 50), ("d", 10), ("e", 1)]
    assert plan_shards(sizes, 10) == [["a", "b"], ["c"], ["huge"], ["d"], ["e"]]
    assert plan_shards(sizes, 1000) == [["a", "b", "c", "huge", "d", "e"]]
    assert plan_shards([], 10) == []


def test_fold_runs_folds_alike_numbered_siblings_only():
    sig = {"0": "x", "1": "x", "2": "x", "3": "y", "4": "y", "stem": "s", "7": "x"}
    assert fold_runs(["stem", "0", "1", "2", "3", "4", "7"], sig.get) == [
        ("stem", ["stem"]), ("{0..2}", ["0", "1", "2"]), ("{3..4}", ["3", "4"]), ("7", ["7"])]


# ---- rename ----------------------------------------------------------------------------------

def rename(keys, *rules):
    return core.plan_rename(keys, [core.rename_rule(kind, *args) for kind, *args in rules])


def test_rename_rules_in_order_and_untouched_reported():
    names, untouched = rename(["module.layer1.w", "module.fc.b", "head"], ("strip", "module."),
                              ("regex", r"layer(\d+)", r"block\1"))
    assert names == {"module.layer1.w": "block1.w", "module.fc.b": "fc.b", "head": "head"}
    assert untouched == ["head"]
    names, _ = rename(["a.w", "b.w"], ("add", "net."), ("replace", ".w", ".weight"),
                      ("map", {"net.b.weight": "head.weight"}))
    assert names == {"a.w": "net.a.weight", "b.w": "head.weight"}


def test_rename_rules_apply_in_the_order_given():
    keys = ["a.w"]
    assert rename(keys, ("replace", "a", "b"), ("replace", "b", "c"))[0] == {"a.w": "c.w"}
    assert rename(keys, ("add", "m"), ("replace", "m.a", "x"))[0] == {"a.w": "x.w"}
    with pytest.raises(CkptError, match="--replace 'b' 'c' changed no key"):  # b did not exist yet
        rename(keys, ("replace", "b", "c"), ("replace", "a", "b"))


@pytest.mark.parametrize("prefix", ["module", "module."])
def test_prefixes_name_modules(prefix):
    names, _ = rename(["module.fc.w", "modules.x", "module"], ("strip", prefix))
    assert names == {"module.fc.w": "fc.w", "modules.x": "modules.x", "module": "module"}
    assert rename(["fc.w"], ("add", prefix))[0] == {"fc.w": "module.fc.w"}


@pytest.mark.parametrize("prefix", ["", ".", ".module"])
def test_prefix_that_is_no_module_name_is_usage_error(prefix):
    with pytest.raises(UsageError, match="module name"):
        core.rename_rule("strip", prefix)


def test_rename_never_starts_a_name_with_a_dot():
    with pytest.raises(CkptError, match="start 1 name"):
        rename(["model..w", "x"], ("strip", "model"))
    with pytest.raises(CkptError, match="with a dot: a.w -> .w"):
        rename(["a.w"], ("regex", "^a", ""))


def test_rename_collisions_list_every_pair():
    with pytest.raises(CkptError) as err:
        rename(["module.a", "a", "module.b", "b", "c"], ("strip", "module."))
    assert "module.a + a -> a" in str(err.value) and "module.b + b -> b" in str(err.value)


def test_rename_rule_that_changes_nothing_is_an_error():
    with pytest.raises(CkptError, match="--strip-prefix 'module.' changed no key"):
        rename(["a", "b"], ("strip", "module."))
    with pytest.raises(CkptError, match="does not have: nope"):
        rename(["a"], ("map", {"a": "x", "nope": "y"}))
    with pytest.raises(UsageError, match="no rename rule"):
        rename(["a"])


def test_rename_bad_regex_and_group():
    with pytest.raises(UsageError, match="not a valid regular expression"):
        core.rename_rule("regex", "(", "x")
    with pytest.raises(CkptError, match="--regex"):
        rename(["a1"], ("regex", r"a(\d)", r"\2"))


# ---- alignment and overlap -------------------------------------------------------------------

def test_align_exact_then_wrapper_prefixes():
    got = core.align(["module.fc.weight", "_orig_mod.conv.weight", "bn.bias", "stale"],
                     ["fc.weight", "conv.weight", "bn.bias", "new.weight"])
    assert got == {"fc.weight": ("module.fc.weight", "prefix"), "conv.weight": ("_orig_mod.conv.weight", "prefix"),
                   "bn.bias": ("bn.bias", "exact")}
    assert core.align(["fc.weight"], ["model.fc.weight"]) == {"model.fc.weight": ("fc.weight", "prefix")}
    assert core.align(["module._orig_mod.fc.weight"], ["fc.weight"]) == {"fc.weight": ("module._orig_mod.fc.weight", "prefix")}


def test_align_exact_match_wins_over_prefix():
    assert core.align(["fc.weight", "module.fc.weight"], ["fc.weight"]) == {"fc.weight": ("fc.weight", "exact")}


def test_align_ambiguity_is_an_error():
    with pytest.raises(CkptError, match="ambiguous"):
        core.align(["module.fc.weight"], ["fc.weight", "model.fc.weight"])
    with pytest.raises(CkptError, match="ambiguous"):
        core.align(["module.fc.weight", "model.fc.weight"], ["fc.weight"])


def test_overlap_region():
    assert core.overlap_region((4, 3, 3, 3), (4, 4, 3, 3)) == (slice(0, 4), slice(0, 3), slice(0, 3), slice(0, 3))
    assert core.overlap_region((1000, 8), (10, 8)) == (slice(0, 10), slice(0, 8))
    with pytest.raises(CkptError, match="different numbers of dimensions"):
        core.overlap_region((4,), (4, 1))


# ---- shape adapters: which rule fits which mismatch --------------------------------------------

def test_adapt_rules_by_name_first_then_shape():
    from ckptsurgery.core import adapt_rules

    rules = adapt_rules({
        "pos_embed": ((1, 197, 768), (1, 577, 768)),             # named: never a convolution
        "vit.embeddings.position_embeddings": ((1, 50, 8), (1, 65, 8)),
        "model.embed_tokens.weight": ((32000, 16), (32008, 16)),
        "lm_head.weight": ((32000, 16), (32008, 16)),
        "lm_head.bias": ((32000,), (32008,)),
        "stem.conv.weight": ((64, 3, 7, 7), (64, 4, 7, 7)),
        "audio.conv.weight": ((8, 1, 5), (8, 2, 5)),              # 3-D: Conv1d
        "blocks.0.mlp.weight": ((10, 4), (12, 4)),                # not named, not the last: no rule
        "blocks.0.norm.weight": ((4,), (6,)),                     # a 1-D that follows nothing
        "classifier.weight": ((1000, 16), (10, 16)),
        "classifier.bias": ((1000,), (10,)),
        "out.weight": ((5, 4), (7, 4)),                           # the last rows-only mismatch: a head
    })
    assert rules == {
        "pos_embed": "position", "vit.embeddings.position_embeddings": "position",
        "model.embed_tokens.weight": "rows", "lm_head.weight": "rows", "lm_head.bias": "rows",
        "stem.conv.weight": "channels", "audio.conv.weight": "channels",
        "blocks.0.mlp.weight": None, "blocks.0.norm.weight": None,
        "classifier.weight": "head", "classifier.bias": "head", "out.weight": "head",
    }
    # a position embedding whose width changed is no position rule (and no other)
    assert adapt_rules({"pos_embed": ((1, 17, 8), (1, 37, 16))}) == {"pos_embed": None}


@pytest.mark.parametrize("old, new, prefix, grid, want", [
    (197, 577, None, None, (1, (14, 14), (24, 24))),   # ViT-B/16 224 -> 384
    (196, 576, None, None, (0, (14, 14), (24, 24))),   # no class token
    (261, 581, None, None, (5, (16, 16), (24, 24))),   # class + 4 registers
    (17, 25, 1, (4, 6), (1, (4, 4), (4, 6))),
])
def test_prefix_tokens_and_grids(old, new, prefix, grid, want):
    from ckptsurgery.core import prefix_and_grids

    assert prefix_and_grids(old, new, prefix, grid) == want


def test_prefix_tokens_that_cannot_be_told_are_an_error():
    from ckptsurgery.core import prefix_and_grids

    with pytest.raises(CkptError, match="no count of prefix tokens .* give --prefix-tokens P"):
        prefix_and_grids(17, 23)  # 4x4 + 1 before, but no square after whatever the prefix
    with pytest.raises(CkptError, match="is not a square grid; give --grid"):
        prefix_and_grids(17, 25, prefix=1)


@pytest.mark.parametrize("pattern, hint", [
    ("num_batches_tracked", ("*.num_batches_tracked", 2)),  # a key's last part, given as a module name
    ("bn1", ("*.bn1.*", 2)),  # a module below the top
    ("layer*", ("*.layer*", 3)),  # a glob anchored at the start
    ("liner1", ("linear1", 2)),  # a typo of a module name
    ("zzz", None),
    ("re:zzz", None),
])
def test_a_pattern_that_selects_nothing_suggests_its_near_miss(pattern, hint):
    keys = ["linear1.weight", "linear1.bias", "block.bn1.weight", "block.bn1.num_batches_tracked",
            "head.bn2.num_batches_tracked", "block.layer1.w", "block.layer2.w", "x.layers.w"]
    assert core.near_miss(keys, pattern) == hint
    message = f"did you mean {hint[0]!r}? it selects {hint[1]} keys" if hint else "selected no key"
    with pytest.raises(CkptError, match=re.escape(message)):
        core.select(keys, [pattern])
