"""open_clip towers: local weights only, logit_scale reshaped for DeepSpeed, named errors."""

from __future__ import annotations

import copy
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


def test_trimmed_text_padding_gives_the_full_context_features_and_gradients() -> None:
    trimmed = build_towers(ModelConfig(arch="kclip-tiny"))
    full = build_towers(ModelConfig(arch="kclip-tiny", trim_text_padding=False)).model
    full.load_state_dict(trimmed.model.state_dict())
    texts = trimmed.tokenizer(["a red circle left of a small blue star", "a cat", "a green square above a dog"])
    assert trimmed.context_length > 16 and int((texts != 0).sum(1).max()) <= 12
    seen = []
    hook = trimmed.model.transformer.register_forward_hook(lambda _m, inputs, _o: seen.append(inputs[0].shape[1]))
    a = trimmed.model(text=texts)["text_features"]
    hook.remove()
    b = full(text=texts)["text_features"]
    assert seen == [16]  # 12 used columns, rounded up to 8's multiple, not the 77 of the context
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    a.square().sum().backward()
    b.square().sum().backward()
    for (name, p), q in zip(trimmed.model.named_parameters(), full.parameters()):
        if q.grad is not None and name.startswith(("token_embedding", "transformer", "ln_final", "text_projection")):
            torch.testing.assert_close(p.grad, q.grad, rtol=1e-4, atol=1e-6, msg=name)
    # positions past the used length get no gradient, as in the full model (padding sits there)
    assert trimmed.model.positional_embedding.grad[16:].abs().max() == 0


def test_a_deep_copy_trims_with_its_own_weights() -> None:
    towers = build_towers(ModelConfig(arch="kclip-micro"))
    teacher = copy.deepcopy(towers.model)
    with torch.no_grad():
        teacher.text_projection.mul_(2.0)
    texts = towers.tokenizer(["a red circle"])
    assert teacher.encode_text.__self__ is teacher
    torch.testing.assert_close(teacher.encode_text(texts), 2 * towers.model.encode_text(texts))
