"""The RESULTS table of bench/knowledge_fashion.sh: per variant, mean ± std over seeds of the Fashion-MNIST
class-level and hypernym-level zero-shot top-1, the many-label hypernym mAP (RUN/diagnostics.json, written by
bench/knowledge_diagnostics.py) and the median training throughput.

    python bench/knowledge_fashion_table.py [RUNS_DIR [REFERENCE ...]]   (default runs/kclip clip)

Each REFERENCE variant (default clip) gets the paired tables: every other variant against it, seed by seed.
"""

from __future__ import annotations

import json
import math
import re
import statistics
import sys
from collections import defaultdict
from pathlib import Path

from kclip_ds.knowledge.fashion import CLASSES

CLASS_GROUP = {c.name: c.group for c in CLASSES}


def throughput(run: Path) -> float:
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return statistics.median(r["samples_per_s"] for r in rows if r["kind"] == "train" and r["step"] > 20)


def mean_sd(values: list[float], digits: int = 1) -> str:
    """'m ± sd' over seeds ('m' for one seed, '' for none)."""
    if not values:
        return ""
    return f"{statistics.mean(values):.{digits}f}" + (f" ± {statistics.stdev(values):.{digits}f}" if len(values) > 1
                                                      else "")


def diagnostic_metrics(row: dict) -> dict[str, float]:
    """The figures of one knowledge_diagnostics.py row that the tables use (older rows lack some)."""
    out = {"ancestor_map": row["ancestor_map"]}
    for split in ("test", "val"):
        if f"class_right_{split}" in row:
            out[f"right_{split}"] = row[f"class_right_{split}"]
    if "class_confusion" in row:
        group = [CLASS_GROUP[name] for name in row["class_top1_per_class"]]
        confusion = row["class_confusion"]
        pairs = [(i, j) for i in range(len(group)) for j in range(len(group)) if i != j]
        out |= {"image_knn": row["image_knn_top1"] * 100,
                "errors_same_group": sum(confusion[i][j] for i, j in pairs if group[i] == group[j]),
                "errors_other_group": sum(confusion[i][j] for i, j in pairs if group[i] != group[j]),
                "tshirt_as_shirt": confusion[0][6], "shirt_as_tshirt": confusion[6][0],
                "image_cos_same_group": row["image_cos_same_group"],
                "image_cos_other_group": row["image_cos_other_group"]}
    return out


def main(root: str = "runs/kclip", *references: str) -> int:
    by_variant: dict[str, list[tuple[int, dict, float]]] = defaultdict(list)
    for done in sorted(Path(root).glob("*_s[0-9]*/done.json")):
        variant, seed = re.fullmatch(r"(.+)_s(\d+)", done.parent.name).groups()
        metrics = json.loads(done.read_text())["final"]["metrics"]
        diagnostics = done.parent / "diagnostics.json"
        if diagnostics.exists():
            metrics = {**metrics, **diagnostic_metrics(json.loads(diagnostics.read_text())["rows"][0])}
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
    print("\nWhere the class task is lost (knowledge_diagnostics.py, 10,000 test images; mean ± sd over seeds):\n")
    columns = {"image_knn": "image 10-NN top-1", "errors_same_group": "errors within a group",
               "errors_other_group": "errors across groups", "tshirt_as_shirt": "T-shirt → shirt",
               "shirt_as_tshirt": "shirt → T-shirt", "image_cos_same_group": "image cos, same group",
               "image_cos_other_group": "image cos, other group"}
    print("| variant | seeds | " + " | ".join(columns.values()) + " |")
    print("|---|---|" + "---|" * len(columns))
    for variant, runs in by_variant.items():
        with_diag = [(s, m) for s, m, _ in runs if "image_knn" in m]
        if with_diag:
            cells = [mean_sd([m[k] for _, m in with_diag], digits=0 if k.startswith("errors") or "shirt" in k else
                             (1 if k == "image_knn" else 3)) for k in columns]
            print(f"| {variant} | {','.join(str(s) for s, _ in with_diag)} | " + " | ".join(cells) + " |")
    for reference in references or ("clip",):
        paired_table(by_variant, reference)
    return 0


def paired_table(by_variant: dict[str, list[tuple[int, dict, float]]], reference: str) -> None:
    """Per-seed differences against the reference run of the same seed (mean ± sd over the shared seeds):
    the comparison the kclipadd* variants are built for, whose pair rows equal clip_sN's step for step."""
    base = {seed: m for seed, m, _ in by_variant.get(reference, [])}
    keys = {"class (test)": ("zeroshot/top1", 100), "class (val)": ("zeroshot_val/top1", 100),
            "image 10-NN": ("image_knn", 1), "ancestor mAP": ("ancestor_map", 100)}
    print(f"\nPaired with {reference} (same seed; variant − {reference}, mean ± sd over seeds, per seed):\n")
    print("| variant | seeds | " + " | ".join(f"Δ {k}" for k in keys) + " |")
    print("|---|---|" + "---|" * len(keys))
    for variant, runs in by_variant.items():
        shared = [(seed, m) for seed, m, _ in runs if seed in base and variant != reference]
        if not shared:
            continue
        cells = []
        for key, factor in keys.values():
            deltas = [(m[key] - base[seed][key]) * factor for seed, m in shared if key in m and key in base[seed]]
            cells.append(f"{mean_sd(deltas, 2)} ({' / '.join(f'{d:+.2f}' for d in deltas)})" if deltas else "")
        print(f"| {variant} | {','.join(str(seed) for seed, _ in shared)} | " + " | ".join(cells) + " |")
    mcnemar_table(by_variant, base, reference)


def mcnemar(right: str, reference: str) -> tuple[float, float]:
    """(Δ, SE) in points of accuracy between two classifiers scored on the same images ("0"/"1" per image):
    Δ = (b − c)/n with b, c the images only one of them gets right; SE of the paired difference, so the
    spread that the finite split alone would give (McNemar), not the training noise across seeds."""
    assert len(right) == len(reference), "the two runs were scored on different images"
    n = len(right)
    b = sum(x == "1" and y == "0" for x, y in zip(right, reference))
    c = sum(x == "0" and y == "1" for x, y in zip(right, reference))
    delta = (b - c) / n
    return 100 * delta, 100 * math.sqrt(max((b + c) / n - delta ** 2, 0.0) / n)


def mcnemar_table(by_variant: dict[str, list[tuple[int, dict, float]]], base: dict[int, dict],
                  reference: str) -> None:
    """Per seed, Δ class top-1 ± its per-image SE, on the 10,000 test and the 5,000 val images."""
    rows = []
    for variant, runs in by_variant.items():
        if variant == reference:
            continue
        cells = []
        for split in ("test", "val"):
            key = f"right_{split}"
            pairs = [mcnemar(m[key], base[seed][key]) for seed, m, _ in runs
                     if seed in base and key in m and key in base[seed]]
            if pairs:
                mean = statistics.mean(d for d, _ in pairs)
                cells.append(f"{mean:+.2f} (SE ≤ {max(se for _, se in pairs):.2f}; "
                             + " / ".join(f"{d:+.2f} ± {se:.2f}" for d, se in pairs) + ")")
        if len(cells) == 2:
            rows.append(f"| {variant} | " + " | ".join(cells) + " |")
    if rows:
        print(f"\nPaired per image with {reference} (McNemar: mean Δ over seeds, the largest per-image SE, per seed Δ ± SE):\n")
        print("| variant | Δ class top-1, test | Δ class top-1, val |\n|---|---|---|")
        print("\n".join(rows))


if __name__ == "__main__":
    sys.exit(main(*sys.argv[1:]))
