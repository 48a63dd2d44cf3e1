"""Streaming webdataset pipelines: exact epochs or resampled, resumable to the batch.

    stream = TrainStream(cfg.data, decoder, rank=r, world_size=w, seed=cfg.train.seed)
    for batch in stream.batches(start=micro_batches_done): ...

Tar reading and sample grouping are webdataset's (``tarfile_samples``); which samples go where
is ``plan.py``; decoding is ``transforms.py``.  Nothing here is random without a derived seed.
"""

from __future__ import annotations

import itertools
import logging
import multiprocessing
import multiprocessing.forkserver
import random
import signal
import tarfile
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Any

import torch
import webdataset as wds
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from kclip_ds.data import plan as planning
from kclip_ds.data.schema import Batch
from kclip_ds.data.sources import DataError, Shard, resolve_shards
from kclip_ds.data.transforms import SampleDecoder

log = logging.getLogger(__name__)
# The trainer's pre-emption signals (kclip_ds.engine.StopSignal); data processes must survive them.
STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1)


@dataclass(frozen=True)
class StreamSpec:
    """Everything that fixes the data stream of one epoch on one rank."""

    shards: tuple[Shard, ...]
    seed: int
    epoch: int
    rank: int
    world_size: int
    batch_size: int
    num_workers: int  # DataLoader workers (0 = in the main process, planned as 1)
    start_step: int  # batches of this epoch already consumed on this rank
    resampled: bool
    steps: int  # steps per epoch (the same on every rank)
    shuffle: bool
    shuffle_buffer: int
    source_rows: tuple[int, ...] | None = None  # data.mix=batch: rows of each source in every batch

    @property
    def streams(self) -> int:
        return max(1, self.num_workers)


def _read_segment(segment: planning.Segment) -> Iterator[dict[str, Any]]:
    """Raw samples of one shard segment; a shard shorter than its manifest says is an error."""
    source = [{"url": segment.url}]
    samples = wds.tariterators.tarfile_samples(source)
    stop = None if segment.take is None else segment.skip + segment.take
    got = segment.skip
    try:
        for sample in itertools.islice(samples, segment.skip, stop):
            got += 1
            yield sample
    except (tarfile.TarError, OSError, ValueError) as exc:
        raise DataError(f"shard {segment.url} is unreadable after {got} samples ({exc.__class__.__name__}: "
                        f"{exc}); re-create it or remove it from the data spec") from exc
    if stop is not None and got < stop:
        raise DataError(f"shard {segment.url} ended after {got} samples but its manifest says at least {stop}; "
                        f"the shard is truncated or the manifest is stale — re-create the shards")


def _by_source(shards: list[Shard]) -> dict[int, list[Shard]]:
    by_source: dict[int, list[Shard]] = {}
    for shard in shards:
        by_source.setdefault(shard.source, []).append(shard)
    return by_source


def _resampled_stream(group: list[Shard], seed: int, epoch: int, rank: int, logical: int) -> Iterator[dict[str, Any]]:
    """Raw samples of whole shards of ``group`` drawn with replacement, endlessly."""
    return itertools.chain.from_iterable(
        _read_segment(seg) for seg in planning.resampled_segments(group, seed, epoch, rank, logical))


def _mixed_sources(shards: list[Shard], seed: int, epoch: int, rank: int, logical: int) -> Iterator[dict[str, Any]]:
    """Resampled mode: an endless stream in which each sample's source ('::'-separated part of the spec) is
    drawn with probability ∝ Σ weight × count of its shards — the share that whole-shard resampling gives
    on average, but mixed sample by sample, so that every batch holds every source (pairs and triplets)."""
    by_source = _by_source(shards)
    streams = [_resampled_stream(group, seed, epoch, rank, logical) for group in by_source.values()]
    if len(streams) == 1:
        yield from streams[0]
        return
    weights = [sum(shard.weight * shard.count for shard in group) for group in by_source.values()]
    rng = random.Random(planning.derive_seed("mix", seed, epoch, rank, logical))
    while True:
        yield next(streams[rng.choices(range(len(streams)), weights=weights)[0]])


