"""Export to Hugging Face and open_clip formats, checked against transformers and open_clip themselves.

The trained checkpoints come from the shared 2-rank launch (ZeRO-2 / ZeRO-3, fp32 / bf16) in conftest.
"""

from __future__ import annotations

import io
import json
import os
import shutil
import tarfile
from pathlib import Path

import open_clip
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

from kclip_ds.config import MethodConfig, ModelConfig
from kclip_ds.engine import CheckpointError
from kclip_ds.export.convert import convert
from kclip_ds.export.extras import load_extras, register_extra, save_extras
from kclip_ds.export.hf import ExportError, build_hf_model
from kclip_ds.export.weights import load_run
from kclip_ds.methods import build_method
from kclip_ds.models.towers import build_towers
from tests.conftest import REPO, python

os.environ["HF_HUB_OFFLINE"] = "1"  # everything below must load from local files only
os.environ["TRANSFORMERS_OFFLINE"] = "1"


def demo_samples(root: Path, n: int = 12) -> tuple[list[Image.Image], list[str]]:
    images, captions = [], []
    with tarfile.open(root / "val" / "000000.tar") as tar:
        members = {m.name: m for m in tar}
        keys = sorted({name.split(".")[0] for name in members})[:n]
        for key in keys:
            images.append(Image.open(io.BytesIO(tar.extractfile(members[f"{key}.png"]).read())).convert("RGB"))
            captions.append(tar.extractfile(members[f"{key}.txt"]).read().decode())
    return images, captions


def kclip_outputs(run_dir: Path, images, captions) -> dict[str, torch.Tensor]:
    """Features and logits the way kclip_ds computes them: the run's method, its own preprocessing."""
    run = load_run(run_dir)
    towers = build_towers(run.cfg.model, load_weights=False)
    method = build_method(run.cfg.method, towers)
    method.load_state_dict(run.method_state)
    method.eval()
    with torch.no_grad():
        out = method(images=torch.stack([towers.preprocess_val(i) for i in images]),
                     texts=towers.tokenizer(captions), mode="encode")
        scale = towers.model.logit_scale.exp()
    return {"image": out["image_features"], "text": out["text_features"],
            "logits": scale * out["image_features"] @ out["text_features"].T}


