"""Run several training configs in one 2-rank launch (start-up costs ~9 s a launch).

    torchrun --nproc_per_node 2 tests/dist/run_configs.py CONFIGS.json RESULTS.json
CONFIGS.json: [{"name": …, "overrides": ["train.max_steps=2", …]}, …] on top of configs/demo.yaml.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch.distributed as dist

from kclip_ds.config import load_config
from kclip_ds.logs import setup_logging
from kclip_ds.train import run_training

REPO = Path(__file__).resolve().parents[2]


def main(configs_path: str, results_path: str) -> int:
    setup_logging()
    results = {}
    for entry in json.loads(Path(configs_path).read_text()):
        cfg = load_config(REPO / "configs/demo.yaml", entry["overrides"])
        results[entry["name"]] = run_training(cfg)
    if dist.get_rank() == 0:
        Path(results_path).write_text(json.dumps(results, default=float))
    dist.barrier()
    dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main(*sys.argv[1:]))
