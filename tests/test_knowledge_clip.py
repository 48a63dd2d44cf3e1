"""Knowledge-CLIP: triplet rows from real Fashion-MNIST × WordNet shards, masking, the losses on 2 ranks,
one tower pass per step, training under ZeRO 0–3 on 2 CPU ranks, evaluation and export."""

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
from kclip_ds.knowledge.teacher import precompute_teacher
from kclip_ds.knowledge.triplet_batch import TripletRows, TripletSpec, entity_key, relation_vocabulary
from kclip_ds.knowledge.triplet_shards import decode_triplet
from kclip_ds.methods import build_method, objective_factor
from kclip_ds.methods.knowledge_clip import e2e_query_groups, e2e_sides
from kclip_ds.models.graph import ElementEncoder
from kclip_ds.models.towers import build_towers
from tests.conftest import REPO, assert_ok, torchrun

GRAPH = {"method.graph_width": 32, "method.graph_heads": 2, "method.graph_layers": 1}


def fashion_train(root: Path) -> str:
    pairs, triplets = (len(list((root / d).glob("*.tar"))) for d in ("pairs/train", "triplets"))
    return (f"{root}/pairs/train/{{000000..{pairs - 1:06d}}}.tar::"
            f"{root}/triplets/{{000000..{triplets - 1:06d}}}.tar")


def knowledge_setup(root: Path, batch_size: int = 16, **method: object):
    towers = build_towers(ModelConfig(arch="kclip-micro"))
    cfg = MethodConfig(name="knowledge_clip", graph_width=32, graph_heads=2, graph_layers=1, phrase_len=6,
                       relations=list(relation_vocabulary(fashion_train(root))), **method)
    rows = TripletRows(TripletSpec(tuple(cfg.relations), cfg.neighbour_edges, cfg.phrase_len, seed=0),
                       towers.preprocess_val, towers.tokenizer, towers.image_size, towers.context_length)
    decoder = SampleDecoder(towers.preprocess_val, towers.tokenizer, towers.image_size, towers.context_length,
                            knowledge=rows)
    stream = TrainStream(fashion_train(root), decoder, rank=0, world_size=1, batch_size=batch_size, num_workers=0,
                         seed=0, resampled=True, upsampling_factors="1::1", epoch_steps=4)
    return towers, cfg, rows, stream


def test_resampled_sources_mix_within_every_batch(fashion_data: Path) -> None:
    *_, stream = knowledge_setup(fashion_data)
    for batch in itertools.islice(stream.batches(0), 4):
        triplets = int(batch.knowledge["triplet"].sum())
        assert 0 < triplets < len(batch), "samples of both sources mix within a batch"


def test_relation_vocabulary_comes_from_the_triplet_manifest(fashion_data: Path) -> None:
    relations = relation_vocabulary(fashion_train(fashion_data))
    assert "is a" in relations and "is an image of" in relations and list(relations) == sorted(relations)
    assert relation_vocabulary(f"{fashion_data}/pairs/train/000000.tar") == ()


def test_triplet_rows_follow_the_triplet_json(fashion_data: Path) -> None:
    towers, cfg, rows, _ = knowledge_setup(fashion_data)
    everything = read_raw(fashion_data / "triplets/000000.tar", 64)
    images = [r for r in everything if b'"kind":"image"' in r["triplet.json"]]
    raws = images[:4] + [r for r in everything if r not in images][:8]
    assert len(raws) == 12
    out = rows.fill(dict(enumerate(raws)), 12, epoch=0)
    again = rows.fill(dict(enumerate(raws)), 12, epoch=0)
    assert all(torch.equal(out[k], again[k]) for k in out)  # deterministic
    later = rows.fill(dict(enumerate(raws)), 12, epoch=1)
    assert not torch.equal(out["mask_tail"], later["mask_tail"])  # E2E's masked side is redrawn per epoch
    assert out["triplet"].all()
    seen_image = seen_centre = False
    for i, raw in enumerate(raws):
        record, _ = decode_triplet(raw)
        for side in ("head", "tail"):
            entity = record[side]
            assert out[f"{side}_id"][i] == entity_key(entity["id"])
            assert bool(out[f"{side}_is_image"][i]) == (entity["kind"] == "image")
            if entity["kind"] == "image":
                seen_image = True
                assert out[f"{side}_image"][i].abs().sum() > 0 and not out[f"{side}_text"][i].any()
            else:
                assert torch.equal(out[f"{side}_text"][i], towers.tokenizer([entity["text"]])[0])
        assert out["relation"][i] == cfg.relations.index(record["relation"])
        for s, side in enumerate(("head", "tail")):
            edges = record["neighbourhood"].get(side, [])[: cfg.neighbour_edges]
            assert out["nb_mask"][i, s].sum() == len(edges)
            for j, (h, _, t) in enumerate(edges):  # the centre is blanked: G2E must infer it from its neighbours
                centre = record[side]["id"]
                assert (out["nb_heads_ids"][i, s, j].any()) == (h != centre)
                assert (out["nb_tails_ids"][i, s, j].any()) == (t != centre)
                seen_centre |= centre in (h, t)
    assert seen_image and seen_centre


