"""ARO-format structure evaluation: loaders of the official files, pure scoring, and tools/eval_structure.py.

Fixtures are written here in ARO's published formats (a few tiny PNGs, a handful of items per dataset);
the end-to-end test trains a kclip-micro Structure-CLIP run for one step on one rank and evaluates it.
"""

from __future__ import annotations

import importlib.util
import json
import re
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image

from kclip_ds.eval import aro
from kclip_ds.eval.aro import AroDataError, AroItem
from kclip_ds.eval.model import EvalModel
from kclip_ds.eval.structure import option_scores
from kclip_ds.knowledge.negatives import aro_pre_caption, negative_rng, tokenize
from tests.conftest import REPO, assert_ok, common, python

RED, BLUE, GREEN, WHITE = (255, 0, 0), (0, 0, 255), (0, 160, 0), (255, 255, 255)
TAGS = {"a": "DT", "the": "DT", "is": "VBZ", "on": "IN", "under": "IN", "above": "IN", "next": "JJ",
        "to": "IN", "chases": "VBZ", ".": ".", "red": "JJ", "blue": "JJ", "green": "JJ", "white": "JJ",
        "big": "JJ", "small": "JJ", "circle": "NN", "square": "NN", "triangle": "NN", "star": "NN",
        "dog": "NN", "cat": "NN"}
Box = tuple[int, int, int, int]


