"""Swap tests: a bag-of-words scorer cannot tell a caption from its relation swap; an order-aware one can."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from kclip_ds.config import ModelConfig
from kclip_ds.data.pipeline import eval_batches
from kclip_ds.data.transforms import SampleDecoder
from kclip_ds.eval.structure import swap_accuracy
from kclip_ds.models.towers import build_towers

torch.manual_seed(0)
PROJECTION = torch.randn(49408, 16)
POSITIONS = torch.randn(16, 16)


def bag_of_words(tokens: torch.Tensor) -> torch.Tensor:
    counts = torch.zeros(tokens.shape[0], 49408).scatter_add_(1, tokens, torch.ones_like(tokens, dtype=torch.float))
    counts[:, 0] = 0
    return F.normalize(counts @ PROJECTION, dim=-1)


def order_aware(tokens: torch.Tensor) -> torch.Tensor:
    emb = PROJECTION[tokens] * (tokens > 0)[..., None]  # [B, L, 16]
    return F.normalize((emb @ POSITIONS * torch.arange(1, tokens.shape[1] + 1)[None, :, None]).sum(1), dim=-1)


def scorer(text_encoder):
    """encode() whose 'image' embedding is its own caption's embedding: a perfect matcher up to the text encoder."""
    def encode(images, texts, *_):
        text = text_encoder(texts)
        return {"image_features": text if images is not None else None, "text_features": text}
    return encode


@pytest.mark.parametrize("kind", ["relation", "attribute"])
def test_bag_of_words_fails_swaps_and_order_aware_passes(demo_data: Path, kind: str) -> None:
    towers = build_towers(ModelConfig(arch="kclip-tiny"))  # context 32: no caption is truncated
    decoder = SampleDecoder(towers.preprocess_val, towers.tokenizer, towers.image_size, towers.context_length,
                            negative_kinds=(kind,))

    def batches():
        return eval_batches(f"{demo_data}/val/{{000000..000001}}.tar", decoder, rank=0, world_size=1, batch_size=16,
                            num_workers=0, name="data.val")

    bow, scored = swap_accuracy(scorer(bag_of_words), batches(), torch.device("cpu"), torch.float32)
    assert scored >= 40  # 48 val samples, nearly all have a swap of this kind
    if kind == "relation":
        assert bow == 0.0  # same words, same bag: a tie is not a win
    order, _ = swap_accuracy(scorer(order_aware), batches(), torch.device("cpu"), torch.float32)
    assert order == 1.0
