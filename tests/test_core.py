import pytest

from ckptsurgery import core
from ckptsurgery.errors import CkptError

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
    assert core.parse_size(text) == size


@pytest.mark.parametrize("text", ["", "GB", "2 parsecs", "-1GB", "0"])
def test_parse_size_rejects(text):
    with pytest.raises(CkptError):
        core.parse_size(text)


def test_plan_shards_greedy_in_order_and_big_items_alone():
    sizes = [("a", 4), ("b", 4), ("c", 3), ("huge", 50), ("d", 10), ("e", 1)]
    assert core.plan_shards(sizes, 10) == [["a", "b"], ["c"], ["huge"], ["d"], ["e"]]
    assert core.plan_shards(sizes, 1000) == [["a", "b", "c", "huge", "d", "e"]]
    assert core.plan_shards([], 10) == []


def test_fold_runs_folds_alike_numbered_siblings_only():
    sig = {"0": "x", "1": "x", "2": "x", "3": "y", "4": "y", "stem": "s", "7": "x"}
    assert core.fold_runs(["stem", "0", "1", "2", "3", "4", "7"], sig.get) == [
        ("stem", ["stem"]), ("{0..2}", ["0", "1", "2"]), ("{3..4}", ["3", "4"]), ("7", ["7"])]
