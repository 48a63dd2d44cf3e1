"""Where do structure swaps fail: per kind and split, accuracy, margin and how far apart the towers put them.

    python bench/swap_diagnostics.py RUN_DIR [RUN_DIR ...] [--train-shard data/demo/train/000000.tar] [--out d.json]

For each run (final checkpoint, through the method's encode path as tools/eval_structure.py scores it) and each
split (val, and one train shard the run trained on, ≈1000 samples seen ≈6 times in the demo), per swap kind:
- ``acc``: v·c > v·c⁻ (the val number is the one in RESULTS; train vs val separates fitting from generalising);
- ``margin``: mean v·c − v·c⁻ (how decisively);
- ``text_cos``: mean cos(c, c⁻): how far apart the *text tower* puts a caption and its swap (1.0: cannot tell);
- ``image_gap``: mean |v·c − v·c⁻| / mean |v·c − v·c_other| — the swap gap relative to the gap to a random
  other caption of the batch (how much of its discriminative range the model spends on the swap).
A measurement, not a test; always exits 0.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
from open_clip.tokenizer import SimpleTokenizer

from kclip_ds.data.pipeline import eval_batches
from kclip_ds.data.transforms import SampleDecoder
from kclip_ds.eval.model import load_eval_model

KINDS = ("relation", "attribute")
WORDS = SimpleTokenizer()


@torch.no_grad()
def kind_stats(model, spec: str, kind: str, limit: int) -> dict[str, float]:
    towers = model.towers
    decoder = SampleDecoder(towers.preprocess_val, towers.tokenizer, towers.image_size, towers.context_length,
                            negative_kinds=(kind,))
    pos, neg, other, text_cos, swapped, sizes = [], [], [], [], [], []
    seen = 0
    for batch in eval_batches(spec, decoder, rank=0, world_size=1, batch_size=100, num_workers=0, name=spec):
        b = batch.to(model.device, torch.float32)
        out = model.encode(b.images, b.texts)
        v, c = out["image_features"].float(), out["text_features"].float()
        c_neg = model.encode(None, b.neg_texts)["text_features"].float()
        rows = (batch.valid & batch.neg_valid).to(v.device)
        pos.append((v * c).sum(-1)[rows])
        neg.append((v * c_neg).sum(-1)[rows])
        other.append((v * c.roll(1, dims=0)).sum(-1)[rows])
        text_cos.append(torch.nn.functional.cosine_similarity(c, c_neg, dim=-1)[rows])
        for i in rows.nonzero(as_tuple=True)[0].tolist():
            swapped.append(changed_words(batch.texts[i], batch.neg_texts[i]))
            sizes.append(swapped_size(batch.scene_graphs[i] if batch.scene_graphs else None, swapped[-1]))
        seen += int(rows.sum())
        if seen >= limit:
            break
    p, n, o, tc = (torch.cat(x) for x in (pos, neg, other, text_cos))
    wins = (p > n).tolist()
    by_change: dict[str, list[int]] = {}
    for win, change in zip(wins, swapped):
        by_change.setdefault(change, [0, 0])
        by_change[change][0] += int(win)
        by_change[change][1] += 1
    by_size: dict[str, list[int]] = {}
    for win, size in zip(wins, sizes):
        bucket = "?" if size is None else "<16px" if size < 16 else "16-19px" if size < 20 else ">=20px"
        by_size.setdefault(bucket, [0, 0])
        by_size[bucket][0] += int(win)
        by_size[bucket][1] += 1
    return {"n": int(p.numel()), "acc": float((p > n).float().mean()), "margin": float((p - n).mean()),
            "by_size": {k: (round(v[0] / v[1], 3), v[1]) for k, v in sorted(by_size.items())},
            "text_cos": float(tc.mean()), "image_gap": float((p - n).abs().mean() / (p - o).abs().mean()),
            "by_change": {k: v[0] / v[1] for k, v in sorted(by_change.items()) if v[1] >= 10},
            "by_change_n": {k: v[1] for k, v in sorted(by_change.items()) if v[1] >= 10}}


def swapped_size(graph: dict | None, change: str) -> int | None:
    """The smaller bbox side (px) of the two objects whose attributes a swap exchanged (None: unknown)."""
    words = change.split("+")
    if graph is None or len(words) != 2:
        return None
    boxes = [o["bbox"] for o in graph.get("objects", []) if set(o.get("attributes", [])) & set(words) and "bbox" in o]
    if len(boxes) != 2:
        return None
    return min(max(x1 - x0, y1 - y0) for x0, y0, x1, y1 in boxes)


def changed_words(a: torch.Tensor, b: torch.Tensor) -> str:
    """The token ids that differ between a caption and its swap, as a sorted pair key ("320+1746")."""
    diff = sorted({int(x) for x, y in zip(a.tolist(), b.tolist()) if x != y})
    return "+".join(WORDS.decode([i]).strip() for i in diff) if len(diff) == 2 else f"{len(diff)} tokens"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("runs", nargs="+", type=Path)
    parser.add_argument("--train-shard", default="data/demo/train/000000.tar")
    parser.add_argument("--limit", type=int, default=1000, help="samples per (split, kind)")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args(argv)
    rows = []
    for run in args.runs:
        model = load_eval_model(run, device="cpu")
        splits = {"val": model.cfg.data.val, "train": args.train_shard}
        for split, spec in splits.items():
            for kind in KINDS:
                rows.append({"run": run.name, "split": split, "kind": kind,
                             **kind_stats(model, spec, kind, args.limit)})
                r = rows[-1]
                print(f"{r['run']:<28}{split:>6}{kind:>10}  n {r['n']:>5}  acc {r['acc']:.3f}  margin "
                      f"{r['margin']:+.4f}  text_cos {r['text_cos']:.4f}  image_gap {r['image_gap']:.3f}", flush=True)
                if kind == "attribute":
                    print("    " + "  ".join(f"{k} {v:.2f}" for k, v in r["by_change"].items()))
                print(f"    by size of the swapped objects: {r['by_size']}")
    if args.out:
        args.out.write_text(json.dumps({"command": " ".join(sys.argv), "rows": rows}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
