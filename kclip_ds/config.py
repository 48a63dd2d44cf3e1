"""Typed experiment config: one dataclass tree, read from YAML, overridden by ``key=value`` args.

    cfg = load_config("configs/demo.yaml", ["train.max_steps=20", "data.batch_size=32"])

Every problem (missing file, unknown key, wrong type, bad value) raises ``ConfigError`` with one
line that names the file or key and says what to do.  Parts of the code receive the narrow piece
they need (``cfg.data`` to the data pipeline, ``cfg.model`` to the towers), never the whole tree.
"""

from __future__ import annotations

import dataclasses
import json
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml


class ConfigError(ValueError):
    """A user-facing configuration problem (printed as one line, no traceback)."""


@dataclass
class TrainConfig:
    output_dir: str = "runs/default"
    max_steps: int = 100
    seed: int = 0
    save_every: int = 50  # steps between checkpoints; 0 = only at the end and on signals
    keep_last: int = 2  # checkpoints kept on disk (older ones are deleted after `latest` moves)
    resume: str = ""  # "" (fresh run), "latest", "auto" (latest if any, else fresh), or a tag "global_step40"
    stop_after_steps: int = 0  # stop (with a checkpoint) after this step, schedule unchanged; 0 = off
    log_every: int = 1
    eval_every: int = 0  # steps between validation runs; 0 = only at the end
    lr: float = 5.0e-4
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.98
    eps: float = 1.0e-6
    warmup_steps: int = 10
    min_lr_ratio: float = 0.0  # cosine decays to lr * min_lr_ratio
    grad_accum: int = 1
    grad_clip: float = 1.0  # 0 disables clipping
    tensorboard: bool = True
    progress_bar: bool = True


@dataclass
class DataConfig:
    train: str = ""  # webdataset urls, sources joined by "::" (open_clip syntax)
    val: str = ""
    test: str = ""
    zeroshot: str = ""  # shards with `cls`; class names + templates in classes.json beside them
    zeroshot_extra: list[str] = field(default_factory=list)  # more zero-shot sets as "name=shards" (metrics name/top1)
    batch_size: int = 32  # per rank
    workers: int = 2
    resampled: bool = False  # False: exact epochs; True: sample shards with replacement
    train_upsampling_factors: str = ""  # "1::2" — one weight per source (resampled mode only)
    mix: str = "sample"  # several sources, resampled: "sample" (each sample draws its source) or "batch" (fixed rows)
    epoch_steps: int = 0  # resampled mode: steps per virtual epoch (0 = total samples / global batch)
    shuffle_buffer: int = 256  # samples; 0 disables in-shard shuffling
    max_corrupt: int = 10  # skipped corrupt samples tolerated per run before stopping with an error
    negatives: list[str] = field(default_factory=list)  # hard negatives from sg.json: relation, attribute


@dataclass
class ModelConfig:
    arch: str = "kclip-tiny"  # open_clip model name or a path to an open_clip model JSON config
    pretrained: str = ""  # a local open_clip checkpoint file, or hf:DIR (a transformers CLIPModel dir); never a hub
    grad_checkpointing: bool = False
    trim_text_padding: bool = True  # text tower runs only up to the batch's longest caption (exact; see towers.py)


@dataclass
class MethodConfig:
    name: str = "clip"  # clip (NegCLIP when data.negatives is set) | structure_clip | knowledge_clip
    lambda_k: float = 0.2  # Structure-CLIP: t = c + lambda_k * k
    hinge_margin: float = 0.2
    neg_margin: float = 0.1
    neg_weight: float = 5.0  # lambda_n
    infonce_weight: float = 0.0  # optional InfoNCE term on (v, t)
    warmup_steps: int = 100  # text→image hinge takes the mean over negatives for these first steps
    max_triples: int = 6
    phrase_len: int = 5  # BPE tokens per phrase
    graph_width: int = 256
    graph_layers: int = 2
    graph_heads: int = 4
    relation_bias: bool = False  # attention bias between triples that share an entity (beyond the reference)
    graph_grad_checkpointing: bool = False  # recompute the graph encoder's layers in backward (towers: model.*)
    fused_loss: bool = False  # InfoNCE and hinge in tiles, O(B) memory, no B × N logits (kclip_ds/kernels)
    loss_tile: int = 1024  # rows and columns per tile of the fused losses (bench/loss_memory.py --tiles)
    # Knowledge-CLIP (docs/METHODS.md records why each choice): objective weights, 0 turns one off
    clip_weight: float = 1.0  # InfoNCE on the image–caption pairs of the batch
    cross_modal_pairs: bool = False  # (image, r, text) triplets also join the InfoNCE as image–text pairs
    e2e_weight: float = 1.0  # masked head/tail -> the true entity among the global batch's entities
    e2e_filter: bool = True  # rows asking the same (relation, known entity, side) are not each other's negatives
    knowledge_image_grad: bool = True  # false: no gradient from triplet rows (cross-modal pairs too) to the images
    e2e_hide: str = "any"  # any: the sampled side; text: an (image, r, text) fact always hides its text side
    e2r_weight: float = 1.0  # masked relation -> its relation (classify and/or contrast, e2r_mode)
    e2r_mode: str = "both"  # classify | contrast | both
    g2e_weight: float = 1.0  # entity neighbourhood graph -> the entity's own embedding
    kd_weight: float = 1.0  # KL(teacher || student) of the image–text similarity distributions
    kd_teacher: str = "online"  # online: a frozen copy of the initial towers; features: teacher.npy in the shards
    kd_teacher_dtype: str = "bf16"  # bf16 | fp32 (the online teacher's weights and compute)
    objective_ramp_steps: int = 0  # the knowledge objectives' weights ramp linearly from 0 over these steps
    objective_cooldown_steps: int = 0  # ... and fall linearly to 0 over the last these of train.max_steps
    neighbour_edges: int = 8  # G2E: neighbourhood edges per entity given to the graph encoder
    relations: list[str] = field(default_factory=list)  # E2R vocabulary; empty: from the triplet shards' manifests


