"""The DeepSpeed engine around a method: config assembly, initialize, checkpoints, signals.

DeepSpeed owns ZeRO sharding, precision, gradient accumulation, clipping, the optimizer and the
LR schedule; this file only fills the keys the experiment YAML owns into the plain DeepSpeed JSON.

Checkpoint layout (``<output_dir>/checkpoints``)::

    global_step40/              DeepSpeed's own files (model, optimizer, scheduler) + client state
    global_step40/kclip_rng_rank{r}.pt   per-rank RNG states (tensors only, loaded weights_only)
    global_step40/kclip_complete.json    written after every rank has saved
    latest                      the tag of the newest complete checkpoint; moved last, atomically
"""

from __future__ import annotations

import copy
import json
import logging
import os
import shutil
import signal
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from kclip_ds.config import Config, ConfigError
from kclip_ds.data.pipeline import STOP_SIGNALS
from kclip_ds.data.shards import atomic_write_text

log = logging.getLogger(__name__)

COMPLETE_MARKER = "kclip_complete.json"
LATEST = "latest"


class CheckpointError(RuntimeError):
    """A user-facing checkpoint problem: names the directory/tag and what to do."""


def is_cpu_accelerator() -> bool:
    from deepspeed.accelerator import get_accelerator

    return get_accelerator().device_name() == "cpu"


def init_distributed(cfg: Config) -> None:
    """Start torch.distributed the way DeepSpeed expects (env:// from torchrun/deepspeed/srun)."""
    import deepspeed

    if not cfg.deepspeed.cpu_shm_comm and is_cpu_accelerator():
        # DeepSpeed JIT-builds its shared-memory allreduce op (~30 s) when it creates its comm backend
        # on CPU; marking it incompatible makes DeepSpeed use plain gloo collectives instead.
        import deepspeed.ops

        deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False
    if "RANK" not in os.environ and "SLURM_PROCID" in os.environ:
        os.environ.update(RANK=os.environ["SLURM_PROCID"], WORLD_SIZE=os.environ["SLURM_NTASKS"],
                          LOCAL_RANK=os.environ.get("SLURM_LOCALID", "0"))
    if "RANK" not in os.environ:  # plain `python -m kclip_ds.train`: a world of one
        os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1")
        os.environ.setdefault("MASTER_PORT", str(_free_port()))
    deepspeed.init_distributed(dist_backend=None, auto_mpi_discovery=False, verbose=False)


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def build_ds_config(cfg: Config, world_size: int) -> dict[str, Any]:
    """The DeepSpeed config dict: the JSON file plus the keys the YAML owns (conflicts are errors)."""
    path = Path(cfg.deepspeed.config)
    if not path.is_file():
        raise ConfigError(f"deepspeed.config: file not found: {path} (see ds_configs/ for examples)")
    try:
        ds = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise ConfigError(f"{path}: not valid JSON ({exc})") from exc
    t = cfg.train
    owned: dict[str, Any] = {
        "train_micro_batch_size_per_gpu": cfg.data.batch_size,
        "gradient_accumulation_steps": t.grad_accum,
        "gradient_clipping": t.grad_clip,
        "optimizer": {"type": "AdamW", "params": {
            "lr": t.lr, "betas": [t.beta1, t.beta2], "eps": t.eps, "weight_decay": t.weight_decay,
            # DeepSpeed's fused/CPU Adam JIT-build a C++ op; on CPU ranks torch's AdamW does the same math.
            **({"torch_adam": True} if is_cpu_accelerator() else {})}},
        "scheduler": {"type": "WarmupCosineLR", "params": {
            "total_num_steps": t.max_steps, "warmup_num_steps": max(1, t.warmup_steps),
            "warmup_type": "linear", "warmup_min_ratio": 0.0, "cos_min_ratio": t.min_lr_ratio}},
    }
    for key, value in owned.items():
        if key in ds and ds[key] != value:
            raise ConfigError(f"{path}: '{key}' is set by the experiment config (train.* / data.batch_size); "
                              f"remove it from the DeepSpeed JSON")
        ds[key] = value
    global_batch = cfg.data.batch_size * t.grad_accum * world_size
    if ds.get("train_batch_size", global_batch) != global_batch:
        raise ConfigError(f"{path}: train_batch_size {ds['train_batch_size']} != data.batch_size × "
                          f"train.grad_accum × world size = {global_batch}; remove it from the JSON")
    ds["train_batch_size"] = global_batch
    if cfg.deepspeed.bf16:
        ds["bf16"] = {**ds.get("bf16", {}), "enabled": True}
    ds.setdefault("steps_per_print", 10**9)  # kclip_ds prints its own per-step line
    ds.setdefault("wall_clock_breakdown", False)
    return ds


