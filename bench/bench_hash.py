"""inspect --hash against sha256sum of the same file (issue 11 §3): the ~1.37 GB checkpoint of
bench_foundation in .safetensors and .pth, from the page cache. Goal: ≤ 1.3× sha256sum's time,
memory flat. Run: .venv/bin/python bench/bench_hash.py --runs 5"""

from __future__ import annotations

import json
import subprocess

from common import CLI, build, measure, options, print_tables, warm


def main() -> None:
    args, out = options(runs=5)
    st, pth = out("big.safetensors"), out("big.pth")
    build(pth, st)
    warm(st, pth)
    cases = {
        "sha256sum .safetensors": ["sha256sum", st],
        "inspect --hash .safetensors": [*CLI, "inspect", st, "--hash", "--json"],
        "sha256sum .pth": ["sha256sum", pth],
        "inspect --hash .pth": [*CLI, "inspect", pth, "--hash", "--json"],
    }
    med, peak = measure(cases, args.runs, [])
    prints = {json.loads(subprocess.run([*CLI, "inspect", p, "--hash", "--json"], capture_output=True,
                                        check=True).stdout)["fingerprint"] for p in (st, pth)}
    assert len(prints) == 1, "the two formats must have one fingerprint"
    print_tables(cases, med, peak, [
        ("safetensors: inspect --hash / sha256sum", med["inspect --hash .safetensors"] / med["sha256sum .safetensors"], "≤ 1.3"),
        (".pth: inspect --hash / sha256sum", med["inspect --hash .pth"] / med["sha256sum .pth"], "≤ 1.3"),
    ])


if __name__ == "__main__":
    main()
