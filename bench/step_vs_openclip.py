"""Time one kclip_ds training step against a plain open_clip loop on the same model, batch and weights.

    python bench/step_vs_openclip.py [--arch kclip-tiny] [--batch-size 64] [--steps 20] [--warmup 3]
                                     [--rounds 3] [--threads N] [--out FILE.json]

kclip_ds side: built exactly as ``kclip_ds.train`` builds it (load_config → init_distributed → build_towers →
engine.initialize(ClipMethod)), DeepSpeed ZeRO-0, one rank, fp32; a step is
``engine(images, texts, valid)`` → ``engine.backward(loss)`` → ``engine.step()`` (clipping, AdamW, LR schedule).

open_clip side: ``open_clip.create_model(arch, output_dict=True)`` with the same initial weights,
``open_clip.loss.ClipLoss()``, ``torch.optim.AdamW`` with kclip_ds's weight-decay split and cfg.train's
lr/betas/eps/weight_decay, ``clip_grad_norm_`` at cfg.train.grad_clip, and a constant LR (no scheduler).

Both sides see the same synthetic batch.  After warm-up, the sides are timed in interleaved rounds (the order
alternates per round, A B / B A / …, to cancel drift).  Prints per-step medians, the ratio kclip/open_clip and
PASS/FAIL against the target; always exits 0 (a measurement, not a test).
"""

from __future__ import annotations

import argparse
import copy
import datetime
import gc
import json
import logging
import os
import platform
import shlex
import statistics
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))
os.environ.setdefault("DS_ACCELERATOR", "cpu")

import deepspeed
import open_clip
import torch
import torch.distributed as dist

from kclip_ds import engine as eng
from kclip_ds.config import load_config
from kclip_ds.methods.clip import ClipMethod
from kclip_ds.models.towers import build_towers, resolve_arch

TARGET = 1.10
LOSS_TOL = 1e-4
DATA_SEED = 1234
INIT_SEED = 0


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--arch", default="kclip-tiny", help="open_clip model name or JSON path (model.arch)")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--steps", type=int, default=20, help="timed steps per side per round")
    p.add_argument("--warmup", type=int, default=3, help="untimed steps per side before timing (>= 1)")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    p.add_argument("--out", default=None, help="write all numbers as JSON here")
    args = p.parse_args(argv)
    if min(args.batch_size, args.steps, args.warmup, args.rounds) < 1:
        p.error("--batch-size, --steps, --warmup and --rounds must be >= 1")
    return args


def cpu_info() -> dict:
    model_name = ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model_name = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {"processor": platform.processor(), "model_name": model_name, "cpu_count": os.cpu_count(),
            "machine": platform.machine(), "platform": platform.platform(), "python": platform.python_version()}


def build_kclip(args: argparse.Namespace):
    cfg = load_config(None, [f"deepspeed.config={REPO / 'ds_configs' / 'zero0.json'}",
                             f"data.batch_size={args.batch_size}", f"model.arch={args.arch}",
                             "train.max_steps=1000", "train.grad_accum=1", "deepspeed.bf16=false",
                             "train.tensorboard=false", "train.progress_bar=false"])
    eng.init_distributed(cfg)
    assert dist.get_world_size() == 1, "run this benchmark as a single process (no launcher)"
    torch.manual_seed(INIT_SEED)
    towers = build_towers(cfg.model)
    init_state = copy.deepcopy(towers.model.state_dict())  # before DeepSpeed touches anything
    engine = eng.initialize(ClipMethod(towers.model), cfg, world_size=1)
    engine.train()
    return cfg, towers, engine, init_state


def build_openclip(cfg, init_state: dict):
    arch = resolve_arch(cfg.model.arch)
    model = open_clip.create_model(arch, output_dict=True)
    own = model.state_dict()
    state = {k: v.reshape(own[k].shape) for k, v in init_state.items()}  # logit_scale: kclip [1] → open_clip []
    model.load_state_dict(state, strict=True)
    model.train()
    t = cfg.train
    groups = eng.param_groups(model, t.weight_decay)
    optimizer = torch.optim.AdamW(groups, lr=t.lr, betas=(t.beta1, t.beta2), eps=t.eps, weight_decay=t.weight_decay)
    return model, open_clip.loss.ClipLoss(), optimizer, groups


