"""Hugging Face tokenizer + image-processor files for an exported open_clip CLIP model.

    cfg = openclip_preprocess_cfg(model)          # image_size, mean, std, interpolation, resize_mode
    write_hf_processor(out_dir, context_length=model.context_length, **cfg)
    CLIPProcessor.from_pretrained(out_dir)        # offline: nothing is fetched, no hub id is involved

Everything is built from files bundled with open_clip (``bpe_simple_vocab_16e6.txt.gz``), so it works with
``HF_HUB_OFFLINE=1``. Files written by :func:`write_hf_processor`:

* ``vocab.json`` / ``merges.txt`` -- exactly the vocabulary of open_clip's ``SimpleTokenizer`` (same ids, 49408
  entries; ``merges.txt`` starts with the ``#version: 0.2`` header), usable by any CLIP BPE loader.
* ``tokenizer.json`` / ``tokenizer_config.json`` -- written by transformers' own ``save_pretrained``.
* ``preprocessor_config.json`` -- the ``CLIPImageProcessor`` config (legacy layout, read by transformers 4.x too).
* ``processor_config.json`` -- transformers 5 layout: ``processor_class`` plus the same image-processor config
  nested under ``"image_processor"`` (transformers 5 prefers the nested copy; both are written from one object).

Tokenizer parity (transformers 5.23, tokenizers 0.23, open_clip 3.3)
--------------------------------------------------------------------
* Special tokens: open_clip 3.x names them ``<start_of_text>`` / ``<end_of_text>``; the export uses the OpenAI /
  Hugging Face names ``<|startoftext|>`` / ``<|endoftext|>`` (transformers' CLIP pre-tokenizer regex hard-codes
  those). The ids are the same: SOT 49406, EOT 49407. Every other vocab entry is identical.
* Padding: open_clip pads with 0 after EOT; the HF tokenizer pads with ``pad_token`` = ``<|endoftext|>`` (49407) and
  returns an ``attention_mask``. Ids agree up to and including the first EOT. Both models pool the text tower at the
  *first* EOT (open_clip: ``argmax`` of the ids, which picks the first maximal 49407; HF CLIP: first ``eos``), so
  the padding difference never reaches the pooled features of a causal text tower.
* Over-long captions: with ``truncation=True`` the HF tokenizer keeps SOT + the first ``L - 2`` BPE tokens + EOT,
  which is exactly what open_clip does (it truncates to ``L`` and overwrites the last id with EOT). Without
  ``truncation=True`` HF returns sequences longer than ``context_length`` (with a warning) -- always pass it.
  ``model_max_length`` is set to ``context_length``, so ``padding="max_length"`` needs no ``max_length``.
* Text cleaning: open_clip runs ``ftfy.fix_text`` + ``html.unescape`` (twice), then Python's ``str.lower()``; the
  HF pipeline only does NFC, whitespace collapsing and the tokenizers ``Lowercase`` normalizer (transformers 5
  rebuilds the CLIP normalizer in code, so it cannot be customised through ``tokenizer.json``). Plain text (ASCII,
  accented letters, CJK, Cyrillic, emoji, extra whitespace, ...) tokenizes identically; text that ftfy or
  html.unescape changes does not: curly quotes (``“x”``), ligatures (``ﬁ``), full-width letters, digraphs
  (``ǅ``), mojibake, HTML entities (``&amp;``). Nor does a word-final Greek capital sigma: Python lower-cases
  ``ΟΔΟΣ`` to ``οδος`` (final ``ς``), the tokenizers normalizer maps char by char to ``οδοσ``. For such text,
  pre-clean with ``open_clip.tokenizer.basic_clean(text).lower()`` before the HF tokenizer and the ids agree.
* A caption that literally contains a special-token string is split differently: open_clip treats the text
  ``<start_of_text>`` / ``<end_of_text>`` as special tokens, HF treats ``<|startoftext|>`` / ``<|endoftext|>`` so.
* transformers 5 has a single tokenizers-backed ``CLIPTokenizer``; ``CLIPTokenizerFast`` is an alias of it, so
  there is no separate slow/fast conversion step (and nothing to download for one).

Image-processor parity (open_clip validation transform vs ``CLIPImageProcessor``)
---------------------------------------------------------------------------------
``resize_mode="shortest"`` (open_clip's default) maps to ``size={"shortest_edge": S}``, ``crop_size=S x S``,
``resample`` 3 (bicubic) or 2 (bilinear), rescale 1/255, normalize(mean, std), convert to RGB.
``resize_mode="squash"`` maps to ``size={"height": H, "width": W}`` with ``do_center_crop=False`` (an exact
resize, aspect ratio ignored -- what open_clip's ``Resize((H, W))`` does). Measured differences, in normalized
units (one uint8 step is ``1 / 255 / std`` ~= 0.015 for the OpenAI std):

* The PIL backend (``CLIPImageProcessorPil``, or ``backend="pil"`` for the Auto classes / ``CLIPProcessor``)
  resizes with the same PIL call as torchvision-on-PIL, so it matches open_clip **exactly** (max |diff| 0.0).
* The default backend of transformers 5 (``CLIPImageProcessor`` and what ``AutoImageProcessor`` /
  ``CLIPProcessor.from_pretrained`` pick when torchvision is installed) resizes the uint8 *tensor* with
  torchvision's antialiased kernels instead of PIL. On ordinary content (gradients, shapes, photos) max |diff| is
  one uint8 step (~0.015) for bicubic and two (~0.03) for bilinear, mean |diff| <= ~1e-3. Bicubic on saturated
  high-contrast texture (binary noise, hard 0/255 edges under strong downscaling, or squashing that upsamples one
  axis and downsamples the other) differs by up to ~27 uint8 steps on some pixels: PIL runs its two separable
  passes in uint8, clipping the first pass's bicubic overshoot to [0, 255] before the second pass, while
  torchvision interpolates in float and clips only at the end (bilinear has no overshoot: <= 1-2 steps always).
  A preprocessor_config.json cannot select the backend -- Auto classes pick torchvision whenever it is
  importable; pass ``backend="pil"`` (or use ``CLIPImageProcessorPil``) for exact parity.
* Centre crop rounding (both HF backends): HF puts the crop window at ``floor((L - S) / 2)``, torchvision's
  ``CenterCrop`` at ``round((L - S) / 2)`` (Python round, half to even). They differ by one pixel exactly when
  ``(L - S) % 4 == 3``, with ``L`` the resized long side (e.g. a 37x120 image at S=64: L=207, offset 71 vs 72).
  Such images come out shifted by one pixel along the long side; this cannot be expressed in the config.
* Image modes: open_clip resizes first and converts to RGB afterwards, HF converts first. RGB, L and opaque RGBA
  agree. Translucent RGBA / transparent images differ (HF composites onto white; open_clip resizes with
  premultiplied alpha and then drops it). Palette ("P") and "1" images differ a lot: Pillow resizes those with
  NEAREST whatever filter is asked for, so open_clip's own pipeline effectively skips bicubic for them, while HF
  resizes the converted RGB image bicubically. Convert such images to RGB before either pipeline.
* ``resize_mode="longest"`` (resize longest side, then pad) is rejected with ``ValueError``: HF's closest
  equivalent (``max_height``/``max_width``) floors the short side where open_clip rounds it. A non-square
  ``image_size`` with ``resize_mode="shortest"`` is rejected too (open_clip uses ``ResizeKeepRatio`` for it).
"""

