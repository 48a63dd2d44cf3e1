"""Tests of kclip_ds.knowledge.negatives: scene-graph swaps, ARO word-order perturbations, sampling."""

from __future__ import annotations

import json
import random
import re
from collections import Counter

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from kclip_ds.data import demo_world
from kclip_ds.knowledge import negatives as neg

# Colours/shapes beyond the demo world's own, so that "an orange …"/"an oval …" test article agreement.
COLOURS = ("red", "green", "blue", "orange", "purple", "amber")
SHAPES = ("circle", "square", "triangle", "oval", "star", "arrow")
PREDICATES = ("to the left of", "to the right of", "above", "below", "next to")
SETTINGS = settings(max_examples=150, deadline=None)


def bag(text: str) -> Counter[str]:
    """Lower-cased words, with "a" and "an" counted as the same word."""
    return Counter("a" if w == "an" else w for w in re.findall(r"\w+", text.lower()))


def graph_of(*objects: tuple[str, list[str]], relations: tuple[tuple[int, str, int], ...] = ()) -> dict:
    return {"objects": [{"name": n, "attributes": a, "bbox": [0, 0, 1, 1]} for n, a in objects],
            "relations": [{"subject": s, "predicate": p, "object": o} for s, p, o in relations]}


def all_outputs(fn, caption: str, graph: dict | None, tries: int = 40) -> set[str | None]:
    return {fn(caption, graph, random.Random(k)) for k in range(tries)}


def colour_of(text: str) -> dict[str, set[str]]:
    """Shape → the set of colours it is mentioned with."""
    out: dict[str, set[str]] = {}
    for colour, shape in re.findall(rf"\b({'|'.join(COLOURS)}|\w+) ({'|'.join(SHAPES)})\b", text):
        out.setdefault(shape, set()).add(colour)
    return out


@st.composite
def scenes(draw: st.DrawFn, with_relations: bool | None = True) -> tuple[str, dict]:
    """A demo-world-like (caption, graph): 2–3 objects of distinct shapes and colours, captioned by
    demo_world.scene_caption (a repeated object comes back as "the <colour> <shape>").  ``with_relations``
    None draws whether the scene states relations."""
    if with_relations is None:
        with_relations = draw(st.booleans())
    n = draw(st.integers(2, 3))
    shapes = draw(st.permutations(SHAPES))[:n]
    colours = draw(st.permutations(COLOURS))[:n]
    objects = tuple(demo_world.SceneObject(s, c, (0, 0, 1, 1)) for s, c in zip(shapes, colours))
    relations: list[demo_world.Relation] = []
    if with_relations:
        relations.append(demo_world.Relation(0, draw(st.sampled_from(PREDICATES)), 1))
        if n == 3:
            predicate, anchor = draw(st.sampled_from(PREDICATES)), draw(st.integers(0, 1))
            relations.append(demo_world.Relation(2, predicate, anchor))
    scene = demo_world.Scene(objects, tuple(relations), (240, 240, 240))
    caption = re.sub(r"\ba (?=[aeiou])", "an ", demo_world.scene_caption(scene))  # "an orange …"
    return caption, demo_world.scene_graph(scene)


def demo_samples(count: int = 30) -> list[tuple[str, str, dict]]:
    samples = [demo_world.make_sample(0, "train", i, 32) for i in range(count)]
    return [(s["__key__"], s["txt"].decode(), json.loads(s["sg.json"])) for s in samples]


# ---- relation swaps -------------------------------------------------------------------------------------

TWO = "a red circle to the left of a blue square"
TWO_GRAPH = graph_of(("circle", ["red"]), ("square", ["blue"]), relations=((0, "to the left of", 1),))
THREE = "a red circle to the left of a blue square and a green triangle above the blue square"
THREE_GRAPH = graph_of(("circle", ["red"]), ("square", ["blue"]), ("triangle", ["green"]),
                       relations=((0, "to the left of", 1), (2, "above", 1)))


