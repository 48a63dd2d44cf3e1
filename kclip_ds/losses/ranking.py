"""Structure-CLIP's ranking losses across ranks, padding rows masked (METHODS.md §2).

S = v · tᵀ with image features v and (knowledge-fused) text features t; no temperature.

Max-violation hinge (VSE++), margin m = 0.2, over the GLOBAL batch (all ranks, valid rows only):

    h_i2t(i) = relu(max_{j≠i, valid} S_ij + m − S_ii)          image i against every other text
    h_t2i(i) = relu(max_{j≠i, valid} S_ji + m − S_ii)          text i against every other image
    L_h      = 1/N_valid · Σ_{i valid} [ h_i2t(i) + h_t2i(i) ]

Warm-up (``mean_text_to_image=True``; the reference does this for the first 100 steps of the first
epoch): the text→image max becomes a mean, h_t2i(i) = relu(mean_{j≠i, valid} S_ji + m − S_ii).  The
reference code (``torch.mean(cos_text2img, dim=-1)``) averages the whole row, the positive S_ii
included; ``warmup_mean_includes_positive=True`` reproduces that exactly.

Structural-negative loss, margin m = 0.1, on plain caption features c and negative captions c⁻:

    L_n = 1/N_neg · Σ_{i valid, has negative} relu(m − (v_i·c_i − v_i·c⁻_i))

Distributed convention (as in :mod:`kclip_ds.losses.contrastive`): each rank scores its own rows
against every rank's columns (all-gathered with gradients) and returns W/N · Σ_{local rows} terms,
so the mean over ranks — what DeepSpeed's gradient averaging optimises — is the global loss above.
Rows with valid=False are neither anchors nor negatives.  A row without any valid negative (a global
batch of one valid row) contributes 0 to the hinge; a batch where no row has a negative gives
L_n = 0 with a graph attached.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from kclip_ds.losses.contrastive import gather_features, gather_mask


def _world_and_rank() -> tuple[int, int]:
    world = dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1
    return world, (dist.get_rank() if world > 1 else 0)


def _check_mask(mask: torch.Tensor | None, name: str, batch: int, device: torch.device) -> torch.Tensor:
    if mask is None:
        return torch.ones(batch, dtype=torch.bool, device=device)
    assert mask.shape == (batch,), f"{name} must be [{batch}], got {tuple(mask.shape)}"
    assert mask.dtype == torch.bool, f"{name} must be bool, got {mask.dtype}"
    return mask


class MaxViolationHinge(nn.Module):
    """VSE++ max-violation hinge with the hardest negative taken over the global batch."""

    def __init__(self, margin: float = 0.2, warmup_mean_includes_positive: bool = False) -> None:
        super().__init__()
        self.margin = margin
        self.warmup_mean_includes_positive = warmup_mean_includes_positive

    @staticmethod
    def _inputs(image_features: torch.Tensor, text_features: torch.Tensor,
                valid: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, int, int]:
        """The checked inputs of forward: v, t [B, D] as fp32, valid [B] bool (None: every row), world, rank."""
        assert image_features.ndim == 2, f"image_features must be [B, D], got {tuple(image_features.shape)}"
        assert text_features.shape == image_features.shape, (
            f"text_features {tuple(text_features.shape)} != image_features {tuple(image_features.shape)}")
        valid = _check_mask(valid, "valid", image_features.shape[0], image_features.device)
        return image_features.float(), text_features.float(), valid, *_world_and_rank()

    def forward(self, image_features: torch.Tensor, text_features: torch.Tensor,
                valid: torch.Tensor | None = None, mean_text_to_image: bool = False) -> torch.Tensor:
        """image_features v, text_features t: [B, D] (t need not be unit length); valid: [B] bool.

        ``mean_text_to_image``: the warm-up, mean instead of max over negatives for text→image only.
        """
        v, t, valid, world, rank = self._inputs(image_features, text_features, valid)
        batch = v.shape[0]
        all_v, all_t = gather_features(v), gather_features(t)
        all_valid = gather_mask(valid)
        labels = torch.arange(batch, device=v.device) + rank * batch
        columns = torch.arange(all_valid.shape[0], device=v.device)
        is_positive = columns[None, :] == labels[:, None]  # [B, W·B]
        negative = all_valid[None, :] & ~is_positive
        has_negative = negative.any(dim=1)

        positive = (v * t).sum(dim=-1)  # S_ii
        s_i2t = v @ all_t.T  # row i: S_ij over global texts j
        s_t2i = t @ all_v.T  # row i: S_ji over global images j
        hardest_i2t = s_i2t.masked_fill(~negative, float("-inf")).amax(dim=1)
        if not mean_text_to_image:
            neg_t2i = s_t2i.masked_fill(~negative, float("-inf")).amax(dim=1)
        else:
            averaged = (negative | is_positive) if self.warmup_mean_includes_positive else negative
            neg_t2i = s_t2i.masked_fill(~averaged, 0.0).sum(dim=1) / averaged.sum(dim=1).clamp(min=1)
        terms = F.relu(hardest_i2t + self.margin - positive) + F.relu(neg_t2i + self.margin - positive)
        terms = torch.where(has_negative, terms, torch.zeros_like(terms))
        rows = valid.nonzero(as_tuple=True)[0]
        n_valid = all_valid.sum().clamp(min=1)
        return terms[rows].sum() * world / n_valid


class NegativeMarginLoss(nn.Module):
    """Margin between each image's own caption and its structural negative (swapped relation/attributes)."""

    def __init__(self, margin: float = 0.1) -> None:
        super().__init__()
        self.margin = margin

    def forward(self, image_features: torch.Tensor, text_features: torch.Tensor,
                negative_features: torch.Tensor, neg_valid: torch.Tensor | None = None,
                valid: torch.Tensor | None = None) -> torch.Tensor:
        """image_features v, text_features c (plain captions), negative_features c⁻: [B, D];
        neg_valid: [B] bool, False where a sample has no negative; valid: [B] bool (padding)."""
        assert image_features.ndim == 2, f"image_features must be [B, D], got {tuple(image_features.shape)}"
        assert text_features.shape == image_features.shape, (
            f"text_features {tuple(text_features.shape)} != image_features {tuple(image_features.shape)}")
        assert negative_features.shape == image_features.shape, (
            f"negative_features {tuple(negative_features.shape)} != image_features "
            f"{tuple(image_features.shape)}")
        batch = image_features.shape[0]
        neg_valid = _check_mask(neg_valid, "neg_valid", batch, image_features.device)
        valid = _check_mask(valid, "valid", batch, image_features.device)
        world, _ = _world_and_rank()

        used = valid & neg_valid
        count = used.sum()
        if world > 1:
            dist.all_reduce(count)
        # Select first, so that whatever unused rows hold (no negative: any placeholder) never enters;
        # an empty selection still sums to a 0 attached to the graph, so backward works on every rank.
        rows = used.nonzero(as_tuple=True)[0]
        v = image_features[rows].float()
        gap = (v * text_features[rows].float()).sum(dim=-1) - (v * negative_features[rows].float()).sum(dim=-1)
        return F.relu(self.margin - gap).sum() * world / count.clamp(min=1)
