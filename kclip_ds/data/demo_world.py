"""A deterministic synthetic "shapes world": coloured shapes, captions and scene graphs as webdataset shards.

Every sample is a function of ``(seed, split, index)`` only, so the same arguments give byte-identical
shards.  The train/val/test splits hold 2–3 shapes per image, each of a different shape type *and* colour,
captioned with spatial relations that hold by a clear margin between bounding-box centres, e.g.
``"a red circle to the left of a blue square and a green triangle above the blue square"``.  The
``zeroshot`` split holds one shape per image with a class index over every colour × shape name.

Layout written by :func:`make_demo_data`::

    OUT/train/000000.tar … manifest.json
    OUT/val/…  OUT/test/…
    OUT/zeroshot/… manifest.json classes.json

A sample is ``{"__key__": "train-000123", "png": bytes, "txt": bytes, "sg.json": bytes}`` (+ ``"cls"``
for zeroshot), all values already bytes.
"""

from __future__ import annotations

import hashlib
import json
import math
import random
import re
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from PIL import Image, ImageDraw

from kclip_ds.data.shards import (
    MANIFEST_NAME,
    AtomicShardWriter,
    Manifest,
    atomic_write_text,
    encode_png,
    read_manifest,
    write_manifest,
)

GENERATOR_ID = "kclip_ds.demo_world/v1"
SPLITS: tuple[str, ...] = ("train", "val", "test", "zeroshot")
ZEROSHOT_SPLIT = "zeroshot"
CLASSES_NAME = "classes.json"
DEFAULT_SPLIT_SIZES: dict[str, int] = {"train": 12000, "val": 500, "test": 500, "zeroshot": 400}

#: Colour name → RGB fill; chosen far apart from each other and from the light background.
COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (215, 35, 35),
    "green": (30, 150, 55),
    "blue": (35, 75, 215),
    "yellow": (235, 195, 15),
    "purple": (135, 50, 185),
    "black": (25, 25, 25),
}
SHAPES: tuple[str, ...] = ("circle", "square", "triangle", "diamond", "star", "cross")
RELATIONS: tuple[str, ...] = ("to the left of", "to the right of", "above", "below")
ZEROSHOT_TEMPLATES: tuple[str, ...] = ("a photo of a {}.", "a {}.", "a drawing of a {}.", "a {} on a plain background.")

#: A stated relation needs bbox centres this far apart (fraction of the image side) along its axis.
RELATION_MARGIN_FRACTION = 0.15
#: Side of a shape's square bbox as a fraction of the image side: (min, max) for scenes and zeroshot.
SCENE_SHAPE_FRACTION = (0.2, 0.32)
ZEROSHOT_SHAPE_FRACTION = (0.3, 0.6)
MIN_IMAGE_SIZE = 32
_OBJECT_GAP_PX = 2  # empty pixels kept between any two objects' bboxes
_SHARD_NAME = re.compile(r"^\d{6}\.tar$")

BBox = tuple[int, int, int, int]  # (x0, y0, x1, y1) in pixels, x1/y1 exclusive: x1 - x0 is the width


def _star_polygon(points: int = 5, inner_radius: float = 0.45) -> tuple[tuple[float, float], ...]:
    """Vertices of a star with one tip up, scaled to span the unit square [0, 1]² exactly.

    Rounded to 6 decimals so that the drawn pixels do not hinge on the last bit of the platform's ``cos``.
    """
    polar = [(1.0 if k % 2 == 0 else inner_radius, -math.pi / 2 + k * math.pi / points) for k in range(2 * points)]
    xs, ys = [r * math.cos(a) for r, a in polar], [r * math.sin(a) for r, a in polar]
    return tuple((round((x - min(xs)) / (max(xs) - min(xs)), 6), round((y - min(ys)) / (max(ys) - min(ys)), 6))
                 for x, y in zip(xs, ys))


_T = 1 / 3  # arm thickness of the cross
#: Polygon outlines in unit-square coordinates (y down), each spanning the whole square.
_POLYGONS: dict[str, tuple[tuple[float, float], ...]] = {
    "triangle": ((0.5, 0.0), (1.0, 1.0), (0.0, 1.0)),
    "diamond": ((0.5, 0.0), (1.0, 0.5), (0.5, 1.0), (0.0, 0.5)),
    "star": _star_polygon(),
    "cross": ((_T, 0), (1 - _T, 0), (1 - _T, _T), (1, _T), (1, 1 - _T), (1 - _T, 1 - _T), (1 - _T, 1),
              (_T, 1), (_T, 1 - _T), (0, 1 - _T), (0, _T), (_T, _T)),
}


