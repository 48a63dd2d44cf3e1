"""Precompute a frozen teacher CLIP's features into a shard directory, for Knowledge-CLIP's distillation.

    python tools/precompute_teacher.py --input SHARD_DIR --out OUT_DIR --arch ARCH --pretrained FILE \
        [--batch-size 64] [--device cpu] [--workers 1]

OUT_DIR gets the same shards (names, samples, every member byte-identical) with ``teacher.npy`` added to
each sample: float16 [2, D], the teacher's L2-normalised image and text features.  Its ``manifest.json``
records the teacher (arch, weights path and sha256, dim, dtype, logit scale); train with
``method.kd_teacher=features`` on OUT_DIR.  Rerunning reuses finished shards.  User errors exit with code 2
and a one-line ``precompute_teacher: error: ...`` message.  The logic lives in kclip_ds/knowledge/teacher.py.
"""

from __future__ import annotations

import argparse
import importlib.util
import sys
from pathlib import Path

if importlib.util.find_spec("kclip_ds") is None:  # run from a checkout without installing
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="precompute_teacher",
                                     description="Add a frozen teacher's image and text features to webdataset "
                                                 "shards (teacher.npy per sample).")
    parser.add_argument("--input", required=True, help="input shard directory (with manifest.json)")
    parser.add_argument("--out", required=True, help="output shard directory (new, or one this tool began)")
    parser.add_argument("--arch", required=True, help="open_clip model name or a path to an open_clip model JSON")
    parser.add_argument("--pretrained", required=True,
                        help="local open_clip weights file of the teacher (never a hub name); '' with "
                             "--allow-random-teacher for tests")
    parser.add_argument("--allow-random-teacher", action="store_true",
                        help="accept --pretrained '' (a seeded random init; only for tests)")
    parser.add_argument("--batch-size", type=int, default=64, help="samples per teacher forward (default 64)")
    parser.add_argument("--device", default="cpu", help="torch device of the teacher, e.g. cpu or cuda (default cpu)")
    parser.add_argument("--workers", type=int, default=1,
                        help="shards encoded in parallel, each worker loading the teacher once (default 1)")
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.batch_size < 1 or args.workers < 1:
        parser.error("--batch-size and --workers must be at least 1")
    if not args.pretrained and not args.allow_random_teacher:
        parser.error("--pretrained '' means a random teacher; pass --allow-random-teacher (tests only) or a "
                     "weights file")
    from kclip_ds.data.shards import run_shard_tool  # imported here: --help stays fast
    from kclip_ds.knowledge.teacher import precompute_teacher

    return run_shard_tool("precompute_teacher", lambda: precompute_teacher(
        args.input, args.out, arch=args.arch, pretrained=args.pretrained, batch_size=args.batch_size,
        workers=args.workers, device=args.device, allow_random=args.allow_random_teacher), user_errors=(ImportError,))


if __name__ == "__main__":
    sys.exit(main())
