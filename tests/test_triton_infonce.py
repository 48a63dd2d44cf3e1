"""The Triton tile loop (kclip_ds/kernels/triton_infonce.py) against the dense loss and the torch tiles:
values and gradients (features and logit_scale), padding (NaN included), NegCLIP negatives, batches that the
blocks do not divide, D not a power of two, bf16, labels off the diagonal, and the backend switch.

Without CUDA the kernels run under Triton's interpreter (numpy on CPU tensors).  triton.jit reads
TRITON_INTERPRET when it decorates, Triton's own helpers included, so the variable must be set before triton
is first imported: test_under_the_interpreter runs this file again in a fresh process that sets it, and the
kernel tests are skipped in the parent.  With CUDA they run the compiled kernels, plus one at B = 4096,
D = 512."""

from __future__ import annotations

import logging
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from test_tiled_loss import contrastive_case

from kclip_ds.kernels import TiledContrastiveLoss, TiledCrossEntropy, build_contrastive_loss, loss_path
from kclip_ds.losses.contrastive import ContrastiveLoss

pytest.importorskip("triton")

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
INTERPRETER_RUN = os.environ.get("TRITON_INTERPRET") == "1"  # this process is the interpreter run
FP32 = {"atol": 1e-5, "rtol": 1e-5}
BF16 = {"atol": 2e-2, "rtol": 2e-2}

if DEVICE.type == "cuda" or INTERPRETER_RUN:
    from kclip_ds.kernels import triton_infonce as kernels
else:  # the CPU without the interpreter: the kernels could not run here
    kernels = None
needs_kernels = pytest.mark.skipif(kernels is None, reason="run by test_under_the_interpreter, in a child")


@pytest.mark.skipif(kernels is not None, reason="the kernels run in this process")
def test_under_the_interpreter() -> None:
    """This file's tests, on CPU, in a process that imports triton with TRITON_INTERPRET=1."""
    repo = Path(__file__).resolve().parents[1]
    env = {**os.environ, "TRITON_INTERPRET": "1", "OMP_NUM_THREADS": "1"}
    result = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", __file__],
                            cwd=repo, env=env, capture_output=True, text=True, timeout=300, check=False)
    assert result.returncode == 0, f"{result.stdout[-8000:]}\n{result.stderr[-2000:]}"
    assert " passed" in result.stdout and " failed" not in result.stdout, result.stdout[-2000:]


def make_inputs(batch: int, dim: int, seed: int, dtype: torch.dtype = torch.float32, pad_value: float = 5.0):
    """Leaves v, c, c⁻ [B, D] (unit length, dtype) and logit_scale [1] on DEVICE; valid, neg_valid [B] bool.
    Padding rows hold ``pad_value``: 5.0 would dominate every softmax if it counted."""
    g = torch.Generator().manual_seed(seed)
    v, c, c_neg = (F.normalize(torch.randn(batch, dim, generator=g), dim=-1).to(dtype) for _ in range(3))
    valid = torch.rand(batch, generator=g) > 0.25
    valid[0] = True
    neg_valid = torch.rand(batch, generator=g) > 0.4
    v[~valid], c[~valid] = pad_value, pad_value
    c_neg[~(valid & neg_valid)] = pad_value
    leaves = [x.to(DEVICE) for x in (v, c, c_neg, torch.tensor([14.3]))]
    return leaves, valid.to(DEVICE), neg_valid.to(DEVICE)


def run_loss(loss_fn, leaves, valid, neg_valid, negatives: bool) -> list[torch.Tensor | None]:
    """[loss, d image, d text, d negatives (None without), d logit_scale] on fresh copies of the leaves."""
    fresh = [x.detach().clone().requires_grad_() for x in leaves]
    return contrastive_case(loss_fn, fresh, valid, neg_valid, negatives)


def assert_close_all(got, want, tol: dict) -> None:
    for name, a, b in zip(("loss", "image", "text", "negatives", "logit_scale"), got, want):
        assert (a is None) == (b is None), f"{name}: gradient {a is None} vs {b is None}"
        if b is not None:
            assert a.dtype == b.dtype, f"{name}: dtype {a.dtype} != {b.dtype}"
            torch.testing.assert_close(a.float(), b.float(), **tol, msg=lambda m, n=name: f"{n}: {m}")