def write_png(path: Path, size: tuple[int, int], boxes: list[tuple[Box, tuple]]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    image = Image.new("RGB", size, WHITE)
    for box, colour in boxes:
        image.paste(colour, box)
    image.save(path)


def vg_item(image: str, bbox: Box, true: str, false: str, **extra) -> dict:
    x, y, w, h = bbox
    return {"image_path": image, "bbox_x": x, "bbox_y": y, "bbox_w": w, "bbox_h": h,
            "true_caption": true, "false_caption": false, **extra}


# VG-Relation: "on" ×2, "under" ×2, "next to" ×1 (ARO drops "next to" from its macro accuracy).
VGR = [vg_item("a.png", (0, 0, 20, 30), "the red square is on the table", "the table is on the red square",
               relation_name="on"),
       vg_item("a.png", (20, 0, 20, 30), "the blue square is on the desk", "the desk is on the blue square",
               relation_name="on"),
       vg_item("sub/b.png", (4, 4, 8, 8), "the green star is under the sky",
               "the sky is under the green star", relation_name="under"),
       vg_item("sub/b.png", (0, 0, 24, 24), "the dog is under the star", "the star is under the dog",
               relation_name="under"),
       vg_item("a.png", (5, 5, 10, 10), "the cat is next to the dog", "the dog is next to the cat",
               relation_name="next to")]
# VG-Attribution: 25 items of the pair red_blue (ARO keeps pairs with >= 25 items) and 2 of green_white.
VGA = [vg_item("a.png", (0, 0, 40, 30), "the red square and the blue square",
               "the blue square and the red square", attributes=["red", "blue"]) for _ in range(25)]
VGA += [vg_item("sub/b.png", (0, 0, 24, 24), "the green square and the white star",
                "the white square and the green star", attributes=["green", "white"]) for _ in range(2)]
COCO = [{"image": "val2014/COCO_val2014_000000000001.png",
         "caption": ["A red circle on a blue square.", "The big dog chases a small cat"]},
        {"image": "val2014/COCO_val2014_000000000002.png",
         "caption": ["a green triangle above the white star"]}]
FLICKR = [{"image": "flickr30k-images/1000.png", "caption": ["The dog is on the square .", "a cat"]}]


def pos_tags(caption: str) -> list[list[str]]:
    return [[t, TAGS[t.lower()]] for t in tokenize(caption)]


@pytest.fixture(scope="module")
def aro_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """ARO's default layout (docs/EVAL.md) with tiny images and a POS-tag file for the Order captions."""
    root = tmp_path_factory.mktemp("aro")
    write_png(root / "images/a.png", (40, 30), [((0, 0, 20, 30), RED), ((20, 0, 40, 30), BLUE)])
    write_png(root / "images/sub/b.png", (24, 24), [((0, 0, 24, 24), GREEN), ((4, 4, 12, 12), WHITE)])
    write_png(root / "coco" / COCO[0]["image"], (32, 32), [((0, 0, 16, 16), RED), ((16, 16, 32, 32), BLUE)])
    write_png(root / "coco" / COCO[1]["image"], (20, 28), [((2, 2, 10, 10), GREEN)])
    write_png(root / "flickr30k" / FLICKR[0]["image"], (30, 30), [((10, 10, 20, 20), BLUE)])
    for name, items in (("vg_relation", VGR), ("vg_attribution", VGA), ("coco_order", COCO),
                        ("flickr30k_order", FLICKR)):
        (root / aro.DEFAULT_FILES[name]).parent.mkdir(parents=True, exist_ok=True)
        (root / aro.DEFAULT_FILES[name]).write_text(json.dumps(items))
    captions = [c for ann in COCO + FLICKR for c in ann["caption"]]
    (root / "pos_tags.json").write_text(json.dumps({c: pos_tags(c) for c in captions}))
    return root


def colours(image: Image.Image) -> set[tuple[int, int, int]]:
    return {colour for _, colour in image.getcolors()}


def load(root: Path, name: str, seed: int = 0) -> list[AroItem]:
    file, images = aro.dataset_paths(name, root)
    return aro.load_dataset(name, file, images, aro.file_pos_tagger(root / "pos_tags.json"), seed)


def item(group: str = "", true_index: int = 1, k: int = 2) -> AroItem:
    return AroItem(Path("x.png"), None, tuple(f"option {i}" for i in range(k)), true_index, group)


# ------------------------------------------------------------------------------------------------ scoring

def test_correct_options_ties_and_identical_options() -> None:
    scores = torch.tensor([[0.1, 0.3],   # true (index 1) higher: correct
                           [0.3, 0.1],   # false higher: wrong
                           [0.2, 0.2],   # exact tie: wrong (a tie is not a win)
                           [0.2, 0.2 + 5e-6],  # within the 1e-5 tolerance: wrong
                           [0.2, 0.2 + 2e-5]], dtype=torch.float64)  # beyond it: correct
    ones = torch.ones(5, dtype=torch.long)
    assert aro.correct_options(scores, ones).tolist() == [True, False, False, False, True]
    assert aro.correct_options(scores, ones, tie_tolerance=0.0).tolist() == [True, False, False, True, True]
    # Order: true first; option 2 is the true caption's own tokens (a perturbation that changed nothing)
    order = torch.tensor([[0.5, 0.1, 0.5, 0.2], [0.5, 0.1, 0.5, 0.6], [0.5, 0.5, 0.1, 0.1]],
                         dtype=torch.float64)
    same = torch.tensor([[True, False, True, False], [True, False, True, False], [True, False, False, False]])
    zeros = torch.zeros(3, dtype=torch.long)
    assert aro.correct_options(order, zeros, same).tolist() == [True, False, False]
    # VG: an identical false caption is listed before the true one, so ARO's argmax picks it
    assert aro.correct_options(torch.tensor([[0.4, 0.4]]), torch.tensor([1]),
                               torch.tensor([[True, True]])).tolist() == [False]


def test_vg_relation_macro_after_drop_list_macro_all_and_micro() -> None:
    items = [item("on"), item("on"), item("under"), item("under"), item("next to")]
    scores = torch.tensor([[0.1, 0.3], [0.3, 0.1], [0.2, 0.5], [0.2, 0.2 + 5e-6], [0.0, 0.9]],
                          dtype=torch.float64)
    result = aro.score_dataset("vg_relation", scores, items)
    # on 1/2, under 1/2 (the tie within tolerance loses), next to 1/1 — "next to" is on ARO's drop list
    assert result.metrics == {"vg_relation/macro_acc": (1 / 2 + 1 / 2) / 2,
                              "vg_relation/macro_acc_all": (1 / 1 + 1 / 2 + 1 / 2) / 3,  # next to, on, under
                              "vg_relation/micro_acc": 3 / 5}
    assert result.counts == {"vg_relation/num_items": 5, "vg_relation/num_items_with_identical_option": 0,
                             "vg_relation/num_relations": 3, "vg_relation/num_relations_kept": 2}
    assert result.per_group["next to"] == {"acc": 1.0, "count": 1}
    assert "next to" in aro.ARO_DROPPED_RELATIONS and "on" not in aro.ARO_DROPPED_RELATIONS
    custom = aro.score_dataset("vg_relation", scores, items, dropped_relations={"on"})
    assert custom.metrics["vg_relation/macro_acc"] == (1 / 1 + 1 / 2) / 2  # next to, under


def test_drop_list_is_aros(tmp_path: Path) -> None:
    shared = REPO.parent / "shared/data/aro_vg_relation_dropped.json"
    if shared.is_file():  # the list as the issue gives it (ARO's notebook)
        assert aro.ARO_DROPPED_RELATIONS == frozenset(json.loads(shared.read_text()))
    assert len(aro.ARO_DROPPED_RELATIONS) == 157
    (tmp_path / "drop.json").write_text(json.dumps(["on", "under"]))
    assert aro.read_relation_list(tmp_path / "drop.json") == {"on", "under"}
    (tmp_path / "drop.json").write_text(json.dumps({"on": 1}))
    with pytest.raises(AroDataError, match=r"--dropped-relations .*drop.json: expected a JSON list"):
        aro.read_relation_list(tmp_path / "drop.json")


def test_vg_attribution_macro_over_pairs_with_enough_items() -> None:
    items = [item("red_blue")] * 25 + [item("green_white")] * 2
    scores = torch.tensor([[0.0, 1.0]] * 20 + [[1.0, 0.0]] * 5 + [[0.0, 1.0]] * 2, dtype=torch.float64)
    result = aro.score_dataset("vg_attribution", scores, items)
    assert result.metrics == {"vg_attribution/macro_acc": 20 / 25,  # only red_blue has >= 25 items
                              "vg_attribution/macro_acc_all": (2 / 2 + 20 / 25) / 2,  # green_white, red_blue
                              "vg_attribution/micro_acc": 22 / 27}
    assert result.counts["vg_attribution/num_pairs"] == 2
    assert result.counts["vg_attribution/num_pairs_kept"] == 1
    few = aro.score_dataset("vg_attribution", scores[:24], items[:24])  # no pair is left: macro is NaN
    assert few.metrics["vg_attribution/macro_acc"] != few.metrics["vg_attribution/macro_acc"]


def test_order_precision_at_1() -> None:
    items = [item("", 0, 5)] * 4
    scores = torch.tensor([[0.9, 0.1, 0.2, 0.3, 0.4], [0.1, 0.9, 0.2, 0.3, 0.4],
                           [0.5, 0.5, 0.1, 0.1, 0.1], [0.5, 0.1, 0.5, 0.1, 0.1]], dtype=torch.float64)
    same = torch.zeros(4, 5, dtype=torch.bool)
    same[:, 0] = True
    same[3, 2] = True  # item 3's 2nd perturbation changed nothing: the true caption, listed first, wins
    result = aro.score_dataset("coco_order", scores, items, same)
    assert result.metrics == {"coco_order/acc": 2 / 4}  # items 0 and 3
    assert result.counts == {"coco_order/num_items": 4, "coco_order/num_items_with_identical_option": 1}


# ------------------------------------------------------------------------------------------------ loaders

def test_vg_loaders_read_the_published_fields(aro_root: Path) -> None:
    items = load(aro_root, "vg_relation")
    file = aro_root / "visual_genome_relation.json"
    assert [it.captions for it in items] == [(i["false_caption"], i["true_caption"]) for i in VGR]  # as ARO
    assert [it.true_index for it in items] == [1] * 5
    assert [it.group for it in items] == ["on", "on", "under", "under", "next to"]
    assert items[2].image == aro_root / "images/sub/b.png" and items[2].crop == (4, 4, 12, 12)
    assert items[1].source == f"{file}: item 1"
    left, right = aro.load_item_image(items[0]), aro.load_item_image(items[1])  # a.png: red | blue halves
    assert left.size == right.size == (20, 30)
    assert colours(left) == {RED} and colours(right) == {BLUE}
    centre = aro.load_item_image(items[2])  # b.png (4, 4, 12, 12): the white square
    assert centre.size == (8, 8) and colours(centre) == {WHITE}
    pairs = load(aro_root, "vg_attribution")
    assert len(pairs) == 27 and {it.group for it in pairs} == {"red_blue", "green_white"}
    assert pairs[0].captions == (VGA[0]["false_caption"], VGA[0]["true_caption"])
    assert pairs[0].crop == (0, 0, 40, 30)


def test_order_loader_perturbations(aro_root: Path) -> None:
    items = load(aro_root, "coco_order")
    captions = [c for ann in COCO for c in ann["caption"]]
    assert len(items) == 3
    assert all(len(it.captions) == 5 and it.true_index == 0 and it.crop is None for it in items)
    assert [it.captions[0] for it in items] == [aro_pre_caption(c) for c in captions]
    assert items[0].captions[0] == "a red circle on a blue square"
    assert [it.image for it in items] == [aro_root / "coco" / COCO[i]["image"] for i in (0, 0, 1)]
    for it, caption in zip(items, captions):
        words = sorted(aro_pre_caption(caption).split())
        assert all(sorted(option.split()) == words for option in it.captions)  # the same words, moved
        tokens = [t.lower() for t in tokenize(caption)]
        kept = [i for i, t in enumerate(tokens) if TAGS[t] not in ("NN", "JJ")]
        nouns_adjectives = it.captions[1].split()  # only nouns and adjectives moved; "." dropped at the end
        assert all(nouns_adjectives[i] == tokens[i] for i in kept if tokens[i] != ".")
    # the documented seeding: one RNG per (seed, image, caption index), perturbations in ARO's order
    rng = negative_rng(f"{COCO[0]['image']}/1", 0, 0)
    assert items[1].captions == aro.order_options(captions[1], [tuple(t) for t in pos_tags(captions[1])], rng)
    assert load(aro_root, "coco_order") == items
    assert load(aro_root, "coco_order", seed=1) != items
    flickr = load(aro_root, "flickr30k_order")
    assert [it.captions[0] for it in flickr] == ["the dog is on the square", "a cat"]
    # "a cat": one noun, one other word, one trigram — three perturbations cannot change it (same_as_true)
    assert flickr[1].captions[1] == flickr[1].captions[2] == flickr[1].captions[4] == "a cat"


# ------------------------------------------------------------------------------------------------ bad input

def write(tmp_path: Path, name: str, items: list) -> Path:
    path = tmp_path / aro.DEFAULT_FILES[name]
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(items))
    return path


