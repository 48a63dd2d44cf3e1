"""What Structure-CLIP costs over plain CLIP per training step, and what gradient checkpointing saves.

    python bench/step_overhead.py [--arch kclip-tiny] [--batch-size 64] [--steps 5] [--rounds 3] [--out r.json]

(a) Time: one process, DeepSpeed ZeRO-0 fp32 engines built the way kclip_ds.train builds them, for plain CLIP
    (configs/demo.yaml), NegCLIP (the same with swap-negative text columns) and Structure-CLIP
    (configs/demo_structure.yaml), from the same initial towers, on the same real batch of the demo val split
    (images, captions, swap negatives and scene-graph triples decoded by the training decoder).  Rounds
    alternate the order of the variants; the headline is median Structure-CLIP step ÷ median CLIP step
    (target ≤ 1.15).
    --full-context adds both with model.trim_text_padding=false (the text tower over the whole 77-token
    context, as open_clip runs it) to the same rounds.
(b) Memory: each (variant, checkpointing off/on) in a fresh subprocess: peak RSS during the steps minus the RSS
    before the first step (activations + gradients + optimizer state); checkpointing on = towers
    (model.grad_checkpointing) and graph encoder (method.graph_grad_checkpointing).
Needs the demo shards (`make data`).  Always exits 0: a measurement, not a test.
"""

from __future__ import annotations

import argparse
import datetime
import json
import logging
import os
import resource
import statistics
import subprocess
import sys
from pathlib import Path

import psutil
import torch
import torch.distributed as dist
from step_vs_openclip import cpu_info, timed

from kclip_ds import engine as eng
from kclip_ds.config import load_config
from kclip_ds.data.pipeline import eval_batches
from kclip_ds.data.transforms import SampleDecoder
from kclip_ds.methods import build_method, uses_triples
from kclip_ds.models.towers import build_towers

REPO = Path(__file__).resolve().parents[1]
VARIANTS = {
    "clip": ("configs/demo.yaml", ["data.negatives=[]"]),
    "negclip": ("configs/demo.yaml", ["data.negatives=[relation,attribute]"]),
    "structure_clip": ("configs/demo_structure.yaml", []),
}
FULL = ["model.trim_text_padding=false"]  # --full-context: the text tower over all 77 positions, as open_clip runs it
FULL_VARIANTS = {"clip_full": ("configs/demo.yaml", ["data.negatives=[]", *FULL]),
                 "structure_clip_full": ("configs/demo_structure.yaml", FULL)}
