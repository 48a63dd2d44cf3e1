"""VSE++ max-violation hinge in tiles: the hardest negatives without the B × N similarity matrix.

Same value and gradients as :class:`kclip_ds.losses.ranking.MaxViolationHinge` (see its docstring for the
loss).  :class:`TiledHardestNegative` scans S = X·Yᵀ tile by tile and keeps, per row (and per column), the
running max and its index; backward needs no recomputation, only the saved indices:

    h_i = x_i·y_{a(i)}  ⇒  dx_i += g_i·y_{a(i)},  dy_{a(i)} += g_i·x_i

A world of one scans v·cᵀ once for both directions (row max: image→text, column max: text→image); a world
of W scans the local rows against the gathered columns twice, as the dense loss does.  The warm-up mean
(text→image) is linear in the features — mean_j S_ji = (t_i·Σ_j v_j − [S_ii]) / count — so it is computed
in closed form in O(B·D), no tiles.

One difference from the dense loss: where two negatives tie exactly for the max, ``amax`` splits the gradient
between them and the argmax here gives it all to the first; values are the same.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from kclip_ds.kernels.tiled_infonce import (
    NEG_INF,
    Scratch,
    padding,
    spans,
    tile_scores,
    zero_padding,
)
from kclip_ds.losses.contrastive import gather_features, gather_mask
from kclip_ds.losses.ranking import MaxViolationHinge


def valid_rows(valid: torch.Tensor) -> torch.Tensor | slice:
    """Index of the valid rows, taken before anything else touches the features so that padding (whatever it
    holds) gets exactly 0; a plain slice when all are valid, which indexes without copying [B, D]."""
    return slice(None) if bool(valid.all()) else valid.nonzero(as_tuple=True)[0]


def running_max(best: torch.Tensor, best_at: torch.Tensor, values: torch.Tensor, at: torch.Tensor) -> None:
    """In place: where ``values`` beat ``best`` (strictly: the first max wins), take them and their index."""
    better = values > best
    best.copy_(torch.where(better, values, best))
    best_at.copy_(torch.where(better, at, best_at))


class TiledHardestNegative(torch.autograd.Function):
    """Hardest negatives of S = X·Yᵀ, never holding more than a tile × tile block.

    x: [B, D] rows; y: [N, D] columns; x_valid [B], y_valid [N] bool; row i's positive is column
    ``offset + i``.  Returns

        row_max [B]: max_{j valid, j ≠ offset+i} x_i·y_j
        col_max [N]: max_{i valid, offset+i ≠ j} x_i·y_j      (with_columns; else an empty tensor)

    -inf for masked rows (columns) and where there is no negative; those entries take no gradient, and what
    masked rows hold (NaN included) never reaches a value or a gradient.
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor, y: torch.Tensor, x_valid: torch.Tensor, y_valid: torch.Tensor,
                offset: int, with_columns: bool, tile: int) -> tuple[torch.Tensor, torch.Tensor]:
        assert x.ndim == 2 and y.ndim == 2 and y.shape[1] == x.shape[1], (
            f"x {tuple(x.shape)} and y {tuple(y.shape)} must be [B, D] and [N, D]")
        assert x_valid.shape == (x.shape[0],) and y_valid.shape == (y.shape[0],), "x_valid/y_valid shapes"
        assert tile >= 1, f"tile must be >= 1, got {tile}"
        x_pad, y_pad = padding(x_valid), padding(y_valid)
        xf, yf = zero_padding(x.float(), x_pad), zero_padding(y.float(), y_pad)
        n_rows, n_cols = x.shape[0], y.shape[0]
        device = x.device
        row_max = torch.full((n_rows,), NEG_INF, dtype=torch.float32, device=device)
        row_at = torch.zeros(n_rows, dtype=torch.long, device=device)
        col_max = torch.full((n_cols if with_columns else 0,), NEG_INF, dtype=torch.float32, device=device)
        col_at = torch.zeros(n_cols if with_columns else 0, dtype=torch.long, device=device)
        scratch = Scratch(1, tile, device)
        for r in spans(n_rows, tile):
            rp = x_pad[r] if x_pad is not None else None
            positives = torch.arange(r.start, r.stop, device=device) + offset  # each row's positive column
            for c in spans(n_cols, tile):
                cp = y_pad[c] if y_pad is not None else None
                sims = tile_scores(xf[r], yf[c], rp, cp, scratch(0, r, c))
                inside = (positives >= c.start) & (positives < c.stop)
                local_rows = inside.nonzero(as_tuple=True)[0]
                sims[local_rows, positives[local_rows] - c.start] = NEG_INF
                values, at = sims.max(dim=1)
                running_max(row_max[r], row_at[r], values, at + c.start)
                if with_columns:
                    values, at = sims.max(dim=0)
                    running_max(col_max[c], col_at[c], values, at + r.start)
        ctx.save_for_backward(x, y, x_valid, y_valid, row_at, col_at, torch.isfinite(row_max),
                              torch.isfinite(col_max))
        return row_max, col_max

    @staticmethod
    def backward(ctx, grad_row: torch.Tensor, grad_col: torch.Tensor):
        x, y, x_valid, y_valid, row_at, col_at, row_found, col_found = ctx.saved_tensors
        xf, yf = zero_padding(x.float(), padding(x_valid)), zero_padding(y.float(), padding(y_valid))
        g_row = grad_row.float().masked_fill(~row_found, 0.0)[:, None]
        dx = g_row * yf[row_at]
        dy = torch.zeros_like(yf).index_add_(0, row_at, g_row * xf)
        if col_at.numel():
            g_col = grad_col.float().masked_fill(~col_found, 0.0)[:, None]
            dy += g_col * xf[col_at]
            dx.index_add_(0, col_at, g_col * yf)
        return dx.to(x.dtype), dy.to(y.dtype), None, None, None, None, None


