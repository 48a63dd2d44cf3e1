"""Write the synthetic "shapes world" demo dataset as webdataset shards (see kclip_ds.data.demo_world).

    python tools/make_demo_data.py --out data/demo [--seed 0] [--train-samples 12000] [--val-samples 500]
        [--test-samples 500] [--zeroshot-samples 400] [--shard-size 1000] [--image-size 64]

Splits whose manifest already matches the arguments are skipped, so rerunning is cheap.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

try:
    import kclip_ds  # noqa: F401
except ImportError:  # run from a checkout without installing
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from kclip_ds.data.demo_world import DEFAULT_SPLIT_SIZES, SplitResult, make_demo_data


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True, help="output directory (one subdirectory per split)")
    parser.add_argument("--seed", type=int, default=0)
    for split, size in DEFAULT_SPLIT_SIZES.items():
        parser.add_argument(f"--{split}-samples", type=int, default=size, help=f"samples in {split}/")
    parser.add_argument("--shard-size", type=int, default=1000, help="samples per shard (last may be smaller)")
    parser.add_argument("--image-size", type=int, default=64, help="side of the square images in pixels")
    return parser.parse_args(argv)


def print_split(result: SplitResult, seconds: float) -> None:
    """One summary line per split."""
    total, shards = result.manifest.total, len(result.manifest.shards)
    if result.skipped:
        print(f"{result.split}: {result.directory} exists, skipped ({total} samples in {shards} shards)")
    else:
        print(f"{result.split}: wrote {total} samples in {shards} shards to {result.directory} ({seconds:.1f}s)")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    split_sizes = {split: getattr(args, f"{split}_samples") for split in DEFAULT_SPLIT_SIZES}
    make_demo_data(args.out, seed=args.seed, split_sizes=split_sizes, shard_size=args.shard_size,
                   image_size=args.image_size, on_split_done=print_split)
    return 0


if __name__ == "__main__":
    sys.exit(main())
