"""Import a knowledge graph and write it as webdataset triplet shards (see kclip_ds/knowledge/triplet_shards.py).

    python tools/import_kg.py --out DIR (--wordnet | --conceptnet FILE[.gz] | --triples FILE [--images MAP.json])
        [--format auto|tsv|jsonl] [--relations hypernym,part_meronym,…] [--pointer-names] [--lang en]
        [--limit N] [--hops 1] [--max-edges 8] [--tail-neighbourhood] [--seed 0] [--shard-size 1000]
        [--wordnet-cache DIR]

WordNet 3.0 comes from Debian's files (apt-get install -y --no-install-recommends wordnet-base
wordnet-sense-index), read by nltk.  Rerunning with the same arguments reuses finished shards.
User errors exit with code 2 and a one-line ``import_kg: error: ...`` message.
"""

from __future__ import annotations

import argparse
import importlib.util
import sys
import time
from pathlib import Path

if importlib.util.find_spec("kclip_ds") is None:  # run from a checkout without installing
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="import_kg", description="Write a knowledge graph as triplet shards.")
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--wordnet", action="store_true", help="all of WordNet 3.0 (synsets as texts)")
    source.add_argument("--conceptnet", help="a ConceptNet 5 CSV assertion dump (.csv or .csv.gz)")
    source.add_argument("--triples", help="a TSV (head, relation, tail) or JSON-lines file")
    parser.add_argument("--out", required=True, help="output directory for the triplet shards")
    parser.add_argument("--images", help="with --triples: JSON {entity: image file or [files]} (image entities)")
    parser.add_argument("--format", default="auto", choices=("auto", "tsv", "jsonl"), help="--triples format")
    parser.add_argument("--relations", help="with --wordnet: comma-separated pointer names (default: all but "
                                            "derivation and pertainym)")
    parser.add_argument("--pointer-names", action="store_true",
                        help="with --wordnet: relation text is the pointer name (hypernym), not a phrase (is a)")
    parser.add_argument("--lang", default="en", help="with --conceptnet: language of both concepts (default en)")
    parser.add_argument("--limit", type=int, default=None, help="with --conceptnet: stop after N edges")
    parser.add_argument("--hops", type=int, default=1, help="neighbourhood hops (default 1)")
    parser.add_argument("--max-edges", type=int, default=8, help="neighbourhood edges at most (default 8)")
    parser.add_argument("--tail-neighbourhood", action="store_true", help="also store the tail's neighbourhood")
    parser.add_argument("--seed", type=int, default=0, help="order and neighbourhood sampling seed")
    parser.add_argument("--shard-size", type=int, default=1000, help="triplets per shard (default 1000)")
    parser.add_argument("--wordnet-cache", default=None,
                        help="where nltk's copy of WordNet is prepared (default ~/.cache/kclip_ds/nltk_data)")
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.shard_size < 1 or args.hops < 0 or args.max_edges < 0:
        parser.error("--shard-size must be >= 1, --hops and --max-edges >= 0")
    if args.images and not args.triples:
        parser.error("--images goes with --triples")
    from kclip_ds.knowledge import kg as kgmod  # imported here: --help stays fast
    from kclip_ds.knowledge.triplet_shards import NeighbourhoodConfig, write_triplet_shards

    started = time.perf_counter()
    try:
        if args.wordnet:
            relations = args.relations.split(",") if args.relations else kgmod.DEFAULT_WORDNET_RELATIONS
            graph = kgmod.read_wordnet(kgmod.load_wordnet(args.wordnet_cache), relations,
                                       pointer_names=args.pointer_names)
        elif args.conceptnet:
            graph = kgmod.read_conceptnet(args.conceptnet, lang=args.lang, limit=args.limit)
        else:
            graph = kgmod.read_triples(args.triples, args.format, images=args.images)
        print(f"read {len(graph)} edges, entities {graph.kind_counts()} ({time.perf_counter() - started:.1f}s)")
        config = NeighbourhoodConfig(args.hops, args.max_edges, args.tail_neighbourhood, args.seed)
        result = write_triplet_shards(graph, args.out, shard_size=args.shard_size, neighbourhood=config)
    except (kgmod.KGError, OSError) as exc:
        print(f"import_kg: error: {str(exc).replace(chr(10), ' ')}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("import_kg: interrupted; rerun to finish the missing shards", file=sys.stderr)
        return 130
    state = "already complete" if result.skipped else f"{result.written} written, {result.reused} reused"
    print(f"{result.manifest.total} triplets in {len(result.manifest.shards)} shards ({state}) in "
          f"{Path(args.out) / 'manifest.json'} ({time.perf_counter() - started:.1f}s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