from __future__ import annotations

import gzip
import json
import numbers
from collections.abc import Sequence
from pathlib import Path
from typing import Any

SOT_TOKEN = "<|startoftext|>"
EOT_TOKEN = "<|endoftext|>"
SOT_ID = 49406
EOT_ID = 49407
VOCAB_SIZE = 49408
_N_MERGES = 49152 - 256 - 2  # the slice open_clip's SimpleTokenizer takes: merges[1:49152-256-2+1]

_RESAMPLE = {"bicubic": 3, "bilinear": 2, "random": 3}  # PIL resample ids; open_clip evaluates "random" as bicubic


def openclip_bpe_vocab() -> tuple[dict[str, int], list[tuple[str, str]]]:
    """(vocab, merges) exactly as open_clip's ``SimpleTokenizer`` builds them, special tokens under their HF names."""
    from open_clip.tokenizer import bytes_to_unicode, default_bpe

    with gzip.open(default_bpe()) as f:
        lines = f.read().decode("utf-8").split("\n")
    merges = [tuple(line.split()) for line in lines[1:_N_MERGES + 1]]
    if len(merges) != _N_MERGES or any(len(m) != 2 for m in merges):
        raise RuntimeError(f"unexpected open_clip BPE file {default_bpe()}")
    byte_chars = list(bytes_to_unicode().values())
    tokens = byte_chars + [c + "</w>" for c in byte_chars] + ["".join(m) for m in merges] + [SOT_TOKEN, EOT_TOKEN]
    vocab = {tok: i for i, tok in enumerate(tokens)}
    if len(vocab) != VOCAB_SIZE or vocab[SOT_TOKEN] != SOT_ID or vocab[EOT_TOKEN] != EOT_ID:
        raise RuntimeError("open_clip BPE vocabulary does not have the expected 49408 unique entries")
    return vocab, merges  # type: ignore[return-value]


