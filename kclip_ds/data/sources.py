"""Shard lists: open_clip's ``a/{000..009}.tar::b/{000..003}.tar`` syntax, sample counts, checks.

Exact epochs need the number of samples in every shard.  It comes from the ``manifest.json``
that kclip_ds's shard tools write beside the shards, else from an open_clip/img2dataset
``sizes.json``, else (slow, logged) from reading the tar itself.
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path

import braceexpand

from kclip_ds.data.shards import count_tar_samples, read_manifest

log = logging.getLogger(__name__)


class DataError(RuntimeError):
    """A user-facing data problem: names the shard/sample and what to do."""


@dataclass(frozen=True)
class Shard:
    url: str
    count: int
    source: int  # index of the '::'-separated source it came from
    weight: float = 1.0  # resampling weight (open_clip's upsampling factor of its source)


def _is_local(url: str) -> bool:
    return "://" not in url and not url.startswith("pipe:")


def expand_sources(spec: str, name: str = "data.train") -> list[list[str]]:
    """Split on '::' and brace-expand each source: 'a/{0..1}.tar::b/x.tar' → [[a/0.tar, a/1.tar], [b/x.tar]]."""
    if not spec:
        raise DataError(f"{name} is empty: give shard paths, e.g. {name}='data/demo/train/{{000000..000011}}.tar'")
    sources = []
    for i, part in enumerate(spec.split("::")):
        urls = list(braceexpand.braceexpand(part.strip()))
        if not urls or not part.strip():
            raise DataError(f"{name}: source {i + 1} ('{part}') expands to no shards")
        sources.append(urls)
    return sources


def _directory_counts(directory: Path) -> dict[str, int] | None:
    manifest = read_manifest(directory)
    if manifest is not None:
        return manifest.counts()
    sizes = directory / "sizes.json"  # open_clip / img2dataset convention
    if sizes.exists():
        try:
            return {str(k): int(v) for k, v in json.loads(sizes.read_text()).items()}
        except (json.JSONDecodeError, ValueError, AttributeError) as exc:
            raise DataError(f"{sizes}: not a {{shard name: count}} mapping ({exc})") from exc
    return None


def resolve_shards(spec: str, name: str = "data.train", weights: str = "") -> list[Shard]:
    """All shards of ``spec`` with their sample counts; missing shards are an error naming them."""
    sources = expand_sources(spec, name)
    factors = [float(w) for w in weights.split("::")] if weights else [1.0] * len(sources)
    if len(factors) != len(sources):
        raise DataError(f"{len(factors)} upsampling factors for {len(sources)} sources in {name}")
    shards: list[Shard] = []
    cache: dict[Path, dict[str, int] | None] = {}
    for source, (urls, factor) in enumerate(zip(sources, factors)):
        for url in urls:
            if not _is_local(url):
                raise DataError(f"{name}: {url} is not a local path; exact epochs need local shards "
                                f"with a manifest.json (remote streaming is not supported yet)")
            path = Path(url)
            if not path.is_file():
                raise DataError(f"shard not found: {url} (from {name} source {source + 1}); "
                                f"check the path or re-create the shards")
            directory = path.parent
            if directory not in cache:
                cache[directory] = _directory_counts(directory)
            counts = cache[directory]
            if counts is not None and path.name in counts:
                count = counts[path.name]
            else:
                log.warning("no manifest entry for %s: counting its samples by reading it", url)
                count = count_tar_samples(path)
            shards.append(Shard(url=os.fspath(path), count=count, source=source, weight=factor))
    return shards
