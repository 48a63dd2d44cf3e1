"""open_clip CLIP ⇄ transformers CLIPModel: config and weights, both ways.

Mapping (per layer i; vision uses ``visual.`` / ``vision_model.``, text the bare / ``text_model.`` names):

    conv1                         → embeddings.patch_embedding            (vision)
    class_embedding               → embeddings.class_embedding            (vision)
    positional_embedding          → embeddings.position_embedding.weight
    token_embedding               → embeddings.token_embedding            (text)
    ln_pre                        → pre_layrnorm                           (sic, HF's spelling)
    transformer.resblocks.i.ln_1  → encoder.layers.i.layer_norm1   (ln_2 → layer_norm2)
    ….attn.in_proj_{weight,bias}  → ….self_attn.{q,k,v}_proj       (split with chunk(3))
    ….attn.out_proj               → ….self_attn.out_proj
    ….mlp.c_fc / ….mlp.c_proj     → ….mlp.fc1 / ….mlp.fc2
    ln_post / ln_final            → post_layernorm / final_layer_norm
    proj / text_projection [w, e] → visual_projection / text_projection .weight [e, w] (transposed)
    logit_scale [1] (kclip_ds)    → logit_scale []

Only the plain ViT/transformer CLIP maps; anything else (timm or HF towers, attentional pooling, layer
scale, SigLIP's logit bias, …) gets ``ExportError`` that suggests the open_clip format.
"""

from __future__ import annotations

import copy
from typing import Any

import torch

QUICK_GELU_HINT = "hidden_act follows open_clip's quick_gelu flag: GELU and QuickGELU differ by ~0.04 in features"


class ExportError(ValueError):
    """A model or checkpoint that cannot be exported as asked; the message says what to do instead."""


_VISION_FIXED = {"timm_model_name": None, "attentional_pool": False, "no_ln_pre": False, "pos_embed_type": "learnable",
                 "pool_type": "tok", "ls_init_value": None, "block_type": None, "qk_norm": False,
                 "scaled_cosine_attn": False, "scale_heads": False, "scale_attn_inner": False, "scale_attn": False,
                 "scale_fc": False, "act_kwargs": None, "norm_kwargs": None}
_TEXT_FIXED = {"hf_model_name": None, "embed_cls": False, "pool_type": "argmax", "proj_bias": False,
               "proj_type": "linear", "no_causal_mask": False, "ls_init_value": None, "block_type": None,
               "qk_norm": False, "scaled_cosine_attn": False, "scale_heads": False, "scale_attn_inner": False,
               "scale_attn": False, "scale_fc": False, "act_kwargs": None, "norm_kwargs": None}


def check_mappable(model_cfg: dict[str, Any], arch: str) -> None:
    """Raise ExportError unless ``model_cfg`` (an open_clip model config dict) maps onto CLIPModel."""
    hint = f"arch '{arch}' cannot map to transformers' CLIPModel"
    fix = "; export it with --format open_clip instead"
    vision, text = model_cfg.get("vision_cfg", {}), model_cfg.get("text_cfg", {})
    if model_cfg.get("custom_text") or model_cfg.get("init_logit_bias") is not None or "multimodal_cfg" in model_cfg:
        raise ExportError(f"{hint} (custom text tower, logit bias or multimodal decoder){fix}")
    if not isinstance(vision.get("layers", 12), int):
        raise ExportError(f"{hint} (a ResNet image tower){fix}")
    for part, cfg, fixed in (("vision_cfg", vision, _VISION_FIXED), ("text_cfg", text, _TEXT_FIXED)):
        for key, expected in fixed.items():
            if cfg.get(key, expected) != expected:
                raise ExportError(f"{hint} ({part}.{key}={cfg[key]!r}){fix}")
    image_size, patch = vision.get("image_size", 224), vision.get("patch_size", 16)
    if not isinstance(image_size, int) or not isinstance(patch, int):
        raise ExportError(f"{hint} (non-square image_size/patch_size){fix}")


