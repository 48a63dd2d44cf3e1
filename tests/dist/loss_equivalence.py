"""2 ranks: kclip_ds's cross-rank InfoNCE (loss and gradients, averaged the way DeepSpeed averages them)
equals open_clip's ClipLoss computed by one process on the global batch.  Exit code 0 = equal."""

from __future__ import annotations

import sys

import torch
import torch.distributed as dist
import torch.nn.functional as F

from kclip_ds.losses.contrastive import ContrastiveLoss


def main() -> int:
    from open_clip.loss import ClipLoss  # here: the scripts that reuse compare() need no open_clip

    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    torch.manual_seed(0)
    per_rank, d_in, d_out = 6, 5, 8
    x_img, x_txt = torch.randn(world * per_rank, d_in), torch.randn(world * per_rank, d_in)
    x_neg = torch.randn(world * per_rank, d_in)
    has_neg = torch.rand(world * per_rank) > 0.3
    w_img0, w_txt0 = torch.randn(d_in, d_out), torch.randn(d_in, d_out)
    failures = []
    rows = slice(rank * per_rank, (rank + 1) * per_rank)
    for case, n_pad in (("all valid", 0), ("last 2 rows of the last rank padded", 2)):
        valid = torch.ones(world * per_rank, dtype=torch.bool)
        if n_pad:
            valid[-n_pad:] = False
        params = fresh_params(w_img0, w_txt0)
        w_img, w_txt, scale = params
        loss = ContrastiveLoss()(F.normalize(x_img[rows] @ w_img, dim=-1), F.normalize(x_txt[rows] @ w_txt, dim=-1),
                                 scale.exp(), valid[rows])
        ref_params = fresh_params(w_img0, w_txt0)
        r_img, r_txt, r_scale = ref_params
        ref = ClipLoss()(F.normalize(x_img[valid] @ r_img, dim=-1), F.normalize(x_txt[valid] @ r_txt, dim=-1),
                         r_scale.exp())
        failures += compare(case, "open_clip single process", loss, params, ref, ref_params, rank, world)

    params = fresh_params(w_img0, w_txt0)
    w_img, w_txt, scale = params
    loss = ContrastiveLoss()(F.normalize(x_img[rows] @ w_img, dim=-1), F.normalize(x_txt[rows] @ w_txt, dim=-1),
                             scale.exp(), torch.ones(per_rank, dtype=torch.bool),
                             neg_text_features=F.normalize(x_neg[rows] @ w_txt, dim=-1), neg_valid=has_neg[rows])
    ref_params = fresh_params(w_img0, w_txt0)
    r_img, r_txt, r_scale = ref_params
    ref = negclip_reference(F.normalize(x_img @ r_img, dim=-1), F.normalize(x_txt @ r_txt, dim=-1),
                            F.normalize(x_neg @ r_txt, dim=-1), has_neg, r_scale.exp())
    failures += compare("negclip", "single process", loss, params, ref, ref_params, rank, world)
    return finish(failures, rank)


def fresh_params(w_img0: torch.Tensor, w_txt0: torch.Tensor) -> list[torch.Tensor]:
    """Leaf copies of the two projections and a logit scale, so each side gets its own gradients."""
    return [w_img0.clone().requires_grad_(), w_txt0.clone().requires_grad_(), torch.tensor([2.3], requires_grad=True)]


def compare(case: str, reference: str, loss, params, ref, ref_params, rank: int, world: int,
            names: tuple[str, ...] = ("w_img", "w_txt", "logit_scale")) -> list[str]:
    """Backward both; average the per-rank loss and gradients over ranks as DeepSpeed does; compare.
    ``names``: of the params, for the messages; a param without a gradient counts as a zero gradient."""
    loss.backward()
    ref.backward()
    grads = [p.grad.clone() if p.grad is not None else torch.zeros_like(p) for p in params]
    for g in grads:
        dist.all_reduce(g)
        g /= world  # DeepSpeed averages gradients over data-parallel ranks
    mean_loss = loss.detach().clone()
    dist.all_reduce(mean_loss)
    mean_loss /= world
    failures = []
    if not torch.allclose(mean_loss, ref.detach(), atol=1e-6, rtol=1e-6):
        failures.append(f"{case}: loss {mean_loss.item()} != {reference} {ref.item()}")
    for name, g, p in zip(names, grads, ref_params, strict=True):
        r = p.grad if p.grad is not None else torch.zeros_like(g)
        if not torch.allclose(g, r, atol=1e-6, rtol=1e-5):
            failures.append(f"{case}: grad {name} max diff {(g - r).abs().max().item():.3e}")
    if rank == 0:
        print(f"{case}: loss {mean_loss.item():.7f} vs {reference} {ref.item():.7f}")
    return failures


def finish(failures: list[str], rank: int) -> int:
    """Print this rank's mismatches and leave the process group; the exit code (0 = equal)."""
    for f in failures:
        print(f"rank {rank}: MISMATCH {f}")
    dist.destroy_process_group()
    return 1 if failures else 0


def negclip_reference(img, txt, neg, has_neg, scale) -> torch.Tensor:
    """NegCLIP on one process: negatives as extra text columns of image→text (B × 2B), text→image unchanged."""
    labels = torch.arange(img.shape[0])
    i2t = torch.cat([scale * img @ txt.T, scale * img @ neg[has_neg].T], dim=1)
    return (F.cross_entropy(i2t, labels) + F.cross_entropy(scale * txt @ img.T, labels)) / 2


if __name__ == "__main__":
    sys.exit(main())
