"""tools/make_shards.py and kclip_ds.data.make_shards: image folder + captions -> webdataset shards."""

from __future__ import annotations

import csv
import importlib.util
import io
import json
import os
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest
import webdataset as wds
from PIL import Image

from kclip_ds.data.make_shards import ShardError, make_shards
from kclip_ds.data.shards import read_manifest, sha256_file

ROOT = Path(__file__).resolve().parents[1]
N_ROWS = 20


def _image_bytes(i: int, fmt: str) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (8 + i % 3, 8), (i * 12 % 256, 40, 200 - i)).save(buf, format=fmt)
    return buf.getvalue()


@pytest.fixture
def dataset(tmp_path: Path) -> dict:
    """20 images (png / jpg / jpeg, one in a subfolder) and their captions."""
    images = tmp_path / "images"
    (images / "sub").mkdir(parents=True)
    paths, captions, data = [], [], []
    for i in range(N_ROWS):
        name = ["img{:02d}.png", "img{:02d}.jpg", "sub/img{:02d}.jpeg"][i % 3].format(i)
        blob = _image_bytes(i, "PNG" if name.endswith(".png") else "JPEG")
        (images / name).write_bytes(blob)
        paths.append(name)
        captions.append(f"  a photo, number \"{i}\"\t" if i == 4 else f"a photo number {i} ")
        data.append(blob)
    return {"root": tmp_path, "images": images, "paths": paths, "captions": captions, "data": data}


def _write_table(path: Path, paths: list[str], captions: list[str], delimiter: str = ",",
                 header: tuple[str, str] = ("filepath", "title")) -> Path:
    with open(path, "w", newline="") as f:
        writer = csv.writer(f, delimiter=delimiter)
        writer.writerow(header)
        writer.writerows(zip(paths, captions, strict=True))
    return path


def _write_captions(ds: dict, fmt: str) -> Path:
    root, paths, captions = ds["root"], ds["paths"], ds["captions"]
    if fmt in ("csv", "tsv"):
        return _write_table(root / f"captions.{fmt}", paths, captions, "," if fmt == "csv" else "\t")
    if fmt == "jsonl":
        path = root / "captions.jsonl"
        lines = [json.dumps({"image": p, "caption": c}) for p, c in zip(paths, captions, strict=True)]
        path.write_text("\n".join(lines) + "\n")
        return path
    doc = {"images": [{"id": 100 + i, "file_name": p} for i, p in enumerate(paths)],
           "annotations": [{"id": 5000 + i, "image_id": 100 + i, "caption": c}
                           for i, c in enumerate(captions)]}
    path = root / "captions.json"
    path.write_text(json.dumps(doc))
    return path


def _read_shards(out: Path) -> dict[str, dict[str, bytes]]:
    samples: dict[str, dict[str, bytes]] = {}
    for shard in sorted(out.glob("*.tar")):
        with tarfile.open(shard) as tar:
            for member in tar.getmembers():
                key, ext = member.name.split(".", 1)
                samples.setdefault(key, {})[ext] = tar.extractfile(member).read()
    return samples


def _errors(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "errors.jsonl").read_text().splitlines()]


def _all_files(out: Path) -> list[str]:
    return sorted(os.listdir(out))


@pytest.mark.parametrize("fmt", ["csv", "tsv", "jsonl", "coco"])
def test_each_format_writes_shards_and_manifest(dataset, fmt):
    captions = _write_captions(dataset, fmt)
    out = dataset["root"] / "out"
    result = make_shards(dataset["images"], captions, out, shard_size=8, log=lambda _: None)

    manifest = read_manifest(out)
    assert [s.name for s in manifest.shards] == ["000000.tar", "000001.tar", "000002.tar"]
    assert [s.count for s in manifest.shards] == [8, 8, 4] and manifest.total == N_ROWS
    for shard in manifest.shards:
        assert shard.bytes == (out / shard.name).stat().st_size
        assert shard.sha256 == sha256_file(out / shard.name)
    assert manifest.extra["format"] == fmt and manifest.extra["shard_size"] == 8
    assert manifest.extra["source_sha256"] == sha256_file(captions)
    assert manifest.extra["source"] == str(captions.resolve()) and manifest.extra["skipped"] == {}
    assert result.errors == [] and (out / "errors.jsonl").read_text() == ""
    assert _all_files(out) == ["000000.tar", "000001.tar", "000002.tar", "errors.jsonl", "manifest.json"]

    samples = _read_shards(out)
    assert len(samples) == N_ROWS
    rows = zip(dataset["paths"], dataset["captions"], dataset["data"], strict=True)
    for i, (path, caption, blob) in enumerate(rows):
        key = f"{100 + i}_{5000 + i}" if fmt == "coco" else f"{i:09d}"
        ext = "png" if path.endswith(".png") else "jpg"
        assert set(samples[key]) == {"txt", ext, "json"}
        assert samples[key]["txt"].decode() == caption.strip()
        assert samples[key][ext] == blob
        meta = json.loads(samples[key]["json"])
        assert meta["source"] == path and meta["row"] == i


