"""HF tokenizer / image-processor export (kclip_ds.export.processor) vs open_clip's own preprocessing, offline."""

from __future__ import annotations

import os

os.environ["HF_HUB_OFFLINE"] = "1"  # before transformers / huggingface_hub read it
os.environ["TRANSFORMERS_OFFLINE"] = "1"

import json
import random
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import open_clip
import pytest
import torch
from open_clip.constants import OPENAI_DATASET_MEAN, OPENAI_DATASET_STD
from open_clip.tokenizer import SimpleTokenizer, basic_clean
from PIL import Image, ImageDraw
from torchvision.transforms import Compose
from torchvision.transforms import functional as TF
from transformers import (
    AutoImageProcessor,
    AutoProcessor,
    AutoTokenizer,
    CLIPImageProcessor,
    CLIPImageProcessorPil,
    CLIPProcessor,
    CLIPTokenizer,
    CLIPTokenizerFast,
)

from kclip_ds.export.processor import (
    EOT_ID,
    SOT_ID,
    openclip_preprocess_cfg,
    write_hf_image_processor,
    write_hf_processor,
    write_hf_tokenizer,
)

MODEL_CONFIGS = Path(__file__).resolve().parents[1] / "kclip_ds" / "model_configs"
open_clip.add_model_config(MODEL_CONFIGS)
L = 32  # kclip-tiny context length


def uint8_step(std) -> float:
    """One uint8 level in normalized units, for the channel with the smallest std."""
    return 1.0 / 255.0 / min(std)


@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    model, _, preprocess_val = open_clip.create_model_and_transforms("kclip-tiny")
    return model.eval(), preprocess_val


@pytest.fixture(scope="module")
def export_dir(tmp_path_factory: pytest.TempPathFactory, tiny) -> Path:
    out = tmp_path_factory.mktemp("hf_export")
    write_hf_processor(out, context_length=tiny[0].context_length, **openclip_preprocess_cfg(tiny[0]))
    return out


@pytest.fixture(scope="module")
def hf_tok(export_dir: Path):
    return CLIPTokenizer.from_pretrained(export_dir)


# ----------------------------------------------------------------------------------------------------------- config


def test_openclip_preprocess_cfg(tiny):
    cfg = openclip_preprocess_cfg(tiny[0])
    assert tiny[0].context_length == L
    assert cfg == {"image_size": 64, "mean": tuple(OPENAI_DATASET_MEAN),
                   "std": tuple(OPENAI_DATASET_STD), "interpolation": "bicubic", "resize_mode": "shortest"}
    # a DeepSpeed engine / DDP wrapper exposes the model as .module
    assert openclip_preprocess_cfg(SimpleNamespace(module=SimpleNamespace(module=tiny[0]))) == cfg


def test_openclip_preprocess_cfg_overrides_end_to_end(tmp_path: Path):
    """A model built with non-default eval preprocessing: the exported processor follows its preprocess_val."""
    model, _, preprocess_val = open_clip.create_model_and_transforms(
        "kclip-tiny", image_mean=(0.5, 0.5, 0.5), image_std=(0.25, 0.25, 0.25), image_interpolation="bilinear",
        image_resize_mode="squash")
    cfg = openclip_preprocess_cfg(model)
    assert cfg == {"image_size": 64, "mean": (0.5, 0.5, 0.5), "std": (0.25, 0.25, 0.25),
                   "interpolation": "bilinear", "resize_mode": "squash"}
    write_hf_processor(tmp_path, context_length=model.context_length, **cfg)
    proc = CLIPProcessor.from_pretrained(tmp_path, backend="pil")
    img = make_image(100, 70)
    ref = preprocess_val(img)[None]
    assert (proc(images=img, return_tensors="pt")["pixel_values"] - ref).abs().max() < 1e-4


