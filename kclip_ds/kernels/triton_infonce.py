"""The tile loop of :class:`~kclip_ds.kernels.tiled_infonce.TiledCrossEntropy` as Triton kernels.

Same Function signature, outputs and gradients; the tiles live in registers instead of tile × tile fp32
buffers.  Two kernels, each launched once per "row problem" (rows A [R, D] scored against columns C [K, D],
L = s·A·Cᵀ, masked rows read as zeros, masked columns as -inf):

    row_lse_kernel:   lse_r = log Σ_k exp(L_rk)       online softmax over column blocks, fp32
    row_grad_kernel:  out_r = Σ_k G_rk·c_k,           G_rk = g_r·exp(L_rk − lse_r) + g'_k·exp(L_rk − lse'_k)

with either term of G optional.  The world-of-one symmetric case takes the column LSEs from a second
``row_lse`` launch with the roles swapped (Y against X), and dY likewise from ``row_grad`` on (Y, X):
6 GEMMs of B²·D per step against the torch tiles' 4 (and each ``row_grad`` feature block past the first
recomputes the logits once more), but no atomics, no B × B partials and deterministic sums.  The O(B·D)
parts stay in torch: label logits (rowwise dots), the δ_label gradient, and ds = Σ_i x_i·(G·Y)_i, read off
dX before it is scaled.

Inputs may be fp32, bf16 or fp16; tl.dot sums in fp32 (bf16 products are exact in fp32), fp32 inputs use
TF32 only where torch.backends.cuda.matmul.allow_tf32 allows it for the torch path too.  In backward, G is
rounded to the input dtype before G·C, as flash-attention does for P·V.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from kclip_ds.kernels.tiled_infonce import check_cross_entropy_args, save_cross_entropy, saved_cross_entropy

try:
    import triton
    import triton.language as tl
    from triton.runtime.interpreter import InterpretedFunction
except ImportError:  # no Triton: triton_available() says False and the torch tiles run
    triton = None

TARGET_PROGRAMS = 512  # forward programs to aim for: an H100 has 132 SMs


def triton_available(device: torch.device | str) -> bool:
    """True where the kernels can run on ``device``: any CUDA device with Triton installed, or the CPU under
    Triton's interpreter (TRITON_INTERPRET=1 set before triton was first imported: see ``INTERPRETED``)."""
    device = torch.device(device)
    return triton is not None and (device.type == "cuda" or (device.type == "cpu" and INTERPRETED))


@dataclass(frozen=True)
class Blocks:
    """Block sides: ``rows`` × ``cols`` logit tiles, summed over D in ``depth`` chunks; ``out`` output
    features per backward program (a grid axis, so D > out recomputes the logits ⌈D/out⌉ times)."""

    rows: int
    cols: int
    depth: int
    out: int
    precision: str  # tl.dot input_precision for fp32 operands
    upcast: bool  # interpreter only: its tl.dot multiplies bf16 bit patterns as integers (triton 3.x)
    # Register use checked with ptxas for sm_90 (bf16 and TF32: ≤ 56 bytes spilled); not timed on a GPU.
    warps: int = 8
    stages: int = 2

    @staticmethod
    def choose(tile: int, dim: int, dtype: torch.dtype) -> Blocks:
        """The tile rounded down to a power of two in [16, 64] (tl.dot needs sides ≥ 16)."""
        side = min(64, max(16, 1 << (tile.bit_length() - 1)))
        depth = min(32, max(16, triton.next_power_of_2(dim)))
        out = min(128 if dtype == torch.float32 else 256, max(16, triton.next_power_of_2(dim)))
        tf32 = dtype == torch.float32 and torch.backends.cuda.matmul.allow_tf32
        upcast = INTERPRETED and dtype != torch.float32
        return Blocks(side, side, depth, out, "tf32" if tf32 else "ieee", upcast)


