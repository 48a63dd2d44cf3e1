"""CLIP InfoNCE in tiles: O(B·D + B) memory instead of the B × N logit matrix (Inf-CL, Wang et al. 2024).

Same value and gradients as :class:`kclip_ds.losses.contrastive.ContrastiveLoss`: padding rows masked,
NegCLIP's extra text columns in the image→text direction only, the W/(2·N_valid) normalisation:

    L_r = W/(2·N_valid) · Σ_{i local, valid} [ CE_i2t(i) + CE_t2i(i) ],   CE(i) = lse_i − L_i,label(i)

:class:`TiledCrossEntropy` computes the CE vectors tile by tile.  Forward keeps only the LSEs (and the label
logits, read off the tiles); backward recomputes each tile's logits L = s·X_r·Y_cᵀ, turns them into
softmaxes P = exp(L − lse) and, with G = g_row·P_row + g_col·P_col − (g_row + g_col)·δ_label (g: the
incoming per-row gradients, 0 on padding),

    dX_r += s·G·Y_c,    dY_c += s·Gᵀ·X_r,    ds += Σ_ij G_ij·(x_i·y_j) = Σ_i x_i·(G·Y)_i

where the δ part is added once, outside the tiles, in O(B·D).
A world of one: rows and columns are the same samples, so one tile of v·cᵀ yields the image→text row LSEs
and the text→image column LSEs (4 matmuls of B²·D per forward+backward; open_clip's ClipLoss does 6).
A world of W: each rank scores its B rows against the W·B gathered columns, as two row-only problems.

Across ranks the columns come from an all-gather with gradients, as in the dense loss, not a ring exchange:
the gathered features (W·B·D floats; 32 MiB for 16 k × 512 fp32) are small next to the B × W·B logits that
tiling removes, and the gather's backward already returns column gradients to their owner rank.  Measured
(bench/loss_across_ranks.py, docs/RESULTS.md): the gather and its backward are 0.7–2.5 % of the tiled loss's time on
2 gloo ranks, the most a ring could hide.

The same tile loop runs as Triton kernels in :mod:`kclip_ds.kernels.triton_infonce`; this torch path is the
reference, and runs wherever Triton does not (:func:`tile_backend`).
"""

from __future__ import annotations

import logging

import torch
import torch.distributed as dist
from torch import nn

from kclip_ds.losses.contrastive import check_pair, gather_features, gather_mask

NEG_INF = float("-inf")
log = logging.getLogger(__name__)


def padding(valid: torch.Tensor | None) -> torch.Tensor | None:
    """[N] bool valid → [N] bool masked (~valid); None when every entry is valid (nothing to mask)."""
    if valid is None or bool(valid.all()):
        return None
    return ~valid


def zero_padding(features: torch.Tensor, pad: torch.Tensor | None) -> torch.Tensor:
    """Masked rows set to 0, so that whatever they hold (NaN included) never reaches a sum or a matmul."""
    return features if pad is None else features.masked_fill(pad[:, None], 0.0)


def tile_scores(x: torch.Tensor, y: torch.Tensor, x_pad: torch.Tensor | None, y_pad: torch.Tensor | None,
                out: torch.Tensor, scale: float = 1.0) -> torch.Tensor:
    """scale·x·yᵀ into ``out`` ([len(x), len(y)] fp32), with -inf where the row or the column is masked.
    The scale rides in the GEMM (alpha): no extra pass over the tile, no scaled copy of x."""
    out.addmm_(x, y.T, beta=0.0, alpha=scale)  # beta=0: whatever ``out`` held is ignored, NaN included
    if x_pad is not None:
        out.masked_fill_(x_pad[:, None], NEG_INF)
    if y_pad is not None:
        out.masked_fill_(y_pad[None, :], NEG_INF)
    return out


def spans(n: int, tile: int) -> list[slice]:
    return [slice(start, min(start + tile, n)) for start in range(0, n, tile)]


