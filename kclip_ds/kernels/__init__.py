"""Memory-lean loss paths: the contrastive and ranking losses in tiles, O(B·D + B) memory instead of B × N.

``build_contrastive_loss`` and ``build_hinge`` are the one place that picks a path from
``method.fused_loss`` / ``method.loss_tile``; ``loss_path`` names the path for the start-up log line.
Every path has the forward signature and result of the dense loss it replaces (tests/test_tiled_loss.py).
"""

from __future__ import annotations

from torch import nn

from kclip_ds.kernels.tiled_hinge import TiledHardestNegative, TiledMaxViolationHinge
from kclip_ds.kernels.tiled_infonce import TiledContrastiveLoss, TiledCrossEntropy
from kclip_ds.losses.contrastive import ContrastiveLoss
from kclip_ds.losses.ranking import MaxViolationHinge

__all__ = ["TiledContrastiveLoss", "TiledCrossEntropy", "TiledHardestNegative", "TiledMaxViolationHinge",
           "build_contrastive_loss", "build_hinge", "loss_path"]

# ---- Triton path (not built) -------------------------------------------------------------------------
# A fused GPU kernel would slot in here: ``loss_path`` returns "tiled triton (tile N)" and the builders
# return it when CUDA and triton are available, before the torch fallback.  Until a kernel exists and is
# tested against the dense loss, the tiled torch path runs everywhere, and the log line says so.
# -------------------------------------------------------------------------------------------------------


def loss_path(fused: bool, tile: int) -> str:
    """What the start-up log says runs: "dense" or "tiled torch (tile 1024)"."""
    return f"tiled torch (tile {tile})" if fused else "dense"


def build_contrastive_loss(fused: bool, tile: int) -> nn.Module:
    return TiledContrastiveLoss(tile) if fused else ContrastiveLoss()


def build_hinge(margin: float, fused: bool, tile: int) -> nn.Module:
    return TiledMaxViolationHinge(margin=margin, tile=tile) if fused else MaxViolationHinge(margin=margin)
