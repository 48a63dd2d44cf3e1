"""slurm/*.sbatch against a real Slurm: a two-node cluster on this host (tools/local_slurm.py), or a site's.

Local (default): the module starts munged, slurmctld and two slurmd (Debian's Slurm 22.05, installed with
apt when missing; needs root) and stops them afterwards, also when a test fails.  Against a real site (a
smoke test of the templates there), point the tests at it instead of starting one:

    KCLIP_SLURM_SITE=1 KCLIP_SLURM_ARGS="-p debug -A myproj" make test PYTEST_ARGS=tests/test_slurm.py

The data and run directories must then be on a file system the nodes share (pytest's --basetemp).  Jobs run
CPU ranks over gloo (KCLIP_DEVICE=cpu), 2 nodes × 1 task, or 1 node × 2 tasks with KCLIP_SLURM_NODES=1.
"""

from __future__ import annotations

import json
import os
import shlex
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import REPO, common, losses

sys.path.insert(0, str(REPO / "tools"))
import local_slurm

pytestmark = pytest.mark.slow


class Cluster:
    def __init__(self, env: dict[str, str], sbatch_args: list[str], nodes: int = 2):
        self.env, self.sbatch_args = env, sbatch_args
        self.nodes = nodes  # a training job is 2 tasks: 2 nodes × 1, or 1 node × 2 (KCLIP_SLURM_NODES=1)

    def sbatch(self, script: str, args: list[str], *, output: Path, tasks: int, extra_env: dict[str, str]) -> str:
        nodes = min(tasks, self.nodes)
        exports = ",".join(["ALL", "KCLIP_DEVICE=cpu", "OMP_NUM_THREADS=1", f"KCLIP_VENV={sys.prefix}",
                            *(f"{k}={v}" for k, v in extra_env.items())])
        cmd = ["sbatch", "--parsable", f"--nodes={nodes}", f"--ntasks-per-node={tasks // nodes}",
               "--cpus-per-task=1", "--gpus-per-node=0", "--time=10", f"--output={output}", f"--export={exports}", *self.sbatch_args,
               str(REPO / "slurm" / script), *args]
        done = subprocess.run(cmd, cwd=REPO, env=self.env, capture_output=True, text=True, check=False)
        assert done.returncode == 0, f"sbatch failed: {done.stderr}"
        return done.stdout.strip().split(";")[0]

    def signal_batch(self, job: str, sig: str = "USR1") -> None:
        subprocess.run(["scancel", "--batch", f"--signal={sig}", job], env=self.env, check=True)


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    site_args = shlex.split(os.environ.get("KCLIP_SLURM_ARGS", ""))
    if os.environ.get("KCLIP_SLURM_SITE"):
        yield Cluster(dict(os.environ), site_args, int(os.environ.get("KCLIP_SLURM_NODES", "2")))
        return
    if local_slurm.missing_binaries() and os.geteuid() != 0:
        pytest.skip("Slurm is not installed and installing it needs root (apt-get install slurmctld slurmd "
                    "slurm-client munge), or set KCLIP_SLURM_SITE=1 to use a site's cluster")
    local = local_slurm.LocalSlurm(tmp_path_factory.mktemp("slurm"))
    try:
        local.start()
        yield Cluster(local.env(), site_args)
    finally:
        local.stop()


def wait_for(predicate, what: str, timeout: float, *logs: Path) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(1.0)
    tails = "\n".join(f"--- {p}\n{p.read_text()[-3000:] if p.exists() else '(missing)'}" for p in logs)
    pytest.fail(f"timed out after {timeout:.0f} s waiting for {what}\n{tails}")


def text(path: Path) -> str:
    return path.read_text() if path.exists() else ""


def test_train_sbatch_runs_two_nodes_and_eval_sbatch_reads_the_run(cluster: Cluster, demo_data: Path,
                                                                     tmp_path: Path) -> None:
    run, out = tmp_path / "run", tmp_path / "train.out"
    job = cluster.sbatch("train.sbatch", ["configs/demo.yaml", *common(demo_data, run, **{"train.max_steps": 6})],
                         output=out, tasks=2, extra_env={"KCLIP_RUN_DIR": str(run)})
    wait_for(lambda: "srun exited" in text(out), f"job {job} to finish", 300, out, run / "slurm/rank-0.log")
    assert "srun exited with 0" in text(out), text(out)
    assert f"job {job} restart 0: 2 tasks on n[1-2]" in text(out) or "KCLIP_SLURM_SITE" in os.environ
    assert sorted(losses(run)) == list(range(1, 7))
    assert (run / "checkpoints/latest").read_text() == "global_step6"
    rank0, rank1 = text(run / "slurm/rank-0.log"), text(run / "slurm/rank-1.log")
    assert "2 ranks × 8 per rank" in rank0 and "[rank1]" in rank1  # one world of two tasks on two nodes

    eval_out = tmp_path / "eval.out"
    job = cluster.sbatch("eval.sbatch", [str(run)], output=eval_out, tasks=1, extra_env={"SPLIT": "test"})
    wait_for(lambda: "done:" in text(eval_out), f"eval job {job}", 180, eval_out,
             run / f"slurm/eval-{job}-rank-0.log")
    metrics = json.loads((run / f"slurm/eval-{job}.json").read_text())
    assert 0.0 <= metrics["test/image_to_text_R@1"] <= 1.0 and "zeroshot/top1" in metrics, metrics


def test_preemption_checkpoints_requeues_and_resumes_exactly(cluster: Cluster, demo_data: Path, tmp_path: Path,
                                                             runs: dict[str, Path]) -> None:
    """USR1 to the batch script mid-run (what `--signal=B:USR1@…` or a site's preemption delivers): the ranks
    checkpoint and stop, the job requeues itself, the restart resumes from `latest`, and the 30 per-step
    losses equal those of the uninterrupted 30-step run (torchrun, same config: the `runs` fixture)."""
    run, out = tmp_path / "run", tmp_path / "train.out"
    args = common(demo_data, run, **{"train.max_steps": 30, "data.workers": 1, "train.save_every": 10})
    job = cluster.sbatch("train.sbatch", ["configs/demo.yaml", *args], output=out, tasks=2,
                         extra_env={"KCLIP_RUN_DIR": str(run)})
    metrics = run / "metrics.jsonl"
    wait_for(lambda: text(metrics).count('"kind": "train"') >= 4, "step 4", 300, out, run / "slurm/rank-0.log")
    cluster.signal_batch(job)
    wait_for(lambda: text(out).count("srun exited") >= 2, "the requeued job to finish", 400, out,
             run / "slurm/rank-0.log")
    log = text(out)
    assert "requeueing job" in log and f"job {job} restart 1" in log, log
    assert log.count("srun exited with 0") == 2, log
    rank0 = text(run / "slurm/rank-0.log")
    stopped = [line for line in rank0.splitlines() if "finished at step" in line and "(signal)" in line]
    assert len(stopped) == 1, rank0[-3000:]
    stop_step = int(stopped[0].split("finished at step ")[1].split()[0])
    assert 4 <= stop_step < 30 and f"resumed from latest at step {stop_step}" in rank0
    assert (run / "checkpoints/latest").read_text() == "global_step30"
    assert losses(run) == losses(runs["straight30"])  # all 30 steps, equal as floats