def test_masked_element_and_padding_cannot_leak() -> None:
    torch.manual_seed(0)
    enc = ElementEncoder(image_width=8, text_width=8, width=16, out_dim=8, layers=2, heads=2).eval()
    b, s = 3, 5
    slots, mask = torch.randn(b, 3, s, 16), torch.rand(b, 3, s) > 0.3
    mask[:, :, 0] = True
    masked = torch.zeros(b, 3, dtype=torch.bool)
    masked[:, 2] = True
    with torch.no_grad():
        ref = enc(slots, mask, masked)
        hidden_tail = slots.clone()
        hidden_tail[:, 2] = torch.randn(b, s, 16)  # the masked element's content
        padding = slots.clone()
        padding[~mask] = 1e3  # whatever sits in padding positions
        changed = slots.clone()
        changed[:, 0, 0] += torch.randn(16)  # a real token of the head (not a constant: LayerNorm removes one)
        for other in (enc(hidden_tail, mask, masked), enc(padding, mask, masked)):
            assert torch.allclose(other.slots, ref.slots, atol=1e-6) and torch.allclose(other.triplet, ref.triplet)
        assert not torch.allclose(enc(changed, mask, masked).slots[:, 2], ref.slots[:, 2], atol=1e-4)


def test_one_pass_per_tower_and_the_teacher_stays_outside(fashion_data: Path) -> None:
    towers, cfg, _, stream = knowledge_setup(fashion_data, kd_teacher_dtype="bf16")
    method = build_method(cfg, towers)
    triplets = read_raw(fashion_data / "triplets/000000.tar", 64)
    images = [r for r in triplets if b'"kind":"image"' in r["triplet.json"]][:3]
    raws = read_raw(fashion_data / "pairs/train/000000.tar", 6) + images + [r for r in triplets if r not in images][:5]
    batch = stream.decoder.collate(raws, 16, epoch=0, step_in_epoch=0)  # 6 pairs, 8 triplets, 2 padding rows
    kg = batch.knowledge
    assert kg["triplet"].sum() == 8 and batch.valid.sum() == 14 and kg["head_is_image"].sum() == 3
    calls = {"visual": 0, "text": 0}
    method.model.visual.register_forward_hook(lambda *_: calls.__setitem__("visual", calls["visual"] + 1))
    method.model.transformer.register_forward_hook(lambda *_: calls.__setitem__("text", calls["text"] + 1))
    out = method(images=batch.images, texts=batch.texts, valid=batch.valid, knowledge=kg)
    assert calls == {"visual": 1, "text": 1}
    assert set(out["logs"]) == {"loss_clip", "loss_e2e", "loss_e2r", "loss_g2e", "loss_kd", "logit_scale"}
    assert all(math.isfinite(float(v)) and float(v) >= 0 for v in out["logs"].values())
    out["loss"].backward()
    for name in ("element_encoder.out_proj.weight", "element_encoder.relation_head.weight",
                 "graph_encoder.out_proj.weight", "model.visual.conv1.weight", "model.token_embedding.weight"):
        assert dict(method.named_parameters())[name].grad.abs().sum() > 0, name
    teacher = method._teacher[0]
    assert not any(k.startswith("_teacher") for k in method.state_dict())
    assert sum(p.numel() for p in method.parameters()) < 2 * sum(p.numel() for p in towers.model.parameters())
    assert all(not p.requires_grad and p.dtype == torch.bfloat16 for p in teacher.parameters())
    assert build_method(cfg, towers, training=False)._teacher == []
    with torch.no_grad():  # pairs only; and a batch with no image to encode at all still calls both towers
        pairs = method(images=batch.images, texts=batch.texts, valid=batch.valid & ~kg["triplet"])
        assert set(pairs["logs"]) == {"loss_clip", "loss_kd", "logit_scale"}
        text_only = {k: v.clone() for k, v in kg.items()}
        text_only["head_is_image"][:] = False
        text_only["tail_is_image"][:] = False
        out = method(images=batch.images, texts=batch.texts, valid=kg["triplet"], knowledge=text_only)
        assert math.isfinite(out["loss"].item())
        # e2e_hide=text: where every image fact already hides its text side, it changes nothing; elsewhere it does
        method.eval()
        e2e = lambda hide, k: (setattr(method, "e2e_hide", hide),
                               method(images=batch.images, texts=batch.texts, valid=batch.valid, knowledge=k))[1]
        text_side = {**kg, "mask_tail": torch.where(kg["head_is_image"], True, kg["mask_tail"])}
        image_side = {**kg, "mask_tail": torch.where(kg["head_is_image"], False, kg["mask_tail"])}
        assert e2e("text", image_side)["logs"]["loss_e2e"] == e2e("any", text_side)["logs"]["loss_e2e"]
        assert e2e("any", image_side)["logs"]["loss_e2e"] != e2e("any", text_side)["logs"]["loss_e2e"]
    # knowledge_image_grad=false: on triplet rows alone, no gradient reaches the image tower; the text tower's does
    for image_grad in (True, False):
        method.zero_grad()
        method.knowledge_image_grad = image_grad
        method(images=batch.images, texts=batch.texts, valid=kg["triplet"], knowledge=kg)["loss"].backward()
        grads = dict(method.named_parameters())
        assert bool(grads["model.visual.conv1.weight"].grad.abs().sum() > 0) == image_grad
        assert grads["model.token_embedding.weight"].grad.abs().sum() > 0


