"""Writing webdataset shards safely, and the manifest that describes a shard directory.

A shard is written to ``<name>.tmp-<pid>`` and renamed into place only when complete, so a
crash leaves either a finished shard or no shard.  Every shard directory carries a
``manifest.json``::

    {"format": "kclip_ds/shards/v1",
     "shards": [{"name": "000000.tar", "count": 512, "bytes": 1234567, "sha256": "…"}, …],
     "total": 1024, "extra": {…}}

The training pipeline reads per-shard sample counts from it (exact epochs need them).

The shard tools that derive one shard directory from another (scene graphs, teacher features) share the
output-directory contract with :func:`make_shards`: :func:`read_input_manifest` checks the input,
:func:`check_output_dir` refuses an output begun from another input, :func:`claim_output_dir` records the
run's identity in a state file (until the manifest records it) and drops the temp files a killed run left.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import sys
import tarfile
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import webdataset as wds

MANIFEST_NAME = "manifest.json"
MANIFEST_FORMAT = "kclip_ds/shards/v1"


class ShardError(Exception):
    """A user error (bad input, bad flags, mismatched output directory): shown without a traceback."""


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


def read_input_manifest(source: Path, out: Path) -> Manifest:
    """The manifest of the input shard directory ``source``, whose shards must all be there at the recorded
    size; refuses ``out`` == ``source`` (the input is never modified)."""
    try:
        manifest = read_manifest(source) if source.is_dir() else None
    except ValueError as exc:
        raise ShardError(str(exc)) from exc
    if manifest is None:
        raise ShardError(f"{source}: no manifest.json; point --input at a shard directory written by "
                         "tools/make_shards.py or tools/make_demo_data.py")
    if out.resolve() == source.resolve():
        raise ShardError(f"--out {out} is the input directory; pick another (the input is never modified)")
    broken = [s.name for s in manifest.shards
              if not (source / s.name).is_file() or (source / s.name).stat().st_size != s.bytes]
    if broken:
        raise ShardError(f"{source}: {', '.join(broken)} missing, or not the size its manifest.json records; "
                         "rebuild the input shards")
    return manifest


def _recorded_identity(out: Path, state_name: str, tool: str) -> dict[str, Any] | None:
    """What an earlier run recorded in ``out``: its manifest's ``extra``, else its ``state_name`` file ({} when
    unreadable); None for a new or empty directory.  Refuses .tar files that neither describes."""
    try:
        manifest = read_manifest(out)
    except ValueError as exc:
        raise ShardError(str(exc)) from exc
    state = out / state_name
    if manifest is not None:
        previous = manifest.extra
    elif state.is_file():
        try:
            previous = json.loads(state.read_text())
        except json.JSONDecodeError:
            previous = {}
    elif any(out.glob("*.tar")):
        raise ShardError(f"{out} holds .tar files not written by {tool}; pick a new --out or delete it")
    else:
        return None
    return previous if isinstance(previous, dict) else {}


def check_output_dir(out: Path, state_name: str, identity: dict[str, Any], mismatch: str, *,
                     tool: str = "this tool",
                     compared: Callable[[dict[str, Any]], dict[str, Any]] | None = None) -> None:
    """Refuse ``out`` when an earlier run there recorded another identity, or when it holds .tar files of
    another tool.  ``compared`` picks what must match from an identity (default: the keys of ``identity``);
    ``mismatch`` says what differs, e.g. "was made from another source or teacher"."""
    previous = _recorded_identity(out, state_name, tool)
    if previous is None:
        return
    pick = compared or (lambda record: {k: record.get(k) for k in identity})
    was, now = pick(previous), pick(identity)
    changed = [k for k in now if was.get(k) != now[k]]
    if changed:
        raise ShardError(f"{out} {mismatch} (changed: {', '.join(changed)}); pick a new --out or delete it")


def claim_output_dir(out: Path, state_name: str, identity: dict[str, Any]) -> None:
    """Record ``identity`` in ``out/state_name`` before the first shard (so that no shard is ever unclaimed;
    the manifest takes over once written) and drop the temp files a killed run left."""
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out / state_name, json.dumps(identity) + "\n")
    for stale in out.glob(".*.tmp-*"):
        stale.unlink(missing_ok=True)


def run_shard_tool(prog: str, work: Callable[[], object], *, user_errors: tuple[type[Exception], ...] = ()) -> int:
    """The exit code of a shard tool (tools/*.py) that runs ``work()``: 0 when it returns; 2 after a one-line
    ``PROG: error: …`` on a :class:`ShardError`, an ``OSError`` or one of ``user_errors``; 130 on Ctrl-C."""
    try:
        work()
    except (ShardError, OSError, *user_errors) as exc:
        message = str(exc).replace("\n", " ")
        print(f"{prog}: error: {message}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"{prog}: interrupted; rerun to finish the missing shards", file=sys.stderr)
        return 130
    return 0


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