def test_relation_swap_two_objects() -> None:
    assert all_outputs(neg.relation_swap, TWO, TWO_GRAPH) == {"a blue square to the left of a red circle"}


def test_relation_swap_article_agreement_and_capitals() -> None:
    graph = graph_of(("astronaut", []), ("horse", []), relations=((0, "rides", 1),))
    rng = random.Random(0)
    assert neg.relation_swap("an astronaut rides a horse", graph, rng) == "a horse rides an astronaut"
    assert neg.relation_swap("An astronaut rides a horse.", graph, rng) == "A horse rides an astronaut."
    graph = graph_of(("circle", ["orange"]), ("square", ["blue"]), relations=((0, "above", 1),))
    assert neg.relation_swap("an orange circle above a blue square", graph, random.Random(0)) == \
        "a blue square above an orange circle"


def test_relation_swap_three_objects_uses_the_mention_next_to_the_predicate() -> None:
    assert all_outputs(neg.relation_swap, THREE, THREE_GRAPH) == {
        "a blue square to the left of a red circle and a green triangle above the blue square",
        "a red circle to the left of a blue square and a blue square above the green triangle",
    }


def test_relation_swap_prefers_longest_phrase_and_multiword_names() -> None:
    graph = graph_of(("circle", ["red"]), ("circle", ["blue"]), relations=((0, "left of", 1),))
    assert neg.relation_swap("a red circle left of a blue circle", graph, random.Random(0)) == \
        "a blue circle left of a red circle"
    graph = graph_of(("man", ["tall"]), ("traffic light", []), relations=((0, "stands next to", 1),))
    assert neg.relation_swap("A tall man stands next to a traffic light", graph, random.Random(0)) == \
        "A traffic light stands next to a tall man"
    # Only the name is in the caption: the name alone is the span.
    graph = graph_of(("dog", ["brown"]), ("ball", ["red"]), relations=((0, "chases", 1),))
    assert neg.relation_swap("a dog chases a red ball", graph, random.Random(0)) == "a red ball chases a dog"


@pytest.mark.parametrize(("caption", "graph"), [
    ("a red circle and a blue square", graph_of(("circle", ["red"]), ("square", ["blue"]))),
    ("a red circle", None),
    ("a red circle above a blue square", {}),
    # The object is not in the caption.
    ("a red circle above a blue square",
     graph_of(("circle", ["red"]), ("cat", []), relations=((0, "above", 1),))),
    # Identical phrases: swapping gives the same string.
    ("a circle next to a circle", graph_of(("circle", []), ("circle", []), relations=((0, "next to", 1),))),
    ("A circle next to a Circle", graph_of(("circle", []), ("circle", []), relations=((0, "next to", 1),))),
    # Malformed relations are skipped.
    (TWO, graph_of(("circle", ["red"]), ("square", ["blue"]), relations=((0, "left", 5), (1, "x", 1)))),
    (TWO, {"objects": [None, {"name": 3}], "relations": [None, {"subject": "0", "object": 1}]}),
])
def test_relation_swap_none(caption: str, graph: dict | None) -> None:
    assert all_outputs(neg.relation_swap, caption, graph, tries=5) == {None}


# ---- attribute swaps ------------------------------------------------------------------------------------

def test_attribute_swap_two_objects_and_articles() -> None:
    assert all_outputs(neg.attribute_swap, TWO, TWO_GRAPH) == {"a blue circle to the left of a red square"}
    graph = graph_of(("circle", ["orange"]), ("square", ["blue"]))
    assert neg.attribute_swap("An orange circle and a blue square", graph, random.Random(0)) == \
        "A blue circle and an orange square"
    graph = graph_of(("circle", ["Red"]), ("square", ["blue"]))
    assert neg.attribute_swap("Red circle above a blue square", graph, random.Random(0)) == \
        "Blue circle above a red square"


