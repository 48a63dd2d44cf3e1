"""Shared fixtures: a small shapes-world dataset and a helper that launches 2-rank CPU jobs."""

from __future__ import annotations

import os
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


def torchrun(args: list[str], nproc: int = 2, timeout: int = 600) -> subprocess.CompletedProcess:
    """Launch ``nproc`` CPU ranks over gloo with torchrun on a free port; returns the finished process."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc),
           "--master_addr", "127.0.0.1", "--master_port", str(free_port()), *args]
    return subprocess.run(cmd, check=False, cwd=REPO, env=cpu_env(), capture_output=True, text=True, timeout=timeout)


def python(args: list[str], timeout: int = 300) -> subprocess.CompletedProcess:
    """One process (a world of one)."""
    return subprocess.run([sys.executable, *args], check=False, cwd=REPO, env=cpu_env(), capture_output=True, text=True,
                          timeout=timeout)


def assert_ok(proc: subprocess.CompletedProcess) -> None:
    assert proc.returncode == 0, f"exit {proc.returncode}\n--- stdout\n{proc.stdout[-6000:]}\n--- stderr\n{proc.stderr[-6000:]}"


@pytest.fixture(scope="session")
def demo_data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("demo_data")
    demo_world.make_demo_data(root, seed=0, split_sizes=SMALL_SIZES, shard_size=SMALL_SHARD, image_size=32)
    return root


def train_spec(root: Path) -> str:
    n = len(list((root / "train").glob("*.tar")))
    return f"{root}/train/{{000000..{n - 1:06d}}}.tar"
