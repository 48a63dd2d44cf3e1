"""The typed config: YAML + dotted overrides, and one-line errors naming the key or file."""

from __future__ import annotations

from pathlib import Path

import pytest

from kclip_ds.config import ConfigError, load_config

REPO = Path(__file__).resolve().parents[1]


def test_demo_yaml_and_overrides() -> None:
    cfg = load_config(REPO / "configs/demo.yaml", ["train.max_steps=20", "train.output_dir=runs/try1",
                                                    "data.train=a/{000..009}.tar::b/{000..003}.tar", "train.lr=1e-3",
                                                    "eval.retrieval_ks=[1, 2]"])
    assert cfg.train.max_steps == 20 and cfg.train.output_dir == "runs/try1"
    assert cfg.data.train == "a/{000..009}.tar::b/{000..003}.tar"
    assert cfg.train.lr == pytest.approx(1e-3) and cfg.eval.retrieval_ks == [1, 2]
    assert cfg.deepspeed.config == "ds_configs/zero2.json" and cfg.model.arch == "kclip-tiny"
    for key in ("seed", "save_every"):
        assert hasattr(cfg.train, key)
    assert cfg.data.batch_size == 64 and cfg.data.val


@pytest.mark.parametrize(("overrides", "message"), [
    (["train.max_stpes=3"], "unknown config key 'train.max_stpes'"),
    (["trian.max_steps=3"], "unknown config key 'trian.max_steps'"),
    (["train.max_steps=abc"], "train.max_steps expects int, got str"),
    (["train.max_steps=2.5"], "train.max_steps expects int, got float"),
    (["train.tensorboard=maybe"], "train.tensorboard expects bool"),
    (["data.batch_size=0"], "data.batch_size must be >= 1"),
    (["train.max_steps"], "is not of the form section.key=value"),
    (["data.train_upsampling_factors=1::2"], "needs data.resampled=true"),
    (["data.resampled=true", "data.train=a.tar::b.tar", "data.train_upsampling_factors=1"], "1 weights for 2 sources"),
    (["data.mix=batches"], "data.mix must be sample or batch"),
    (["data.mix=batch"], "data.mix=batch needs data.resampled=true"),
])
def test_bad_overrides_are_named(overrides: list[str], message: str) -> None:
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)")) as info:
        load_config(None, overrides)
    assert "\n" not in str(info.value)


def test_yaml_errors_name_the_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="config file not found: .*missing.yaml"):
        load_config(tmp_path / "missing.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("train:\n  max_steps: 3\n  colour: red\n")
    with pytest.raises(ConfigError, match=r"bad.yaml: unknown config key 'train.colour'"):
        load_config(bad)
    bad.write_text("train: [1, 2\n")
    with pytest.raises(ConfigError, match=r"bad.yaml: not valid YAML"):
        load_config(bad)


@pytest.mark.parametrize("path", sorted((REPO / "configs").glob("*.yaml")), ids=lambda p: p.name)
def test_every_shipped_config_loads(path: Path) -> None:
    cfg = load_config(path)
    assert (REPO / cfg.deepspeed.config).is_file()
