"""Tests of the synthetic "shapes world" shard generator (kclip_ds.data.demo_world, tools/make_demo_data.py).

Shards are read back with ``tarfile`` (and once with ``webdataset`` without decoders): nothing is unpickled.
"""

from __future__ import annotations

import importlib.util
import io
import json
import tarfile
from collections import defaultdict
from pathlib import Path

import pytest
from PIL import Image

from kclip_ds.data import demo_world
from kclip_ds.data.shards import count_tar_samples, read_manifest, sha256_file

SIZES = {"train": 60, "val": 20, "test": 20, "zeroshot": 40}
SHARD_SIZE = 25
IMAGE_SIZE = 64
REPO_ROOT = Path(__file__).resolve().parents[1]


def generate(out_dir: Path, seed: int = 0, sizes: dict[str, int] = SIZES, shard_size: int = SHARD_SIZE):
    return demo_world.make_demo_data(out_dir, seed=seed, split_sizes=sizes, shard_size=shard_size,
                                     image_size=IMAGE_SIZE)


def read_split(split_dir: Path) -> list[dict[str, bytes]]:
    """All samples of a split, in shard order: ``{"__key__": bytes, "<ext>": bytes, ...}``."""
    samples: dict[str, dict[str, bytes]] = defaultdict(dict)
    for shard in sorted(split_dir.glob("*.tar")):
        with tarfile.open(shard) as tar:
            for member in tar:
                key, ext = member.name.split(".", 1)
                samples[key]["__key__"] = key.encode()
                samples[key][ext] = tar.extractfile(member).read()  # type: ignore[union-attr]
    return list(samples.values())


def centre(bbox: list[int]) -> tuple[float, float]:
    return (bbox[0] + bbox[2]) / 2, (bbox[1] + bbox[3]) / 2


