"""Precomputed teacher features for Knowledge-CLIP's distillation (``method.kd_teacher=features``).

    precompute_teacher("data/pairs", "data/pairs-teacher", arch="ViT-B-32", pretrained="weights/vitb32.pt")
    image, text = decode_teacher_member(sample[TEACHER_MEMBER], sample["__key__"], dim=512)  # [2, D] float32

Every sample of the output shards gets ``teacher.npy``: a float16 ``.npy`` array [2, D] holding the frozen
teacher's L2-normalised (image feature, text feature), written and read with ``allow_pickle=False``.  The
image goes through the teacher's ``preprocess_val`` (no augmentation) and the caption through its tokenizer,
decoded exactly as the trainer decodes them (:class:`kclip_ds.data.transforms.SampleDecoder`).  The output
``manifest.json`` records the teacher (:func:`teacher_spec`) so that the trainer can check it matches its
config; shards are written atomically, finished ones are reused on a rerun, and an output directory begun
from another input or teacher is refused (the same contract as ``scene_graph.parse_shards``).
"""

from __future__ import annotations

import functools
import multiprocessing
import os
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from pickle import UnpicklingError  # only to report a weights file torch refuses; nothing is unpickled here
from typing import Any

import torch

from kclip_ds.config import ModelConfig
from kclip_ds.data.shards import (
    AtomicShardWriter,
    Manifest,
    ShardError,
    ShardInfo,
    check_output_dir,
    claim_output_dir,
    read_input_manifest,
    sha256_file,
    write_manifest,
)
from kclip_ds.data.transforms import CorruptSample, SampleDecoder
from kclip_ds.knowledge.scene_graph import _read_samples
from kclip_ds.knowledge.teacher_format import (  # noqa: F401 — re-exported
    _NORM_TOLERANCE,
    _RERUN,
    TEACHER_DTYPE,
    TEACHER_MEMBER,
    decode_teacher_member,
    encode_teacher_member,
    teacher_spec,
)
from kclip_ds.models.towers import ModelError, Towers, build_towers

STATE_NAME = ".precompute_teacher.json"  # the run's identity until manifest.json records it
RANDOM_TEACHER_SEED = 0  # pretrained="" (tests only): a seeded init, so that a resumed run gets the same teacher

@functools.lru_cache(maxsize=1)
def _load_teacher(arch: str, pretrained: str, weights_sha256: str | None, device: str) -> Towers:
    """Towers in eval mode on ``device``; ``weights_sha256`` is part of the cache key only."""
    try:
        with torch.random.fork_rng(devices=[]):  # the caller's RNG stays as it was
            torch.manual_seed(RANDOM_TEACHER_SEED)  # used by a random init only
            towers = build_towers(ModelConfig(arch=arch, pretrained=pretrained))
    except ModelError as exc:
        raise ShardError(str(exc)) from None
    except (RuntimeError, AssertionError, UnpicklingError) as exc:  # open_clip's shape checks: another arch
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ShardError(f"--pretrained {pretrained}: not open_clip weights for --arch {arch} ({first})") from None
    towers.model.eval().requires_grad_(False).to(device)
    return towers


def _weights_file(pretrained: str) -> Path:
    return Path(pretrained[3:]) / "model.safetensors" if pretrained.startswith("hf:") else Path(pretrained)


# ---------------------------------------------------------------------------------------------------------
# Shard directories: a copy of the input with teacher.npy (tools/precompute_teacher.py).

@dataclass
class _ShardTask:
    source: str  # input shard path
    out: str  # output shard path
    count: int  # samples, per the input manifest
    arch: str
    pretrained: str
    weights_sha256: str | None
    device: str
    batch_size: int


def _encode_batch(towers: Towers, images: list[torch.Tensor], captions: list[str]) -> torch.Tensor:
    """[B, 2, D] (image, text) features of the teacher; its forward normalises them."""
    device = next(towers.model.parameters()).device
    with torch.no_grad():
        out = towers.model(image=torch.stack(images).to(device), text=towers.tokenizer(captions).to(device))
    feats = torch.stack([out["image_features"], out["text_features"]], dim=1).float().cpu()
    assert feats.shape[:2] == (len(images), 2), f"teacher features {tuple(feats.shape)} for {len(images)} samples"
    return feats


