"""Parse every caption of a shard directory into a scene graph, writing a new shard directory.

    python tools/parse_scene_graphs.py --input SHARD_DIR --out OUT_DIR [--keep-existing] [--workers 1]

OUT_DIR gets the same shards (names, samples, counts) with the parsed graph as ``sg.json``, or as
``sg_parsed.json`` with ``--keep-existing`` (the input's ``sg.json`` stays), plus ``manifest.json`` whose
``extra`` records the parser versions, the empty/failed parse counts and the agreement with the input's
``sg.json``.  Rerunning reuses finished shards.  User errors exit with code 2 and a one-line
``parse_scene_graphs: error: ...`` message.  The logic lives in kclip_ds/knowledge/scene_graph.py.
"""

from __future__ import annotations

import argparse
import importlib.util
import sys
from pathlib import Path

if importlib.util.find_spec("kclip_ds") is None:  # run from a checkout without installing
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="parse_scene_graphs",
                                     description="Add scene graphs parsed from the captions to webdataset shards.")
    parser.add_argument("--input", required=True, help="input shard directory (with manifest.json)")
    parser.add_argument("--out", required=True, help="output shard directory (new, or one this tool began)")
    parser.add_argument("--keep-existing", action="store_true",
                        help="write the parsed graph as sg_parsed.json and keep the input's sg.json")
    parser.add_argument("--workers", type=int, default=1,
                        help="shards parsed in parallel, each worker loading spaCy once (default 1)")
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.workers < 1:
        parser.error("--workers must be at least 1")
    from kclip_ds.data.shards import run_shard_tool  # imported here: --help stays fast
    from kclip_ds.knowledge.scene_graph import parse_shards

    return run_shard_tool("parse_scene_graphs", lambda: parse_shards(
        args.input, args.out, keep_existing=args.keep_existing, workers=args.workers), user_errors=(ImportError,))


if __name__ == "__main__":
    sys.exit(main())