class Scratch:
    """Reusable tile × tile fp32 buffers; an edge tile gets a contiguous view of the first floats."""

    def __init__(self, count: int, tile: int, device: torch.device) -> None:
        self.flat = [torch.empty(tile * tile, dtype=torch.float32, device=device) for _ in range(count)]

    def __call__(self, index: int, rows: slice, cols: slice) -> torch.Tensor:
        n_rows, n_cols = rows.stop - rows.start, cols.stop - cols.start
        return self.flat[index][: n_rows * n_cols].view(n_rows, n_cols)


def logsumexp_into(logits: torch.Tensor, dim: int, scratch: torch.Tensor) -> torch.Tensor:
    """torch.logsumexp(logits, dim) with fewer passes (it matters on CPU); all -inf gives -inf."""
    peak = logits.amax(dim=dim, keepdim=True)
    peak.masked_fill_(torch.isinf(peak), 0.0)
    torch.sub(logits, peak, out=scratch).exp_()
    return scratch.sum(dim=dim).log_().add_(peak.squeeze(dim))


def check_cross_entropy_args(x: torch.Tensor, y: torch.Tensor, z: torch.Tensor | None, scale: torch.Tensor,
                             x_valid: torch.Tensor, y_valid: torch.Tensor, z_valid: torch.Tensor | None,
                             offset: int, with_columns: bool, tile: int) -> None:
    """The shapes :class:`TiledCrossEntropy` (and its Triton twin) take; see its docstring."""
    n_rows, n_cols = x.shape[0], y.shape[0]
    assert x.ndim == 2 and y.ndim == 2 and y.shape[1] == x.shape[1], (
        f"x {tuple(x.shape)} and y {tuple(y.shape)} must be [B, D] and [N, D]")
    assert z is None or (z.ndim == 2 and z.shape[1] == x.shape[1]), f"z must be [M, {x.shape[1]}]"
    assert x_valid.shape == (n_rows,) and y_valid.shape == (n_cols,), "x_valid/y_valid shapes"
    assert (z is None) == (z_valid is None) and (z is None or z_valid.shape == (z.shape[0],)), "z_valid"
    assert 0 <= offset and offset + n_rows <= n_cols, f"labels offset {offset} + {n_rows} exceed {n_cols}"
    assert not with_columns or (offset == 0 and n_cols == n_rows), "with_columns needs N = B, offset 0"
    assert scale.numel() == 1, f"scale must hold one value, got {tuple(scale.shape)}"
    assert tile >= 1, f"tile must be >= 1, got {tile}"


