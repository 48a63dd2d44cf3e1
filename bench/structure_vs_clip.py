"""CLIP vs NegCLIP vs Structure-CLIP on the shapes world: same init, data, steps and seed.

    python bench/structure_vs_clip.py --seeds 0 [--steps 600] [--variants clip,negclip] [--arch A] [--out r.json]

Each variant is a 2-rank CPU run (torchrun, ZeRO-2) of configs/demo.yaml or configs/demo_structure.yaml;
the table reports the final val relation-swap and attribute-swap accuracy, val R@1 (image→text) and the
median step time.  Needs the demo shards (`make data`).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import statistics
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
VARIANTS = {
    "clip": ("configs/demo.yaml", []),
    "negclip": ("configs/demo.yaml", ["data.negatives=[relation,attribute]"]),
    "structure_clip": ("configs/demo_structure.yaml", []),
    "structure_clip+bias": ("configs/demo_structure.yaml", ["method.relation_bias=true"]),
    # diagnostics for the attribute-swap question (docs/RESULTS.md): one kind of negative at a time
    "negclip_attribute_only": ("configs/demo.yaml", ["data.negatives=[attribute]"]),
    "negclip_relation_only": ("configs/demo.yaml", ["data.negatives=[relation]"]),
}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run(variant: str, seed: int, steps: int, root: Path, arch: str | None = None) -> dict:
    config, extra = VARIANTS[variant]
    extra = [*extra, f"model.arch={arch}"] if arch else extra
    out = root / f"{variant}_seed{seed}"
    shutil.rmtree(out, ignore_errors=True)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
           "--master_port", str(free_port()), "-m", "kclip_ds.train", "--config", config, *extra,
           f"train.output_dir={out}", f"train.seed={seed}", f"train.max_steps={steps}", f"train.eval_every={steps}",
           f"train.save_every={steps}", "train.progress_bar=false"]
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1"}
    subprocess.run(cmd, cwd=REPO, env=env, check=True, stdout=subprocess.DEVNULL)
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in records if r["kind"] == "train"]
    final = [r for r in records if r["kind"] == "eval"][-1]
    batch = 2 * 64  # global samples per step in both configs
    return {"variant": variant, "seed": seed, "relation_swap": final.get("val/relation_swap_acc"),
            "attribute_swap": final.get("val/attribute_swap_acc"), "R@1": final["val/image_to_text_R@1"],
            "step_s": statistics.median(batch / r["samples_per_s"] for r in train[1:])}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seeds", default="0", help="comma-separated seeds")
    parser.add_argument("--steps", type=int, default=600)
    parser.add_argument("--variants", default=",".join(VARIANTS))
    parser.add_argument("--root", type=Path, default=REPO / "runs" / "structure_vs_clip")
    parser.add_argument("--arch", help="model.arch for every variant (default: the configs' kclip-tiny), e.g. "
                        "bench/archs/kclip-tiny-p8.json")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    rows = [run(v, int(s), args.steps, args.root, args.arch)
            for s in args.seeds.split(",") for v in args.variants.split(",")]
    print(f"{'variant':<22}{'seed':>5}{'rel swap':>10}{'attr swap':>11}{'R@1':>8}{'step s':>9}")
    for r in rows:
        print(f"{r['variant']:<22}{r['seed']:>5}{r['relation_swap']:>10.3f}{r['attribute_swap']:>11.3f}"
              f"{r['R@1']:>8.3f}{r['step_s']:>9.3f}")
    if args.out:
        args.out.write_text(json.dumps({"command": " ".join(sys.argv), "rows": rows}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
