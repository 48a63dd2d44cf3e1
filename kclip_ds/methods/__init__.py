"""Training methods: each wires shared towers, knowledge modules and losses in one file.

``build_method(cfg.method, towers)`` is the one place that maps a config name to its class.
"""

from __future__ import annotations

from typing import Any

from torch import nn

from kclip_ds.config import MethodConfig
from kclip_ds.data.schema import Batch
from kclip_ds.methods.clip import ClipMethod
from kclip_ds.methods.knowledge_clip import KnowledgeClipMethod
from kclip_ds.methods.structure_clip import StructureClipMethod


def build_method(cfg: MethodConfig, towers, training: bool = True) -> nn.Module:
    """``training=False`` (evaluation, export) leaves out what only the loss needs (Knowledge-CLIP's teacher)."""
    if cfg.name == "clip":
        return ClipMethod(towers.model, cfg)
    if cfg.name == "structure_clip":
        return StructureClipMethod(towers.model, cfg)
    if cfg.name == "knowledge_clip":
        if not cfg.relations:
            raise ValueError("method.name=knowledge_clip needs method.relations (filled from the triplet shards' "
                             "manifests when data.train holds triplet shards: tools/import_kg.py, make_fashion_kg.py)")
        return KnowledgeClipMethod(towers.model, cfg, towers.tokenizer(list(cfg.relations)), with_teacher=training)
    raise ValueError(f"unknown method.name '{cfg.name}' (known: clip, structure_clip, knowledge_clip)")


def uses_triples(cfg: MethodConfig) -> bool:
    return cfg.name == "structure_clip"


def objective_factor(cfg: MethodConfig, step: int, max_steps: int) -> float:
    """The factor on Knowledge-CLIP's knowledge objectives at 0-based ``step`` of ``max_steps``: a linear ramp
    from 0 over the first ``objective_ramp_steps``, a linear fall to 0 over the last ``objective_cooldown_steps``."""
    ramp = min(1.0, (step + 1) / cfg.objective_ramp_steps) if cfg.objective_ramp_steps else 1.0
    cool = min(1.0, (max_steps - step - 1) / cfg.objective_cooldown_steps) if cfg.objective_cooldown_steps else 1.0
    return max(0.0, min(ramp, cool))


def method_inputs(cfg: MethodConfig, batch: Batch, step: int, max_steps: int) -> dict[str, Any]:
    """The method-specific forward arguments of a training batch (already on the device) at 0-based ``step``
    of ``max_steps``."""
    if cfg.name == "structure_clip":
        return {"triples": batch.triples, "warmup": batch.epoch == 0 and step < cfg.warmup_steps}
    if cfg.name == "knowledge_clip":
        return {"knowledge": batch.knowledge, "teacher": batch.teacher,
                "ramp": objective_factor(cfg, step, max_steps)}
    return {}