def hf_config(model_cfg: dict[str, Any], arch: str):
    """transformers.CLIPConfig for an open_clip model config dict."""
    from transformers import CLIPConfig, CLIPTextConfig, CLIPVisionConfig

    check_mappable(model_cfg, arch)
    vision, text = model_cfg["vision_cfg"], model_cfg["text_cfg"]
    act = "quick_gelu" if model_cfg.get("quick_gelu", False) else "gelu"
    v_width, v_head = vision.get("width", 768), vision.get("head_width", 64)
    t_width = text.get("width", 512)
    vision_config = CLIPVisionConfig(
        hidden_size=v_width, intermediate_size=int(v_width * vision.get("mlp_ratio", 4.0)),
        num_hidden_layers=vision.get("layers", 12), num_attention_heads=v_width // v_head,
        image_size=vision.get("image_size", 224), patch_size=vision.get("patch_size", 16),
        projection_dim=model_cfg["embed_dim"], hidden_act=act, layer_norm_eps=1e-5)
    text_config = CLIPTextConfig(
        vocab_size=text.get("vocab_size", 49408), hidden_size=t_width,
        intermediate_size=int(t_width * text.get("mlp_ratio", 4.0)), num_hidden_layers=text.get("layers", 12),
        num_attention_heads=text.get("heads", 8), max_position_embeddings=text.get("context_length", 77),
        projection_dim=model_cfg["embed_dim"], hidden_act=act, layer_norm_eps=1e-5,
        bos_token_id=49406, eos_token_id=49407, pad_token_id=49407)
    config = CLIPConfig(text_config=text_config.to_dict(), vision_config=vision_config.to_dict(),
                        projection_dim=model_cfg["embed_dim"])
    config.kclip_ds = {"open_clip_arch": arch, "open_clip_model_cfg": model_cfg}
    return config


def openclip_model_cfg_from_hf(config) -> dict[str, Any]:
    """The open_clip model config dict equivalent to a transformers CLIPConfig (inverse of hf_config)."""
    v, t = config.vision_config, config.text_config
    if v.hidden_act != t.hidden_act or v.hidden_act not in ("gelu", "quick_gelu"):
        raise ExportError(f"hidden_act vision={v.hidden_act!r} text={t.hidden_act!r}: open_clip supports gelu or "
                          f"quick_gelu for both towers")
    return {
        "embed_dim": config.projection_dim,
        "quick_gelu": v.hidden_act == "quick_gelu",
        "vision_cfg": {"image_size": v.image_size, "layers": v.num_hidden_layers, "width": v.hidden_size,
                       "head_width": v.hidden_size // v.num_attention_heads, "patch_size": v.patch_size,
                       "mlp_ratio": v.intermediate_size / v.hidden_size},
        "text_cfg": {"context_length": t.max_position_embeddings, "vocab_size": t.vocab_size,
                     "width": t.hidden_size, "heads": t.num_attention_heads, "layers": t.num_hidden_layers,
                     "mlp_ratio": t.intermediate_size / t.hidden_size},
    }


def _tower_pairs(oc_prefix: str, hf_prefix: str, layers: int) -> list[tuple[str, str]]:
    pairs = []
    for i in range(layers):
        o, h = f"{oc_prefix}transformer.resblocks.{i}.", f"{hf_prefix}encoder.layers.{i}."
        for a, b in (("ln_1", "layer_norm1"), ("ln_2", "layer_norm2"), ("attn.out_proj", "self_attn.out_proj"),
                     ("mlp.c_fc", "mlp.fc1"), ("mlp.c_proj", "mlp.fc2")):
            pairs += [(f"{o}{a}.weight", f"{h}{b}.weight"), (f"{o}{a}.bias", f"{h}{b}.bias")]
    return pairs


