#!/usr/bin/env python
"""Export a kclip_ds run to Hugging Face (CLIPModel + CLIPProcessor) or open_clip format.

    python tools/convert_to_hf.py --run-dir runs/demo --out exports/demo-hf
    python tools/convert_to_hf.py --run-dir runs/demo --tag global_step400 --out exports/oc --format open_clip
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

try:
    import kclip_ds  # noqa: F401
except ImportError:  # run from a checkout without installing
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[1])
    parser.add_argument("--run-dir", required=True, type=Path, help="the run's train.output_dir")
    parser.add_argument("--tag", default="latest", help="checkpoint tag (default: latest)")
    parser.add_argument("--out", required=True, type=Path, help="output directory (must not exist or be empty)")
    parser.add_argument("--format", default="hf", choices=["hf", "open_clip"])
    args = parser.parse_args(argv)

    from kclip_ds.engine import CheckpointError
    from kclip_ds.export.convert import convert
    from kclip_ds.export.hf import ExportError
    from kclip_ds.models.towers import ModelError

    try:
        out = convert(args.run_dir, args.out, tag=args.tag, fmt=args.format)
    except (ExportError, CheckpointError, ModelError) as exc:
        print(f"convert_to_hf: error: {exc}", file=sys.stderr)
        return 2
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
