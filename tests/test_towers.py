"""open_clip towers: local weights only, logit_scale reshaped for DeepSpeed, named errors."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from kclip_ds.config import ModelConfig
from kclip_ds.models.towers import ModelError, build_towers


def test_local_pretrained_weights_are_loaded(tmp_path: Path) -> None:
    source = build_towers(ModelConfig(arch="kclip-micro")).model
    with torch.no_grad():
        for p in source.parameters():
            p.add_(torch.randn_like(p) * 0.01)
        source.logit_scale.fill_(2.0)
    state = {k: (v.reshape(()) if k == "logit_scale" else v) for k, v in source.state_dict().items()}
    path = tmp_path / "micro.pt"
    torch.save(state, path)
    loaded = build_towers(ModelConfig(arch="kclip-micro", pretrained=str(path))).model
    for (name, a), b in zip(source.state_dict().items(), loaded.state_dict().values()):
        assert torch.equal(a, b), name
    assert loaded.logit_scale.shape == (1,)  # DeepSpeed 0.19.8 cannot broadcast a 0-dim parameter


def test_json_config_arch_and_grad_checkpointing(tmp_path: Path) -> None:
    config = tmp_path / "my-arch.json"
    config.write_text((Path(__file__).resolve().parents[1] / "kclip_ds/model_configs/kclip-micro.json").read_text())
    towers = build_towers(ModelConfig(arch=str(config), grad_checkpointing=True))
    assert towers.arch == "my-arch" and towers.image_size == 32 and towers.context_length == 16
    assert towers.model.visual.transformer.grad_checkpointing
    out = towers.model(image=torch.randn(2, 3, 32, 32), text=towers.tokenizer(["a red circle", "a blue star"]))
    assert out["image_features"].shape == out["text_features"].shape == (2, 32)


@pytest.mark.parametrize(("cfg", "message"), [
    (ModelConfig(arch="ViT-Nope-99"), "unknown open_clip model 'ViT-Nope-99'"),
    (ModelConfig(arch="missing/arch.json"), "config file not found: missing/arch.json"),
    (ModelConfig(arch="kclip-micro", pretrained="/no/such/weights.pt"), "weights file not found: /no/such/weights.pt"),
])
def test_named_errors(cfg: ModelConfig, message: str) -> None:
    with pytest.raises(ModelError, match=message):
        build_towers(cfg)
