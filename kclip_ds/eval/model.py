"""A run's checkpoint as an evaluation model: run dir → config + weights → method → ``encode``.

kclip-eval (all ranks) and tools/eval_structure.py (one process) load runs the same way through here.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import torch

from kclip_ds import engine as eng
from kclip_ds.config import Config, ConfigError
from kclip_ds.eval.retrieval import EncodeFn
from kclip_ds.export.weights import RunWeights, load_run
from kclip_ds.methods import build_method, uses_triples
from kclip_ds.models.towers import Towers, build_towers

log = logging.getLogger(__name__)


@dataclass
class EvalModel:
    encode: EncodeFn  # encode(images | None, texts | None) → {"image_features", "text_features"} (L2-normed)
    towers: Towers  # preprocess_val and tokenizer of the run's arch
    cfg: Config  # the run's config.yaml (+ overrides)
    tag: str
    device: torch.device


def load_eval_model(run_dir: str | Path, tag: str = "latest", overrides: list[str] | None = None,
                    device: str = "auto") -> EvalModel:
    """A run's checkpoint in its method, in eval mode on ``device`` (auto: cuda when available)."""
    return eval_model(load_run(run_dir, tag, overrides), run_dir, device)


def eval_model(run: RunWeights, run_dir: str | Path, device: str = "auto") -> EvalModel:
    """The method of a loaded run with its weights; ``encode`` goes through ``forward(mode="encode")`` (knowledge
    input only for methods that take triples and only when the caller passes them)."""
    towers = build_towers(run.cfg.model, load_weights=False)
    method = build_method(run.cfg.method, towers, training=False)
    missing, unexpected = method.load_state_dict(run.method_state, strict=False)
    if missing or unexpected:
        raise eng.CheckpointError(f"checkpoint {Path(run_dir) / 'checkpoints' / run.tag} does not fit "
                                  f"model.arch={run.cfg.model.arch}: missing {missing[:5]}, "
                                  f"unexpected {unexpected[:5]}")
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda" and not torch.cuda.is_available():
        raise ConfigError("--device cuda: no CUDA device is visible; use --device cpu or auto")
    dev = torch.device("cuda", torch.cuda.current_device()) if device == "cuda" else torch.device(device)
    method.eval().to(dev)
    knowledge = uses_triples(run.cfg.method)

    def encode(images, texts, batch_triples=None):
        extra = {"triples": batch_triples} if knowledge else {}
        return method(images=images, texts=texts, mode="encode", **extra)
    log.info("evaluating %s tag %s (%s, %s) on %s", run_dir, run.tag, run.cfg.method.name, towers.arch, dev)
    return EvalModel(encode, towers, run.cfg, run.tag, dev)
