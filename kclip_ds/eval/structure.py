"""Structure tests on a split with scene graphs: does the image prefer its caption over a swap of it?

For every sample whose ``sg.json`` allows it, a relation swap ("a blue square to the left of a red circle")
and an attribute swap ("a blue circle to the left of a red square") are made with the same deterministic
generator as training (epoch 0, seed 0), and the sample counts as correct when v·c > v·c⁻.  Captions are
scored with the text tower alone (no knowledge input), the same way for every method, so the numbers
compare methods on what their towers learned.  All ranks take part; all return the same numbers.

The same text-tower-only scoring serves ARO's multiple-choice items (eval/aro.py): :func:`option_scores`
encodes each distinct image and each distinct token sequence once and returns image · option for every
item, in one process, with a run loaded by :func:`kclip_ds.eval.model.load_eval_model`.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Sequence

import torch
import torch.distributed as dist
from PIL import UnidentifiedImageError

from kclip_ds.config import ConfigError
from kclip_ds.data.pipeline import eval_batches
from kclip_ds.data.schema import Batch
from kclip_ds.data.transforms import SampleDecoder
from kclip_ds.eval.aro import (
    ARO_DROPPED_RELATIONS,
    TIE_TOLERANCE,
    VGA_MIN_COUNT,
    AroDataError,
    AroItem,
    AroResult,
    load_item_image,
    score_dataset,
)
from kclip_ds.eval.model import EvalModel
from kclip_ds.eval.retrieval import EncodeFn

log = logging.getLogger(__name__)


@torch.no_grad()
def swap_accuracy(encode: EncodeFn, batches: Iterable[Batch], device: torch.device, dtype: torch.dtype,
                  tie_tolerance: float = TIE_TOLERANCE) -> tuple[float, int]:
    """(accuracy, number of scored samples) over rows that are valid and have a negative.

    A win needs v·c > v·c⁻ + tie_tolerance: a bag-of-words model scores a caption and its swap equally,
    and float noise between two batched matmuls must not turn that tie into random wins."""
    correct = torch.zeros(2, dtype=torch.float64)  # [correct, total]
    for batch in batches:
        assert batch.neg_texts is not None, "swap_accuracy needs a decoder with negative_kinds"
        b = batch.to(device, dtype)
        out = encode(b.images, b.texts)
        neg = encode(None, b.neg_texts)["text_features"].float()
        image, text = out["image_features"].float(), out["text_features"].float()
        rows = (batch.valid & batch.neg_valid).to(image.device)
        wins = (image * text).sum(-1) > (image * neg).sum(-1) + tie_tolerance
        correct += torch.tensor([float(wins[rows].sum()), float(rows.sum())], dtype=torch.float64)
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(correct)
    total = int(correct[1])
    return (float(correct[0] / total) if total else float("nan")), total


class _ItemImages(torch.utils.data.Dataset):
    """Preprocessed images of items; a failure comes back as a message (raised by the caller, named)."""

    def __init__(self, items: Sequence[AroItem], preprocess):
        self.items, self.preprocess = items, preprocess

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> tuple[int, torch.Tensor | None, str]:
        try:
            return i, self.preprocess(load_item_image(self.items[i])), ""
        except (UnidentifiedImageError, OSError, ValueError, SyntaxError) as exc:
            return i, None, f"{exc.__class__.__name__}: {(str(exc).splitlines() or [''])[0][:160]}"


@torch.no_grad()
def option_scores(model: EvalModel, items: Sequence[AroItem], batch_size: int = 64,
                  workers: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """(scores [N, K] float64: image · option, same_as_true [N, K] bool: option tokens == the true option's).

    Each distinct (image, crop) and each distinct token sequence is encoded once (COCO-Order scores five
    captions against each image, twice over), so identical inputs get bit-identical embeddings."""
    if not items:
        return torch.zeros(0, 0, dtype=torch.float64), torch.zeros(0, 0, dtype=torch.bool)
    k = len(items[0].captions)
    assert all(len(it.captions) == k for it in items), "the items of a dataset must have equally many options"
    image_of: dict[tuple, int] = {}
    firsts: list[AroItem] = []  # the first item of each distinct (image, crop)
    for it in items:
        if (it.image, it.crop) not in image_of:
            image_of[it.image, it.crop] = len(firsts)
            firsts.append(it)
    loader = torch.utils.data.DataLoader(_ItemImages(firsts, model.towers.preprocess_val),
                                         batch_size=batch_size, num_workers=workers, collate_fn=list)
    image_features = []
    for batch in loader:
        for i, _, error in batch:
            if error:
                raise AroDataError(f"{firsts[i].source}: image {firsts[i].image} cannot be decoded "
                                   f"({error}); replace it with the released file")
        images = torch.stack([x for _, x, _ in batch]).to(model.device, torch.float32)
        image_features.append(model.encode(images, None)["image_features"].double().cpu())

    text_of: dict[str, int] = {}
    text_ids = torch.tensor([[text_of.setdefault(c, len(text_of)) for c in it.captions] for it in items])
    strings = list(text_of)
    tokens = torch.cat([model.towers.tokenizer(strings[s:s + 4096]) for s in range(0, len(strings), 4096)])
    unique_tokens, canonical = torch.unique(tokens, dim=0, return_inverse=True)
    text_features = []
    for s in range(0, unique_tokens.shape[0], batch_size):
        out = model.encode(None, unique_tokens[s:s + batch_size].to(model.device))
        text_features.append(out["text_features"].double().cpu())
    option_ids = canonical[text_ids]  # [N, K]: which distinct token sequence each option is
    true_index = torch.tensor([it.true_index for it in items], dtype=torch.long)
    same_as_true = option_ids == option_ids.gather(1, true_index[:, None])

    image, text = torch.cat(image_features), torch.cat(text_features)
    image_ids = torch.tensor([image_of[it.image, it.crop] for it in items])
    scores = torch.cat([torch.einsum("nd,nkd->nk", image[image_ids[s:s + 4096]], text[option_ids[s:s + 4096]])
                        for s in range(0, len(items), 4096)])
    return scores, same_as_true


AroScored = tuple[AroResult, torch.Tensor, torch.Tensor]  # (numbers, scores [N, K], same_as_true [N, K])


def evaluate_aro(model: EvalModel, datasets: dict[str, list[AroItem]], *, batch_size: int = 64,
                 workers: int = 0, tie_tolerance: float = TIE_TOLERANCE,
                 dropped_relations: frozenset[str] = ARO_DROPPED_RELATIONS,
                 vga_min_count: int = VGA_MIN_COUNT) -> dict[str, AroScored]:
    """{dataset: (its ARO numbers, scores [N, K], same_as_true [N, K])} for each loaded dataset."""
    out = {}
    for name, items in datasets.items():
        scores, same_as_true = option_scores(model, items, batch_size, workers)
        result = score_dataset(name, scores, items, same_as_true, tie_tolerance=tie_tolerance,
                               dropped_relations=dropped_relations, vga_min_count=vga_min_count)
        log.info("%s: %s", name, " | ".join(f"{k} {v:.4f}" for k, v in result.metrics.items()))
        out[name] = (result, scores, same_as_true)
    return out


def demo_swap_metrics(model: EvalModel, split: str,
                      batch_size: int = 64) -> tuple[dict[str, float], dict[str, int]]:
    """``{split}/{kind}_swap_acc`` for each of the run's ``eval.swap_tests``, on its split with sg.json."""
    specs = {"val": model.cfg.data.val, "test": model.cfg.data.test}
    if split not in specs:
        raise ConfigError(f"--demo-split must be val or test, got {split!r}")
    if not specs[split]:
        raise ConfigError(f"data.{split} is empty in the run's config.yaml; pass data.{split}=<shards>")
    if not model.cfg.eval.swap_tests:
        raise ConfigError("eval.swap_tests is empty in the run's config.yaml; pass "
                          "eval.swap_tests=[relation,attribute]")
    towers, metrics, counts = model.towers, {}, {}
    for kind in model.cfg.eval.swap_tests:
        decoder = SampleDecoder(towers.preprocess_val, towers.tokenizer, towers.image_size,
                                towers.context_length, negative_kinds=(kind,))
        batches = eval_batches(specs[split], decoder, rank=0, world_size=1, batch_size=batch_size,
                               num_workers=0, name=f"data.{split}")
        accuracy, scored = swap_accuracy(model.encode, batches, model.device, torch.float32)
        counts[f"{split}/{kind}_swap_num"] = scored
        if scored:
            metrics[f"{split}/{kind}_swap_acc"] = accuracy
    return metrics, counts
