"""Tests of the knowledge-graph readers, triplet shards and the Fashion-MNIST × WordNet build
(kclip_ds/knowledge/{kg,triplet_shards,fashion}.py, tools/import_kg.py, tools/make_fashion_kg.py).

WordNet and Fashion-MNIST are the Debian packages; a session fixture apt-installs them when missing (root +
apt-get) and skips with the reason otherwise.  Shards are read back with ``tarfile`` and decoded as JSON and
PNG only: nothing is unpickled.
"""

from __future__ import annotations

import gzip
import importlib.util
import io
import json
import tarfile
from collections import defaultdict
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from kclip_ds.data.shards import read_manifest, sha256_file
from kclip_ds.knowledge import fashion
from kclip_ds.knowledge.kg import (
    IMAGE,
    TEXT,
    Edge,
    Entity,
    KGError,
    KnowledgeGraph,
    conceptnet_relation_text,
    lexnames_from_man_page,
    prepare_wordnet_data,
    read_conceptnet,
    read_triples,
    read_wordnet,
    synset_text,
)
from kclip_ds.knowledge.triplet_shards import (
    NeighbourhoodConfig,
    decode_triplet,
    sample_neighbourhood,
    write_triplet_shards,
)

REPO = Path(__file__).resolve().parents[1]


def load_tool(name: str):
    spec = importlib.util.spec_from_file_location(name, REPO / "tools" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)  # type: ignore[union-attr]
    return module


def png_bytes(colour: tuple[int, int, int], size: int = 8) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (size, size), colour).save(buf, format="PNG")
    return buf.getvalue()


def read_samples(directory: Path) -> list[dict[str, bytes]]:
    """Every sample of a shard directory, in shard order: {"__key__": str, member: bytes}."""
    samples: dict[str, dict] = defaultdict(dict)
    for shard in sorted(directory.glob("*.tar")):
        with tarfile.open(shard) as tar:
            for member in tar:
                key, ext = member.name.split(".", 1)
                samples[key]["__key__"] = key
                samples[key][ext] = tar.extractfile(member).read()  # type: ignore[union-attr]
    return list(samples.values())


# ---------------------------------------------------------------- readers

CONCEPTNET = [
    "/a/[/r/IsA/,/c/en/dog/n/,/c/en/animal/]\t/r/IsA\t/c/en/dog/n\t/c/en/animal\t{\"weight\": 2.0}",
    "/a/[/r/PartOf/,/c/en/tail/,/c/en/dog/]\t/r/PartOf\t/c/en/tail\t/c/en/dog\t{}",
    "/a/[/r/IsA/,/c/fr/chien/,/c/fr/animal/]\t/r/IsA\t/c/fr/chien\t/c/fr/animal\t{}",
    "/a/[/r/ExternalURL/,/c/en/dog/,/e/]\t/r/ExternalURL\t/c/en/dog\thttp://dbpedia.org/resource/Dog\t{}",
    "/a/[/r/IsA/,/c/en/dog/,/c/en/animal/]\t/r/IsA\t/c/en/dog\t/c/en/animal\t{}",  # another sense: a duplicate
    "/a/[/r/dbpedia/genre/,/c/en/ice_cream/]\t/r/dbpedia/genre\t/c/en/ice_cream/n/wn/food\t/c/en/dessert\t{}",
]


@pytest.mark.parametrize("gz", [False, True])
def test_conceptnet_reader(tmp_path: Path, gz: bool) -> None:
    text = "\n".join(CONCEPTNET) + "\n"
    path = tmp_path / ("assertions.csv.gz" if gz else "assertions.csv")
    path.write_bytes(gzip.compress(text.encode()) if gz else text.encode())
    kg = read_conceptnet(path)
    assert kg.edges == [Edge("/c/en/dog", "is a", "/c/en/animal"), Edge("/c/en/tail", "part of", "/c/en/dog"),
                        Edge("/c/en/ice_cream", "dbpedia genre", "/c/en/dessert")]
    assert kg.entities["/c/en/ice_cream"] == Entity("/c/en/ice_cream", TEXT, text="ice cream")
    assert kg.meta["skipped_other_language"] == 2 and kg.kind_counts() == {TEXT: 5}
    assert len(read_conceptnet(path, limit=2)) == 2


@pytest.mark.parametrize("uri, text", [("/r/IsA", "is a"), ("/r/HasA", "has a"), ("/r/PartOf", "part of"),
                                       ("/r/NotDesires", "not desires"), ("/r/MadeOf", "made of"),
                                       ("/r/dbpedia/genre", "dbpedia genre"), ("/r/ExternalURL", "external url")])
