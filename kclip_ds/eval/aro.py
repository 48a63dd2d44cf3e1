"""ARO (Yuksekgonul et al., ICLR 2023) as published: the four datasets' files and their metrics, no model.

The files are the ones mertyg/vision-language-models-are-bows (dataset_zoo/aro_datasets.py) reads::

    visual_genome_relation.json     [{"image_path", "bbox_x", "bbox_y", "bbox_w", "bbox_h",
                                      "true_caption", "false_caption", "relation_name"}, …]
    visual_genome_attribution.json  the same with "attributes": [a, b] instead of "relation_name"
    coco_karpathy_test.json         [{"image": "val2014/….jpg", "caption": [c1, …, c5]}, …]
    flickr30k_test.json             [{"image": "flickr30k-images/….jpg", "caption": [c1, …, c5]}, …]

A VG item's image is ``<images>/<image_path>`` cropped to (x, y, x + w, y + h), its options are
[false_caption, true_caption].  An Order item is one caption of an image; its options are the caption and
ARO's four perturbations of it (kclip_ds.knowledge.negatives), each passed through ``aro_pre_caption``.
ARO draws the perturbations from numpy's unseeded global RNG; here each item has its own RNG
(seed, image, caption index), so two evaluations of one checkpoint score the same options.

Scoring is pure (a score tensor + the items).  An item is correct when its true option beats every other
option by more than a tie tolerance (as in eval/structure.py: a bag-of-words tie is not a win).  An option
whose tokens equal the true option's is the same input to the model; ARO's argmax ranks such exact ties by
list position, so ``same_as_true`` options lose to a true caption listed before them (Order) and win over
one listed after them (VG).  Every loader error is one line naming the file and item and saying what to do.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from PIL import Image

from kclip_ds.knowledge.negatives import (
    ARO_MAX_WORDS,
    aro_pre_caption,
    negative_rng,
    shuffle_nouns_adjectives,
    shuffle_other_words,
    shuffle_trigrams,
    shuffle_within_trigrams,
)
from kclip_ds.knowledge.scene_graph import SPACY_MODEL

DATASETS = ("vg_relation", "vg_attribution", "coco_order", "flickr30k_order")
DEFAULT_FILES = {  # under --aro-root; each file's images default to a folder beside it (docs/EVAL.md)
    "vg_relation": "visual_genome_relation.json", "vg_attribution": "visual_genome_attribution.json",
    "coco_order": "coco/coco_karpathy_test.json", "flickr30k_order": "flickr30k/flickr30k_test.json"}
TIE_TOLERANCE = 1e-5  # eval/structure.py's swap_accuracy default
VGA_MIN_COUNT = 25  # ARO's VG_Attribution.evaluate_scores keeps attribute pairs with >= 25 items
# The relations ARO's paper leaves out of VG-Relation's macro accuracy (its release notebook's list; 157):
# the release JSON keeps their items.  Also ../shared/data/aro_vg_relation_dropped.json.
ARO_DROPPED_RELATIONS = frozenset({
    "adjusting", "attached to", "between", "bigger than", "biting", "boarding", "brushing", "chewing",
    "cleaning", "climbing", "close to", "coming from", "coming out of", "contain", "crossing", "dragging",
    "draped over", "drinking", "drinking from", "driving", "driving down", "driving on", "eating from",
    "eating in", "enclosing", "exiting", "facing", "filled with", "floating in", "floating on", "flying",
    "flying above", "flying in", "flying over", "flying through", "full of", "going down", "going into",
    "going through", "grazing in", "growing in", "growing on", "guiding", "hanging from", "hanging in",
    "hanging off", "hanging over", "higher than", "holding onto", "hugging", "in between", "jumping off",
    "jumping on", "jumping over", "kept in", "larger than", "leading", "leaning over", "leaving", "licking",
    "longer than", "looking in", "looking into", "looking out", "looking over", "looking through",
    "lying next to", "lying on top of", "making", "mixed with", "mounted on", "moving", "on the back of",
    "on the edge of", "on the front of", "on the other side of", "opening", "painted on", "parked at",
    "parked beside", "parked by", "parked in", "parked in front of", "parked near", "parked next to",
    "perched on", "petting", "piled on", "playing", "playing in", "playing on", "playing with", "pouring",
    "reaching for", "reading", "reflected on", "riding on", "running in", "running on", "running through",
    "seen through", "sitting behind", "sitting beside", "sitting by", "sitting in front of", "sitting near",
    "sitting next to", "sitting under", "skiing down", "skiing on", "sleeping in", "sleeping on",
    "smiling at", "sniffing", "splashing", "sprinkled on", "stacked on", "standing against",
    "standing around", "standing behind", "standing beside", "standing in front of", "standing near",
    "standing next to", "staring at", "stuck in", "surrounding", "swimming in", "swinging", "talking to",
    "topped with", "touching", "traveling down", "traveling on", "tying", "typing on", "underneath",
    "wading in", "waiting for", "walking across", "walking by", "walking down", "walking next to",
    "walking through", "working in", "working on", "worn on", "wrapped around", "wrapped in", "by", "of",
    "near", "next to", "with", "beside", "on the side of", "around",
})

PosTags = list[tuple[str, str]]
PosTagger = Callable[[list[str]], list["PosTags | None"]]  # captions → (token, Penn tag) lists; None: unknown


class AroDataError(ValueError):
    """A user-facing problem with an ARO file or image (one line: file, item, what to do)."""


@dataclass(frozen=True)
class AroItem:
    image: Path  # the image file
    crop: tuple[float, float, float, float] | None  # PIL box (x, y, x + w, y + h); VG crops, Order does not
    captions: tuple[str, ...]  # the options in ARO's order
    true_index: int  # 1 for VG ([false, true]), 0 for Order ([true, 4 perturbations])
    group: str = ""  # VG-Relation: relation_name; VG-Attribution: "{a}_{b}"; Order: ""
    source: str = field(default="", compare=False)  # "<file>: item 12": where an error points


@dataclass
class AroResult:
    metrics: dict[str, float]  # accuracies in [0, 1]; NaN when nothing is left to average
    counts: dict[str, int]
    per_group: dict[str, dict[str, float]] = field(default_factory=dict)  # group → {"acc", "count"}


# ---------------------------------------------------------------------------------------------- loading

def read_item_list(path: Path, dataset: str) -> list[Any]:
    """The JSON list of a dataset file (``json.load`` only: nothing is ever unpickled)."""
    if not path.is_file():
        raise AroDataError(f"{path}: file not found; put ARO's {DEFAULT_FILES[dataset].split('/')[-1]} there "
                           f"(layout in docs/EVAL.md) or pass --{dataset.replace('_', '-')}-file PATH")
    try:
        items = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise AroDataError(f"{path}: not valid JSON ({str(exc).splitlines()[0]}); re-download it") from exc
    if not isinstance(items, list):
        raise AroDataError(f"{path}: expected a JSON list of items, got {type(items).__name__}; "
                           f"is this ARO's {dataset} file?")
    return items


def read_relation_list(path: str | Path) -> frozenset[str]:
    """A drop list for VG-Relation's macro accuracy: a JSON list of relation names."""
    path = Path(path)
    try:
        names = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise AroDataError(f"--dropped-relations {path}: cannot be read as JSON ({exc.__class__.__name__}); "
                           f"give a JSON list of relation names") from exc
    if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
        raise AroDataError(f"--dropped-relations {path}: expected a JSON list of relation names")
    return frozenset(names)