def timed(step_fn, n: int, threads: int) -> tuple[list[float], float]:
    """Per-step wall seconds, and the CPU use of the block as a fraction of ``threads`` busy cores.

    A fraction well below 1 means the block's threads waited for cores: other load on the machine.
    """
    torch.set_num_threads(threads)  # DeepSpeed must not have changed it; set it anyway for both sides
    gc.collect()
    times = []
    cpu0, wall0 = time.process_time(), time.perf_counter()
    for _ in range(n):
        t0 = time.perf_counter()
        step_fn()
        times.append(time.perf_counter() - t0)
    return times, (time.process_time() - cpu0) / ((time.perf_counter() - wall0) * threads)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.getLogger("DeepSpeed").setLevel(logging.WARNING)
    threads = args.threads or torch.get_num_threads()
    torch.set_num_threads(threads)

    cfg, towers, engine, init_state = build_kclip(args)
    oc_model, clip_loss, optimizer, oc_groups = build_openclip(cfg, init_state)
    torch.set_num_threads(threads)

    ds_groups = engine.optimizer.param_groups
    split = [(len(g["params"]), g["weight_decay"]) for g in ds_groups]
    oc_split = [(len(g["params"]), g["weight_decay"]) for g in oc_groups]
    assert split == oc_split, f"weight-decay split differs: kclip {split} vs open_clip {oc_split}"
    n_params = sum(p.numel() for p in oc_model.parameters())

    g = torch.Generator().manual_seed(DATA_SEED)
    B, H, L = args.batch_size, towers.image_size, towers.context_length
    vocab = int(getattr(oc_model, "vocab_size", 49408))
    images = torch.randn(B, 3, H, H, generator=g)
    texts = torch.randint(0, vocab, (B, L), generator=g)
    valid = torch.ones(B, dtype=torch.bool)
    device = engine.device
    k_images, k_texts, k_valid = images.to(device), texts.to(device), valid.to(device)
    grad_clip = cfg.train.grad_clip

    def kclip_step() -> torch.Tensor:
        out = engine(images=k_images, texts=k_texts, valid=k_valid)
        engine.backward(out["loss"])
        engine.step()
        return out["loss"].detach()

    def openclip_step() -> torch.Tensor:
        optimizer.zero_grad(set_to_none=True)
        out = oc_model(image=images, text=texts)
        loss = clip_loss(out["image_features"], out["text_features"], out["logit_scale"])
        loss.backward()
        if grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(oc_model.parameters(), grad_clip)
        optimizer.step()
        return loss.detach()

    sides = {"kclip_ds": kclip_step, "open_clip": openclip_step}

    # Warm-up; the first step of each side starts from the same weights on the same batch.
    first_loss, warmup_s = {}, {}
    for name, fn in sides.items():
        torch.set_num_threads(threads)
        t0 = time.perf_counter()
        first_loss[name] = float(fn())
        for _ in range(args.warmup - 1):
            fn()
        warmup_s[name] = time.perf_counter() - t0
    loss_diff = abs(first_loss["kclip_ds"] - first_loss["open_clip"])
    loss_ok = loss_diff <= LOSS_TOL * max(1.0, abs(first_loss["open_clip"]))

    per_step: dict[str, list[float]] = {name: [] for name in sides}
    rounds = []
    order = list(sides)
    for r in range(args.rounds):
        this = order if r % 2 == 0 else order[::-1]
        rec = {"order": this}
        for name in this:
            ts, util = timed(sides[name], args.steps, threads)
            per_step[name] += ts
            rec[name] = {"median_s": statistics.median(ts), "mean_s": statistics.fmean(ts), "cpu_util": util,
                         "steps_s": ts}
        rec["ratio_median"] = rec["kclip_ds"]["median_s"] / rec["open_clip"]["median_s"]
        rounds.append(rec)
    assert torch.get_num_threads() == threads

    med = {n: statistics.median(ts) for n, ts in per_step.items()}
    mean = {n: statistics.fmean(ts) for n, ts in per_step.items()}
    best = {n: min(ts) for n, ts in per_step.items()}
    ratio = med["kclip_ds"] / med["open_clip"]
    round_ratio_median = statistics.median(rec["ratio_median"] for rec in rounds)
    passed = ratio <= TARGET

    versions = {"torch": torch.__version__, "deepspeed": deepspeed.__version__, "open_clip": open_clip.__version__,
                "python": platform.python_version()}
    print()
    print(f"kclip_ds vs open_clip — one training step, arch {towers.arch} ({n_params / 1e6:.2f}M params), "
          f"batch {B}, image {H}px, context {L}, fp32, device {device}, {threads} torch threads")
    print(f"torch {versions['torch']}, deepspeed {versions['deepspeed']}, open_clip {versions['open_clip']}; "
          f"cpu: {cpu_info()['model_name'] or platform.processor()} ×{os.cpu_count()}")
    print(f"first-step loss (same weights, same batch): kclip_ds {first_loss['kclip_ds']:.6f}  "
          f"open_clip {first_loss['open_clip']:.6f}  |diff| {loss_diff:.2e}  "
          + ("OK" if loss_ok else f"MISMATCH (> {LOSS_TOL:g}): the two sides do not compute the same loss"))
    print()
    print(f"{'round':>5}  {'order':<20} {'kclip_ds ms':>12} {'open_clip ms':>13} {'ratio':>7}   cpu use k/o")
    for i, rec in enumerate(rounds):
        k, o = rec["kclip_ds"], rec["open_clip"]
        print(f"{i:>5}  {' → '.join(rec['order']):<20} {k['median_s'] * 1e3:>12.2f} "
              f"{o['median_s'] * 1e3:>13.2f} {rec['ratio_median']:>7.3f}   {k['cpu_util']:.2f}/{o['cpu_util']:.2f}")
    print(f"{'all':>5}  {'median':<20} {med['kclip_ds'] * 1e3:>12.2f} {med['open_clip'] * 1e3:>13.2f} {ratio:>7.3f}")
    print(f"{'':>5}  {'mean':<20} {mean['kclip_ds'] * 1e3:>12.2f} {mean['open_clip'] * 1e3:>13.2f} "
          f"{mean['kclip_ds'] / mean['open_clip']:>7.3f}")
    print(f"{'':>5}  {'min':<20} {best['kclip_ds'] * 1e3:>12.2f} {best['open_clip'] * 1e3:>13.2f} "
          f"{best['kclip_ds'] / best['open_clip']:>7.3f}")
    print(f"median of per-round ratios: {round_ratio_median:.3f}")
    spread = max(rec["ratio_median"] for rec in rounds) - min(rec["ratio_median"] for rec in rounds)
    low_util = min(rec[n]["cpu_util"] for rec in rounds for n in sides)
    noisy = (spread > 0.10 or low_util < 0.8 or mean["open_clip"] > 1.5 * med["open_clip"]
             or mean["kclip_ds"] > 1.5 * med["kclip_ds"])
    if noisy:
        print(f"note: noisy timings (per-round ratios spread by {spread:.2f}, lowest cpu use {low_util:.2f} of "
              f"{threads} cores, or outlier steps): other load on the machine? compare runs, or use more --rounds")
    print()
    print(f"ratio kclip_ds/open_clip = {ratio:.2f} (target <= {TARGET:.2f}): {'PASS' if passed else 'FAIL'}")

    if args.out:
        result = {
            "command": shlex.join([sys.executable, *sys.argv]),
            "cwd": os.getcwd(),
            "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "args": vars(args),
            "threads": threads,
            "versions": versions,
            "cpu": cpu_info(),
            "model": {"arch": towers.arch, "params": n_params, "image_size": H, "context_length": L,
                      "weight_decay_split": split},
            "train_cfg": {"lr": cfg.train.lr, "betas": [cfg.train.beta1, cfg.train.beta2], "eps": cfg.train.eps,
                          "weight_decay": cfg.train.weight_decay, "grad_clip": grad_clip,
                          "deepspeed_config": cfg.deepspeed.config},
            "first_step_loss": {**first_loss, "abs_diff": loss_diff, "ok": loss_ok},
            "warmup_s": warmup_s,
            "median_step_s": med,
            "mean_step_s": mean,
            "min_step_s": best,
            "ratio_median": ratio,
            "ratio_mean": mean["kclip_ds"] / mean["open_clip"],
            "ratio_min": best["kclip_ds"] / best["open_clip"],
            "ratio_round_median": round_ratio_median,
            "target": TARGET,
            "pass": passed,
            "noisy": noisy,
            "rounds": rounds,
        }
        out = Path(args.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(result, indent=2))
        print(f"wrote {out}")

    if dist.is_initialized():
        dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