def test_conceptnet_relation_text(uri: str, text: str) -> None:
    assert conceptnet_relation_text(uri) == text


def test_conceptnet_bad_line(tmp_path: Path) -> None:
    path = tmp_path / "bad.csv"
    path.write_text("\n".join([CONCEPTNET[0], CONCEPTNET[1], "/a/x\t/r/IsA\t/c/en/dog"]) + "\n")
    with pytest.raises(KGError, match=rf"{path}:3: not a ConceptNet assertion .*ConceptNet CSV dump"):
        read_conceptnet(path)


@pytest.fixture()
def triple_files(tmp_path: Path) -> dict[str, Path]:
    """The same 4 triples as TSV and JSONL, and an image mapping that makes "dog" and "cat" images."""
    triples = [("dog", "is a", "animal"), ("cat", "is a", "animal"), ("dog", "chases", "cat"),
               ("animal", "has part", "tail")]
    (tmp_path / "img").mkdir()
    (tmp_path / "img" / "dog1.png").write_bytes(png_bytes((200, 0, 0)))
    (tmp_path / "img" / "dog2.png").write_bytes(png_bytes((0, 200, 0)))
    Image.new("RGB", (8, 8), (0, 0, 200)).save(tmp_path / "img" / "cat.jpg", format="JPEG")
    (tmp_path / "images.json").write_text(json.dumps({"dog": ["img/dog1.png", "img/dog2.png"], "cat": "img/cat.jpg",
                                                      "unused": "img/cat.jpg"}))
    (tmp_path / "kg.tsv").write_text("# head\trelation\ttail\n\n" + "".join("\t".join(t) + "\n" for t in triples))
    (tmp_path / "kg.jsonl").write_text("".join(json.dumps(dict(zip(("head", "relation", "tail"), t))) + "\n"
                                               for t in triples))
    return {"tsv": tmp_path / "kg.tsv", "jsonl": tmp_path / "kg.jsonl", "images": tmp_path / "images.json"}


def test_triples_readers(triple_files: dict[str, Path]) -> None:
    tsv, jsonl = read_triples(triple_files["tsv"]), read_triples(triple_files["jsonl"])
    assert tsv.fingerprint() == jsonl.fingerprint() and len(tsv) == 4
    assert tsv.kind_counts() == {TEXT: 4} and tsv.entities["dog"].text == "dog"
    kg = read_triples(triple_files["tsv"], images=triple_files["images"])
    assert kg.kind_counts() == {IMAGE: 2, TEXT: 2} and "unused" not in kg.entities
    assert kg.entities["dog"].kind == IMAGE and len(kg.entities["dog"].images) == 2
    assert kg.entities["dog"].text is None and kg.fingerprint() != tsv.fingerprint()


@pytest.mark.parametrize("name, content, message", [
    ("a.tsv", "dog\tis a\tanimal\ncat\tis a\n", r"a\.tsv:2: expected 3 tab-separated fields .* fix or delete"),
    ("b.tsv", "dog\tis a\tanimal\n\t\tcat\n", r"b\.tsv:2: empty head, relation or tail"),
    ("c.jsonl", '{"head": "dog", "relation": "is a", "tail": "animal"}\n{"head": "dog",\n',
     r"c\.jsonl:2: malformed JSON"),
    ("d.jsonl", '\n{"head": "dog", "relation": "is a"}\n', r"d\.jsonl:2: expected \{\"head\": str"),
    ("e.csv", "dog,is a,animal\n", r"e\.csv: cannot guess the format"),
])
def test_triples_errors_name_file_and_line(tmp_path: Path, name: str, content: str, message: str) -> None:
    (tmp_path / name).write_text(content)
    with pytest.raises(KGError, match=message):
        read_triples(tmp_path / name)


def test_image_mapping_errors(tmp_path: Path, triple_files: dict[str, Path]) -> None:
    bad = tmp_path / "bad_images.json"
    bad.write_text(json.dumps({"dog": "img/missing.png"}))
    with pytest.raises(KGError, match=rf"{bad}: entity 'dog': image .*missing\.png not found; fix the path"):
        read_triples(triple_files["tsv"], images=bad)
    bad.write_text("[1, 2]")
    with pytest.raises(KGError, match=rf"{bad}: the image mapping must be a JSON object"):
        read_triples(triple_files["tsv"], images=bad)


