"""Zero-shot classification from class names + templates (open_clip's recipe).

The class-name file sits beside the shards: ``classes.json`` = {"classnames": [...], "templates": [...]}
with templates like "a photo of a {}.".  The classifier is the L2-normalised mean of each class's
template embeddings; every rank builds the same classifier through the method's ``forward``.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import braceexpand
import torch
import torch.nn.functional as F


def load_classes(shard_spec: str) -> tuple[list[str], list[str]]:
    """Class names and templates from ``classes.json`` in the directory of the first shard."""
    first = next(iter(braceexpand.braceexpand(shard_spec.split("::")[0])))
    path = Path(first).parent / "classes.json"
    if not path.is_file():
        raise FileNotFoundError(f"zero-shot split {shard_spec}: {path} not found; it must hold "
                                f'{{"classnames": [...], "templates": ["a photo of a {{}}.", ...]}}')
    payload = json.loads(path.read_text())
    try:
        classnames, templates = list(payload["classnames"]), list(payload["templates"])
    except KeyError as exc:
        raise ValueError(f"{path}: missing key {exc}; it needs 'classnames' and 'templates'") from exc
    if not classnames or not templates or any("{}" not in t for t in templates):
        raise ValueError(f"{path}: need non-empty classnames and templates that contain '{{}}'")
    return classnames, templates


@torch.no_grad()
def build_classifier(encode_text: Callable[[torch.Tensor], torch.Tensor], tokenizer: Callable[[list[str]], torch.Tensor],
                     classnames: list[str], templates: list[str], device: torch.device) -> torch.Tensor:
    """[C, D] float32: per class, the normalised mean of its normalised template embeddings."""
    weights = []
    for name in classnames:
        tokens = tokenizer([t.format(name) for t in templates]).to(device)
        emb = F.normalize(encode_text(tokens).float(), dim=-1).mean(dim=0)
        weights.append(F.normalize(emb, dim=-1))
    return torch.stack(weights).cpu()


def zeroshot_metrics(image: torch.Tensor, labels: torch.Tensor, classifier: torch.Tensor,
                     prefix: str = "zeroshot/") -> dict[str, float]:
    """image: [N, D] normalised; labels: [N]; classifier: [C, D] → top-1 / top-5 accuracy."""
    assert image.shape[1] == classifier.shape[1], f"image dim {image.shape[1]} != classifier dim {classifier.shape[1]}"
    logits = image @ classifier.T
    top = logits.topk(min(5, classifier.shape[0]), dim=1).indices
    hits = top == labels[:, None]
    return {f"{prefix}top1": float(hits[:, 0].float().mean()), f"{prefix}top5": float(hits.any(dim=1).float().mean()),
            f"{prefix}num_samples": float(image.shape[0])}