def backward_names(tensor: torch.Tensor) -> set[str]:
    seen, todo, names = set(), [tensor.grad_fn], set()
    while todo:
        node = todo.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        names.add(type(node).__name__)
        todo.extend(next_fn for next_fn, _ in node.next_functions)
    return names


class LaunchSpy:
    """Stands in for a kernel object and records each ``kernel[grid]`` launch."""

    def __init__(self, kernel, name: str, launches: list[str]) -> None:
        self.kernel, self.name, self.launches = kernel, name, launches

    def __getitem__(self, grid):
        self.launches.append(self.name)
        return self.kernel[grid]


@needs_kernels
def test_the_triton_kernels_are_what_runs(monkeypatch: pytest.MonkeyPatch) -> None:
    """Not the torch tiles under another name: the loss's graph holds the Triton Function, the torch Function
    is never called, and the kernels are launched (built by the interpreter without CUDA)."""
    assert kernels.INTERPRETED == (DEVICE.type == "cpu")
    launches: list[str] = []
    for name in ("row_lse_kernel", "row_grad_kernel"):
        monkeypatch.setattr(kernels, name, LaunchSpy(getattr(kernels, name), name, launches))

    def torch_tiles(*args):
        raise AssertionError("the torch tiles ran")

    monkeypatch.setattr(TiledCrossEntropy, "forward", staticmethod(torch_tiles))
    loss_fn = TiledContrastiveLoss(16, backend="triton")
    assert loss_fn.cross_entropy(DEVICE) is kernels.TritonCrossEntropy
    leaves, valid, neg_valid = make_inputs(21, 24, seed=1)
    v, c, c_neg, scale = (x.clone().requires_grad_() for x in leaves)
    loss = loss_fn(v, c, scale, valid, neg_text_features=c_neg, neg_valid=neg_valid)
    assert "TritonCrossEntropyBackward" in backward_names(loss)
    assert launches == ["row_lse_kernel"] * 3  # texts, negatives, and the columns (texts against images)
    loss.backward()
    assert launches[3:] == ["row_grad_kernel"] * 4  # dX from texts and from negatives, dY, dZ
    assert all(x.grad is not None and x.grad.abs().max() > 0 for x in (v, c, c_neg, scale))


@needs_kernels
@pytest.mark.parametrize("batch, dim, tile", [(37, 40, 32), (5, 12, 16), (64, 33, 32)])
@pytest.mark.parametrize("negatives", [False, True])
def test_matches_dense_and_torch_tiles_fp32(batch: int, dim: int, tile: int, negatives: bool) -> None:
    """Batches the blocks do not divide (37), less than a block (5), whole blocks (64); D < 16 and odd."""
    leaves, valid, neg_valid = make_inputs(batch, dim, seed=batch)
    got = run_loss(TiledContrastiveLoss(tile, backend="triton"), leaves, valid, neg_valid, negatives)
    assert_close_all(got, run_loss(ContrastiveLoss(), leaves, valid, neg_valid, negatives), FP32)
    torch_tiles = TiledContrastiveLoss(tile, backend="torch")
    assert_close_all(got, run_loss(torch_tiles, leaves, valid, neg_valid, negatives), FP32)
    assert got[1][~valid].abs().max() == 0 and got[2][~valid].abs().max() == 0  # padding takes no gradient
    if negatives:
        assert got[3][~(valid & neg_valid)].abs().max() == 0 and got[3].abs().max() > 0


@needs_kernels
def test_features_wider_than_one_output_block() -> None:
    """D = 136 in fp32: two backward programs per row block along D (128 + 8 features), each recomputing the
    logits over all 136."""
    assert kernels.Blocks.choose(16, 136, torch.float32).out == 128
    leaves, valid, neg_valid = make_inputs(20, 136, seed=11)
    got = run_loss(TiledContrastiveLoss(16, backend="triton"), leaves, valid, neg_valid, True)
    assert_close_all(got, run_loss(ContrastiveLoss(), leaves, valid, neg_valid, True), FP32)


