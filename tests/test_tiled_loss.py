"""The tiled losses (kclip_ds/kernels) against the dense ones: values and gradients for image, text, negative
features and logit_scale; padding; tile sizes that do not divide the batch; bf16; no B × N tensor saved for
backward; the config switch; and 2 ranks over gloo."""

from __future__ import annotations

import copy
import dataclasses

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from torch import nn

from kclip_ds.config import ConfigError, MethodConfig, ModelConfig, load_config
from kclip_ds.kernels import (
    TiledContrastiveLoss,
    TiledCrossEntropy,
    TiledHardestNegative,
    TiledMaxViolationHinge,
)
from kclip_ds.losses.contrastive import ContrastiveLoss
from kclip_ds.losses.ranking import MaxViolationHinge

# Methods, towers (open_clip) and tests.conftest are imported inside the tests that use them: the 2-rank
# test's spawned workers import this module, and open_clip would double their start-up time.

SHAPES = [(37, 16), (64, 64), (5, 128)]  # (batch, tile): not a multiple, one exact tile, less than a tile
FP32 = {"atol": 1e-5, "rtol": 1e-5}
BF16 = {"atol": 2e-2, "rtol": 2e-2}


def make_inputs(batch: int, dim: int = 12, seed: int = 0, dtype: torch.dtype = torch.float32,
                pad: bool = True):
    """Leaves v, c, c⁻ [B, D] (unit length, cast to dtype), logit_scale [1]; valid and neg_valid [B] bool."""
    g = torch.Generator().manual_seed(seed)
    v, c, c_neg = (F.normalize(torch.randn(batch, dim, generator=g), dim=-1).to(dtype) for _ in range(3))
    valid = torch.rand(batch, generator=g) > (0.25 if pad else -1.0)
    valid[0] = True
    neg_valid = torch.rand(batch, generator=g) > 0.4
    if pad:
        v[~valid], c[~valid] = 5.0, 5.0  # padding that would dominate every softmax and max if it counted
    scale = torch.tensor([14.3])
    return [x.clone().requires_grad_() for x in (v, c, c_neg, scale)], valid, neg_valid


def loss_and_grads(loss_fn, leaves, *args, **kwargs):
    loss = loss_fn(*leaves, *args, **kwargs)
    loss.backward()
    return loss.detach(), [leaf.grad for leaf in leaves]


def assert_close_all(got, want, tol: dict) -> None:
    for name, a, b in zip(("loss", "image", "text", "negatives", "logit_scale"), got, want):
        if b is None:
            assert a is None or a.abs().max() == 0, f"{name}: unexpected gradient"
            continue
        assert a.dtype == b.dtype, f"{name}: dtype {a.dtype} != {b.dtype}"
        torch.testing.assert_close(a.float(), b.float(), **tol, msg=lambda m, n=name: f"{n}: {m}")


def contrastive_case(loss_fn, leaves, valid, neg_valid, negatives: bool):
    v, c, c_neg, scale = leaves
    if negatives:
        loss = loss_fn(v, c, scale, valid, neg_text_features=c_neg, neg_valid=neg_valid)
    else:
        loss = loss_fn(v, c, scale, valid)
    loss.backward()
    return [loss.detach(), v.grad, c.grad, c_neg.grad, scale.grad]


@pytest.mark.parametrize("batch, tile", SHAPES)
@pytest.mark.parametrize("negatives", [False, True])
def test_infonce_matches_dense_fp32(batch: int, tile: int, negatives: bool) -> None:
    leaves, valid, neg_valid = make_inputs(batch, seed=batch)
    ref_leaves = [x.detach().clone().requires_grad_() for x in leaves]
    got = contrastive_case(TiledContrastiveLoss(tile), leaves, valid, neg_valid, negatives)
    want = contrastive_case(ContrastiveLoss(), ref_leaves, valid, neg_valid, negatives)
    assert_close_all(got, want, FP32)
    assert got[1][~valid].abs().max() == 0 and got[2][~valid].abs().max() == 0  # padding takes no gradient
    if negatives:
        assert got[3][~(valid & neg_valid)].abs().max() == 0 and got[3].abs().max() > 0


@pytest.mark.parametrize("negatives", [False, True])
def test_infonce_matches_dense_bf16(negatives: bool) -> None:
    leaves, valid, neg_valid = make_inputs(37, dtype=torch.bfloat16, seed=3)
    ref_leaves = [x.detach().clone().requires_grad_() for x in leaves]
    got = contrastive_case(TiledContrastiveLoss(16), leaves, valid, neg_valid, negatives)
    want = contrastive_case(ContrastiveLoss(), ref_leaves, valid, neg_valid, negatives)
    assert got[1].dtype == torch.bfloat16 and got[2].dtype == torch.bfloat16
    assert_close_all(got, want, BF16)


