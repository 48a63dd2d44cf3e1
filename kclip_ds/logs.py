"""What a run shows: the per-step log line, metrics.jsonl, TensorBoard, a progress bar on rank 0.

metrics.jsonl holds one JSON object per logged step ({"kind": "train", "step", "loss", "lr", …})
and per evaluation ({"kind": "eval", "step", "val/image_to_text_R@1", …}).  A resumed run first
drops records past the checkpoint it resumed from, so the file reads as one uninterrupted run.
"""

from __future__ import annotations

import json
import logging
import os
import sys
import time
from pathlib import Path
from typing import Any

from kclip_ds.data.shards import atomic_write_text


def setup_logging() -> None:
    rank = int(os.environ.get("RANK", os.environ.get("SLURM_PROCID", "0")))
    logging.basicConfig(level=logging.INFO if rank == 0 else logging.WARNING, stream=sys.stdout,
                        format=f"%(asctime)s [rank{rank}] %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S")


def format_step(step: int, total: int, values: dict[str, float]) -> str:
    """step 12/100 | epoch 0 | loss 3.1234 | lr 1.20e-04 | 152.3 samples/s | 76.1 samples/s/rank | logit_scale 14.29"""
    return (f"step {step}/{total} | epoch {int(values['epoch'])} | loss {values['loss']:.4f} | lr {values['lr']:.2e} | "
            f"{values['samples_per_s']:.1f} samples/s | {values['samples_per_s_per_rank']:.1f} samples/s/rank | "
            f"logit_scale {values['logit_scale']:.2f}"
            + (f" | grad_norm {values['grad_norm']:.3f}" if "grad_norm" in values else ""))


class MetricsLog:
    """Rank-0 sink for training and evaluation metrics (no-op elsewhere)."""

    def __init__(self, out_dir: Path, *, enabled: bool, resumed_at_step: int | None, tensorboard: bool,
                 progress_bar: bool, total_steps: int):
        self.enabled = enabled
        self.total_steps = total_steps
        self.log = logging.getLogger("kclip_ds.train")
        self.path = out_dir / "metrics.jsonl"
        self.writer = self.bar = None
        if not enabled:
            return
        if resumed_at_step is not None and self.path.exists():
            kept = [line for line in self.path.read_text().splitlines()
                    if line.strip() and json.loads(line)["step"] <= resumed_at_step]
            atomic_write_text(self.path, "".join(line + "\n" for line in kept))
        elif resumed_at_step is None:
            self.path.unlink(missing_ok=True)
        self.file = open(self.path, "a")  # noqa: SIM115 — kept open for the run, closed in close()
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(str(out_dir / "tensorboard"), purge_step=resumed_at_step)
        if progress_bar:
            from tqdm import tqdm

            self.bar = tqdm(total=total_steps, initial=resumed_at_step or 0, desc="train", unit="step",
                            dynamic_ncols=True, file=sys.stderr, mininterval=1.0,
                            disable=None)  # None: off when stderr is not a terminal (Slurm logs, CI)

    def _record(self, record: dict[str, Any]) -> None:
        self.file.write(json.dumps(record) + "\n")
        self.file.flush()

    def train(self, step: int, values: dict[str, float]) -> None:
        if not self.enabled:
            return
        self._record({"kind": "train", "step": step, "time": time.time(), **values})
        line = format_step(step, self.total_steps, values)
        if self.bar is not None:
            self.bar.n = step
            self.bar.set_postfix(loss=f"{values['loss']:.4f}", refresh=False)
            self.bar.refresh()
            self.bar.write(line, file=sys.stdout)
        else:
            self.log.info(line)
        if self.writer is not None:
            for name, value in values.items():
                self.writer.add_scalar(f"train/{name}", value, step)

    def eval(self, step: int, values: dict[str, float]) -> None:
        if not self.enabled:
            return
        self._record({"kind": "eval", "step": step, "time": time.time(), **values})
        self.log.info("eval at step %d: %s", step, " | ".join(f"{k} {v:.4f}" for k, v in values.items()))
        if self.writer is not None:
            for name, value in values.items():
                self.writer.add_scalar(name, value, step)

    def close(self) -> None:
        if not self.enabled:
            return
        self.file.close()
        if self.writer is not None:
            self.writer.close()
        if self.bar is not None:
            self.bar.close()