def test_attribute_swap_changes_every_mention() -> None:
    assert all_outputs(neg.attribute_swap, THREE, THREE_GRAPH) == {
        "a blue circle to the left of a red square and a green triangle above the red square",
        "a green circle to the left of a blue square and a red triangle above the blue square",
        "a red circle to the left of a green square and a blue triangle above the green square",
    }


def test_attribute_swap_multi_attribute_objects() -> None:
    graph = graph_of(("dog", ["small", "brown"]), ("cat", ["black"]))
    assert all_outputs(neg.attribute_swap, "a small brown dog chases a black cat", graph) == {
        "a small black dog chases a brown cat"}


@pytest.mark.parametrize(("caption", "graph"), [
    ("a red circle to the left of a red square", graph_of(("circle", ["red"]), ("square", ["red"]))),
    ("a circle to the left of a blue square", graph_of(("circle", []), ("square", ["blue"]))),
    ("a circle to the left of a square", graph_of(("circle", ["red"]), ("square", ["blue"]))),  # not adjacent
    ("a red circle", graph_of(("circle", ["red"]))),
    ("a red circle", None),
])
def test_attribute_swap_none(caption: str, graph: dict | None) -> None:
    assert all_outputs(neg.attribute_swap, caption, graph, tries=5) == {None}


# ---- properties over demo-world-like scenes -------------------------------------------------------------

@SETTINGS
@given(scenes(), st.integers(0, 2**32))
def test_relation_swap_is_a_same_bag_different_caption(scene: tuple[str, dict], rng_seed: int) -> None:
    caption, graph = scene
    swapped = neg.relation_swap(caption, graph, random.Random(rng_seed))
    assert swapped is not None  # distinct shapes and colours: every relation can be swapped
    assert swapped != caption and bag(swapped) == bag(caption)
    assert not re.search(r"\ba [aeiou]|\ban [^aeiou\W]", swapped)


@SETTINGS
@given(scenes(with_relations=None), st.integers(0, 2**32))
def test_attribute_swap_exchanges_two_colours_consistently(scene: tuple[str, dict], rng_seed: int) -> None:
    caption, graph = scene
    swapped = neg.attribute_swap(caption, graph, random.Random(rng_seed))
    assert swapped is not None and swapped != caption
    before, after = colour_of(caption), colour_of(swapped)
    assert set(before) == set(after)
    assert all(len(c) == 1 for c in after.values())  # every mention of an object changed alike
    changed = [shape for shape in before if before[shape] != after[shape]]
    assert len(changed) == 2
    a, b = changed
    assert after[a] == before[b] and after[b] == before[a]
    words = {c for cs in before.values() for c in cs}
    strip = Counter({w: n for w, n in bag(caption).items() if w not in words})
    assert Counter({w: n for w, n in bag(swapped).items() if w not in words}) == strip
    if not re.search(rf"\bthe ({'|'.join(COLOURS)})\b", caption):  # each object mentioned once: same bag
        assert bag(swapped) == bag(caption)


@SETTINGS
@given(scenes(with_relations=False), st.integers(0, 2**32))
def test_no_relations_no_relation_swap(scene: tuple[str, dict], rng_seed: int) -> None:
    caption, graph = scene
    assert graph["relations"] == []
    assert neg.relation_swap(caption, graph, random.Random(rng_seed)) is None


def test_demo_world_samples() -> None:
    for i, (key, caption, graph) in enumerate(demo_samples()):
        rel = neg.relation_swap(caption, graph, random.Random(i))
        att = neg.attribute_swap(caption, graph, random.Random(i))
        assert rel is not None and rel != caption and bag(rel) == bag(caption), (key, caption, rel)
        assert att is not None and att != caption and set(bag(att)) == set(bag(caption)), (key, caption, att)


# ---- sample_negative ------------------------------------------------------------------------------------

