"""Hard-negative captions: Structure-CLIP scene-graph swaps and NegCLIP / ARO word-order perturbations.

* :func:`relation_swap` exchanges the subject and object spans of one relation ("an astronaut rides a
  horse" → "a horse rides an astronaut"); :func:`attribute_swap` exchanges the attributes of two objects
  at every mention ("a red circle … a blue square" → "a blue circle … a red square").  Both fix the
  article "a"/"an" before every span they rewrite (first-letter vowel rule: "an umbrella", but also
  "an unicorn") and return None rather than ever returning the caption itself.
* ARO's four COCO/Flickr30k-Order perturbations (mertyg/vision-language-models-are-bows): nouns shuffled
  among noun slots and adjectives among adjective slots, other words shuffled, words shuffled within
  trigrams, trigrams shuffled; truncated to 30 words.  Like ARO's they may return the input unchanged
  (one noun, one trigram, repeated words): see :func:`is_perturbed`.  A regex tokeniser stands in for
  ARO's NLTK one; ARO's evaluator also applies :func:`aro_pre_caption` to every option.
* :func:`sample_negative` is the per-sample entry point of the data pipeline: deterministic per
  ``(seed, key, epoch)`` through a sha256-seeded :class:`random.Random` (no salted ``hash``, no global RNG).
"""

from __future__ import annotations

import hashlib
import itertools
import json
import random
import re
from collections.abc import Callable, Sequence
from typing import Any

ARO_MAX_WORDS = 30
NOUN_TAGS = frozenset({"NN", "NNS", "NNP", "NNPS"})
ADJECTIVE_TAGS = frozenset({"JJ", "JJR", "JJS"})
_NOUN_OR_ADJECTIVE = NOUN_TAGS | ADJECTIVE_TAGS
GRAPH_KINDS = ("relation", "attribute")
PERTURBATION_KINDS = ("nouns_adjectives", "other_words", "within_trigrams", "trigrams")
_MAX_ATTRIBUTES = 4  # attribute permutations tried per object when locating its mentions
_TOKEN = re.compile(r"\w+(?:['’-]\w+)*|[^\w\s]")
_ARTICLE_BEFORE = re.compile(r"(?<!\w)(an?)(\s+)$", re.IGNORECASE)

Span = tuple[int, int]
Edit = tuple[int, int, str]  # (start, end, replacement) in the original caption


def _phrase_pattern(words: Sequence[str], head: Sequence[str] = ()) -> re.Pattern[str]:
    """Whole-word, case-insensitive match of ``head`` + ``words`` (any whitespace between); group 1 = head."""
    def join(ws: Sequence[str]) -> str:
        return r"\s+".join(re.escape(w) for w in ws)
    prefix = f"({join(head)})\\s+" if head else ""
    return re.compile(rf"(?<!\w){prefix}{join(words)}(?!\w)", re.IGNORECASE)


def _objects(graph: dict[str, Any] | None) -> list[tuple[list[str], list[str]]]:
    """Each object as (name words, attribute strings); malformed entries become ([], [])."""
    out: list[tuple[list[str], list[str]]] = []
    for obj in (graph or {}).get("objects") or []:
        obj = obj if isinstance(obj, dict) else {}
        name, attrs = obj.get("name"), obj.get("attributes") or []
        attrs = [attrs] if isinstance(attrs, str) else attrs
        out.append((name.split() if isinstance(name, str) else [],
                    [a for a in attrs if isinstance(a, str) and a.strip()]))
    return out


