"""The ``teacher.npy`` member: a teacher's (image, text) features of one sample, float16 [2, D], unit rows.

Written by tools/precompute_teacher.py (kclip_ds.knowledge.teacher), read by the training decoder
(kclip_ds.data.transforms) with ``numpy.load(allow_pickle=False)``: never unpickled.
"""

from __future__ import annotations

import io
import os
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from kclip_ds.data.shards import read_manifest

TEACHER_MEMBER = "teacher.npy"
TEACHER_DTYPE = np.float16
_NORM_TOLERANCE = 1e-2  # |‖f‖ − 1| allowed after the float16 round trip
_RERUN = "re-run tools/precompute_teacher.py to rewrite the teacher features"

# ---------------------------------------------------------------------------------------------------------
# The member format.

def encode_teacher_member(image_feature: torch.Tensor, text_feature: torch.Tensor) -> bytes:
    """``teacher.npy`` bytes for one sample: image_feature, text_feature [D] → float16 [2, D], L2-normalised
    here (a no-op for open_clip's outputs, which are normalised already)."""
    assert image_feature.dim() == 1 and image_feature.shape == text_feature.shape, \
        f"image_feature {tuple(image_feature.shape)} / text_feature {tuple(text_feature.shape)}: expected [D] and [D]"
    pair = F.normalize(torch.stack([image_feature, text_feature]).detach().float().cpu(), dim=-1)
    if not torch.isfinite(pair).all():
        raise ValueError("teacher features are not finite")
    buffer = io.BytesIO()
    np.save(buffer, pair.numpy().astype(TEACHER_DTYPE), allow_pickle=False)
    return buffer.getvalue()


def decode_teacher_member(data: bytes, key: str, dim: int | None = None) -> torch.Tensor:
    """(image, text) teacher features [2, D] float32 from ``teacher.npy`` bytes; ``dim``: the D expected.

    Raises ValueError naming ``key`` for anything but a finite float16 [2, D] array of unit rows."""
    def bad(problem: str) -> ValueError:
        return ValueError(f"sample {key}: {TEACHER_MEMBER} {problem}; {_RERUN}")

    try:
        array = np.load(io.BytesIO(data), allow_pickle=False)
    except (ValueError, OSError, EOFError) as exc:  # pickled or object data, not .npy, truncated
        raise bad(f"is not a plain .npy array ({exc})") from None
    if not isinstance(array, np.ndarray):  # an .npz archive
        raise bad(f"is a {type(array).__name__}, not a .npy array")
    if array.dtype != TEACHER_DTYPE:
        raise bad(f"has dtype {array.dtype}, expected float16")
    if array.ndim != 2 or array.shape[0] != 2:
        raise bad(f"has shape {list(array.shape)}, expected [2, D] (image, text)")
    if dim is not None and array.shape[1] != dim:
        raise bad(f"has dim {array.shape[1]}, but the teacher's features have {dim}")
    features = torch.from_numpy(array.astype(np.float32))
    if not torch.isfinite(features).all():
        raise bad("holds NaN or inf")
    norms = features.norm(dim=-1)
    if ((norms - 1).abs() > _NORM_TOLERANCE).any():
        raise bad(f"rows are not L2-normalised (norms {norms.tolist()})")
    return features


def teacher_spec(directory: str | os.PathLike) -> dict[str, Any] | None:
    """The ``teacher`` record of a shard directory's manifest ({"arch", "pretrained", "pretrained_sha256",
    "dim", "dtype", "logit_scale"}), or None when it has no manifest or no teacher features.

    Raises ValueError (naming the file) for a manifest that is not kclip_ds's."""
    manifest = read_manifest(directory)
    return None if manifest is None else manifest.extra.get("teacher")


# ---------------------------------------------------------------------------------------------------------
# The teacher model, loaded once per process.
