"""What a shard sample may hold, and the one Batch every method reads.

Shard sample (webdataset, one ``__key__`` per sample):

    jpg | jpeg | png | webp   image bytes (required)
    txt                       caption, UTF-8 (required)
    sg.json                   scene graph {"objects": [...], "relations": [...]} (optional)
    cls                       class index as ASCII digits (zero-shot splits)

Absent knowledge fields are None in the Batch, never special cases deep in the loop.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from typing import Any

import torch

IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp")


@dataclass
class Batch:
    """One micro-batch on one rank.

    images: [B, 3, H, W] float
    texts:  [B, L] int64 token ids
    valid:  [B] bool — False for padding rows (end of an exact epoch) and corrupt samples;
            losses and metrics ignore them, so every rank can take the same number of steps.
    labels: [B] int64 class indices (zero-shot splits) or None
    scene_graphs: per-row parsed ``sg.json`` (None where a sample has none) or None
    corrupt_keys: keys of samples dropped from this batch because they failed to decode
    neg_texts, neg_valid: structure hard negatives made on the fly from sg.json (NegCLIP / Structure-CLIP)
    epoch, step_in_epoch: where this batch sits in the data stream (for logs and resume checks)
    """

    images: torch.Tensor
    texts: torch.Tensor
    valid: torch.Tensor
    keys: list[str]
    labels: torch.Tensor | None = None
    scene_graphs: list[Any] | None = None
    corrupt_keys: list[str] = field(default_factory=list)
    neg_texts: torch.Tensor | None = None  # [B, L] hard-negative captions (zeros where a sample has none)
    neg_valid: torch.Tensor | None = None  # [B] bool: the sample has a negative (losses mask the others)
    triples: dict[str, torch.Tensor] | None = None  # scene-graph triples: heads_ids/rels_ids/tails_ids [B,T,P], …
    knowledge: dict[str, torch.Tensor] | None = None  # KG triplet rows (kclip_ds.knowledge.triplet_batch), valid too
    teacher: dict[str, torch.Tensor] | None = None  # precomputed teacher features: image/text [B, D], present [B]
    epoch: int = 0
    step_in_epoch: int = 0

    def __post_init__(self) -> None:
        n = self.images.shape[0]
        assert self.images.dim() == 4, f"images must be [B, 3, H, W], got {tuple(self.images.shape)}"
        assert self.texts.shape[0] == n, f"texts {tuple(self.texts.shape)} does not match {n} images"
        assert self.valid.shape == (n,), f"valid must be [{n}], got {tuple(self.valid.shape)}"

    def __len__(self) -> int:
        return self.images.shape[0]

    @property
    def num_valid(self) -> int:
        return int(self.valid.sum())

    def to(self, device: torch.device | str, float_dtype: torch.dtype | None = None) -> Batch:
        """Move tensors to ``device``; floating tensors (images) also to ``float_dtype`` if given."""
        moved = {}
        for f in fields(self):
            value = getattr(self, f.name)
            if isinstance(value, torch.Tensor):
                dtype = float_dtype if (float_dtype is not None and value.is_floating_point()) else None
                value = value.to(device=device, dtype=dtype)
            elif isinstance(value, dict):  # triples, knowledge rows, teacher features: images take float_dtype too
                value = {k: v.to(device=device, dtype=float_dtype if (float_dtype is not None and v.is_floating_point())
                                else None) for k, v in value.items()}
            moved[f.name] = value
        return Batch(**moved)