@pytest.fixture(scope="module")
def data_dirs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Three generated datasets: ``a`` and ``b`` with seed 0, ``c`` with seed 1."""
    dirs = {}
    for name, seed in (("a", 0), ("b", 0), ("c", 1)):
        dirs[name] = tmp_path_factory.mktemp(f"demo_{name}")
        generate(dirs[name], seed=seed)
    return dirs


def test_layout(data_dirs: dict[str, Path]) -> None:
    root = data_dirs["a"]
    assert sorted(p.name for p in root.iterdir()) == sorted(SIZES)
    assert sorted(p.name for p in (root / "train").iterdir()) == ["000000.tar", "000001.tar", "000002.tar",
                                                                  "manifest.json"]
    assert sorted(p.name for p in (root / "zeroshot").iterdir()) == ["000000.tar", "000001.tar",
                                                                     "classes.json", "manifest.json"]


def test_same_seed_same_bytes_other_seed_differs(data_dirs: dict[str, Path]) -> None:
    for split in SIZES:
        a, b, c = (read_manifest(data_dirs[name] / split) for name in ("a", "b", "c"))
        assert a is not None and b is not None and c is not None
        assert a.shards == b.shards and a.extra == b.extra
        assert [s.sha256 for s in a.shards] != [s.sha256 for s in c.shards]
        assert a.extra["split"] == split and a.extra["seed"] == 0 and c.extra["seed"] == 1
        assert a.extra["generator"] == "kclip_ds.demo_world/v1"


def test_counts_and_shard_sizes(data_dirs: dict[str, Path]) -> None:
    for split, size in SIZES.items():
        split_dir = data_dirs["a"] / split
        manifest = read_manifest(split_dir)
        assert manifest is not None and manifest.total == size
        counts = [s.count for s in manifest.shards]
        assert [s.name for s in manifest.shards] == [f"{i:06d}.tar" for i in range(len(counts))]
        assert all(c == SHARD_SIZE for c in counts[:-1]) and 0 < counts[-1] <= SHARD_SIZE
        for shard in manifest.shards:
            assert count_tar_samples(split_dir / shard.name) == shard.count
            assert sha256_file(split_dir / shard.name) == shard.sha256
        assert len(read_split(split_dir)) == size


@pytest.mark.parametrize("split", ["train", "val", "test"])
def test_scene_samples(data_dirs: dict[str, Path], split: str) -> None:
    margin = 0.1 * IMAGE_SIZE  # independent of the generator's own margin: relations must be clear
    seen_counts = set()
    for sample in read_split(data_dirs["a"] / split):
        image = Image.open(io.BytesIO(sample["png"]))
        assert image.format == "PNG" and image.mode == "RGB" and image.size == (IMAGE_SIZE, IMAGE_SIZE)
        caption = sample["txt"].decode("utf-8")
        assert caption == caption.lower() and caption.startswith("a ")
        graph = json.loads(sample["sg.json"])
        objects, relations = graph["objects"], graph["relations"]
        assert 2 <= len(objects) <= 3
        seen_counts.add(len(objects))
        names = [f"{o['attributes'][0]} {o['name']}" for o in objects]
        assert len({o["name"] for o in objects}) == len(objects)
        assert len({o["attributes"][0] for o in objects}) == len(objects)
        positions = [caption.find(f" {name}") for name in names]
        assert all(p >= 0 for p in positions) and positions == sorted(positions), (caption, names)
        assert len(relations) == len(objects) - 1
        assert {i for r in relations for i in (r["subject"], r["object"])} == set(range(len(objects)))
        for rel in relations:
            predicate, subject, obj = rel["predicate"], objects[rel["subject"]], objects[rel["object"]]
            assert rel["subject"] != rel["object"] and predicate in demo_world.RELATIONS
            assert f"{names[rel['subject']]} {predicate} " in caption
            assert caption.endswith(names[rel["object"]]) or f"{names[rel['object']]} and " in caption
            (sx, sy), (ox, oy) = centre(subject["bbox"]), centre(obj["bbox"])
            offset = {"to the left of": ox - sx, "to the right of": sx - ox, "above": oy - sy, "below": sy - oy}
            assert offset[predicate] >= margin, (caption, graph)
        for o in objects:
            x0, y0, x1, y1 = o["bbox"]
            assert 0 <= x0 < x1 <= IMAGE_SIZE and 0 <= y0 < y1 <= IMAGE_SIZE
            pixel = image.getpixel(tuple(round(c) for c in centre(o["bbox"])))
            assert pixel == demo_world.COLOURS[o["attributes"][0]], (o, pixel)  # the shape is drawn there
    if split == "train":
        assert seen_counts == {2, 3}


def test_zeroshot_samples(data_dirs: dict[str, Path]) -> None:
    split_dir = data_dirs["a"] / "zeroshot"
    classes = json.loads((split_dir / "classes.json").read_text())
    manifest = read_manifest(split_dir)
    assert manifest is not None
    assert set(classes) == {"classnames", "templates"}
    assert {k: manifest.extra[k] for k in classes} == classes
    assert classes["templates"] == ["a photo of a {}.", "a {}.", "a drawing of a {}.",
                                    "a {} on a plain background."]
    classnames = classes["classnames"]
    assert len(classnames) == len(set(classnames)) == len(demo_world.COLOURS) * len(demo_world.SHAPES)
    for sample in read_split(split_dir):
        cls = int(sample["cls"].decode("ascii"))
        assert 0 <= cls < len(classnames)
        assert sample["txt"].decode("utf-8") == "a " + classnames[cls]
        graph = json.loads(sample["sg.json"])
        assert graph["relations"] == [] and len(graph["objects"]) == 1
        obj = graph["objects"][0]
        assert f"{obj['attributes'][0]} {obj['name']}" == classnames[cls]
        assert Image.open(io.BytesIO(sample["png"])).size == (IMAGE_SIZE, IMAGE_SIZE)


def test_keys_unique_across_splits(data_dirs: dict[str, Path]) -> None:
    keys, images = [], set()
    for split, size in SIZES.items():
        samples = read_split(data_dirs["a"] / split)
        keys += [s["__key__"].decode() for s in samples]
        assert [s["__key__"].decode() for s in samples] == [f"{split}-{i:06d}" for i in range(size)]
        images |= {s["png"] for s in samples}
    assert len(keys) == len(set(keys)) == sum(SIZES.values())
    assert len(images) == len(keys)  # no duplicate image anywhere


def test_webdataset_reads_shards_without_decoders(data_dirs: dict[str, Path]) -> None:
    import webdataset as wds

    url = str(data_dirs["a"] / "train" / "000001.tar")
    samples = list(wds.WebDataset(url, shardshuffle=False))
    assert len(samples) == SHARD_SIZE
    assert {"png", "txt", "sg.json"} <= set(samples[0])
    assert samples[0]["__key__"] == f"train-{SHARD_SIZE:06d}" and isinstance(samples[0]["txt"], bytes)


def test_rerun_skips_and_changed_args_rewrite(tmp_path: Path) -> None:
    sizes = {"train": 12, "zeroshot": 5}
    first = generate(tmp_path, sizes=sizes, shard_size=5)
    assert not any(r.skipped for r in first.values())
    shard = tmp_path / "train" / "000002.tar"
    mtime = shard.stat().st_mtime_ns
    again = generate(tmp_path, sizes=sizes, shard_size=5)
    assert all(r.skipped for r in again.values()) and shard.stat().st_mtime_ns == mtime
    rewritten = demo_world.write_split(tmp_path, "train", 12, shard_size=10)
    assert not rewritten.skipped and [s.count for s in rewritten.manifest.shards] == [10, 2]
    assert sorted(p.name for p in (tmp_path / "train").iterdir()) == ["000000.tar", "000001.tar", "manifest.json"]
    (tmp_path / "train" / "000001.tar").unlink()  # incomplete split → regenerated
    assert not demo_world.write_split(tmp_path, "train", 12, shard_size=10).skipped


def test_cli(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    spec = importlib.util.spec_from_file_location("make_demo_data", REPO_ROOT / "tools" / "make_demo_data.py")
    assert spec is not None and spec.loader is not None
    cli = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(cli)
    argv = ["--out", str(tmp_path), "--seed", "3", "--train-samples", "7", "--val-samples", "2",
            "--test-samples", "2", "--zeroshot-samples", "3", "--shard-size", "4", "--image-size", "48"]
    assert cli.main(argv) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert [line.split(":")[0] for line in lines] == ["train", "val", "test", "zeroshot"]
    manifest = read_manifest(tmp_path / "train")
    assert manifest is not None and manifest.total == 7 and manifest.extra["seed"] == 3
    assert Image.open(io.BytesIO(read_split(tmp_path / "train")[0]["png"])).size == (48, 48)
    assert cli.main(argv) == 0
    assert all("exists, skipped" in line for line in capsys.readouterr().out.strip().splitlines())


def test_relation_holds_and_caption() -> None:
    left, right = (0, 0, 10, 10), (30, 0, 40, 10)
    assert demo_world.relation_holds(left, "to the left of", right, margin=10)
    assert not demo_world.relation_holds(left, "to the right of", right, margin=10)
    assert not demo_world.relation_holds(left, "above", right, margin=1)
    scene = demo_world.Scene(
        objects=(demo_world.SceneObject("circle", "red", left), demo_world.SceneObject("square", "blue", right),
                 demo_world.SceneObject("triangle", "green", (30, 30, 40, 40))),
        relations=(demo_world.Relation(0, "to the left of", 1), demo_world.Relation(2, "below", 1)),
        background=(240, 240, 240),
    )
    assert demo_world.scene_caption(scene) == (
        "a red circle to the left of a blue square and a green triangle below the blue square")
    with pytest.raises(ValueError):
        demo_world.relation_holds(left, "near", right, margin=0)