@dataclass(frozen=True)
class SceneObject:
    """One drawn shape: its type (a :data:`SHAPES` entry), colour (a :data:`COLOURS` key) and bbox."""

    shape: str
    colour: str
    bbox: BBox

    @property
    def name(self) -> str:
        """Colour + shape, e.g. ``"red circle"`` (unique within a scene)."""
        return f"{self.colour} {self.shape}"


@dataclass(frozen=True)
class Relation:
    """``objects[subject] <predicate> objects[object]``, predicate one of :data:`RELATIONS`."""

    subject: int
    predicate: str
    object: int


@dataclass(frozen=True)
class Scene:
    """Objects in caption order, the relations the caption states, and the RGB background."""

    objects: tuple[SceneObject, ...]
    relations: tuple[Relation, ...]
    background: tuple[int, int, int]


@dataclass(frozen=True)
class SplitResult:
    """What :func:`write_split` did: the split's manifest and whether existing data was kept."""

    split: str
    directory: Path
    manifest: Manifest
    skipped: bool


def zeroshot_classnames() -> list[str]:
    """Every colour × shape name, colour-major: class index ``c * len(SHAPES) + s``."""
    return [f"{colour} {shape}" for colour in COLOURS for shape in SHAPES]


def zeroshot_classes() -> dict[str, list[str]]:
    """The content of ``zeroshot/classes.json``: ``{"classnames": [...], "templates": [...]}``."""
    return {"classnames": zeroshot_classnames(), "templates": list(ZEROSHOT_TEMPLATES)}


def sample_rng(seed: int, split: str, index: int) -> random.Random:
    """A private RNG for one sample, derived by hashing ``(seed, split, index)`` (no global state)."""
    digest = hashlib.sha256(f"{GENERATOR_ID}|{seed}|{split}|{index}".encode()).digest()
    return random.Random(int.from_bytes(digest[:8], "big"))


def bbox_centre(bbox: BBox) -> tuple[float, float]:
    """(x, y) centre of a bbox in pixels, y pointing down."""
    return (bbox[0] + bbox[2]) / 2, (bbox[1] + bbox[3]) / 2


def relation_holds(subject: BBox, predicate: str, obj: BBox, margin: float) -> bool:
    """True when ``subject <predicate> obj`` holds with bbox centres at least ``margin`` px apart on its axis."""
    (sx, sy), (ox, oy) = bbox_centre(subject), bbox_centre(obj)
    offsets = {"to the left of": ox - sx, "to the right of": sx - ox, "above": oy - sy, "below": sy - oy}
    if predicate not in offsets:
        raise ValueError(f"unknown relation {predicate!r}; expected one of {RELATIONS}")
    return offsets[predicate] >= margin


def _boxes_overlap(a: BBox, b: BBox, gap: int) -> bool:
    """True when the boxes, each grown by ``gap`` px, intersect."""
    return a[0] < b[2] + gap and b[0] < a[2] + gap and a[1] < b[3] + gap and b[1] < a[3] + gap


def _random_box(rng: random.Random, image_size: int, size_fraction: tuple[float, float]) -> BBox:
    """A square bbox with side in ``size_fraction`` × ``image_size``, at least 1 px inside the image."""
    side = rng.randint(round(size_fraction[0] * image_size), round(size_fraction[1] * image_size))
    x0, y0 = rng.randint(1, image_size - 1 - side), rng.randint(1, image_size - 1 - side)
    return (x0, y0, x0 + side, y0 + side)


def _background(rng: random.Random) -> tuple[int, int, int]:
    """A light RGB background, jittered per image."""
    return tuple(rng.randint(228, 246) for _ in range(3))  # type: ignore[return-value]


