"""Knowledge-graph triplets as webdataset shards that carry their entities' sampled neighbourhoods.

Knowledge-CLIP's G2E objective needs an entity's graph neighbourhood; storing a sampled subgraph in every
sample lets training stream shards without random access to the graph.  One sample (JSON + image bytes
only, nothing pickled)::

    KEY.triplet.json   {"head": E, "relation": "is a", "tail": E,
                        "neighbourhood": {"hops": 1, "head": [[h_id, relation, t_id], ...],
                                          "tail": [...],            # only with NeighbourhoodConfig.tail
                                          "entities": [E, ...]}}    # every entity the edges name
    KEY.head.png  KEY.tail.jpg  KEY.nb3.png …   bytes of the image entities

    E = {"id": "dog.n.01", "kind": "text", "text": "dog, domestic dog: …"}
      | {"id": "train-00017", "kind": "image", "image": "head.png"}      # "image" = member name, no key

Edges between the triplet's own head and tail (in either direction) are left out of the neighbourhoods,
so that a masked entity cannot be read off them.  Samples are in a seeded hash order of the edges (not
grouped by head, so that shuffle buffers see a mix), and every value depends only on the graph and the
config: the same inputs give byte-identical shards.  :func:`write_shard_set` is the atomic, resumable
shard-directory writer that the Fashion tool shares.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import random
import re
from collections.abc import Callable, Iterable, Mapping
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from PIL import Image, UnidentifiedImageError

from kclip_ds.data.shards import (
    MANIFEST_NAME,
    AtomicShardWriter,
    Manifest,
    ShardInfo,
    claim_output_dir,
    count_tar_samples,
    read_manifest,
    sha256_file,
    write_manifest,
)
from kclip_ds.knowledge.kg import IMAGE, TEXT, Edge, Entity, KGError, KnowledgeGraph

GENERATOR_ID = "kclip_ds.knowledge.triplet_shards/v1"
STATE_NAME = ".shard_set.json"  # the identity of a directory being written, until its manifest exists
_SHARD_NAME = re.compile(r"^\d{6}\.tar$")
_PIL_EXTENSIONS = {"PNG": "png", "JPEG": "jpg", "WEBP": "webp"}


@dataclass(frozen=True)
class NeighbourhoodConfig:
    """``hops``-hop out-neighbourhood of at most ``max_edges`` edges; ``tail`` adds the tail's too."""

    hops: int = 1
    max_edges: int = 8
    tail: bool = False
    seed: int = 0

    def __post_init__(self) -> None:
        if self.hops < 0 or self.max_edges < 0:
            raise ValueError(f"need hops >= 0 and max_edges >= 0, got {self.hops}, {self.max_edges}")


@dataclass
class ShardSetResult:
    """What :func:`write_shard_set` did; ``skipped``: the directory was already complete."""

    directory: Path
    manifest: Manifest
    written: int
    reused: int
    skipped: bool


def _rng(*parts: object) -> random.Random:
    digest = hashlib.sha256("|".join(map(str, parts)).encode()).digest()
    return random.Random(int.from_bytes(digest[:8], "big"))


def sample_neighbourhood(kg: KnowledgeGraph, entity_id: str, *, hops: int = 1, max_edges: int = 8, seed: int = 0,
                         exclude: Iterable[frozenset[str]] = ()) -> list[Edge]:
    """At most ``max_edges`` edges of the entity's ``hops``-hop out-neighbourhood, always the same ones.

    Hop by hop: the candidates are the sorted out-edges of the frontier (not yet taken, not joining a pair
    in ``exclude``); all are kept if they fit, else a sample drawn with an RNG seeded by ``(seed, entity_id)``;
    the next frontier is the new tails of the kept edges, so the result is a connected subgraph.
    """
    exclude = set(exclude)
    rng = _rng(GENERATOR_ID, seed, entity_id)
    taken: list[Edge] = []
    frontier, visited = [entity_id], {entity_id}
    for _ in range(hops):
        room = max_edges - len(taken)
        candidates = sorted({e for node in frontier for e in kg.out_edges(node)
                             if frozenset((e.head, e.tail)) not in exclude} - set(taken))
        if room <= 0 or not candidates:
            break
        chosen = sorted(rng.sample(candidates, room)) if len(candidates) > room else candidates
        taken += chosen
        frontier = sorted({e.tail for e in chosen} - visited)
        visited.update(frontier)
    return taken


