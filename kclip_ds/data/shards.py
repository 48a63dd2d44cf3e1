"""Writing webdataset shards safely, and the manifest that describes a shard directory.

A shard is written to ``<name>.tmp-<pid>`` and renamed into place only when complete, so a
crash leaves either a finished shard or no shard.  Every shard directory carries a
``manifest.json``::

    {"format": "kclip_ds/shards/v1",
     "shards": [{"name": "000000.tar", "count": 512, "bytes": 1234567, "sha256": "…"}, …],
     "total": 1024, "extra": {…}}

The training pipeline reads per-shard sample counts from it (exact epochs need them).
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import tarfile
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import webdataset as wds

MANIFEST_NAME = "manifest.json"
MANIFEST_FORMAT = "kclip_ds/shards/v1"


@dataclass
class ShardInfo:
    name: str
    count: int
    bytes: int
    sha256: str


@dataclass
class Manifest:
    shards: list[ShardInfo] = field(default_factory=list)
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def total(self) -> int:
        return sum(s.count for s in self.shards)

    def counts(self) -> dict[str, int]:
        return {s.name: s.count for s in self.shards}


def sha256_file(path: str | os.PathLike) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    """Write ``text`` to ``path`` through a temp file and a rename (never half-written)."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(text)
    os.replace(tmp, path)


def write_manifest(directory: str | os.PathLike, manifest: Manifest) -> Path:
    payload = {
        "format": MANIFEST_FORMAT,
        "shards": [asdict(s) for s in sorted(manifest.shards, key=lambda s: s.name)],
        "total": manifest.total,
        "extra": manifest.extra,
    }
    path = Path(directory) / MANIFEST_NAME
    atomic_write_text(path, json.dumps(payload, indent=1) + "\n")
    return path


def read_manifest(directory: str | os.PathLike) -> Manifest | None:
    """The manifest of a shard directory, or None when the directory has none."""
    path = Path(directory) / MANIFEST_NAME
    if not path.exists():
        return None
    try:
        payload = json.loads(path.read_text())
        shards = [ShardInfo(**s) for s in payload["shards"]]
    except (json.JSONDecodeError, KeyError, TypeError) as exc:
        raise ValueError(f"{path}: not a kclip_ds shard manifest ({exc}); delete it and rerun the shard tool") from exc
    return Manifest(shards=shards, extra=payload.get("extra", {}))


class AtomicShardWriter:
    """A webdataset ``TarWriter`` that writes to a temp name and renames on ``close()``.

    Values must already be bytes or str (no automatic encoders: nothing is pickled).
    ``mtime`` is fixed so that the same samples give byte-identical shards.
    """

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        self.tmp_path = self.path.with_name(f".{self.path.name}.tmp-{os.getpid()}")
        self._file = open(self.tmp_path, "wb")  # noqa: SIM115 — closed in close()/abort()
        self._writer = wds.TarWriter(self._file, encoder=False, mtime=0.0)
        self.count = 0

    def write(self, sample: dict[str, Any]) -> None:
        """Write one sample: ``__key__`` plus members of bytes or str (str is stored as UTF-8)."""
        self._writer.write({k: v.encode("utf-8") if isinstance(v, str) and not k.startswith("__") else v
                            for k, v in sample.items()})
        self.count += 1

    def close(self) -> ShardInfo:
        """Finish the tar, rename it into place and describe it."""
        self._writer.close()
        self._file.close()
        os.replace(self.tmp_path, self.path)
        return ShardInfo(self.path.name, self.count, self.path.stat().st_size, sha256_file(self.path))

    def abort(self) -> None:
        """Drop the partial shard (used when an exception interrupts writing)."""
        try:
            self._writer.close()
        except (OSError, tarfile.TarError):
            pass
        self._file.close()
        self.tmp_path.unlink(missing_ok=True)

    def __enter__(self) -> AtomicShardWriter:  # noqa: PYI034
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is not None:
            self.abort()


def count_tar_samples(path: str | os.PathLike) -> int:
    """Number of samples (distinct keys) in a tar shard, by reading its member names."""
    keys = set()
    with tarfile.open(path, mode="r|*") as tar:
        for member in tar:
            if member.isreg():
                base = os.path.basename(member.name)
                keys.add(os.path.join(os.path.dirname(member.name), base.split(".", 1)[0]))
    return len(keys)


def encode_png(image) -> bytes:
    """PIL image → PNG bytes (deterministic)."""
    buf = io.BytesIO()
    image.save(buf, format="PNG", optimize=False)
    return buf.getvalue()
