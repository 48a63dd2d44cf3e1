"""kclip-train's start-up errors: one line that names the key, file, shard or sample (exit code 2)."""

from __future__ import annotations

import io
from pathlib import Path

import pytest
from PIL import Image

from kclip_ds.data.shards import AtomicShardWriter, Manifest, write_manifest
from tests.conftest import python


def train(*overrides: str, config: str = "configs/demo.yaml"):
    return python(["-m", "kclip_ds.train", "--config", config, *overrides])


def one_line_error(proc, *fragments: str) -> None:
    assert proc.returncode == 2, proc.stdout[-3000:] + proc.stderr[-3000:]
    lines = [line for line in proc.stderr.splitlines() if line.startswith("kclip-train: error:")]
    assert len(lines) == 1, proc.stderr[-3000:]
    for fragment in fragments:
        assert fragment in lines[0], lines[0]


def test_unknown_key_wrong_type_and_missing_file() -> None:
    one_line_error(train("train.max_stpes=3"), "unknown config key 'train.max_stpes'")
    one_line_error(train("data.batch_size=many"), "data.batch_size expects int")
    one_line_error(train(config="configs/nope.yaml"), "config file not found: configs/nope.yaml")
    one_line_error(train("deepspeed.config=ds_configs/zero9.json", "data.train=x.tar"),
                   "deepspeed.config: file not found: ds_configs/zero9.json")


def test_missing_shard_is_named(demo_data: Path, tmp_path: Path) -> None:
    one_line_error(train(f"data.train={demo_data}/train/{{000000..000009}}.tar", "model.arch=kclip-micro",
                         f"train.output_dir={tmp_path}/run"),
                   "shard not found:", "train/000007.tar")


def png(ok: bool) -> bytes:
    if not ok:
        return b"\x89PNG\r\n\x1a\n truncated"
    buf = io.BytesIO()
    Image.new("RGB", (32, 32), "green").save(buf, format="PNG")
    return buf.getvalue()


@pytest.fixture()
def corrupt_shard(tmp_path: Path) -> str:
    directory = tmp_path / "shards"
    directory.mkdir()
    with AtomicShardWriter(directory / "000000.tar") as writer:
        for i in range(16):
            bad = i in (1, 5, 6)
            writer.write({"__key__": f"{'broken' if bad else 'ok'}{i:03d}", "png": png(not bad),
                          "txt": "a green square"})
        info = writer.close()
    write_manifest(directory, Manifest(shards=[info]))
    return str(directory / "000000.tar")


def test_corrupt_samples_past_the_limit_stop_the_run_by_name(corrupt_shard: str, tmp_path: Path) -> None:
    common = [f"data.train={corrupt_shard}", "data.val=", "data.zeroshot=", "model.arch=kclip-micro",
              "data.batch_size=8", "data.workers=0", "data.shuffle_buffer=0", "train.progress_bar=false",
              "train.tensorboard=false", "train.save_every=0"]
    one_line_error(train(*common, "data.max_corrupt=1", "train.max_steps=2", f"train.output_dir={tmp_path}/a"),
                   "3 corrupt samples skipped so far, more than data.max_corrupt=1", "broken")
    proc = train(*common, "data.max_corrupt=10", "train.max_steps=2", f"train.output_dir={tmp_path}/b")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "skipped corrupt sample broken001: undecodable png" in proc.stdout + proc.stderr