class TiledMaxViolationHinge(MaxViolationHinge):
    """Drop-in for :class:`~kclip_ds.losses.ranking.MaxViolationHinge` (same forward, same result), in tiles."""

    def __init__(self, margin: float = 0.2, warmup_mean_includes_positive: bool = False,
                 tile: int = 1024) -> None:
        assert tile >= 1, f"tile must be >= 1, got {tile}"
        super().__init__(margin, warmup_mean_includes_positive)
        self.tile = tile

    def forward(self, image_features: torch.Tensor, text_features: torch.Tensor,
                valid: torch.Tensor | None = None, mean_text_to_image: bool = False) -> torch.Tensor:
        v, t, valid, world, rank = self._inputs(image_features, text_features, valid)
        batch = v.shape[0]
        all_valid = gather_mask(valid)
        if world == 1:
            all_v = v
            hardest_i2t, hardest_t2i = TiledHardestNegative.apply(
                v, t, valid, valid, 0, not mean_text_to_image, self.tile)
        else:
            all_v, all_t = gather_features(v), gather_features(t)
            hardest_i2t, _ = TiledHardestNegative.apply(v, all_t, valid, all_valid, rank * batch, False,
                                                        self.tile)
            if not mean_text_to_image:
                hardest_t2i, _ = TiledHardestNegative.apply(t, all_v, valid, all_valid, rank * batch, False,
                                                            self.tile)
        rows = valid_rows(valid)
        v_rows, t_rows = v[rows], t[rows]
        positive = (v_rows * t_rows).sum(dim=-1)  # S_ii
        hardest_i2t = hardest_i2t[rows]
        if mean_text_to_image:
            # Σ_{j valid} S_ji = t_i·Σ_{j valid} v_j; the positive S_ii is in that sum (v_i is valid for a
            # valid row), so taking it out leaves the negatives.
            n_valid = all_valid.sum()
            total = t_rows @ zero_padding(all_v, padding(all_valid)).sum(dim=0)
            if self.warmup_mean_includes_positive:
                neg_t2i = total / n_valid.clamp(min=1)
            else:
                neg_t2i = (total - positive) / (n_valid - 1).clamp(min=1)
        else:
            neg_t2i = hardest_t2i[rows]
        has_negative = torch.isfinite(hardest_i2t)  # the same columns are negatives in both directions
        terms = F.relu(hardest_i2t + self.margin - positive) + F.relu(neg_t2i + self.margin - positive)
        terms = torch.where(has_negative, terms, torch.zeros_like(terms))
        n_valid = all_valid.sum().clamp(min=1)
        return terms.sum() * world / n_valid
