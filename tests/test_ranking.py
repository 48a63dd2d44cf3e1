"""Structure-CLIP's ranking losses on one process: hand-computed values, padding, gradients; plus the
2-rank equivalence launch (tests/dist/ranking_equivalence.py)."""

from __future__ import annotations

import pytest
import torch

from kclip_ds.losses.ranking import MaxViolationHinge, NegativeMarginLoss
from tests.conftest import REPO, assert_ok, torchrun

# S = v·tᵀ with v = I, so t = Sᵀ.  Margin 0.2:
#   image→text, max over the row off the diagonal:    [0.6, 0.7, 0.7] → relu(· + 0.2 − diag) = [0, 0.1, 0.5]
#   text→image, max over the column off the diagonal: [0.7, 0.7, 0.35] → [0, 0.1, 0.15]
#   text→image, mean over the column off the diagonal: [0.45, 0.65, 0.275] → [0, 0.05, 0.075]
#   text→image, mean over the whole column:           [0.6333, 0.7, 0.31667] → [0, 0.1, 0.11667]
S = torch.tensor([[1.0, 0.6, 0.2],
                  [0.7, 0.8, 0.35],
                  [0.2, 0.7, 0.4]])
V, T = torch.eye(3), S.T.contiguous()


def test_hinge_hand_computed() -> None:
    hinge = MaxViolationHinge()
    assert hinge(V, T).item() == pytest.approx((0.6 + 0.25) / 3, abs=1e-6)
    assert hinge(V, T, mean_text_to_image=True).item() == pytest.approx((0.6 + 0.125) / 3, abs=1e-6)
    reference_warmup = MaxViolationHinge(warmup_mean_includes_positive=True)
    assert reference_warmup(V, T, mean_text_to_image=True).item() == pytest.approx((0.6 + 0.65 / 3) / 3, abs=1e-6)
    assert reference_warmup(V, T).item() == pytest.approx((0.6 + 0.25) / 3, abs=1e-6)  # only the warm-up differs
    assert MaxViolationHinge(margin=0.0)(V, T).item() == pytest.approx(0.3 / 3, abs=1e-6)


def brute_force_hinge(v: torch.Tensor, t: torch.Tensor, margin: float, mean_t2i: bool) -> float:
    n = v.shape[0]
    total = 0.0
    for i in range(n):
        pos = float(v[i] @ t[i])
        i2t = [float(v[i] @ t[j]) for j in range(n) if j != i]
        t2i = [float(v[j] @ t[i]) for j in range(n) if j != i]
        total += max(0.0, max(i2t) + margin - pos)
        total += max(0.0, (sum(t2i) / len(t2i) if mean_t2i else max(t2i)) + margin - pos)
    return total / n


@pytest.mark.parametrize("mean_t2i", [False, True])
def test_hinge_padding_rows_are_neither_anchors_nor_negatives(mean_t2i: bool) -> None:
    g = torch.Generator().manual_seed(0)
    v, t = torch.randn(6, 4, generator=g), torch.randn(6, 4, generator=g)
    valid = torch.tensor([True, False, True, True, False, True])
    v_pad, t_pad = v.clone(), t.clone()
    v_pad[~valid], t_pad[~valid] = 100.0, 100.0  # would be every row's hardest negative if it counted
    hinge = MaxViolationHinge()
    masked = hinge(v_pad, t_pad, valid, mean_text_to_image=mean_t2i)
    subset = hinge(v[valid], t[valid], mean_text_to_image=mean_t2i)
    assert masked.item() == pytest.approx(subset.item(), abs=1e-6)
    assert masked.item() == pytest.approx(brute_force_hinge(v[valid], t[valid], 0.2, mean_t2i), abs=1e-5)
    assert masked.item() > 0