def test_errors_name_file_and_item(aro_root: Path, tmp_path: Path) -> None:
    items = json.loads((aro_root / "visual_genome_relation.json").read_text())
    items[2]["image_path"] = "missing.png"
    file = write(tmp_path, "vg_relation", items)
    with pytest.raises(AroDataError, match=rf"{re.escape(str(file))}: item 2: image .*missing.png not found.*"
                                           rf"--vg-images"):
        aro.load_vg(file, aro_root / "images")
    del items[1]["bbox_h"]
    with pytest.raises(AroDataError, match=rf"{re.escape(str(file))}: item 1: missing key 'bbox_h'"):
        aro.load_vg(write(tmp_path, "vg_relation", items), aro_root / "images")
    attribution = json.loads((aro_root / "visual_genome_attribution.json").read_text())
    attribution[3]["attributes"] = ["red"]
    with pytest.raises(AroDataError, match=r"item 3: 'attributes' must be a list of two strings"):
        aro.load_vg(write(tmp_path, "vg_attribution", attribution), aro_root / "images", "vg_attribution")
    coco = [dict(a) for a in COCO]
    del coco[1]["caption"]
    tagger = aro.file_pos_tagger(aro_root / "pos_tags.json")
    file = write(tmp_path, "coco_order", coco)
    with pytest.raises(AroDataError, match=rf"{re.escape(str(file))}: item 1: missing key 'caption'"):
        aro.load_order(file, aro_root / "coco", tagger)
    coco[1] = {"image": "val2014/nope.jpg", "caption": ["a cat"]}
    with pytest.raises(AroDataError, match=r"item 1: image .*val2014/nope.jpg not found.*--coco-images"):
        aro.load_order(write(tmp_path, "coco_order", coco), aro_root / "coco", tagger)
    coco[1] = {"image": COCO[1]["image"], "caption": ["a cat", "an untagged caption"]}
    with pytest.raises(AroDataError, match=r"item 1 caption 1: no POS tags for 'an untagged caption'"):
        aro.load_order(write(tmp_path, "coco_order", coco), aro_root / "coco", tagger)
    file, images = aro.dataset_paths("flickr30k_order", tmp_path / "none")
    with pytest.raises(AroDataError, match=r"flickr30k_test.json: file not found.*--flickr30k-order-file"):
        aro.load_order(file, images, tagger, "flickr30k_order")
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(AroDataError, match=r"bad.json: not valid JSON"):
        aro.load_vg(tmp_path / "bad.json", aro_root / "images")


