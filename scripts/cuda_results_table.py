"""Markdown table of `convgen measure` results (DIR/results.json files): the best
candidate per kernel against cuDNN (TF32 off, and on for float32), with geometric
means. Usage: python scripts/cuda_results_table.py DIR/results.json [...]"""

from __future__ import annotations

import json
import sys

from convgen.runtime.timing import geomean
from convgen.tuning.measure import fastest_row


def main(paths: list[str]) -> None:
    print("| kernel | convgen ms | schedule | cuDNN ms | vs cuDNN | cuDNN+TF32 ms | vs TF32 |")
    print("|---|---|---|---|---|---|---|")
    ratios: dict[str, list[float]] = {"cudnn": [], "cudnn_tf32": []}
    device = ""
    for path in paths:
        with open(path) as f:
            results = json.load(f)
        device = results.get("device", device)
        for name, entry in results["specs"].items():
            best = fastest_row(entry["candidates"])
            if best is None:
                print(f"| {name} | - | no working candidate | | | | |")
                continue
            ms = best["median_ms"]
            peers = entry.get("peers_ms", {})
            cells = [name, f"{ms:.4f}", best["template"]]
            for key in ("cudnn", "cudnn_tf32"):
                if key in peers:
                    ratios[key].append(peers[key] / ms)
                    cells += [f"{peers[key]:.4f}", f"{peers[key] / ms:.2f}x"]
                else:
                    cells += ["-", "-"]
            print("| " + " | ".join(cells) + " |")
    for key, rs in ratios.items():
        if rs:
            print(f"\ngeometric mean vs {key}: {geomean(rs):.2f}x over {len(rs)} kernels "
                  f"(worst {min(rs):.2f}x) on {device}")


if __name__ == "__main__":
    main(sys.argv[1:])