def hf_outputs(out_dir: Path, images, captions) -> dict[str, torch.Tensor]:
    from transformers import CLIPModel, CLIPProcessor

    model = CLIPModel.from_pretrained(out_dir, local_files_only=True).eval()
    processor = CLIPProcessor.from_pretrained(out_dir, local_files_only=True)
    inputs = processor(text=captions, images=images, return_tensors="pt", padding="max_length",
                       max_length=model.config.text_config.max_position_embeddings, truncation=True)
    with torch.no_grad():
        image = model.get_image_features(pixel_values=inputs["pixel_values"])
        text = model.get_text_features(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"])
        logits = model(**inputs).logits_per_image
    image, text = (getattr(x, "pooler_output", x) for x in (image, text))
    return {"image": F.normalize(image, dim=-1), "text": F.normalize(text, dim=-1), "logits": logits}


@pytest.mark.slow
@pytest.mark.parametrize("name", ["zero2_fp32", "zero3_fp32", "zero3_bf16"])
def test_hf_export_matches_kclip_ds(runs: dict[str, Path], demo_data: Path, tmp_path: Path, name: str) -> None:
    out = convert(runs[name], tmp_path / "hf")
    images, captions = demo_samples(demo_data)
    ours, theirs = kclip_outputs(runs[name], images, captions), hf_outputs(out, images, captions)
    for key in ("image", "text", "logits"):
        assert (ours[key] - theirs[key]).abs().max() < 1e-4, key
    config = json.loads((out / "config.json").read_text())
    assert config["vision_config"]["hidden_act"] == "gelu"  # open_clip's ViT uses GELU, HF defaults to quick_gelu
    assert json.loads((out / "kclip_extras.json").read_text())["modules"] == {}
    assert not list(tmp_path.glob(".hf.tmp-*"))


@pytest.mark.slow
def test_round_trip_and_open_clip_format(runs: dict[str, Path], demo_data: Path, tmp_path: Path) -> None:
    images, captions = demo_samples(demo_data, 6)
    ours = kclip_outputs(runs["zero2_fp32"], images, captions)
    hf_dir = convert(runs["zero2_fp32"], tmp_path / "hf")
    back = build_towers(ModelConfig(pretrained=f"hf:{hf_dir}"))  # kclip_ds → HF → kclip_ds
    back.model.eval()
    with torch.no_grad():
        again = back.model(image=torch.stack([back.preprocess_val(i) for i in images]), text=back.tokenizer(captions))
    assert torch.equal(again["image_features"], ours["image"]) and torch.equal(again["text_features"], ours["text"])

    oc_dir = convert(runs["zero2_fp32"], tmp_path / "oc", fmt="open_clip")
    oc_config = json.loads((oc_dir / "open_clip_config.json").read_text())
    for model, preprocess in (
            open_clip.create_model_and_transforms(oc_config["arch"], pretrained=str(oc_dir / "open_clip_model.safetensors"))[::2],
            open_clip.create_model_and_transforms(f"local-dir:{oc_dir}")[::2]):
        model.eval()
        with torch.no_grad():
            img = model.encode_image(torch.stack([preprocess(i) for i in images]), normalize=True)
        assert (img - ours["image"]).abs().max() < 1e-5


def write_arch(tmp_path: Path, name: str, **changes) -> str:
    cfg = json.loads((REPO / "kclip_ds/model_configs/kclip-micro.json").read_text())
    for key, value in changes.items():
        section, _, field = key.rpartition(".")
        (cfg[section] if section else cfg)[field] = value
    path = tmp_path / f"{name}.json"
    path.write_text(json.dumps(cfg))
    return str(path)


@pytest.mark.parametrize(("name", "changes", "act"), [
    ("tiny-vit", {}, "gelu"),
    ("tiny-vit-quickgelu", {"quick_gelu": True}, "quick_gelu"),
    ("tiny-vit-wide-text", {"text_cfg.width": 96, "text_cfg.heads": 3, "vision_cfg.width": 64, "embed_dim": 48},
     "gelu"),
])
def test_arch_variants_map_exactly(tmp_path: Path, name: str, changes: dict, act: str) -> None:
    towers = build_towers(ModelConfig(arch=write_arch(tmp_path, name, **changes)))
    model = towers.model.eval()
    hf = build_hf_model(open_clip.get_model_config(towers.arch), towers.arch, model.state_dict())
    assert hf.config.vision_config.hidden_act == hf.config.text_config.hidden_act == act
    images = torch.randn(3, 3, towers.image_size, towers.image_size)
    tokens = towers.tokenizer(["a red circle above a blue star", "a cross", "two green squares"])
    with torch.no_grad():
        ours = model(image=images, text=tokens)
        image = hf.get_image_features(pixel_values=images)
        text = hf.get_text_features(input_ids=torch.where(tokens == 0, 49407, tokens))
    image, text = (F.normalize(getattr(x, "pooler_output", x), dim=-1) for x in (image, text))
    assert (image - ours["image_features"]).abs().max() < 1e-5
    assert (text - ours["text_features"]).abs().max() < 1e-5


def test_unmappable_arch_says_use_open_clip_format() -> None:
    for arch in ("RN50", "ViT-B-32-SigLIP2-256" if "ViT-B-32-SigLIP2-256" in open_clip.list_models() else "RN101"):
        with pytest.raises(ExportError, match="cannot map to transformers' CLIPModel.*--format open_clip"):
            build_hf_model(open_clip.get_model_config(arch), arch, {})


@register_extra("test_gate")
class Gate(nn.Module):
    def __init__(self, dim: int):
        super().__init__()
        self.dim = dim
        self.proj = nn.Linear(dim, 1)

    def extra_config(self) -> dict:
        return {"dim": self.dim}


def test_knowledge_modules_round_trip(tmp_path: Path) -> None:
    method = build_method(MethodConfig(), build_towers(ModelConfig(arch="kclip-micro")))
    method.gate = Gate(32)
    meta = save_extras(tmp_path, method, "clip")
    assert meta["modules"] == {"gate": {"type": "test_gate", "config": {"dim": 32}}}
    rebuilt = load_extras(tmp_path)
    assert torch.equal(rebuilt["gate"].proj.weight, method.gate.proj.weight)
    method.unregistered = nn.Linear(2, 2)
    with pytest.raises(ExportError, match="'unregistered'.*not registered for export"):
        save_extras(tmp_path, method, "clip")


@pytest.mark.slow
def test_bad_inputs_give_one_line_errors(runs: dict[str, Path], tmp_path: Path) -> None:
    run = runs["zero2_fp32"]
    with pytest.raises(CheckpointError, match="checkpoint tag 'global_step99' not found"):
        convert(run, tmp_path / "a", tag="global_step99")
    empty_run = tmp_path / "empty_run"
    (empty_run / "checkpoints").mkdir(parents=True)
    (empty_run / "config.yaml").write_text((run / "config.yaml").read_text())
    with pytest.raises(CheckpointError, match="latest not found: the run has no complete checkpoint"):
        convert(empty_run, tmp_path / "b")
    busy = tmp_path / "busy"
    busy.mkdir()
    (busy / "x").write_text("x")
    proc = python(["tools/convert_to_hf.py", "--run-dir", str(run), "--out", str(busy)])
    assert proc.returncode == 2 and proc.stderr.strip().count("\n") == 0
    assert "exists and is not empty" in proc.stderr

    damaged = tmp_path / "damaged"
    shutil.copytree(run, damaged)
    tag_dir = damaged / "checkpoints" / (damaged / "checkpoints/latest").read_text()
    victim = min(tag_dir.glob("*optim_states.pt"))
    victim.write_bytes(victim.read_bytes()[: victim.stat().st_size // 3])
    with pytest.raises(CheckpointError, match="cannot be read .*truncated or damaged"):
        convert(damaged, tmp_path / "c")
    assert not list(tmp_path.glob(".c.tmp-*")) and not (tmp_path / "c").exists()
