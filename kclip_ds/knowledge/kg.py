"""An in-memory knowledge graph whose entities are texts or images, and readers for the graphs we import.

Knowledge-CLIP (METHODS.md §1) trains on triplets (h, r, t) where an entity is an image *or* a text and
a relation is text.  :class:`KnowledgeGraph` holds exactly that: entities by id, and a de-duplicated set of
directed edges whose relation is the phrase the text tower will read ("is a", "has part").  Readers:

* :func:`read_triples` — generic TSV (``head<TAB>relation<TAB>tail``) or JSON lines
  (``{"head", "relation", "tail"}``), plus an optional JSON mapping ``entity → image file(s)`` that turns
  those entities into image entities.
* :func:`read_conceptnet` — ConceptNet 5 CSV assertion dumps (plain or ``.gz``), English-only by default.
* :func:`read_wordnet` — WordNet 3.0 through nltk, from the Debian ``wordnet-base`` files
  (:func:`prepare_wordnet_data` turns those into the layout nltk accepts).

User errors are :class:`KGError`, one line naming the file (and line) and what to do.
"""

from __future__ import annotations

import functools
import gzip
import hashlib
import json
import os
import re
import shutil
import warnings
from collections import Counter
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

TEXT, IMAGE = "text", "image"
WORDNET_DIR = Path("/usr/share/wordnet")
LEXNAMES_MAN_PAGE = Path("/usr/share/man/man5/lexnames.5WN.gz")
WORDNET_APT = "apt-get install -y --no-install-recommends wordnet-base wordnet-sense-index"
#: The files nltk's WordNetCorpusReader opens (it also needs ``lexnames``, which Debian does not ship).
WORDNET_FILES = ("cntlist.rev", "index.sense", "index.adj", "index.adv", "index.noun", "index.verb", "data.adj",
                 "data.adv", "data.noun", "data.verb", "adj.exc", "adv.exc", "noun.exc", "verb.exc")
_LEX_POS = {"noun": 1, "verb": 2, "adj": 3, "adv": 4}

#: WordNet pointer name → the relation phrase stored on edges (``pointer_names=True`` stores the name).
#: Each pointer and its inverse are both WordNet pointers, so both directions are edges.
WORDNET_RELATIONS: dict[str, str] = {
    "hypernym": "is a", "hyponym": "has subtype",
    "instance_hypernym": "is an instance of", "instance_hyponym": "has instance",
    "part_meronym": "has part", "part_holonym": "is part of",
    "member_meronym": "has member", "member_holonym": "is a member of",
    "substance_meronym": "is made of", "substance_holonym": "is a substance of",
    "topic_domain": "belongs to the topic", "in_topic_domain": "is the topic of",
    "region_domain": "belongs to the region", "in_region_domain": "is the region of",
    "usage_domain": "has the usage", "in_usage_domain": "is the usage of",
    "attribute": "has attribute", "entailment": "entails", "cause": "causes", "also_see": "see also",
    "verb_group": "is in a verb group with", "similar_to": "is similar to", "antonym": "is the opposite of",
    "derivation": "is derivationally related to", "pertainym": "pertains to",
}
#: Pointers between lemmas (lifted to their synsets); the others link synsets.
_LEMMA_POINTERS = {"antonym": "antonyms", "derivation": "derivationally_related_forms", "pertainym": "pertainyms"}
#: Off by default: morphological links between word forms, not facts about concepts.
DEFAULT_WORDNET_RELATIONS = tuple(r for r in WORDNET_RELATIONS if r not in ("derivation", "pertainym"))


class KGError(ValueError):
    """A user error in a knowledge-graph input: one line naming the file (and line) and what to do."""


@dataclass(frozen=True)
class Entity:
    """A node: a text (``text``) or an image (``images``: file paths, or encoded image bytes made in memory;
    an entity with several images shows one of them per triplet)."""

    id: str
    kind: str
    text: str | None = None
    images: tuple[str | bytes, ...] = ()

    def __post_init__(self) -> None:
        if self.kind == TEXT and not (self.text and not self.images):
            raise ValueError(f"text entity {self.id!r} needs a non-empty text and no images")
        if self.kind == IMAGE and not (self.images and self.text is None):
            raise ValueError(f"image entity {self.id!r} needs images and no text")
        if self.kind not in (TEXT, IMAGE):
            raise ValueError(f"entity {self.id!r}: kind must be {TEXT!r} or {IMAGE!r}, got {self.kind!r}")

    def identity(self) -> str:
        """What the graph fingerprint hashes: text, image paths, or image-bytes digests."""
        refs = [r if isinstance(r, str) else hashlib.sha256(r).hexdigest() for r in self.images]
        return json.dumps([self.id, self.kind, self.text, refs], ensure_ascii=False)