def test_webdataset_reads_raw_samples(dataset):
    out = dataset["root"] / "out"
    make_shards(dataset["images"], _write_captions(dataset, "csv"), out, shard_size=6, log=lambda _: None)
    urls = [str(p) for p in sorted(out.glob("*.tar"))]
    samples = list(wds.WebDataset(urls, shardshuffle=False))  # no .decode(): raw bytes only
    assert [s["__key__"] for s in samples] == [f"{i:09d}" for i in range(N_ROWS)]
    assert [s["txt"].decode() for s in samples] == [c.strip() for c in dataset["captions"]]
    assert samples[1]["jpg"] == dataset["data"][1] and samples[0]["png"] == dataset["data"][0]


def _with_bad_samples(ds: dict) -> Path:
    """Row 3: missing image, row 7: garbage bytes, row 11: empty caption, row 15: truncated JPEG."""
    images, paths, captions = ds["images"], list(ds["paths"]), list(ds["captions"])
    paths[3] = "nope.png"
    (images / "garbage.png").write_bytes(b"this is not an image")
    paths[7] = "garbage.png"
    captions[11] = "   "
    (images / "cut.jpg").write_bytes(_image_bytes(15, "JPEG")[:200])
    paths[15] = "cut.jpg"
    paths[0] = str(images / paths[0])  # absolute paths are allowed
    return _write_table(ds["root"] / "captions.csv", paths, captions)


def test_bad_samples_are_skipped_and_listed(dataset, capsys):
    out = dataset["root"] / "out"
    make_shards(dataset["images"], _with_bad_samples(dataset), out, shard_size=5)

    errors = _errors(out)
    assert [(e["key"], e["row"], e["reason"]) for e in errors] == [
        ("000000003", 3, "missing_image"), ("000000007", 7, "corrupt_image"),
        ("000000011", 11, "bad_row"), ("000000015", 15, "corrupt_image")]
    assert "nope.png" in errors[0]["detail"] and errors[2]["detail"] == "empty caption"
    manifest = read_manifest(out)
    assert [s.count for s in manifest.shards] == [4, 4, 4, 4] and manifest.total == N_ROWS - 4
    assert manifest.extra["skipped"] == {"bad_row": 1, "corrupt_image": 2, "missing_image": 1}
    assert set(_read_shards(out)) == {f"{i:09d}" for i in range(N_ROWS)} - {
        "000000003", "000000007", "000000011", "000000015"}
    assert "skipped 4 samples: bad_row=1 corrupt_image=2 missing_image=1" in capsys.readouterr().out


def test_strict_fails_on_first_bad_sample_without_leftovers(dataset):
    paths = list(dataset["paths"])
    (dataset["images"] / "garbage.png").write_bytes(b"this is not an image")
    paths[7] = "garbage.png"
    captions = _write_table(dataset["root"] / "captions.csv", paths, dataset["captions"])
    out = dataset["root"] / "out"
    with pytest.raises(ShardError, match=r"captions\.csv: row 7 \(key 000000007\): corrupt_image"):
        make_shards(dataset["images"], captions, out, shard_size=5, strict=True, log=lambda _: None)
    assert _all_files(out) == [".make_shards.json", "000000.tar"]  # no temp file, no partial 000001.tar


def test_strict_rejects_bad_rows_before_writing(dataset):
    out = dataset["root"] / "out"
    with pytest.raises(ShardError, match=r"row 11 \(key 000000011\): bad_row: empty caption"):
        make_shards(dataset["images"], _with_bad_samples(dataset), out, strict=True, log=lambda _: None)
    assert not out.exists()


def test_rerun_rewrites_only_missing_shards(dataset, capsys):
    out = dataset["root"] / "out"
    captions = _with_bad_samples(dataset)
    make_shards(dataset["images"], captions, out, shard_size=5)
    manifest_text, errors_text = (out / "manifest.json").read_text(), (out / "errors.jsonl").read_text()
    old = 1_000_000_000
    for shard in out.glob("*.tar"):
        os.utime(shard, (old, old))
    (out / "000002.tar").unlink()
    capsys.readouterr()

    make_shards(dataset["images"], captions, out, shard_size=5)
    assert "shards: 1 written, 3 skipped (already complete)" in capsys.readouterr().out
    mtimes = {p.name: p.stat().st_mtime for p in out.glob("*.tar")}
    assert mtimes.pop("000002.tar") > old and set(mtimes.values()) == {old}
    assert (out / "manifest.json").read_text() == manifest_text
    assert (out / "errors.jsonl").read_text() == errors_text