def _field(item: Any, key: str, types: type | tuple[type, ...], path: Path, index: int) -> Any:
    if not isinstance(item, dict):
        raise AroDataError(f"{path}: item {index} is a {type(item).__name__}, not an object; re-download it")
    if key not in item:
        raise AroDataError(f"{path}: item {index}: missing key '{key}' (keys there: "
                           f"{', '.join(sorted(item))}); not ARO's published format — re-download the file")
    value = item[key]
    if not isinstance(value, types) or isinstance(value, bool):
        raise AroDataError(f"{path}: item {index}: '{key}' is {type(value).__name__} {value!r}, expected "
                           f"{'a number' if types == (int, float) else getattr(types, '__name__', types)}")
    return value


def _image(root: Path, name: str, path: Path, index: int, seen: set[Path], option: str) -> Path:
    image = root / name
    if image not in seen:
        if not image.is_file():
            raise AroDataError(f"{path}: item {index}: image {image} not found; unpack the dataset's images "
                               f"under {root} or pass {option} DIR")
        seen.add(image)
    return image


def load_vg(path: str | Path, images: str | Path, dataset: str = "vg_relation") -> list[AroItem]:
    """VG-Relation or VG-Attribution items: the image cropped to its bbox, options [false, true]."""
    path, root = Path(path), Path(images)
    if dataset not in ("vg_relation", "vg_attribution"):
        raise ValueError(f"load_vg reads vg_relation or vg_attribution, not {dataset!r}")
    out, seen = [], set()
    for i, item in enumerate(read_item_list(path, dataset)):
        x, y, w, h = (_field(item, f"bbox_{k}", (int, float), path, i) for k in "xywh")
        if w <= 0 or h <= 0:
            raise AroDataError(f"{path}: item {i}: empty bbox (w={w}, h={h}); fix or drop the item")
        true, false = (_field(item, k, str, path, i) for k in ("true_caption", "false_caption"))
        if dataset == "vg_relation":
            group = _field(item, "relation_name", str, path, i)
        else:
            attributes = _field(item, "attributes", list, path, i)
            if len(attributes) != 2 or not all(isinstance(a, str) for a in attributes):
                raise AroDataError(f"{path}: item {i}: 'attributes' must be a list of two strings, got "
                                   f"{attributes!r}")
            group = f"{attributes[0]}_{attributes[1]}"
        image = _image(root, _field(item, "image_path", str, path, i), path, i, seen, "--vg-images")
        out.append(AroItem(image, (x, y, x + w, y + h), (false, true), 1, group, f"{path}: item {i}"))
    return out


