"""Raw shard sample → tensors: open_clip's image preprocess and tokenizer, and the padded collate.

Decoding is explicit per field (PIL for images, UTF-8 for text, ``json.loads`` for JSON): no
webdataset auto-decoders, which would unpickle pickle-typed members of a shard.
"""

from __future__ import annotations

import io
import json
from collections.abc import Callable
from typing import Any

import torch
from PIL import Image, UnidentifiedImageError

from kclip_ds.data.schema import IMAGE_EXTENSIONS, Batch
from kclip_ds.data.sources import DataError
from kclip_ds.knowledge import teacher_format
from kclip_ds.knowledge.negatives import sample_negative
from kclip_ds.knowledge.triplet_batch import TRIPLET_MEMBER, TripletRows
from kclip_ds.models.graph import tokenize_triples


class CorruptSample(ValueError):
    """A sample that cannot be decoded; the pipeline skips it (up to data.max_corrupt)."""


class SampleDecoder:
    """Decodes raw webdataset samples and collates them into a fixed-size, padded Batch.

    preprocess: PIL image → [3, H, W] float tensor (open_clip's transform)
    tokenizer:  list[str] → [n, L] int64 (open_clip's tokenizer)
    """

    def __init__(self, preprocess: Callable[[Image.Image], torch.Tensor], tokenizer: Callable[[list[str]], torch.Tensor],
                 image_size: int, context_length: int, with_labels: bool = False,
                 negative_kinds: tuple[str, ...] = (), negative_seed: int = 0,
                 triples: tuple[int, int] | None = None, knowledge: TripletRows | None = None,
                 teacher: tuple[int, float] | None = None):
        self.preprocess = preprocess
        self.tokenizer = tokenizer
        self.image_size = image_size
        self.context_length = context_length
        self.with_labels = with_labels
        self.negative_kinds = negative_kinds  # e.g. ("relation", "attribute"): swap negatives from sg.json
        self.negative_seed = negative_seed
        self.triples = triples  # (max_triples, phrase_len): tokenize sg.json triples for the knowledge encoder
        self.knowledge = knowledge  # knowledge-graph triplet rows (Knowledge-CLIP); None: triplets are an error
        self.teacher = teacher  # (dim, exp τ): read precomputed teacher features (teacher.npy) into Batch.teacher

    def decode(self, raw: dict[str, Any]) -> tuple[torch.Tensor, str, int, Any]:
        """(image [3, H, W], caption, label or -1, scene graph or None); raises CorruptSample."""
        key = raw.get("__key__", "?")
        image_ext = next((ext for ext in IMAGE_EXTENSIONS if ext in raw), None)
        if image_ext is None:
            raise CorruptSample(f"{key}: no image member ({'/'.join(IMAGE_EXTENSIONS)})")
        try:
            with Image.open(io.BytesIO(raw[image_ext])) as img:
                image = self.preprocess(img.convert("RGB"))
        except (UnidentifiedImageError, OSError, ValueError, SyntaxError) as exc:
            raise CorruptSample(f"{key}: undecodable {image_ext} ({exc.__class__.__name__})") from exc
        if "txt" not in raw:
            raise CorruptSample(f"{key}: no txt member")
        try:
            caption = raw["txt"].decode("utf-8").strip()
        except UnicodeDecodeError as exc:
            raise CorruptSample(f"{key}: txt is not UTF-8") from exc
        label = -1
        if self.with_labels:
            try:
                label = int(raw["cls"].decode("ascii").strip())
            except (KeyError, ValueError, UnicodeDecodeError) as exc:
                raise CorruptSample(f"{key}: missing or non-integer cls") from exc
        graph = None
        if "sg.json" in raw:
            try:
                graph = json.loads(raw["sg.json"])
            except (json.JSONDecodeError, UnicodeDecodeError) as exc:
                raise CorruptSample(f"{key}: sg.json is not valid JSON") from exc
        return image, caption, label, graph

    def collate(self, raws: list[dict[str, Any]], batch_size: int, epoch: int, step_in_epoch: int,
                seed: int = 0) -> Batch:
        """Decode ``raws`` (<= batch_size) into a Batch of exactly ``batch_size`` rows, padding with valid=False.

        Random augmentations draw from torch's RNG seeded with ``seed`` (derived per rank and step by the
        pipeline), inside ``fork_rng`` so the caller's RNG is untouched: a resumed run augments identically.
        """
        assert len(raws) <= batch_size, f"{len(raws)} samples for a batch of {batch_size}"
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            return self._collate(raws, batch_size, epoch, step_in_epoch)

    def _collate(self, raws: list[dict[str, Any]], batch_size: int, epoch: int, step_in_epoch: int) -> Batch:
        images = torch.zeros(batch_size, 3, self.image_size, self.image_size)
        texts = torch.zeros(batch_size, self.context_length, dtype=torch.long)
        valid = torch.zeros(batch_size, dtype=torch.bool)
        labels = torch.full((batch_size,), -1, dtype=torch.long)
        keys = [""] * batch_size
        graphs: list[Any] = [None] * batch_size
        captions: dict[int, str] = {}
        negatives: dict[int, str] = {}
        corrupt = []
        triplets: dict[int, dict[str, Any]] = {}
        teacher_rows: dict[int, torch.Tensor] = {}
        for row, raw in enumerate(raws):
            keys[row] = raw.get("__key__", "?")
            if TRIPLET_MEMBER in raw:
                if self.knowledge is None:
                    raise DataError(f"sample {keys[row]} is a knowledge-graph triplet ({TRIPLET_MEMBER}), but this "
                                    f"method reads image–caption pairs only; use method.name=knowledge_clip or "
                                    f"remove the triplet shards from the data spec")
                triplets[row] = raw
                continue
            try:
                image, caption, label, graph = self.decode(raw)
            except CorruptSample as exc:
                corrupt.append(str(exc))
                continue
            assert image.shape == images.shape[1:], f"preprocessed image {tuple(image.shape)} != {tuple(images.shape[1:])}"
            images[row], labels[row], graphs[row], captions[row] = image, label, graph, caption
            if self.teacher is not None and teacher_format.TEACHER_MEMBER in raw:
                try:
                    teacher_rows[row] = teacher_format.decode_teacher_member(
                        raw[teacher_format.TEACHER_MEMBER], keys[row], self.teacher[0])
                except ValueError as exc:
                    raise DataError(str(exc)) from exc
            valid[row] = True
            if self.negative_kinds:
                negative, _ = sample_negative(keys[row], epoch, caption, graph, kinds=self.negative_kinds,
                                              seed=self.negative_seed)
                if negative is not None:
                    negatives[row] = negative
        if captions:
            rows = list(captions)
            texts[rows] = self.tokenizer([captions[r] for r in rows])
        neg_texts = neg_valid = None
        if self.negative_kinds:
            neg_texts = torch.zeros_like(texts)
            neg_valid = torch.zeros(batch_size, dtype=torch.bool)
            if negatives:
                rows = list(negatives)
                neg_texts[rows] = self.tokenizer([negatives[r] for r in rows])
                neg_valid[rows] = True
        triples = None
        if self.triples is not None:
            max_triples, phrase_len = self.triples
            per_row = [tokenize_triples(g if g is not None else {}, self.tokenizer, max_triples, phrase_len)
                       for g in graphs]
            triples = {name: torch.stack([r[name] for r in per_row]) for name in per_row[0]}
        teacher = None
        if self.teacher is not None:
            dim, scale = self.teacher
            features = torch.zeros(batch_size, 2, dim)
            present = torch.zeros(batch_size, dtype=torch.bool)
            for row, value in teacher_rows.items():
                features[row], present[row] = value, True
            teacher = {"image": features[:, 0], "text": features[:, 1], "present": present,
                       "scale": torch.tensor([scale])}
        knowledge = None
        if self.knowledge is not None:
            try:
                knowledge = self.knowledge.fill(triplets, batch_size, epoch)
            except ValueError as exc:  # a malformed triplet sample: the message names it
                raise DataError(f"{exc}; re-create the triplet shards (tools/import_kg.py)") from exc
            valid |= knowledge["triplet"]
        return Batch(
            triples=triples, knowledge=knowledge, teacher=teacher,
            images=images, texts=texts, valid=valid, keys=keys,
            labels=labels if self.with_labels else None,
            scene_graphs=graphs if any(g is not None for g in graphs) else None,
            corrupt_keys=corrupt, neg_texts=neg_texts, neg_valid=neg_valid, epoch=epoch,
            step_in_epoch=step_in_epoch,
        )
