"""kclip_ds.knowledge.teacher and tools/precompute_teacher.py: teacher features precomputed into the shards."""

from __future__ import annotations

import io
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from kclip_ds.config import ModelConfig
from kclip_ds.data.demo_world import make_sample
from kclip_ds.data.make_shards import ShardError
from kclip_ds.data.shards import AtomicShardWriter, Manifest, read_manifest, sha256_file, write_manifest
from kclip_ds.knowledge.scene_graph import _read_samples
from kclip_ds.knowledge.teacher import (
    STATE_NAME,
    TEACHER_MEMBER,
    decode_teacher_member,
    encode_teacher_member,
    precompute_teacher,
    teacher_spec,
)
from kclip_ds.models.towers import build_towers

ROOT = Path(__file__).resolve().parents[1]
ARCH = "kclip-tiny"
OPAQUE = b"\x80\x04opaque bytes, copied as they are"


def _quiet(_: str) -> None:
    pass


@pytest.fixture(scope="module")
def weights(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Two random-init kclip-tiny teachers saved as local open_clip weights files."""
    root = tmp_path_factory.mktemp("weights")
    files = {}
    for name, seed in (("a", 1), ("b", 2)):
        torch.manual_seed(seed)
        files[name] = root / f"teacher_{name}.pt"
        torch.save(build_towers(ModelConfig(arch=ARCH)).model.state_dict(), files[name])
    return files


def _write_source(root: Path, drop: str | None = None) -> Path:
    """Two shards of demo samples (3 + 2), each with an opaque extra member; ``drop``: a member the last lacks."""
    root.mkdir()
    manifest = Manifest()
    for shard, indices in enumerate((range(3), range(3, 5))):
        with AtomicShardWriter(root / f"{shard:06d}.tar") as writer:
            for i in indices:
                sample = {**make_sample(0, "val", i, 32), "extra.bin": OPAQUE}
                writer.write({k: v for k, v in sample.items() if not (i == 4 and k == drop)})
            manifest.shards.append(writer.close())
    write_manifest(root, manifest)
    return root


@pytest.fixture(scope="module")
def source(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _write_source(tmp_path_factory.mktemp("source") / "in")


def _samples(path: Path) -> dict[str, dict[str, bytes]]:
    return dict(_read_samples(path))


def test_features_are_the_teachers_and_members_are_unchanged(weights, source, tmp_path):
    out = tmp_path / "out"
    extra = precompute_teacher(source, out, arch=ARCH, pretrained=str(weights["a"]), batch_size=2, log=_quiet)
    towers = build_towers(ModelConfig(arch=ARCH, pretrained=str(weights["a"])))
    model = towers.model.eval()
    dim = model.visual.output_dim
    spec = teacher_spec(out)
    assert spec == extra["teacher"] and spec["arch"] == ARCH and spec["dim"] == dim and spec["dtype"] == "float16"
    assert spec["pretrained"] == str(weights["a"].resolve()) and spec["pretrained_sha256"] == sha256_file(weights["a"])
    assert spec["logit_scale"] == pytest.approx(float(model.logit_scale.detach().exp()))
    assert extra["source_manifest_sha256"] == sha256_file(source / "manifest.json")
    assert teacher_spec(source) is None
    assert read_manifest(out).counts() == read_manifest(source).counts() == {"000000.tar": 3, "000001.tar": 2}
    assert not (out / STATE_NAME).exists() and not list(out.glob(".*.tmp-*"))
    for name in ("000000.tar", "000001.tar"):
        before, after = _samples(source / name), _samples(out / name)
        assert list(after) == list(before)  # same samples, same order
        for key, members in after.items():
            assert {k: v for k, v in members.items() if k != TEACHER_MEMBER} == before[key]  # byte-identical
            features = decode_teacher_member(members[TEACHER_MEMBER], key, dim=dim)
            assert features.shape == (2, dim) and features.dtype == torch.float32
            torch.testing.assert_close(features.norm(dim=-1), torch.ones(2), atol=2e-3, rtol=0)
            with torch.no_grad(), Image.open(io.BytesIO(members["png"])) as img:
                image = model.encode_image(towers.preprocess_val(img.convert("RGB"))[None], normalize=True)[0]
                text = model.encode_text(towers.tokenizer([members["txt"].decode().strip()]), normalize=True)[0]
            torch.testing.assert_close(features, torch.stack([image, text]), atol=2e-3, rtol=0)


def test_rerun_is_a_no_op_and_a_killed_run_resumes(weights, source, tmp_path, kill_after_first_shard):
    out, logs = tmp_path / "out", []
    precompute_teacher(source, out, arch=ARCH, pretrained=str(weights["a"]), log=_quiet)
    first = {p.name: p.read_bytes() for p in out.iterdir()}
    mtimes = {p.name: p.stat().st_mtime_ns for p in out.glob("*.tar")}
    precompute_teacher(source, out, arch=ARCH, pretrained=str(weights["a"]), log=logs.append)
    assert "0 written, 2 reused" in logs[-1]
    assert {p.name: p.stat().st_mtime_ns for p in out.glob("*.tar")} == mtimes

    # Killed after shard 0, with shard 1 half-written (only its temp file exists) and no manifest yet.
    killed = tmp_path / "killed"
    kill_after_first_shard(lambda log: precompute_teacher(source, killed, arch=ARCH, pretrained=str(weights["a"]),
                                                          log=log), killed, first["000001.tar"][:1000])
    logs.clear()
    precompute_teacher(source, killed, arch=ARCH, pretrained=str(weights["a"]), log=logs.append)
    assert "1 written, 1 reused" in logs[-1]
    assert {p.name: p.read_bytes() for p in killed.iterdir()} == first  # byte-identical, nothing left over

    # A deleted output shard is written again, the same bytes.
    (out / "000000.tar").unlink()
    logs.clear()
    precompute_teacher(source, out, arch=ARCH, pretrained=str(weights["a"]), log=logs.append)
    assert "1 written, 1 reused" in logs[-1]
    assert {p.name: p.read_bytes() for p in out.iterdir()} == first


def test_another_teacher_or_source_is_refused(weights, source, tmp_path):
    out = tmp_path / "out"
    precompute_teacher(source, out, arch=ARCH, pretrained=str(weights["a"]), log=_quiet)
    manifest = (out / "manifest.json").read_bytes()
    with pytest.raises(ShardError, match=r"made from another source or teacher \(changed: "
                                         r"teacher.pretrained_sha256\); pick a new --out or delete it"):
        precompute_teacher(source, out, arch=ARCH, pretrained=str(weights["b"]), log=_quiet)
    other = _write_source(tmp_path / "other", drop="extra.bin")
    with pytest.raises(ShardError, match=r"changed: source_manifest_sha256\)"):
        precompute_teacher(other, out, arch=ARCH, pretrained=str(weights["a"]), log=_quiet)
    assert (out / "manifest.json").read_bytes() == manifest  # untouched
    # The same weights under another path are the same teacher: the finished directory is reused.
    moved = tmp_path / "moved.pt"
    moved.write_bytes(weights["a"].read_bytes())
    logs: list[str] = []
    precompute_teacher(source, out, arch=ARCH, pretrained=str(moved), log=logs.append)
    assert "0 written, 2 reused" in logs[-1]


def test_user_errors_name_the_shard_key_and_fix(weights, source, tmp_path):
    broken = _write_source(tmp_path / "broken", drop="txt")
    with pytest.raises(ShardError, match=r"000001.tar: sample val-000004: no txt member; fix or drop the sample"):
        precompute_teacher(broken, tmp_path / "out", arch=ARCH, pretrained=str(weights["a"]), log=_quiet)
    assert [p.name for p in (tmp_path / "out").glob("*.tar")] == ["000000.tar"]  # the bad shard never appears
    assert not list((tmp_path / "out").glob(".*.tmp-*"))
    no_image = _write_source(tmp_path / "no_image", drop="png")
    with pytest.raises(ShardError, match=r"000001.tar: sample val-000004: no image member"):
        precompute_teacher(no_image, tmp_path / "out2", arch=ARCH, pretrained=str(weights["a"]), log=_quiet)
    with pytest.raises(ShardError, match="no --pretrained weights"):
        precompute_teacher(source, tmp_path / "out3", arch=ARCH, pretrained="", log=_quiet)
    with pytest.raises(ShardError, match="not found"):
        precompute_teacher(source, tmp_path / "out3", arch=ARCH, pretrained=str(tmp_path / "none.pt"), log=_quiet)
    with pytest.raises(ShardError, match="not open_clip weights for --arch kclip-micro"):
        precompute_teacher(source, tmp_path / "out3", arch="kclip-micro", pretrained=str(weights["a"]), log=_quiet)
    assert not (tmp_path / "out3").exists()  # nothing claimed by the wrong arch
    with pytest.raises(ShardError, match="is the input directory"):
        precompute_teacher(source, source, arch=ARCH, pretrained=str(weights["a"]), log=_quiet)


def _npy(array: np.ndarray, allow_pickle: bool = False) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, array, allow_pickle=allow_pickle)
    return buffer.getvalue()


def test_member_round_trip_and_malformed_members_name_the_key():
    image, text = torch.randn(8), torch.randn(8)
    features = decode_teacher_member(encode_teacher_member(image, text), "k", dim=8)
    expected = torch.stack([image / image.norm(), text / text.norm()])
    torch.testing.assert_close(features, expected, atol=1e-3, rtol=0)
    unit = np.full((2, 8), 8 ** -0.5, dtype=np.float16)
    npz = io.BytesIO()
    np.savez(npz, a=unit)
    nan = unit.copy()
    nan[1, 3] = np.nan
    cases = {
        _npy(np.array([{"a": 1}, None], dtype=object), allow_pickle=True): "not a plain .npy array",
        b"\x80\x04\x95 not numpy": "not a plain .npy array",
        b"": "not a plain .npy array",
        npz.getvalue(): "not a .npy array",
        _npy(unit.astype(np.float32)): "dtype float32, expected float16",
        _npy(np.concatenate([unit, unit[:1]])): r"shape \[3, 8\], expected \[2, D\]",
        _npy(unit[0]): r"shape \[8\], expected \[2, D\]",
        _npy(nan): "NaN or inf",
        _npy(unit * 3): "not L2-normalised",
    }
    for data, problem in cases.items():
        with pytest.raises(ValueError, match=f"sample shard-7/key-42: teacher.npy .*{problem}.*re-run "
                                             f"tools/precompute_teacher.py"):
            decode_teacher_member(data, "shard-7/key-42", dim=8)
    with pytest.raises(ValueError, match="sample k: teacher.npy has dim 8, but the teacher's features have 16"):
        decode_teacher_member(_npy(unit), "k", dim=16)


@pytest.fixture(scope="module")
def cli():
    """tools/precompute_teacher.py as a module (in-process: a subprocess would spend seconds importing torch)."""
    sys.path.insert(0, str(ROOT / "tools"))
    try:
        import precompute_teacher
    finally:
        sys.path.remove(str(ROOT / "tools"))
    return precompute_teacher


def test_cli_exits_2_with_one_line_on_a_missing_input(cli, tmp_path, capsys):
    code = cli.main(["--input", str(tmp_path / "missing"), "--out", str(tmp_path / "out"), "--arch", ARCH,
                     "--pretrained", str(tmp_path / "w.pt")])
    out, err = capsys.readouterr()
    assert code == 2 and out == "" and err.count("\n") == 1
    assert err.startswith(f"precompute_teacher: error: {tmp_path / 'missing'}: no manifest.json")
    assert not (tmp_path / "out").exists()


def test_cli_needs_the_flag_for_a_random_teacher(cli, source, tmp_path, capsys):
    with pytest.raises(SystemExit) as exc:
        cli.main(["--input", str(source), "--out", str(tmp_path / "out"), "--arch", ARCH, "--pretrained", ""])
    assert exc.value.code == 2 and "--allow-random-teacher" in capsys.readouterr().err
    assert cli.main(["--input", str(source), "--out", str(tmp_path / "out"), "--arch", ARCH, "--pretrained", "",
                     "--allow-random-teacher", "--batch-size", "4"]) == 0
    spec = teacher_spec(tmp_path / "out")
    assert spec["pretrained"] == "" and spec["pretrained_sha256"] is None
