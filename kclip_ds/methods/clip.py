"""Plain CLIP and NegCLIP: embed images and captions with the towers, compare with InfoNCE across ranks.

    v = f_img(x) / ‖·‖,  c = f_txt(y) / ‖·‖,  L = InfoNCE(s · v cᵀ)   (s = exp(logit_scale))
    NegCLIP: hard-negative captions c⁻ join the image→text candidates: L = InfoNCE(s · v [c; c⁻]ᵀ)

A method is an ``nn.Module`` whose ``forward`` is the only entry point (ZeRO-3 gathers parameters
inside hooked forwards), with two modes: "loss" → {"loss", "logs"}, "encode" → embeddings.
"""

from __future__ import annotations

import logging

import torch
from torch import nn

from kclip_ds.config import MethodConfig
from kclip_ds.kernels import build_contrastive_loss

MAX_LOGIT_SCALE = 100.0
log = logging.getLogger(__name__)


class ClipMethod(nn.Module):
    def __init__(self, model: nn.Module, cfg: MethodConfig | None = None):
        """cfg: only ``fused_loss``/``loss_tile`` are read here (None: the defaults, the dense loss)."""
        super().__init__()
        cfg = cfg if cfg is not None else MethodConfig()
        self.model = model
        self.contrastive = build_contrastive_loss(cfg.fused_loss, cfg.loss_tile)

    def forward(self, images: torch.Tensor | None = None, texts: torch.Tensor | None = None,
                valid: torch.Tensor | None = None, neg_texts: torch.Tensor | None = None,
                neg_valid: torch.Tensor | None = None, mode: str = "loss") -> dict:
        """images: [B, 3, H, W]; texts: [B, L]; valid: [B] bool; neg_texts: [B, L] hard negatives (NegCLIP)
        with neg_valid: [B] bool (False where a sample has none), or None for plain CLIP.

        mode="encode": {"image_features": [B, D] | None, "text_features": [B, D] | None} (either input may be None).
        mode="loss":   {"loss": scalar, "logs": {"logit_scale": float}}.
        """
        with_negatives = neg_texts is not None and mode == "loss"
        if with_negatives:  # one text-tower pass over captions and negatives together
            assert neg_texts.shape == texts.shape, f"neg_texts {tuple(neg_texts.shape)} != texts {tuple(texts.shape)}"
            texts = torch.cat([texts, neg_texts])
        out = self.model(image=images, text=texts)
        neg_features = None
        if with_negatives:
            out["text_features"], neg_features = out["text_features"].chunk(2)
        if mode == "encode":
            return {"image_features": out["image_features"], "text_features": out["text_features"]}
        if mode != "loss":
            raise ValueError(f"unknown mode {mode!r} (expected 'loss' or 'encode')")
        # open_clip clamps logit_scale to ln(100) after every step; a clamp in forward does the same job
        # without touching optimizer-owned (ZeRO-partitioned, fp32 master) weights.
        logit_scale = out["logit_scale"].clamp(max=MAX_LOGIT_SCALE)
        loss = self.contrastive(out["image_features"], out["text_features"], logit_scale, valid,
                                neg_text_features=neg_features, neg_valid=neg_valid)
        return {"loss": loss, "logs": {"logit_scale": logit_scale.detach().float().mean()}}
