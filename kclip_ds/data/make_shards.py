"""Turn an image folder and a captions file into webdataset shards with a manifest.

Input formats: CSV / TSV (open_clip's ``filepath`` / ``title`` columns by default), JSON lines
(``image`` / ``caption`` fields by default) and COCO captions JSON (one sample per annotation).

Rows are assigned to shards before validation: shard ``i`` (``{i:06d}.tar``) holds input rows
``[i*N, (i+1)*N)``, bad rows only make it smaller.  Shards are written atomically, so a shard
whose final file exists is finished and a rerun reuses it and writes only the missing ones.
Each sample holds ``txt`` (the stripped caption), the image's original bytes under ``jpg`` /
``png`` / ``webp`` and ``json`` (source path and row index).  Bad samples are listed in
``errors.jsonl``; ``manifest.json`` records the input's sha256 so that a rerun against a
different input is refused (``.make_shards.json`` records it until the manifest exists).
"""

from __future__ import annotations

import csv
import io
import json
import multiprocessing
import os
import re
import tarfile
from collections import Counter
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from PIL import Image, UnidentifiedImageError

from kclip_ds.data.shards import (
    AtomicShardWriter,
    Manifest,
    ShardError,
    ShardInfo,
    atomic_write_text,
    check_output_dir,
    claim_output_dir,
    count_tar_samples,
    sha256_file,
    write_manifest,
)

FORMATS = ("csv", "tsv", "jsonl", "coco")
DEFAULT_KEYS = {"csv": ("filepath", "title"), "tsv": ("filepath", "title"), "jsonl": ("image", "caption")}
ERRORS_NAME = "errors.jsonl"
STATE_NAME = ".make_shards.json"  # the input's identity, written before the first shard
_SUFFIX_FORMATS = {".csv": "csv", ".tsv": "tsv", ".jsonl": "jsonl", ".json": "coco"}
_EXTENSIONS = {".jpg": "jpg", ".jpeg": "jpg", ".png": "png", ".webp": "webp"}
_PIL_EXTENSIONS = {"JPEG": "jpg", "PNG": "png", "WEBP": "webp"}


class _BadSample(Exception):
    def __init__(self, reason: str, detail: str):
        super().__init__(reason, detail)
        self.reason, self.detail = reason, detail


@dataclass(frozen=True)
class Row:
    """One input row: ``error`` is set (and the row skipped) when the row itself is malformed."""

    index: int
    key: str
    image: str = ""
    caption: str = ""
    meta: dict[str, Any] = field(default_factory=dict)
    error: str | None = None


@dataclass
class MakeShardsResult:
    """What :func:`make_shards` did: the manifest it wrote, the skipped samples, shards written/reused."""

    manifest: Manifest
    errors: list[dict[str, Any]]
    written: int
    reused: int


def shard_name(index: int) -> str:
    return f"{index:06d}.tar"


def detect_format(captions: str | os.PathLike, fmt: str = "auto") -> str:
    """The input format: ``fmt`` itself, or for ``auto`` the one the file extension names."""
    if fmt != "auto":
        if fmt not in FORMATS:
            raise ShardError(f"unknown format {fmt!r} (choose from auto, {', '.join(FORMATS)})")
        return fmt
    suffix = Path(captions).suffix.lower()
    if suffix not in _SUFFIX_FORMATS:
        raise ShardError(f"{captions}: cannot guess the format from the extension; pass --format")
    return _SUFFIX_FORMATS[suffix]


def _make_row(index: int, key: str, rec: dict[str, Any], image_key: str, caption_key: str, *,
              meta: dict[str, Any] | None = None) -> Row:
    for name in (image_key, caption_key):
        if rec.get(name) is None:
            return Row(index, key, error=f"missing field {name!r}")
        if not isinstance(rec[name], str):
            return Row(index, key, error=f"field {name!r} is not a string")
    image, caption = rec[image_key], rec[caption_key].strip()
    if not image.strip():
        return Row(index, key, error="empty image path")
    if not caption:
        return Row(index, key, error="empty caption")
    return Row(index, key, image, caption, meta or {})