def test_graph_rejects_conflicts() -> None:
    kg = KnowledgeGraph()
    kg.add_entity(Entity("a", TEXT, text="a"))
    kg.add_entity(Entity("a", TEXT, text="a"))  # the same entity again is fine
    with pytest.raises(ValueError, match="defined twice"):
        kg.add_entity(Entity("a", TEXT, text="another a"))
    with pytest.raises(ValueError, match="entity 'b' was never added"):
        kg.add_edge("a", "r", "b")
    with pytest.raises(ValueError, match="needs images and no text"):
        Entity("x", IMAGE, text="x")


# ---------------------------------------------------------------- WordNet

def test_wordnet_missing_says_what_to_install(tmp_path: Path) -> None:
    with pytest.raises(KGError, match=r"WordNet 3\.0 not found in .*apt-get install -y --no-install-recommends "
                                      r"wordnet-base wordnet-sense-index"):
        prepare_wordnet_data(tmp_path / "cache", source=tmp_path / "no_wordnet")


def test_lexnames_from_man_page(wordnet) -> None:
    lines = lexnames_from_man_page().splitlines()
    assert len(lines) == 45 and lines[0] == "00\tadj.all\t3" and lines[3] == "03\tnoun.Tops\t1"
    assert lines[18] == "18\tnoun.person\t1"  # the man page pads this name with spaces
    assert lines[44] == "44\tadj.ppl\t3"


def test_wordnet_dog(wordnet) -> None:
    """dog.n.01 as WordNet 3.0 has it: two hypernym paths to entity.n.01, 18 hyponyms, 2 member holonyms."""
    dog = wordnet.synset("dog.n.01")
    paths = sorted([s.name() for s in path] for path in dog.hypernym_paths())
    common = ["entity.n.01", "physical_entity.n.01", "object.n.01", "whole.n.02", "living_thing.n.01",
              "organism.n.01", "animal.n.01"]
    assert paths == [common + ["chordate.n.01", "vertebrate.n.01", "mammal.n.01", "placental.n.01",
                               "carnivore.n.01", "canine.n.02", "dog.n.01"],
                     common + ["domestic_animal.n.01", "dog.n.01"]]
    assert synset_text(dog).startswith("dog, domestic dog, Canis familiaris: a member of the genus Canis")

    ancestors = {dog, *dog.closure(lambda s: s.hypernyms())}
    kg = read_wordnet(wordnet, synsets=ancestors, pointer_names=True)
    hypernyms = {(e.head, e.tail) for e in kg.edges if e.relation == "hypernym"}
    assert len(kg.entities) == 15 and len(hypernyms) == 15  # every node has one hypernym, dog has two
    assert {(p[i + 1], p[i]) for p in paths for i in range(len(p) - 1)} == hypernyms
    assert {(e.tail, e.head) for e in kg.edges if e.relation == "hyponym"} == hypernyms

    one = read_wordnet(wordnet, synsets=[dog, *dog.hyponyms(), *dog.member_holonyms(), *dog.part_meronyms()])
    out = [e for e in one.edges if e.head == "dog.n.01"]
    assert {r: sum(e.relation == r for e in out) for r in ("has subtype", "is a member of", "has part")} == {
        "has subtype": 18, "is a member of": 2, "has part": 1}
    assert {e.tail for e in out if e.relation != "has subtype"} == {"canis.n.01", "pack.n.06", "flag.n.07"}


# ---------------------------------------------------------------- neighbourhoods and triplet shards

def star_graph(order: int = 1) -> KnowledgeGraph:
    """hub → 20 leaves ("has"), each leaf → its own 3 details ("is"): inserted forwards or backwards."""
    items = [("hub", "has", f"leaf{i:02d}") for i in range(20)]
    items += [(f"leaf{i:02d}", "is", f"detail{i:02d}{j}") for i in range(20) for j in range(3)]
    kg = KnowledgeGraph()
    for head, relation, tail in items[::order]:
        for name in (head, tail):
            kg.add_entity(Entity(name, TEXT, text=name))
        kg.add_edge(head, relation, tail)
    return kg