if triton is not None:

    @triton.jit
    def dot(a, b, acc, PRECISION: tl.constexpr, UPCAST: tl.constexpr):
        if UPCAST:  # exact: a bf16 or fp16 product fits in fp32
            a = a.to(tl.float32)
            b = b.to(tl.float32)
        return tl.dot(a, b, acc, input_precision=PRECISION)

    @triton.jit
    def tile_logits(a_ptr, c_ptr, rows, cols, row_ok, col_ok, dim, stride_a, stride_c, scale,
                    BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_D: tl.constexpr,
                    PRECISION: tl.constexpr, UPCAST: tl.constexpr):
        """[BLOCK_R, BLOCK_C] fp32 s·a_r·c_k; masked rows and columns are loaded as zeros (NaN never read)."""
        logits = tl.zeros((BLOCK_R, BLOCK_C), dtype=tl.float32)
        for start in range(0, dim, BLOCK_D):
            depth = start + tl.arange(0, BLOCK_D)
            in_depth = depth < dim
            a = tl.load(a_ptr + rows[:, None] * stride_a + depth[None, :],
                        mask=row_ok[:, None] & in_depth[None, :], other=0.0)
            c = tl.load(c_ptr + cols[:, None] * stride_c + depth[None, :],
                        mask=col_ok[:, None] & in_depth[None, :], other=0.0)
            logits = dot(a, tl.trans(c), logits, PRECISION, UPCAST)
        return logits * scale

    @triton.jit
    def row_lse_kernel(a_ptr, c_ptr, a_ok_ptr, c_ok_ptr, lse_ptr, n_rows, n_cols, dim, stride_a, stride_c,
                       cols_per_split, scale, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr,
                       BLOCK_D: tl.constexpr, PRECISION: tl.constexpr, UPCAST: tl.constexpr):
        """lse[split, r] = log Σ_{k in split, valid} exp(s·a_r·c_k); grid (row blocks, column splits)."""
        rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
        in_rows = rows < n_rows
        row_ok = in_rows & (tl.load(a_ok_ptr + rows, mask=in_rows, other=0) != 0)
        col_begin = tl.program_id(1) * cols_per_split
        col_end = tl.minimum(col_begin + cols_per_split, n_cols)
        peak = tl.full((BLOCK_R,), float("-inf"), dtype=tl.float32)
        total = tl.zeros((BLOCK_R,), dtype=tl.float32)
        for start in range(col_begin, col_end, BLOCK_C):
            cols = start + tl.arange(0, BLOCK_C)
            in_cols = cols < col_end
            col_ok = in_cols & (tl.load(c_ok_ptr + cols, mask=in_cols, other=0) != 0)
            logits = tile_logits(a_ptr, c_ptr, rows, cols, row_ok, col_ok, dim, stride_a, stride_c, scale,
                                 BLOCK_R, BLOCK_C, BLOCK_D, PRECISION, UPCAST)
            logits = tl.where(col_ok[None, :], logits, float("-inf"))
            new_peak = tl.maximum(peak, tl.max(logits, axis=1))
            shift = tl.where(new_peak == float("-inf"), 0.0, new_peak)  # no −inf − (−inf)
            total = total * tl.exp(peak - shift) + tl.sum(tl.exp(logits - shift[:, None]), axis=1)
            peak = new_peak
        tl.store(lse_ptr + tl.program_id(1) * n_rows + rows, peak + tl.log(total), mask=in_rows)

    @triton.jit
    def row_grad_kernel(a_ptr, c_ptr, a_ok_ptr, c_ok_ptr, g_row_ptr, lse_row_ptr, g_col_ptr, lse_col_ptr,
                        out_ptr, n_rows, n_cols, dim, stride_a, stride_c, stride_out, scale,
                        HAS_ROW: tl.constexpr, HAS_COL: tl.constexpr, ACCUMULATE: tl.constexpr,
                        BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_D: tl.constexpr,
                        BLOCK_OUT: tl.constexpr, PRECISION: tl.constexpr, UPCAST: tl.constexpr):
        """out[r, o] (+)= Σ_k G_rk·c_k[o], G as in the module docstring, 0 where row r or column k is masked;
        grid (row blocks, output-feature blocks)."""
        rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
        in_rows = rows < n_rows
        row_ok = in_rows & (tl.load(a_ok_ptr + rows, mask=in_rows, other=0) != 0)
        feats = tl.program_id(1) * BLOCK_OUT + tl.arange(0, BLOCK_OUT)
        in_feats = feats < dim
        acc = tl.zeros((BLOCK_R, BLOCK_OUT), dtype=tl.float32)
        if HAS_ROW:
            g_row = tl.load(g_row_ptr + rows, mask=row_ok, other=0.0)
            lse_row = tl.load(lse_row_ptr + rows, mask=row_ok, other=0.0)
        for start in range(0, n_cols, BLOCK_C):
            cols = start + tl.arange(0, BLOCK_C)
            in_cols = cols < n_cols
            col_ok = in_cols & (tl.load(c_ok_ptr + cols, mask=in_cols, other=0) != 0)
            logits = tile_logits(a_ptr, c_ptr, rows, cols, row_ok, col_ok, dim, stride_a, stride_c, scale,
                                 BLOCK_R, BLOCK_C, BLOCK_D, PRECISION, UPCAST)
            grad = tl.zeros((BLOCK_R, BLOCK_C), dtype=tl.float32)
            if HAS_ROW:
                grad += g_row[:, None] * tl.exp(logits - lse_row[:, None])
            if HAS_COL:
                g_col = tl.load(g_col_ptr + cols, mask=col_ok, other=0.0)
                lse_col = tl.load(lse_col_ptr + cols, mask=col_ok, other=0.0)
                grad += g_col[None, :] * tl.exp(logits - lse_col[None, :])
            grad = tl.where(row_ok[:, None] & col_ok[None, :], grad, 0.0)
            c = tl.load(c_ptr + cols[:, None] * stride_c + feats[None, :],
                        mask=col_ok[:, None] & in_feats[None, :], other=0.0)
            acc = dot(grad.to(c.dtype), c, acc, PRECISION, UPCAST)
        # Output pointers only now: [BLOCK_R, BLOCK_OUT] 64-bit addresses held through the loop would spill.
        out_ptrs = out_ptr + rows[:, None] * stride_out + feats[None, :]
        out_mask = in_rows[:, None] & in_feats[None, :]
        if ACCUMULATE:
            acc += tl.load(out_ptrs, mask=out_mask, other=0.0)
        tl.store(out_ptrs, acc, mask=out_mask)