def _read_table(path: Path, delimiter: str, image_key: str, caption_key: str) -> list[Row]:
    with open(path, encoding="utf-8-sig", newline="") as f:
        reader = csv.DictReader(f, delimiter=delimiter)
        try:
            columns = list(reader.fieldnames or [])
            missing = [k for k in (image_key, caption_key) if k not in columns]
            if missing:
                raise ShardError(f"{path}: no column {', '.join(map(repr, missing))}; available columns: "
                                 f"{', '.join(columns) or '(none)'}; set --image-key / --caption-key")
            return [_make_row(i, f"{i:09d}", rec, image_key, caption_key) for i, rec in enumerate(reader)]
        except csv.Error as exc:
            raise ShardError(f"{path}: line {reader.line_num}: {exc}") from exc


def _read_jsonl(path: Path, image_key: str, caption_key: str) -> list[Row]:
    rows: list[Row] = []
    with open(path, encoding="utf-8-sig") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            i, key = len(rows), f"{len(rows):09d}"
            try:
                rec = json.loads(line)
                rows.append(_make_row(i, key, rec, image_key, caption_key) if isinstance(rec, dict)
                            else Row(i, key, error=f"line {lineno}: not a JSON object"))
            except json.JSONDecodeError as exc:
                rows.append(Row(i, key, error=f"line {lineno}: malformed JSON ({exc.msg})"))
    return rows


def _read_coco(path: Path) -> list[Row]:
    try:
        doc = json.loads(path.read_text(encoding="utf-8-sig"))
    except json.JSONDecodeError as exc:
        raise ShardError(f"{path}: not valid JSON ({exc})") from exc
    if not (isinstance(doc, dict) and isinstance(doc.get("images"), list)
            and isinstance(doc.get("annotations"), list)):
        raise ShardError(f"{path}: not a COCO captions file (needs 'images' and 'annotations' lists)")
    files = {img["id"]: img.get("file_name") for img in doc["images"]
             if isinstance(img, dict) and isinstance(img.get("id"), (int, str))}
    rows: list[Row] = []
    for i, ann in enumerate(doc["annotations"]):
        ids = (ann.get("image_id"), ann.get("id")) if isinstance(ann, dict) else (None, None)
        if not all(isinstance(v, (int, str)) for v in ids):
            rows.append(Row(i, f"{i:09d}", error="annotation needs 'id' and 'image_id'"))
            continue
        key = re.sub(r"[^A-Za-z0-9_-]", "_", f"{ids[0]}_{ids[1]}")
        if ids[0] not in files:
            rows.append(Row(i, key, error=f"image_id {ids[0]!r} is not in 'images'"))
            continue
        rec = {"file_name": files[ids[0]], "caption": ann.get("caption")}
        meta = {"image_id": ids[0], "annotation_id": ids[1]}
        rows.append(_make_row(i, key, rec, "file_name", "caption", meta=meta))
    return rows


def read_rows(captions: str | os.PathLike, fmt: str, image_key: str | None = None,
              caption_key: str | None = None) -> list[Row]:
    """Parse the captions file (``fmt`` already resolved) into rows; duplicate keys become bad rows."""
    path = Path(captions)
    try:
        if fmt == "coco":
            rows = _read_coco(path)
        else:
            image_key = image_key or DEFAULT_KEYS[fmt][0]
            caption_key = caption_key or DEFAULT_KEYS[fmt][1]
            rows = (_read_jsonl(path, image_key, caption_key) if fmt == "jsonl"
                    else _read_table(path, "\t" if fmt == "tsv" else ",", image_key, caption_key))
    except UnicodeDecodeError as exc:
        raise ShardError(f"{path}: not UTF-8 text ({exc.reason} at byte {exc.start})") from exc
    seen: set[str] = set()
    for i, row in enumerate(rows):
        if row.error is None and row.key in seen:
            rows[i] = Row(row.index, row.key, error=f"duplicate key {row.key!r}")
        seen.add(row.key)
    return rows