@SETTINGS
@given(scenes(), st.text(min_size=1, max_size=12), st.integers(0, 1000), st.integers(0, 5))
def test_sample_negative_is_deterministic(scene: tuple[str, dict], key: str, epoch: int, seed: int) -> None:
    caption, graph = scene
    state = random.getstate()
    first = neg.sample_negative(key, epoch, caption, graph, seed=seed)
    assert random.getstate() == state  # the global RNG is untouched
    assert neg.sample_negative(key, epoch, caption, json.loads(json.dumps(graph)), seed=seed) == first
    negative, kind = first
    assert kind in neg.GRAPH_KINDS and negative is not None and negative != caption
    if len(graph["objects"]) == 3:  # 2 relation + 3 attribute options: epochs must not all agree
        assert len({neg.sample_negative(key, e, caption, graph, seed=seed) for e in range(12)}) > 1


def test_sample_negative_kinds_and_fallbacks() -> None:
    assert neg.sample_negative("k", 0, TWO, None) == (None, "none")
    no_relation = graph_of(("circle", ["red"]), ("square", ["blue"]))
    assert neg.sample_negative("k", 0, "a red circle and a blue square", no_relation,
                               kinds=("relation",)) == (None, "none")
    assert neg.sample_negative("k", 0, TWO, TWO_GRAPH, kinds=("relation",)) == \
        ("a blue square to the left of a red circle", "relation")
    negative, kind = neg.sample_negative("k", 3, THREE, None, kinds=("relation", "trigrams"))
    assert kind == "trigrams" and negative is not None and neg.is_perturbed(THREE, negative)
    assert neg.sample_negative("k", 0, THREE, None, kinds=("nouns_adjectives",)) == (None, "none")  # no tags
    assert neg.sample_negative("k", 0, "dog", None, kinds=("within_trigrams", "trigrams")) == (None, "none")
    with pytest.raises(ValueError, match="unknown negative kinds"):
        neg.sample_negative("k", 0, TWO, TWO_GRAPH, kinds=("relation", "colour"))
    keys = {neg.sample_negative(f"train-{i:06d}", 0, THREE, THREE_GRAPH)[0] for i in range(40)}
    assert len(keys) >= 4  # different samples draw different negatives


# ---- ARO word-order perturbations -----------------------------------------------------------------------

NOUNS, ADJECTIVES = ("dog", "cat", "table", "man", "horse", "shirt"), ("red", "small", "old", "happy")
OTHERS = (("a", "DT"), ("the", "DT"), ("on", "IN"), ("rides", "VBZ"), ("with", "IN"), (",", ","),
          ("and", "CC"))
TAGGED = st.one_of(st.tuples(st.sampled_from(NOUNS), st.sampled_from(("NN", "NNS", "NNP"))),
                   st.tuples(st.sampled_from(ADJECTIVES), st.sampled_from(("JJ", "JJR"))),
                   st.sampled_from(OTHERS))
NA_TAGS = neg.NOUN_TAGS | neg.ADJECTIVE_TAGS


def test_perturbations_concrete() -> None:
    tags = [("a", "DT"), ("red", "JJ"), ("circle", "NN"), ("to", "IN"), ("the", "DT"), ("left", "NN"),
            ("of", "IN"), ("a", "DT"), ("blue", "JJ"), ("square", "NN"), (".", ".")]
    caption = "a red circle to the left of a blue square."
    out = neg.shuffle_nouns_adjectives(caption, tags, random.Random(1))
    fixed = [i for i, (_, t) in enumerate(tags) if t not in neg.NOUN_TAGS | neg.ADJECTIVE_TAGS]
    assert [out.split()[i] for i in fixed] == ["a", "to", "the", "of", "a", "."]
    assert sorted(out.split()) == sorted(w for w, _ in tags) and out != " ".join(w for w, _ in tags)
    with pytest.raises(ValueError, match="do not spell"):
        neg.shuffle_other_words("a blue square", tags, random.Random(0))
    assert neg.tokenize("a man's dog, on-line.") == ["a", "man's", "dog", ",", "on-line", "."]
    assert neg.shuffle_within_trigrams("dog", random.Random(0)) == "dog"  # degenerate: unchanged
    assert not neg.is_perturbed("dog", "dog") and not neg.is_perturbed("A horse.", "a horse .")
    assert neg.is_perturbed("a horse rides", "horse a rides")
    assert neg.aro_pre_caption("A dog (brown)  runs!") == "a dog brown runs"
    assert neg.aro_pre_caption(" ".join(["w"] * 40)) == " ".join(["w"] * 30)