# triton.jit reads TRITON_INTERPRET when it decorates: Triton's own helpers (tl.zeros, ...) when triton is
# first imported, these kernels when this module is.  Built under the variable, both run on CPU tensors
# (numpy); built without it, neither can.
INTERPRETED = (triton is not None and isinstance(tl.zeros, InterpretedFunction)
               and isinstance(row_lse_kernel, InterpretedFunction))


def row_lse(a: torch.Tensor, c: torch.Tensor, a_ok: torch.Tensor, c_ok: torch.Tensor, scale: float,
            blocks: Blocks) -> torch.Tensor:
    """a: [R, D], c: [K, D] contiguous, a_ok [R], c_ok [K] bool → [R] fp32 log Σ_{k valid} exp(s·a_r·c_k)
    (−inf where no column is valid).  Columns are split across programs so that a few row blocks still
    fill the GPU; the splits' LSEs are merged in torch ([splits, R] floats)."""
    n_rows, n_cols, dim = a.shape[0], c.shape[0], a.shape[1]
    row_blocks, col_blocks = triton.cdiv(n_rows, blocks.rows), triton.cdiv(n_cols, blocks.cols)
    splits = max(1, min(col_blocks, triton.cdiv(TARGET_PROGRAMS, row_blocks)))
    cols_per_split = triton.cdiv(col_blocks, splits) * blocks.cols
    splits = triton.cdiv(n_cols, cols_per_split)
    partial = torch.empty(splits, n_rows, dtype=torch.float32, device=a.device)
    row_lse_kernel[(row_blocks, splits)](
        a, c, a_ok, c_ok, partial, n_rows, n_cols, dim, a.stride(0), c.stride(0), cols_per_split, scale,
        BLOCK_R=blocks.rows, BLOCK_C=blocks.cols, BLOCK_D=blocks.depth, PRECISION=blocks.precision,
        UPCAST=blocks.upcast, num_warps=blocks.warps, num_stages=blocks.stages)
    return partial[0] if splits == 1 else torch.logsumexp(partial, dim=0)