def _per_batch_sources(shards: list[Shard], rows: tuple[int, ...], seed: int, epoch: int, rank: int, logical: int,
                       shuffle_seed: int | None, shuffle_buffer: int) -> Iterator[dict[str, Any]]:
    """Resampled mode with ``data.mix=batch``: every batch holds exactly ``rows[k]`` samples of source k, in
    source order.  Each source is a stream of its own (its own shard draws and shuffle buffer), and source 0's
    is exactly the stream that source 0 alone would give (the same seeds): a run that adds sources on top of
    pairs sees the same pair rows at every step as the pairs-only run with ``rows[0]`` rows per batch."""
    by_source = _by_source(shards)
    if len(by_source) != len(rows):
        raise ValueError(f"{len(rows)} row counts for {len(by_source)} sources")
    streams = []
    for k, group in enumerate(by_source.values()):
        stream = _resampled_stream(group, seed, epoch, rank, logical)
        if shuffle_seed is not None:
            source_seed = shuffle_seed if k == 0 else planning.derive_seed("buffer-source", k, shuffle_seed)
            stream = _buffer_shuffle(stream, shuffle_buffer, source_seed)
        streams.append(stream)
    while True:
        for stream, n in zip(streams, rows):
            yield from itertools.islice(stream, n)


def _buffer_shuffle(samples: Iterable[dict[str, Any]], size: int, seed: int) -> Iterator[dict[str, Any]]:
    """Seeded reservoir shuffle over raw (undecoded) samples."""
    rng = random.Random(seed)
    buffer: list[dict[str, Any]] = []
    for sample in samples:
        if len(buffer) < size:
            buffer.append(sample)
            continue
        i = rng.randrange(size)
        buffer[i], sample = sample, buffer[i]
        yield sample
    rng.shuffle(buffer)
    yield from buffer


class ShardStream(IterableDataset):
    """Batches of one rank for one epoch; each DataLoader worker plays one logical stream."""

    def __init__(self, spec: StreamSpec, decoder: SampleDecoder):
        super().__init__()
        self.spec = spec
        self.decoder = decoder

    def _plan(self, logical: int) -> planning.StreamPlan:
        s = self.spec
        if s.resampled:
            return planning.resampled_plan(steps=s.steps, seed=s.seed, epoch=s.epoch, rank=s.rank,
                                           batch_size=s.batch_size, num_workers=s.streams, logical=logical,
                                           shuffle_buffer=s.shuffle_buffer)
        return planning.exact_plan(list(s.shards), seed=s.seed, epoch=s.epoch, rank=s.rank,
                                   world_size=s.world_size, batch_size=s.batch_size, num_workers=s.streams,
                                   logical=logical, shuffle=s.shuffle, shuffle_buffer=s.shuffle_buffer)

    def raw_samples(self, logical: int) -> tuple[planning.StreamPlan, Iterator[dict[str, Any]]]:
        """The plan of a logical stream and its raw samples, in batch order, from the epoch start."""
        s = self.spec
        plan = self._plan(logical)
        if plan.segments is None and s.source_rows is not None:  # shuffled per source, before the batches form
            return plan, _per_batch_sources(list(s.shards), s.source_rows, s.seed, s.epoch, s.rank, logical,
                                            plan.shuffle_seed, s.shuffle_buffer)
        if plan.segments is None:
            samples = _mixed_sources(list(s.shards), s.seed, s.epoch, s.rank, logical)
        else:
            samples = itertools.chain.from_iterable(_read_segment(seg) for seg in plan.segments)
        if plan.shuffle_seed is not None:
            samples = _buffer_shuffle(samples, s.shuffle_buffer, plan.shuffle_seed)
        return plan, samples

    def __iter__(self) -> Iterator[Batch]:
        s = self.spec
        info = get_worker_info()
        physical = info.id if info is not None else 0
        logical = planning.logical_worker(physical, s.start_step, s.streams)
        plan, samples = self.raw_samples(logical)
        done = planning.batches_done(logical, s.start_step, s.streams)
        # Skipping happens on raw bytes: resuming costs reading, not decoding.
        samples = itertools.islice(samples, done * s.batch_size, None)
        for j in range(done, plan.num_batches):
            chunk = list(itertools.islice(samples, s.batch_size))
            step = plan.first_step + j * plan.stride
            seed = planning.derive_seed("augment", s.seed, s.epoch, s.rank, step)
            yield self.decoder.collate(chunk, s.batch_size, s.epoch, step, seed)


def _worker_init(_: int) -> None:
    torch.set_num_threads(1)
    # Pre-emption signals are for the trainer, which checkpoints and then shuts its workers down;
    # Slurm delivers them to every process of the step, and the default action would kill a worker.
    for sig in STOP_SIGNALS:
        signal.signal(sig, signal.SIG_IGN)


