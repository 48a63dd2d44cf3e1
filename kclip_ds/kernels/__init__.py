"""Memory-lean loss paths: the contrastive and ranking losses in tiles, O(B·D + B) memory instead of B × N.

``build_contrastive_loss`` and ``build_hinge`` are the one place that picks a path from
``method.fused_loss`` / ``method.loss_tile``; ``loss_path`` names the path for the start-up log line.
Every path has the forward signature and result of the dense loss it replaces (tests/test_tiled_loss.py).
"""

from __future__ import annotations

import torch
from torch import nn

from kclip_ds.kernels.tiled_hinge import TiledHardestNegative, TiledMaxViolationHinge
from kclip_ds.kernels.tiled_infonce import TiledContrastiveLoss, TiledCrossEntropy, tile_backend
from kclip_ds.losses.contrastive import ContrastiveLoss
from kclip_ds.losses.ranking import MaxViolationHinge

__all__ = ["TiledContrastiveLoss", "TiledCrossEntropy", "TiledHardestNegative", "TiledMaxViolationHinge",
           "build_contrastive_loss", "build_hinge", "loss_path", "tile_backend"]

# ---- Triton path --------------------------------------------------------------------------------------
# kclip_ds/kernels/triton_infonce.py runs the InfoNCE tile loop (TritonCrossEntropy, same signature and
# gradients as TiledCrossEntropy).  TiledContrastiveLoss(backend="auto") picks it per call when the features
# are on CUDA and triton imports; "torch" never does, "triton" insists (CPU: only under TRITON_INTERPRET=1,
# as the tests run it).  The hinge has no Triton path: its tiles are one argmax scan, no recomputation.
# -------------------------------------------------------------------------------------------------------


def loss_path(fused: bool, tile: int, device: torch.device | str | None = None, backend: str = "auto") -> str:
    """What the start-up log says runs: "dense", "tiled torch (tile 1024)" or "tiled triton (tile 1024)".
    device: where the loss will run; None reads as the CPU the model is built on."""
    if not fused:
        return "dense"
    return f"tiled {tile_backend(backend, device if device is not None else 'cpu')} (tile {tile})"


def build_contrastive_loss(fused: bool, tile: int, backend: str = "auto") -> nn.Module:
    return TiledContrastiveLoss(tile, backend) if fused else ContrastiveLoss()


def build_hinge(margin: float, fused: bool, tile: int) -> nn.Module:
    return TiledMaxViolationHinge(margin=margin, tile=tile) if fused else MaxViolationHinge(margin=margin)
