"""2-rank CPU runs over gloo: the loss against open_clip, ZeRO 0–3 × fp32/bf16, bit-exact resume,
a stop on a signal, and kclip-eval on ZeRO-2 / ZeRO-3 / ZeRO-0 checkpoints.

Several configs share one launch (tests/dist/run_configs.py) because a launch costs ~9 s of start-up.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

from tests.conftest import (
    REPO,
    ZERO_MATRIX,
    assert_ok,
    common,
    cpu_env,
    free_port,
    losses,
    python,
    run_group,
    torchrun,
)

pytestmark = pytest.mark.slow


def test_loss_and_gradients_match_open_clip_on_one_process() -> None:
    proc = torchrun([str(REPO / "tests/dist/loss_equivalence.py")])
    assert_ok(proc)
    assert proc.stdout.count("vs open_clip single process") == 2 and "negclip: loss" in proc.stdout


def test_zero_stages_and_precisions_agree_on_the_first_step(runs: dict[str, Path]) -> None:
    first = {f"zero{s}_{p}": losses(runs[f"zero{s}_{p}"])[1] for s, p in ZERO_MATRIX}
    fp32 = [v for k, v in first.items() if k.endswith("fp32")]
    assert max(fp32) - min(fp32) < 1e-5, first
    for stage in range(4):
        assert abs(first[f"zero{stage}_bf16"] - first[f"zero{stage}_fp32"]) < 0.05, first
    for name in first:  # each took two optimizer steps and saved a complete checkpoint
        assert (runs[name] / "checkpoints/latest").read_text() == "global_step2"
    # The logged gradient norm is the global one (before clipping), whatever ZeRO partitions.  DeepSpeed keeps
    # none for ZeRO-0 in fp32 (its plain optimizer path), so that run logs none.
    norms = {name: json.loads((runs[name] / "metrics.jsonl").read_text().splitlines()[0]).get("grad_norm")
             for name in first}
    assert norms.pop("zero0_fp32") is None, norms
    for precision, tolerance in (("fp32", 1e-5), ("bf16", 1e-2)):  # bf16: ZeRO-3 reduces in another order
        same = [v for k, v in norms.items() if k.endswith(precision)]
        assert min(same) > 0 and max(same) - min(same) < tolerance * max(same), norms


def test_offload_checkpointing_and_accumulation(runs: dict[str, Path]) -> None:
    reference = losses(runs["zero2_fp32"])
    assert losses(runs["zero2_offload"]) == pytest.approx(reference, abs=1e-5)  # same math, optimizer on CPU
    assert losses(runs["zero2_gradckpt"]) == pytest.approx(reference, abs=1e-5)  # recompute, same values
    accum = losses(runs["zero2_accum2"])
    assert sorted(accum) == [1, 2]  # steps count optimizer steps; each consumed two micro-batches
    state = (runs["zero2_accum2"] / "checkpoints/global_step2/kclip_complete.json").read_text()
    assert json.loads(state)["step"] == 2


def test_negclip_trains_under_zero3(runs: dict[str, Path]) -> None:
    negclip, plain = losses(runs["zero3_negclip"]), losses(runs["zero3_fp32"])
    assert sorted(negclip) == [1, 2]
    assert negclip[1] > plain[1]  # same init and batch, plus hard-negative columns: a larger first-step loss


def test_keep_last_checkpoints(runs: dict[str, Path]) -> None:
    ckpts = sorted(p.name for p in (runs["straight30"] / "checkpoints").iterdir() if p.is_dir())
    assert ckpts == ["global_step20", "global_step30"]  # keep_last=2 of 10, 20, 30
    assert (runs["straight30"] / "checkpoints/latest").read_text() == "global_step30"


def test_resume_reproduces_the_straight_run_bit_for_bit(runs: dict[str, Path], demo_data: Path) -> None:
    half = runs["half8"]
    assert sorted(losses(half)) == [1, 2, 3, 4]
    proc = torchrun(["-m", "kclip_ds.train", "--config", "configs/demo.yaml",
                     *common(demo_data, half, **{"train.max_steps": 8, "train.resume": "latest"})])
    assert_ok(proc)
    assert "resumed from latest at step 4" in proc.stdout
    assert losses(half) == losses(runs["straight8"])  # exact float equality, all 8 steps


def test_the_deepspeed_launcher_runs_the_same_training(runs: dict[str, Path], demo_data: Path,
                                                        tmp_path: Path) -> None:
    """`deepspeed --num_accelerators 2` (the README's launcher) gives torchrun's 8 losses exactly."""
    out = tmp_path / "deepspeed8"
    cmd = [str(Path(sys.executable).with_name("deepspeed")), "--num_accelerators", "2", "--master_port",
           str(free_port()), "--module", "kclip_ds.train", "--config", "configs/demo.yaml",
           *common(demo_data, out, **{"train.max_steps": 8})]
    assert_ok(run_group(cmd, timeout=300))
    assert losses(out) == losses(runs["straight8"])


def test_a_signal_stops_all_ranks_with_a_checkpoint_and_resume_matches(runs: dict[str, Path], demo_data: Path,
                                                                          tmp_path: Path) -> None:
    out = tmp_path / "preempted"
    args = common(demo_data, out, **{"train.max_steps": 30, "data.workers": 1})
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
           "--master_port", str(free_port()), "-m", "kclip_ds.train", "--config", "configs/demo.yaml", *args]
    proc = subprocess.Popen(cmd, cwd=REPO, env=cpu_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.time() + 240
    while time.time() < deadline and proc.poll() is None:
        if (out / "metrics.jsonl").exists() and len((out / "metrics.jsonl").read_text().splitlines()) >= 3:
            break
        time.sleep(0.05)
    ranks = psutil.Process(proc.pid).children()  # the two ranks (their data workers are grandchildren)
    assert len(ranks) == 2, [p.cmdline() for p in ranks]
    ranks[-1].send_signal(signal.SIGUSR1)  # Slurm's pre-emption warning, delivered to one rank only
    output, _ = proc.communicate(timeout=240)
    assert proc.returncode == 0, output[-5000:]
    stopped = int((out / "checkpoints/latest").read_text().removeprefix("global_step"))
    assert 3 <= stopped < 30, output[-3000:]
    assert "finished at step" in output and "(signal)" in output
    assert_ok(torchrun(["-m", "kclip_ds.train", "--config", "configs/demo.yaml", *args, "train.resume=latest"]))
    assert losses(out) == losses(runs["straight30"])


@pytest.mark.parametrize("name", ["straight8", "zero3_fp32", "zero0_fp32"])
def test_kclip_eval_matches_the_in_training_evaluation(runs: dict[str, Path], name: str) -> None:
    proc = python(["-m", "kclip_ds.eval.cli", "--run-dir", str(runs[name]), "--split", "val"])
    assert_ok(proc)
    standalone = json.loads((runs[name] / "eval" / f"{(runs[name] / 'checkpoints/latest').read_text()}_val.json")
                            .read_text())
    in_training = [json.loads(line) for line in (runs[name] / "metrics.jsonl").read_text().splitlines()][-1]
    assert in_training["kind"] == "eval"
    for key in ("val/image_to_text_R@1", "val/text_to_image_R@5", "zeroshot/top1"):
        assert standalone[key] == pytest.approx(in_training[key], abs=1e-6 if "fp32" in name or "8" in name
                                                else 0.05), key


def test_kclip_eval_reads_the_test_split_only_when_asked(runs: dict[str, Path]) -> None:
    run = runs["straight8"]
    records = (run / "metrics.jsonl").read_text()
    assert "test/" not in records  # training never touched the test split
    proc = python(["-m", "kclip_ds.eval.cli", "--run-dir", str(run), "--split", "test"])
    assert_ok(proc)
    assert json.loads((run / "eval/global_step8_test.json").read_text())["test/num_samples"] == 40


def test_output_dir_with_an_earlier_run_needs_an_explicit_resume(runs: dict[str, Path], demo_data: Path) -> None:
    proc = python(["-m", "kclip_ds.train", "--config", "configs/demo.yaml",
                   *common(demo_data, runs["zero0_fp32"], **{"train.max_steps": 2})])
    assert proc.returncode == 2
    assert "holds checkpoints of an earlier run: pass train.resume=latest" in proc.stderr
    assert os.path.exists(runs["zero0_fp32"] / "checkpoints/global_step2")
