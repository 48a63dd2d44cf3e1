"""2 ranks: kclip_ds's cross-rank ranking losses (Structure-CLIP's max-violation hinge, its warm-up
variants, and the structural-negative margin loss), loss and gradients averaged the way DeepSpeed
averages them, equal the formulas computed by one process on the global batch.  Exit code 0 = equal."""

from __future__ import annotations

import sys

import torch
import torch.distributed as dist
import torch.nn.functional as F
from loss_equivalence import compare, finish

from kclip_ds.losses.ranking import MaxViolationHinge, NegativeMarginLoss


def reference_hinge(v: torch.Tensor, t: torch.Tensor, margin: float, mode: str) -> torch.Tensor:
    """The global-batch formula on the valid rows only (one process, no masks)."""
    s = v @ t.T
    n = s.shape[0]
    eye = torch.eye(n, dtype=torch.bool)
    pos = s.diag()
    i2t = s.masked_fill(eye, float("-inf")).amax(dim=1)
    if mode == "max":
        t2i = s.masked_fill(eye, float("-inf")).amax(dim=0)
    elif mode == "mean":
        t2i = s.masked_fill(eye, 0.0).sum(dim=0) / (n - 1)
    else:  # "mean incl. positive": the reference code's torch.mean over the whole row
        t2i = s.mean(dim=0)
    return (F.relu(i2t + margin - pos) + F.relu(t2i + margin - pos)).mean()


def reference_negative(v: torch.Tensor, c: torch.Tensor, c_neg: torch.Tensor, margin: float) -> torch.Tensor:
    return F.relu(margin - ((v * c).sum(-1) - (v * c_neg).sum(-1))).mean()


def main() -> int:
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    torch.manual_seed(0)
    per_rank, d_in, d_out = 6, 5, 8
    n = world * per_rank
    x_img, x_txt, x_neg = torch.randn(n, d_in), torch.randn(n, d_in), torch.randn(n, d_in)
    x_know = torch.randn(n, d_in)
    w0 = {k: torch.randn(d_in, d_out) for k in ("img", "txt", "know")}
    has_neg = torch.rand(n) > 0.3
    has_neg[0] = has_neg[-3] = False
    rows = slice(rank * per_rank, (rank + 1) * per_rank)

    def features(w: dict[str, torch.Tensor], sel: slice | torch.Tensor) -> tuple[torch.Tensor, ...]:
        v = F.normalize(x_img[sel] @ w["img"], dim=-1)
        c = F.normalize(x_txt[sel] @ w["txt"], dim=-1)
        c_neg = F.normalize(x_neg[sel] @ w["txt"], dim=-1)
        t = c + 0.2 * F.normalize(x_know[sel] @ w["know"], dim=-1)  # fused text, not renormalised
        return v, c, c_neg, t

    failures = []
    cases = []
    for pad_name, pad in (("all valid", []), ("rows 1, 10, 11 padded", [1, 10, 11])):
        valid = torch.ones(n, dtype=torch.bool)
        valid[pad] = False
        for mode in ("max", "mean", "mean incl. positive"):
            cases.append((f"hinge {mode}, {pad_name}", "hinge", mode, valid, has_neg))
        cases.append((f"negative margin, {pad_name}", "negative", "", valid, has_neg))
    cases.append(("negative margin, no row has a negative", "negative", "", torch.ones(n, dtype=torch.bool),
                  torch.zeros(n, dtype=torch.bool)))

    for case, kind, mode, valid, neg_valid in cases:
        params = {k: w.clone().requires_grad_() for k, w in w0.items()}
        v, c, c_neg, t = features(params, rows)
        if kind == "hinge":
            loss = MaxViolationHinge(warmup_mean_includes_positive=mode == "mean incl. positive")(
                v, t, valid[rows], mean_text_to_image=mode != "max")
        else:
            loss = NegativeMarginLoss()(v, c, c_neg, neg_valid[rows], valid[rows])
        ref_params = {k: w.clone().requires_grad_() for k, w in w0.items()}
        if kind == "hinge":
            rv, _, _, rt = features(ref_params, valid)
            ref = reference_hinge(rv, rt, 0.2, mode)
        else:
            used = valid & neg_valid
            if used.any():
                rv, rc, rc_neg, _ = features(ref_params, used)
                ref = reference_negative(rv, rc, rc_neg, 0.1)
            else:
                ref = sum(p.sum() for p in ref_params.values()) * 0.0
        failures += compare(case, "single process", loss, list(params.values()), ref, list(ref_params.values()),
                            rank, world, names=tuple(params))
    return finish(failures, rank)


if __name__ == "__main__":
    sys.exit(main())
