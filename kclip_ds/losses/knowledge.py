"""Knowledge-CLIP's losses across ranks: entity retrieval (E2E, G2E) and distillation from a teacher (KD).

Both follow the convention of :mod:`kclip_ds.losses.contrastive`: each rank scores its own rows against the
global batch's columns (gathered with gradients), invalid rows are neither anchors nor candidates, and the
per-rank value is scaled so that the mean over ranks is the global mean.

    E2E / G2E:  L_r = W/N_valid · Σ_{i local, valid} CE(s · q_i · Kᵀ, i),  columns j ≠ i with id_j = id_i masked,
                and (with ``query_groups``) columns j ≠ i whose query group equals i's
    KD:         L_r = W/(2·N_valid) · Σ_{i local, valid} [ KL(p_t(i→·) ‖ p_s(i→·)) + KL(p_t(·→i) ‖ p_s(·→i)) ]

Masking the other copies of the same entity keeps a batch that holds a class synset twice from calling
one copy a negative of the other.  Query groups go one step further (the "filtered" setting of KG link
prediction, restricted to the batch): two rows that ask the same question — E2E's (?, is an image of, boot)
for two different boot images — have each other's answers as true answers too, so neither is a negative.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from kclip_ds.losses.contrastive import check_pair, gather_features, gather_mask

NEG_INF = float("-inf")


def rank() -> int:
    """This process's rank, 0 without torch.distributed."""
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


class EntityContrastiveLoss(nn.Module):
    """One-directional InfoNCE: each valid query retrieves its own key among the global batch's keys."""

    def forward(self, queries: torch.Tensor, keys: torch.Tensor, entity_ids: torch.Tensor, valid: torch.Tensor,
                logit_scale: torch.Tensor, query_groups: torch.Tensor | None = None) -> torch.Tensor:
        """queries, keys: [B, D] L2-normalised; entity_ids: [B] int64 (the key's entity); valid: [B] bool;
        logit_scale: exp(τ), [] or [1]; query_groups: [B, K] int64 or None — rows with equal groups (all K
        values) ask the same question, so their keys are not each other's negatives.  Returns a scalar (0 with
        grad when no rank has a valid row)."""
        valid, world = check_pair(queries, keys, valid)
        assert entity_ids.shape == valid.shape, f"entity_ids must be [{len(valid)}], got {tuple(entity_ids.shape)}"
        assert query_groups is None or (query_groups.dim() == 2 and query_groups.shape[0] == len(valid)), \
            f"query_groups must be [{len(valid)}, K], got {tuple(query_groups.shape)}"
        batch = queries.shape[0]
        all_keys, all_ids, all_valid = gather_features(keys.float()), gather_mask(entity_ids), gather_mask(valid)
        labels = torch.arange(batch, device=queries.device) + rank() * batch
        logits = logit_scale.float().reshape(()) * queries.float() @ all_keys.T
        duplicate = entity_ids[:, None] == all_ids[None, :]
        if query_groups is not None:
            all_groups = gather_mask(query_groups)
            duplicate |= (query_groups[:, None, :] == all_groups[None, :, :]).all(-1)
        duplicate[torch.arange(batch, device=queries.device), labels] = False
        logits = logits.masked_fill(duplicate | ~all_valid[None, :], NEG_INF)
        rows = valid.nonzero(as_tuple=True)[0]
        total = F.cross_entropy(logits[rows], labels[rows], reduction="sum")
        return total * world / all_valid.sum().clamp(min=1)


def _kl_rows(student: torch.Tensor, teacher: torch.Tensor, column_mask: torch.Tensor) -> torch.Tensor:
    """Σ_rows KL(softmax(teacher) ‖ softmax(student)) with masked columns (−inf in both) contributing 0."""
    log_s = student.masked_fill(column_mask, NEG_INF).log_softmax(-1)
    log_t = teacher.masked_fill(column_mask, NEG_INF).log_softmax(-1)
    kl = F.kl_div(log_s, log_t, reduction="none", log_target=True)
    return kl.masked_fill(column_mask.expand_as(kl), 0.0).sum()


class DistillationLoss(nn.Module):
    """KL between a frozen teacher's image–text similarity distributions and the student's, both directions."""

    def forward(self, image_features: torch.Tensor, text_features: torch.Tensor, logit_scale: torch.Tensor,
                teacher_image: torch.Tensor, teacher_text: torch.Tensor, teacher_scale: torch.Tensor,
                valid: torch.Tensor) -> torch.Tensor:
        """Student and teacher features: [B, D] / [B, D_t] L2-normalised (teacher's without grad); scales exp(τ)."""
        valid, world = check_pair(image_features, text_features, valid)
        assert teacher_image.shape == teacher_text.shape and teacher_image.shape[0] == len(valid), \
            f"teacher features {tuple(teacher_image.shape)} / {tuple(teacher_text.shape)} do not match {len(valid)} rows"
        s, s_t = logit_scale.float().reshape(()), teacher_scale.float().reshape(())
        v, c = image_features.float(), text_features.float()
        tv, tc = teacher_image.detach().float(), teacher_text.detach().float()
        all_v, all_c, all_valid = gather_features(v), gather_features(c), gather_mask(valid)
        all_tv, all_tc = gather_mask(tv), gather_mask(tc)  # no gradient: a plain all-gather
        rows = valid.nonzero(as_tuple=True)[0]
        column_mask = ~all_valid[None, :]
        total = (_kl_rows(s * v[rows] @ all_c.T, s_t * tv[rows] @ all_tc.T, column_mask)
                 + _kl_rows(s * c[rows] @ all_v.T, s_t * tc[rows] @ all_tv.T, column_mask))
        return total * world / (2 * all_valid.sum().clamp(min=1))


class GlobalCrossEntropy(nn.Module):
    """Cross-entropy over the valid rows of the global batch: W/N_valid · Σ_{i local, valid} CE(logits_i, y_i)."""

    def forward(self, logits: torch.Tensor, labels: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
        """logits: [B, C]; labels: [B] int64 (any value on invalid rows); valid: [B] bool."""
        assert logits.dim() == 2 and labels.shape == valid.shape == logits.shape[:1], \
            f"logits [B, C], labels [B], valid [B] expected, got {tuple(logits.shape)}, {tuple(labels.shape)}, " \
            f"{tuple(valid.shape)}"
        world = dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1
        rows = valid.nonzero(as_tuple=True)[0]
        total = F.cross_entropy(logits[rows].float(), labels[rows], reduction="sum")
        return total * world / gather_mask(valid).sum().clamp(min=1)