@SETTINGS
@given(st.lists(TAGGED, min_size=1, max_size=40), st.integers(0, 2**32))
def test_pos_shuffles_move_only_their_class(tags: list[tuple[str, str]], rng_seed: int) -> None:
    caption = " ".join(w for w, _ in tags)
    words = [w for w, _ in tags]
    for fn, moved in ((neg.shuffle_nouns_adjectives, lambda t: t in NA_TAGS),
                      (neg.shuffle_other_words, lambda t: t not in NA_TAGS)):
        out = fn(caption, tags, random.Random(rng_seed), max_words=None).split()
        assert Counter(out) == Counter(words)
        for i, (w, t) in enumerate(tags):
            if not moved(t):
                assert out[i] == w
        if fn is neg.shuffle_nouns_adjectives:  # nouns stay in noun slots, adjectives in adjective slots
            for group in (neg.NOUN_TAGS, neg.ADJECTIVE_TAGS):
                slots = [i for i, (_, t) in enumerate(tags) if t in group]
                assert Counter(out[i] for i in slots) == Counter(words[i] for i in slots)
        truncated = fn(caption, tags, random.Random(rng_seed))
        assert truncated.split() == out[:30]


def concatenates(tokens: list[str], pieces: list[tuple[str, ...]]) -> bool:
    """True when ``tokens`` is the concatenation of ``pieces`` in some order."""
    if not pieces:
        return not tokens
    return any(tuple(tokens[:len(p)]) == p and concatenates(tokens[len(p):], pieces[:i] + pieces[i + 1:])
               for i, p in enumerate(pieces) if i == pieces.index(p))


@SETTINGS
@given(st.lists(st.sampled_from(("a", "dog", "on", "the", "mat", ",", "red", "x1", "y2", "z3")), min_size=1,
                max_size=40), st.integers(0, 2**32))
def test_trigram_shuffles(words: list[str], rng_seed: int) -> None:
    caption = " ".join(words)
    trigrams = [tuple(words[i:i + 3]) for i in range(0, len(words), 3)]
    within = neg.shuffle_within_trigrams(caption, random.Random(rng_seed), max_words=None).split()
    assert Counter(within) == Counter(words)
    assert [sorted(within[i:i + 3]) for i in range(0, len(within), 3)] == [sorted(t) for t in trigrams]
    across = neg.shuffle_trigrams(caption, random.Random(rng_seed), max_words=None).split()
    assert Counter(across) == Counter(words) and concatenates(across, trigrams)
    for fn in (neg.shuffle_within_trigrams, neg.shuffle_trigrams):
        out = fn(caption, random.Random(rng_seed)).split()
        assert len(out) == min(30, len(words))
        assert out == fn(caption, random.Random(rng_seed), max_words=None).split()[:30]


def test_trigram_shuffles_perturb_real_captions() -> None:
    caption = "an astronaut rides a horse on the moon while a dog watches from a red rocket"
    rng = random.Random(0)
    assert sum(neg.is_perturbed(caption, neg.shuffle_trigrams(caption, rng)) for _ in range(20)) >= 18
    assert sum(neg.is_perturbed(caption, neg.shuffle_within_trigrams(caption, rng)) for _ in range(20)) >= 18