def test_cli_errors_are_one_line(aro_root: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    spec = importlib.util.spec_from_file_location("eval_structure", REPO / "tools/eval_structure.py")
    tool = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tool)
    assert tool.DATASET_NAMES == aro.DATASETS
    code = tool.main(["--run", str(tmp_path / "run"), "--aro-root", str(tmp_path), "--datasets",
                      "vg_relation"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and err[0].startswith("eval_structure: error: ")
    assert str(tmp_path / "visual_genome_relation.json") in err[0]
    code = tool.main(["--run", str(tmp_path / "run"), "--aro-root", str(aro_root), "--datasets",
                      "vg_relation"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "is not a kclip_ds run directory" in err[0]


def test_spacy_tagger_gives_penn_tags_and_one_line_errors() -> None:
    """The real spaCy path (ARO's tagger), with the pipeline kclip_ds installs."""
    tagger = aro.spacy_pos_tagger()
    assert tagger(["A red circle."]) == [[("A", "DT"), ("red", "JJ"), ("circle", "NN"), (".", ".")]]
    with pytest.raises(AroDataError, match=r"spaCy model 'en_core_web_xx' cannot be loaded .*--pos-tags"):
        aro.spacy_pos_tagger("en_core_web_xx")


# ------------------------------------------------------------------------------------------------ encoding

def fake_model() -> EvalModel:
    """Image feature: mean RGB; text feature: a fixed embedding of 6 token slots (so 7+ words truncate)."""
    vocab: dict[str, int] = {}
    table = torch.randn(64, 3, generator=torch.Generator().manual_seed(0), dtype=torch.float64)

    def tokenizer(texts: list[str]) -> torch.Tensor:
        out = torch.zeros(len(texts), 6, dtype=torch.long)
        for row, text in enumerate(texts):
            ids = [vocab.setdefault(w, len(vocab) + 1) for w in text.split()][:6]
            out[row, :len(ids)] = torch.tensor(ids)
        return out

    def encode(images, texts):
        image = None if images is None else torch.nn.functional.normalize(images.mean((2, 3)), dim=-1)
        text = None
        if texts is not None:
            weights = torch.arange(1, texts.shape[1] + 1, dtype=torch.float64)[None, :, None]
            text = torch.nn.functional.normalize((table[texts] * weights).sum(1), dim=-1).float()
        return {"image_features": image, "text_features": text}

    def preprocess(image: Image.Image) -> torch.Tensor:
        return torch.from_numpy(np.asarray(image.resize((8, 8)), dtype=np.float32)).permute(2, 0, 1) / 255
    towers = SimpleNamespace(preprocess_val=preprocess, tokenizer=tokenizer, context_length=6)
    return EvalModel(encode, towers, cfg=None, tag="t", device=torch.device("cpu"))


def test_option_scores_encodes_each_input_once(aro_root: Path, tmp_path: Path) -> None:
    model = fake_model()
    items = load(aro_root, "vg_relation")
    long = AroItem(aro_root / "images/a.png", None, ("w1 w2 w3 w4 w5 w6 seven", "w1 w2 w3 w4 w5 w6 eight"), 1)
    scores, same = option_scores(model, [*items, long], batch_size=2)
    assert scores.dtype == torch.float64 and scores.shape == (6, 2)
    assert same[:, 1].all() and same[:, 0].tolist() == [False] * 5 + [True]  # truncated to the same 6 tokens
    for n, it in enumerate(items):
        pixels = model.towers.preprocess_val(aro.load_item_image(it))[None]
        image = model.encode(pixels, None)["image_features"]
        text = model.encode(None, model.towers.tokenizer(list(it.captions)))["text_features"]
        assert torch.allclose(scores[n], (image.double() @ text.double().T)[0], atol=1e-6)
    assert not aro.correct_options(scores, torch.ones(6, dtype=torch.long), same)[5]  # a VG tie: false first
    (tmp_path / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n truncated")
    broken = AroItem(tmp_path / "broken.png", (0, 0, 4, 4), ("a", "b"), 1, "on", "f.json: item 7")
    with pytest.raises(AroDataError, match=r"f.json: item 7: image .*broken.png cannot be decoded"):
        option_scores(model, [items[0], broken], batch_size=4)


# ------------------------------------------------------------------------------------------------ end to end

@pytest.fixture(scope="module")
def run_dir(demo_data: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A Structure-CLIP kclip-micro run: one step on one rank, ZeRO-0 (whole weights, no zero_to_fp32)."""
    out = tmp_path_factory.mktemp("aro_run") / "run"
    overrides = common(demo_data, out, **{
        "train.max_steps": 1, "data.workers": 0, "data.shuffle_buffer": 0, "data.zeroshot": "",
        "data.test": "",
        "deepspeed.config": "ds_configs/zero0.json", "method.name": "structure_clip",
        "data.negatives": "[relation,attribute]", "method.graph_width": 64, "method.graph_heads": 2,
        "method.graph_layers": 1})
    assert_ok(python(["-m", "kclip_ds.train", "--config", "configs/demo.yaml", *overrides], timeout=240))
    return out


def test_eval_structure_end_to_end(run_dir: Path, aro_root: Path, tmp_path: Path) -> None:
    out, scores_out = tmp_path / "results.json", tmp_path / "scores.json"
    proc = python(["tools/eval_structure.py", "--run", str(run_dir), "--aro-root", str(aro_root),
                   "--pos-tags", str(aro_root / "pos_tags.json"), "--demo-split", "val", "--batch-size", "4",
                   "--workers", "1", "--device", "cpu", "--out", str(out), "--scores-out", str(scores_out)],
                  timeout=240)
    assert_ok(proc)
    report = json.loads(out.read_text())
    per_item = json.loads(scores_out.read_text())
    assert report["tag"] == "global_step1" and report["device"] == "cpu"
    assert set(report["metrics"]) == {
        "vg_relation/macro_acc", "vg_relation/macro_acc_all", "vg_relation/micro_acc",
        "vg_attribution/macro_acc", "vg_attribution/macro_acc_all", "vg_attribution/micro_acc",
        "coco_order/acc", "flickr30k_order/acc", "val/relation_swap_acc", "val/attribute_swap_acc"}
    assert all(0.0 <= v <= 1.0 for v in report["metrics"].values()), report["metrics"]
    assert report["counts"]["vg_relation/num_items"] == 5 and report["counts"]["coco_order/num_items"] == 3
    assert report["counts"]["val/relation_swap_num"] > 0
    for name in aro.DATASETS:  # the tool's numbers are the pure scorers' on the scores it wrote
        scores = torch.tensor(per_item[name]["scores"], dtype=torch.float64)
        same = torch.tensor(per_item[name]["same_as_true"])
        expected = aro.score_dataset(name, scores, load(aro_root, name), same)
        assert {k: report["metrics"][k] for k in expected.metrics} == expected.metrics
        assert {k: report["counts"][k] for k in expected.counts} == expected.counts
    assert report["per_group"]["vg_relation"]["next to"]["count"] == 1
    assert not list(tmp_path.glob(".*.tmp-*"))  # written through a temp file and a rename
