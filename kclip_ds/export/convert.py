"""A kclip_ds run → a Hugging Face CLIPModel directory or an open_clip checkpoint, plus knowledge modules.

    convert(run_dir="runs/demo", out="exports/demo-hf")                      # transformers format
    convert(run_dir="runs/demo", out="exports/demo-oc", fmt="open_clip")    # open_clip format

The output is assembled in a temp directory beside ``out`` and renamed into place when complete.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

import open_clip
from safetensors.torch import save_file

from kclip_ds.export.extras import save_extras
from kclip_ds.export.hf import ExportError, build_hf_model
from kclip_ds.export.processor import openclip_preprocess_cfg, write_hf_processor
from kclip_ds.export.weights import load_run, split_towers
from kclip_ds.methods import build_method
from kclip_ds.models.towers import build_towers

FORMATS = ("hf", "open_clip")
OPEN_CLIP_CONFIG = "open_clip_config.json"
OPEN_CLIP_WEIGHTS = "open_clip_model.safetensors"


def _check_out(out: Path) -> None:
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise ExportError(f"--out {out} exists and is not empty; choose a new directory or delete it")


def write_open_clip(tmp: Path, arch: str, model_cfg: dict[str, Any], towers_state, preprocess: dict[str, Any]) -> None:
    """``open_clip_config.json`` + ``open_clip_model.safetensors`` (logit_scale back to open_clip's [] shape)."""
    state = {k: (v.reshape(()) if k == "logit_scale" else v).contiguous() for k, v in towers_state.items()}
    save_file(state, str(tmp / OPEN_CLIP_WEIGHTS))
    preprocess_cfg = {("size" if k == "image_size" else k): v for k, v in preprocess.items()}  # open_clip's names
    payload = {"model_cfg": model_cfg, "preprocess_cfg": preprocess_cfg, "arch": arch}
    (tmp / OPEN_CLIP_CONFIG).write_text(json.dumps(payload, indent=1) + "\n")


def convert(run_dir: str | Path, out: str | Path, tag: str = "latest", fmt: str = "hf") -> Path:
    """Export a run's checkpoint; returns the output directory."""
    if fmt not in FORMATS:
        raise ExportError(f"--format must be one of {', '.join(FORMATS)}, got {fmt!r}")
    out = Path(out)
    _check_out(out)
    run = load_run(run_dir, tag)
    towers = build_towers(run.cfg.model, load_weights=False)
    arch = towers.arch
    model_cfg = open_clip.get_model_config(arch)
    method = build_method(run.cfg.method, towers, training=False)
    missing, unexpected = method.load_state_dict(run.method_state, strict=False)
    if missing or unexpected:
        raise ExportError(f"checkpoint {run.tag} of {run_dir} does not fit model.arch={arch}: missing {missing[:5]}, "
                          f"unexpected {unexpected[:5]}")
    towers_state, _ = split_towers(run.method_state)
    preprocess = openclip_preprocess_cfg(towers.model)

    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".{out.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        if fmt == "hf":
            hf_model = build_hf_model(model_cfg, arch, towers_state)
            hf_model.save_pretrained(tmp)
            write_hf_processor(tmp, context_length=towers.context_length, **preprocess)
        else:
            write_open_clip(tmp, arch, model_cfg, towers_state, preprocess)
        extras = save_extras(tmp, method, run.cfg.method.name)
        provenance = {"run_dir": str(Path(run_dir).resolve()), "tag": run.tag, "format": fmt, "arch": arch,
                      "extras": sorted(extras["modules"])}
        (tmp / "kclip_export.json").write_text(json.dumps(provenance, indent=1) + "\n")
        if out.exists():
            out.rmdir()  # empty (checked above)
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out
