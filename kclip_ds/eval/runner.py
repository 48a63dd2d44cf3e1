"""Evaluate a method on a split: retrieval R@k, and zero-shot accuracy when a labelled split is given.

Used by training (validation split, every ``train.eval_every`` steps) and by ``kclip-eval``
(any split, the test split only there).  All ranks take part; all return the same metrics.
"""

from __future__ import annotations

import torch

from kclip_ds.config import DataConfig, EvalConfig
from kclip_ds.data.pipeline import eval_batches
from kclip_ds.data.transforms import SampleDecoder
from kclip_ds.eval.retrieval import EncodeFn, encode_split, retrieval_metrics
from kclip_ds.eval.structure import swap_accuracy
from kclip_ds.eval.zeroshot import build_classifier, load_classes, zeroshot_metrics
from kclip_ds.models.towers import Towers


def evaluate(encode: EncodeFn, towers: Towers, data: DataConfig, eval_cfg: EvalConfig, *, split: str,
             split_spec: str, zeroshot_spec: str, rank: int, world_size: int, device: torch.device,
             dtype: torch.dtype, triples: tuple[int, int] | None = None,
             zeroshot_extra: list[str] | tuple[str, ...] = ()) -> dict[str, float]:
    """Metrics named ``{split}/image_to_text_R@k``, ``{split}/text_to_image_R@k``, ``zeroshot/top1`` …;
    ``zeroshot_extra``: more zero-shot sets as "name=shards", reported as ``name/top1`` …"""
    metrics: dict[str, float] = {}
    decoder = SampleDecoder(towers.preprocess_val, towers.tokenizer, towers.image_size, towers.context_length,
                            triples=triples)
    if split_spec:
        batches = eval_batches(split_spec, decoder, rank=rank, world_size=world_size,
                               batch_size=eval_cfg.batch_size, num_workers=min(1, data.workers),
                               name=f"data.{split}")
        emb = encode_split(encode, batches, device, dtype)
        metrics.update(retrieval_metrics(emb["image"], emb["text"], eval_cfg.retrieval_ks, prefix=f"{split}/"))
        for kind in eval_cfg.swap_tests:
            swaps = SampleDecoder(towers.preprocess_val, towers.tokenizer, towers.image_size, towers.context_length,
                                  negative_kinds=(kind,))
            batches = eval_batches(split_spec, swaps, rank=rank, world_size=world_size, batch_size=eval_cfg.batch_size,
                                   num_workers=min(1, data.workers), name=f"data.{split}")
            accuracy, scored = swap_accuracy(encode, batches, device, dtype)
            if scored:
                metrics[f"{split}/{kind}_swap_acc"] = accuracy
    zeroshot_sets = [("zeroshot", zeroshot_spec)] if zeroshot_spec else []
    zeroshot_sets += [tuple(item.split("=", 1)) for item in zeroshot_extra]
    for name, spec in zeroshot_sets:
        classnames, templates = load_classes(spec)
        labelled = SampleDecoder(towers.preprocess_val, towers.tokenizer, towers.image_size,
                                 towers.context_length, with_labels=True)
        batches = eval_batches(spec, labelled, rank=rank, world_size=world_size, batch_size=eval_cfg.batch_size,
                               num_workers=min(1, data.workers), name=f"data.{name}")
        emb = encode_split(encode, batches, device, dtype, with_texts=False)
        classifier = build_classifier(lambda tokens: encode(None, tokens)["text_features"], towers.tokenizer,
                                      classnames, templates, device)
        metrics.update(zeroshot_metrics(emb["image"], emb["labels"], classifier, prefix=f"{name}/"))
    return metrics