def _name_pairs(config) -> list[tuple[str, str]]:
    """(open_clip name, HF name) for every tensor that maps one to one (no split, no transpose)."""
    v, t = "vision_model.", "text_model."
    pairs = [("visual.conv1.weight", f"{v}embeddings.patch_embedding.weight"),
             ("visual.class_embedding", f"{v}embeddings.class_embedding"),
             ("visual.positional_embedding", f"{v}embeddings.position_embedding.weight"),
             ("visual.ln_pre.weight", f"{v}pre_layrnorm.weight"), ("visual.ln_pre.bias", f"{v}pre_layrnorm.bias"),
             ("visual.ln_post.weight", f"{v}post_layernorm.weight"), ("visual.ln_post.bias", f"{v}post_layernorm.bias"),
             ("token_embedding.weight", f"{t}embeddings.token_embedding.weight"),
             ("positional_embedding", f"{t}embeddings.position_embedding.weight"),
             ("ln_final.weight", f"{t}final_layer_norm.weight"), ("ln_final.bias", f"{t}final_layer_norm.bias")]
    pairs += _tower_pairs("visual.", v, config.vision_config.num_hidden_layers)
    pairs += _tower_pairs("", t, config.text_config.num_hidden_layers)
    return pairs


def _in_proj_names(config) -> list[tuple[str, str]]:
    names = []
    for oc, hf, layers in (("visual.", "vision_model.", config.vision_config.num_hidden_layers),
                           ("", "text_model.", config.text_config.num_hidden_layers)):
        names += [(f"{oc}transformer.resblocks.{i}.attn.in_proj", f"{hf}encoder.layers.{i}.self_attn")
                  for i in range(layers)]
    return names


def openclip_to_hf_state_dict(state: dict[str, torch.Tensor], config) -> dict[str, torch.Tensor]:
    """open_clip CLIP state dict (``logit_scale`` [1] or []) → CLIPModel state dict."""
    out: dict[str, torch.Tensor] = {}
    for oc, hf in _name_pairs(config):
        out[hf] = state[oc]
    for oc, hf in _in_proj_names(config):
        for kind in ("weight", "bias"):
            q, k, v = state[f"{oc}_{kind}"].chunk(3)
            out[f"{hf}.q_proj.{kind}"], out[f"{hf}.k_proj.{kind}"], out[f"{hf}.v_proj.{kind}"] = q, k, v
    out["visual_projection.weight"] = state["visual.proj"].T
    out["text_projection.weight"] = state["text_projection"].T
    out["logit_scale"] = state["logit_scale"].reshape(())  # undo kclip_ds's [1] reshape (DeepSpeed workaround)
    return {k: v.detach().clone().contiguous() for k, v in out.items()}


def hf_to_openclip_state_dict(state: dict[str, torch.Tensor], config) -> dict[str, torch.Tensor]:
    """CLIPModel state dict → open_clip CLIP state dict (``logit_scale`` as [], open_clip's own shape)."""
    out: dict[str, torch.Tensor] = {}
    for oc, hf in _name_pairs(config):
        out[oc] = state[hf]
    for oc, hf in _in_proj_names(config):
        for kind in ("weight", "bias"):
            out[f"{oc}_{kind}"] = torch.cat([state[f"{hf}.{p}_proj.{kind}"] for p in ("q", "k", "v")])
    out["visual.proj"] = state["visual_projection.weight"].T
    out["text_projection"] = state["text_projection.weight"].T
    out["logit_scale"] = state["logit_scale"].reshape(())
    return {k: v.detach().clone().contiguous() for k, v in out.items()}


def build_hf_model(model_cfg: dict[str, Any], arch: str, openclip_state: dict[str, torch.Tensor]):
    """A transformers CLIPModel holding ``openclip_state``; every HF weight must be filled."""
    from transformers import CLIPModel

    config = hf_config(copy.deepcopy(model_cfg), arch)
    model = CLIPModel(config).eval()
    hf_state = openclip_to_hf_state_dict(openclip_state, config)
    missing, unexpected = model.load_state_dict(hf_state, strict=False)
    missing = [k for k in missing if not k.endswith("position_ids")]
    if missing or unexpected:
        raise ExportError(f"weight mapping for '{arch}' is incomplete: missing {missing[:5]}, unexpected "
                          f"{unexpected[:5]}; export with --format open_clip instead")
    return model