def save_cross_entropy(ctx, x: torch.Tensor, y: torch.Tensor, z: torch.Tensor | None, scale: torch.Tensor,
                       x_valid: torch.Tensor, y_valid: torch.Tensor, z_valid: torch.Tensor | None, offset: int,
                       with_columns: bool, tile: int, row_lse: torch.Tensor, col_lse: torch.Tensor,
                       label_logit: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The end of forward (here and in the Triton twin): saves what :func:`saved_cross_entropy` gives back and
    returns the CE vectors rows [B], cols [N] (LSE − label logit, 0 on masked entries)."""
    ctx.save_for_backward(x, y, z, scale, x_valid, y_valid, z_valid, row_lse, col_lse)
    ctx.offset, ctx.with_columns, ctx.tile = offset, with_columns, tile
    rows_ce = (row_lse - label_logit).masked_fill_(~x_valid, 0.0)
    cols_ce = (col_lse - label_logit).masked_fill_(~y_valid, 0.0) if with_columns else col_lse
    return rows_ce, cols_ce


def saved_cross_entropy(ctx) -> tuple:
    """What :func:`save_cross_entropy` saved, in its argument order: x, y, z, scale, x_valid, y_valid, z_valid,
    offset, with_columns, tile, row_lse, col_lse."""
    x, y, z, scale, x_valid, y_valid, z_valid, row_lse, col_lse = ctx.saved_tensors
    return x, y, z, scale, x_valid, y_valid, z_valid, ctx.offset, ctx.with_columns, ctx.tile, row_lse, col_lse


class TiledCrossEntropy(torch.autograd.Function):
    """Cross-entropies of the logits s·X·Yᵀ (with s·X·Zᵀ as extra columns), never holding more than a
    tile × tile block; row i's label is column ``offset + i``.

    x: [B, D] rows; y: [N, D] columns; z: [M, D] extra columns that join the rows' sums only (NegCLIP
    negatives), or None; scale: [] (the multiplier s, not its log); x_valid [B], y_valid [N], z_valid [M]
    bool (z_valid None with z None).  Returns

        rows [B]: log(Σ_{j valid} exp(L_ij) + Σ_{k valid} exp(s·x_i·z_k)) − L_{i, offset+i},  L = s·X·Yᵀ
        cols [N]: log Σ_{i valid} exp(L_ij) − L_jj     (with_columns, which needs N = B and offset 0;
                                                          else an empty tensor)

    Entries of masked rows (columns) are 0 and take no gradient, whatever their features hold (NaN
    included); a valid row's label column must be valid.  Tiles are fp32 whatever the input dtype;
    gradients come back in the input dtypes.
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor, y: torch.Tensor, z: torch.Tensor | None, scale: torch.Tensor,
                x_valid: torch.Tensor, y_valid: torch.Tensor, z_valid: torch.Tensor | None, offset: int,
                with_columns: bool, tile: int) -> tuple[torch.Tensor, torch.Tensor]:
        check_cross_entropy_args(x, y, z, scale, x_valid, y_valid, z_valid, offset, with_columns, tile)
        n_rows, n_cols = x.shape[0], y.shape[0]
        x_pad, y_pad, z_pad = padding(x_valid), padding(y_valid), padding(z_valid)
        s = float(scale.detach().float().reshape(()))
        xf, yf = zero_padding(x.float(), x_pad), zero_padding(y.float(), y_pad)
        zf = zero_padding(z.float(), z_pad) if z is not None else None
        scratch = Scratch(2, tile, x.device)

        row_lse = torch.full((n_rows,), NEG_INF, dtype=torch.float32, device=x.device)
        col_lse = torch.full((n_cols if with_columns else 0,), NEG_INF, dtype=torch.float32, device=x.device)
        label_logit = torch.zeros(n_rows, dtype=torch.float32, device=x.device)
        for columns, col_pad, with_cols in ((yf, y_pad, with_columns), (zf, z_pad, False)):
            if columns is None:
                continue
            for r in spans(n_rows, tile):
                labels = torch.arange(r.start, r.stop, device=x.device) + offset
                for c in spans(columns.shape[0], tile):
                    logits = tile_scores(xf[r], columns[c], x_pad[r] if x_pad is not None else None,
                                         col_pad[c] if col_pad is not None else None, scratch(0, r, c), s)
                    if columns is yf:  # read the label logits off the tile, the very values the LSE sums
                        inside = ((labels >= c.start) & (labels < c.stop)).nonzero(as_tuple=True)[0]
                        label_logit[r][inside] = logits[inside, labels[inside] - c.start]
                    row_lse[r] = torch.logaddexp(row_lse[r], logsumexp_into(logits, 1, scratch(1, r, c)))
                    if with_cols:
                        col_lse[c] = torch.logaddexp(col_lse[c], logsumexp_into(logits, 0, scratch(1, r, c)))

        return save_cross_entropy(ctx, x, y, z, scale, x_valid, y_valid, z_valid, offset, with_columns, tile,
                                  row_lse, col_lse, label_logit)

    @staticmethod
    def backward(ctx, grad_rows: torch.Tensor, grad_cols: torch.Tensor):
        x, y, z, scale, x_valid, y_valid, z_valid, offset, with_columns, tile, row_lse, col_lse = (
            saved_cross_entropy(ctx))
        n_rows = x.shape[0]
        s = float(scale.detach().float().reshape(()))
        x_pad, y_pad, z_pad = padding(x_valid), padding(y_valid), padding(z_valid)
        xf, yf = zero_padding(x.float(), x_pad), zero_padding(y.float(), y_pad)
        zf = zero_padding(z.float(), z_pad) if z is not None else None
        scratch = Scratch(2, tile, x.device)
        need_y = ctx.needs_input_grad[1]
        need_z = z is not None and ctx.needs_input_grad[2]

        # G_ij = g_i·exp(L_ij − lse_i) [+ g_j·exp(L_ij − lse_j)].  With g ≥ 0 (what a loss that sums CEs
        # passes) the factor folds into the shift, exp(L − (lse − log g)), saving a pass per tile;
        # log 0 = -inf makes the shift +inf and the entry 0.  Masked rows and columns hold -inf logits; an
        # LSE of -inf (nothing valid) is read as 0, so no inf − inf appears.
        g_row = grad_rows.float().masked_fill(~x_valid, 0.0)
        g_col = grad_cols.float().masked_fill(~y_valid, 0.0) if with_columns else grad_cols.float()
        row_lse = row_lse.masked_fill(~torch.isfinite(row_lse), 0.0)
        col_lse = col_lse.masked_fill(~torch.isfinite(col_lse), 0.0)
        fold = bool((g_row >= 0).all()) and bool((g_col >= 0).all())
        row_shift = row_lse - g_row.log() if fold else row_lse
        col_shift = col_lse - g_col.log() if fold else col_lse

        x_acc = torch.zeros_like(xf)  # Σ_j G_ij·y_j: dX = s·x_acc, ds = Σ_i x_i·x_acc_i
        y_acc = torch.zeros_like(yf) if need_y else None
        z_acc = torch.zeros_like(zf) if need_z else None
        blocks = ((yf, y_pad, with_columns, y_acc), (zf, z_pad, False, z_acc))
        for columns, col_pad, with_cols, acc in blocks:
            if columns is None:
                continue
            for r in spans(n_rows, tile):
                for c in spans(columns.shape[0], tile):
                    logits = tile_scores(xf[r], columns[c], x_pad[r] if x_pad is not None else None,
                                         col_pad[c] if col_pad is not None else None, scratch(0, r, c), s)
                    grad = torch.sub(logits, row_shift[r, None], out=scratch(1, r, c)).exp_()
                    if not fold:
                        grad.mul_(g_row[r, None])
                    if with_cols:
                        logits.sub_(col_shift[None, c]).exp_()
                        grad.add_(logits if fold else logits.mul_(g_col[None, c]))
                    x_acc[r].addmm_(grad, columns[c])
                    if acc is not None:
                        acc[c].addmm_(grad.T, xf[r])
        # The labels: −(g_row + g_col) at (i, offset + i), in place (addcmul_ makes no [B, D] temporary).
        label_grad = (g_row + g_col if with_columns else g_row)[:, None]
        labels = slice(offset, offset + n_rows)
        x_acc.addcmul_(label_grad, yf[labels], value=-1.0)
        if need_y:
            y_acc[labels].addcmul_(label_grad, xf, value=-1.0)

        dscale = None
        if ctx.needs_input_grad[3]:
            dscale = torch.vdot(xf.reshape(-1), x_acc.reshape(-1)).reshape(scale.shape).to(scale.dtype)
        dx = x_acc.mul_(s).to(x.dtype) if ctx.needs_input_grad[0] else None  # in place: no extra [B, D]
        dy = y_acc.mul_(s).to(y.dtype) if need_y else None
        dz = z_acc.mul_(s).to(z.dtype) if need_z else None
        return dx, dy, dz, dscale, None, None, None, None, None, None


