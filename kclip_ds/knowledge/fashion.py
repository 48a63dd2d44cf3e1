"""Fashion-MNIST × WordNet: image–caption pairs, two zero-shot splits, and a knowledge graph linking them.

A small, fully local testbed for Knowledge-CLIP: the captions name only the 10 classes, while the
hypernym-level zero-shot split asks for labels ("clothing", "footwear", "a container") that no caption
contains — only the WordNet triplets connect them to the images.  Written by :func:`make_fashion_kg`::

    OUT/pairs/train/  pairs/val/      png + txt (+ cls, json); val = the last images of each class in
                                      Fashion's train file, held out from train (and from the triplets);
                                      its classes.json makes it the class zero-shot split for model choices
    OUT/zeroshot/                     Fashion's test split, the 10 classes; classes.json
    OUT/zeroshot_hypernym/            the same images, labelled with their WordNet ancestor group
    OUT/triplets/                     triplet shards (kclip_ds.knowledge.triplet_shards): WordNet around the
                                      class synsets + "train image — is an image of → class synset"
    OUT/fashion_kg.json               the tables below, the settings and the counts

Images stay 28×28, converted from grayscale to RGB (the model's transform resizes them).  Every split is
written with :func:`write_shard_set` (atomic, resumable, deterministic).
"""

from __future__ import annotations

import gzip
import hashlib
import json
import os
import re
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from kclip_ds.data.shards import atomic_write_text, encode_png, sha256_file
from kclip_ds.knowledge.kg import (
    IMAGE,
    Entity,
    KGError,
    KnowledgeGraph,
    load_wordnet,
    read_wordnet,
    wordnet_neighbourhood,
)
from kclip_ds.knowledge.triplet_shards import (
    NeighbourhoodConfig,
    ShardSetResult,
    write_shard_set,
    write_triplet_shards,
)