def test_e2e_query_groups_pair_rows_that_ask_the_same_question() -> None:
    boot, sandal, img1, img2 = 11, 12, 21, 22
    kg = {"relation": torch.tensor([0, 0, 0, 0, -1, -1]),
          "head_id": torch.tensor([img1, img2, img1, img2, img1, img2]),
          "tail_id": torch.tensor([boot, boot, sandal, boot, boot, boot]),
          "mask_tail": torch.tensor([False, False, False, True, False, False])}
    groups = e2e_query_groups(kg).tolist()
    assert groups[0] == groups[1]  # (?, is an image of, boot) twice: each image answers both
    assert groups[0] != groups[2]  # another visible tail
    assert groups[1] != groups[3]  # the same triplet, the other side hidden
    assert groups[4] != groups[5]  # relations outside the vocabulary never group


def test_e2e_hide_text_never_asks_for_an_image() -> None:
    # rows: (image, r, text) ×2 with both coins, (text, r, image), (text, r, text), (image, r, image)
    kg = {"head_is_image": torch.tensor([True, True, False, False, True]),
          "tail_is_image": torch.tensor([False, False, True, False, True]),
          "mask_tail": torch.tensor([False, True, True, False, True])}
    assert e2e_sides(kg, "any")[0].tolist() == kg["mask_tail"].tolist()
    assert e2e_sides(kg, "any")[1].all()
    mask_tail, rows = e2e_sides(kg, "text")
    assert mask_tail.tolist()[:4] == [True, True, False, False]  # the text side; a text–text row keeps its coin
    assert rows.tolist() == [True, True, True, True, False]  # nothing to hide between two images
    hidden_is_image = torch.where(mask_tail, kg["tail_is_image"], kg["head_is_image"])
    assert not (hidden_is_image & rows).any()


def test_objective_factor_ramps_up_and_cools_down() -> None:
    cfg = MethodConfig(name="knowledge_clip", objective_ramp_steps=4, objective_cooldown_steps=5)
    factors = [objective_factor(cfg, step, 20) for step in range(20)]
    assert factors[:4] == [0.25, 0.5, 0.75, 1.0] and factors[4:15] == [1.0] * 11
    assert factors[15:] == pytest.approx([0.8, 0.6, 0.4, 0.2, 0.0])  # the last step trains the CLIP term alone
    assert [objective_factor(MethodConfig(), step, 20) for step in (0, 19)] == [1.0, 1.0]


def test_knowledge_losses_match_single_process_on_2_ranks() -> None:
    proc = torchrun([str(REPO / "tests/dist/knowledge_loss_equivalence.py")])
    assert_ok(proc)
    for case in ("entity infonce", "entity infonce, query groups", "distillation", "relation cross-entropy"):
        assert f"{case}: loss" in proc.stdout


