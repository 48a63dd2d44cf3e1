"""Shared fixtures: a small shapes-world dataset and a helper that launches 2-rank CPU jobs."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from kclip_ds.data import demo_world

REPO = Path(__file__).resolve().parents[1]
# 250 train samples in shards of 40: 7 shards, the last one short (an uneven shard count on purpose).
SMALL_SIZES = {"train": 250, "val": 48, "test": 40, "zeroshot": 36}
SMALL_SHARD = 40


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def cpu_env(**extra: str) -> dict[str, str]:
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1", **extra}
    env.pop("RANK", None)
    env.pop("WORLD_SIZE", None)
    return env


def run_group(cmd: list[str], timeout: int) -> subprocess.CompletedProcess:
    """Run ``cmd`` in its own process group; on timeout kill the whole group (ranks, data workers, forkserver)
    so that nothing is left behind to disturb later tests, then fail with the output so far."""
    proc = subprocess.Popen(cmd, cwd=REPO, env=cpu_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    try:
        stdout, stderr = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        stdout, stderr = proc.communicate()
        pytest.fail(f"timed out after {timeout} s: {' '.join(cmd)}\n--- stdout\n{stdout[-4000:]}\n--- stderr\n"
                    f"{stderr[-4000:]}")
    return subprocess.CompletedProcess(cmd, proc.returncode, stdout, stderr)


def torchrun(args: list[str], nproc: int = 2, timeout: int = 600) -> subprocess.CompletedProcess:
    """Launch ``nproc`` CPU ranks over gloo with torchrun on a free port; returns the finished process."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc),
           "--master_addr", "127.0.0.1", "--master_port", str(free_port()), *args]
    return run_group(cmd, timeout)


def python(args: list[str], timeout: int = 300) -> subprocess.CompletedProcess:
    """One process (a world of one)."""
    return run_group([sys.executable, *args], timeout)


def assert_ok(proc: subprocess.CompletedProcess) -> None:
    assert proc.returncode == 0, f"exit {proc.returncode}\n--- stdout\n{proc.stdout[-6000:]}\n--- stderr\n{proc.stderr[-6000:]}"


@pytest.fixture(scope="session")
def demo_data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("demo_data")
    demo_world.make_demo_data(root, seed=0, split_sizes=SMALL_SIZES, shard_size=SMALL_SHARD, image_size=32)
    return root


@pytest.fixture
def kill_after_first_shard():
    """``kill(run, out, partial)``: calls ``run(log)``, a shard tool writing two shards to ``out``, and stops it
    as a kill after shard 0 would (no manifest yet); then leaves ``partial`` as shard 1's temp file, a
    half-written shard for the rerun to replace."""
    def stop(line: str) -> None:
        if line.startswith("[1/2]"):
            raise KeyboardInterrupt

    def kill(run, out: Path, partial: bytes) -> None:
        with pytest.raises(KeyboardInterrupt):
            run(stop)
        assert [p.name for p in out.glob("*.tar")] == ["000000.tar"] and not (out / "manifest.json").exists()
        (out / ".000001.tar.tmp-99999").write_bytes(partial)

    return kill


def train_spec(root: Path) -> str:
    n = len(list((root / "train").glob("*.tar")))
    return f"{root}/train/{{000000..{n - 1:06d}}}.tar"


def losses(run_dir: Path) -> dict[int, float]:
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    steps = [r["step"] for r in records if r["kind"] == "train"]
    assert len(steps) == len(set(steps)), f"{run_dir}: a step is logged twice: {steps}"
    return {r["step"]: r["loss"] for r in records if r["kind"] == "train"}


def common(data: Path, out: Path, **extra: object) -> list[str]:
    args = {"data.train": train_spec(data), "data.val": f"{data}/val/{{000000..000001}}.tar",
            "data.test": f"{data}/test/000000.tar", "data.zeroshot": f"{data}/zeroshot/000000.tar",
            "data.batch_size": 8, "data.workers": 2, "data.shuffle_buffer": 32, "model.arch": "kclip-micro",
            "train.output_dir": str(out), "train.log_every": 1, "train.save_every": 0, "train.eval_every": 0,
            "train.warmup_steps": 2, "train.progress_bar": False, "train.tensorboard": False, "eval.batch_size": 16}
    args.update(extra)
    return [f"{k}={v}" for k, v in args.items()]


STRUCTURE = {"method.name": "structure_clip", "data.negatives": "[relation,attribute]", "method.graph_width": 64,
             "method.graph_heads": 2, "method.graph_layers": 1}
ZERO3_STRUCTURE = {**STRUCTURE, "deepspeed.config": "ds_configs/zero3.json", "method.relation_bias": True,
                   "method.infonce_weight": 0.5}
ZERO_MATRIX = [(stage, precision) for stage in (0, 1, 2, 3) for precision in ("fp32", "bf16")]