class Edge(NamedTuple):
    head: str
    relation: str
    tail: str


@dataclass
class KnowledgeGraph:
    """Entities by id and directed edges in insertion order (duplicates dropped); ``meta`` records where the
    graph came from (source, skipped lines) for manifests."""

    entities: dict[str, Entity] = field(default_factory=dict)
    meta: dict[str, Any] = field(default_factory=dict)
    _edges: dict[Edge, None] = field(default_factory=dict, repr=False)
    _out: dict[str, list[Edge]] | None = field(default=None, repr=False)

    def add_entity(self, entity: Entity) -> Entity:
        """Add ``entity``; re-adding the same entity is a no-op, a different one under its id an error."""
        known = self.entities.setdefault(entity.id, entity)
        if known != entity:
            raise ValueError(f"entity {entity.id!r} is defined twice, differently: {known} vs {entity}")
        return known

    def add_edge(self, head: str, relation: str, tail: str) -> None:
        for name in (head, tail):
            if name not in self.entities:
                raise ValueError(f"edge ({head!r}, {relation!r}, {tail!r}): entity {name!r} was never added")
        if not relation.strip():
            raise ValueError(f"edge ({head!r}, {relation!r}, {tail!r}): empty relation")
        self._edges[Edge(head, relation, tail)] = None
        self._out = None

    def merge(self, other: KnowledgeGraph) -> None:
        """Add every entity and edge of ``other`` (entity ids must agree)."""
        for entity in other.entities.values():
            self.add_entity(entity)
        for edge in other.edges:
            self.add_edge(*edge)

    def edited(self, drop: Iterable[Edge] = (), texts: dict[str, str] | None = None) -> KnowledgeGraph:
        """A copy without the edges ``drop`` and with the text entities of ``texts`` (id → text) re-worded."""
        texts, drop = texts or {}, set(drop)
        unknown = sorted(i for i in texts if i not in self.entities or self.entities[i].kind != TEXT)
        if unknown:
            raise ValueError(f"edited(texts=...): {', '.join(map(repr, unknown))} not a text entity of this graph")
        out = KnowledgeGraph(meta=dict(self.meta))
        for entity in self.entities.values():
            out.add_entity(Entity(entity.id, TEXT, texts[entity.id]) if entity.id in texts else entity)
        for edge in self._edges:
            if edge not in drop:
                out.add_edge(*edge)
        return out

    @property
    def edges(self) -> list[Edge]:
        return list(self._edges)

    def __len__(self) -> int:
        return len(self._edges)

    def out_edges(self, entity_id: str) -> list[Edge]:
        """The entity's outgoing edges, sorted (an index built on first use)."""
        if self._out is None:
            out: dict[str, list[Edge]] = {}
            for edge in self._edges:
                out.setdefault(edge.head, []).append(edge)
            self._out = {k: sorted(v) for k, v in out.items()}
        return self._out.get(entity_id, [])

    def relation_counts(self) -> dict[str, int]:
        return dict(sorted(Counter(e.relation for e in self._edges).items()))

    def kind_counts(self) -> dict[str, int]:
        return dict(sorted(Counter(e.kind for e in self.entities.values()).items()))

    def fingerprint(self) -> str:
        """sha256 of the sorted entities and edges: equal graphs give equal fingerprints, whatever the order."""
        digest = hashlib.sha256()
        for entity_id in sorted(self.entities):
            digest.update(self.entities[entity_id].identity().encode() + b"\n")
        for edge in sorted(self._edges):
            digest.update("\t".join(edge).encode() + b"\n")
        return digest.hexdigest()


# ---------------------------------------------------------------- generic triples (+ image mapping)

def read_image_mapping(path: str | os.PathLike) -> dict[str, tuple[str, ...]]:
    """``{"entity": "file" | ["file", ...]}`` → entity → absolute image paths (relative ones are relative
    to the mapping file's directory); every file must exist."""
    path = Path(path)
    try:
        payload = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise KGError(f"{path}: cannot read the image mapping ({exc}); it must be a JSON object "
                      '{"entity": "image file" or ["file", ...]}') from exc
    if not isinstance(payload, dict):
        raise KGError(f'{path}: the image mapping must be a JSON object {{"entity": "file" or ["file", ...]}}')
    mapping = {}
    for entity, files in payload.items():
        files = [files] if isinstance(files, str) else files
        if not (isinstance(files, list) and files and all(isinstance(f, str) and f for f in files)):
            raise KGError(f"{path}: entity {entity!r}: expected an image path or a non-empty list of paths")
        resolved = tuple(str(path.parent / f) for f in files)
        missing = [f for f in resolved if not Path(f).is_file()]
        if missing:
            raise KGError(f"{path}: entity {entity!r}: image {missing[0]} not found; fix the path "
                          f"(relative paths are relative to {path.parent})")
        mapping[entity] = resolved
    return mapping


