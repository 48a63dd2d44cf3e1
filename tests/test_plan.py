"""Exact-epoch planning: every sample in exactly one batch row, equal steps on every rank, exact resume."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from kclip_ds.data import plan
from kclip_ds.data.sources import Shard


def shards_of(counts: list[int]) -> list[Shard]:
    return [Shard(url=f"s{i}.tar", count=c, source=0) for i, c in enumerate(counts)]


@settings(max_examples=200, deadline=None)
@given(counts=st.lists(st.integers(0, 60), min_size=1, max_size=9).filter(lambda c: sum(c) > 0),
       world=st.integers(1, 4), batch=st.integers(1, 16), workers=st.integers(1, 4), epoch=st.integers(0, 3))
def test_exactly_once_and_equal_steps(counts, world, batch, workers, epoch) -> None:
    shards = shards_of(counts)
    layout = plan.exact_layout(shards, world, batch)
    seen: list[tuple[str, int]] = []
    for rank in range(world):
        steps = 0
        for logical in range(workers):
            p = plan.exact_plan(shards, seed=7, epoch=epoch, rank=rank, world_size=world, batch_size=batch,
                                num_workers=workers, logical=logical, shuffle=True, shuffle_buffer=8)
            assert p.num_samples <= p.num_batches * batch, "more samples than batch rows"
            assert sum(seg.take for seg in p.segments) == p.num_samples
            for seg in p.segments:
                seen += [(seg.url, seg.skip + i) for i in range(seg.take)]
            steps += p.num_batches
        assert steps == layout.steps, f"rank {rank} takes {steps} steps, not {layout.steps}"
    everything = [(s.url, i) for s in shards for i in range(s.count)]
    assert sorted(seen) == sorted(everything), "a sample is missing or repeated"


@given(steps=st.integers(1, 40), workers=st.integers(1, 5), start=st.integers(0, 40))
def test_resume_rotation_reproduces_the_batch_order(steps, workers, start) -> None:
    start = min(start, steps)
    # What each physical DataLoader worker makes after a restart at `start`…
    queues = []
    for physical in range(workers):
        logical = plan.logical_worker(physical, start, workers)
        done = plan.batches_done(logical, start, workers)
        queues.append([logical + j * workers for j in range(done, plan.batches_of(logical, steps, workers))])
    # …merged the way torch's DataLoader does (round-robin, skipping exhausted workers).
    merged, i = [], 0
    while any(queues):
        if queues[i % workers]:
            merged.append(queues[i % workers].pop(0))
        i += 1
    assert merged == list(range(start, steps))


def test_shard_order_is_shared_by_ranks_and_changes_by_epoch() -> None:
    shards = shards_of([5] * 12)
    a = [s.url for s in plan.epoch_order(shards, seed=1, epoch=0, shuffle=True)]
    assert a == [s.url for s in plan.epoch_order(shards, seed=1, epoch=0, shuffle=True)]
    assert a != [s.url for s in plan.epoch_order(shards, seed=1, epoch=1, shuffle=True)]
    assert [s.url for s in plan.epoch_order(shards, seed=1, epoch=0, shuffle=False)] == [s.url for s in shards]