def test_written_files(export_dir: Path):
    names = {p.name for p in export_dir.iterdir()}
    assert {"vocab.json", "merges.txt", "tokenizer.json", "tokenizer_config.json", "preprocessor_config.json",
            "processor_config.json"} <= names
    pre = json.loads((export_dir / "preprocessor_config.json").read_text())
    proc = json.loads((export_dir / "processor_config.json").read_text())
    assert proc["processor_class"] == "CLIPProcessor"
    assert proc["image_processor"] == pre  # transformers 5 nested copy == legacy file
    assert pre["size"] == {"shortest_edge": 64} and pre["crop_size"] == {"height": 64, "width": 64}
    assert pre["resample"] == 3 and pre["do_center_crop"] and pre["do_convert_rgb"]
    tok_cfg = json.loads((export_dir / "tokenizer_config.json").read_text())
    assert tok_cfg["model_max_length"] == L
    assert (tok_cfg["bos_token"], tok_cfg["eos_token"], tok_cfg["pad_token"], tok_cfg["unk_token"]) == (
        "<|startoftext|>", "<|endoftext|>", "<|endoftext|>", "<|endoftext|>")
    # nothing machine-specific leaked into the configs
    assert "is_local" not in tok_cfg and "local_files_only" not in tok_cfg


# -------------------------------------------------------------------------------------------------------- tokenizer


def test_vocab_equals_simple_tokenizer(export_dir: Path):
    vocab = json.loads((export_dir / "vocab.json").read_text(encoding="utf-8"))
    encoder = dict(SimpleTokenizer().encoder)
    assert len(vocab) == len(encoder) == 49408
    # open_clip 3.x names the special tokens <start_of_text>/<end_of_text>; HF CLIP uses the OpenAI names
    renamed = {"<start_of_text>": "<|startoftext|>", "<end_of_text>": "<|endoftext|>"}
    assert vocab == {renamed.get(k, k): v for k, v in encoder.items()}
    assert vocab["<|startoftext|>"] == SOT_ID and vocab["<|endoftext|>"] == EOT_ID

    lines = (export_dir / "merges.txt").read_text(encoding="utf-8").splitlines()
    assert lines[0] == "#version: 0.2"
    assert [tuple(m.split()) for m in lines[1:]] == list(SimpleTokenizer().bpe_ranks)


def make_captions(n: int = 200) -> list[str]:
    rng = random.Random(0)
    colors = ["red", "green", "blue", "yellow", "purple", "orange", "gray", "white"]
    shapes = ["circle", "square", "triangle", "star", "hexagon", "cross"]
    rels = ["to the left of", "to the right of", "above", "below", "next to"]
    fixed = [
        "a red circle to the left of a blue square and a green triangle above the blue square",
        "A RED CIRCLE TO THE LEFT OF A BLUE SQUARE", "A Photo Of A Cat.", "", "   ", "a", "I",
        "don't stop, it's John's dog's toy; we'll see, they've gone, I'm here, you'd know",
        "DON'T SHOUT!!! ... ?!", "3 red circles and 12 blue squares", "1,234,567.89 and 3.14 or 2024-05-01",
        "x2 4k 1080p h264 #hashtag @user", "e-mail: someone@example.com / http://example.com/a?b=c&d=e",
        "café", "Café au lait, crème brûlée, naïve façade", "Zürich, São Paulo, ñandú, Øresund, Łódź",
        "日本語のテキストと漢字", "Привет, мир! ЗДРАВСТВУЙ", "Ελληνικά: Οδός οδός", "한국어 문장", "emoji 🐱🐶 👍🏽",
        "mixed   spaces\tand\ttabs\nand\nnewlines  ", "  leading and trailing spaces  ",
        "(parentheses) [brackets] {braces} <angle> 'single' \"double\"", "snake_case and CamelCase and ALLCAPS",
        "the the the the", "aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa", "supercalifragilisticexpialidocious",
        "a 50% discount + $5 off = £10 or €12 ~ ¥100", "c++ / c# / f# & rust", "1st 2nd 3rd 4th 100th",
    ]
    out = list(fixed)
    while len(out) < n:
        c1, c2, c3 = rng.sample(colors, 3)
        s1, s2, s3 = rng.sample(shapes, 3)
        text = f"a {c1} {s1} {rng.choice(rels)} a {c2} {s2}"
        if rng.random() < 0.5:
            text += f" and a {c3} {s3} {rng.choice(rels)} the {c2} {s2}"
        style = rng.randrange(7)
        if style == 0:
            text = text.upper()
        elif style == 1:
            text = text.title() + rng.choice([".", "!", "?", "...", ";", ":)"])
        elif style == 2:
            text = "  " + text.replace(" ", "   ") + " \n"
        elif style == 3:
            text = f"{rng.randint(0, 9999)} {text}, {rng.randint(0, 99)}x"
        elif style == 4:
            text = text.replace("a ", rng.choice(["the ", "one ", "ünë ", "ein "]), 1)
        elif style == 5:
            text = f"\"{text}\" - it's {rng.choice(['café', 'naïve', 'OK', 'good!'])}"
        out.append(text)
    return out


