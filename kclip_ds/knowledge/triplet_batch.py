"""Triplet samples → the fixed-size tensors of Knowledge-CLIP's batch rows.

A Knowledge-CLIP batch mixes image–caption pairs and knowledge-graph triplets row by row (the sources'
weights decide the mix).  Pair rows use ``Batch.images``/``Batch.texts``; a triplet row leaves them zero and
fills ``Batch.knowledge`` (every tensor has B rows; rows that are not triplets hold zeros)::

    triplet       [B] bool           the row is a decoded triplet
    head_image    [B, 3, H, W]       the head entity's image (where head_is_image), else zeros
    head_text     [B, L] int64       the head entity's text, tokenised (where not head_is_image)
    head_is_image [B] bool
    head_id       [B] int64          a stable 63-bit hash of the entity id (same entity → same number)
    tail_*                           the same for the tail
    rel_text      [B, L] int64       the relation's text ("is a"), tokenised
    relation      [B] int64          index in the relation vocabulary, −1 when it is not in it
    mask_tail     [B] bool           E2E masks the tail (else the head); drawn per (seed, key, epoch)
    nb_heads_ids, nb_rels_ids, nb_tails_ids  [B, 2, E, P] int64   G2E: each side's neighbourhood edges as
                                     phrase ids (side 0 = head, 1 = tail), the centre entity and image
                                     entities blanked to padding (0), so the graph must infer the centre
    nb_mask       [B, 2, E] bool     real edges

The vocabulary of relations is read from the triplet shards' manifests (:func:`relation_vocabulary`).
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import braceexpand
import torch
from PIL import Image

from kclip_ds.data.shards import read_manifest
from kclip_ds.knowledge.kg import IMAGE
from kclip_ds.knowledge.triplet_shards import decode_triplet
from kclip_ds.models.graph import phrase_ids

TRIPLET_MEMBER = "triplet.json"
SIDES = ("head", "tail")


def entity_key(entity_id: str) -> int:
    """A stable non-negative int64 for an entity id (equal ids ↔ equal keys, up to 2⁻⁶³ collisions)."""
    return int.from_bytes(hashlib.sha1(entity_id.encode()).digest()[:8], "big") & (2**63 - 1)


def _coin(*parts: object) -> bool:
    return hashlib.sha256("|".join(map(str, parts)).encode()).digest()[0] & 1 == 1


def relation_vocabulary(train_spec: str) -> tuple[str, ...]:
    """The sorted relation names recorded in the manifests (``extra["relations"]``) of the triplet sources
    of ``data.train`` ('::'-separated); empty when no source holds triplets."""
    names: set[str] = set()
    for source in train_spec.split("::"):
        directories = {Path(url).parent for url in braceexpand.braceexpand(source.strip())}
        for directory in sorted(directories):
            try:
                manifest = read_manifest(directory)
            except ValueError:
                continue
            if manifest is not None and manifest.extra.get("kind") == "triplets":
                names.update(manifest.extra.get("relations", {}))
    return tuple(sorted(names))


@dataclass(frozen=True)
class TripletSpec:
    """How triplet rows are built: the relation vocabulary, G2E's edges per side and phrase length, the seed."""

    relations: tuple[str, ...]
    neighbour_edges: int = 8
    phrase_len: int = 8
    seed: int = 0


class TripletRows:
    """Builds ``Batch.knowledge`` from the triplet samples of a batch (see the module doc)."""

    def __init__(self, spec: TripletSpec, preprocess: Callable[[Image.Image], torch.Tensor],
                 tokenizer: Callable[[list[str]], torch.Tensor], image_size: int, context_length: int) -> None:
        self.spec, self.preprocess, self.tokenizer = spec, preprocess, tokenizer
        self.image_size, self.context_length = image_size, context_length
        self.relation_index = {name: i for i, name in enumerate(spec.relations)}

    def empty(self, batch_size: int) -> dict[str, torch.Tensor]:
        b, e, p, ctx, s = batch_size, self.spec.neighbour_edges, self.spec.phrase_len, self.context_length, self.image_size
        out: dict[str, torch.Tensor] = {"triplet": torch.zeros(b, dtype=torch.bool),
                                        "rel_text": torch.zeros(b, ctx, dtype=torch.long),
                                        "relation": torch.full((b,), -1, dtype=torch.long),
                                        "mask_tail": torch.zeros(b, dtype=torch.bool),
                                        "nb_mask": torch.zeros(b, 2, e, dtype=torch.bool)}
        for side in SIDES:
            out[f"{side}_image"] = torch.zeros(b, 3, s, s)
            out[f"{side}_text"] = torch.zeros(b, ctx, dtype=torch.long)
            out[f"{side}_is_image"] = torch.zeros(b, dtype=torch.bool)
            out[f"{side}_id"] = torch.zeros(b, dtype=torch.long)
        for part in ("heads", "rels", "tails"):
            out[f"nb_{part}_ids"] = torch.zeros(b, 2, e, p, dtype=torch.long)
        return out

    def fill(self, rows: dict[int, dict[str, Any]], batch_size: int, epoch: int) -> dict[str, torch.Tensor]:
        """``rows``: batch row → raw triplet sample.  Raises ValueError naming the sample when one is malformed."""
        out = self.empty(batch_size)
        texts: dict[str, dict[int, str]] = {"head_text": {}, "tail_text": {}, "rel_text": {}}
        for row, raw in rows.items():
            key = raw.get("__key__", "?")
            record, images = decode_triplet(raw)
            for side in SIDES:
                entity = record[side]
                out[f"{side}_id"][row] = entity_key(entity["id"])
                if entity.get("kind") == IMAGE:
                    out[f"{side}_image"][row] = self.preprocess(images[entity["image"]])
                    out[f"{side}_is_image"][row] = True
                elif isinstance(entity.get("text"), str):
                    texts[f"{side}_text"][row] = entity["text"]
                else:
                    raise ValueError(f"sample {key}: {side} entity {entity.get('id')!r} has neither an image nor a text")
            texts["rel_text"][row] = record["relation"]
            out["relation"][row] = self.relation_index.get(record["relation"], -1)
            out["mask_tail"][row] = _coin("e2e-mask", self.spec.seed, key, epoch)
            out["triplet"][row] = True
            self._neighbourhoods(out, row, record)
        for name, by_row in texts.items():
            if by_row:
                out[name][list(by_row)] = self.tokenizer(list(by_row.values()))
        return out

    def _neighbourhoods(self, out: dict[str, torch.Tensor], row: int, record: dict[str, Any]) -> None:
        neighbourhood = record["neighbourhood"]
        text_of = {e["id"]: e.get("text") if e.get("kind") != IMAGE else None for e in neighbourhood["entities"]}
        p = self.spec.phrase_len

        def ids(entity_id: str, centre: str) -> list[int]:
            text = None if entity_id == centre else text_of.get(entity_id)
            return phrase_ids(self.tokenizer, text, p) if text else [0] * p

        for s, side in enumerate(SIDES):
            centre = record[side]["id"]
            for j, (h, r, t) in enumerate(neighbourhood.get(side, [])[: self.spec.neighbour_edges]):
                out["nb_heads_ids"][row, s, j] = torch.tensor(ids(h, centre))
                out["nb_rels_ids"][row, s, j] = torch.tensor(phrase_ids(self.tokenizer, r, p))
                out["nb_tails_ids"][row, s, j] = torch.tensor(ids(t, centre))
                out["nb_mask"][row, s, j] = True
