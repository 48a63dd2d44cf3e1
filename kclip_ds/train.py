"""kclip-train: train a method with DeepSpeed from streaming shards.

    torchrun --nproc_per_node 2 -m kclip_ds.train --config configs/demo.yaml train.max_steps=20
    deepspeed --num_accelerators 2 --module kclip_ds.train --config configs/demo.yaml
    srun kclip-train --config …        (RANK/WORLD_SIZE from SLURM_* when the launcher sets none)

Works unchanged on CPU ranks (gloo) and GPUs (NCCL): DeepSpeed's accelerator picks the backend.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from pathlib import Path
from typing import Any

import braceexpand
import torch
import torch.distributed as dist

from kclip_ds import engine as eng
from kclip_ds.config import Config, ConfigError, dump_yaml, load_config, to_dict
from kclip_ds.data.pipeline import TrainStream
from kclip_ds.data.plan import derive_seed
from kclip_ds.data.sources import DataError
from kclip_ds.data.transforms import SampleDecoder
from kclip_ds.eval.runner import evaluate
from kclip_ds.kernels import loss_path
from kclip_ds.knowledge.teacher import teacher_spec
from kclip_ds.knowledge.triplet_batch import TripletRows, TripletSpec, relation_vocabulary
from kclip_ds.logs import MetricsLog, setup_logging
from kclip_ds.methods import build_method, method_inputs, uses_triples
from kclip_ds.models.towers import ModelError, build_towers

log = logging.getLogger("kclip_ds.train")


class TooManyCorruptSamples(DataError):
    pass


def _check_layout(saved: dict[str, int], current: dict[str, int]) -> None:
    if saved != current:
        diff = {k: (saved.get(k), current.get(k)) for k in set(saved) | set(current) if saved.get(k) != current.get(k)}
        raise eng.CheckpointError(
            f"the data layout changed since the checkpoint ({diff}, as saved → now): the saved position would "
            f"not continue the same stream; resume with the same world size, data.batch_size, data.workers "
            f"and shards, or start a new run from its weights")


def teacher_features_spec(cfg: Config) -> tuple[int, float] | None:
    """(dim, exp τ) of the precomputed teacher in the train shards when ``method.kd_teacher=features``."""
    if cfg.method.kd_weight <= 0 or cfg.method.kd_teacher != "features":
        return None
    specs = {}
    for source in cfg.data.train.split("::"):
        for directory in {Path(url).parent for url in braceexpand.braceexpand(source.strip())}:
            spec = teacher_spec(directory)
            if spec is not None:
                specs[str(directory)] = spec
    if not specs:
        raise ConfigError(f"method.kd_teacher=features, but no shard directory of data.train={cfg.data.train!r} "
                          f"holds teacher features; write them with tools/precompute_teacher.py, or use "
                          f"method.kd_teacher=online")
    found = {(s["arch"], s["pretrained_sha256"], s["dim"], s["logit_scale"]) for s in specs.values()}
    if len(found) > 1:
        raise ConfigError(f"data.train: the shard directories hold features of different teachers ({sorted(specs)}); "
                          f"precompute them all with the same --arch/--pretrained")
    _, _, dim, scale = found.pop()
    return int(dim), float(scale)


def run_training(cfg: Config) -> dict[str, Any]:
    """Train per ``cfg``; returns {"step", "stopped_by", "metrics"} (the same on every rank)."""
    stopper = eng.StopSignal()  # first: a pre-emption signal during start-up is honoured at the first step
    eng.init_distributed(cfg)
    rank, world = dist.get_rank(), dist.get_world_size()
    ds_config = eng.build_ds_config(cfg, world)  # a bad DeepSpeed JSON fails here, before any heavy work
    out_dir = Path(cfg.train.output_dir)
    ckpt_dir = out_dir / "checkpoints"
    if cfg.method.name == "knowledge_clip" and not cfg.method.relations:  # recorded in config.yaml for eval/export
        cfg.method.relations = list(relation_vocabulary(cfg.data.train))
        if not cfg.method.relations:
            raise ConfigError(f"method.name=knowledge_clip: no triplet shards in data.train={cfg.data.train!r} "
                              f"(no manifest with kind 'triplets'); add them (tools/import_kg.py) or set "
                              f"method.relations")
    if rank == 0:
        out_dir.mkdir(parents=True, exist_ok=True)
        (out_dir / "config.yaml").write_text(dump_yaml(cfg))
    torch.manual_seed(derive_seed("init", cfg.train.seed))  # identical initial weights on every rank

    towers = build_towers(cfg.model)
    triples = (cfg.method.max_triples, cfg.method.phrase_len) if uses_triples(cfg.method) else None
    knowledge = None
    if cfg.method.name == "knowledge_clip":
        spec = TripletSpec(tuple(cfg.method.relations), cfg.method.neighbour_edges, cfg.method.phrase_len,
                           cfg.train.seed)
        knowledge = TripletRows(spec, towers.preprocess_train, towers.tokenizer, towers.image_size,
                                towers.context_length)
    teacher = teacher_features_spec(cfg) if cfg.method.name == "knowledge_clip" else None
    decoder = SampleDecoder(towers.preprocess_train, towers.tokenizer, towers.image_size, towers.context_length,
                            negative_kinds=tuple(cfg.data.negatives), negative_seed=cfg.train.seed, triples=triples,
                            knowledge=knowledge, teacher=teacher)
    stream = TrainStream(cfg.data.train, decoder, rank=rank, world_size=world, batch_size=cfg.data.batch_size,
                         num_workers=cfg.data.workers, seed=cfg.train.seed, resampled=cfg.data.resampled,
                         upsampling_factors=cfg.data.train_upsampling_factors, epoch_steps=cfg.data.epoch_steps,
                         shuffle_buffer=cfg.data.shuffle_buffer, mix=cfg.data.mix)
    engine = eng.initialize(build_method(cfg.method, towers), cfg, world, ds_config)
    device, dtype = engine.device, eng.compute_dtype(engine)
    # Named here, where the device is known: on CUDA "auto" picks the Triton tiles (each call logs it too).
    log.info("loss path on %s: %s", device, loss_path(cfg.method.fused_loss, cfg.method.loss_tile, device))

    step = micro = corrupt_total = 0
    if cfg.train.resume == "auto":  # resume when a checkpoint exists (Slurm requeue), else start fresh
        cfg.train.resume = "latest" if (ckpt_dir / eng.LATEST).is_file() else ""
    elif not cfg.train.resume and (ckpt_dir / eng.LATEST).is_file():
        raise eng.CheckpointError(f"{ckpt_dir} holds checkpoints of an earlier run: pass train.resume=latest to "
                                  f"continue it, or choose a new train.output_dir")
    if cfg.train.resume:
        state = eng.load_checkpoint(engine, ckpt_dir, cfg.train.resume)
        _check_layout(state["data_layout"], stream.layout())
        step, micro, corrupt_total = state["step"], state["micro_batches"], state.get("corrupt_samples", 0)
        log.info("resumed from %s at step %d (epoch %d, batch %d of %d)", cfg.train.resume, step,
                 micro // stream.steps_per_epoch, micro % stream.steps_per_epoch, stream.steps_per_epoch)
    metrics = MetricsLog(out_dir, enabled=rank == 0, resumed_at_step=step if cfg.train.resume else None,
                         tensorboard=cfg.train.tensorboard, progress_bar=cfg.train.progress_bar,
                         total_steps=cfg.train.max_steps)
    log.info("%d ranks × %d per rank × %d accumulation = %d samples per step; %d samples, %d steps per epoch "
             "(%s); precision %s", world, cfg.data.batch_size, cfg.train.grad_accum,
             world * cfg.data.batch_size * cfg.train.grad_accum, stream.num_samples, stream.steps_per_epoch,
             "resampled" if cfg.data.resampled else "exact epochs", str(dtype).removeprefix("torch."))

    def encode(images, texts, batch_triples=None):
        extra = {"triples": batch_triples} if triples is not None else {}
        return engine(images=images, texts=texts, mode="encode", **extra)

    def run_eval() -> dict[str, float]:
        engine.eval()
        results = evaluate(encode, towers, cfg.data, cfg.eval, split="val", split_spec=cfg.data.val,
                           zeroshot_spec=cfg.data.zeroshot, zeroshot_extra=cfg.data.zeroshot_extra,
                           rank=rank, world_size=world, device=device, dtype=dtype,
                           triples=triples)
        engine.train()
        if results:
            metrics.eval(step, results)
        return results

    def save() -> None:
        state = {"step": step, "micro_batches": micro, "data_layout": stream.layout(),
                 "corrupt_samples": corrupt_total, "config": to_dict(cfg)}
        tag = eng.save_checkpoint(engine, ckpt_dir, step, state, cfg.train.keep_last)
        log.info("saved checkpoint %s", ckpt_dir / tag)

    stopped_by, last_eval = "max_steps", {}
    batches = stream.batches(start=micro)
    engine.train()
    while step < cfg.train.max_steps:
        tic = time.perf_counter()
        lr = engine.get_lr()[0]
        loss_sum = torch.zeros((), device=device)
        corrupt_keys: list[str] = []
        for _ in range(cfg.train.grad_accum):
            batch = next(batches)
            micro += 1
            corrupt_keys += batch.corrupt_keys
            b = batch.to(device, dtype)
            out = engine(images=b.images, texts=b.texts, valid=b.valid, neg_texts=b.neg_texts, neg_valid=b.neg_valid,
                         **method_inputs(cfg.method, b, step, cfg.train.max_steps))
            engine.backward(out["loss"])
            engine.step()
            loss_sum += out["loss"].detach().float()
        step += 1
        for key in corrupt_keys:
            log.warning("skipped corrupt sample %s", key)
        # One all-reduce per step: mean loss over ranks, any stop signal, corrupt samples seen.
        shared = torch.stack([loss_sum / cfg.train.grad_accum,
                              torch.tensor(float(stopper.received is not None), device=device),
                              torch.tensor(float(len(corrupt_keys)), device=device)])
        dist.all_reduce(shared)
        loss, stop_requested, corrupt_total = shared[0].item() / world, shared[1].item() > 0, corrupt_total + int(
            shared[2].item())
        if corrupt_total > cfg.data.max_corrupt:
            raise TooManyCorruptSamples(f"{corrupt_total} corrupt samples skipped so far, more than "
                                        f"data.max_corrupt={cfg.data.max_corrupt} (last on this rank: "
                                        f"{corrupt_keys[-1] if corrupt_keys else 'on another rank'}); fix or "
                                        f"re-create the shards, or raise data.max_corrupt")
        seconds = time.perf_counter() - tic
        if step % cfg.train.log_every == 0 or step == cfg.train.max_steps:
            samples = cfg.data.batch_size * cfg.train.grad_accum
            metrics.train(step, {"epoch": (micro - 1) // stream.steps_per_epoch, "loss": loss, "lr": lr,
                                 "samples_per_s": samples * world / seconds, "samples_per_s_per_rank": samples / seconds,
                                 "logit_scale": float(out["logs"]["logit_scale"]), **grad_norm(engine),
                                 **{k: float(v) for k, v in out["logs"].items() if k.startswith("loss_")}})
        if cfg.train.eval_every and step % cfg.train.eval_every == 0 and step < cfg.train.max_steps:
            last_eval = run_eval()
        if stop_requested or step == cfg.train.stop_after_steps:
            stopped_by = "signal" if stop_requested else "stop_after_steps"
            save()
            break
        if cfg.train.save_every and step % cfg.train.save_every == 0 and step < cfg.train.max_steps:
            save()
    else:
        save()
        last_eval = run_eval()
    metrics.close()
    log.info("finished at step %d (%s)", step, stopped_by)
    return {"step": step, "stopped_by": stopped_by, "metrics": last_eval}


def grad_norm(engine) -> dict[str, float]:
    """{"grad_norm": the last step's global gradient norm before clipping}, where DeepSpeed keeps one (every
    ZeRO stage and precision but ZeRO-0 in fp32)."""
    norm = engine.get_global_grad_norm()
    return {} if norm is None else {"grad_norm": float(norm)}


def parse_args(argv: list[str] | None = None) -> tuple[str | None, list[str]]:
    parser = argparse.ArgumentParser(prog="kclip-train", description=__doc__.split("\n")[0])
    parser.add_argument("--config", help="experiment YAML (configs/*.yaml)")
    parser.add_argument("--local_rank", "--local-rank", type=int, help=argparse.SUPPRESS)  # deepspeed launcher
    parser.add_argument("overrides", nargs="*", help="section.key=value, e.g. train.max_steps=20")
    args = parser.parse_args(argv)
    return args.config, args.overrides


def main(argv: list[str] | None = None) -> int:
    setup_logging()
    config_path, overrides = parse_args(argv)
    try:
        cfg = load_config(config_path, overrides)
        result = run_training(cfg)
    except (ConfigError, DataError, ModelError, eng.CheckpointError) as exc:
        print(f"kclip-train: error: {exc}", file=sys.stderr)
        return 2
    if dist.is_initialized():
        dist.barrier()
        if dist.get_rank() == 0:
            print(json.dumps({"final": result}, default=float))
        dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