def order_options(caption: str, pos_tags: PosTags, rng, max_words: int = ARO_MAX_WORDS) -> tuple[str, ...]:
    """[caption, nouns/adjectives shuffled, other words shuffled, within-trigram shuffle, trigram shuffle],
    each perturbing the raw caption and then ``aro_pre_caption``-ed, as ARO's COCO_Order builds them."""
    perturbed = (shuffle_nouns_adjectives(caption, pos_tags, rng, max_words=None),
                 shuffle_other_words(caption, pos_tags, rng, max_words=None),
                 shuffle_within_trigrams(caption, rng, max_words=None),
                 shuffle_trigrams(caption, rng, max_words=None))
    return tuple(aro_pre_caption(c, max_words) for c in (caption, *perturbed))


def load_order(path: str | Path, images: str | Path, tagger: PosTagger, dataset: str = "coco_order",
               seed: int = 0, max_words: int = ARO_MAX_WORDS) -> list[AroItem]:
    """COCO-Order / Flickr30k-Order items, one per caption of a Karpathy split file; images under ``images``.

    ``tagger`` gives the POS tags the noun/adjective perturbations need (ARO: spaCy en_core_web_sm)."""
    path, root = Path(path), Path(images)
    option = f"--{dataset.split('_')[0]}-images"
    entries, seen = [], set()
    for i, ann in enumerate(read_item_list(path, dataset)):
        image_name = _field(ann, "image", str, path, i)
        captions = _field(ann, "caption", list, path, i)
        image = _image(root, image_name, path, i, seen, option)
        for j, caption in enumerate(captions):
            if not isinstance(caption, str):
                raise AroDataError(f"{path}: item {i}: caption {j} is {type(caption).__name__}, not a string")
            entries.append((i, j, image_name, image, caption))
    tags = tagger([e[4] for e in entries])
    out = []
    for (i, j, image_name, image, caption), caption_tags in zip(entries, tags, strict=True):
        where = f"{path}: item {i} caption {j}"
        if caption_tags is None:
            raise AroDataError(f"{where}: no POS tags for {caption!r}; tag every caption of the file "
                               f"(--pos-tags FILE) or use spaCy (--spacy-model)")
        try:
            rng = negative_rng(f"{image_name}/{j}", 0, seed)
            options = order_options(caption, caption_tags, rng, max_words)
        except ValueError as exc:
            raise AroDataError(f"{where}: {exc}; the POS tagger's tokens must spell the caption") from exc
        out.append(AroItem(image, None, options, 0, "", where))
    return out