def _triple_records(path: Path, fmt: str) -> Iterator[tuple[int, str, str, str]]:
    """(line number, head, relation, tail) of a TSV or JSON-lines file; blank and ``#`` lines are skipped."""
    with open(path, encoding="utf-8-sig") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip() or line.startswith("#"):
                continue
            where = f"{path}:{lineno}"
            if fmt == "tsv":
                fields = line.rstrip("\r\n").split("\t")
                if len(fields) != 3:
                    raise KGError(f"{where}: expected 3 tab-separated fields (head, relation, tail), got "
                                  f"{len(fields)}; fix or delete the line")
            else:
                try:
                    rec = json.loads(line)
                except json.JSONDecodeError as exc:
                    raise KGError(f"{where}: malformed JSON ({exc.msg}); fix or delete the line") from exc
                if not isinstance(rec, dict) or not all(isinstance(rec.get(k), str)
                                                        for k in ("head", "relation", "tail")):
                    raise KGError(f'{where}: expected {{"head": str, "relation": str, "tail": str}}; '
                                  "fix or delete the line")
                fields = [rec["head"], rec["relation"], rec["tail"]]
            head, relation, tail = (s.strip() for s in fields)
            if not (head and relation and tail):
                raise KGError(f"{where}: empty head, relation or tail; fix or delete the line")
            yield lineno, head, relation, tail


def read_triples(path: str | os.PathLike, fmt: str = "auto",
                 images: str | os.PathLike | Mapping[str, tuple[str, ...]] | None = None) -> KnowledgeGraph:
    """A graph from ``(head, relation, tail)`` lines; entities named in ``images`` are image entities,
    every other entity is the text of its name.  ``fmt``: ``tsv``, ``jsonl`` or ``auto`` (by extension)."""
    path = Path(path)
    if fmt == "auto":
        fmt = {".tsv": "tsv", ".txt": "tsv", ".jsonl": "jsonl"}.get(path.suffix.lower(), "")
        if not fmt:
            raise KGError(f"{path}: cannot guess the format from the extension; pass the format (tsv or jsonl)")
    if fmt not in ("tsv", "jsonl"):
        raise KGError(f"unknown triple format {fmt!r}; choose tsv or jsonl")
    if not path.is_file():
        raise KGError(f"{path}: no such file")
    mapping = read_image_mapping(images) if isinstance(images, (str, os.PathLike)) else dict(images or {})
    kg = KnowledgeGraph(meta={"source": str(path.resolve()), "format": fmt})
    try:
        for _, head, relation, tail in _triple_records(path, fmt):
            for name in (head, tail):
                if name not in kg.entities:
                    kg.add_entity(Entity(name, IMAGE, images=tuple(mapping[name])) if name in mapping
                                  else Entity(name, TEXT, text=name))
            kg.add_edge(head, relation, tail)
    except UnicodeDecodeError as exc:
        raise KGError(f"{path}: not UTF-8 text ({exc.reason} at byte {exc.start}); re-encode it") from exc
    return kg


# ---------------------------------------------------------------- ConceptNet

def conceptnet_relation_text(uri: str) -> str:
    """``/r/IsA`` → ``is a``, ``/r/dbpedia/genre`` → ``dbpedia genre`` (CamelCase split, lower case)."""
    words = re.findall(r"[A-Z]+(?=[A-Z][a-z])|[A-Z]?[a-z]+|[A-Z]+|\d+", uri.removeprefix("/r/"))
    return " ".join(words).lower()


def conceptnet_concept(uri: str) -> tuple[str, str, str]:
    """``/c/en/ice_cream/n/wn/food`` → (id ``/c/en/ice_cream``, language ``en``, text ``ice cream``):
    part-of-speech and sense suffixes are dropped, so every sense of a term is one entity."""
    parts = uri.split("/")
    if len(parts) < 4 or parts[1] != "c" or not parts[2] or not parts[3]:
        raise ValueError(f"not a ConceptNet concept URI: {uri!r}")
    return "/".join(parts[:4]), parts[2], parts[3].replace("_", " ")