@dataclass
class DeepSpeedSection:
    config: str = "ds_configs/zero2.json"  # a plain DeepSpeed JSON
    bf16: bool = False  # turn on DeepSpeed's bf16 section without editing the JSON
    cpu_shm_comm: bool = False  # DeepSpeed's CPU shared-memory allreduce (JIT-builds a C++ op, ~30 s)


@dataclass
class EvalConfig:
    batch_size: int = 64
    retrieval_ks: list[int] = field(default_factory=lambda: [1, 5, 10])
    swap_tests: list[str] = field(default_factory=lambda: ["relation", "attribute"])  # on splits with sg.json


@dataclass
class Config:
    train: TrainConfig = field(default_factory=TrainConfig)
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    method: MethodConfig = field(default_factory=MethodConfig)
    deepspeed: DeepSpeedSection = field(default_factory=DeepSpeedSection)
    eval: EvalConfig = field(default_factory=EvalConfig)


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", str(tp))


def _coerce(value: Any, tp: Any, key: str, origin: str) -> Any:
    """Check ``value`` against the annotated type ``tp``; ints are accepted where floats are wanted."""
    if typing.get_origin(tp) is list:
        (item_tp,) = typing.get_args(tp)
        if not isinstance(value, list):
            raise ConfigError(f"{origin}: {key} expects a list of {_type_name(item_tp)}, got {value!r}")
        return [_coerce(v, item_tp, f"{key}[{i}]", origin) for i, v in enumerate(value)]
    if tp is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if tp is float and isinstance(value, str):
        try:
            return float(value)  # YAML 1.1 reads "1e-3" (no dot) as a string
        except ValueError:
            pass
    if tp is str and isinstance(value, (int, float)) and not isinstance(value, bool):
        return str(value)  # e.g. data.train=123 from the command line
    if not isinstance(value, tp) or (tp is int and isinstance(value, bool)):
        raise ConfigError(f"{origin}: {key} expects {_type_name(tp)}, got {type(value).__name__} {value!r}")
    return value


def _field_types(cls: type) -> dict[str, Any]:
    hints = typing.get_type_hints(cls)
    return {f.name: hints[f.name] for f in dataclasses.fields(cls)}


def _apply(obj: Any, key: str, value: Any, origin: str) -> None:
    """Set dotted ``key`` (e.g. ``train.max_steps``) on the dataclass tree ``obj``."""
    parts = key.split(".")
    node = obj
    for depth, name in enumerate(parts):
        types_ = _field_types(type(node))
        if name not in types_:
            where = ".".join(parts[:depth]) or "the top level"
            raise ConfigError(f"{origin}: unknown config key '{key}' (valid keys in {where}: {', '.join(types_)})")
        tp = types_[name]
        if depth == len(parts) - 1:
            if dataclasses.is_dataclass(tp):
                if not isinstance(value, dict):
                    raise ConfigError(f"{origin}: {key} is a section; give its keys, e.g. {key}.<name>=…")
                for sub_key, sub_value in value.items():
                    _apply(obj, f"{key}.{sub_key}", sub_value, origin)
            else:
                setattr(node, name, _coerce(value, tp, key, origin))
            return
        if not dataclasses.is_dataclass(tp):
            raise ConfigError(f"{origin}: {'.'.join(parts[: depth + 1])} is not a section, so '{key}' is unknown")
        node = getattr(node, name)