def read_image(path: Path) -> tuple[bytes, str]:
    """The file's bytes and normalized extension, after PIL ``verify()`` and a full ``load()``."""
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise _BadSample("missing_image", f"{path}: no such file") from None
    except OSError as exc:
        raise _BadSample("missing_image", f"{path}: {exc.strerror or exc}") from None
    try:
        with Image.open(io.BytesIO(data)) as im:
            im.verify()
            pil_format = im.format
        with Image.open(io.BytesIO(data)) as im:
            im.load()
    except UnidentifiedImageError:
        raise _BadSample("corrupt_image", f"{path}: not a recognized image format") from None
    except Exception as exc:  # noqa: BLE001 - PIL raises many exception types on corrupt files
        raise _BadSample("corrupt_image", f"{path}: {type(exc).__name__}: {exc}") from None
    ext = _EXTENSIONS.get(path.suffix.lower()) or _PIL_EXTENSIONS.get(pil_format or "")
    if ext is None:
        raise _BadSample("unsupported_image", f"{path}: {pil_format} is not jpg, png or webp")
    return data, ext


def _build_sample(row: Row, images: Path) -> dict[str, Any]:
    if row.error is not None:
        raise _BadSample("bad_row", row.error)
    data, ext = read_image(images / row.image)  # an absolute row.image replaces ``images``
    meta = {"source": row.image, "row": row.index, **row.meta}
    return {"__key__": row.key, "txt": row.caption.encode(), ext: data,
            "json": json.dumps(meta, sort_keys=True).encode()}


@dataclass
class _ShardTask:
    index: int
    rows: list[Row]
    out: str
    images: str
    source: str
    strict: bool


@dataclass
class _ShardResult:
    info: ShardInfo
    errors: list[dict[str, Any]]
    reused: bool


def _error(task: _ShardTask, row: Row, bad: _BadSample) -> dict[str, Any]:
    if task.strict:
        raise ShardError(f"{task.source}: row {row.index} (key {row.key}): {bad.reason}: {bad.detail}")
    return {"key": row.key, "row": row.index, "reason": bad.reason, "detail": bad.detail}


def _reuse_shard(task: _ShardTask, path: Path) -> _ShardResult:
    """Describe a finished shard; rows absent from it are re-checked only to report why."""
    try:
        count, keys = count_tar_samples(path), {row.key for row in task.rows}
        if count < len(task.rows):  # some rows were skipped: which ones?
            with tarfile.open(path, "r:") as tar:
                keys = {m.name.split(".", 1)[0] for m in tar.getmembers() if m.isreg()}
    except (OSError, tarfile.TarError) as exc:
        raise ShardError(f"{path}: unreadable shard ({exc}); delete it and rerun") from exc
    errors = []
    for row in task.rows:
        if row.key in keys:
            continue
        try:
            _build_sample(row, Path(task.images))
            bad = _BadSample("stale_shard", f"now valid but missing from {path.name}; delete it and rerun")
        except _BadSample as exc:
            bad = exc
        errors.append(_error(task, row, bad))
    return _ShardResult(ShardInfo(path.name, count, path.stat().st_size, sha256_file(path)), errors, True)


def _process_shard(task: _ShardTask) -> _ShardResult:
    """Write one shard (or reuse the finished one); module-level so that spawned workers can run it."""
    path = Path(task.out) / shard_name(task.index)
    if path.exists():
        return _reuse_shard(task, path)
    errors = []
    with AtomicShardWriter(path) as writer:
        for row in task.rows:
            try:
                sample = _build_sample(row, Path(task.images))
            except _BadSample as bad:
                errors.append(_error(task, row, bad))
                continue
            writer.write(sample)
        info = writer.close()
    return _ShardResult(info, errors, False)