def make_scene(rng: random.Random, image_size: int, num_objects: int, max_attempts: int = 1000) -> Scene:
    """A scene of 2 or 3 non-overlapping objects of distinct shapes and colours, with caption relations.

    Relation 0 links object 0 to object 1; with 3 objects, relation 1 links object 2 to object 0 or 1.
    Each stated predicate holds by :data:`RELATION_MARGIN_FRACTION` × ``image_size``; placements are
    redrawn until such predicates exist.
    """
    if num_objects not in (2, 3):
        raise ValueError(f"num_objects must be 2 or 3, got {num_objects}")
    margin = RELATION_MARGIN_FRACTION * image_size
    shapes, colours = rng.sample(SHAPES, num_objects), rng.sample(list(COLOURS), num_objects)
    background = _background(rng)
    for _ in range(max_attempts):
        boxes: list[BBox] = []
        for _ in range(100 * num_objects):
            box = _random_box(rng, image_size, SCENE_SHAPE_FRACTION)
            if not any(_boxes_overlap(box, other, _OBJECT_GAP_PX) for other in boxes):
                boxes.append(box)
                if len(boxes) == num_objects:
                    break
        else:
            continue  # no room left for the last object: start over
        first = [p for p in RELATIONS if relation_holds(boxes[0], p, boxes[1], margin)]
        if not first:
            continue
        relations = [Relation(0, rng.choice(first), 1)]
        if num_objects == 3:
            options = [(p, anchor) for anchor in (0, 1) for p in RELATIONS
                       if relation_holds(boxes[2], p, boxes[anchor], margin)]
            if not options:
                continue
            predicate, anchor = rng.choice(options)
            relations.append(Relation(2, predicate, anchor))
        objects = tuple(SceneObject(s, c, b) for s, c, b in zip(shapes, colours, boxes))
        return Scene(objects, tuple(relations), background)
    raise RuntimeError(f"could not place {num_objects} objects in {max_attempts} attempts at size {image_size}")


def scene_caption(scene: Scene) -> str:
    """Lower-case caption naming every object once with "a", and again with "the" when re-used."""
    if not scene.relations:
        return " and ".join(f"a {obj.name}" for obj in scene.objects)
    mentioned: set[int] = set()

    def mention(index: int) -> str:
        article = "the" if index in mentioned else "a"
        mentioned.add(index)
        return f"{article} {scene.objects[index].name}"

    return " and ".join(f"{mention(r.subject)} {r.predicate} {mention(r.object)}" for r in scene.relations)


def scene_graph(scene: Scene) -> dict[str, Any]:
    """``{"objects": [{"name", "attributes", "bbox"}], "relations": [{"subject", "predicate", "object"}]}``."""
    return {
        "objects": [{"name": o.shape, "attributes": [o.colour], "bbox": list(o.bbox)} for o in scene.objects],
        "relations": [{"subject": r.subject, "predicate": r.predicate, "object": r.object} for r in scene.relations],
    }


def render_scene(scene: Scene, image_size: int) -> Image.Image:
    """Draw the scene: an ``image_size`` × ``image_size`` RGB image, shapes filling their bboxes."""
    image = Image.new("RGB", (image_size, image_size), scene.background)
    draw = ImageDraw.Draw(image)
    for obj in scene.objects:
        x0, y0, x1, y1 = obj.bbox
        fill = COLOURS[obj.colour]
        if obj.shape == "circle":
            draw.ellipse((x0, y0, x1 - 1, y1 - 1), fill=fill)
        elif obj.shape == "square":
            draw.rectangle((x0, y0, x1 - 1, y1 - 1), fill=fill)
        else:
            width, height = x1 - 1 - x0, y1 - 1 - y0
            draw.polygon([(x0 + u * width, y0 + v * height) for u, v in _POLYGONS[obj.shape]], fill=fill)
    return image


