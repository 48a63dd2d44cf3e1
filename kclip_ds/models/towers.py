"""open_clip towers from an arch name or a JSON config, weights from local disk only.

    towers = build_towers(cfg.model)   # Towers(model, preprocess_train, preprocess_val, tokenizer, …)

The CLIP module is a plain ``nn.Module``; DeepSpeed is applied to it from outside (engine.py).
"""

from __future__ import annotations

import hashlib
import json
import logging
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import open_clip
import torch
from torch import nn

from kclip_ds.config import ModelConfig

log = logging.getLogger(__name__)

KCLIP_MODEL_CONFIGS = Path(__file__).resolve().parents[1] / "model_configs"
open_clip.add_model_config(KCLIP_MODEL_CONFIGS)


_ARCH_PREPROCESS: dict[str, dict] = {}  # image preprocessing of archs registered from hf:DIR


class ModelError(ValueError):
    """A user-facing model problem (unknown arch, missing weights file)."""


@dataclass
class Towers:
    model: nn.Module  # open_clip CLIP: forward(image, text) -> dict(image_features, text_features, logit_scale)
    preprocess_train: Callable
    preprocess_val: Callable
    tokenizer: Callable[[list[str]], torch.Tensor]
    arch: str
    image_size: int
    context_length: int


def _register_hf_arch(directory: str) -> str:
    """Register the open_clip config equivalent to a transformers CLIPModel directory; returns its name."""
    from transformers import CLIPConfig

    from kclip_ds.export.hf import openclip_model_cfg_from_hf

    path = Path(directory)
    if not (path / "config.json").is_file():
        raise ModelError(f"model.pretrained=hf:{directory}: {path / 'config.json'} not found (give a directory "
                         f"written by transformers' save_pretrained or tools/convert_to_hf.py)")
    model_cfg = openclip_model_cfg_from_hf(CLIPConfig.from_pretrained(path, local_files_only=True))
    name = "hf-" + hashlib.sha256(str(path.resolve()).encode()).hexdigest()[:10]
    processor = path / "preprocessor_config.json"
    if processor.is_file():  # open_clip model configs cannot carry preprocessing; it is forced at creation
        pp = json.loads(processor.read_text())
        _ARCH_PREPROCESS[name] = {"image_mean": pp["image_mean"], "image_std": pp["image_std"],
                                  "image_interpolation": "bicubic" if pp.get("resample", 3) == 3 else "bilinear"}
    config_file = Path(tempfile.mkdtemp(prefix="kclip_hf_arch_")) / f"{name}.json"
    config_file.write_text(json.dumps(model_cfg))
    open_clip.add_model_config(config_file)
    return name


def _load_hf_weights(model: nn.Module, directory: str) -> None:
    from safetensors.torch import load_file
    from transformers import CLIPConfig

    from kclip_ds.export.hf import hf_to_openclip_state_dict

    path = Path(directory)
    weights = path / "model.safetensors"
    if not weights.is_file():
        raise ModelError(f"model.pretrained=hf:{directory}: {weights} not found")
    state = hf_to_openclip_state_dict(load_file(str(weights)), CLIPConfig.from_pretrained(path, local_files_only=True))
    model.load_state_dict(state, strict=True)


def resolve_arch(arch: str) -> str:
    """An open_clip model name; a path to a JSON config is registered under its file stem;
    ``hf:DIR`` (a transformers CLIPModel directory) is registered under a name derived from DIR."""
    if arch.startswith("hf:"):
        return _register_hf_arch(arch[3:])
    if arch.endswith(".json"):
        path = Path(arch)
        if not path.is_file():
            raise ModelError(f"model.arch: config file not found: {arch}")
        open_clip.add_model_config(path)
        arch = path.stem
    if arch not in open_clip.list_models():
        raise ModelError(f"model.arch: unknown open_clip model '{arch}' (e.g. kclip-tiny, ViT-B-32, or a path to "
                         f"an open_clip model JSON)")
    return arch


def fix_logit_scale(model: nn.Module) -> None:
    """Reshape the 0-dim ``logit_scale`` to [1]: DeepSpeed 0.19.8 cannot broadcast 0-dim parameters.

    ``exp()`` of a [1] tensor broadcasts like the scalar did, so open_clip's forward is unchanged.
    Exporters undo this (see kclip_ds.export).
    """
    scale = getattr(model, "logit_scale", None)
    if isinstance(scale, nn.Parameter) and scale.dim() == 0:
        model.logit_scale = nn.Parameter(scale.detach().reshape(1), requires_grad=scale.requires_grad)