@needs_kernels
def test_matches_dense_bf16_with_negatives() -> None:
    """bf16 features reach the kernels as they are (a world of one) and their gradients come back bf16."""
    leaves, valid, neg_valid = make_inputs(37, 40, seed=3, dtype=torch.bfloat16)
    got = run_loss(TiledContrastiveLoss(16, backend="triton"), leaves, valid, neg_valid, True)
    want = run_loss(ContrastiveLoss(), leaves, valid, neg_valid, True)
    assert got[1].dtype == got[2].dtype == got[3].dtype == torch.bfloat16
    assert_close_all(got, want, BF16)


@needs_kernels
@pytest.mark.parametrize("offset, with_columns", [(0, True), (4, False)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_function_matches_torch_tiles(offset: int, with_columns: bool, dtype: torch.dtype) -> None:
    """The Function alone against TiledCrossEntropy: labels off the diagonal (a rank's rows against gathered
    columns), extra columns z with their own mask, and upstream gradients of both signs."""
    g = torch.Generator().manual_seed(5)
    n_rows = 13 if with_columns else 5
    x, y, z = (torch.randn(n, 20, generator=g).to(dtype).to(DEVICE) for n in (n_rows, 13, 11))
    x_valid, y_valid, z_valid = (torch.rand(n, generator=g).to(DEVICE) > 0.3 for n in (n_rows, 13, 11))
    y_valid[offset:offset + n_rows] = x_valid  # a valid row's label column is valid
    g_row, g_col = torch.randn(n_rows, generator=g).to(DEVICE), torch.randn(13, generator=g).to(DEVICE)
    scale = torch.tensor(3.0, device=DEVICE)

    results = []
    for function in (kernels.TritonCrossEntropy, TiledCrossEntropy):
        leaves = [t.clone().requires_grad_() for t in (x, y, z, scale)]
        rows, cols = function.apply(*leaves, x_valid, y_valid, z_valid, offset, with_columns, 5)
        ((rows * g_row).sum() + (cols * g_col[: cols.numel()]).sum()).backward()
        results.append([rows.detach(), cols.detach(), *(t.grad for t in leaves)])
    for name, got, want in zip(("rows", "cols", "dx", "dy", "dz", "dscale"), *results):
        assert got.dtype == want.dtype, f"{name}: {got.dtype} != {want.dtype}"
        tol = FP32 if dtype == torch.float32 or name in ("rows", "cols") else BF16
        torch.testing.assert_close(got.float(), want.float(), **tol, msg=lambda m, n=name: f"{n}: {m}")


@needs_kernels
def test_padding_may_hold_nan() -> None:
    """Padded rows and rows without a negative may hold anything: the value of finite padding, and exactly
    zero gradient there."""
    leaves, valid, neg_valid = make_inputs(21, 24, seed=10)
    nan_leaves, _, _ = make_inputs(21, 24, seed=10, pad_value=float("nan"))
    got = run_loss(TiledContrastiveLoss(8, backend="triton"), nan_leaves, valid, neg_valid, True)
    assert_close_all(got, run_loss(ContrastiveLoss(), leaves, valid, neg_valid, True), FP32)
    for grad in got[1:]:
        assert torch.isfinite(grad).all()


@needs_kernels
@pytest.mark.filterwarnings("ignore:divide by zero encountered in log")  # the interpreter's log(0) = -inf
def test_zero_dim_scale_and_an_all_padding_batch() -> None:
    leaves, valid, _ = make_inputs(9, 12, seed=4)
    loss_fn = TiledContrastiveLoss(4, backend="triton")
    v, c = (x.clone().requires_grad_() for x in leaves[:2])
    scale = torch.tensor(7.0, device=DEVICE, requires_grad=True)
    loss_fn(v, c, scale, valid).backward()
    assert scale.grad.shape == () and torch.isfinite(scale.grad)
    nothing = torch.zeros(9, dtype=torch.bool, device=DEVICE)
    v2, c2 = (x.clone().requires_grad_() for x in leaves[:2])
    loss = loss_fn(v2, c2, scale, nothing)
    loss.backward()
    assert loss.item() == 0.0 and (v2.grad == 0).all() and (c2.grad == 0).all()


@needs_kernels
def test_forward_saves_no_batch_by_batch_tensor() -> None:
    batch = 256
    leaves, valid, neg_valid = make_inputs(batch, 16, seed=7)
    v, c, c_neg, scale = (x.clone().requires_grad_() for x in leaves)
    saved: list[int] = []

    def pack(t: torch.Tensor) -> torch.Tensor:
        saved.append(t.numel())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        TiledContrastiveLoss(64, backend="triton")(v, c, scale, valid, neg_text_features=c_neg,
                                                   neg_valid=neg_valid)
    assert saved and max(saved) < batch * batch, f"a saved tensor holds {max(saved)} ≥ B² values"


@needs_kernels
def test_backend_choice_and_the_log_lines(monkeypatch: pytest.MonkeyPatch,
                                          caplog: pytest.LogCaptureFixture) -> None:
    """auto: Triton on CUDA only; torch: never; triton: insists, and says why where it cannot run.  The loss
    logs the path once it sees the device (the start-up line is written before the model is moved)."""
    with caplog.at_level(logging.INFO, logger="kclip_ds.kernels.tiled_infonce"):
        TiledContrastiveLoss(4, backend="triton").cross_entropy(DEVICE)
    assert f"contrastive loss tiles on {DEVICE}: triton (tile 4)" in caplog.text
    assert loss_path(False, 256) == "dense"
    assert loss_path(True, 256) == "tiled torch (tile 256)"  # the existing call: built on the CPU
    assert loss_path(True, 256, device="cuda") == "tiled triton (tile 256)"
    assert loss_path(True, 256, device="cuda", backend="torch") == "tiled torch (tile 256)"
    assert loss_path(True, 256, device=DEVICE, backend="triton") == "tiled triton (tile 256)"
    assert TiledContrastiveLoss(4).cross_entropy("cpu") is TiledCrossEntropy
    assert TiledContrastiveLoss(4).cross_entropy("cuda") is kernels.TritonCrossEntropy
    assert TiledContrastiveLoss(4, backend="torch").cross_entropy("cuda") is TiledCrossEntropy
    assert build_contrastive_loss(True, 64, backend="triton").backend == "triton"
    assert kernels.triton_available(DEVICE) and kernels.triton_available("cuda")

    monkeypatch.setattr(kernels, "triton_available", lambda device: False)
    assert TiledContrastiveLoss(4).cross_entropy("cuda") is TiledCrossEntropy
    assert loss_path(True, 256, device="cuda") == "tiled torch (tile 256)"
    with pytest.raises(RuntimeError, match="Triton cannot run"):
        TiledContrastiveLoss(4, backend="triton").cross_entropy(DEVICE)


def relative_error(got: torch.Tensor, want: torch.Tensor) -> float:
    return ((got.float() - want.float()).norm() / want.float().norm().clamp(min=1e-30)).item()


@needs_kernels
@pytest.mark.skipif(not torch.cuda.is_available(), reason="the compiled kernels need a CUDA GPU")
@pytest.mark.parametrize("dtype, bound", [(torch.float32, 1e-5), (torch.bfloat16, 1e-2)])
def test_compiled_kernels_match_torch_tiles_at_scale(dtype: torch.dtype, bound: float,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    """B = 4096, D = 512 on the GPU, padding and negatives: the compiled kernels against the torch tiles
    (full fp32 tiles either way; bf16 differs by G rounded to bf16 in backward).  Prints both timings."""
    monkeypatch.setattr(torch.backends.cuda.matmul, "allow_tf32", False)  # TF32 on both paths would differ
    leaves, valid, neg_valid = make_inputs(4096, 512, seed=12, dtype=dtype)
    results = {}
    for backend in ("triton", "torch"):
        loss_fn = TiledContrastiveLoss(1024, backend=backend)
        run_loss(loss_fn, leaves, valid, neg_valid, True)  # compile, warm up
        torch.cuda.synchronize()
        start = time.perf_counter()
        results[backend] = run_loss(loss_fn, leaves, valid, neg_valid, True)
        torch.cuda.synchronize()
        print(f"{dtype} {backend}: {1e3 * (time.perf_counter() - start):.1f} ms forward + backward")
    for name, got, want in zip(("loss", "image", "text", "negatives", "logit_scale"), results["triton"],
                               results["torch"]):
        assert got.dtype == want.dtype and torch.isfinite(got).all(), name
        assert relative_error(got, want) < bound, f"{name}: relative error {relative_error(got, want):.2e}"
