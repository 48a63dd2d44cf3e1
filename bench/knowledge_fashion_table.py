"""The RESULTS table of bench/knowledge_fashion.sh: per variant, mean ± std over seeds of the Fashion-MNIST
class-level and hypernym-level zero-shot top-1, the many-label hypernym mAP (RUN/diagnostics.json, written by
bench/knowledge_diagnostics.py) and the median training throughput.

    python bench/knowledge_fashion_table.py [RUNS_DIR]        (default runs/kclip)
"""

from __future__ import annotations

import json
import re
import statistics
import sys
from collections import defaultdict
from pathlib import Path


def throughput(run: Path) -> float:
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return statistics.median(r["samples_per_s"] for r in rows if r["kind"] == "train" and r["step"] > 20)


def mean_sd(values: list[float]) -> str:
    """'m ± sd' over seeds ('m' for one seed, '' for none)."""
    if not values:
        return ""
    return f"{statistics.mean(values):.1f}" + (f" ± {statistics.stdev(values):.1f}" if len(values) > 1 else "")


def main(root: str = "runs/kclip") -> int:
    by_variant: dict[str, list[tuple[int, dict, float]]] = defaultdict(list)
    for done in sorted(Path(root).glob("*_s[0-9]*/done.json")):
        variant, seed = re.fullmatch(r"(.+)_s(\d+)", done.parent.name).groups()
        metrics = json.loads(done.read_text())["final"]["metrics"]
        diagnostics = done.parent / "diagnostics.json"
        if diagnostics.exists():
            metrics = {**metrics, "ancestor_map": json.loads(diagnostics.read_text())["rows"][0]["ancestor_map"]}
        by_variant[variant].append((int(seed), metrics, throughput(done.parent)))
    print("| variant | seeds | class top-1 (test) | class top-1 (val) | hypernym top-1 (per seed) | hypernym mean "
          "| ancestor mAP | samples/s |")
    print("|---|---|---|---|---|---|---|---|")
    for variant, runs in by_variant.items():
        cls = [m["zeroshot/top1"] * 100 for _, m, _ in runs]
        val = [m["zeroshot_val/top1"] * 100 for _, m, _ in runs if "zeroshot_val/top1" in m]
        hyp = [m["zeroshot_hypernym/top1"] * 100 for _, m, _ in runs]
        ancestor = [m["ancestor_map"] * 100 for _, m, _ in runs if "ancestor_map" in m]
        print(f"| {variant} | {','.join(str(s) for s, _, _ in runs)} | {mean_sd(cls)} | {mean_sd(val)} | "
              f"{' / '.join(f'{h:.1f}' for h in hyp)} | {statistics.mean(hyp):.1f} | {mean_sd(ancestor)} | "
              f"{statistics.median(t for *_, t in runs):.0f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main(*sys.argv[1:]))
