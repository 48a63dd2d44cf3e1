"""Structure-CLIP: scene-graph knowledge fused into the caption embedding, trained with hinge losses.

    v = f_img(x),  c = f_txt(y),  c⁻ = f_txt(swap(y)),  k = KEE(triples of y)      (all L2-normalised)
    t = c + λ_k · k                                                                  (not renormalised)
    L = L_hinge(v, t) + λ_n · L_neg(v, c, c⁻)  [+ w_nce · InfoNCE(s · v tᵀ)]

L_hinge is VSE++'s max-violation hinge (margin 0.2) with the hardest negative over the global batch;
during the first ``warmup_steps`` the text→image direction takes the mean over negatives (the reference's
warm-up).  L_neg (margin 0.1) compares each image with its caption and the caption's structure swap.
``forward(mode="encode")`` returns v and the fused t, so evaluation scores what the method computes.
"""

from __future__ import annotations

import logging

import torch
from torch import nn

from kclip_ds.config import MethodConfig
from kclip_ds.kernels import build_contrastive_loss, build_hinge
from kclip_ds.losses.ranking import NegativeMarginLoss
from kclip_ds.models.graph import TripleEncoder

MAX_LOGIT_SCALE = 100.0
log = logging.getLogger(__name__)


class StructureClipMethod(nn.Module):
    def __init__(self, model: nn.Module, cfg: MethodConfig):
        super().__init__()
        self.model = model
        token_dim = model.token_embedding.embedding_dim
        embed_dim = model.text_projection.shape[1]
        self.triple_encoder = TripleEncoder(token_dim=token_dim, width=cfg.graph_width, out_dim=embed_dim,
                                            layers=cfg.graph_layers, heads=cfg.graph_heads,
                                            max_triples=cfg.max_triples, relation_bias=cfg.relation_bias)
        self.triple_encoder.set_grad_checkpointing(cfg.graph_grad_checkpointing)
        self.lambda_k, self.neg_weight, self.infonce_weight = cfg.lambda_k, cfg.neg_weight, cfg.infonce_weight
        self.hinge = build_hinge(cfg.hinge_margin, cfg.fused_loss, cfg.loss_tile)
        self.negative = NegativeMarginLoss(margin=cfg.neg_margin)  # O(B·D) already: nothing to tile
        self.contrastive = build_contrastive_loss(cfg.fused_loss, cfg.loss_tile)

    def forward(self, images: torch.Tensor | None = None, texts: torch.Tensor | None = None,
                valid: torch.Tensor | None = None, neg_texts: torch.Tensor | None = None,
                neg_valid: torch.Tensor | None = None, triples: dict[str, torch.Tensor] | None = None,
                warmup: bool = False, mode: str = "loss") -> dict:
        """images [B,3,H,W]; texts, neg_texts [B,L]; valid, neg_valid [B] bool; triples: heads_ids/rels_ids/
        tails_ids [B,T,P], triple_mask [B,T], entity_ids [B,T,2] (None: no knowledge, t = c)."""
        with_negatives = neg_texts is not None and mode == "loss"
        text_in = torch.cat([texts, neg_texts]) if (with_negatives and texts is not None) else texts
        out = self.model(image=images, text=text_in)
        c = out["text_features"]
        c_neg = None
        if with_negatives and c is not None:
            c, c_neg = c.chunk(2)
        t = c
        if c is not None and triples is not None:
            k, has_knowledge = self.triple_encoder(
                triples["heads_ids"], triples["rels_ids"], triples["tails_ids"], triples["triple_mask"],
                self.model.token_embedding, triples.get("entity_ids"))
            t = c + self.lambda_k * k.to(c.dtype) * has_knowledge[:, None].to(c.dtype)
        if mode == "encode":
            return {"image_features": out["image_features"], "text_features": t}
        if mode != "loss":
            raise ValueError(f"unknown mode {mode!r} (expected 'loss' or 'encode')")
        v = out["image_features"]
        loss_hinge = self.hinge(v, t, valid, mean_text_to_image=warmup)
        logs = {"loss_hinge": loss_hinge.detach()}
        loss = loss_hinge
        if c_neg is not None:
            loss_neg = self.negative(v, c, c_neg, neg_valid=neg_valid, valid=valid)
            loss = loss + self.neg_weight * loss_neg
            logs["loss_neg"] = loss_neg.detach()
        logit_scale = out["logit_scale"].clamp(max=MAX_LOGIT_SCALE)
        if self.infonce_weight:
            loss_nce = self.contrastive(v, t, logit_scale, valid)
            loss = loss + self.infonce_weight * loss_nce
            logs["loss_infonce"] = loss_nce.detach()
        logs["logit_scale"] = logit_scale.detach().float().mean()
        return {"loss": loss, "logs": logs}