def test_tokenization_parity(hf_tok, export_dir: Path):
    captions = make_captions(200)
    ref = SimpleTokenizer(context_length=L)(captions)  # [N, L], 0-padded after EOT
    assert torch.equal(ref, open_clip.get_tokenizer("kclip-tiny")(captions))
    for tok in (hf_tok, CLIPTokenizerFast.from_pretrained(export_dir), AutoTokenizer.from_pretrained(export_dir)):
        hf = torch.tensor(tok(captions, padding="max_length", max_length=L, truncation=True)["input_ids"])
        assert hf.shape == ref.shape
        for i, caption in enumerate(captions):
            eot = int((ref[i] == EOT_ID).nonzero()[0])
            assert hf[i, : eot + 1].tolist() == ref[i, : eot + 1].tolist(), caption
            # open_clip pads with 0, HF with pad_token == <|endoftext|>
            assert (ref[i, eot + 1:] == 0).all() and (hf[i, eot + 1:] == EOT_ID).all()
        # both text towers pool at argmax(ids) == the first EOT
        first_eot = (ref == EOT_ID).int().argmax(-1)
        assert torch.equal(hf.argmax(-1), ref.argmax(-1)) and torch.equal(hf.argmax(-1), first_eot)


def test_padding_difference_does_not_change_text_features(hf_tok, tiny):
    model = tiny[0]
    captions = make_captions(40)[:40]
    ref = SimpleTokenizer(context_length=L)(captions)
    hf = hf_tok(captions, padding="max_length", truncation=True, return_tensors="pt")["input_ids"]
    assert hf.shape == (len(captions), L)  # model_max_length == context_length
    with torch.no_grad():
        torch.testing.assert_close(model.encode_text(hf), model.encode_text(ref), rtol=0, atol=1e-6)


def test_overlong_captions_truncate_like_open_clip(hf_tok):
    base = "a red circle to the left of a blue square and a green triangle above the blue square"
    captions = [base * k for k in (2, 3, 10)] + [" ".join(str(i) for i in range(100))] + ["word " * (L - 2),
                                                                                       "word " * (L - 1)]
    ref = SimpleTokenizer(context_length=L)(captions)
    hf = torch.tensor(hf_tok(captions, padding="max_length", truncation=True)["input_ids"])
    # exact equality over the whole row: both keep SOT + first L-2 tokens + EOT when too long
    assert torch.equal(hf[:-1], ref[:-1])
    assert (ref[:-2, -1] == EOT_ID).all()
    assert torch.equal(hf[-1, :L - 1], ref[-1, :L - 1])  # "word " * (L - 1) fits only after truncation
    assert hf[-1, -1] == ref[-1, -1] == EOT_ID