def param_groups(model: nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """open_clip's rule: no weight decay on gains, biases, norms, embeddings-like 1-d params and logit_scale."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        exclude = p.ndim < 2 or "bn" in name or "ln" in name or "bias" in name or "logit_scale" in name
        (no_decay if exclude else decay).append(p)
    return [{"params": no_decay, "weight_decay": 0.0}, {"params": decay, "weight_decay": weight_decay}]


def initialize(method: nn.Module, cfg: Config, world_size: int, ds_config: dict[str, Any] | None = None):
    """``deepspeed.initialize`` with the assembled config; returns the engine."""
    import deepspeed

    ds_config = ds_config if ds_config is not None else build_ds_config(cfg, world_size)
    engine, _, _, _ = deepspeed.initialize(
        model=method, model_parameters=param_groups(method, cfg.train.weight_decay), config=copy.deepcopy(ds_config))
    if world_size == 1 and engine.zero_optimization_stage() == 0 and not engine.bfloat16_enabled():
        # A world of one has nothing to all-reduce, but DeepSpeed would still flatten every gradient,
        # scale it by 1 and copy it back after each backward (~4% of a small model's step).
        engine.enable_backward_allreduce = False
    return engine


def compute_dtype(engine) -> torch.dtype:
    if engine.bfloat16_enabled():
        return torch.bfloat16
    if engine.fp16_enabled():
        return torch.float16
    return torch.float32


# ----------------------------------------------------------------------------------- checkpoints

def _rng_state() -> dict[str, torch.Tensor]:
    """Torch RNG states (dropout etc.).  kclip_ds draws no numbers from Python's or NumPy's global RNGs:
    data order and augmentation use seeds derived per (epoch, rank, step)."""
    state = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def _set_rng_state(state: dict[str, torch.Tensor]) -> None:
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def _tag_step(tag: str) -> int:
    return int(tag.removeprefix("global_step")) if tag.startswith("global_step") else -1


def save_checkpoint(engine, ckpt_dir: Path, step: int, client_state: dict[str, Any], keep_last: int) -> str:
    """Save collectively; the checkpoint is complete (marker written, `latest` moved) or not pointed to."""
    tag = f"global_step{step}"
    rank = dist.get_rank()
    tag_dir = ckpt_dir / tag
    if (tag_dir / COMPLETE_MARKER).is_file():  # this step is saved already (a resumed run that had finished)
        return tag
    dist.barrier()
    if rank == 0 and tag_dir.exists():  # a leftover from an interrupted save of the same step
        shutil.rmtree(tag_dir)
    dist.barrier()
    engine.save_checkpoint(str(ckpt_dir), tag=tag, client_state={"kclip": client_state}, save_latest=False)
    tmp = tag_dir / f".kclip_rng_rank{rank}.pt.tmp"
    torch.save(_rng_state(), tmp)
    os.replace(tmp, tag_dir / f"kclip_rng_rank{rank}.pt")
    dist.barrier()
    if rank == 0:
        atomic_write_text(tag_dir / COMPLETE_MARKER, json.dumps({"step": step, "world_size": dist.get_world_size()}))
        atomic_write_text(ckpt_dir / LATEST, tag)
        tags = sorted((p.name for p in ckpt_dir.iterdir() if p.is_dir() and _tag_step(p.name) >= 0), key=_tag_step)
        for old in tags[:-keep_last]:
            if old != tag:
                shutil.rmtree(ckpt_dir / old, ignore_errors=True)
    dist.barrier()
    return tag


def resolve_tag(ckpt_dir: Path, resume: str) -> str:
    if resume == "latest":
        latest = ckpt_dir / LATEST
        if not latest.is_file():
            raise CheckpointError(f"train.resume=latest but {latest} does not exist: no complete checkpoint in "
                                  f"{ckpt_dir} (start without train.resume, or point train.output_dir at the run)")
        return latest.read_text().strip()
    return resume


def load_checkpoint(engine, ckpt_dir: Path, resume: str) -> dict[str, Any]:
    """Restore model, optimizer, scheduler and RNG; returns the kclip client state."""
    tag = resolve_tag(ckpt_dir, resume)
    tag_dir = ckpt_dir / tag
    if not (tag_dir / COMPLETE_MARKER).is_file():
        raise CheckpointError(f"checkpoint {tag_dir} is incomplete or missing (no {COMPLETE_MARKER}); "
                              f"resume from 'latest' or an earlier tag")
    load_path, client = engine.load_checkpoint(str(ckpt_dir), tag=tag)
    if load_path is None or client is None or "kclip" not in client:
        raise CheckpointError(f"checkpoint {tag_dir} could not be loaded by DeepSpeed (files missing or from "
                              f"another world size?)")
    rng_file = tag_dir / f"kclip_rng_rank{dist.get_rank()}.pt"
    if rng_file.is_file():
        _set_rng_state(torch.load(rng_file, weights_only=True))
    else:
        log.warning("%s missing: RNG state not restored (world size changed?)", rng_file)
    return client["kclip"]


# ----------------------------------------------------------------------------------- signals

class StopSignal:
    """SIGTERM / SIGUSR1 set a flag; ranks agree on it once per step (one all-reduce of a scalar)."""

    def __init__(self) -> None:
        self.received: int | None = None
        for sig in STOP_SIGNALS:
            signal.signal(sig, self._handler)

    def _handler(self, signum: int, _frame) -> None:
        self.received = signum

    def should_stop(self, device: torch.device) -> bool:
        flag = torch.tensor([1 if self.received is not None else 0], device=device)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return bool(flag.item())