@pytest.fixture(scope="session")
def runs(demo_data: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """One 2-rank launch: the ZeRO × precision matrix, an 8-step run, the same run stopped at step 4,
    and a 30-step run (the reference for the signal test)."""
    root = tmp_path_factory.mktemp("runs")
    configs = []
    # The reference runs go first: a ZeRO-3 engine leaves DeepSpeed's patched torch.nn.functional.linear
    # in the process, which changes the last bits of later fp32 runs in the same process.
    for name, extra in (("straight8", {"train.max_steps": 8}),
                        ("half8", {"train.max_steps": 8, "train.stop_after_steps": 4}),
                        ("straight30", {"train.max_steps": 30, "data.workers": 1, "train.save_every": 10})):
        configs.append({"name": name, "overrides": common(demo_data, root / name, **extra)})
    for stage, precision in ZERO_MATRIX:
        name = f"zero{stage}_{precision}"
        configs.append({"name": name, "overrides": common(
            demo_data, root / name, **{"train.max_steps": 2, "deepspeed.config": f"ds_configs/zero{stage}.json",
                                       "deepspeed.bf16": precision == "bf16", "data.workers": 1})})
    for name, extra in (("zero2_offload", {"deepspeed.config": "ds_configs/zero2_offload.json"}),
                        ("zero2_gradckpt", {"model.grad_checkpointing": True}),
                        ("zero2_accum2", {"data.batch_size": 4, "train.grad_accum": 2}),
                        ("zero3_negclip", {"deepspeed.config": "ds_configs/zero3.json",
                                           "data.negatives": "[relation,attribute]"}),
                        ("zero2_structure", STRUCTURE),
                        ("zero3_structure", ZERO3_STRUCTURE),
                        ("zero3_structure_ckpt", {**ZERO3_STRUCTURE, "model.grad_checkpointing": True,
                                                  "method.graph_grad_checkpointing": True})):
        configs.append({"name": name, "overrides": common(demo_data, root / name, **{
            "train.max_steps": 2, "data.workers": 1, **extra})})
    (root / "configs.json").write_text(json.dumps(configs))
    proc = torchrun([str(REPO / "tests/dist/run_configs.py"), str(root / "configs.json"), str(root / "results.json")])
    assert_ok(proc)
    results = json.loads((root / "results.json").read_text())
    assert results["half8"]["stopped_by"] == "stop_after_steps" and results["straight8"]["step"] == 8
    return {c["name"]: root / c["name"] for c in configs}


# ------------------------------------------------- real knowledge sources (Debian packages, apt-installed if missing)

def ensure_apt(packages: list[str], marker: Path) -> None:
    """apt-get ``packages`` unless ``marker`` exists; skip the test when that is impossible here."""
    if marker.exists():
        return
    if os.geteuid() != 0 or shutil.which("apt-get") is None:
        pytest.skip(f"{marker} missing and installing it needs root and apt-get: "
                    f"apt-get install -y --no-install-recommends {' '.join(packages)}")
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    cmd = ["apt-get", "install", "-y", "--no-install-recommends", *packages]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, check=False)
    if done.returncode != 0:  # a fresh image may have no package lists yet
        subprocess.run(["apt-get", "update"], env=env, capture_output=True, check=False)
        done = subprocess.run(cmd, env=env, capture_output=True, text=True, check=False)
    if done.returncode != 0 or not marker.exists():
        pytest.skip(f"`{' '.join(cmd)}` failed: {done.stderr[-500:]}")


@pytest.fixture(scope="session")
def wordnet(tmp_path_factory: pytest.TempPathFactory):
    ensure_apt(["wordnet-base", "wordnet-sense-index"], Path("/usr/share/wordnet/index.sense"))
    from kclip_ds.knowledge.kg import load_wordnet

    return load_wordnet(tmp_path_factory.mktemp("nltk_data"))


@pytest.fixture(scope="session")
def fashion_source() -> Path:
    from kclip_ds.knowledge import fashion

    ensure_apt(["dataset-fashion-mnist"], fashion.FASHION_DIR / fashion.SOURCE_FILES["test"][1])
    return fashion.FASHION_DIR


@pytest.fixture(scope="session")
def fashion_data(tmp_path_factory: pytest.TempPathFactory, wordnet, fashion_source: Path) -> Path:
    """A small Fashion-MNIST × WordNet build (tools/make_fashion_kg.py): 8 train + 2 val images per class, the
    zero-shot splits at 8 per class, WordNet one hop around the class synsets."""
    from kclip_ds.knowledge.fashion import make_fashion_kg

    root = tmp_path_factory.mktemp("fashion")
    make_fashion_kg(root, source=fashion_source, limit_per_class=8, val_per_class=2, wordnet_hops=1, shard_size=64,
                    wordnet=wordnet, log=lambda _: None)
    return root