def spacy_pos_tagger(model: str = SPACY_MODEL) -> PosTagger:
    """spaCy's Penn tags (``token.tag_``), as ARO's perturbations use; parser and NER are not run.
    The default is the en_core_web_sm build that kclip_ds installs (the scene-graph parser's model)."""
    import spacy

    try:
        nlp = spacy.load(model, exclude=["parser", "ner", "lemmatizer"])
    except OSError as exc:
        raise AroDataError(f"spaCy model '{model}' cannot be loaded ({str(exc).splitlines()[0][:120]}); "
                           f"pass --spacy-model NAME|DIR of an installed pipeline, or --pos-tags FILE") from exc

    def tag(captions: list[str]) -> list[PosTags | None]:
        return [[(t.text, t.tag_) for t in doc] for doc in nlp.pipe(captions, batch_size=256)]
    return tag


def file_pos_tagger(path: str | Path) -> PosTagger:
    """Tags from a JSON file ``{caption: [[token, tag], …]}`` (e.g. made once with spaCy elsewhere)."""
    path = Path(path)
    try:
        table = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise AroDataError(f"--pos-tags {path}: cannot be read as JSON ({exc.__class__.__name__}); give a "
                           f"file {{caption: [[token, tag], …]}}") from exc
    if not isinstance(table, dict):
        raise AroDataError(f"--pos-tags {path}: expected an object {{caption: [[token, tag], …]}}")

    def tag(captions: list[str]) -> list[PosTags | None]:
        return [None if c not in table else [(str(t), str(g)) for t, g in table[c]] for c in captions]
    return tag


def dataset_paths(dataset: str, aro_root: str | Path | None, file: str | Path | None = None,
                  images: str | Path | None = None) -> tuple[Path, Path]:
    """(file, image root): ``file`` defaults to ``<aro_root>/DEFAULT_FILES[dataset]``, images to ARO's layout:
    ``images/`` beside a VG file, the folder of a Karpathy file (whose "image" names start with val2014/…)."""
    if dataset not in DATASETS:
        raise AroDataError(f"unknown dataset {dataset!r}; choose from {', '.join(DATASETS)}")
    if file is None:
        if aro_root is None:
            raise AroDataError(f"{dataset}: pass --aro-root DIR or --{dataset.replace('_', '-')}-file PATH")
        file = Path(aro_root) / DEFAULT_FILES[dataset]
    file = Path(file)
    if images is None:
        images = file.parent / "images" if dataset.startswith("vg_") else file.parent
    return file, Path(images)


def load_dataset(dataset: str, file: str | Path, images: str | Path, tagger: PosTagger | None = None,
                 seed: int = 0) -> list[AroItem]:
    """The items of one of :data:`DATASETS`; the Order sets need ``tagger``."""
    if dataset.startswith("vg_"):
        return load_vg(file, images, dataset)
    if tagger is None:
        raise ValueError(f"{dataset} needs a POS tagger")
    return load_order(file, images, tagger, dataset, seed)


def load_item_image(item: AroItem) -> Image.Image:
    """The RGB image an item is scored on: ARO's ``Image.open(…).convert('RGB').crop(bbox)`` for VG."""
    with Image.open(item.image) as img:
        image = img.convert("RGB")
    return image.crop(item.crop) if item.crop is not None else image


# ---------------------------------------------------------------------------------------------- scoring