BACKENDS = ("auto", "torch", "triton")


def tile_backend(backend: str, device: torch.device | str) -> str:
    """What runs the tiles on ``device``, "triton" or "torch", for ``backend`` "auto" (Triton on CUDA where it
    is installed, the torch tiles elsewhere), "torch", or "triton" (an error where Triton cannot run)."""
    assert backend in BACKENDS, f"backend must be one of {BACKENDS}, got {backend!r}"
    device = torch.device(device)
    if backend == "torch" or (backend == "auto" and device.type != "cuda"):
        return "torch"
    from kclip_ds.kernels.triton_infonce import triton_available  # imports triton, so only where it may run

    if triton_available(device):
        return "triton"
    if backend == "triton":
        raise RuntimeError(f"backend='triton' but Triton cannot run on {device}: it needs triton and CUDA, "
                           "or TRITON_INTERPRET=1 (CPU) set before triton is first imported")
    return "torch"


class TiledContrastiveLoss(nn.Module):
    """Drop-in for :class:`~kclip_ds.losses.contrastive.ContrastiveLoss` (same forward, same result).
    ``backend`` picks the tile loop per call, from the features' device (see :func:`tile_backend`)."""

    def __init__(self, tile: int = 1024, backend: str = "auto") -> None:
        super().__init__()
        assert tile >= 1, f"tile must be >= 1, got {tile}"
        assert backend in BACKENDS, f"backend must be one of {BACKENDS}, got {backend!r}"
        self.tile, self.backend = tile, backend
        self.announced: str | None = None

    def extra_repr(self) -> str:
        return f"tile={self.tile}, backend={self.backend!r}"

    def cross_entropy(self, device: torch.device | str) -> type[torch.autograd.Function]:
        """The Function that runs on ``device``: :class:`TiledCrossEntropy` or its Triton twin."""
        runs = tile_backend(self.backend, device)
        if runs != self.announced:  # the start-up log line is written before the model reaches its device
            log.info("contrastive loss tiles on %s: %s (tile %d)", device, runs, self.tile)
            self.announced = runs
        if runs == "torch":
            return TiledCrossEntropy
        from kclip_ds.kernels.triton_infonce import TritonCrossEntropy

        return TritonCrossEntropy

    def forward(self, image_features: torch.Tensor, text_features: torch.Tensor, logit_scale: torch.Tensor,
                valid: torch.Tensor | None = None, neg_text_features: torch.Tensor | None = None,
                neg_valid: torch.Tensor | None = None) -> torch.Tensor:
        """image_features, text_features: [B, D] L2-normalised; logit_scale: exp(τ), [] or [1];
        valid: [B] bool; neg_text_features: [B, D] hard-negative captions (NegCLIP) with neg_valid: [B] bool,
        or None."""
        valid, world = check_pair(image_features, text_features, valid)
        batch = image_features.shape[0]
        cross_entropy = self.cross_entropy(image_features.device)

        # Upcast before the gather, as the dense loss does, so cross-rank gradient sums are fp32 too.  A world
        # of one has no gather, and the Triton tiles read bf16/fp16 as it is (their sums are fp32 anyway).
        dtype = torch.float32
        if (world == 1 and cross_entropy is not TiledCrossEntropy
                and image_features.dtype == text_features.dtype in (torch.bfloat16, torch.float16)):
            dtype = image_features.dtype
        image_features, text_features = image_features.to(dtype), text_features.to(dtype)
        all_valid = gather_mask(valid)
        scale = logit_scale.float().reshape(())
        negs = neg_columns = None
        if neg_text_features is not None:
            assert neg_text_features.shape == text_features.shape, (
                f"neg_text_features {tuple(neg_text_features.shape)} != "
                f"text_features {tuple(text_features.shape)}")
            assert neg_valid is not None and neg_valid.shape == (batch,), (
                "neg_valid must be [B] with negatives")
            negs = gather_features(neg_text_features.to(dtype))
            neg_columns = gather_mask(neg_valid & valid)
        if world == 1:
            ce_i2t, ce_t2i = cross_entropy.apply(image_features, text_features, negs, scale, valid, valid,
                                                 neg_columns, 0, True, self.tile)
        else:
            rank = dist.get_rank()
            all_images, all_texts = gather_features(image_features), gather_features(text_features)
            ce_i2t, _ = cross_entropy.apply(image_features, all_texts, negs, scale, valid, all_valid,
                                            neg_columns, rank * batch, False, self.tile)
            ce_t2i, _ = cross_entropy.apply(text_features, all_images, None, scale, valid, all_valid,
                                            None, rank * batch, False, self.tile)
        per_row = (ce_i2t + ce_t2i).sum()  # padding rows hold 0
        n_valid = all_valid.sum().clamp(min=1)
        return per_row * world / (2 * n_valid)