def row_grad(a: torch.Tensor, c: torch.Tensor, a_ok: torch.Tensor, c_ok: torch.Tensor, scale: float,
             blocks: Blocks, row_terms: tuple[torch.Tensor, torch.Tensor] | None,
             col_terms: tuple[torch.Tensor, torch.Tensor] | None,
             out: torch.Tensor | None = None) -> torch.Tensor:
    """[R, D] fp32 Σ_k G_rk·c_k (added to ``out`` when given), G_rk = g_r·exp(L_rk − lse_r) from
    row_terms = (g [R], lse [R]) plus g_k·exp(L_rk − lse_k) from col_terms = (g [K], lse [K]); g and lse fp32
    contiguous, lse finite wherever the row (column) is valid."""
    n_rows, n_cols, dim = a.shape[0], c.shape[0], a.shape[1]
    accumulate = out is not None
    if out is None:
        out = torch.empty(n_rows, dim, dtype=torch.float32, device=a.device)
    assert out.shape == (n_rows, dim) and out.dtype == torch.float32 and out.stride(1) == 1, "out [R, D] fp32"
    unused = out  # any pointer: the constexpr flags keep the kernel from reading it
    g_row, lse_row = row_terms if row_terms is not None else (unused, unused)
    g_col, lse_col = col_terms if col_terms is not None else (unused, unused)
    grid = (triton.cdiv(n_rows, blocks.rows), triton.cdiv(dim, blocks.out))
    row_grad_kernel[grid](
        a, c, a_ok, c_ok, g_row, lse_row, g_col, lse_col, out, n_rows, n_cols, dim, a.stride(0), c.stride(0),
        out.stride(0), scale, HAS_ROW=row_terms is not None, HAS_COL=col_terms is not None,
        ACCUMULATE=accumulate, BLOCK_R=blocks.rows, BLOCK_C=blocks.cols, BLOCK_D=blocks.depth,
        BLOCK_OUT=blocks.out, PRECISION=blocks.precision, UPCAST=blocks.upcast, num_warps=blocks.warps,
        num_stages=blocks.stages)
    return out


def finite_or_zero(lse: torch.Tensor) -> torch.Tensor:
    """An LSE of −inf (nothing valid) read as 0: such rows take no gradient, and no inf reaches a kernel."""
    return lse.masked_fill(~torch.isfinite(lse), 0.0).contiguous()