@pytest.mark.parametrize("mean_t2i", [False, True])
def test_hinge_gradients_are_finite(mean_t2i: bool) -> None:
    g = torch.Generator().manual_seed(1)
    v = torch.nn.functional.normalize(torch.randn(5, 8, generator=g), dim=-1).requires_grad_()
    t = torch.randn(5, 8, generator=g).requires_grad_()
    valid = torch.tensor([True, True, False, True, True])
    loss = MaxViolationHinge()(v, t, valid, mean_text_to_image=mean_t2i)
    loss.backward()
    assert loss.item() > 0
    assert torch.isfinite(v.grad).all() and torch.isfinite(t.grad).all()
    assert v.grad[2].abs().sum() == 0 and t.grad[2].abs().sum() == 0  # padding gets no gradient

    # One valid row has no negatives at all: the loss is 0 and backward stays finite.
    v1, t1 = v.detach().clone().requires_grad_(), t.detach().clone().requires_grad_()
    lone = MaxViolationHinge()(v1, t1, torch.tensor([False, True, False, False, False]),
                               mean_text_to_image=mean_t2i)
    lone.backward()
    assert lone.item() == 0.0 and torch.isfinite(v1.grad).all() and torch.isfinite(t1.grad).all()


# v = I: v_i·c_i = 0.9, 0.5, 0.3 and v_i·c⁻_i = 0.5, 0.45, 0.6; gaps 0.4, 0.05, −0.3 → relu(0.1 − gap) = 0, 0.05, 0.4
C = torch.tensor([[0.9, 0.1, 0.0], [0.2, 0.5, 0.3], [0.0, 0.4, 0.3]])
C_NEG = torch.tensor([[0.5, 0.0, 0.7], [0.1, 0.45, 0.0], [0.3, 0.0, 0.6]])


def test_negative_margin_hand_computed() -> None:
    loss = NegativeMarginLoss()
    assert loss(V, C, C_NEG).item() == pytest.approx(0.45 / 3, abs=1e-6)
    assert loss(V, C, C_NEG, torch.tensor([True, True, False])).item() == pytest.approx(0.05 / 2, abs=1e-6)
    assert loss(V, C, C_NEG, valid=torch.tensor([True, False, True])).item() == pytest.approx(0.4 / 2, abs=1e-6)
    both = loss(V, C, C_NEG, torch.tensor([False, True, True]), torch.tensor([True, True, False]))
    assert both.item() == pytest.approx(0.05, abs=1e-6)
    assert NegativeMarginLoss(margin=0.5)(V, C, C_NEG).item() == pytest.approx((0.1 + 0.45 + 0.8) / 3, abs=1e-6)


def test_negative_margin_without_any_negative_is_zero_and_backward_works() -> None:
    v, c = V.clone().requires_grad_(), C.clone().requires_grad_()
    c_neg = torch.full_like(C_NEG, float("nan")).requires_grad_()  # rows without a negative may hold anything
    loss = NegativeMarginLoss()(v, c, c_neg, torch.zeros(3, dtype=torch.bool))
    assert loss.item() == 0.0 and loss.requires_grad
    loss.backward()
    assert (v.grad == 0).all() and (c.grad == 0).all() and (c_neg.grad == 0).all()


def test_negative_margin_gradient_is_finite() -> None:
    g = torch.Generator().manual_seed(2)
    v, c, c_neg = (torch.randn(4, 6, generator=g).requires_grad_() for _ in range(3))
    loss = NegativeMarginLoss(margin=10.0)(v, c, c_neg, torch.tensor([True, False, True, True]))
    loss.backward()
    assert loss.item() > 0
    assert all(torch.isfinite(x.grad).all() for x in (v, c, c_neg))
    assert v.grad[1].abs().sum() == 0 and c_neg.grad[1].abs().sum() == 0


def test_shapes_are_checked() -> None:
    with pytest.raises(AssertionError, match="text_features"):
        MaxViolationHinge()(torch.zeros(3, 4), torch.zeros(3, 5))
    with pytest.raises(AssertionError, match="valid"):
        MaxViolationHinge()(torch.zeros(3, 4), torch.zeros(3, 4), torch.ones(2, dtype=torch.bool))
    with pytest.raises(AssertionError, match="negative_features"):
        NegativeMarginLoss()(torch.zeros(3, 4), torch.zeros(3, 4), torch.zeros(2, 4))
    with pytest.raises(AssertionError, match="neg_valid"):
        NegativeMarginLoss()(torch.zeros(3, 4), torch.zeros(3, 4), torch.zeros(3, 4), torch.ones(3))


@pytest.mark.slow
def test_ranking_losses_and_gradients_match_one_process_on_two_ranks() -> None:
    proc = torchrun([str(REPO / "tests/dist/ranking_equivalence.py")])
    assert_ok(proc)
    assert proc.stdout.count("vs single process") == 9