def _build_tokenizer(out_dir: Path, context_length: int):
    """Write vocab.json + merges.txt into ``out_dir`` and return a ``CLIPTokenizer`` built from them."""
    from transformers import CLIPTokenizer

    if int(context_length) < 2:
        raise ValueError(f"context_length must be >= 2 (SOT + EOT), got {context_length}")
    out_dir.mkdir(parents=True, exist_ok=True)
    vocab, merges = openclip_bpe_vocab()
    (out_dir / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False), encoding="utf-8")
    (out_dir / "merges.txt").write_text("#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges),
                                        encoding="utf-8")
    return CLIPTokenizer(vocab=vocab, merges=list(merges), bos_token=SOT_TOKEN,
                         eos_token=EOT_TOKEN, unk_token=EOT_TOKEN, pad_token=EOT_TOKEN,
                         model_max_length=int(context_length))


def write_hf_tokenizer(out_dir: Path, context_length: int) -> None:
    """vocab.json, merges.txt, tokenizer.json, tokenizer_config.json for ``CLIPTokenizer`` (== open_clip's BPE)."""
    out_dir = Path(out_dir)
    _build_tokenizer(out_dir, context_length).save_pretrained(out_dir)


def _square_or_hw(image_size: int | Sequence[int]) -> tuple[int, int]:
    if isinstance(image_size, numbers.Integral):
        return int(image_size), int(image_size)
    size = tuple(int(s) for s in image_size)
    if len(size) == 1:
        return size[0], size[0]
    if len(size) != 2:
        raise ValueError(f"image_size must be an int or (height, width), got {image_size!r}")
    return size  # type: ignore[return-value]


def _triple(x: float | Sequence[float], name: str) -> list[float]:
    vals = [float(x)] * 3 if isinstance(x, numbers.Real) else [float(v) for v in x]
    if len(vals) != 3:
        raise ValueError(f"{name} must have 3 values (RGB), got {x!r}")
    return vals


def image_processor_kwargs(image_size: int | Sequence[int], mean: float | Sequence[float],
                           std: float | Sequence[float], interpolation: str = "bicubic",
                           resize_mode: str = "shortest") -> dict[str, Any]:
    """``CLIPImageProcessor`` kwargs reproducing open_clip's validation transform; ValueError if it cannot."""
    if interpolation not in _RESAMPLE:
        raise ValueError(f"interpolation {interpolation!r} is not supported (expected one of {sorted(_RESAMPLE)})")
    h, w = _square_or_hw(image_size)
    common = {"do_resize": True, "resample": _RESAMPLE[interpolation], "crop_size": {"height": h, "width": w},
              "do_rescale": True, "rescale_factor": 1 / 255, "do_normalize": True,
              "image_mean": _triple(mean, "mean"), "image_std": _triple(std, "std"), "do_convert_rgb": True}
    if resize_mode == "shortest":
        if h != w:
            raise ValueError(f"resize_mode 'shortest' with a non-square image_size {(h, w)} (open_clip's "
                             f"ResizeKeepRatio) cannot be expressed by CLIPImageProcessor")
        return {**common, "size": {"shortest_edge": h}, "do_center_crop": True}
    if resize_mode == "squash":
        return {**common, "size": {"height": h, "width": w}, "do_center_crop": False}
    if resize_mode == "longest":
        raise ValueError("resize_mode 'longest' (resize the longest side, then pad) cannot be expressed exactly by "
                         "CLIPImageProcessor: its max_height/max_width resize floors the short side where open_clip "
                         "rounds it; export with resize_mode 'shortest' or 'squash'")
    raise ValueError(f"unknown resize_mode {resize_mode!r} (open_clip knows 'shortest', 'squash', 'longest')")


