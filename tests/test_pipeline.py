"""The streaming pipeline on real shards with real DataLoader workers (no mocks)."""

from __future__ import annotations

import io
import itertools
import pickle
from collections import Counter
from pathlib import Path

import pytest
import torch
from PIL import Image

from kclip_ds.config import ModelConfig
from kclip_ds.data.pipeline import TrainStream, eval_batches
from kclip_ds.data.shards import AtomicShardWriter, Manifest, write_manifest
from kclip_ds.data.sources import DataError
from kclip_ds.data.transforms import SampleDecoder
from kclip_ds.models.towers import build_towers
from tests.conftest import SMALL_SIZES, train_spec


@pytest.fixture(scope="module")
def decoder() -> SampleDecoder:
    towers = build_towers(ModelConfig(arch="kclip-micro"))
    return SampleDecoder(towers.preprocess_train, towers.tokenizer, towers.image_size, towers.context_length)


def stream(spec: str, decoder: SampleDecoder, rank: int = 0, world: int = 1, batch: int = 16, workers: int = 2,
           **kw) -> TrainStream:
    return TrainStream(spec, decoder, rank=rank, world_size=world, batch_size=batch, num_workers=workers, seed=3, **kw)


def one_epoch(s: TrainStream, start: int = 0):
    return list(itertools.islice(s.batches(start), s.steps_per_epoch - start % s.steps_per_epoch))


def test_exactly_once_over_2_ranks_x_2_workers_with_uneven_shards(demo_data: Path, decoder) -> None:
    spec = train_spec(demo_data)  # 7 shards: 6 × 40 + 10
    per_rank = [one_epoch(stream(spec, decoder, rank=r, world=2, batch=16)) for r in range(2)]
    assert len(per_rank[0]) == len(per_rank[1]) == 8  # ceil(250 / 32)
    keys = Counter(k for batches in per_rank for b in batches for k, v in zip(b.keys, b.valid.tolist()) if v)
    assert sum(keys.values()) == SMALL_SIZES["train"] and max(keys.values()) == 1
    assert all(len(b) == 16 for batches in per_rank for b in batches)
    for batches in per_rank:
        assert [b.step_in_epoch for b in batches] == list(range(8))
    # the next epoch covers everything again, in another order
    nxt = [b for r in range(2) for b in list(itertools.islice(stream(spec, decoder, rank=r, world=2).batches(8), 8))]
    assert {b.epoch for b in nxt} == {1}
    assert Counter(k for b in nxt for k, v in zip(b.keys, b.valid.tolist()) if v) == keys


def test_resume_mid_epoch_continues_the_same_stream(demo_data: Path, decoder) -> None:
    s = stream(train_spec(demo_data), decoder, batch=12, workers=2)
    straight = list(itertools.islice(s.batches(0), s.steps_per_epoch + 3))
    for start in (5, s.steps_per_epoch + 1):
        resumed = list(itertools.islice(s.batches(start), len(straight) - start))
        for a, b in zip(straight[start:], resumed):
            assert a.keys == b.keys and (a.epoch, a.step_in_epoch) == (b.epoch, b.step_in_epoch)
            assert torch.equal(a.images, b.images) and torch.equal(a.texts, b.texts)  # augmentation included


def test_resampled_mode_is_deterministic_and_follows_upsampling(demo_data: Path, decoder) -> None:
    spec = f"{demo_data}/val/000000.tar::{demo_data}/test/000000.tar"
    s = stream(spec, decoder, batch=8, workers=2, resampled=True, upsampling_factors="1::4", epoch_steps=150,
               shuffle_buffer=0)
    first = [b.keys for b in itertools.islice(s.batches(0), 150)]
    assert first == [b.keys for b in itertools.islice(s.batches(0), 150)]
    sources = Counter(k.split("-")[0] for keys in first for k in keys)
    assert sources["test"] > 2 * sources["val"], sources
    assert [b.keys for b in itertools.islice(s.batches(11), 139)] == first[11:]


def test_eval_batches_cover_the_split_once_in_order(demo_data: Path, decoder) -> None:
    spec = f"{demo_data}/val/{{000000..000001}}.tar"
    keys = [k for r in range(2) for b in eval_batches(spec, decoder, rank=r, world_size=2, batch_size=10,
                                                      num_workers=1, name="data.val")
            for k, v in zip(b.keys, b.valid.tolist()) if v]
    assert len(keys) == SMALL_SIZES["val"] == len(set(keys))


def write_shard(directory: Path, samples: list[dict]) -> str:
    directory.mkdir(parents=True, exist_ok=True)
    with AtomicShardWriter(directory / "000000.tar") as writer:
        for sample in samples:
            writer.write(sample)
        info = writer.close()
    write_manifest(directory, Manifest(shards=[info]))
    return str(directory / "000000.tar")