def entity_image(entity: Entity, key: str, seed: int = 0) -> tuple[bytes, str]:
    """(bytes, extension) of the image shown for ``entity`` in sample ``key`` (one of its images, by hash)."""
    ref = entity.images[_rng(seed, key, entity.id).randrange(len(entity.images))] if len(entity.images) > 1 \
        else entity.images[0]
    where = ref if isinstance(ref, str) else "in-memory image"
    try:
        data = Path(ref).read_bytes() if isinstance(ref, str) else ref
        with Image.open(io.BytesIO(data)) as image:
            image.verify()
            pil_format = image.format
    except OSError as exc:  # missing file, unreadable, not an image (UnidentifiedImageError is an OSError)
        kind = "not an image" if isinstance(exc, UnidentifiedImageError) else (exc.strerror or str(exc))
        raise KGError(f"entity {entity.id!r}: {where}: {kind}; fix the image mapping") from exc
    if pil_format not in _PIL_EXTENSIONS:
        raise KGError(f"entity {entity.id!r}: {where}: {pil_format} is not png, jpeg or webp; convert it")
    return data, _PIL_EXTENSIONS[pil_format]


def triplet_sample(kg: KnowledgeGraph, edge: Edge, key: str, config: NeighbourhoodConfig) -> dict[str, Any]:
    """The webdataset sample of one edge: ``triplet.json`` plus one member per image entity it shows."""
    sample: dict[str, Any] = {"__key__": key}
    members: dict[str, str] = {}  # entity id → image member, so an image is stored once per sample

    def record(entity_id: str, slot: str) -> dict[str, Any]:
        entity = kg.entities[entity_id]
        if entity.kind == TEXT:
            return {"id": entity.id, "kind": TEXT, "text": entity.text}
        if entity_id not in members:
            data, ext = entity_image(entity, key, config.seed)
            members[entity_id] = f"{slot}.{ext}"
            sample[members[entity_id]] = data
        return {"id": entity.id, "kind": IMAGE, "image": members[entity_id]}

    head, tail = record(edge.head, "head"), record(edge.tail, "tail")
    sides = ("head", "tail") if config.tail else ("head",)
    neighbourhood: dict[str, Any] = {"hops": config.hops}
    for side in sides:
        edges = sample_neighbourhood(kg, getattr(edge, side), hops=config.hops, max_edges=config.max_edges,
                                     seed=config.seed, exclude=[frozenset((edge.head, edge.tail))])
        neighbourhood[side] = [list(e) for e in edges]
    ids = sorted({x for side in sides for h, _, t in neighbourhood[side] for x in (h, t)})
    neighbourhood["entities"] = [record(x, f"nb{j}") for j, x in enumerate(ids)]
    payload = {"head": head, "relation": edge.relation, "tail": tail, "neighbourhood": neighbourhood}
    sample["triplet.json"] = json.dumps(payload, ensure_ascii=False, sort_keys=True, separators=(",", ":"))
    return sample