def write_hf_image_processor(out_dir: Path, image_size: int | Sequence[int], mean: float | Sequence[float],
                             std: float | Sequence[float], interpolation: str = "bicubic",
                             resize_mode: str = "shortest") -> None:
    """preprocessor_config.json for ``CLIPImageProcessor`` matching open_clip's validation transform."""
    from transformers import CLIPImageProcessor

    kwargs = image_processor_kwargs(image_size, mean, std, interpolation, resize_mode)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    CLIPImageProcessor(**kwargs).save_pretrained(out_dir)


def write_hf_processor(out_dir: Path, context_length: int, image_size: int | Sequence[int],
                       mean: float | Sequence[float], std: float | Sequence[float], interpolation: str = "bicubic",
                       resize_mode: str = "shortest") -> None:
    """Tokenizer files + preprocessor_config.json + processor_config.json: ``CLIPProcessor.from_pretrained`` works."""
    from transformers import CLIPImageProcessor, CLIPProcessor

    kwargs = image_processor_kwargs(image_size, mean, std, interpolation, resize_mode)  # validate before writing
    out_dir = Path(out_dir)
    tokenizer = _build_tokenizer(out_dir, context_length)
    image_processor = CLIPImageProcessor(**kwargs)
    image_processor.save_pretrained(out_dir)  # legacy preprocessor_config.json (transformers 4.x, other tools)
    # transformers 5 layout: tokenizer.json + tokenizer_config.json, processor_config.json (image processor nested)
    CLIPProcessor(image_processor=image_processor, tokenizer=tokenizer).save_pretrained(out_dir)


def openclip_preprocess_cfg(model: Any) -> dict[str, Any]:
    """Image kwargs for :func:`write_hf_image_processor` / :func:`write_hf_processor` read from an open_clip model.

    Returns ``{"image_size", "mean", "std", "interpolation", "resize_mode"}`` (``context_length`` is passed
    separately: ``model.context_length``). Uses ``model.visual.preprocess_cfg`` (set by open_clip 3.x's factory;
    the legacy ``image_size`` / ``image_mean`` / ``image_std`` attributes otherwise) merged over open_clip's
    ``PreprocessCfg`` defaults -- the config ``create_model_and_transforms`` builds ``preprocess_val`` from. A
    DeepSpeed engine or DDP wrapper (``.module``) is unwrapped. A square ``size`` comes back as an int.
    """
    from open_clip.transform import PreprocessCfg, merge_preprocess_dict

    while not hasattr(model, "visual") and hasattr(model, "module"):
        model = model.module
    visual = getattr(model, "visual", None)
    if visual is None:
        raise ValueError(f"{type(model).__name__} has no .visual tower; expected an open_clip CLIP model")
    cfg = dict(getattr(visual, "preprocess_cfg", None) or {})
    if not cfg:
        legacy = {"size": getattr(visual, "image_size", None), "mean": getattr(visual, "image_mean", None),
                  "std": getattr(visual, "image_std", None)}
        cfg = {k: v for k, v in legacy.items() if v is not None}
    cfg = merge_preprocess_dict(PreprocessCfg(), cfg)
    if cfg.get("mode", "RGB") != "RGB":
        raise ValueError(f"image mode {cfg['mode']!r} is not supported (CLIPImageProcessor converts to RGB)")

    size = cfg["size"]
    image_size = int(size) if isinstance(size, numbers.Integral) else tuple(int(s) for s in size)
    if isinstance(image_size, tuple) and len(image_size) == 2 and image_size[0] == image_size[1]:
        image_size = image_size[0]
    mean, std = cfg["mean"], cfg["std"]
    return {
        "image_size": image_size,
        "mean": float(mean) if isinstance(mean, numbers.Real) else tuple(float(v) for v in mean),
        "std": float(std) if isinstance(std, numbers.Real) else tuple(float(v) for v in std),
        "interpolation": str(cfg["interpolation"]),
        "resize_mode": str(cfg["resize_mode"]),
    }