def _worker_context() -> multiprocessing.context.BaseContext:
    """Workers come from a forkserver: a clean single-threaded process, so a worker never inherits a lock
    held by one of the trainer's threads (gloo, DataLoader feeders) at fork time.  The server imports
    the pipeline and open_clip (transforms, tokenizer) once; each worker then starts in milliseconds."""
    context = multiprocessing.get_context("forkserver")
    context.set_forkserver_preload(["kclip_ds.data.pipeline", "open_clip"])
    # Slurm signals every process of a job step, and USR1/TERM would kill the forkserver (and the resource
    # tracker it starts) under the trainer's feet.  A blocked signal mask survives fork and exec: start both
    # with the stop signals blocked, then unblock here, where one that arrived meanwhile is delivered.
    previous = signal.pthread_sigmask(signal.SIG_BLOCK, STOP_SIGNALS)
    try:
        multiprocessing.forkserver.ensure_running()
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, previous)
    return context


def make_loader(spec: StreamSpec, decoder: SampleDecoder) -> DataLoader:
    workers = spec.num_workers
    return DataLoader(ShardStream(spec, decoder), batch_size=None, num_workers=workers,
                      worker_init_fn=_worker_init if workers else None, prefetch_factor=4 if workers else None,
                      persistent_workers=False, multiprocessing_context=_worker_context() if workers else None)


class TrainStream:
    """The training split as an endless, resumable sequence of rank batches, epoch after epoch."""

    def __init__(self, spec: str, decoder: SampleDecoder, *, rank: int, world_size: int, batch_size: int,
                 num_workers: int, seed: int, resampled: bool = False, upsampling_factors: str = "",
                 epoch_steps: int = 0, shuffle_buffer: int = 256, mix: str = "sample", name: str = "data.train"):
        """``mix``: how several sources share a resampled stream — "sample" (each sample draws its source,
        weights × shard sizes) or "batch" (each batch holds a fixed number of rows of each source, in
        proportion to the upsampling factors; :func:`kclip_ds.data.plan.batch_rows`)."""
        self.shards = tuple(resolve_shards(spec, name, upsampling_factors))
        self.source_rows: tuple[int, ...] | None = None
        if mix == "batch":
            if not resampled:
                raise DataError(f"{name}: data.mix=batch needs data.resampled=true")
            weights = [float(w) for w in upsampling_factors.split("::")] if upsampling_factors else \
                [1.0] * len(spec.split("::"))
            try:
                self.source_rows = tuple(planning.batch_rows(weights, batch_size))
            except ValueError as exc:
                raise DataError(f"data.mix=batch: data.train_upsampling_factors={upsampling_factors!r}: {exc} "
                                f"(data.batch_size); choose factors whose shares of it are whole numbers") from None
        self.decoder = decoder
        self.rank, self.world_size, self.batch_size = rank, world_size, batch_size
        self.num_workers, self.seed = num_workers, seed
        self.resampled, self.shuffle_buffer = resampled, shuffle_buffer
        layout = planning.exact_layout(list(self.shards), world_size, batch_size)
        self.num_samples = layout.num_samples
        self.steps_per_epoch = epoch_steps if (resampled and epoch_steps) else layout.steps
        if self.steps_per_epoch < max(1, num_workers) and not resampled:
            log.warning("%s: %d steps per epoch but %d data workers: some workers idle",
                        name, self.steps_per_epoch, num_workers)

    def layout(self) -> dict[str, int]:
        """What must match for a saved data position to mean the same stream after resume."""
        return {"world_size": self.world_size, "batch_size": self.batch_size, "num_workers": self.num_workers,
                "seed": self.seed, "num_samples": self.num_samples, "steps_per_epoch": self.steps_per_epoch,
                "resampled": int(self.resampled),
                **{f"batch_rows_source{k}": n for k, n in enumerate(self.source_rows or ())}}

    def epoch_spec(self, epoch: int, start_step: int) -> StreamSpec:
        return StreamSpec(self.shards, self.seed, epoch, self.rank, self.world_size, self.batch_size,
                          self.num_workers, start_step, self.resampled, self.steps_per_epoch, True,
                          self.shuffle_buffer, self.source_rows)

    def batches(self, start: int = 0) -> Iterator[Batch]:
        """Batches from micro-batch ``start`` (counted from the beginning of training) onwards."""
        epoch, step = divmod(start, self.steps_per_epoch)
        while True:
            yield from make_loader(self.epoch_spec(epoch, step), self.decoder)
            epoch, step = epoch + 1, 0


def eval_batches(spec: str, decoder: SampleDecoder, *, rank: int, world_size: int, batch_size: int,
                 num_workers: int, name: str) -> Iterator[Batch]:
    """One pass over an evaluation split in stored order; every rank yields the same number of batches."""
    shards = tuple(resolve_shards(spec, name))
    layout = planning.exact_layout(list(shards), world_size, batch_size)
    stream = StreamSpec(shards, 0, 0, rank, world_size, batch_size, num_workers, 0, False, layout.steps, False, 0)
    yield from make_loader(stream, decoder)