def test_neighbourhood_sampling() -> None:
    forwards, backwards = star_graph(), star_graph(-1)
    one = sample_neighbourhood(forwards, "hub", hops=1, max_edges=8)
    assert len(one) == 8 and all(e.head == "hub" for e in one) and one == sorted(one)
    assert one == sample_neighbourhood(backwards, "hub", hops=1, max_edges=8)  # insertion order is irrelevant
    assert one != sample_neighbourhood(forwards, "hub", hops=1, max_edges=8, seed=1)
    assert len(sample_neighbourhood(forwards, "hub", hops=1, max_edges=50)) == 20  # all fit: all kept
    assert sample_neighbourhood(forwards, "leaf03", hops=1) == [Edge("leaf03", "is", f"detail03{j}") for j in range(3)]

    two = sample_neighbourhood(forwards, "hub", hops=2, max_edges=12)
    assert len(two) == 12 and two[:5] == sample_neighbourhood(forwards, "hub", hops=1, max_edges=12)[:5]
    reached = {"hub"}
    for edge in two:  # a connected subgraph: every edge starts at a node reached before
        assert edge.head in reached
        reached.add(edge.tail)
    assert sum(e.head != "hub" for e in two) == 0  # 20 hop-1 candidates fill the cap first
    small = sample_neighbourhood(forwards, "hub", hops=2, max_edges=25)
    assert sum(e.head == "hub" for e in small) == 20 and len(small) == 25
    excluded = sample_neighbourhood(forwards, "leaf03", exclude=[frozenset(("leaf03", "detail030"))])
    assert [e.tail for e in excluded] == ["detail031", "detail032"]
    assert sample_neighbourhood(forwards, "nobody") == [] and sample_neighbourhood(forwards, "hub", hops=0) == []


def test_triplet_shards_round_trip(tmp_path: Path, triple_files: dict[str, Path]) -> None:
    kg = read_triples(triple_files["tsv"], images=triple_files["images"])
    config = NeighbourhoodConfig(hops=2, max_edges=8, tail=True)
    first = write_triplet_shards(kg, tmp_path / "a", shard_size=3, neighbourhood=config, log=lambda _: None)
    manifest = read_manifest(tmp_path / "a")
    assert manifest.total == 4 and [s.count for s in manifest.shards] == [3, 1] and first.written == 2
    assert manifest.extra["entities"] == {IMAGE: 2, TEXT: 2} and manifest.extra["relations"]["is a"] == 2

    samples = read_samples(tmp_path / "a")
    seen = set()
    for raw in samples:
        assert set(raw) - {"__key__", "triplet.json"} <= {"head.png", "head.jpg", "tail.png", "tail.jpg",
                                                          *(f"nb{i}.{x}" for i in range(8) for x in ("png", "jpg"))}
        record, images = decode_triplet(raw)
        seen.add((record["head"]["id"], record["relation"], record["tail"]["id"]))
        for slot in ("head", "tail"):
            entity = record[slot]
            if entity["kind"] == IMAGE:
                assert "text" not in entity and images[entity["image"]].size == (8, 8)
            else:
                assert entity["text"] == entity["id"] and "image" not in entity
        pair = {record["head"]["id"], record["tail"]["id"]}
        for side in ("head", "tail"):
            assert all({h, t} != pair for h, _, t in record["neighbourhood"][side])  # the triplet never leaks
        ids = {x for side in ("head", "tail") for h, _, t in record["neighbourhood"][side] for x in (h, t)}
        assert {e["id"] for e in record["neighbourhood"]["entities"]} == ids
    assert seen == set(kg.edges)
    chase = next(rec for rec in (decode_triplet(r)[0] for r in samples) if rec["relation"] == "chases")
    assert chase["neighbourhood"]["head"] == [["dog", "is a", "animal"], ["animal", "has part", "tail"]]
    assert chase["neighbourhood"]["tail"] == [["cat", "is a", "animal"], ["animal", "has part", "tail"]]

    again = write_triplet_shards(kg, tmp_path / "a", shard_size=3, neighbourhood=config, log=lambda _: None)
    assert again.skipped
    write_triplet_shards(kg, tmp_path / "b", shard_size=3, neighbourhood=config, log=lambda _: None)
    assert [sha256_file(p) for p in sorted((tmp_path / "b").glob("*.tar"))] == [s.sha256 for s in manifest.shards]

    (tmp_path / "a" / "000001.tar").unlink()
    resumed = write_triplet_shards(kg, tmp_path / "a", shard_size=3, neighbourhood=config, log=lambda _: None)
    assert (resumed.written, resumed.reused) == (1, 1) and resumed.manifest.shards == manifest.shards
    with pytest.raises(KGError, match=r"different input or settings \(changed: max_edges\); pick a new --out"):
        write_triplet_shards(kg, tmp_path / "a", shard_size=3, neighbourhood=NeighbourhoodConfig(2, 2, True))