def test_infonce_takes_a_zero_dim_scale_and_an_all_padding_batch() -> None:
    leaves, valid, _ = make_inputs(9, seed=4)
    v, c = leaves[0], leaves[1]
    scale = torch.tensor(7.0, requires_grad=True)
    TiledContrastiveLoss(4)(v, c, scale, valid).backward()
    assert scale.grad.shape == () and torch.isfinite(scale.grad)
    nothing = torch.zeros(9, dtype=torch.bool)
    v2, c2 = v.detach().clone().requires_grad_(), c.detach().clone().requires_grad_()
    loss = TiledContrastiveLoss(4)(v2, c2, scale, nothing)
    loss.backward()
    assert loss.item() == 0.0 and (v2.grad == 0).all() and (c2.grad == 0).all()


@pytest.mark.parametrize("loss_name", ["infonce", "hinge max", "hinge mean"])
def test_padding_may_hold_nan(loss_name: str) -> None:
    """Padded rows and rows without a negative may hold anything: same value as with finite padding, and
    exactly zero gradient there (the dense loss would turn NaN padding into NaN gradients)."""
    leaves, valid, neg_valid = make_inputs(21, seed=10)
    nan_leaves = [x.detach().clone() for x in leaves]
    nan_leaves[0][~valid] = nan_leaves[1][~valid] = float("nan")
    nan_leaves[2][~(valid & neg_valid)] = float("nan")
    nan_leaves = [x.requires_grad_() for x in nan_leaves]
    if loss_name == "infonce":
        got = contrastive_case(TiledContrastiveLoss(8), nan_leaves, valid, neg_valid, True)
        want = contrastive_case(ContrastiveLoss(), leaves, valid, neg_valid, True)
    else:
        mean = loss_name == "hinge mean"
        loss = TiledMaxViolationHinge(tile=8)(nan_leaves[0], nan_leaves[1], valid, mean_text_to_image=mean)
        loss.backward()
        got = [loss.detach(), nan_leaves[0].grad, nan_leaves[1].grad]
        want = [*loss_and_grads(MaxViolationHinge(), leaves[:2], valid, mean_text_to_image=mean)]
        want = [want[0], *want[1]]
    assert_close_all(got, want, FP32)
    for grad in got[1:]:
        assert torch.isfinite(grad).all()


@pytest.mark.parametrize("offset, with_columns", [(0, True), (4, False)])
def test_cross_entropy_function_bf16_and_signed_upstream_gradients(offset: int, with_columns: bool) -> None:
    """The Function alone, against F.cross_entropy on the masked dense matrix: bf16 in, bf16 gradients out,
    labels off the diagonal (a rank's rows against gathered columns), and upstream gradients of both signs
    (the path where g cannot be folded into the exponent)."""
    g = torch.Generator().manual_seed(5)
    n_rows = 13 if with_columns else 5
    x, y, z = (torch.randn(n, 8, generator=g).to(torch.bfloat16) for n in (n_rows, 13, 11))
    x_valid, y_valid, z_valid = (torch.rand(n, generator=g) > 0.3 for n in (n_rows, 13, 11))
    y_valid[offset:offset + n_rows] = x_valid  # a valid row's label column is valid
    g_row, g_col = torch.randn(n_rows, generator=g), torch.randn(13, generator=g)
    scale = torch.tensor(3.0)

    leaves = [t.clone().requires_grad_() for t in (x, y, z, scale)]
    rows, cols = TiledCrossEntropy.apply(*leaves, x_valid, y_valid, z_valid, offset, with_columns, 5)
    ((rows * g_row).sum() + (cols * g_col[: cols.numel()]).sum()).backward()

    ref = [t.clone().float().requires_grad_() for t in (x, y, z, scale)]
    xy = (ref[3] * ref[0] @ ref[1].T).masked_fill(~(x_valid[:, None] & y_valid[None, :]), float("-inf"))
    xz = (ref[3] * ref[0] @ ref[2].T).masked_fill(~(x_valid[:, None] & z_valid[None, :]), float("-inf"))
    labels = torch.arange(n_rows) + offset
    ref_rows = torch.zeros(n_rows).index_put((x_valid,), F.cross_entropy(
        torch.cat([xy, xz], dim=1)[x_valid], labels[x_valid], reduction="none"))
    ref_loss = (ref_rows * g_row).sum()
    if with_columns:
        ref_cols = torch.zeros(13).index_put((y_valid,), F.cross_entropy(
            xy.T[y_valid], labels[y_valid], reduction="none"))
        ref_loss = ref_loss + (ref_cols * g_col).sum()
        torch.testing.assert_close(cols, ref_cols, **FP32)
    ref_loss.backward()

    torch.testing.assert_close(rows, ref_rows, **FP32)
    for got, want in zip(leaves, ref):
        assert got.grad.dtype == got.dtype
        torch.testing.assert_close(got.grad.float(), want.grad.to(got.dtype).float(), **BF16)


