"""Training methods: each wires shared towers, knowledge modules and losses in one file.

``build_method(cfg.method, towers)`` is the one place that maps a config name to its class.
"""

from __future__ import annotations

from torch import nn

from kclip_ds.config import MethodConfig
from kclip_ds.methods.clip import ClipMethod
from kclip_ds.methods.structure_clip import StructureClipMethod


def build_method(cfg: MethodConfig, towers) -> nn.Module:
    if cfg.name == "clip":
        return ClipMethod(towers.model, cfg)
    if cfg.name == "structure_clip":
        return StructureClipMethod(towers.model, cfg)
    raise ValueError(f"unknown method.name '{cfg.name}' (known: clip, structure_clip)")


def uses_triples(cfg: MethodConfig) -> bool:
    return cfg.name == "structure_clip"
