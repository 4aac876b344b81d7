"""Review 6: small hostile files that still keep a command busy far beyond the real work.
Each test is one bug; they fail until it is fixed."""

from __future__ import annotations

import os

from test_hostile_opcodes import G, PROTO2, U, assert_isolated_clean, get, put, run_isolated, zip_file

CAP = 2 * 2**30  # RLIMIT_AS


def test_a_60000_deep_chain_of_pickled_modules_is_walked_in_linear_time(tmp_path):
    """A 1.9 MB .pth whose pickled modules nest 60,000 deep (built outermost first, so the nesting limit never sees it): the module walk copies its frozenset path per level, O(depth^2), and `inspect` takes ~27 s."""
    n, base = 60_000, 10
    # 60,000 placeholder modules, created first (none has state yet, so each is depth 1) ...
    created = (b"](" + G("user_code", "Net") + put(0) + b")\x81" + put(base)
               + b"".join(get(0) + b")\x81" + put(base + i) for i in range(1, n)) + b"e")
    # ... then module i gets the state {"_parameters": {}, "_modules": {"a": module i+1}}
    built = (b"](" + get(base) + b"}(" + U("_parameters") + put(1) + b"}" + U("_modules") + put(2) + b"}"
             + U("a") + put(3) + get(base + 1) + b"su" + b"b"
             + b"".join(get(base + i) + b"}(" + get(1) + b"}" + get(2) + b"}" + get(3) + get(base + i + 1) + b"su" + b"b"
                        for i in range(1, n - 1)) + b"e")
    top = b"}(" + U("x") + created + U("y") + built + U("model") + get(base) + b"u"
    path = zip_file(tmp_path / "chain.pth", PROTO2 + top + b".")
    assert os.path.getsize(path) < 2 * 2**20
    result = run_isolated(tmp_path, "inspect", path, memory=CAP, timeout=20)
    assert_isolated_clean(result, within=10)