def read_conceptnet(path: str | os.PathLike, lang: str = "en", limit: int | None = None) -> KnowledgeGraph:
    """Assertions whose two concepts are both in ``lang`` (``limit``: stop after that many edges).

    A line is ``/a/[...]<TAB>/r/Rel<TAB>/c/en/head<TAB>/c/en/tail<TAB>{json}``; the JSON (weights, sources)
    is not read.  Assertions touching another language or an external URL are skipped and counted.
    """
    path = Path(path)
    if not path.is_file():
        raise KGError(f"{path}: no such file")
    kg = KnowledgeGraph(meta={"source": str(path.resolve()), "format": "conceptnet", "lang": lang})
    skipped = 0
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rt", encoding="utf-8") as f:
            for lineno, line in enumerate(f, 1):
                if limit is not None and len(kg) >= limit:
                    break
                fields = line.rstrip("\r\n").split("\t")
                if len(fields) != 5 or not fields[1].startswith("/r/"):
                    raise KGError(f"{path}:{lineno}: not a ConceptNet assertion (expected 5 tab-separated fields: "
                                  "/a/ uri, /r/ relation, head, tail, JSON); is this a ConceptNet CSV dump?")
                if not (fields[2].startswith(f"/c/{lang}/") and fields[3].startswith(f"/c/{lang}/")):
                    skipped += 1
                    continue
                try:
                    (head, _, head_text), (tail, _, tail_text) = map(conceptnet_concept, fields[2:4])
                except ValueError as exc:
                    raise KGError(f"{path}:{lineno}: {exc}; fix or delete the line") from exc
                kg.add_entity(Entity(head, TEXT, text=head_text))
                kg.add_entity(Entity(tail, TEXT, text=tail_text))
                kg.add_edge(head, conceptnet_relation_text(fields[1]), tail)
    except (UnicodeDecodeError, EOFError, gzip.BadGzipFile) as exc:
        raise KGError(f"{path}: unreadable ({exc}); download the dump again") from exc
    kg.meta["skipped_other_language"] = skipped
    return kg


# ---------------------------------------------------------------- WordNet

def lexnames_from_man_page(man_page: str | os.PathLike = LEXNAMES_MAN_PAGE) -> str:
    """The ``lexnames`` file nltk needs (``NN<TAB>name<TAB>pos-number``), from the table in lexnames(5WN)."""
    rows = []
    with gzip.open(man_page, "rt", encoding="utf-8") as f:
        for line in f:
            cells = [c.strip() for c in line.split("\t")]
            if len(cells) >= 2 and re.fullmatch(r"\d\d", cells[0]) and re.fullmatch(r"(noun|verb|adj|adv)\.\w+",
                                                                                   cells[1]):
                rows.append((int(cells[0]), cells[1]))
    if [number for number, _ in rows] != list(range(45)):
        raise KGError(f"{man_page}: expected the 45 WordNet 3.0 lexicographer files 00..44, found {len(rows)}; "
                      f"reinstall wordnet-base ({WORDNET_APT})")
    return "".join(f"{n:02d}\t{name}\t{_LEX_POS[name.split('.')[0]]}\n" for n, name in rows)


def default_cache_dir() -> Path:
    return Path(os.environ.get("XDG_CACHE_HOME", "~/.cache")).expanduser() / "kclip_ds"


def prepare_wordnet_data(cache_dir: str | os.PathLike | None = None, source: str | os.PathLike = WORDNET_DIR,
                         man_page: str | os.PathLike = LEXNAMES_MAN_PAGE) -> Path:
    """An nltk data directory (``<cache>/nltk_data``, with ``corpora/wordnet/``) built from Debian's files.

    The files are copied, not linked: nltk 3.10's path sandbox refuses symlinks and hard links that lead
    outside its data root.  Copies are refreshed when the source's size or mtime changes.
    """
    source = Path(source)
    missing = [name for name in WORDNET_FILES if not (source / name).is_file()]
    if missing:
        raise KGError(f"WordNet 3.0 not found in {source} (missing {', '.join(missing[:3])}"
                      f"{', …' if len(missing) > 3 else ''}); install it: {WORDNET_APT}")
    if not Path(man_page).is_file():
        raise KGError(f"{man_page} not found (the lexnames table nltk needs is built from it); install it: "
                      f"{WORDNET_APT} (and allow /usr/share/man in /etc/dpkg/dpkg.cfg.d if man pages are excluded)")
    root = Path(cache_dir) if cache_dir is not None else default_cache_dir() / "nltk_data"
    corpus = root / "corpora" / "wordnet"
    corpus.mkdir(parents=True, exist_ok=True)
    for name in WORDNET_FILES:
        src, dst = source / name, corpus / name
        if dst.is_file() and (dst.stat().st_size, int(dst.stat().st_mtime)) == (src.stat().st_size,
                                                                                 int(src.stat().st_mtime)):
            continue
        tmp = dst.with_name(f".{name}.tmp-{os.getpid()}")
        shutil.copy2(src, tmp)
        os.replace(tmp, dst)
    lexnames = lexnames_from_man_page(man_page)
    if not (corpus / "lexnames").is_file() or (corpus / "lexnames").read_text() != lexnames:
        tmp = corpus / f".lexnames.tmp-{os.getpid()}"
        tmp.write_text(lexnames)
        os.replace(tmp, corpus / "lexnames")
    return root