def _mentions(caption: str, objects: list[tuple[list[str], list[str]]]) -> dict[Span, set[int]]:
    """Caption spans naming objects → indices of the objects they may name.

    Candidate phrases are (ordered subsets of) attributes + name; longer phrases claim text first, so
    "circle" inside "blue circle" belongs to the blue circle only.  One span naming several objects
    (identical phrases) lists them all.
    """
    candidates: list[tuple[int, int, list[str]]] = []
    for index, (name, attrs) in enumerate(objects):
        if not name:
            continue
        attr_words = [a.split() for a in attrs[:_MAX_ATTRIBUTES]]
        for r in range(len(attr_words), -1, -1):
            for combo in itertools.permutations(attr_words, r):
                words = [w for a in combo for w in a] + name
                candidates.append((len(words), index, words))
    candidates.sort(key=lambda c: -c[0])  # stable: object order breaks ties
    spans: dict[Span, set[int]] = {}
    for _, index, words in candidates:
        for m in _phrase_pattern(words).finditer(caption):
            span = m.span()
            if span in spans:
                spans[span].add(index)
            elif not any(s < span[1] and span[0] < e for s, e in spans):
                spans[span] = {index}
    return spans


def _apply_edits(caption: str, edits: Sequence[Edit]) -> str:
    """Apply non-overlapping edits, fixing an "a"/"an" right before each rewritten span."""
    out, pos = "", 0
    for start, end, text in sorted(edits):
        out += caption[pos:start]
        m = _ARTICLE_BEFORE.search(out)
        if m and text:
            article = "an" if text[0].lower() in "aeiou" else "a"
            article = article.capitalize() if m.group(1)[0].isupper() else article
            out = out[:m.start()] + article + m.group(2)
        out, pos = out + text, end
    return out + caption[pos:]


def _pair_rank(caption: str, pred: re.Pattern[str] | None, pair: tuple[Span, Span]) -> tuple[int, int]:
    """Sort key of (subject, object) mention pairs: predicate between them, then order, then distance."""
    (a0, a1), (b0, _) = pair
    between = a1 <= b0 and pred is not None and pred.search(caption, a1, b0) is not None
    return (0 if between else 1 if a1 <= b0 else 2, abs(b0 - a0))


def relation_swap(caption: str, graph: dict[str, Any] | None, rng: random.Random) -> str | None:
    """Exchange the subject and object mentions of one relation, picked by ``rng`` among those that work.

    For each relation the mention pair is chosen as: subject before object with the predicate between
    them, else subject before object, else any pair, nearest first.  None when no relation has both
    mentions in the caption or every swap leaves the caption unchanged (e.g. identical phrases).
    """
    objects, options = _objects(graph), []
    spans = _mentions(caption, objects)
    for rel in (graph or {}).get("relations") or []:
        if not isinstance(rel, dict):
            continue
        s, o, predicate = rel.get("subject"), rel.get("object"), rel.get("predicate")
        if not all(isinstance(i, int) and 0 <= i < len(objects) for i in (s, o)) or s == o:
            continue
        pairs = [(a, b) for a, owners_a in spans.items() if s in owners_a
                 for b, owners_b in spans.items() if o in owners_b and a != b]
        words = predicate.split() if isinstance(predicate, str) else []
        pred = _phrase_pattern(words) if words else None
        if pairs:
            a, b = min(pairs, key=lambda pair: _pair_rank(caption, pred, pair))
            swapped = _apply_edits(caption, [(*a, caption[b[0]:b[1]]), (*b, caption[a[0]:a[1]])])
            if swapped.lower() != caption.lower() and swapped not in options:
                options.append(swapped)
    return rng.choice(options) if options else None