def test_workers_give_the_same_shards(dataset):
    captions = _write_captions(dataset, "jsonl")
    one = make_shards(dataset["images"], captions, dataset["root"] / "one", shard_size=7, log=lambda _: None)
    two = make_shards(dataset["images"], captions, dataset["root"] / "two", shard_size=7, workers=2,
                      log=lambda _: None)
    assert two.manifest.shards == one.manifest.shards and len(two.manifest.shards) == 3


def test_jsonl_and_coco_bad_rows(dataset):
    root = dataset["root"]
    lines = ['{"image": "img00.png", "caption": "ok"}', "{not json", '{"image": "img00.png"}', "",
             '["a", "b"]', '{"image": "img00.png", "caption": 3}']
    (root / "c.jsonl").write_text("\n".join(lines) + "\n")
    result = make_shards(root / "images", root / "c.jsonl", root / "out1", log=lambda _: None)
    assert [(e["row"], e["reason"]) for e in result.errors] == [(r, "bad_row") for r in (1, 2, 3, 4)]
    assert "malformed JSON" in result.errors[0]["detail"] and "'caption'" in result.errors[1]["detail"]

    doc = {"images": [{"id": 1, "file_name": "img00.png"}],
           "annotations": [{"id": 7, "image_id": 1, "caption": "x"}, {"id": 7, "image_id": 1, "caption": "y"},
                           {"id": 8, "image_id": 2, "caption": "z"}]}
    (root / "c.json").write_text(json.dumps(doc))
    result = make_shards(root / "images", root / "c.json", root / "out2", log=lambda _: None)
    assert result.manifest.total == 1 and list(_read_shards(root / "out2")) == ["1_7"]
    assert [(e["key"], e["detail"]) for e in result.errors] == [
        ("1_7", "duplicate key '1_7'"), ("2_8", "image_id 2 is not in 'images'")]


def test_user_errors(dataset):
    root, images = dataset["root"], dataset["images"]
    table = _write_table(root / "c.csv", dataset["paths"], dataset["captions"], header=("path", "caption"))
    with pytest.raises(ShardError, match=r"no column 'filepath', 'title'; available columns: path, caption; "
                                         r"set --image-key / --caption-key"):
        make_shards(images, table, root / "out", log=lambda _: None)
    make_shards(images, table, root / "out", image_key="path", caption_key="caption", log=lambda _: None)

    with table.open("a") as f:
        f.write("img00.png,one more\n")
    with pytest.raises(ShardError, match=r"different input .*source_sha256.*pick a new --out or delete it"):
        make_shards(images, table, root / "out", image_key="path", caption_key="caption", log=lambda _: None)
    with pytest.raises(ShardError, match=r"captions file not found: .*missing\.csv"):
        make_shards(images, root / "missing.csv", root / "out2", log=lambda _: None)
    with pytest.raises(ShardError, match=r"image directory not found: .*no_images"):
        make_shards(root / "no_images", table, root / "out2", log=lambda _: None)
    with pytest.raises(ShardError, match="cannot guess the format"):
        make_shards(images, Path(__file__), root / "out2", log=lambda _: None)


def _load_cli():
    spec = importlib.util.spec_from_file_location("make_shards_cli", ROOT / "tools" / "make_shards.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_cli_in_process(dataset, capsys):
    cli, root = _load_cli(), dataset["root"]
    captions = _write_captions(dataset, "csv")
    common = ["--images", str(dataset["images"]), "--captions", str(captions)]
    assert cli.main([*common, "--out", str(root / "o"), "--shard-size", "10"]) == 0
    assert read_manifest(root / "o").total == N_ROWS
    capsys.readouterr()
    assert cli.main([*common, "--out", str(root / "p"), "--image-key", "image"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("make_shards: error: ") and err.count("\n") == 1 and "--image-key" in err


def test_cli_subprocess_missing_captions(tmp_path):
    proc = subprocess.run(
        [sys.executable, "tools/make_shards.py", "--images", str(tmp_path), "--captions",
         str(tmp_path / "nope.csv"), "--out", str(tmp_path / "out")],
        check=False, cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert proc.stderr == f"make_shards: error: captions file not found: {tmp_path / 'nope.csv'}\n"
