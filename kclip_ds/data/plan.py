"""Which samples each (rank, data worker) reads, and in which batch — pure arithmetic, no I/O.

Exact epochs.  Shards are put in a per-epoch order (the same on every rank).  With N samples,
W ranks and B rows per rank-batch, every rank takes S = ceil(N / (W·B)) steps.  Rank r owns
K "logical workers"; logical worker l makes the rank's batches t ≡ l (mod K) and reads one
contiguous run of the epoch's sample sequence, so a rank touches few shards and every sample
lands in exactly one row of one batch.  Rows left over at the end are padding (valid=False).

Resume.  The data position is a count of batches already consumed in the epoch (s).  A fresh
DataLoader hands out batches round-robin from physical worker 0, so physical worker w plays
logical worker (s + w) mod K and skips the batches that logical worker already made.  That
reproduces the uninterrupted stream exactly, including across a change of process.

Resampled mode draws shards with replacement (weights = open_clip upsampling factors) from a
stream seeded per (seed, epoch, rank, logical worker); an epoch is a fixed number of steps.
"""

from __future__ import annotations

import hashlib
import math
import random
from collections.abc import Iterator
from dataclasses import dataclass

from kclip_ds.data.sources import Shard


def derive_seed(*parts: object) -> int:
    """A 63-bit seed from any parts (stable across processes, unlike ``hash``)."""
    digest = hashlib.sha256("/".join(str(p) for p in parts).encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1


@dataclass(frozen=True)
class Segment:
    """Read samples [skip, skip + take) of one shard (take=None: to the end)."""

    url: str
    skip: int
    take: int | None


@dataclass(frozen=True)
class StreamPlan:
    """What one logical worker reads in one epoch, and which batches it makes."""

    segments: tuple[Segment, ...] | None  # None: resampled (infinite) stream
    num_samples: int  # exact: real samples in this unit; resampled: batches * B
    num_batches: int  # batches this logical worker makes in the epoch
    first_step: int  # rank-level step of its first batch (== its logical index)
    stride: int  # K: its batches are first_step, first_step + K, …
    shuffle_seed: int | None  # None: keep the stored order


@dataclass(frozen=True)
class EpochLayout:
    num_samples: int  # N
    steps: int  # S, the same on every rank


def epoch_order(shards: list[Shard], seed: int, epoch: int, shuffle: bool) -> list[Shard]:
    order = list(shards)
    if shuffle:
        random.Random(derive_seed("shard-order", seed, epoch)).shuffle(order)
    return order


def exact_layout(shards: list[Shard], world_size: int, batch_size: int) -> EpochLayout:
    total = sum(s.count for s in shards)
    if total == 0:
        raise ValueError("the shards hold no samples")
    return EpochLayout(num_samples=total, steps=math.ceil(total / (world_size * batch_size)))


def _split_counts(total: int, capacities: list[int]) -> list[int]:
    """Share ``total`` samples over units in proportion to their capacities (each count <= capacity)."""
    cap_sum = sum(capacities)
    counts = [total * c // cap_sum for c in capacities]
    remainder = total - sum(counts)
    for i, cap in enumerate(capacities):
        if remainder == 0:
            break
        if counts[i] < cap:
            counts[i] += 1
            remainder -= 1
    assert remainder == 0 and all(n <= c for n, c in zip(counts, capacities)), "sample split overflowed"
    return counts


def _segments(order: list[Shard], start: int, length: int) -> tuple[Segment, ...]:
    """Segments covering samples [start, start + length) of the concatenated shard order."""
    segments, offset = [], 0
    for shard in order:
        lo, hi = max(start, offset), min(start + length, offset + shard.count)
        if lo < hi:
            segments.append(Segment(shard.url, lo - offset, hi - lo))
        offset += shard.count
    return tuple(segments)


def batches_of(logical: int, steps: int, num_workers: int) -> int:
    return len(range(logical, steps, num_workers))


def exact_plan(
    shards: list[Shard], *, seed: int, epoch: int, rank: int, world_size: int, batch_size: int,
    num_workers: int, logical: int, shuffle: bool, shuffle_buffer: int,
) -> StreamPlan:
    """The plan of logical worker ``logical`` on ``rank`` for one exact epoch."""
    layout = exact_layout(shards, world_size, batch_size)
    capacities = [batches_of(lw, layout.steps, num_workers) * batch_size
                  for _ in range(world_size) for lw in range(num_workers)]
    counts = _split_counts(layout.num_samples, capacities)
    unit = rank * num_workers + logical
    start = sum(counts[:unit])
    order = epoch_order(shards, seed, epoch, shuffle)
    use_shuffle = shuffle and shuffle_buffer > 0
    return StreamPlan(
        segments=_segments(order, start, counts[unit]),
        num_samples=counts[unit],
        num_batches=batches_of(logical, layout.steps, num_workers),
        first_step=logical,
        stride=num_workers,
        shuffle_seed=derive_seed("buffer", seed, epoch, rank, logical) if use_shuffle else None,
    )


def resampled_plan(*, steps: int, seed: int, epoch: int, rank: int, batch_size: int, num_workers: int,
                   logical: int, shuffle_buffer: int) -> StreamPlan:
    n_batches = batches_of(logical, steps, num_workers)
    return StreamPlan(
        segments=None,
        num_samples=n_batches * batch_size,
        num_batches=n_batches,
        first_step=logical,
        stride=num_workers,
        shuffle_seed=derive_seed("buffer", seed, epoch, rank, logical) if shuffle_buffer > 0 else None,
    )


def resampled_segments(shards: list[Shard], seed: int, epoch: int, rank: int, logical: int) -> Iterator[Segment]:
    """An endless stream of whole shards drawn with replacement, weighted by upsampling factor."""
    rng = random.Random(derive_seed("resample", seed, epoch, rank, logical))
    weights = [s.weight for s in shards]
    while True:
        (shard,) = rng.choices(shards, weights=weights, k=1)
        yield Segment(shard.url, 0, None)


def batch_rows(weights: list[float], batch_size: int) -> list[int]:
    """Rows per source in every batch under ``data.mix=batch``: ``batch_size × w_k / Σ w``, each a whole number
    (``1::1`` with 128 rows gives 64 + 64).  Raises ValueError when a share is not whole or is 0."""
    total = sum(weights)
    rows = [batch_size * w / total for w in weights] if total > 0 else []
    if not rows or any(r < 1 or abs(r - round(r)) > 1e-9 for r in rows):
        raise ValueError(f"weights {'::'.join(f'{w:g}' for w in weights)} do not split a batch of {batch_size} "
                         f"rows into whole, non-zero shares")
    return [round(r) for r in rows]


def logical_worker(physical: int, start_step: int, num_workers: int) -> int:
    """Which logical worker physical DataLoader worker ``physical`` plays when resuming at ``start_step``."""
    return (start_step + physical) % num_workers


def batches_done(logical: int, start_step: int, num_workers: int) -> int:
    """Batches logical worker ``logical`` made before rank step ``start_step``."""
    return len(range(logical, start_step, num_workers))