def _parse_override(arg: str) -> tuple[str, Any]:
    if "=" not in arg:
        raise ConfigError(f"override '{arg}' is not of the form section.key=value")
    key, raw = arg.split("=", 1)
    try:
        value = yaml.safe_load(raw) if raw != "" else ""
    except yaml.YAMLError as exc:
        raise ConfigError(f"override {key}: cannot parse value {raw!r} ({exc.__class__.__name__})") from exc
    return key.strip(), value


def load_config(path: str | Path | None, overrides: list[str] | None = None) -> Config:
    """Build the config from defaults, then the YAML file, then ``key=value`` overrides."""
    cfg = Config()
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"config file not found: {path} (pass an existing YAML, e.g. configs/demo.yaml)")
        try:
            payload = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as exc:
            raise ConfigError(f"{path}: not valid YAML ({str(exc).splitlines()[0]})") from exc
        if not isinstance(payload, dict):
            raise ConfigError(f"{path}: the top level must be a mapping of sections (train:, data:, …)")
        for section, values in payload.items():
            _apply(cfg, str(section), values, str(path))
    for arg in overrides or []:
        key, value = _parse_override(arg)
        _apply(cfg, key, value, "command line")
    validate(cfg)
    return cfg


def validate(cfg: Config) -> None:
    """Value checks that types alone do not catch."""
    positive = {
        "train.max_steps": cfg.train.max_steps,
        "data.batch_size": cfg.data.batch_size,
        "train.grad_accum": cfg.train.grad_accum,
        "train.log_every": cfg.train.log_every,
        "train.keep_last": cfg.train.keep_last,
        "method.loss_tile": cfg.method.loss_tile,
    }
    for key, value in positive.items():
        if value < 1:
            raise ConfigError(f"{key} must be >= 1, got {value}")
    for key, value in {"train.save_every": cfg.train.save_every, "train.eval_every": cfg.train.eval_every,
                       "data.workers": cfg.data.workers, "data.max_corrupt": cfg.data.max_corrupt,
                       "train.warmup_steps": cfg.train.warmup_steps,
                       "method.objective_ramp_steps": cfg.method.objective_ramp_steps,
                       "method.objective_cooldown_steps": cfg.method.objective_cooldown_steps}.items():
        if value < 0:
            raise ConfigError(f"{key} must be >= 0, got {value}")
    if cfg.method.name not in ("clip", "structure_clip", "knowledge_clip"):
        raise ConfigError(f"method.name must be clip, structure_clip or knowledge_clip, got {cfg.method.name!r}")
    choices = {"method.e2r_mode": (cfg.method.e2r_mode, ("classify", "contrast", "both")),
               "method.e2e_hide": (cfg.method.e2e_hide, ("any", "text")),
               "method.kd_teacher": (cfg.method.kd_teacher, ("online", "features")),
               "method.kd_teacher_dtype": (cfg.method.kd_teacher_dtype, ("bf16", "fp32"))}
    for key, (value, allowed) in choices.items():
        if value not in allowed:
            raise ConfigError(f"{key} must be one of {', '.join(allowed)}, got {value!r}")
    for item in cfg.data.zeroshot_extra:
        if "=" not in item or not item.split("=", 1)[0] or not item.split("=", 1)[1]:
            raise ConfigError(f"data.zeroshot_extra: {item!r} is not of the form name=shards "
                              f"(e.g. zeroshot_hypernym=data/fashion/zeroshot_hypernym/000000.tar)")
    unknown = set(cfg.data.negatives) - {"relation", "attribute"}
    if unknown:
        raise ConfigError(f"data.negatives: unknown kind(s) {sorted(unknown)}; use relation and/or attribute")
    if cfg.data.mix not in ("sample", "batch"):
        raise ConfigError(f"data.mix must be sample or batch, got {cfg.data.mix!r}")
    if cfg.data.mix == "batch" and not cfg.data.resampled:
        raise ConfigError("data.mix=batch needs data.resampled=true (fixed rows per source come from resampled streams)")
    if cfg.data.train_upsampling_factors and not cfg.data.resampled:
        raise ConfigError("data.train_upsampling_factors needs data.resampled=true (as open_clip's flag does)")
    if cfg.data.train_upsampling_factors:
        n_sources = len(cfg.data.train.split("::"))
        n_factors = len(cfg.data.train_upsampling_factors.split("::"))
        if n_factors != n_sources:
            raise ConfigError(f"data.train_upsampling_factors has {n_factors} weights for {n_sources} sources "
                              f"in data.train; give one per '::'-separated source")


def to_dict(cfg: Config) -> dict[str, Any]:
    return dataclasses.asdict(cfg)


def dump_yaml(cfg: Config) -> str:
    return yaml.safe_dump(to_dict(cfg), sort_keys=False)


def to_json(cfg: Config) -> str:
    return json.dumps(to_dict(cfg), sort_keys=True)