def test_import_kg_cli(tmp_path: Path, triple_files: dict[str, Path], capsys: pytest.CaptureFixture) -> None:
    tool = load_tool("import_kg")
    args = ["--triples", str(triple_files["jsonl"]), "--images", str(triple_files["images"]), "--shard-size", "2"]
    assert tool.main([*args, "--out", str(tmp_path / "out")]) == 0
    assert read_manifest(tmp_path / "out").total == 4
    bad = tmp_path / "bad.tsv"
    bad.write_text("a\tb\tc\nd\te\n")
    assert tool.main(["--triples", str(bad), "--out", str(tmp_path / "bad")]) == 2
    assert f"import_kg: error: {bad}:2: expected 3 tab-separated fields" in capsys.readouterr().err


# ---------------------------------------------------------------- Fashion-MNIST × WordNet

def test_fashion_idx_errors(tmp_path: Path) -> None:
    with pytest.raises(KGError, match=r"not found; install Fashion-MNIST: apt-get install .*dataset-fashion-mnist"):
        fashion.load_fashion(tmp_path)
    truncated = tmp_path / "t.gz"
    truncated.write_bytes(gzip.compress(b"\x00\x00\x08\x03" + (2).to_bytes(4, "big") + (28).to_bytes(4, "big") * 2
                                        + bytes(100)))
    with pytest.raises(KGError, match=rf"{truncated}: header says \[2, 28, 28\] .*truncated"):
        fashion.read_idx(truncated)
    (tmp_path / "x.gz").write_bytes(gzip.compress(b"PK\x03\x04junk"))
    with pytest.raises(KGError, match="bad magic number"):
        fashion.read_idx(tmp_path / "x.gz")


def test_fashion_tables(wordnet) -> None:
    fashion.check_wordnet_links(wordnet)  # every group is a hypernym ancestor of its classes
    groups = {c.group for c in fashion.CLASSES}
    assert groups == set(fashion.HYPERNYM_GROUPS) and len(groups) >= 3
    assert wordnet.synset("jersey.n.03").lemma_names() == ["jersey", "T-shirt", "tee_shirt"]
    assert "handbag" in wordnet.synset("bag.n.04").lemma_names()
    terms = fashion.hypernym_terms(wordnet)
    assert {"clothing", "footwear", "container", "wear"} <= set(terms)
    assert fashion.caption_leaks(["a photo of some footwear.", "a photo of a sandal."], terms) == [
        ("a photo of some footwear.", "footwear")]
    labels = fashion.ancestor_labels(wordnet)
    names = [c.name for c in fashion.CLASSES]
    assert [names[i] for i in labels["footwear"]] == ["sandal", "sneaker", "ankle boot"]
    assert [names[i] for i in labels["garment"]] == ["t-shirt", "pair of trousers", "pullover", "coat", "shirt"]
    assert "shirt" not in labels and "entity" not in labels  # a caption's own word; an ancestor of every class
    assert all(0 < len(members) < len(names) for members in labels.values()) and len(labels) >= 10
    assert set(fashion.ancestor_labels(wordnet, {"footwear.n.02", "shoe.n.01"})) == {"footwear", "shoe"}


def test_fashion_graph_interventions_drop_class_links_or_glosses(wordnet) -> None:
    no_images = (np.zeros((0, 28, 28), np.uint8), np.zeros(0, np.uint8), [])
    full = fashion.fashion_graph(wordnet, *no_images, wordnet_hops=0)
    cut = fashion.fashion_graph(wordnet, *no_images, wordnet_hops=0, drop_class_links=True)
    link = ("jersey.n.03", "is a", "shirt.n.01")  # WordNet 3.0: a T-shirt is a shirt
    assert link in full.edges and link not in cut.edges
    assert set(full.edges) - set(cut.edges) == {link, ("shirt.n.01", "has subtype", "jersey.n.03")}
    assert cut.entities == full.entities and cut.meta["dropped_class_links"] == 2
    lemmas = fashion.fashion_graph(wordnet, *no_images, wordnet_hops=0, class_text="lemmas")
    assert lemmas.edges == full.edges and lemmas.meta["class_text"] == "lemmas"
    assert full.entities["jersey.n.03"].text == "jersey, T-shirt, tee shirt: a close-fitting pullover shirt"
    assert lemmas.entities["jersey.n.03"].text == "jersey, T-shirt, tee shirt"
    changed = {i for i in full.entities if full.entities[i] != lemmas.entities[i]}
    assert changed == {c.synset for c in fashion.CLASSES}  # the hypernyms keep their glosses
    with pytest.raises(ValueError, match="'train-00001' not a text entity"):
        full.edited(texts={"train-00001": "a boot"})