def trim_text_padding(model: nn.Module, tokenizer: Callable) -> bool:
    """Make ``model.encode_text`` run only up to the longest sequence in its batch; True if it applies.

    open_clip's CLIP always runs its text transformer over the whole context (77 tokens), though captions
    are mostly padding.  The text transformer is causal and the pooled feature is taken at the end-of-text
    token (text_pool_type="argmax"), so nothing pooled can depend on a padding position after it: cutting
    the batch's trailing all-padding columns gives the same features (up to float rounding) for a fraction
    of the work.  Applies only where that argument holds: open_clip ``CLIP``, argmax pooling, a causal mask,
    and open_clip's own tokenizer (which pads with 0).  The override is an instance attribute, so it runs
    inside ``CLIP.forward`` and ZeRO-3 gathers the parameters it reads as before; weights are untouched.
    """
    if not (isinstance(model, open_clip.CLIP) and getattr(model, "text_pool_type", None) == "argmax"
            and getattr(model, "attn_mask", None) is not None
            and isinstance(tokenizer, open_clip.tokenizer.SimpleTokenizer)):
        return False
    model.encode_text = _encode_text_trimmed.__get__(model)
    return True


def used_text_length(text: torch.Tensor, multiple: int = 8) -> int:
    """Columns of ``text: [N, L]`` (0 = padding) up to the last non-padding one, rounded up to ``multiple``.

    The last nonzero column, not a count of nonzeros: id 0 is also "!" inside a caption, and the end-of-text
    token after it is nonzero.  One host sync per text-tower call (a slice needs a Python int)."""
    used = (text != 0).any(dim=0).nonzero()
    length = int(used.max()) + 1 if len(used) else 1
    return min(text.shape[1], -(-length // multiple) * multiple)


def _encode_text_trimmed(self: nn.Module, text: torch.Tensor, normalize: bool = False) -> torch.Tensor:
    """open_clip 3.3's ``CLIP.encode_text`` on ``text[:, :n]``, n = the batch's used length (see trim_text_padding)."""
    n = used_text_length(text)
    text = text[:, :n]
    cast_dtype = self.transformer.get_cast_dtype()
    x = self.token_embedding(text).to(cast_dtype)
    x = x + self.positional_embedding[:n].to(cast_dtype)
    x = self.transformer(x, attn_mask=self.attn_mask[:n, :n])
    x = self.ln_final(x)
    x = open_clip.transformer.text_global_pool(x, text, self.text_pool_type)
    if self.text_projection is not None:
        x = self.text_projection(x) if isinstance(self.text_projection, nn.Linear) else x @ self.text_projection
    return torch.nn.functional.normalize(x, dim=-1) if normalize else x


def build_towers(cfg: ModelConfig, load_weights: bool = True) -> Towers:
    """Towers per ``cfg``.  ``model.pretrained`` is a local open_clip file or ``hf:DIR`` (a transformers
    CLIPModel directory, whose config then also fixes the architecture); ``load_weights=False`` builds
    the same architecture without reading weights (for tools that load a checkpoint next)."""
    from_hf = cfg.pretrained.startswith("hf:")
    arch = resolve_arch(cfg.pretrained if from_hf else cfg.arch)
    if from_hf and cfg.arch not in ("", "kclip-tiny", arch):
        log.warning("model.arch=%s ignored: the architecture comes from model.pretrained=%s", cfg.arch, cfg.pretrained)
    pretrained = None
    if cfg.pretrained and not from_hf and load_weights:
        if not Path(cfg.pretrained).is_file():
            raise ModelError(f"model.pretrained: weights file not found: {cfg.pretrained} "
                             f"(kclip_ds loads local files only, never a hub)")
        pretrained = cfg.pretrained
    model, preprocess_train, preprocess_val = open_clip.create_model_and_transforms(
        arch, pretrained=pretrained, output_dict=True, pretrained_text=False, pretrained_image=False,
        weights_only=True, **_ARCH_PREPROCESS.get(arch, {}))
    if from_hf and load_weights:
        _load_hf_weights(model, cfg.pretrained[3:])
    if cfg.grad_checkpointing:
        model.set_grad_checkpointing(True)
    fix_logit_scale(model)
    tokenizer = open_clip.get_tokenizer(arch)
    if cfg.trim_text_padding and not trim_text_padding(model, tokenizer):
        log.info("model.trim_text_padding: not applicable to %s (needs open_clip CLIP, causal text tower, "
                 "argmax pooling, open_clip's tokenizer); the text tower runs over the full context", arch)
    image_size = model.visual.image_size
    image_size = image_size[0] if isinstance(image_size, (tuple, list)) else int(image_size)
    context_length = int(getattr(tokenizer, "context_length", model.context_length))
    log.info("model %s: %.2fM parameters (grad checkpointing %s)", arch,
             sum(p.numel() for p in model.parameters()) / 1e6, "on" if cfg.grad_checkpointing else "off")
    return Towers(model, preprocess_train, preprocess_val, tokenizer, arch, image_size, context_length)