def test_ftfy_cleaning_is_the_only_text_difference(hf_tok):
    """open_clip runs ftfy + html.unescape and Python's str.lower(); HF does neither (its Lowercase maps char by char,
    so a word-final capital sigma becomes σ, not ς). Pre-cleaning with basic_clean(text).lower() restores parity."""
    messy = ["“curly quotes” and ‘single’", "ﬁne ligature ﬂow", "ＦＵＬＬ ｗｉｄｔｈ", "fish &amp; chips &lt;3",
             "ǅ digraph", "mojibake: cafÃ©", "non\u00a0breaking space",
             "ΟΔΟΣ final sigma"]
    ref = SimpleTokenizer(context_length=L)(messy)
    hf = torch.tensor(hf_tok([basic_clean(t).lower() for t in messy], padding="max_length", truncation=True)["input_ids"])
    for i, caption in enumerate(messy):
        eot = int((ref[i] == EOT_ID).nonzero()[0])
        assert hf[i, : eot + 1].tolist() == ref[i, : eot + 1].tolist(), caption


# -------------------------------------------------------------------------------------------------------------- images


def make_image(w: int, h: int, mode: str = "RGB", seed: int = 0) -> Image.Image:
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:h, 0:w]
    arr = np.stack([x * 255 // max(w - 1, 1), y * 255 // max(h - 1, 1), (x + y) * 127 // max(w + h - 2, 1)], -1)
    arr = np.clip(arr + rng.integers(-25, 25, arr.shape), 0, 255).astype(np.uint8)
    img = Image.fromarray(arr)
    draw = ImageDraw.Draw(img)
    draw.ellipse([w // 5, h // 5, w // 2, h // 2], fill=(250, 10, 10))
    draw.rectangle([w // 2, h // 2, w - 2, h - 2], fill=(0, 0, 200))
    draw.line([0, h - 1, w - 1, 0], fill=(255, 255, 0), width=2)
    return img if mode == "RGB" else img.convert(mode)  # RGBA from RGB is opaque


def crop_rounding_differs(w: int, h: int, size: int) -> bool:
    """HF centre-crops at floor((L-S)/2), torchvision at round((L-S)/2) (half to even): differ iff (L-S) % 4 == 3."""
    short, long = min(w, h), max(w, h)
    resized_long = int(size * long / short)
    return (resized_long - size) % 4 == 3


# (w, h, mode): upscales, downscales, portrait/landscape, exact size, L / opaque RGBA
IMAGES = [(64, 64, "RGB"), (100, 80, "RGB"), (80, 100, "RGB"), (300, 200, "RGB"), (33, 33, "RGB"),
          (65, 64, "RGB"), (66, 64, "RGB"), (41, 96, "RGB"), (50, 50, "L"), (90, 70, "RGBA"), (120, 78, "RGB"),
          (640, 480, "RGB")]
CROP_SHIFTED = [(37, 120, "RGB"), (120, 37, "RGB"), (67, 64, "RGB"), (64, 71, "L")]


def test_image_cases_cover_crop_rounding():
    assert not any(crop_rounding_differs(w, h, 64) for w, h, _ in IMAGES)
    assert all(crop_rounding_differs(w, h, 64) for w, h, _ in CROP_SHIFTED)


@pytest.mark.parametrize("interpolation", ["bicubic", "bilinear"])
def test_pixel_parity_shortest(tmp_path: Path, tiny, interpolation: str):
    cfg = openclip_preprocess_cfg(tiny[0])
    if interpolation == "bicubic":
        preprocess_val = tiny[1]  # the training model's own validation transform
    else:
        preprocess_val = open_clip.image_transform(64, is_train=False, mean=cfg["mean"], std=cfg["std"],
                                                   interpolation="bilinear")
    write_hf_image_processor(tmp_path, cfg["image_size"], cfg["mean"], cfg["std"], interpolation=interpolation)
    tv = CLIPImageProcessor.from_pretrained(tmp_path)  # transformers 5 default backend (torchvision)
    pil = CLIPImageProcessorPil.from_pretrained(tmp_path)
    assert type(AutoImageProcessor.from_pretrained(tmp_path)) is CLIPImageProcessor
    tv_bound = 2 * uint8_step(cfg["std"]) + 1e-5  # measured: 1 level for bicubic, 2 for bilinear

    for w, h, mode in IMAGES:
        img = make_image(w, h, mode, seed=w * h)
        ref = preprocess_val(img)[None]
        px_pil = pil(images=img, return_tensors="pt")["pixel_values"]
        px_tv = tv(images=img, return_tensors="pt")["pixel_values"]
        assert px_pil.shape == px_tv.shape == ref.shape == (1, 3, 64, 64)
        assert (px_pil - ref).abs().max() < 1e-4, (w, h, mode)  # PIL backend: same PIL resize -> exact
        assert (px_tv - ref).abs().max() <= tv_bound, (w, h, mode)  # torchvision uint8 kernels: <= 1-2 levels
        assert (px_tv - ref).abs().mean() < 1e-3, (w, h, mode)

    # one-pixel crop shift when (resized_long - 64) % 4 == 3: HF == open_clip with a floor-offset crop
    resize, rest = preprocess_val.transforms[0], preprocess_val.transforms[2:]

    def floor_crop(img: Image.Image) -> Image.Image:
        return TF.crop(img, (img.height - 64) // 2, (img.width - 64) // 2, 64, 64)

    floor_ref_transform = Compose([resize, floor_crop, *rest])
    for w, h, mode in CROP_SHIFTED:
        img = make_image(w, h, mode, seed=w + h)
        px_pil = pil(images=img, return_tensors="pt")["pixel_values"]
        px_tv = tv(images=img, return_tensors="pt")["pixel_values"]
        floor_ref = floor_ref_transform(img)[None]
        assert (px_pil - floor_ref).abs().max() < 1e-4, (w, h, mode)
        assert (px_tv - floor_ref).abs().max() <= tv_bound, (w, h, mode)
        assert (px_pil - preprocess_val(img)[None]).abs().max() > 0.1  # the documented difference is real


def levels(a: torch.Tensor, b: torch.Tensor, std) -> torch.Tensor:
    """|a - b| in uint8 levels, per pixel."""
    return (a - b).abs() * torch.tensor(std).view(1, 3, 1, 1) * 255


def test_pixel_parity_squash(tmp_path: Path):
    mean, std = (0.5, 0.4, 0.3), (0.25, 0.3, 0.2)
    ref_transform = open_clip.image_transform((64, 48), is_train=False, mean=mean, std=std, resize_mode="squash")
    write_hf_image_processor(tmp_path, (64, 48), mean, std, resize_mode="squash")
    tv = CLIPImageProcessor.from_pretrained(tmp_path)
    pil = CLIPImageProcessorPil.from_pretrained(tmp_path)
    # (w, h, mode, both axes scaled the same way): 37x120 -> 48x64 upsamples x and downsamples y
    for w, h, mode, same_direction in [(100, 80, "RGB", True), (48, 64, "RGB", True), (300, 200, "L", True),
                                       (30, 40, "RGB", True), (37, 120, "RGB", False)]:
        img = make_image(w, h, mode)
        ref = ref_transform(img)[None]
        px_pil = pil(images=img, return_tensors="pt")["pixel_values"]
        px_tv = tv(images=img, return_tensors="pt")["pixel_values"]
        assert px_pil.shape == px_tv.shape == ref.shape == (1, 3, 64, 48)
        assert (px_pil - ref).abs().max() < 1e-4, (w, h, mode)
        diff = levels(px_tv, ref, std)
        if same_direction:
            assert diff.max() <= 1 + 1e-3, (w, h, mode)
        else:  # bicubic overshoot clipped between PIL's passes, not torchvision's (module docstring)
            assert diff.max() <= 32 and (diff > 1 + 1e-3).float().mean() < 0.05, (w, h, mode)


def test_saturated_edges_bicubic(tmp_path: Path, tiny):
    """Hard 0/255 edges, strong downscale: PIL backend exact; torchvision's bicubic differs (documented, bounded)."""
    cfg = openclip_preprocess_cfg(tiny[0])
    write_hf_image_processor(tmp_path, cfg["image_size"], cfg["mean"], cfg["std"])
    pil = CLIPImageProcessorPil.from_pretrained(tmp_path)
    tv = CLIPImageProcessor.from_pretrained(tmp_path)
    rng = np.random.default_rng(1)
    binary_noise = Image.fromarray(((rng.random((276, 76, 3)) > 0.5) * 255).astype(np.uint8))
    for img in (binary_noise, make_image(76, 276)):
        ref = tiny[1](img)[None]
        assert (pil(images=img, return_tensors="pt")["pixel_values"] - ref).abs().max() < 1e-4
        assert levels(tv(images=img, return_tensors="pt")["pixel_values"], ref, cfg["std"]).max() <= 40


# ----------------------------------------------------------------------------------------------------------- processor


def test_clip_processor_text_and_images(export_dir: Path, hf_tok, tiny):
    captions = ["a red circle to the left of a blue square", "A GREEN TRIANGLE!", "café"]
    images = [make_image(100, 80), make_image(50, 50, "L"), make_image(90, 70, "RGBA")]
    for proc in (CLIPProcessor.from_pretrained(export_dir), AutoProcessor.from_pretrained(export_dir)):
        assert isinstance(proc, CLIPProcessor)
        out = proc(text=captions, images=images, padding="max_length", truncation=True, return_tensors="pt")
        assert out["input_ids"].shape == out["attention_mask"].shape == (3, L)
        assert out["pixel_values"].shape == (3, 3, 64, 64)
        assert out["input_ids"].tolist() == hf_tok(captions, padding="max_length", truncation=True)["input_ids"]
        ip = CLIPImageProcessor.from_pretrained(export_dir)
        assert torch.equal(out["pixel_values"], ip(images=images, return_tensors="pt")["pixel_values"])
    ref_px = torch.stack([tiny[1](img) for img in images])
    pil_proc = CLIPProcessor.from_pretrained(export_dir, backend="pil")
    assert isinstance(pil_proc.image_processor, CLIPImageProcessorPil)
    assert (pil_proc(images=images, return_tensors="pt")["pixel_values"] - ref_px).abs().max() < 1e-4


def test_write_hf_tokenizer_alone(tmp_path: Path):
    write_hf_tokenizer(tmp_path, context_length=16)
    tok = CLIPTokenizer.from_pretrained(tmp_path)
    assert tok.model_max_length == 16 and tok.bos_token_id == SOT_ID and tok.pad_token_id == EOT_ID
    ids = tok("a blue star", padding="max_length", truncation=True)["input_ids"]
    assert ids[:5] == SimpleTokenizer(context_length=16)("a blue star")[0, :5].tolist() and len(ids) == 16


@pytest.mark.parametrize("mode", ["longest", "bogus"])
def test_unsupported_resize_mode_raises(tmp_path: Path, mode: str):
    with pytest.raises(ValueError, match=mode):
        write_hf_image_processor(tmp_path, 64, OPENAI_DATASET_MEAN, OPENAI_DATASET_STD, resize_mode=mode)
    with pytest.raises(ValueError, match=mode):
        write_hf_processor(tmp_path, L, 64, OPENAI_DATASET_MEAN, OPENAI_DATASET_STD, resize_mode=mode)
    assert not any(tmp_path.iterdir())  # validated before anything is written


def test_other_invalid_arguments_raise(tmp_path: Path):
    with pytest.raises(ValueError, match="non-square"):
        write_hf_image_processor(tmp_path, (64, 48), OPENAI_DATASET_MEAN, OPENAI_DATASET_STD)
    with pytest.raises(ValueError, match="nearest"):
        write_hf_image_processor(tmp_path, 64, OPENAI_DATASET_MEAN, OPENAI_DATASET_STD, interpolation="nearest")
    with pytest.raises(ValueError, match="3 values"):
        write_hf_image_processor(tmp_path, 64, (0.5, 0.5), OPENAI_DATASET_STD)