@pytest.fixture(scope="module")
def knowledge_runs(fashion_data: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """One 2-rank launch: Knowledge-CLIP for 2 steps under ZeRO 0, 1, 2, 3 (fp32) and ZeRO-3 bf16 with
    gradient checkpointing of towers and encoders."""
    root = tmp_path_factory.mktemp("knowledge_runs")
    base = {"method.name": "knowledge_clip", **GRAPH, "method.phrase_len": 6, "model.arch": "kclip-micro",
            "data.train": fashion_train(fashion_data), "data.resampled": True, "data.train_upsampling_factors": "15::1",
            "data.epoch_steps": 4, "data.val": f"{fashion_data}/pairs/val/000000.tar", "data.test": "",
            "data.zeroshot": f"{fashion_data}/zeroshot/{{000000..000001}}.tar",
            "data.zeroshot_extra": json.dumps([f"zeroshot_hypernym={fashion_data}/zeroshot_hypernym/{{000000..000001}}.tar"]),
            "data.batch_size": 12, "data.workers": 1, "data.shuffle_buffer": 16, "train.max_steps": 2,
            "train.log_every": 1, "train.save_every": 0, "train.warmup_steps": 1, "train.progress_bar": False,
            "train.tensorboard": False, "eval.batch_size": 40, "eval.swap_tests": "[]"}
    variants = {f"zero{stage}": {"deepspeed.config": f"ds_configs/zero{stage}.json"} for stage in range(4)}
    teacher_pairs = root / "pairs_with_teacher"  # a random-init teacher: this checks the plumbing, not the values
    precompute_teacher(fashion_data / "pairs/train", teacher_pairs, arch="kclip-micro", pretrained="",
                       allow_random=True, log=lambda _: None)
    variants["zero2_features_crossmodal"] = {
        "method.kd_teacher": "features", "method.cross_modal_pairs": True,
        "data.train": fashion_train(fashion_data).replace(f"{fashion_data}/pairs/train", str(teacher_pairs))}
    variants["zero3_bf16_ckpt"] = {"deepspeed.config": "ds_configs/zero3.json", "deepspeed.bf16": True,
                                   "model.grad_checkpointing": True, "method.graph_grad_checkpointing": True}
    configs = [{"name": name, "overrides": [f"{k}={v}" for k, v in {**base, **extra,
                                                                    "train.output_dir": root / name}.items()]}
               for name, extra in variants.items()]
    (root / "configs.json").write_text(json.dumps(configs))
    proc = torchrun([str(REPO / "tests/dist/run_configs.py"), str(root / "configs.json"), str(root / "results.json")])
    assert_ok(proc)
    return {name: root / name for name in variants}


def records(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.slow
def test_knowledge_clip_trains_under_every_zero_stage(knowledge_runs: dict[str, Path]) -> None:
    first = {name: next(r for r in records(run) if r["kind"] == "train") for name, run in knowledge_runs.items()}
    fp32 = [first[f"zero{stage}"]["loss"] for stage in range(4)]
    assert max(fp32) - min(fp32) < 1e-4, fp32  # the same step-1 loss whatever the partitioning
    assert abs(first["zero3_bf16_ckpt"]["loss"] - fp32[0]) < 0.1
    for name, step in first.items():  # every objective had rows in the first batch (pairs weighted up: 80 vs ~1200)
        assert all(step[f"loss_{k}"] > 0 for k in ("clip", "e2e", "e2r", "g2e")), (name, step)
    assert first["zero2_features_crossmodal"]["loss_kd"] > 1e-3  # a different (random) teacher: KD is not ~0
    assert first["zero0"]["loss_kd"] < 1e-2  # the online teacher is the initial model itself (in bf16)
    final = records(knowledge_runs["zero3"])[-1]
    assert final["kind"] == "eval" and {"zeroshot/top1", "zeroshot_hypernym/top1"} <= set(final)


@pytest.mark.slow
def test_knowledge_clip_exports_its_encoders_as_extras(knowledge_runs: dict[str, Path], tmp_path: Path) -> None:
    run = knowledge_runs["zero3"]
    saved = (run / "config.yaml").read_text()
    assert "is an image of" in saved  # the relation vocabulary is part of the run's config
    modules = load_extras(convert(run, tmp_path / "hf"))
    assert sorted(modules) == ["element_encoder", "graph_encoder"]
    assert modules["element_encoder"].extra_config()["num_relations"] > 5


def read_raw(shard: Path, n: int) -> list[dict]:
    import webdataset as wds

    return list(itertools.islice(wds.tariterators.tarfile_samples([{"url": str(shard)}]), n))