def make_sample(seed: int, split: str, index: int, image_size: int) -> dict[str, bytes | str]:
    """The webdataset sample ``index`` of ``split``: key, PNG, caption, scene graph (+ class for zeroshot)."""
    rng = sample_rng(seed, split, index)
    extra: dict[str, bytes | str] = {}
    if split == ZEROSHOT_SPLIT:
        class_index = index % (len(COLOURS) * len(SHAPES))  # balanced classes
        colour, shape = list(COLOURS)[class_index // len(SHAPES)], SHAPES[class_index % len(SHAPES)]
        background = _background(rng)
        obj = SceneObject(shape, colour, _random_box(rng, image_size, ZEROSHOT_SHAPE_FRACTION))
        scene = Scene((obj,), (), background)
        extra["cls"] = str(class_index).encode("ascii")
    else:
        scene = make_scene(rng, image_size, rng.choice((2, 3)))
    graph = json.dumps(scene_graph(scene), separators=(",", ":"))
    return {
        "__key__": f"{split}-{index:06d}",
        "png": encode_png(render_scene(scene, image_size)),
        "txt": scene_caption(scene).encode("utf-8"),
        "sg.json": graph.encode("utf-8"),
        **extra,
    }


def split_extra(split: str, seed: int, num_samples: int, shard_size: int, image_size: int) -> dict[str, Any]:
    """The ``manifest.extra`` of a split; also the key deciding whether existing data can be kept."""
    extra: dict[str, Any] = {"split": split, "seed": seed, "generator": GENERATOR_ID,
                             "num_samples": num_samples, "shard_size": shard_size, "image_size": image_size}
    if split == ZEROSHOT_SPLIT:
        extra.update(zeroshot_classes())
    return extra


def _complete_manifest(split_dir: Path, expected_extra: dict[str, Any]) -> Manifest | None:
    """The manifest of ``split_dir`` if it has exactly ``expected_extra`` and all its files are there, else None.

    Shards are checked by size, not by hash (a rerun should be cheap).
    """
    try:
        manifest = read_manifest(split_dir)
    except ValueError:
        return None
    if manifest is None or manifest.extra != expected_extra or manifest.total != expected_extra["num_samples"]:
        return None
    for shard in manifest.shards:
        path = split_dir / shard.name
        if not path.is_file() or path.stat().st_size != shard.bytes:
            return None
    if expected_extra["split"] == ZEROSHOT_SPLIT:
        try:
            if json.loads((split_dir / CLASSES_NAME).read_text()) != zeroshot_classes():
                return None
        except (OSError, json.JSONDecodeError):
            return None
    return manifest


def write_split(out_dir: str | Path, split: str, num_samples: int, *, seed: int = 0, shard_size: int = 1000,
                image_size: int = 64) -> SplitResult:
    """Write ``num_samples`` samples of ``split`` to ``out_dir/split/NNNNNN.tar`` + ``manifest.json``.

    Shards hold ``shard_size`` samples (the last may hold fewer).  A split whose complete manifest
    already matches these arguments is left alone (``skipped=True``).  Otherwise the old manifest is
    removed first, shards are written atomically, stale ``NNNNNN.tar`` files are deleted, and the
    manifest is written last, so a manifest only ever describes a finished split.
    """
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; expected one of {SPLITS}")
    if num_samples < 0 or shard_size < 1:
        raise ValueError(f"need num_samples >= 0 and shard_size >= 1, got {num_samples}, {shard_size}")
    if image_size < MIN_IMAGE_SIZE:
        raise ValueError(f"image_size must be >= {MIN_IMAGE_SIZE}, got {image_size}")
    split_dir = Path(out_dir) / split
    extra = split_extra(split, seed, num_samples, shard_size, image_size)
    existing = _complete_manifest(split_dir, extra)
    if existing is not None:
        return SplitResult(split, split_dir, existing, skipped=True)
    split_dir.mkdir(parents=True, exist_ok=True)
    (split_dir / MANIFEST_NAME).unlink(missing_ok=True)
    manifest = Manifest(extra=extra)
    for shard_index, start in enumerate(range(0, num_samples, shard_size)):
        with AtomicShardWriter(split_dir / f"{shard_index:06d}.tar") as writer:
            for index in range(start, min(start + shard_size, num_samples)):
                writer.write(make_sample(seed, split, index, image_size))
            manifest.shards.append(writer.close())
    written = {shard.name for shard in manifest.shards}
    for path in split_dir.iterdir():
        if _SHARD_NAME.match(path.name) and path.name not in written:
            path.unlink()
    if split == ZEROSHOT_SPLIT:
        atomic_write_text(split_dir / CLASSES_NAME, json.dumps(zeroshot_classes(), indent=1) + "\n")
    write_manifest(split_dir, manifest)
    return SplitResult(split, split_dir, manifest, skipped=False)


def make_demo_data(out_dir: str | Path, *, seed: int = 0, split_sizes: Mapping[str, int] | None = None,
                   shard_size: int = 1000, image_size: int = 64,
                   on_split_done: Callable[[SplitResult, float], None] | None = None) -> dict[str, SplitResult]:
    """Write every split of ``split_sizes`` (default :data:`DEFAULT_SPLIT_SIZES`) under ``out_dir``.

    ``on_split_done(result, seconds)`` is called after each split (e.g. to print progress).
    """
    results: dict[str, SplitResult] = {}
    for split, num_samples in (DEFAULT_SPLIT_SIZES if split_sizes is None else split_sizes).items():
        started = time.perf_counter()
        results[split] = write_split(out_dir, split, num_samples, seed=seed, shard_size=shard_size,
                                     image_size=image_size)
        if on_split_done is not None:
            on_split_done(results[split], time.perf_counter() - started)
    return results