def attribute_swap(caption: str, graph: dict[str, Any] | None, rng: random.Random) -> str | None:
    """Exchange one attribute each of two objects, at every "<attribute> <name>" mention of either.

    Picks (by ``rng``) among pairs of objects i, j and attributes a of i, b of j such that "a name_i" and
    "b name_j" occur in the caption, a is not an attribute of j and b not of i.  Each attribute moves as
    first written in the caption, its first letter cased like the word it replaces.  Objects mentioned a
    different number of times ("the blue square" again) change the caption's word counts.
    """
    objects, options = _objects(graph), []
    found: list[list[tuple[str, re.Pattern[str], str]]] = []  # per object: (attribute, pattern, as written)
    for name, attrs in objects:
        patterns = [(a, _phrase_pattern(name, a.split())) for a in attrs] if name else []
        found.append([(a, p, m.group(1)) for a, p in patterns if (m := p.search(caption))])
    for i, j in itertools.combinations(range(len(objects)), 2):
        lower_i, lower_j = {a.lower() for a in objects[i][1]}, {b.lower() for b in objects[j][1]}
        for (a, pat_a, text_a), (b, pat_b, text_b) in itertools.product(found[i], found[j]):
            if a.lower() in lower_j or b.lower() in lower_i:
                continue
            edits: dict[int, Edit] = {}
            for pattern, new in ((pat_a, text_b), (pat_b, text_a)):
                for m in pattern.finditer(caption):
                    first = new[:1].upper() if m.group(1)[:1].isupper() else new[:1].lower()
                    edits.setdefault(m.start(), (*m.span(1), first + new[1:]))
            spans = sorted((e0, e1) for e0, e1, _ in edits.values())
            if any(e1 > f0 for (_, e1), (f0, _) in itertools.pairwise(spans)):
                continue
            swapped = _apply_edits(caption, list(edits.values()))
            if swapped.lower() != caption.lower() and swapped not in options:
                options.append(swapped)
    return rng.choice(options) if options else None


def truncate_words(text: str, max_words: int | None = ARO_MAX_WORDS) -> str:
    """The first ``max_words`` whitespace-separated words joined by single spaces (all when None)."""
    words = text.split()
    return " ".join(words if max_words is None else words[:max_words])


def aro_pre_caption(caption: str, max_words: int = ARO_MAX_WORDS) -> str:
    """ARO's ``pre_caption``: lower-case, ``.!"()*#:;~`` → space, squeeze spaces, keep ``max_words`` words."""
    text = re.sub(r"\s{2,}", " ", re.sub(r"([.!\"()*#:;~])", " ", caption.lower())).rstrip("\n").strip(" ")
    words = text.split(" ")
    return " ".join(words[:max_words]) if len(words) > max_words else text


def tokenize(text: str) -> list[str]:
    """Words (with inner apostrophes/hyphens) and single punctuation marks: the trigram tokeniser."""
    return _TOKEN.findall(text)


def _tagged_tokens(caption: str, pos_tags: Sequence[tuple[str, str]]) -> list[str]:
    """The tokens of ``pos_tags``; ValueError unless they spell ``caption`` (whitespace aside)."""
    tokens = [str(word) for word, _ in pos_tags]
    if "".join("".join(tokens).split()) != "".join(caption.split()):
        raise ValueError(f"pos_tags tokens {tokens!r} do not spell the caption {caption!r}")
    return tokens


def _shuffle_slots(tokens: list[str], slots: list[int], rng: random.Random) -> None:
    values = [tokens[i] for i in slots]
    rng.shuffle(values)
    for i, v in zip(slots, values):
        tokens[i] = v


def shuffle_nouns_adjectives(caption: str, pos_tags: Sequence[tuple[str, str]], rng: random.Random,
                             max_words: int | None = ARO_MAX_WORDS) -> str:
    """Shuffle nouns (NN*) among noun slots and adjectives (JJ*) among adjective slots, as ARO does.

    ``pos_tags`` are (token, Penn tag) pairs that spell ``caption`` (e.g. spaCy ``token.text, token.tag_``);
    the output is the tokens joined by spaces.  Unchanged when there is at most one word of each class.
    """
    tokens = _tagged_tokens(caption, pos_tags)
    for tags in (NOUN_TAGS, ADJECTIVE_TAGS):
        _shuffle_slots(tokens, [i for i, (_, t) in enumerate(pos_tags) if t in tags], rng)
    return truncate_words(" ".join(tokens), max_words)