TARGET = 1.15


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--arch", default="kclip-tiny")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--steps", type=int, default=5, help="timed steps per variant per round")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--threads", type=int, default=0, help="torch threads (default: torch's choice)")
    p.add_argument("--skip-memory", action="store_true")
    p.add_argument("--skip-time", action="store_true", help="only the memory points (b)")
    p.add_argument("--full-context", action="store_true",
                   help="also time CLIP and Structure-CLIP with model.trim_text_padding=false, in the same rounds")
    p.add_argument("--out", type=Path)
    p.add_argument("--child", help=argparse.SUPPRESS)  # VARIANT:CKPT — one memory point
    return p.parse_args(argv)


def variant_config(variant: str, args: argparse.Namespace, checkpointing: bool = False):
    path, extra = {**VARIANTS, **FULL_VARIANTS}[variant]
    return load_config(REPO / path, [*extra, f"model.arch={args.arch}", f"data.batch_size={args.batch_size}",
                                     f"deepspeed.config={REPO / 'ds_configs/zero0.json'}", "deepspeed.bf16=false",
                                     "train.grad_accum=1", "train.max_steps=1000", "train.tensorboard=false",
                                     f"model.grad_checkpointing={str(checkpointing).lower()}",
                                     f"method.graph_grad_checkpointing={str(checkpointing).lower()}"])


def real_batch(cfg, towers):
    """One training batch of the demo val split with negatives and triples (what Structure-CLIP consumes)."""
    decoder = SampleDecoder(towers.preprocess_train, towers.tokenizer, towers.image_size, towers.context_length,
                            negative_kinds=("relation", "attribute"), negative_seed=0,
                            triples=(cfg.method.max_triples, cfg.method.phrase_len))
    spec = str(REPO / "data/demo/val/000000.tar")
    return next(iter(eval_batches(spec, decoder, rank=0, world_size=1, batch_size=cfg.data.batch_size,
                                  num_workers=0, name="data.val")))


def build(variant: str, args: argparse.Namespace, checkpointing: bool = False):
    cfg = variant_config(variant, args, checkpointing)
    torch.manual_seed(0)  # the same initial towers for every variant
    towers = build_towers(cfg.model)
    engine = eng.initialize(build_method(cfg.method, towers), cfg, world_size=1)
    engine.train()
    return cfg, towers, engine


def step_fn(variant: str, cfg, engine, batch):
    b = batch.to(engine.device, torch.float32)
    kwargs = {"images": b.images, "texts": b.texts, "valid": b.valid}
    if cfg.data.negatives:
        kwargs.update(neg_texts=b.neg_texts, neg_valid=b.neg_valid)
    if uses_triples(cfg.method):
        kwargs.update(triples=b.triples)

    def step() -> None:
        out = engine(**kwargs)
        engine.backward(out["loss"])
        engine.step()
    return step


def memory_point(spec: str, args: argparse.Namespace) -> dict:
    variant, ckpt = spec.split(":")
    cfg, towers, engine = build(variant, args, checkpointing=ckpt == "1")
    step = step_fn(variant, cfg, engine, real_batch(cfg, towers))
    before = psutil.Process().memory_info().rss
    for _ in range(3):
        step()
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    return {"variant": variant, "checkpointing": ckpt == "1", "extra_mib": max(0, peak - before) / 2**20,
            "peak_mib": peak / 2**20}


def measure_memory(args: argparse.Namespace) -> list[dict]:
    rows = []
    for variant in ("clip", "structure_clip"):
        for ckpt in ("0", "1"):
            cmd = [sys.executable, __file__, "--child", f"{variant}:{ckpt}", "--arch", args.arch,
                   "--batch-size", str(args.batch_size)]
            # A world of one of its own: the parent's rendezvous port is still bound by the parent.
            env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_PORT")}
            env["DS_ACCELERATOR"] = os.environ.get("DS_ACCELERATOR", "cpu")
            done = subprocess.run(cmd, capture_output=True, text=True, env=env, check=False)
            lines = [line for line in done.stdout.splitlines() if line.startswith("{")]
            rows.append(json.loads(lines[-1]) if done.returncode == 0 and lines else
                        {"variant": variant, "checkpointing": ckpt == "1", "error": done.stderr[-500:]})
    return rows


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.getLogger("DeepSpeed").setLevel(logging.WARNING)
    cfg0 = variant_config("clip", args)
    eng.init_distributed(cfg0)
    assert dist.get_world_size() == 1, "run this benchmark as a single process (no launcher)"
    if args.child:
        print(json.dumps(memory_point(args.child, args)))
        return 0
    threads = args.threads or torch.get_num_threads()
    median: dict[str, float] = {}
    times: dict[str, list[float]] = {}
    ratio = float("nan")
    if not args.skip_time:
        steps = {}
        variants = [*VARIANTS, *(FULL_VARIANTS if args.full_context else [])]
        for variant in variants:
            cfg, towers, engine = build(variant, args)
            steps[variant] = step_fn(variant, cfg, engine, real_batch(cfg, towers))
            for _ in range(args.warmup):
                steps[variant]()
        times = {v: [] for v in variants}
        order = variants
        for r in range(args.rounds):
            for variant in (order if r % 2 == 0 else order[::-1]):
                times[variant] += timed(steps[variant], args.steps, threads)[0]
        median = {v: statistics.median(t) for v, t in times.items()}
        ratio = median["structure_clip"] / median["clip"]
        print(f"arch {args.arch}, batch {args.batch_size}, {threads} threads, {args.rounds}×{args.steps} steps each")
        for v in variants:
            print(f"  {v:<20} median step {median[v] * 1e3:8.1f} ms   ÷ clip {median[v] / median['clip']:.2f}")
        if args.full_context:
            print(f"full context (no padding trim): Structure-CLIP ÷ CLIP "
                  f"{median['structure_clip_full'] / median['clip_full']:.2f}")
        print(f"Structure-CLIP ÷ CLIP step time: {ratio:.2f} (target ≤ {TARGET}: {'met' if ratio <= TARGET else 'NOT met'})")
    memory = [] if args.skip_memory else measure_memory(args)
    for row in memory:
        if "error" in row:
            print(f"  memory {row['variant']} ckpt={row['checkpointing']}: failed: {row['error']}")
        else:
            print(f"  memory {row['variant']:<16} checkpointing {'on ' if row['checkpointing'] else 'off'}: "
                  f"extra {row['extra_mib']:8.1f} MiB (peak RSS {row['peak_mib']:.0f} MiB)")
    if args.out:
        args.out.write_text(json.dumps({
            "command": " ".join(sys.argv), "date": datetime.datetime.now(datetime.timezone.utc).isoformat(),
            "machine": cpu_info(), "torch": torch.__version__, "arch": args.arch, "batch_size": args.batch_size,
            "median_step_s": median, "times": times, "ratio_structure_over_clip": ratio, "target": TARGET,
            "memory": memory}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
