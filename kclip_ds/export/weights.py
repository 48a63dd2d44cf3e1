"""A finished run's weights, consolidated from its DeepSpeed checkpoint (any ZeRO stage, fp32 or bf16).

ZeRO 1–3 partitions are merged by DeepSpeed's own ``zero_to_fp32`` (not rewritten here); ZeRO 0 keeps
whole weights in ``mp_rank_00_model_states.pt``, read with ``torch.load(weights_only=True)``.
Every failure names the run directory, tag or file and says what to do.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import torch

from kclip_ds import engine as eng
from kclip_ds.config import Config, load_config

log = logging.getLogger(__name__)


@dataclass
class RunWeights:
    cfg: Config  # the run's own config.yaml
    tag: str
    method_state: dict[str, torch.Tensor]  # the method's fp32 state dict: "model.*" towers + knowledge modules


def consolidated_state_dict(ckpt_dir: Path, tag: str) -> dict[str, torch.Tensor]:
    """fp32 weights of the method from a DeepSpeed checkpoint of any ZeRO stage."""
    tag_dir = ckpt_dir / tag
    if not tag_dir.is_dir():
        raise eng.CheckpointError(f"checkpoint tag '{tag}' not found in {ckpt_dir} (tags there: "
                                  f"{', '.join(sorted(p.name for p in ckpt_dir.glob('global_step*'))) or 'none'})")
    if not (tag_dir / eng.COMPLETE_MARKER).is_file():
        raise eng.CheckpointError(f"checkpoint {tag_dir} is incomplete (no {eng.COMPLETE_MARKER}): it was "
                                  f"interrupted while saving; use another tag or 'latest'")
    try:
        if any(tag_dir.glob("*zero_pp_rank_*optim_states.pt")):
            from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

            state = get_fp32_state_dict_from_zero_checkpoint(str(ckpt_dir), tag=tag)
        else:
            model_states = tag_dir / "mp_rank_00_model_states.pt"
            if not model_states.is_file():
                raise eng.CheckpointError(f"{tag_dir}: neither ZeRO partitions nor {model_states.name} found; "
                                          f"the checkpoint is damaged")
            state = torch.load(model_states, map_location="cpu", weights_only=True)["module"]
    except (RuntimeError, EOFError, KeyError, ValueError, OSError) as exc:
        if isinstance(exc, eng.CheckpointError):
            raise
        raise eng.CheckpointError(f"checkpoint {tag_dir} cannot be read ({exc.__class__.__name__}: "
                                  f"{str(exc).splitlines()[0][:200]}); a file is truncated or damaged — "
                                  f"use another tag") from exc
    return {k: v.detach().float().clone() for k, v in state.items()}


def load_run(run_dir: str | Path, tag: str = "latest", overrides: list[str] | None = None) -> RunWeights:
    run_dir = Path(run_dir)
    config = run_dir / "config.yaml"
    if not config.is_file():
        raise eng.CheckpointError(f"{config} not found: '{run_dir}' is not a kclip_ds run directory "
                                  f"(pass the run's train.output_dir)")
    cfg = load_config(config, overrides)
    ckpt_dir = run_dir / "checkpoints"
    if tag == "latest" and not (ckpt_dir / eng.LATEST).is_file():
        raise eng.CheckpointError(f"{ckpt_dir / eng.LATEST} not found: the run has no complete checkpoint yet; "
                                  f"pass --tag global_stepN of an existing checkpoint")
    tag = eng.resolve_tag(ckpt_dir, tag)
    return RunWeights(cfg=cfg, tag=tag, method_state=consolidated_state_dict(ckpt_dir, tag))


def split_towers(method_state: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """(open_clip CLIP state without the "model." prefix, everything else: the knowledge modules)."""
    towers = {k.removeprefix("model."): v for k, v in method_state.items() if k.startswith("model.")}
    extras = {k: v for k, v in method_state.items() if not k.startswith("model.")}
    return towers, extras
