"""Write the Fashion-MNIST × WordNet demo data: pairs, class and hypernym zero-shot splits, triplets.

    python tools/make_fashion_kg.py --out DIR [--limit-per-class N] [--val-per-class 500]
        [--triplet-images-per-class 1000] [--wordnet-hops 2] [--hops 1] [--max-edges 8] [--no-tail-neighbourhood]
        [--shard-size 1000] [--seed 0] [--source /usr/share/datasets/fashion-mnist] [--wordnet-cache DIR]

Needs apt-get install -y --no-install-recommends dataset-fashion-mnist wordnet-base wordnet-sense-index.
The logic and the output layout are in kclip_ds/knowledge/fashion.py.  Rerunning with the same
arguments reuses finished shards.  User errors exit with code 2 and a one-line message.
"""

from __future__ import annotations

import argparse
import importlib.util
import sys
from pathlib import Path

if importlib.util.find_spec("kclip_ds") is None:  # run from a checkout without installing
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="make_fashion_kg", description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True, help="output directory")
    parser.add_argument("--limit-per-class", type=int, default=None,
                        help="at most N images of each class in every split (small builds)")
    parser.add_argument("--val-per-class", type=int, default=500,
                        help="train images per class held out as pairs/val (default 500)")
    parser.add_argument("--triplet-images-per-class", type=int, default=1000,
                        help="train images per class that become image entities of the KG (default 1000)")
    parser.add_argument("--wordnet-hops", type=int, default=2,
                        help="WordNet pointer steps around the classes and their hypernym paths (default 2)")
    parser.add_argument("--drop-class-links", action="store_true",
                        help="leave out WordNet edges between two class synsets (T-shirt —is a→ shirt): an intervention")
    parser.add_argument("--class-text", choices=("gloss", "lemmas"), default="gloss",
                        help="class entity texts: lemmas and gloss (default), or lemmas only: an intervention")
    parser.add_argument("--hops", type=int, default=1, help="neighbourhood hops stored per triplet (default 1)")
    parser.add_argument("--max-edges", type=int, default=8, help="neighbourhood edges at most (default 8)")
    parser.add_argument("--no-tail-neighbourhood", action="store_true", help="store the head's neighbourhood only")
    parser.add_argument("--shard-size", type=int, default=1000, help="samples per shard (default 1000)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--source", default=None, help="Fashion-MNIST IDX directory (default: Debian's)")
    parser.add_argument("--wordnet-cache", default=None, help="where nltk's copy of WordNet is prepared")
    return parser


def main(argv: list[str] | None = None, wordnet=None) -> int:
    """``wordnet``: an already loaded nltk reader (tests pass one to skip the load)."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.shard_size < 1 or args.hops < 0 or args.max_edges < 0 or args.wordnet_hops < 0:
        parser.error("--shard-size must be >= 1, --hops, --max-edges and --wordnet-hops >= 0")
    from kclip_ds.knowledge.fashion import FASHION_DIR, make_fashion_kg
    from kclip_ds.knowledge.kg import KGError
    from kclip_ds.knowledge.triplet_shards import NeighbourhoodConfig

    try:
        summary = make_fashion_kg(
            args.out, source=args.source or FASHION_DIR, limit_per_class=args.limit_per_class,
            val_per_class=args.val_per_class, triplet_images_per_class=args.triplet_images_per_class,
            wordnet_hops=args.wordnet_hops, shard_size=args.shard_size, seed=args.seed, wordnet=wordnet,
            wordnet_cache=args.wordnet_cache, drop_class_links=args.drop_class_links,
            class_text=args.class_text,
            neighbourhood=NeighbourhoodConfig(args.hops, args.max_edges, not args.no_tail_neighbourhood, args.seed))
    except (KGError, OSError) as exc:
        print(f"make_fashion_kg: error: {str(exc).replace(chr(10), ' ')}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("make_fashion_kg: interrupted; rerun to finish the missing shards", file=sys.stderr)
        return 130
    counts = ", ".join(f"{k} {v}" for k, v in summary["counts"].items())
    print(f"done in {summary['last_run_seconds']}s: {counts}; summary: {Path(args.out) / 'fashion_kg.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