def _decoded(source: Path, decoder: SampleDecoder) -> Iterator[tuple[str, dict[str, bytes], torch.Tensor, str]]:
    """(key, members, image [3, H, W], caption) per sample of one input shard, decoded as the trainer does."""
    for key, members in _read_samples(source):
        if TEACHER_MEMBER in members:
            raise ShardError(f"{source}: sample {key} already has {TEACHER_MEMBER}; point --input at the "
                             f"shards without teacher features")
        try:
            image, caption, _, _ = decoder.decode({"__key__": key, **members})
        except CorruptSample as exc:  # its message starts with the key
            raise ShardError(f"{source}: sample {exc}; fix or drop the sample and rerun") from None
        yield key, members, image, caption


def _batches(items: Iterable[Any], size: int) -> Iterator[list[Any]]:
    batch = []
    for item in items:
        batch.append(item)
        if len(batch) == size:
            yield batch
            batch = []
    if batch:
        yield batch


def _teacher_shard(task: _ShardTask) -> ShardInfo:
    """Write one output shard; module-level so that spawned workers can run it (the teacher loads once each)."""
    towers = _load_teacher(task.arch, task.pretrained, task.weights_sha256, task.device)
    decoder = SampleDecoder(towers.preprocess_val, towers.tokenizer, towers.image_size, towers.context_length)
    source = Path(task.source)
    with AtomicShardWriter(task.out) as writer:
        for batch in _batches(_decoded(source, decoder), task.batch_size):
            features = _encode_batch(towers, [image for *_, image, _ in batch], [caption for *_, caption in batch])
            for (key, members, _, _), pair in zip(batch, features, strict=True):
                if not torch.isfinite(pair).all():
                    raise ShardError(f"{source}: sample {key}: the teacher's features are not finite; check "
                                     f"--pretrained and --arch")
                writer.write({"__key__": key, **members, TEACHER_MEMBER: encode_teacher_member(pair[0], pair[1])})
        if writer.count != task.count:
            raise ShardError(f"{source}: {writer.count} samples, but its manifest records {task.count}; "
                             f"rebuild the input shards")
        return writer.close()


def _limit_threads(threads: int) -> None:
    torch.set_num_threads(threads)  # workers share the cores instead of each taking all of them


