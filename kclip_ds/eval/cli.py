"""kclip-eval: evaluate a run's checkpoint on a split (the test split is read only here).

    kclip-eval --run-dir runs/demo --split test                 # one process
    torchrun --nproc_per_node 2 -m kclip_ds.eval.cli --run-dir runs/demo --split val

Weights are consolidated with DeepSpeed's own ``zero_to_fp32`` (any ZeRO stage, any world size),
loaded into the run's method and scored through its ``forward(mode="encode")``.  Metrics are
printed as JSON and written to ``<run-dir>/eval/<tag>_<split>.json``.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

import torch
import torch.distributed as dist

from kclip_ds import engine as eng
from kclip_ds.config import ConfigError
from kclip_ds.data.shards import atomic_write_text
from kclip_ds.data.sources import DataError
from kclip_ds.eval.model import eval_model
from kclip_ds.eval.runner import evaluate
from kclip_ds.export.weights import load_run
from kclip_ds.logs import setup_logging
from kclip_ds.methods import uses_triples
from kclip_ds.models.towers import ModelError

log = logging.getLogger("kclip_ds.eval")


def run_eval(run_dir: Path, split: str, tag: str, overrides: list[str]) -> dict[str, float]:
    run = load_run(run_dir, tag, overrides)
    cfg, tag = run.cfg, run.tag
    eng.init_distributed(cfg)
    rank, world = dist.get_rank(), dist.get_world_size()
    specs = {"val": cfg.data.val, "test": cfg.data.test, "zeroshot": ""}
    if split not in specs:
        raise ConfigError(f"--split must be one of {', '.join(specs)}, got {split!r}")
    if split != "zeroshot" and not specs[split]:
        raise ConfigError(f"data.{split} is empty in {run_dir / 'config.yaml'}; pass data.{split}=<shards>")
    model = eval_model(run, run_dir)
    triples = (cfg.method.max_triples, cfg.method.phrase_len) if uses_triples(cfg.method) else None
    metrics = evaluate(model.encode, model.towers, cfg.data, cfg.eval, split=split, split_spec=specs[split],
                       zeroshot_spec=cfg.data.zeroshot, zeroshot_extra=cfg.data.zeroshot_extra,
                           rank=rank, world_size=world, device=model.device,
                       dtype=torch.float32, triples=triples)
    if rank == 0:
        out = run_dir / "eval" / f"{tag}_{split}.json"
        out.parent.mkdir(exist_ok=True)
        atomic_write_text(out, json.dumps({"tag": tag, "split": split, **metrics}, indent=1) + "\n")
        log.info("wrote %s", out)
    return metrics


def main(argv: list[str] | None = None) -> int:
    setup_logging()
    parser = argparse.ArgumentParser(prog="kclip-eval", description="Evaluate a kclip_ds checkpoint on a split.")
    parser.add_argument("--run-dir", required=True, type=Path, help="train.output_dir of the run")
    parser.add_argument("--split", default="val", help="val | test | zeroshot (zero-shot accuracy is added whenever data.zeroshot is set)")
    parser.add_argument("--tag", default="latest", help="checkpoint tag (default: latest)")
    parser.add_argument("--out", type=Path, help="also write the metrics to this JSON file (rank 0, atomically)")
    parser.add_argument("--local_rank", "--local-rank", type=int, help=argparse.SUPPRESS)
    parser.add_argument("overrides", nargs="*", help="config overrides, e.g. data.test=path/{000..003}.tar")
    args = parser.parse_args(argv)
    try:
        metrics = run_eval(args.run_dir, args.split, args.tag, args.overrides)
    except (ConfigError, DataError, ModelError, eng.CheckpointError, FileNotFoundError) as exc:
        print(f"kclip-eval: error: {exc}", file=sys.stderr)
        return 2
    if dist.get_rank() == 0:
        print(json.dumps(metrics, indent=1))
        if args.out:
            atomic_write_text(args.out, json.dumps(metrics, indent=1) + "\n")
    dist.barrier()
    dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
