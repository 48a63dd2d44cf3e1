"""Structure tests on a split with scene graphs: does the image prefer its caption over a swap of it?

For every sample whose ``sg.json`` allows it, a relation swap ("a blue square to the left of a red circle")
and an attribute swap ("a blue circle to the left of a red square") are made with the same deterministic
generator as training (epoch 0, seed 0), and the sample counts as correct when v·c > v·c⁻.  Captions are
scored with the text tower alone (no knowledge input), the same way for every method, so the numbers
compare methods on what their towers learned.  All ranks take part; all return the same numbers.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
import torch.distributed as dist

from kclip_ds.data.schema import Batch
from kclip_ds.eval.retrieval import EncodeFn


@torch.no_grad()
def swap_accuracy(encode: EncodeFn, batches: Iterable[Batch], device: torch.device, dtype: torch.dtype,
                  tie_tolerance: float = 1e-5) -> tuple[float, int]:
    """(accuracy, number of scored samples) over rows that are valid and have a negative.

    A win needs v·c > v·c⁻ + tie_tolerance: a bag-of-words model scores a caption and its swap equally,
    and float noise between two batched matmuls must not turn that tie into random wins."""
    correct = torch.zeros(2, dtype=torch.float64)  # [correct, total]
    for batch in batches:
        assert batch.neg_texts is not None, "swap_accuracy needs a decoder with negative_kinds"
        b = batch.to(device, dtype)
        out = encode(b.images, b.texts)
        neg = encode(None, b.neg_texts)["text_features"].float()
        image, text = out["image_features"].float(), out["text_features"].float()
        rows = (batch.valid & batch.neg_valid).to(image.device)
        wins = (image * text).sum(-1) > (image * neg).sum(-1) + tie_tolerance
        correct += torch.tensor([float(wins[rows].sum()), float(rows.sum())], dtype=torch.float64)
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(correct)
    total = int(correct[1])
    return (float(correct[0] / total) if total else float("nan")), total
