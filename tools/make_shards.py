"""Turn an image folder + captions file into webdataset shards with a manifest.

    python tools/make_shards.py --images IMAGE_DIR --captions FILE --out OUT_DIR \\
        [--format auto|csv|tsv|jsonl|coco] [--shard-size 1000] [--image-key filepath] \\
        [--caption-key title] [--strict] [--workers 1]

Rerunning with the same arguments reuses finished shards and writes only missing ones.
User errors exit with code 2 and a one-line ``make_shards: error: ...`` message.
"""

from __future__ import annotations

import argparse
import importlib.util
import sys
from pathlib import Path

if importlib.util.find_spec("kclip_ds") is None:  # run from a checkout without installing
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

FORMATS = ("auto", "csv", "tsv", "jsonl", "coco")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="make_shards", description="Write webdataset shards (+ manifest.json) from images and captions."
    )
    parser.add_argument("--images", required=True, help="image directory (row paths are relative to it)")
    parser.add_argument("--captions", required=True, help="captions file: .csv, .tsv, .jsonl or COCO .json")
    parser.add_argument("--out", required=True, help="output directory for the shards")
    parser.add_argument("--format", default="auto", choices=FORMATS,
                        help="input format (default: from the captions file's extension)")
    parser.add_argument("--shard-size", type=int, default=1000, help="input rows per shard (default 1000)")
    parser.add_argument("--image-key", default=None,
                        help="image path column/field (default: filepath for csv/tsv, image for jsonl)")
    parser.add_argument("--caption-key", default=None,
                        help="caption column/field (default: title for csv/tsv, caption for jsonl)")
    parser.add_argument("--strict", action="store_true", help="fail on the first bad sample (default: skip)")
    parser.add_argument("--workers", type=int, default=1, help="shards written in parallel (default 1)")
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.shard_size < 1:
        parser.error("--shard-size must be at least 1")
    if args.workers < 1:
        parser.error("--workers must be at least 1")
    from kclip_ds.data.make_shards import make_shards  # imported here: --help stays fast
    from kclip_ds.data.shards import run_shard_tool

    return run_shard_tool("make_shards", lambda: make_shards(
        args.images, args.captions, args.out, fmt=args.format, shard_size=args.shard_size, image_key=args.image_key,
        caption_key=args.caption_key, strict=args.strict, workers=args.workers))


if __name__ == "__main__":
    sys.exit(main())