@pytest.mark.parametrize("batch, tile", SHAPES)
@pytest.mark.parametrize("mode", ["max", "mean", "mean incl. positive"])
def test_hinge_matches_dense(batch: int, tile: int, mode: str) -> None:
    leaves, valid, _ = make_inputs(batch, seed=batch + 1)
    v, c = leaves[0], leaves[1] * 1.2  # t need not be unit length
    with_positive = mode == "mean incl. positive"
    mean = mode != "max"
    tiled = TiledMaxViolationHinge(warmup_mean_includes_positive=with_positive, tile=tile)
    dense = MaxViolationHinge(warmup_mean_includes_positive=with_positive)
    v_ref, c_ref = (x.detach().clone().requires_grad_() for x in (v, c))
    v_new, c_new = (x.detach().clone().requires_grad_() for x in (v, c))
    got = loss_and_grads(tiled, [v_new, c_new], valid, mean_text_to_image=mean)
    want = loss_and_grads(dense, [v_ref, c_ref], valid, mean_text_to_image=mean)
    assert want[0] > 0
    assert_close_all([got[0], *got[1]], [want[0], *want[1]], FP32)


def test_hinge_bf16_and_a_batch_without_negatives() -> None:
    leaves, valid, _ = make_inputs(37, dtype=torch.bfloat16, seed=6)
    v_ref, c_ref = (x.detach().clone().requires_grad_() for x in leaves[:2])
    got = loss_and_grads(TiledMaxViolationHinge(tile=16), leaves[:2], valid)
    want = loss_and_grads(MaxViolationHinge(), [v_ref, c_ref], valid)
    assert got[1][0].dtype == torch.bfloat16
    assert_close_all([got[0], *got[1]], [want[0], *want[1]], BF16)

    lone = torch.zeros(37, dtype=torch.bool)
    lone[3] = True  # one valid row: no negative anywhere, the loss is 0 and backward stays finite
    for mean in (False, True):
        v, c = (x.detach().float().clone().requires_grad_() for x in leaves[:2])
        loss = TiledMaxViolationHinge(tile=16)(v, c, lone, mean_text_to_image=mean)
        loss.backward()
        assert loss.item() == 0.0 and torch.isfinite(v.grad).all() and torch.isfinite(c.grad).all()


def test_hardest_negative_function_indices() -> None:
    """Row i's positive is column offset + i; masked columns and the positive are never picked."""
    x = torch.eye(4)
    y = torch.tensor([[0.0, 0, 0, 0], [0.9, 0, 0, 0], [0.5, 0, 0, 0], [9.0, 0, 0, 0], [0.1, 0, 0, 0],
                      [0.7, 0, 0, 0]])
    y_valid = torch.tensor([True, True, True, False, True, True])
    rows, _ = TiledHardestNegative.apply(x, y, torch.ones(4, dtype=torch.bool), y_valid, 1, False, 2)
    assert rows[0].item() == pytest.approx(0.7)  # column 1 (0.9) is row 0's positive, column 3 is masked
    assert rows[1:].tolist() == [0.0, 0.0, 0.0]


@pytest.mark.parametrize("which", ["infonce", "infonce+negatives", "hinge"])
def test_forward_saves_no_batch_by_batch_tensor(which: str) -> None:
    batch = 512
    leaves, valid, neg_valid = make_inputs(batch, dim=16, seed=7)
    v, c, c_neg, scale = leaves
    saved: list[int] = []

    def pack(t: torch.Tensor) -> torch.Tensor:
        saved.append(t.numel())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        if which == "hinge":
            loss = TiledMaxViolationHinge(tile=128)(v, c, valid)
        elif which == "infonce":
            loss = TiledContrastiveLoss(128)(v, c, scale, valid)
        else:
            loss = TiledContrastiveLoss(128)(v, c, scale, valid, neg_text_features=c_neg, neg_valid=neg_valid)
    loss.backward()
    assert saved and max(saved) < batch * batch, f"a saved tensor holds {max(saved)} ≥ B² values"


