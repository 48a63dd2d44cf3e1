"""Structure-CLIP end to end: 2-rank runs under ZeRO-2 and ZeRO-3, evaluation through the fused text
embedding, and export of the knowledge encoder beside the towers."""

from __future__ import annotations

import itertools
import json
import math
from pathlib import Path

import pytest
import torch

from kclip_ds.config import MethodConfig, ModelConfig
from kclip_ds.data.pipeline import TrainStream
from kclip_ds.data.transforms import SampleDecoder
from kclip_ds.export.convert import convert
from kclip_ds.export.extras import load_extras
from kclip_ds.methods import build_method
from kclip_ds.models.towers import build_towers
from tests.conftest import assert_ok, losses, python, train_spec


def test_fused_text_embedding_uses_the_scene_graph(demo_data: Path) -> None:
    towers = build_towers(ModelConfig(arch="kclip-micro"))
    cfg = MethodConfig(name="structure_clip", graph_width=32, graph_heads=2, graph_layers=1)
    method = build_method(cfg, towers).eval()
    decoder = SampleDecoder(towers.preprocess_val, towers.tokenizer, towers.image_size, towers.context_length,
                            negative_kinds=("relation", "attribute"), triples=(cfg.max_triples, cfg.phrase_len))
    stream = TrainStream(train_spec(demo_data), decoder, rank=0, world_size=1, batch_size=8, num_workers=0, seed=0)
    (b,) = list(itertools.islice(stream.batches(0), 1))
    assert b.triples["triple_mask"].any(dim=1).all()  # every demo caption has triples
    with torch.no_grad():
        fused = method(images=b.images, texts=b.texts, triples=b.triples, mode="encode")["text_features"]
        plain = method(images=b.images, texts=b.texts, mode="encode")["text_features"]
        out = method(images=b.images, texts=b.texts, valid=b.valid, neg_texts=b.neg_texts, neg_valid=b.neg_valid,
                     triples=b.triples, warmup=True)
    # t = c + 0.2 k with |k| = 1, not renormalised
    assert torch.allclose((fused - plain).norm(dim=-1), torch.full((8,), cfg.lambda_k), atol=1e-5)
    assert set(out["logs"]) >= {"loss_hinge", "loss_neg"} and math.isfinite(out["loss"].item())


@pytest.mark.slow
@pytest.mark.parametrize("name", ["zero2_structure", "zero3_structure"])
def test_structure_clip_trains_evaluates_and_exports(runs: dict[str, Path], tmp_path: Path, name: str) -> None:
    run = runs[name]
    assert sorted(losses(run)) == [1, 2] and all(math.isfinite(v) for v in losses(run).values())
    last = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()][-1]
    assert last["kind"] == "eval" and 0 <= last["val/image_to_text_R@1"] <= 1
    proc = python(["-m", "kclip_ds.eval.cli", "--run-dir", str(run), "--split", "val"])
    assert_ok(proc)
    standalone = json.loads((run / "eval/global_step2_val.json").read_text())
    assert standalone["val/image_to_text_R@1"] == pytest.approx(last["val/image_to_text_R@1"], abs=1e-6)
    out = convert(run, tmp_path / "hf")
    modules = load_extras(out)
    assert list(modules) == ["triple_encoder"]
    assert modules["triple_encoder"].extra_config()["relation_bias"] == (name == "zero3_structure")


@pytest.mark.slow
def test_gradient_checkpointing_of_towers_and_graph_encoder_under_zero3(runs: dict[str, Path]) -> None:
    """Recomputing the towers' and the graph encoder's layers in backward changes no value (ZeRO-3, 2 ranks)."""
    assert losses(runs["zero3_structure_ckpt"]) == pytest.approx(losses(runs["zero3_structure"]), abs=1e-5)
