"""open_clip towers from an arch name or a JSON config, weights from local disk only.

    towers = build_towers(cfg.model)   # Towers(model, preprocess_train, preprocess_val, tokenizer, …)

The CLIP module is a plain ``nn.Module``; DeepSpeed is applied to it from outside (engine.py).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import open_clip
import torch
from torch import nn

from kclip_ds.config import ModelConfig

log = logging.getLogger(__name__)

KCLIP_MODEL_CONFIGS = Path(__file__).resolve().parents[1] / "model_configs"
open_clip.add_model_config(KCLIP_MODEL_CONFIGS)


class ModelError(ValueError):
    """A user-facing model problem (unknown arch, missing weights file)."""


@dataclass
class Towers:
    model: nn.Module  # open_clip CLIP: forward(image, text) -> dict(image_features, text_features, logit_scale)
    preprocess_train: Callable
    preprocess_val: Callable
    tokenizer: Callable[[list[str]], torch.Tensor]
    arch: str
    image_size: int
    context_length: int


def resolve_arch(arch: str) -> str:
    """An open_clip model name; a path to a JSON config is registered under its file stem."""
    if arch.endswith(".json"):
        path = Path(arch)
        if not path.is_file():
            raise ModelError(f"model.arch: config file not found: {arch}")
        open_clip.add_model_config(path)
        arch = path.stem
    if arch not in open_clip.list_models():
        raise ModelError(f"model.arch: unknown open_clip model '{arch}' (e.g. kclip-tiny, ViT-B-32, or a path to "
                         f"an open_clip model JSON)")
    return arch


def fix_logit_scale(model: nn.Module) -> None:
    """Reshape the 0-dim ``logit_scale`` to [1]: DeepSpeed 0.19.8 cannot broadcast 0-dim parameters.

    ``exp()`` of a [1] tensor broadcasts like the scalar did, so open_clip's forward is unchanged.
    Exporters undo this (see kclip_ds.export).
    """
    scale = getattr(model, "logit_scale", None)
    if isinstance(scale, nn.Parameter) and scale.dim() == 0:
        model.logit_scale = nn.Parameter(scale.detach().reshape(1), requires_grad=scale.requires_grad)


def build_towers(cfg: ModelConfig) -> Towers:
    arch = resolve_arch(cfg.arch)
    pretrained = None
    if cfg.pretrained:
        if not Path(cfg.pretrained).is_file():
            raise ModelError(f"model.pretrained: weights file not found: {cfg.pretrained} "
                             f"(kclip_ds loads local files only, never a hub)")
        pretrained = cfg.pretrained
    model, preprocess_train, preprocess_val = open_clip.create_model_and_transforms(
        arch, pretrained=pretrained, output_dict=True, pretrained_text=False, pretrained_image=False,
        weights_only=True)
    if cfg.grad_checkpointing:
        model.set_grad_checkpointing(True)
    fix_logit_scale(model)
    tokenizer = open_clip.get_tokenizer(arch)
    image_size = model.visual.image_size
    image_size = image_size[0] if isinstance(image_size, (tuple, list)) else int(image_size)
    context_length = int(getattr(tokenizer, "context_length", model.context_length))
    log.info("model %s: %.2fM parameters (grad checkpointing %s)", arch,
             sum(p.numel() for p in model.parameters()) / 1e6, "on" if cfg.grad_checkpointing else "off")
    return Towers(model, preprocess_train, preprocess_val, tokenizer, arch, image_size, context_length)