GENERATOR_ID = "kclip_ds.knowledge.fashion/v1"
FASHION_DIR = Path("/usr/share/datasets/fashion-mnist")
FASHION_APT = "apt-get install -y --no-install-recommends dataset-fashion-mnist"
SOURCE_FILES = {"train": ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"),
                "test": ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz")}
CLASSES_NAME = "classes.json"
SUMMARY_NAME = "fashion_kg.json"
IMAGE_RELATION = "is an image of"  # Knowledge-CLIP's fixed relation for image–text pairs cast as triplets


@dataclass(frozen=True)
class FashionClass:
    """A Fashion-MNIST label, the name used in captions, its WordNet 3.0 synset and its hypernym group."""

    label: str
    name: str
    synset: str
    group: str


#: Index = Fashion-MNIST label.  Synsets checked in WordNet 3.0 (glosses in docs/DATA.md): there is no
#: tee_shirt.n.01 — "T-shirt"/"tee_shirt" are lemmas of jersey.n.03; sneaker is gym_shoe.n.01 (sneaker.n.01
#: does not exist; the noun "sneaker" is also fink.n.01, an informer); bag.n.04 is the handbag/purse sense
#: (bag.n.01 is any flexible container, bag.n.06 a suitcase); no ankle-boot synset, boot.n.01 is the nearest.
CLASSES: tuple[FashionClass, ...] = (
    FashionClass("T-shirt/top", "t-shirt", "jersey.n.03", "clothing.n.01"),
    FashionClass("Trouser", "pair of trousers", "trouser.n.01", "clothing.n.01"),
    FashionClass("Pullover", "pullover", "pullover.n.01", "clothing.n.01"),
    FashionClass("Dress", "dress", "dress.n.01", "clothing.n.01"),
    FashionClass("Coat", "coat", "coat.n.01", "clothing.n.01"),
    FashionClass("Sandal", "sandal", "sandal.n.01", "footwear.n.02"),
    FashionClass("Shirt", "shirt", "shirt.n.01", "clothing.n.01"),
    FashionClass("Sneaker", "sneaker", "gym_shoe.n.01", "footwear.n.02"),
    FashionClass("Bag", "bag", "bag.n.04", "container.n.01"),
    FashionClass("Ankle boot", "ankle boot", "boot.n.01", "footwear.n.02"),
)
#: Hypernym group synset → zero-shot class name (index = label).  dress.n.01 sits under woman's_clothing,
#: not garment, so "clothing" is the lowest ancestor covering all six garments.
HYPERNYM_GROUPS: dict[str, str] = {"clothing.n.01": "clothing", "footwear.n.02": "footwear",
                                   "container.n.01": "a container"}
CAPTION_TEMPLATES = ("a photo of a {}.", "a black and white photo of a {}.", "a low resolution photo of a {}.",
                     "a grayscale image of a {}.", "a small photo of a {}.", "a centred photo of a {}.")
ZEROSHOT_TEMPLATES = CAPTION_TEMPLATES[:3]
#: Image triplets' own neighbourhood is empty (their only edge is the triplet), so the tail's is stored too.
TRIPLET_NEIGHBOURHOOD = NeighbourhoodConfig(hops=1, max_edges=8, tail=True)
HYPERNYM_TEMPLATES = ("a photo of {}.", "a black and white photo of {}.", "a low resolution photo of {}.")


def read_idx(path: str | os.PathLike) -> np.ndarray:
    """An IDX file (gzipped or not) as a uint8 array, e.g. [N, 28, 28] images or [N] labels."""
    path = Path(path)
    try:
        with (gzip.open if path.suffix == ".gz" else open)(path, "rb") as f:
            data = f.read()
    except FileNotFoundError:
        raise KGError(f"{path}: not found; install Fashion-MNIST: {FASHION_APT}") from None
    except (OSError, EOFError) as exc:
        raise KGError(f"{path}: unreadable ({exc}); reinstall dataset-fashion-mnist") from exc
    if len(data) < 4 or data[:3] != b"\x00\x00\x08" or not 1 <= data[3] <= 3:
        raise KGError(f"{path}: not a uint8 IDX file (bad magic number); reinstall dataset-fashion-mnist")
    ndim = data[3]
    dims = [int.from_bytes(data[4 + 4 * i:8 + 4 * i], "big") for i in range(ndim)]
    body = data[4 + 4 * ndim:]
    if len(body) != int(np.prod(dims)):
        raise KGError(f"{path}: header says {dims} ({int(np.prod(dims))} bytes) but holds {len(body)} bytes; "
                      "the file is truncated, reinstall dataset-fashion-mnist")
    return np.frombuffer(body, dtype=np.uint8).reshape(dims)


def load_fashion(source: str | os.PathLike = FASHION_DIR) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """``{"train": (images [60000, 28, 28], labels [60000]), "test": (… 10000 …)}`` from the IDX files."""
    splits = {}
    for split, (image_file, label_file) in SOURCE_FILES.items():
        images, labels = read_idx(Path(source) / image_file), read_idx(Path(source) / label_file)
        if images.ndim != 3 or labels.ndim != 1 or len(images) != len(labels):
            raise KGError(f"{source}: {image_file} {images.shape} and {label_file} {labels.shape} do not match; "
                          "reinstall dataset-fashion-mnist")
        if labels.size and labels.max() >= len(CLASSES):
            raise KGError(f"{Path(source) / label_file}: label {labels.max()} outside 0..{len(CLASSES) - 1}")
        splits[split] = (images, labels)
    return splits


def select_indices(labels: np.ndarray, per_class: int | None, skip_last: int = 0, last: bool = False) -> list[int]:
    """Indices into ``labels``, in file order: per class, drop (or with ``last`` keep only) its last
    ``skip_last`` images, then keep the first ``per_class`` (None: all)."""
    chosen = []
    for label in range(len(CLASSES)):
        idx = np.flatnonzero(labels == label).tolist()
        idx = (idx[len(idx) - skip_last:] if skip_last else []) if last else idx[:len(idx) - skip_last]
        chosen += idx[:per_class]
    return sorted(chosen)


def image_png(image: np.ndarray) -> bytes:
    """[28, 28] uint8 grayscale → PNG bytes of the RGB image (deterministic)."""
    return encode_png(Image.fromarray(image, mode="L").convert("RGB"))


def caption(seed: int, key: str, label: int) -> str:
    """One of :data:`CAPTION_TEMPLATES` for the class, picked by hashing ``(seed, key)``."""
    digest = hashlib.sha256(f"{GENERATOR_ID}|{seed}|{key}".encode()).digest()
    return CAPTION_TEMPLATES[int.from_bytes(digest[:8], "big") % len(CAPTION_TEMPLATES)].format(CLASSES[label].name)


def hypernym_terms(wordnet) -> list[str]:
    """Every lemma of the hypernym group synsets ("clothing", "article of clothing", "wear", "footgear" …):
    the words no caption may contain."""
    return sorted({n.replace("_", " ").lower() for g in HYPERNYM_GROUPS for n in wordnet.synset(g).lemma_names()})


def caption_leaks(captions: list[str], terms: list[str]) -> list[tuple[str, str]]:
    """(caption, term) for every caption that contains a term as a whole word (case-insensitive)."""
    patterns = [(t, re.compile(rf"\b{re.escape(t)}\b", re.IGNORECASE)) for t in terms]
    return [(c, t) for c in captions for t, p in patterns if p.search(c)]


def hypernym_ancestors(wordnet, synset: str) -> set[str]:
    """Every hypernym (and instance-hypernym) ancestor of ``synset``, transitively."""
    return {s.name() for s in wordnet.synset(synset).closure(lambda s: s.hypernyms() + s.instance_hypernyms())}


def ancestor_labels(wordnet, kg_entities: set[str] | None = None) -> dict[str, list[int]]:
    """The many-label hypernym task: every WordNet ancestor of the class synsets → the classes under it.

    Kept: ancestors that are entities of the KG (``kg_entities``; None = all), that leave out at least one
    class (``entity``, ``object`` … hold every image and rank nothing), and whose lemmas appear in no caption
    (``shirt`` is a class's own name).  Label text = the first lemma, "_" → " ".  With ≈ 12 labels scored by
    average precision, no single prompt swap decides the figure the way it does for the 3-group task."""
    ancestors = [hypernym_ancestors(wordnet, c.synset) for c in CLASSES]
    every_caption = [t.format(c.name) for t in CAPTION_TEMPLATES for c in CLASSES]
    labels = {}
    for synset in sorted(set().union(*ancestors)):
        members = [i for i, a in enumerate(ancestors) if synset in a]
        lemmas = [n.replace("_", " ").lower() for n in wordnet.synset(synset).lemma_names()]
        if ((kg_entities is None or synset in kg_entities) and len(members) < len(CLASSES)
                and not caption_leaks(every_caption, lemmas)):
            labels[lemmas[0]] = members
    return labels


def check_wordnet_links(wordnet) -> None:
    """Each class synset exists and its group is among its hypernym ancestors; no caption leaks a group term."""
    for cls in CLASSES:
        try:
            wordnet.synset(cls.synset)
        except Exception as exc:  # nltk raises its WordNetError, or ValueError for a malformed name
            raise KGError(f"{cls.label}: synset {cls.synset} not in this WordNet ({exc}); it must be WordNet 3.0 "
                          "(apt-get install wordnet-base)") from exc
        if cls.group not in hypernym_ancestors(wordnet, cls.synset):
            raise KGError(f"{cls.label}: {cls.group} is not a hypernym ancestor of {cls.synset} in this WordNet")
    every_caption = [t.format(c.name) for t in CAPTION_TEMPLATES for c in CLASSES]
    leaks = caption_leaks(every_caption, hypernym_terms(wordnet))
    if leaks:
        raise KGError(f"caption {leaks[0][0]!r} contains the hypernym label {leaks[0][1]!r}; change the template")


def _pair_sample(split: str, index: int, images: np.ndarray, labels: np.ndarray, seed: int) -> dict[str, Any]:
    key, label = f"{split}-{index:05d}", int(labels[index])
    meta = {"source": SOURCE_FILES[split][0], "index": index, "label": CLASSES[label].label,
            "synset": CLASSES[label].synset}
    return {"__key__": key, "png": image_png(images[index]), "txt": caption(seed, key, label), "cls": str(label),
            "json": json.dumps(meta, sort_keys=True)}


def _zeroshot_sample(index: int, images: np.ndarray, labels: np.ndarray, hypernym: bool) -> dict[str, Any]:
    cls = CLASSES[int(labels[index])]
    target = list(HYPERNYM_GROUPS).index(cls.group) if hypernym else int(labels[index])
    text = (HYPERNYM_TEMPLATES[0].format(HYPERNYM_GROUPS[cls.group]) if hypernym
            else ZEROSHOT_TEMPLATES[0].format(cls.name))
    meta = {"source": SOURCE_FILES["test"][0], "index": index, "label": cls.label, "synset": cls.synset,
            "group": cls.group}
    return {"__key__": f"test-{index:05d}", "png": image_png(images[index]), "txt": text, "cls": str(target),
            "json": json.dumps(meta, sort_keys=True)}


def fashion_graph(wordnet, images: np.ndarray, labels: np.ndarray, indices: list[int],
                  wordnet_hops: int = 2, drop_class_links: bool = False, class_text: str = "gloss") -> KnowledgeGraph:
    """WordNet around the class synsets (:func:`wordnet_neighbourhood`) + one image entity per train index,
    linked to its class synset by :data:`IMAGE_RELATION`.  Two interventions for bench/knowledge_fashion.sh,
    not defaults: ``drop_class_links`` leaves out the WordNet edges between two class synsets (jersey.n.03 —is
    a→ shirt.n.01 and its inverse, in WordNet 3.0), the facts that contradict the labels' partition;
    ``class_text="lemmas"`` words each class entity by its lemmas alone ("jersey, T-shirt, tee shirt"), without
    the gloss ("a close-fitting pullover shirt") that names a sibling class."""
    if class_text not in ("gloss", "lemmas"):
        raise KGError(f"class_text must be 'gloss' or 'lemmas', got {class_text!r}")
    kg = read_wordnet(wordnet, synsets=wordnet_neighbourhood(wordnet, [c.synset for c in CLASSES], wordnet_hops))
    synsets = {c.synset for c in CLASSES}
    links = [e for e in kg.edges if e.head in synsets and e.tail in synsets] if drop_class_links else []
    texts = ({s: ", ".join(n.replace("_", " ") for n in wordnet.synset(s).lemma_names()) for s in sorted(synsets)}
             if class_text == "lemmas" else {})
    if links or texts:
        kg = kg.edited(drop=links, texts=texts)
    kg.meta = {"source": "wordnet-3.0 + fashion-mnist train", "wordnet_hops": wordnet_hops,
               "wordnet_entities": len(kg.entities), "wordnet_triplets": len(kg), "image_triplets": len(indices),
               **({"dropped_class_links": len(links)} if drop_class_links else {}),
               **({"class_text": class_text} if class_text != "gloss" else {})}
    for index in indices:
        entity = kg.add_entity(Entity(f"train-{index:05d}", IMAGE, images=(image_png(images[index]),)))
        kg.add_edge(entity.id, IMAGE_RELATION, CLASSES[int(labels[index])].synset)
    return kg


def make_fashion_kg(out: str | os.PathLike, *, source: str | os.PathLike = FASHION_DIR,
                    limit_per_class: int | None = None, val_per_class: int = 500,
                    triplet_images_per_class: int | None = 1000, wordnet_hops: int = 2, drop_class_links: bool = False,
                    class_text: str = "gloss",
                    neighbourhood: NeighbourhoodConfig = TRIPLET_NEIGHBOURHOOD,
                    shard_size: int = 1000, seed: int = 0, wordnet=None, wordnet_cache: str | os.PathLike | None = None,
                    log: Callable[[str], None] = print) -> dict[str, Any]:
    """Write every output under ``out`` (see the module doc) and return the summary written to fashion_kg.json.

    ``limit_per_class`` caps the images of each class in every split (small builds for tests).
    """
    started, out = time.perf_counter(), Path(out)
    if val_per_class < 0 or (limit_per_class is not None and limit_per_class < 1):
        raise KGError(f"need --val-per-class >= 0 and --limit-per-class >= 1, got {val_per_class}, {limit_per_class}")
    wordnet = wordnet if wordnet is not None else load_wordnet(wordnet_cache)
    check_wordnet_links(wordnet)
    data = load_fashion(source)
    (train_images, train_labels), (test_images, test_labels) = data["train"], data["test"]
    indices = {"train": select_indices(train_labels, limit_per_class, skip_last=val_per_class),
               "val": select_indices(train_labels, limit_per_class, skip_last=val_per_class, last=True),
               "test": select_indices(test_labels, limit_per_class)}
    triplet_indices = sorted(i for c in range(len(CLASSES))  # train images only: val and test stay unseen
                             for i in [j for j in indices["train"] if train_labels[j] == c][:triplet_images_per_class])
    settings = {"seed": seed, "limit_per_class": limit_per_class, "val_per_class": val_per_class,
                "shard_size": shard_size}
    sources = {name: sha256_file(Path(source) / name) for files in SOURCE_FILES.values() for name in files}
    results: dict[str, ShardSetResult] = {}

    def write(name: str, items: list[int], make: Callable[[int], dict[str, Any]], extra: dict[str, Any]) -> None:
        identity = {"generator": GENERATOR_ID, "output": name, "sources": sources, **settings}
        results[name] = write_shard_set(out / name, len(items), lambda i: make(items[i]), shard_size=shard_size,
                                        identity=identity, extra=extra, log=log)
        verb = "complete, skipped" if results[name].skipped else f"{results[name].written} shards written"
        log(f"{name}: {results[name].manifest.total} samples ({verb})")

    for split in ("train", "val"):
        write(f"pairs/{split}", indices[split], lambda i: _pair_sample("train", i, train_images, train_labels, seed),
              {"kind": "pairs", "split": split, "templates": list(CAPTION_TEMPLATES)})
    # pairs/val doubles as a class-level zero-shot split held out from test: choices are made on it, never on test
    atomic_write_text(out / "pairs/val" / CLASSES_NAME,
                      json.dumps({"classnames": [c.name for c in CLASSES], "templates": list(ZEROSHOT_TEMPLATES)},
                                 indent=1) + "\n")
    for name, hypernym in (("zeroshot", False), ("zeroshot_hypernym", True)):
        classes = ({"classnames": list(HYPERNYM_GROUPS.values()), "templates": list(HYPERNYM_TEMPLATES)} if hypernym
                   else {"classnames": [c.name for c in CLASSES], "templates": list(ZEROSHOT_TEMPLATES)})
        write(name, indices["test"], lambda i, h=hypernym: _zeroshot_sample(i, test_images, test_labels, h),
              {"kind": "zeroshot", **classes})
        atomic_write_text(out / name / CLASSES_NAME, json.dumps(classes, indent=1) + "\n")
    kg = fashion_graph(wordnet, train_images, train_labels, triplet_indices, wordnet_hops, drop_class_links, class_text)
    results["triplets"] = write_triplet_shards(kg, out / "triplets", shard_size=shard_size, neighbourhood=neighbourhood,
                                               log=log)
    log(f"triplets: {results['triplets'].manifest.total} samples ({kg.meta['wordnet_triplets']} WordNet + "
        f"{kg.meta['image_triplets']} image){' (complete, skipped)' if results['triplets'].skipped else ''}")
    summary = {
        "generator": GENERATOR_ID, **settings, "triplet_images_per_class": triplet_images_per_class,
        "wordnet_hops": wordnet_hops, "neighbourhood": asdict(neighbourhood),
        "classes": [asdict(c) for c in CLASSES], "hypernym_groups": HYPERNYM_GROUPS,
        "counts": {name: r.manifest.total for name, r in results.items()},
        "graph": {"entities": kg.kind_counts(), "relations": kg.relation_counts(), **kg.meta},
        "last_run_seconds": round(time.perf_counter() - started, 1),
    }
    atomic_write_text(out / SUMMARY_NAME, json.dumps(summary, indent=1) + "\n")
    return summary