def png(colour: str) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (32, 32), colour).save(buf, format="PNG")
    return buf.getvalue()


class _Exploit:
    def __reduce__(self):
        return (open, ("/tmp/kclip_pickle_was_loaded", "w"))


def test_corrupt_samples_are_named_and_masked_and_pickles_never_loaded(tmp_path: Path, decoder) -> None:
    marker = Path("/tmp/kclip_pickle_was_loaded")
    marker.unlink(missing_ok=True)
    samples = [{"__key__": f"ok{i}", "png": png("red"), "txt": "a red square"} for i in range(5)]
    samples[2] = {"__key__": "broken", "png": b"\x89PNG not really", "txt": "a broken image"}
    samples[3]["pyd"] = pickle.dumps(_Exploit())
    url = write_shard(tmp_path / "bad", samples)
    (batch,) = list(itertools.islice(stream(url, decoder, batch=8, workers=0, shuffle_buffer=0).batches(0), 1))
    assert batch.valid.tolist() == [True, True, False, True, True, False, False, False]
    assert len(batch.corrupt_keys) == 1 and batch.corrupt_keys[0].startswith("broken: undecodable png")
    assert not marker.exists(), "a .pyd member was unpickled"


def test_missing_and_truncated_shards_are_named(tmp_path: Path, demo_data: Path, decoder) -> None:
    with pytest.raises(DataError, match=r"shard not found: .*/train/000007.tar \(from data.train source 1\)"):
        stream(f"{demo_data}/train/{{000000..000099}}.tar", decoder)
    url = write_shard(tmp_path / "trunc", [{"__key__": f"k{i}", "png": png("blue"), "txt": "x"} for i in range(6)])
    data = Path(url).read_bytes()
    Path(url).write_bytes(data[: len(data) // 2])
    with pytest.raises(DataError, match=r"trunc/000000.tar .*(truncated|unreadable)"):
        list(itertools.islice(stream(url, decoder, batch=4, workers=0, shuffle_buffer=0).batches(0), 2))


def test_structure_negatives_ride_along_with_the_batch(demo_data: Path) -> None:
    towers = build_towers(ModelConfig(arch="kclip-micro"))
    decoder = SampleDecoder(towers.preprocess_val, towers.tokenizer, towers.image_size, towers.context_length,
                            negative_kinds=("relation", "attribute"))
    (batch,) = list(itertools.islice(stream(train_spec(demo_data), decoder, batch=16, workers=0).batches(0), 1))
    assert batch.neg_texts.shape == batch.texts.shape and batch.neg_valid.shape == (16,)
    assert batch.neg_valid.sum() >= 12  # every demo caption has a relation or two attributes to swap
    rows = batch.neg_valid.nonzero(as_tuple=True)[0]
    assert not torch.equal(batch.neg_texts[rows], batch.texts[rows])
    assert (batch.neg_texts[~batch.neg_valid] == 0).all()


def test_batch_mix_holds_fixed_rows_and_keeps_the_first_source_stream(demo_data: Path, decoder) -> None:
    """data.mix=batch: every batch is 8 rows of source 1 then 4 of source 2, and source 1's rows are, step for
    step, the rows that source 1 alone gives with 8-row batches (so a run that adds triplets on top of pairs
    sees the same pairs as the pairs-only run); resuming continues the same stream."""
    first, second = train_spec(demo_data), f"{demo_data}/test/000000.tar"
    alone = stream(first, decoder, batch=8, workers=2, resampled=True, epoch_steps=6)
    mixed = stream(f"{first}::{second}", decoder, batch=12, workers=2, resampled=True, upsampling_factors="2::1",
                   epoch_steps=6, mix="batch")
    assert mixed.layout()["batch_rows_source0"] == 8 and mixed.layout()["batch_rows_source1"] == 4
    reference = list(itertools.islice(alone.batches(0), 9))  # crosses an epoch boundary
    batches = list(itertools.islice(mixed.batches(0), 9))
    for ref, batch in zip(reference, batches):
        assert batch.keys[:8] == ref.keys and torch.equal(batch.images[:8], ref.images)
        assert all(k.startswith("test-") for k in batch.keys[8:]), batch.keys
        assert not any(k.startswith("test-") for k in batch.keys[:8])
    assert [b.keys for b in itertools.islice(mixed.batches(4), 5)] == [b.keys for b in batches[4:]]
    with pytest.raises(DataError, match="upsampling_factors='1::2'.*whole"):
        stream(f"{first}::{second}", decoder, batch=8, resampled=True, upsampling_factors="1::2", mix="batch")
