"""CLIP InfoNCE across ranks, with gradients through the gather and padding rows masked.

Semantics are open_clip's ``ClipLoss(local_loss=True, gather_with_grad=True)``: each rank scores
its own rows against every rank's columns; the all-gather passes gradients back to the rank that
produced the features.  Rows with valid=False (end-of-epoch padding, corrupt samples) are neither
anchors nor candidates.  With all rows valid the value equals open_clip's on one process.

    L_r = W / (2·N_valid) · Σ_{i local, valid} [ CE(s·v_i·Cᵀ, i) + CE(s·c_i·Vᵀ, i) ]

so the mean of L_r over ranks (what DeepSpeed's gradient averaging optimises) is the global loss.

NegCLIP (Yuksekgonul et al.): hard-negative captions c⁻ are appended as extra text columns of the
image→text logits, gathered across ranks like the captions (B × 2·W·B logits per rank); samples without
a negative (neg_valid=False) contribute no column.  The text→image direction is unchanged.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.distributed.nn.functional as dist_fn
import torch.nn.functional as F
from torch import nn


def gather_features(features: torch.Tensor) -> torch.Tensor:
    """[B, D] on each rank → [W·B, D] in rank order, differentiable (backward sums into the owner)."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return features
    return torch.cat(dist_fn.all_gather(features), dim=0)


def check_pair(image_features: torch.Tensor, text_features: torch.Tensor,
               valid: torch.Tensor | None) -> tuple[torch.Tensor, int]:
    """Shapes checked; ``valid`` defaulted to all rows; returns (valid, world size)."""
    assert image_features.shape == text_features.shape, (
        f"image_features {tuple(image_features.shape)} != text_features {tuple(text_features.shape)}")
    batch = image_features.shape[0]
    if valid is None:
        valid = torch.ones(batch, dtype=torch.bool, device=image_features.device)
    assert valid.shape == (batch,), f"valid must be [{batch}], got {tuple(valid.shape)}"
    return valid, (dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1)


def gather_mask(valid: torch.Tensor) -> torch.Tensor:
    """[B] bool on each rank → [W·B] bool (no gradient)."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return valid
    parts = [torch.empty_like(valid) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, valid.contiguous())
    return torch.cat(parts)


class ContrastiveLoss(nn.Module):
    def forward(self, image_features: torch.Tensor, text_features: torch.Tensor, logit_scale: torch.Tensor,
                valid: torch.Tensor | None = None, neg_text_features: torch.Tensor | None = None,
                neg_valid: torch.Tensor | None = None) -> torch.Tensor:
        """image_features, text_features: [B, D] L2-normalised; logit_scale: exp(τ), [] or [1]; valid: [B] bool;
        neg_text_features: [B, D] hard-negative captions (NegCLIP) with neg_valid: [B] bool, or None."""
        valid, world = check_pair(image_features, text_features, valid)
        batch = image_features.shape[0]
        rank = dist.get_rank() if world > 1 else 0

        image_features, text_features = image_features.float(), text_features.float()
        all_images, all_texts = gather_features(image_features), gather_features(text_features)
        all_valid = gather_mask(valid)
        scale = logit_scale.float().reshape(())
        column_mask = ~all_valid[None, :]
        logits_i2t = (scale * image_features @ all_texts.T).masked_fill(column_mask, float("-inf"))
        if neg_text_features is not None:
            assert neg_text_features.shape == text_features.shape, (
                f"neg_text_features {tuple(neg_text_features.shape)} != text_features {tuple(text_features.shape)}")
            assert neg_valid is not None and neg_valid.shape == (batch,), "neg_valid must be [B] with negatives"
            all_negs = gather_features(neg_text_features.float())
            neg_columns = ~(gather_mask(neg_valid & valid))[None, :]
            logits_neg = (scale * image_features @ all_negs.T).masked_fill(neg_columns, float("-inf"))
            logits_i2t = torch.cat([logits_i2t, logits_neg], dim=1)
        logits_t2i = (scale * text_features @ all_images.T).masked_fill(column_mask, float("-inf"))
        labels = torch.arange(batch, device=image_features.device) + rank * batch
        rows = valid.nonzero(as_tuple=True)[0]
        per_row = (F.cross_entropy(logits_i2t[rows], labels[rows], reduction="sum")
                   + F.cross_entropy(logits_t2i[rows], labels[rows], reduction="sum"))
        n_valid = all_valid.sum().clamp(min=1)
        return per_row * world / (2 * n_valid)
