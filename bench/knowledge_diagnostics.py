"""Where the hypernym zero-shot of a Fashion-MNIST × WordNet run comes from: confusion and tower geometry.

    python bench/knowledge_diagnostics.py RUN_DIR [RUN_DIR ...] [--data data/fashion] [--limit 2000] [--out d.json]

For each run (final checkpoint, scored through the method's encode path like kclip-eval):
- ``val_class_top1``: the class task on pairs/val (held-out train images), the split for choices;
- ``confusion``: rows = true hypernym group (clothing / footwear / container), columns = predicted group, on the
  first ``--limit`` test images;
- ``text_nearest``: for each group's zero-shot prompt embedding, the cosine to each class prompt — does the text
  tower put "a photo of footwear." near "a photo of a sandal."?
- ``prompt_cos_same_group`` / ``…_other_group`` and ``image_cos_…``: mean cosine between two classes' prompts
  (or class-mean images) in the same hypernym group / in different groups;
- ``image_knn_top1``: the class task from the image tower alone (10-NN among the val images' embeddings);
- ``class_top1_per_class`` and ``class_confusion`` (rows = true class): where the class task gains or loses;
- ``image_to_group``: per class, the group whose prompt is nearest to the class's mean image embedding;
- ``class_right_test`` / ``class_right_val``: per image, whether the class prediction is right ("0"/"1" in split
  order), for paired (McNemar) comparisons of two runs on the same images (knowledge_fashion_table.py);
- ``ancestor_map``: the many-label hypernym task (kclip_ds.knowledge.fashion.ancestor_labels — every WordNet
  ancestor of the classes (each one a KG entity) that holds some classes but not all, and no caption names): per label,
  the average precision of ranking the images by their cosine to the label's prompt (templates averaged), and
  the mean over labels; ``ancestor_map_chance`` is what a random ranking scores (the mean positive rate).
A measurement, not a test; always exits 0.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

from kclip_ds.data.pipeline import eval_batches
from kclip_ds.data.transforms import SampleDecoder
from kclip_ds.eval.model import load_eval_model
from kclip_ds.eval.zeroshot import build_classifier, load_classes
from kclip_ds.knowledge.fashion import CLASSES, HYPERNYM_GROUPS, HYPERNYM_TEMPLATES, ancestor_labels
from kclip_ds.knowledge.kg import load_wordnet

KNN = 10


def average_precision(scores: torch.Tensor, positive: torch.Tensor) -> float:
    """AP of ranking by ``scores`` (descending) with ``positive`` [N] bool as the relevant items."""
    hits = positive[scores.argsort(descending=True)].float()
    precision = hits.cumsum(0) / torch.arange(1, len(hits) + 1)
    return float((precision * hits).sum() / hits.sum().clamp(min=1))


def bits(right: torch.Tensor) -> str:
    return "".join("1" if x else "0" for x in right.tolist())


@torch.no_grad()
def diagnose(run: Path, data: Path, limit: int, ancestors: dict[str, list[int]]) -> dict:
    model = load_eval_model(run, device="cpu")
    towers = model.towers

    def encode_text(tokens: torch.Tensor) -> torch.Tensor:
        return model.encode(None, tokens)["text_features"]

    hyper_spec = str(data / "zeroshot_hypernym/{000000..000009}.tar")
    class_spec = str(data / "zeroshot/{000000..000009}.tar")
    groups, group_templates = load_classes(hyper_spec)
    classes, class_templates = load_classes(class_spec)
    group_w = build_classifier(encode_text, towers.tokenizer, groups, group_templates, model.device)
    class_w = build_classifier(encode_text, towers.tokenizer, classes, class_templates, model.device)

    decoder = SampleDecoder(towers.preprocess_val, towers.tokenizer, towers.image_size, towers.context_length,
                            with_labels=True)
    images, class_labels, group_labels = [], [], []
    for hyper, cls in zip(eval_batches(hyper_spec, decoder, rank=0, world_size=1, batch_size=250, num_workers=0,
                                       name="hypernym"),
                          eval_batches(class_spec, decoder, rank=0, world_size=1, batch_size=250,
                                       num_workers=0, name="class")):
        assert hyper.keys == cls.keys, "the two zero-shot splits must hold the same images in the same order"
        rows = hyper.valid
        images.append(F.normalize(model.encode(hyper.images[rows], None)["image_features"].float(), dim=-1))
        group_labels.append(hyper.labels[rows])
        class_labels.append(cls.labels[rows])
        if sum(len(x) for x in images) >= limit:
            break
    v, g, c = torch.cat(images)[:limit], torch.cat(group_labels)[:limit], torch.cat(class_labels)[:limit]
    predicted = (v @ group_w.T).argmax(1)
    confusion = torch.zeros(len(groups), len(groups), dtype=torch.long)
    confusion.index_put_((g, predicted), torch.ones_like(g), accumulate=True)
    text_nearest = {group: {cls: round(float(group_w[i] @ class_w[j]), 3) for j, cls in enumerate(classes)}
                    for i, group in enumerate(groups)}
    image_to_group = {}
    for j, cls in enumerate(classes):
        mean = F.normalize(v[c == j].mean(0), dim=-1)
        image_to_group[cls] = groups[int((group_w @ mean).argmax())]
    class_predicted = (v @ class_w.T).argmax(1)
    class_confusion = torch.zeros(len(classes), len(classes), dtype=torch.long)
    class_confusion.index_put_((c, class_predicted), torch.ones_like(c), accumulate=True)
    ancestor_w = build_classifier(encode_text, towers.tokenizer, list(ancestors), list(HYPERNYM_TEMPLATES),
                                  model.device)
    ancestor_ap, chance = {}, []
    for (name, members), w in zip(ancestors.items(), ancestor_w):
        positive = torch.isin(c, torch.tensor(members))
        ancestor_ap[name] = round(average_precision(v @ w, positive), 4)
        chance.append(float(positive.float().mean()))
    val_spec = str(data / "pairs/val/{000000..000004}.tar")  # held-out train images: the split for choices
    # Sibling geometry: mean cosine between class prompts (and between class-mean images) of the same hypernym
    # group vs of different groups.  Learning "t-shirt and shirt are both clothing" can pull exactly these together.
    group_names = {c.name: HYPERNYM_GROUPS[c.group] for c in CLASSES}
    group_of = torch.tensor([groups.index(group_names[cls]) for cls in classes])
    centroids = F.normalize(torch.stack([v[c == j].mean(0) for j in range(len(classes))]), dim=-1)
    same = (group_of[:, None] == group_of[None, :]) & ~torch.eye(len(classes), dtype=torch.bool)
    other = group_of[:, None] != group_of[None, :]
    sibling = {f"{kind}_cos_{name}": round(float((x @ x.T)[mask].mean()), 4)
               for kind, x in (("prompt", class_w), ("image", centroids)) for name, mask in (("same_group", same),
                                                                                           ("other_group", other))}
    val_images, val_labels = [], []
    for batch in eval_batches(val_spec, decoder, rank=0, world_size=1, batch_size=250, num_workers=0, name="val"):
        val_images.append(F.normalize(model.encode(batch.images[batch.valid], None)["image_features"].float(), dim=-1))
        val_labels.append(batch.labels[batch.valid])
    val_v, val_c = torch.cat(val_images), torch.cat(val_labels)
    # The image tower alone: 10-NN vote among the val images (cosine), no text involved.  If it holds while the
    # zero-shot figure drops, the class loss sits in where the prompts land, not in the image geometry.
    nearest = val_c[(v @ val_v.T).topk(KNN, dim=1).indices]
    knn = torch.nn.functional.one_hot(nearest, len(classes)).sum(1).argmax(1)
    val_right = (val_v @ class_w.T).argmax(1) == val_c
    return {"run": run.name, "n": len(v), "val_class_top1": float(val_right.float().mean()),
            # per image, in split order: "1" where the class prediction is right (paired tests between runs)
            "class_right_test": bits(class_predicted == c), "class_right_val": bits(val_right),
            "image_knn_top1": float((knn == c).float().mean()), **sibling,
            "hypernym_top1": float((predicted == g).float().mean()),
            "class_top1": float((class_predicted == c).float().mean()),
            "class_top1_per_class": {cls: round(float((class_predicted[c == j] == j).float().mean()), 4)
                                     for j, cls in enumerate(classes)},
            "class_confusion": class_confusion.tolist(),
            "ancestor_map": sum(ancestor_ap.values()) / len(ancestor_ap), "ancestor_map_chance": sum(chance) / len(chance),
            "ancestor_ap": ancestor_ap,
            "confusion": confusion.tolist(), "text_nearest": text_nearest, "image_to_group": image_to_group}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("runs", nargs="+", type=Path)
    parser.add_argument("--data", type=Path, default=Path("data/fashion"))
    parser.add_argument("--limit", type=int, default=2000)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args(argv)
    # Every ancestor of a class synset is a KG entity by construction (fashion_graph keeps the hypernym chains up
    # to entity.n.01, docs/DATA.md), so no shard scan is needed to check it.
    ancestors = ancestor_labels(load_wordnet())
    rows = []
    for run in args.runs:
        r = diagnose(run, args.data, args.limit, ancestors)
        rows.append(r)
        print(f"{r['run']}: n {r['n']}  val class top-1 {r['val_class_top1']:.3f}  class top-1 {r['class_top1']:.3f}  "
              f"image 10-NN {r['image_knn_top1']:.3f}  hypernym top-1 {r['hypernym_top1']:.3f}  ancestor mAP {r['ancestor_map']:.3f} "
              f"(chance {r['ancestor_map_chance']:.3f})  "
              f"confusion {r['confusion']}")
        for group, row in r["text_nearest"].items():
            print(f"    {group:<12} " + "  ".join(f"{k} {v:+.2f}" for k, v in row.items()))
        print(f"    class images → group: {r['image_to_group']}")
    if args.out:
        args.out.write_text(json.dumps({"command": " ".join(sys.argv), "rows": rows}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