def shuffle_other_words(caption: str, pos_tags: Sequence[tuple[str, str]], rng: random.Random,
                        max_words: int | None = ARO_MAX_WORDS) -> str:
    """Shuffle every token that is not a noun or adjective among those tokens' slots (ARO's "allbut")."""
    tokens = _tagged_tokens(caption, pos_tags)
    _shuffle_slots(tokens, [i for i, (_, t) in enumerate(pos_tags) if t not in _NOUN_OR_ADJECTIVE], rng)
    return truncate_words(" ".join(tokens), max_words)


def _trigrams(tokens: list[str]) -> list[list[str]]:
    return [tokens[i:i + 3] for i in range(0, len(tokens), 3)]


def shuffle_within_trigrams(caption: str, rng: random.Random, max_words: int | None = ARO_MAX_WORDS) -> str:
    """Cut the tokens into consecutive trigrams (the last may be shorter) and shuffle inside each."""
    trigrams = _trigrams(tokenize(caption))
    for trigram in trigrams:
        rng.shuffle(trigram)
    return truncate_words(" ".join(w for t in trigrams for w in t), max_words)


def shuffle_trigrams(caption: str, rng: random.Random, max_words: int | None = ARO_MAX_WORDS) -> str:
    """Cut the tokens into consecutive trigrams (the last may be shorter) and shuffle their order."""
    trigrams = _trigrams(tokenize(caption))
    rng.shuffle(trigrams)
    return truncate_words(" ".join(w for t in trigrams for w in t), max_words)


def is_perturbed(original: str, perturbed: str) -> bool:
    """True when the token sequences differ, ignoring case and spacing ("a horse." == "a horse .")."""
    return [t.lower() for t in tokenize(original)] != [t.lower() for t in tokenize(perturbed)]


def negative_rng(key: str, epoch: int, seed: int = 0) -> random.Random:
    """The private RNG of one sample in one epoch: sha256 of ``(seed, key, epoch)``."""
    digest = hashlib.sha256(json.dumps(["kclip_ds.negatives/v1", seed, key, epoch]).encode()).digest()
    return random.Random(int.from_bytes(digest[:8], "big"))


def sample_negative(key: str, epoch: int, caption: str, graph: dict[str, Any] | None,
                    kinds: Sequence[str] = GRAPH_KINDS, seed: int = 0,
                    pos_tags: Sequence[tuple[str, str]] | None = None) -> tuple[str | None, str]:
    """One hard negative for a sample: ``(negative, kind)``, or ``(None, "none")`` when no kind applies.

    ``kinds`` (tried in an order shuffled per call) are drawn from :data:`GRAPH_KINDS` and
    :data:`PERTURBATION_KINDS`; the POS-based perturbations are skipped without ``pos_tags`` and a
    perturbation counts only when :func:`is_perturbed`.  Deterministic per ``(seed, key, epoch)``.
    """
    unknown = [k for k in kinds if k not in GRAPH_KINDS + PERTURBATION_KINDS]
    if unknown:
        raise ValueError(f"unknown negative kinds {unknown}; expected {GRAPH_KINDS + PERTURBATION_KINDS}")
    rng = negative_rng(key, epoch, seed)
    order = list(dict.fromkeys(kinds))
    rng.shuffle(order)
    tags = pos_tags
    makers: dict[str, Callable[[], str | None]] = {
        "relation": lambda: relation_swap(caption, graph, rng),
        "attribute": lambda: attribute_swap(caption, graph, rng),
        "nouns_adjectives": lambda: None if tags is None else shuffle_nouns_adjectives(caption, tags, rng),
        "other_words": lambda: None if tags is None else shuffle_other_words(caption, tags, rng),
        "within_trigrams": lambda: shuffle_within_trigrams(caption, rng),
        "trigrams": lambda: shuffle_trigrams(caption, rng),
    }
    for kind in order:
        negative = makers[kind]()
        if negative is not None and (kind in GRAPH_KINDS or is_perturbed(truncate_words(caption), negative)):
            return negative, kind
    return None, "none"