@functools.lru_cache(maxsize=4)
def _load_wordnet(root: str):
    import nltk.data
    from nltk.corpus.reader.wordnet import WordNetCorpusReader

    if root not in nltk.data.path:  # nltk only opens files under its data path
        nltk.data.path.append(root)
    with warnings.catch_warnings():  # "multilingual functions are not available": we read English only
        warnings.simplefilter("ignore", UserWarning)
        return WordNetCorpusReader(str(Path(root) / "corpora" / "wordnet"), None)


def load_wordnet(cache_dir: str | os.PathLike | None = None, **prepare: Any):
    """nltk's WordNet 3.0 reader over :func:`prepare_wordnet_data`'s directory (one per process and dir)."""
    return _load_wordnet(str(prepare_wordnet_data(cache_dir, **prepare).resolve()))


def synset_text(synset) -> str:
    """``"dog, domestic dog, Canis familiaris: a member of the genus Canis …"`` — lemmas, then the gloss."""
    return f"{', '.join(n.replace('_', ' ') for n in synset.lemma_names())}: {synset.definition()}"


def synset_edges(synset, relations: Iterable[str] = DEFAULT_WORDNET_RELATIONS) -> list[tuple[str, Any]]:
    """(pointer name, target synset) for every pointer of ``synset`` in ``relations``, in a fixed order."""
    edges = []
    for name in relations:
        if name in _LEMMA_POINTERS:
            targets = [t.synset() for lemma in synset.lemmas() for t in getattr(lemma, _LEMMA_POINTERS[name])()]
        else:
            targets = getattr(synset, name + "s")()  # hypernym → Synset.hypernyms()
        edges.extend((name, t) for t in sorted(set(targets), key=lambda s: s.name()))
    return edges


def read_wordnet(wordnet, relations: Iterable[str] = DEFAULT_WORDNET_RELATIONS,
                 synsets: Iterable[Any] | None = None, pointer_names: bool = False) -> KnowledgeGraph:
    """Synsets as text entities (:func:`synset_text`) and their pointers as edges.

    ``synsets``: restrict to the subgraph they induce (edges with both ends inside); default all of WordNet.
    Relations are :data:`WORDNET_RELATIONS` phrases, or the pointer names with ``pointer_names``.
    """
    relations = tuple(relations)
    unknown = sorted(set(relations) - set(WORDNET_RELATIONS))
    if unknown:
        raise KGError(f"unknown WordNet relation(s) {', '.join(unknown)}; choose from {', '.join(WORDNET_RELATIONS)}")
    nodes = list(wordnet.all_synsets()) if synsets is None else sorted(set(synsets), key=lambda s: s.name())
    inside = {s.name() for s in nodes}
    kg = KnowledgeGraph(meta={"source": "wordnet-3.0", "relations": list(relations)})
    for synset in nodes:
        kg.add_entity(Entity(synset.name(), TEXT, text=synset_text(synset)))
    for synset in nodes:
        for name, target in synset_edges(synset, relations):
            if target.name() in inside:
                kg.add_edge(synset.name(), name if pointer_names else WORDNET_RELATIONS[name], target.name())
    return kg


def wordnet_neighbourhood(wordnet, seeds: Iterable[str], hops: int,
                          relations: Iterable[str] = DEFAULT_WORDNET_RELATIONS) -> list[Any]:
    """The seed synsets, all their hypernym ancestors (up to ``entity.n.01``), and every synset within
    ``hops`` pointer steps of those — sorted by name."""
    relations = tuple(relations)
    core = set()
    for name in seeds:
        synset = wordnet.synset(name)
        core |= {synset, *synset.closure(lambda s: s.hypernyms() + s.instance_hypernyms())}
    nodes, frontier = set(core), set(core)
    for _ in range(hops):
        frontier = {t for s in frontier for _, t in synset_edges(s, relations)} - nodes
        nodes |= frontier
    return sorted(nodes, key=lambda s: s.name())