def decode_triplet(raw: Mapping[str, Any]) -> tuple[dict[str, Any], dict[str, Image.Image]]:
    """A raw sample (member → bytes, as webdataset yields it without decoders) → (the triplet.json record,
    image member → RGB PIL image).  Raises ValueError naming the key."""
    key = raw.get("__key__", "?")
    try:
        record = json.loads(raw["triplet.json"])
        entities = [record["head"], record["tail"], *record["neighbourhood"]["entities"]]
    except (KeyError, TypeError, json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ValueError(f"sample {key}: missing or malformed triplet.json ({exc!r})") from exc
    images: dict[str, Image.Image] = {}
    for member in {e["image"] for e in entities if e.get("kind") == IMAGE}:
        try:
            with Image.open(io.BytesIO(raw[member])) as image:
                images[member] = image.convert("RGB")
        except (KeyError, OSError) as exc:
            raise ValueError(f"sample {key}: image member {member} missing or undecodable") from exc
    return record, images


def _previous_identity(directory: Path) -> dict[str, Any] | None:
    """The identity recorded by an earlier run in ``directory`` (None for a new or empty directory)."""
    try:
        manifest = read_manifest(directory)
    except ValueError as exc:
        raise KGError(str(exc)) from exc
    if manifest is not None:
        if "identity" not in manifest.extra:
            raise KGError(f"{directory} holds shards written by another tool; pick a new --out or delete it")
        return manifest.extra["identity"]
    if (directory / STATE_NAME).is_file():
        try:
            return json.loads((directory / STATE_NAME).read_text())
        except json.JSONDecodeError:
            return {}
    if directory.is_dir() and any(directory.glob("*.tar")):
        raise KGError(f"{directory} holds .tar files not written by this tool; pick a new --out or delete it")
    return None


def _complete(directory: Path, manifest: Manifest | None, num_samples: int) -> bool:
    return manifest is not None and manifest.total == num_samples and all(
        (directory / s.name).is_file() and (directory / s.name).stat().st_size == s.bytes for s in manifest.shards)


def write_shard_set(directory: str | os.PathLike, num_samples: int, make_sample: Callable[[int], dict[str, Any]], *,
                    shard_size: int, identity: Mapping[str, Any], extra: Mapping[str, Any] | None = None,
                    log: Callable[[str], None] = print) -> ShardSetResult:
    """Write samples ``make_sample(0 … num_samples-1)`` to ``directory/{i:06d}.tar`` + ``manifest.json``.

    ``identity`` (JSON values) names the input and settings: a directory holding shards of another identity
    is refused; one already complete with this identity is left alone; otherwise finished shards (final
    name, right count) are reused and only the missing ones written, each atomically, and the manifest
    (``extra`` + ``identity``) comes last, so a manifest only ever describes a finished directory.
    """
    if num_samples < 0 or shard_size < 1:
        raise ValueError(f"need num_samples >= 0 and shard_size >= 1, got {num_samples}, {shard_size}")
    directory, identity = Path(directory), json.loads(json.dumps(identity))
    previous = _previous_identity(directory)
    if previous is not None and previous != identity:
        changed = sorted(k for k in {*identity, *previous} if previous.get(k) != identity.get(k))
        raise KGError(f"{directory} holds shards made from a different input or settings (changed: "
                      f"{', '.join(changed) or 'unknown'}); pick a new --out or delete it")
    manifest = read_manifest(directory) if previous is not None else None
    if _complete(directory, manifest, num_samples):
        return ShardSetResult(directory, manifest, 0, 0, skipped=True)  # type: ignore[arg-type]
    claim_output_dir(directory, STATE_NAME, identity)
    (directory / MANIFEST_NAME).unlink(missing_ok=True)
    shards: list[ShardInfo] = []
    written = reused = 0
    starts = range(0, num_samples, shard_size)
    for index, start in enumerate(starts):
        path, count = directory / f"{index:06d}.tar", min(shard_size, num_samples - start)
        if path.is_file() and count_tar_samples(path) == count:
            shards.append(ShardInfo(path.name, count, path.stat().st_size, sha256_file(path)))
            reused += 1
            continue
        with AtomicShardWriter(path) as writer:
            for i in range(start, start + count):
                writer.write(make_sample(i))
            shards.append(writer.close())
        written += 1
        log(f"[{index + 1}/{len(starts)}] wrote {directory / path.name}: {count} samples")
    for path in directory.iterdir():
        if _SHARD_NAME.match(path.name) and int(path.name[:6]) >= len(starts):
            path.unlink()
    manifest = Manifest(shards, {**(extra or {}), "identity": identity})
    write_manifest(directory, manifest)
    (directory / STATE_NAME).unlink(missing_ok=True)
    return ShardSetResult(directory, manifest, written, reused, skipped=False)


def triplet_order(kg: KnowledgeGraph, seed: int = 0) -> list[Edge]:
    """The edges in a seeded hash order: deterministic, and not grouped by head."""
    def rank(edge: Edge) -> bytes:
        return hashlib.sha256(f"{seed}|{edge.head}\t{edge.relation}\t{edge.tail}".encode()).digest()
    return sorted(kg.edges, key=rank)


def write_triplet_shards(kg: KnowledgeGraph, out: str | os.PathLike, *, shard_size: int = 1000,
                         neighbourhood: NeighbourhoodConfig = NeighbourhoodConfig(),
                         extra: Mapping[str, Any] | None = None,
                         log: Callable[[str], None] = print) -> ShardSetResult:
    """Every edge of ``kg`` as a triplet sample (key ``{index:09d}``) under ``out``; see the module doc."""
    edges = triplet_order(kg, neighbourhood.seed)
    identity = {"generator": GENERATOR_ID, "kg_sha256": kg.fingerprint(), "shard_size": shard_size,
                **asdict(neighbourhood)}
    counts = {"kind": "triplets", "source": kg.meta, "num_triplets": len(edges), "entities": kg.kind_counts(),
              "relations": kg.relation_counts(), **(extra or {})}
    return write_shard_set(out, len(edges), lambda i: triplet_sample(kg, edges[i], f"{i:09d}", neighbourhood),
                           shard_size=shard_size, identity=identity, extra=counts, log=log)