def masked_rows(features: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """fp32 copy with masked rows 0 (they may hold NaN)."""
    return features.float().masked_fill(~valid[:, None], 0.0)


class TritonCrossEntropy(torch.autograd.Function):
    """:class:`~kclip_ds.kernels.tiled_infonce.TiledCrossEntropy` on Triton kernels: same arguments, outputs
    and gradients (see its docstring).  ``tile`` sets the block side: rounded down to a power of two in
    [16, 64].  x, y, z share one dtype: fp32, bf16 or fp16."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, y: torch.Tensor, z: torch.Tensor | None, scale: torch.Tensor,
                x_valid: torch.Tensor, y_valid: torch.Tensor, z_valid: torch.Tensor | None, offset: int,
                with_columns: bool, tile: int) -> tuple[torch.Tensor, torch.Tensor]:
        check_cross_entropy_args(x, y, z, scale, x_valid, y_valid, z_valid, offset, with_columns, tile)
        assert x.dtype in (torch.float32, torch.bfloat16, torch.float16), f"x dtype {x.dtype}"
        assert y.dtype == x.dtype and (z is None or z.dtype == x.dtype), "x, y, z must share one dtype"
        x, y = x.contiguous(), y.contiguous()
        z = z.contiguous() if z is not None else None
        n_rows = x.shape[0]
        s = float(scale.detach().float().reshape(()))
        blocks = Blocks.choose(tile, x.shape[1], x.dtype)

        row_lse_ = row_lse(x, y, x_valid, y_valid, s, blocks)
        if z is not None:
            row_lse_ = torch.logaddexp(row_lse_, row_lse(x, z, x_valid, z_valid, s, blocks))
        if with_columns:
            col_lse = row_lse(y, x, y_valid, x_valid, s, blocks)
        else:
            col_lse = torch.empty(0, dtype=torch.float32, device=x.device)
        # O(B·D) in torch; padding rows may hold NaN, hence the masked copies.
        label_logit = s * torch.linalg.vecdot(masked_rows(x, x_valid),
                                              masked_rows(y[offset:offset + n_rows], x_valid))

        return save_cross_entropy(ctx, x, y, z, scale, x_valid, y_valid, z_valid, offset, with_columns, tile,
                                  row_lse_, col_lse, label_logit)

    @staticmethod
    def backward(ctx, grad_rows: torch.Tensor, grad_cols: torch.Tensor):
        x, y, z, scale, x_valid, y_valid, z_valid, offset, with_columns, tile, row_lse_, col_lse = (
            saved_cross_entropy(ctx))
        n_rows = x.shape[0]
        s = float(scale.detach().float().reshape(()))
        blocks = Blocks.choose(tile, x.shape[1], x.dtype)
        need_x = ctx.needs_input_grad[0] or ctx.needs_input_grad[3]
        need_y = ctx.needs_input_grad[1]
        need_z = z is not None and ctx.needs_input_grad[2]

        rows = (grad_rows.float().masked_fill(~x_valid, 0.0).contiguous(), finite_or_zero(row_lse_))
        cols = None
        if with_columns:
            cols = (grad_cols.float().masked_fill(~y_valid, 0.0).contiguous(), finite_or_zero(col_lse))

        # x_acc = Σ_j G_ij·y_j (+ Σ_k G_ik·z_k): dX = s·x_acc, ds = Σ_i x_i·x_acc_i.  Gᵀ for dY (dZ) is the
        # same problem with the roles swapped: rows Y (Z) against columns X.
        x_acc = y_acc = z_acc = None
        if need_x:
            x_acc = row_grad(x, y, x_valid, y_valid, s, blocks, rows, cols)
            if z is not None:
                row_grad(x, z, x_valid, z_valid, s, blocks, rows, None, out=x_acc)
        if need_y:
            y_acc = row_grad(y, x, y_valid, x_valid, s, blocks, cols, rows)
        if need_z:
            z_acc = row_grad(z, x, z_valid, x_valid, s, blocks, None, rows)

        # The labels: −(g_row + g_col) at (i, offset + i), outside the tiles.
        label_grad = (rows[0] + cols[0] if with_columns else rows[0])[:, None]
        x_masked = masked_rows(x, x_valid)
        dscale = None
        if need_x:
            x_acc.addcmul_(label_grad, masked_rows(y[offset:offset + n_rows], x_valid), value=-1.0)
            if ctx.needs_input_grad[3]:
                dscale = torch.vdot(x_masked.reshape(-1), x_acc.reshape(-1)).reshape(scale.shape)
                dscale = dscale.to(scale.dtype)
        if need_y:
            y_acc[offset:offset + n_rows].addcmul_(label_grad, x_masked, value=-1.0)
        dx = x_acc.mul_(s).to(x.dtype) if ctx.needs_input_grad[0] else None
        dy = y_acc.mul_(s).to(y.dtype) if need_y else None
        dz = z_acc.mul_(s).to(z.dtype) if need_z else None
        return dx, dy, dz, dscale, None, None, None, None, None, None