def test_config_switch_picks_the_path_and_names_it() -> None:
    from kclip_ds.kernels import loss_path
    from kclip_ds.methods.clip import ClipMethod

    assert load_config(None, []).method.fused_loss is False
    cfg = load_config(None, ["method.fused_loss=true", "method.loss_tile=256"]).method
    with pytest.raises(ConfigError, match="method.loss_tile"):
        load_config(None, ["method.loss_tile=0"])
    tiled = ClipMethod(nn.Identity(), cfg)
    dense = ClipMethod(nn.Identity(), MethodConfig())
    assert isinstance(tiled.contrastive, TiledContrastiveLoss) and tiled.contrastive.tile == 256
    assert isinstance(dense.contrastive, ContrastiveLoss)
    # kclip_ds.train logs this line once the engine's device is known
    assert loss_path(True, 256, torch.device("cpu")) == "tiled torch (tile 256)"
    assert loss_path(False, 256, torch.device("cpu")) == "dense"
    if not torch.cuda.is_available():
        return
    from kclip_ds.kernels.triton_infonce import triton_available

    want = "triton" if triton_available(torch.device("cuda")) else "torch"
    assert loss_path(True, 256, torch.device("cuda")) == f"tiled {want} (tile 256)"


@pytest.mark.parametrize("name", ["clip", "structure_clip"])
def test_methods_give_the_same_loss_and_gradients_on_either_path(name: str) -> None:
    """The whole method (towers, negatives, the InfoNCE term of Structure-CLIP) with fused_loss on and off."""
    from kclip_ds.methods import build_method
    from kclip_ds.methods.clip import ClipMethod
    from kclip_ds.methods.structure_clip import StructureClipMethod
    from kclip_ds.models.towers import build_towers

    towers = build_towers(ModelConfig(arch="kclip-micro"))
    cfg = MethodConfig(name=name, graph_width=32, graph_heads=2, graph_layers=1, infonce_weight=0.5,
                       loss_tile=3)
    torch.manual_seed(0)
    dense = build_method(cfg, towers)
    method_class = {"clip": ClipMethod, "structure_clip": StructureClipMethod}[name]
    fused = method_class(copy.deepcopy(dense.model), dataclasses.replace(cfg, fused_loss=True))
    fused.load_state_dict(dense.state_dict())
    assert isinstance(fused.contrastive, TiledContrastiveLoss)
    assert name == "clip" or isinstance(fused.hinge, TiledMaxViolationHinge)
    g = torch.Generator().manual_seed(9)
    captions = [f"a {colour} {shape} next to a {other}" for colour, shape, other in
                zip(["red", "blue", "green", "red"], ["cube", "ball"] * 2, ["tree", "car", "dog", "cat"])]
    captions = captions + [c.replace("a ", "one ", 1) for c in captions[:3]]
    batch = {"images": torch.randn(7, 3, towers.image_size, towers.image_size, generator=g),
             "texts": towers.tokenizer(captions), "neg_texts": towers.tokenizer(captions[::-1]),
             "valid": torch.tensor([True] * 6 + [False]),
             "neg_valid": torch.tensor([True, False] * 3 + [True])}
    results = []
    for method in (dense, fused):
        out = method(**batch)
        out["loss"].backward()
        results.append((out["loss"].detach(), [p.grad for p in method.parameters() if p.grad is not None]))
    torch.testing.assert_close(results[1][0], results[0][0], **FP32)
    assert len(results[0][1]) == len(results[1][1]) > 0
    for got, want in zip(results[1][1], results[0][1]):
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-4)


def two_rank_worker(rank: int, world: int, port: int) -> None:
    """Each rank: the tiled losses against the dense ones on the same shard of one global batch; leaf
    gradients compared per rank (the all-gather's backward routes column gradients to their owner)."""
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        per_rank = 11
        leaves, valid, neg_valid = make_inputs(world * per_rank, seed=8)
        valid[-3:] = False  # padding on the last rank
        rows = slice(rank * per_rank, (rank + 1) * per_rank)

        def shard() -> list[torch.Tensor]:
            return [x.detach()[rows].clone().requires_grad_() for x in leaves[:3]] + [
                leaves[3].detach().clone().requires_grad_()]

        for negatives in (False, True):
            got_leaves, want_leaves = shard(), shard()
            masks = (valid[rows], neg_valid[rows], negatives)
            got = contrastive_case(TiledContrastiveLoss(4), got_leaves, *masks)
            want = contrastive_case(ContrastiveLoss(), want_leaves, *masks)
            assert_close_all(got, want, FP32)
        for mode in ("max", "mean", "mean incl. positive"):
            (v, c, _, _), (v_ref, c_ref, _, _) = shard(), shard()
            kwargs = {"warmup_mean_includes_positive": mode == "mean incl. positive"}
            got = loss_and_grads(TiledMaxViolationHinge(tile=4, **kwargs), [v, c], valid[rows],
                                 mean_text_to_image=mode != "max")
            want = loss_and_grads(MaxViolationHinge(**kwargs), [v_ref, c_ref], valid[rows],
                                  mean_text_to_image=mode != "max")
            assert_close_all([got[0], *got[1]], [want[0], *want[1]], FP32)
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_two_ranks_over_gloo_match_the_dense_losses() -> None:
    from tests.conftest import free_port

    mp.spawn(two_rank_worker, args=(2, free_port()), nprocs=2, join=True)