def correct_options(scores: torch.Tensor, true_index: torch.Tensor, same_as_true: torch.Tensor | None = None,
                    tie_tolerance: float = TIE_TOLERANCE) -> torch.Tensor:
    """scores [N, K] (image · option), true_index [N] int64, same_as_true [N, K] bool → correct [N] bool.

    Correct: the true option scores above every other option by more than ``tie_tolerance``; an option the
    model sees as identical (``same_as_true``) is ranked by list position instead, as ARO's argmax does."""
    n, k = scores.shape
    assert true_index.shape == (n,), f"true_index must be [{n}], got {tuple(true_index.shape)}"
    true_index = true_index.to(torch.long)[:, None]
    beats = scores.gather(1, true_index) > scores + tie_tolerance
    position = torch.arange(k)[None, :]
    if same_as_true is not None:
        assert same_as_true.shape == (n, k), f"same_as_true {tuple(same_as_true.shape)} != scores [{n}, {k}]"
        beats = torch.where(same_as_true, position > true_index, beats)
    return (beats | (position == true_index)).all(dim=1)


def group_accuracy(correct: torch.Tensor, groups: Sequence[str]) -> dict[str, tuple[float, int]]:
    """{group: (accuracy, items)}, groups sorted (ARO's np.unique order)."""
    assert len(groups) == correct.shape[0], f"{len(groups)} groups for {correct.shape[0]} items"
    tally: dict[str, list[int]] = {}
    for ok, group in zip(correct.tolist(), groups):
        t = tally.setdefault(group, [0, 0])
        t[0], t[1] = t[0] + int(ok), t[1] + 1
    return {g: (tally[g][0] / tally[g][1], tally[g][1]) for g in sorted(tally)}


def macro_accuracy(per_group: dict[str, tuple[float, int]], drop: frozenset[str] | set[str] = frozenset(),
                   min_count: int = 1) -> tuple[float, int]:
    """(mean of per-group accuracies over groups not in ``drop`` with >= ``min_count`` items, groups used)."""
    kept = [acc for g, (acc, n) in per_group.items() if g not in drop and n >= min_count]
    return (sum(kept) / len(kept) if kept else math.nan), len(kept)


def score_dataset(dataset: str, scores: torch.Tensor, items: Sequence[AroItem],
                  same_as_true: torch.Tensor | None = None, *, tie_tolerance: float = TIE_TOLERANCE,
                  dropped_relations: frozenset[str] | set[str] = ARO_DROPPED_RELATIONS,
                  vga_min_count: int = VGA_MIN_COUNT) -> AroResult:
    """ARO's numbers for one dataset, named ``{dataset}/…``:

    vg_relation:    macro_acc (relations not in ``dropped_relations``: the paper's), macro_acc_all, micro_acc
    vg_attribution: macro_acc (pairs with >= ``vga_min_count`` items: ARO's), macro_acc_all, micro_acc
    *_order:        acc (Precision@1 over all captions)
    """
    assert scores.shape[0] == len(items), f"scores {tuple(scores.shape)} for {len(items)} items"
    true_index = torch.tensor([it.true_index for it in items], dtype=torch.long)
    correct = correct_options(scores, true_index, same_as_true, tie_tolerance)
    n = len(items)
    identical = 0
    if same_as_true is not None:
        others = same_as_true.clone()
        others[torch.arange(n), true_index] = False
        identical = int(others.any(dim=1).sum())
    micro = int(correct.sum()) / n if n else math.nan
    counts = {f"{dataset}/num_items": n, f"{dataset}/num_items_with_identical_option": identical}
    if dataset.endswith("_order"):
        return AroResult({f"{dataset}/acc": micro}, counts)
    if dataset not in ("vg_relation", "vg_attribution"):
        raise ValueError(f"unknown ARO dataset {dataset!r} (known: {', '.join(DATASETS)})")
    per_group = group_accuracy(correct, [it.group for it in items])
    if dataset == "vg_relation":
        macro, kept = macro_accuracy(per_group, drop=dropped_relations)
        unit = "relations"
    else:
        macro, kept = macro_accuracy(per_group, min_count=vga_min_count)
        unit = "pairs"
    macro_all, _ = macro_accuracy(per_group)
    counts.update({f"{dataset}/num_{unit}": len(per_group), f"{dataset}/num_{unit}_kept": kept})
    return AroResult({f"{dataset}/macro_acc": macro, f"{dataset}/macro_acc_all": macro_all,
                      f"{dataset}/micro_acc": micro}, counts,
                     {g: {"acc": acc, "count": c} for g, (acc, c) in per_group.items()})