def _write_shards(tasks: list[_ShardTask], workers: int, log: Callable[[str], None]) -> list[tuple[ShardInfo, bool]]:
    """(info, reused) per task, in order; a finished output shard (renamed into place) is reused as it is."""
    infos: dict[str, tuple[ShardInfo, bool]] = {}

    def record(task: _ShardTask, info: ShardInfo, reused: bool) -> None:
        infos[task.out] = (info, reused)
        log(f"[{len(infos)}/{len(tasks)}] {'reused' if reused else 'wrote'} {info.name}: {info.count} samples")

    todo = []
    for task in tasks:
        path = Path(task.out)
        if path.is_file():
            record(task, ShardInfo(path.name, task.count, path.stat().st_size, sha256_file(path)), True)
        else:
            todo.append(task)
    if workers == 1 or len(todo) <= 1:
        for task in todo:
            record(task, _teacher_shard(task), False)
    elif todo:  # spawn: forking a parent that imported torch is not safe
        workers = min(workers, len(todo))
        with ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn"), initializer=_limit_threads,
                                 initargs=(max(1, (os.cpu_count() or 1) // workers),)) as pool:
            for task, info in zip(todo, pool.map(_teacher_shard, todo), strict=True):
                record(task, info, False)
    return [infos[task.out] for task in tasks]


def _same_run(identity: dict[str, Any]) -> dict[str, Any]:
    """What a rerun must match: the source manifest, the teacher's arch and its weights' bytes (not the path
    they were read from)."""
    teacher = identity.get("teacher") or {}
    return {"source_manifest_sha256": identity.get("source_manifest_sha256"), "teacher.arch": teacher.get("arch"),
            "teacher.pretrained_sha256": teacher.get("pretrained_sha256")}


def precompute_teacher(source_dir: str | os.PathLike, out_dir: str | os.PathLike, *, arch: str, pretrained: str,
                       batch_size: int = 64, workers: int = 1, device: str = "cpu", allow_random: bool = False,
                       log: Callable[[str], None] = print) -> dict[str, Any]:
    """Copy every shard of ``source_dir`` to ``out_dir`` (same names, samples and member bytes) adding each
    sample's teacher features as ``teacher.npy``; shards finished by an earlier run are reused.

    ``pretrained``: a local open_clip weights file (or ``hf:DIR``); "" builds a randomly initialised teacher
    (seeded; tests only) and needs ``allow_random``.  Returns the output manifest's ``extra``: the source
    identity and ``"teacher"`` (see :func:`teacher_spec`).  Raises :class:`ShardError` on user errors.
    """
    source, out = Path(source_dir), Path(out_dir)
    source_manifest = read_input_manifest(source, out)
    if workers < 1 or batch_size < 1:
        raise ShardError(f"--workers ({workers}) and --batch-size ({batch_size}) must be at least 1")
    try:
        torch_device = torch.device(device)
    except RuntimeError:
        raise ShardError(f"--device {device}: not a torch device (e.g. cpu, cuda, cuda:1)") from None
    if torch_device.type == "cuda" and not torch.cuda.is_available():
        raise ShardError(f"--device {device}: CUDA is not available here; use --device cpu")
    if not pretrained and not allow_random:
        raise ShardError("no --pretrained weights: a random teacher distils nothing (pass --allow-random-teacher "
                         "only for tests)")
    weights = _weights_file(pretrained) if pretrained else None
    if weights is not None and not weights.is_file():
        raise ShardError(f"--pretrained {pretrained}: {weights} not found (a local open_clip weights file)")
    weights_sha256 = sha256_file(weights) if weights is not None else None
    where = pretrained if weights is None or pretrained.startswith("hf:") else str(weights.resolve())
    teacher = {"arch": arch, "pretrained": where, "pretrained_sha256": weights_sha256}
    identity = {"source": str(source.resolve()), "source_manifest_sha256": sha256_file(source / "manifest.json"),
                "teacher": teacher}
    check_output_dir(out, STATE_NAME, identity, "was made from another source or teacher", tool="precompute_teacher",
                     compared=_same_run)
    # Loaded before anything is written, so that a wrong --arch leaves no directory claimed by that arch.  The
    # parent loads the teacher also with workers > 1: its dim and logit scale exp(τ) (the KD loss scales the
    # teacher's similarities by it) go in the manifest.
    towers = _load_teacher(arch, pretrained, weights_sha256, device)
    teacher.update(dim=int(towers.model.visual.output_dim), dtype="float16",
                   logit_scale=float(towers.model.logit_scale.exp().reshape(-1)[0]))
    claim_output_dir(out, STATE_NAME, identity)

    log(f"teacher {arch} ({pretrained or 'random init'}): dim {teacher['dim']}, on {device}, "
        f"batch size {batch_size}, {workers} worker(s)")
    tasks = [_ShardTask(str(source / s.name), str(out / s.name), s.count, arch, pretrained, weights_sha256, device,
                        batch_size) for s in source_manifest.shards]
    results = _write_shards(tasks, workers, log)

    extra = {**identity, "source_extra": source_manifest.extra}
    written = Manifest([info for info, _ in results], extra)
    write_manifest(out, written)
    (out / STATE_NAME).unlink(missing_ok=True)  # the manifest now records the identity
    reused = sum(r for _, r in results)
    log(f"shards: {len(results) - reused} written, {reused} reused (already complete); {written.total} samples "
        f"with {TEACHER_MEMBER} in {out}")
    return extra
