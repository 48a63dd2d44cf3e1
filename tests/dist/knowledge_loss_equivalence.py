"""2 ranks: Knowledge-CLIP's cross-rank losses (E2E/G2E entity InfoNCE, E2R cross-entropy, KD) equal the
same loss computed by one process on the global batch — values and gradients, averaged over ranks the way
DeepSpeed averages them.  Exit code 0 = equal."""

from __future__ import annotations

import sys

import torch
import torch.distributed as dist
import torch.nn.functional as F
from loss_equivalence import compare, finish, fresh_params

from kclip_ds.losses.knowledge import DistillationLoss, EntityContrastiveLoss, GlobalCrossEntropy


def entity_reference(q, k, ids, valid, scale, groups=None) -> torch.Tensor:
    """One process, by the definition: per valid row, CE over valid columns with the row's duplicates (same
    entity, or with ``groups`` the same query group) removed."""
    total = q.new_zeros(())
    for i in valid.nonzero().flatten().tolist():
        other = ids != ids[i]
        if groups is not None:
            other &= torch.tensor([g != groups[i].tolist() for g in groups.tolist()])
        keep = valid & (other | (torch.arange(len(ids)) == i))
        logits = scale * q[i] @ k[keep].T
        total = total - logits.log_softmax(-1)[keep[: i + 1].sum() - 1]
    return total / valid.sum()


def kd_reference(v, c, tv, tc, scale, t_scale, valid) -> torch.Tensor:
    v, c, tv, tc = v[valid], c[valid], tv[valid], tc[valid]

    def kl(student, teacher):
        return F.kl_div(student.log_softmax(-1), teacher.log_softmax(-1), reduction="sum", log_target=True)
    return (kl(scale * v @ c.T, t_scale * tv @ tc.T) + kl(scale * c @ v.T, t_scale * tc @ tv.T)) / (2 * len(v))


def main() -> int:
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    torch.manual_seed(0)
    per_rank, d_in, d_out, n_classes = 6, 5, 8, 4
    n = world * per_rank
    x_q, x_k = torch.randn(n, d_in), torch.randn(n, d_in)
    ids = torch.tensor([3, 7, 3, 1, 9, 7, 2, 3, 5, 8, 1, 4])[:n]  # repeated entities, across ranks too
    valid = torch.ones(n, dtype=torch.bool)
    valid[[4, n - 1]] = False
    t_img, t_txt = F.normalize(torch.randn(n, 6), dim=-1), F.normalize(torch.randn(n, 6), dim=-1)
    labels = torch.randint(0, n_classes, (n,))
    w_q0, w_k0 = torch.randn(d_in, d_out), torch.randn(d_in, d_out)
    rows = slice(rank * per_rank, (rank + 1) * per_rank)
    failures = []

    def features(params, part):
        w_q, w_k, _ = params
        return F.normalize(x_q[part] @ w_q, dim=-1), F.normalize(x_k[part] @ w_k, dim=-1)

    params, ref_params = fresh_params(w_q0, w_k0), fresh_params(w_q0, w_k0)
    loss = EntityContrastiveLoss()(*features(params, rows), ids[rows], valid[rows], params[2].exp())
    ref = entity_reference(*features(ref_params, slice(None)), ids, valid, ref_params[2].exp())
    failures += compare("entity infonce", "single process", loss, params, ref, ref_params, rank, world)

    # query groups: rows 0, 5, 8 (ranks 0 and 1) ask the same question; 1 and 2 share only two of three values
    groups = torch.stack((torch.arange(n), torch.zeros(n, dtype=torch.long), torch.arange(n) % 2), 1)
    groups[[5, 8]] = groups[0].clone()
    groups[2, 0] = 1
    params, ref_params = fresh_params(w_q0, w_k0), fresh_params(w_q0, w_k0)
    loss = EntityContrastiveLoss()(*features(params, rows), ids[rows], valid[rows], params[2].exp(), groups[rows])
    ref = entity_reference(*features(ref_params, slice(None)), ids, valid, ref_params[2].exp(), groups)
    unfiltered = entity_reference(*features(ref_params, slice(None)), ids, valid, ref_params[2].exp())
    if torch.allclose(ref, unfiltered):
        failures.append("entity infonce: the query groups changed nothing, so this case tests nothing")
    failures += compare("entity infonce, query groups", "single process", loss, params, ref, ref_params, rank,
                        world)

    params, ref_params = fresh_params(w_q0, w_k0), fresh_params(w_q0, w_k0)
    v, c = features(params, rows)
    loss = DistillationLoss()(v, c, params[2].exp(), t_img[rows], t_txt[rows], torch.tensor([20.0]), valid[rows])
    v_ref, c_ref = features(ref_params, slice(None))
    ref = kd_reference(v_ref, c_ref, t_img, t_txt, ref_params[2].exp(), 20.0, valid)
    failures += compare("distillation", "single process", loss, params, ref, ref_params, rank, world)

    params, ref_params = fresh_params(w_q0, w_k0), fresh_params(w_q0, w_k0)
    logits = params[2].exp() * (x_q[rows] @ params[0])[:, :n_classes]
    loss = GlobalCrossEntropy()(logits, labels[rows], valid[rows])
    ref_logits = ref_params[2].exp() * (x_q @ ref_params[0])[:, :n_classes]
    ref = F.cross_entropy(ref_logits[valid], labels[valid]) + 0.0 * ref_params[1].sum()
    loss = loss + 0.0 * params[1].sum()  # w_k takes no part: both sides get a zero gradient for it
    failures += compare("relation cross-entropy", "single process", loss, params, ref, ref_params, rank, world)

    return finish(failures, rank)


if __name__ == "__main__":
    sys.exit(main())
