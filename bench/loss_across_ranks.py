"""Across ranks, what could a ring exchange save over the tiled loss's all-gather? The gather's share, measured.

    torchrun --nproc_per_node 2 bench/loss_across_ranks.py [--sizes 2048,4096,8192] [--dim 512] [--reps 3]
                                                         [--out results.json]

The tiled InfoNCE (kclip_ds/kernels) gathers the column features of every rank with gradients (W·B·D floats per
rank) and scores its B rows against them in tiles.  A ring exchange (each rank passes feature blocks around,
W−1 steps) moves the same bytes and could at best hide the communication behind the tile matmuls; it would also
save the gathered copy, W·B·D floats.  So per local batch B this measures, on each rank, forward + backward of:

- ``gather``: gather_features(image) and gather_features(text) and their backward (the reduce of column
  gradients to their owner), alone: the most a ring could hide;
- ``tiled``: the whole tiled loss (gathers included);
- ``dense``: kclip_ds's dense ContrastiveLoss (open_clip ClipLoss(local_loss=True, gather_with_grad=True)
  semantics), for scale;
and prints gather ÷ tiled, with the gathered copy's size next to the tiled loss's B × tile working set.
Rank 0 prints; the median over --reps.  A measurement, not a test; always exits 0.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist

from kclip_ds.kernels import TiledContrastiveLoss
from kclip_ds.losses.contrastive import ContrastiveLoss, gather_features


def timed(fn, reps: int) -> float:
    times = []
    for _ in range(reps):
        dist.barrier()
        start = time.perf_counter()
        fn()
        dist.barrier()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def point(batch: int, dim: int, reps: int, tile: int) -> dict:
    gen = torch.Generator().manual_seed(1000 + dist.get_rank())
    v = torch.nn.functional.normalize(torch.randn(batch, dim, generator=gen), dim=-1).requires_grad_()
    c = torch.nn.functional.normalize(torch.randn(batch, dim, generator=gen), dim=-1).requires_grad_()
    scale = torch.tensor(14.0, requires_grad=True)
    tiled, dense = TiledContrastiveLoss(tile, backend="torch"), ContrastiveLoss()

    def gather_only() -> None:
        all_v, all_c = gather_features(v), gather_features(c)
        (all_v.sum() + all_c.sum()).backward()

    def loss(module) -> None:
        module(v, c, scale).backward()

    gather_only(), loss(tiled)  # warm-up (gloo buffers, allocator)
    out = {"batch_per_rank": batch, "world": dist.get_world_size(), "dim": dim, "tile": tile,
           "gather_s": timed(gather_only, reps), "tiled_s": timed(lambda: loss(tiled), reps),
           "dense_s": timed(lambda: loss(dense), reps),
           "gathered_copy_mib": 2 * dist.get_world_size() * batch * dim * 4 / 2**20,
           "tile_working_set_mib": min(tile, batch) * min(tile, dist.get_world_size() * batch) * 4 * 2 / 2**20}
    out["gather_share_of_tiled"] = out["gather_s"] / out["tiled_s"]
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sizes", default="2048,4096,8192", help="local batch sizes per rank")
    parser.add_argument("--dim", type=int, default=512)
    parser.add_argument("--tile", type=int, default=1024)
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args(argv)
    dist.init_process_group("gloo")
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    rows = [point(int(b), args.dim, args.reps, args.tile) for b in args.sizes.split(",")]
    if dist.get_rank() == 0:
        print(f"{dist.get_world_size()} ranks (gloo, CPU), D={args.dim}, tile {args.tile}, median of {args.reps}")
        print(f"{'B/rank':>7}{'gather s':>10}{'tiled s':>10}{'dense s':>10}{'gather÷tiled':>14}{'gathered MiB':>14}")
        for r in rows:
            print(f"{r['batch_per_rank']:>7}{r['gather_s']:>10.3f}{r['tiled_s']:>10.3f}{r['dense_s']:>10.3f}"
                  f"{r['gather_share_of_tiled']:>14.3f}{r['gathered_copy_mib']:>14.1f}")
        if args.out:
            args.out.write_text(json.dumps({"command": " ".join(sys.argv), "torch": torch.__version__,
                                            "date": datetime.datetime.now(datetime.timezone.utc).isoformat(),
                                            "rows": rows}, indent=1))
    dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
