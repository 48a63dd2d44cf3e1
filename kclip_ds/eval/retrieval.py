"""Image↔text retrieval R@k over a split encoded on every rank (no rank-0-only passes: no deadlock).

Each rank encodes its share of the split through the method's ``forward(mode="encode")``; the
embeddings are all-gathered (padding rows dropped) and every rank computes the same metrics.
Caption i belongs to image i (one caption per sample, as in the shard format).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

import torch
import torch.distributed as dist

from kclip_ds.data.schema import Batch

EncodeFn = Callable[..., dict]  # encode(images | None, texts | None[, triples]) -> {"image_features", "text_features"}


def gather_valid_rows(x: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """[n, D] per rank (equal n on every rank) → rows with valid=True from all ranks, in rank order."""
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        xs = [torch.empty_like(x) for _ in range(dist.get_world_size())]
        vs = [torch.empty_like(valid) for _ in range(dist.get_world_size())]
        dist.all_gather(xs, x.contiguous())
        dist.all_gather(vs, valid.contiguous())
        x, valid = torch.cat(xs), torch.cat(vs)
    return x[valid]


@torch.no_grad()
def encode_split(encode: EncodeFn, batches: Iterable[Batch], device: torch.device, dtype: torch.dtype,
                 with_texts: bool = True) -> dict[str, torch.Tensor]:
    """Embeddings of a whole split, gathered from all ranks: image [N, D], text [N, D] (float32), labels [N]."""
    images, texts, labels, valids = [], [], [], []
    for batch in batches:
        b = batch.to(device, dtype)
        out = encode(b.images, b.texts, b.triples) if with_texts else encode(b.images, None)
        images.append(out["image_features"].float().cpu())
        if with_texts:
            texts.append(out["text_features"].float().cpu())
        if batch.labels is not None:
            labels.append(batch.labels)
        valids.append(batch.valid)
    valid = torch.cat(valids)
    result = {"image": gather_valid_rows(torch.cat(images), valid)}
    if with_texts:
        result["text"] = gather_valid_rows(torch.cat(texts), valid)
    if labels:
        result["labels"] = gather_valid_rows(torch.cat(labels)[:, None], valid)[:, 0]
    return result


def recall_at_k(similarity: torch.Tensor, ks: list[int]) -> dict[int, float]:
    """similarity: [N, N] with the match of row i in column i → {k: fraction of rows whose match ranks < k}."""
    n = similarity.shape[0]
    assert similarity.shape == (n, n), f"similarity must be square, got {tuple(similarity.shape)}"
    correct = similarity.diagonal()[:, None]
    rank = (similarity > correct).sum(dim=1)  # strictly better candidates; ties count in the match's favour
    return {k: float((rank < k).float().mean()) for k in ks}


def retrieval_metrics(image: torch.Tensor, text: torch.Tensor, ks: list[int], prefix: str = "") -> dict[str, float]:
    """image, text: [N, D] L2-normalised; returns {prefix}image_to_text_R@k and {prefix}text_to_image_R@k."""
    assert image.shape == text.shape, f"image {tuple(image.shape)} vs text {tuple(text.shape)}"
    sim = image @ text.T
    metrics = {}
    for name, s in (("image_to_text", sim), ("text_to_image", sim.T)):
        for k, value in recall_at_k(s, ks).items():
            metrics[f"{prefix}{name}_R@{k}"] = value
    metrics[f"{prefix}num_samples"] = float(image.shape[0])
    return metrics
