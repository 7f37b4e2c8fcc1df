"""The markdown table of a saved `convgen bench --json` run (the same table the command
prints). Usage: python scripts/bench_table.py benchmarks/<run>.json"""

from __future__ import annotations

import json
import sys

from convgen.runtime.bench import BenchResult, format_table


def main(path: str) -> None:
    with open(path) as f:
        results = [BenchResult.from_dict(d) for d in json.load(f)]
    print("\n".join(format_table(results)))


if __name__ == "__main__":
    main(sys.argv[1])