def _run_tasks(tasks: list[_ShardTask], workers: int, log: Callable[[str], None]) -> list[_ShardResult]:
    results: dict[int, _ShardResult] = {}

    def done(index: int, result: _ShardResult) -> None:
        results[index] = result
        verb = "reused" if result.reused else "wrote"
        log(f"[{len(results)}/{len(tasks)}] {verb} {result.info.name}: {result.info.count} samples")

    if workers <= 1 or len(tasks) <= 1:
        for task in tasks:
            done(task.index, _process_shard(task))
    else:
        pool = ProcessPoolExecutor(min(workers, len(tasks)), mp_context=multiprocessing.get_context("spawn"))
        try:
            futures = {pool.submit(_process_shard, task): task.index for task in tasks}
            for future in as_completed(futures):
                done(futures[future], future.result())
        except BaseException:
            pool.shutdown(wait=True, cancel_futures=True)  # let running shards finish or abort cleanly
            raise
        pool.shutdown(wait=True)
    return [results[task.index] for task in tasks]


def make_shards(images: str | os.PathLike, captions: str | os.PathLike, out: str | os.PathLike, *,
                fmt: str = "auto", shard_size: int = 1000, image_key: str | None = None,
                caption_key: str | None = None, strict: bool = False, workers: int = 1,
                log: Callable[[str], None] = print) -> MakeShardsResult:
    """Write ``out/{i:06d}.tar`` shards, ``out/errors.jsonl`` and ``out/manifest.json``.

    Finished shards already in ``out`` are reused.  Raises :class:`ShardError` on user errors and,
    with ``strict``, on the first bad sample (no temp file or partial shard is left behind).
    """
    images_dir, source, out_dir = Path(images), Path(captions), Path(out)
    if not source.is_file():
        raise ShardError(f"captions file not found: {source}")
    if not images_dir.is_dir():
        raise ShardError(f"image directory not found: {images_dir}")
    if shard_size < 1 or workers < 1:
        raise ShardError("--shard-size and --workers must be at least 1")
    fmt = detect_format(source, fmt)
    rows = read_rows(source, fmt, image_key, caption_key)
    if not rows:
        raise ShardError(f"{source}: no rows")
    bad = next((row for row in rows if row.error is not None), None)
    if strict and bad is not None:
        raise ShardError(f"{source}: row {bad.index} (key {bad.key}): bad_row: {bad.error}")

    identity = {"source_sha256": sha256_file(source), "format": fmt, "shard_size": shard_size}
    check_output_dir(out_dir, STATE_NAME, identity, "holds shards made from a different input")
    claim_output_dir(out_dir, STATE_NAME, identity)

    tasks = [_ShardTask(i, rows[start:start + shard_size], str(out_dir), str(images_dir), str(source), strict)
             for i, start in enumerate(range(0, len(rows), shard_size))]
    results = _run_tasks(tasks, workers, log)

    errors = sorted((e for r in results for e in r.errors), key=lambda e: e["row"])
    skipped = dict(sorted(Counter(e["reason"] for e in errors).items()))
    atomic_write_text(out_dir / ERRORS_NAME, "".join(json.dumps(e) + "\n" for e in errors))
    extra = {"source": str(source.resolve()), **identity, "skipped": skipped}
    manifest = Manifest([r.info for r in results], extra)
    write_manifest(out_dir, manifest)
    (out_dir / STATE_NAME).unlink(missing_ok=True)  # the manifest now records the input

    reused = sum(r.reused for r in results)
    log(f"shards: {len(results) - reused} written, {reused} skipped (already complete)")
    if errors:
        counts = " ".join(f"{k}={v}" for k, v in skipped.items())
        log(f"skipped {len(errors)} samples: {counts} (see {out_dir / ERRORS_NAME})")
    log(f"{manifest.total} samples in {len(results)} shards; manifest: {out_dir / 'manifest.json'}")
    return MakeShardsResult(manifest, errors, len(results) - reused, reused)