def test_make_fashion_kg(tmp_path: Path, wordnet, fashion_source: Path) -> None:
    tool = load_tool("make_fashion_kg")
    out = tmp_path / "fashion"
    args = ["--out", str(out), "--limit-per-class", "5", "--shard-size", "20", "--wordnet-hops", "1"]
    assert tool.main(args, wordnet=wordnet) == 0
    summary = json.loads((out / "fashion_kg.json").read_text())
    counts = summary["counts"]
    graph = summary["graph"]
    assert {k: counts[k] for k in ("pairs/train", "pairs/val", "zeroshot", "zeroshot_hypernym")} == {
        "pairs/train": 50, "pairs/val": 50, "zeroshot": 50, "zeroshot_hypernym": 50}
    assert graph["image_triplets"] == 50 and counts["triplets"] == graph["wordnet_triplets"] + 50
    assert 500 < graph["wordnet_triplets"] < 5000 and graph["entities"]["image"] == 50
    for name, total in counts.items():
        manifest = read_manifest(out / name)
        assert manifest.total == total and sum(1 for _ in (out / name).glob("*.tar")) == len(manifest.shards)

    terms = fashion.hypernym_terms(wordnet)
    pairs = {split: read_samples(out / "pairs" / split) for split in ("train", "val")}
    assert not {s["__key__"] for s in pairs["train"]} & {s["__key__"] for s in pairs["val"]}
    for sample in pairs["train"] + pairs["val"]:
        caption = sample["txt"].decode()
        assert caption in {t.format(c.name) for t in fashion.CAPTION_TEMPLATES for c in fashion.CLASSES}
        assert fashion.caption_leaks([caption], terms) == []
        assert fashion.CLASSES[int(sample["cls"])].name in caption
        with Image.open(io.BytesIO(sample["png"])) as image:
            assert (image.mode, image.size) == ("RGB", (28, 28))
    assert np.bincount([int(s["cls"]) for s in pairs["train"]]).tolist() == [5] * 10

    import torch

    from kclip_ds.data.transforms import SampleDecoder
    from kclip_ds.eval.zeroshot import load_classes

    decoder = SampleDecoder(lambda im: torch.from_numpy(np.array(im)).permute(2, 0, 1).float(),
                            lambda texts: torch.zeros(len(texts), 4, dtype=torch.long), 28, 4, with_labels=True)
    image, text, label, _ = decoder.decode(pairs["val"][0])  # what the training pipeline and zero-shot eval do
    assert image.shape == (3, 28, 28) and label == int(pairs["val"][0]["cls"]) and text.startswith("a ")
    names, _ = load_classes(str(out / "zeroshot_hypernym" / "000000.tar"))
    assert names == ["clothing", "footwear", "a container"]
    assert load_classes(str(out / "zeroshot" / "000000.tar"))[0][5] == "sandal"
    # pairs/val is the class zero-shot split for choices (the same classes and prompts as the test split)
    assert load_classes(str(out / "pairs" / "val" / "000000.tar")) == load_classes(str(out / "zeroshot" / "000000.tar"))
    plain = {s["__key__"]: int(s["cls"]) for s in read_samples(out / "zeroshot")}
    for sample in read_samples(out / "zeroshot_hypernym"):
        group = fashion.CLASSES[plain[sample["__key__"]]].group
        assert int(sample["cls"]) == list(fashion.HYPERNYM_GROUPS).index(group)

    train_keys = {s["__key__"] for s in pairs["train"]}
    images = []
    for raw in read_samples(out / "triplets"):
        record, decoded = decode_triplet(raw)
        if record["head"]["kind"] == IMAGE:
            images.append(record)
            assert record["relation"] == fashion.IMAGE_RELATION and record["head"]["id"] in train_keys
            assert decoded["head.png"].size == (28, 28) and record["neighbourhood"]["tail"]
            assert record["tail"]["id"] in {c.synset for c in fashion.CLASSES}
    assert len(images) == 50

    before = {name: (out / name / "manifest.json").stat().st_mtime_ns for name in counts}
    assert tool.main(args, wordnet=wordnet) == 0  # a rerun finds every split complete and rewrites nothing
    assert before == {name: (out / name / "manifest.json").stat().st_mtime_ns for name in counts}
    assert tool.main([*args[:-2], "--wordnet-hops", "0"], wordnet=wordnet) == 2  # other settings: refused
