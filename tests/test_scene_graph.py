"""kclip_ds.knowledge.scene_graph and tools/parse_scene_graphs.py: captions -> sg.json scene graphs."""

from __future__ import annotations

import io
import json
import os
import random
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from kclip_ds.data.demo_world import COLOURS, RELATIONS, SHAPES, make_sample
from kclip_ds.data.make_shards import ShardError
from kclip_ds.data.shards import AtomicShardWriter, Manifest, read_manifest, write_manifest
from kclip_ds.knowledge import scene_graph as sg
from kclip_ds.knowledge.negatives import attribute_swap, relation_swap

ROOT = Path(__file__).resolve().parents[1]
NONSENSE = "??? !!!"


@pytest.fixture(scope="module")
def parser() -> sg.SceneGraphParser:
    """One parser for the module: spaCy loads on the first parse, once per process."""
    parser = sg.SceneGraphParser()
    parser.parse("a dog")
    return parser


def _facts(graph: dict) -> list[tuple[str, str, str]]:
    return sorted(sg.triples(graph))


def test_verb_relation(parser):
    graph = parser.parse("an astronaut rides a horse")
    assert graph == {"objects": [{"name": "astronaut", "attributes": []}, {"name": "horse", "attributes": []}],
                     "relations": [{"subject": 0, "predicate": "rides", "object": 1}]}


@pytest.mark.parametrize("predicate", ["to the left of", "to the right of", "in front of", "on top of",
                                       "next to", "on the left side of", "at the top of"])
def test_spatial_phrase_is_one_relation(parser, predicate):
    graph = parser.parse(f"a red circle {predicate} a blue square")
    assert graph == {"objects": [{"name": "circle", "attributes": ["red"]}, {"name": "square", "attributes": ["blue"]}],
                     "relations": [{"subject": 0, "predicate": predicate, "object": 1}]}


def test_spatial_phrase_after_a_verb_keeps_the_verb(parser):
    graph = parser.parse("a cat sitting in the middle of a road")
    assert _facts(graph) == [("cat", "sitting in the middle of", "road")]


def test_attributes_and_attribute_triples(parser):
    graph = parser.parse("a small red ball")
    assert graph == {"objects": [{"name": "ball", "attributes": ["small", "red"]}], "relations": []}
    assert sg.triples(graph) == [("ball", "is", "small"), ("ball", "is", "red")]


def test_repeated_mentions_are_one_object(parser):
    caption = "a purple star below a yellow diamond and a black circle to the right of the purple star"
    graph = parser.parse(caption)
    assert [o["name"] for o in graph["objects"]] == ["star", "diamond", "circle"]
    assert graph["relations"] == [{"subject": 0, "predicate": "below", "object": 1},
                                  {"subject": 2, "predicate": "to the right of", "object": 0}]
    chain = parser.parse("the dog chases the cat and the cat chases the mouse")
    assert [o["name"] for o in chain["objects"]] == ["dog", "cat", "mouse"]
    # spaCy reads this re-mention as the compound noun "green cross"; it still resolves to the green cross
    remention = parser.parse("a red star above a green cross and a yellow circle to the right of the green cross")
    assert sg.same_graph(remention, {
        "objects": [{"name": "star", "attributes": ["red"]}, {"name": "cross", "attributes": ["green"]},
                    {"name": "circle", "attributes": ["yellow"]}],
        "relations": [{"subject": 0, "predicate": "above", "object": 1},
                      {"subject": 2, "predicate": "to the right of", "object": 1}]})


def test_related_mentions_are_never_merged(parser):
    graph = parser.parse("a red circle next to a red circle")
    assert len(graph["objects"]) == 2 and graph["relations"] == [{"subject": 0, "predicate": "next to", "object": 1}]


def test_coordinated_objects_share_the_relation(parser):
    # No relation of its own after "and": the caption is not cut there.
    assert _facts(parser.parse("a star below a diamond and a circle")) == [("star", "below", "circle"),
                                                                           ("star", "below", "diamond")]


def test_pronouns_are_not_objects(parser):
    assert [o["name"] for o in parser.parse("it is on the table")["objects"]] == ["table"]


@pytest.mark.parametrize("caption", ["", "   ", NONSENSE, "of the and", None])
def test_nonsense_gives_the_empty_graph(parser, caption):
    assert parser.parse_with_status(caption) == ({"objects": [], "relations": []}, "empty")


def test_a_raising_parse_gives_the_empty_graph(parser, monkeypatch):
    def boom(caption):
        raise ValueError("bad token")
    monkeypatch.setattr(parser, "_parse_clauses", boom)
    assert parser.parse_with_status("a dog") == ({"objects": [], "relations": []}, "failed")
    assert parser.last_error == "ValueError: bad token"


def test_parsing_is_deterministic(parser):
    caption = "a black star to the left of a blue circle and a green square to the right of the black star"
    assert json.dumps(parser.parse(caption)) == json.dumps(sg.SceneGraphParser().parse(caption))


_PROPERTY = settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])


@_PROPERTY
@given(st.text(alphabet=st.sampled_from(list("abcdeorst ,.!?'-")), max_size=40)
       | st.lists(st.sampled_from(["a", "the", "red", "dog", "on", "of", "and", "left", "to", "it", "rides"]),
                  max_size=10).map(" ".join))
def test_any_text_gives_a_well_formed_graph(parser, caption):
    graph, status = parser.parse_with_status(caption)
    assert status in ("ok", "empty") and (status == "empty") == (not graph["objects"])
    assert all(set(o) == {"name", "attributes"} and o["name"] for o in graph["objects"])
    for rel in graph["relations"]:
        assert 0 <= rel["subject"] < len(graph["objects"]) and 0 <= rel["object"] < len(graph["objects"])
        assert rel["subject"] != rel["object"] and rel["predicate"]
    assert parser.parse(caption) == graph


@_PROPERTY
@given(st.permutations(list(COLOURS)), st.permutations(list(SHAPES)), st.sampled_from(RELATIONS))
def test_shape_captions_parse_exactly(parser, colours, shapes, predicate):
    (c1, c2), (s1, s2) = colours[:2], shapes[:2]
    assert parser.parse(f"a {c1} {s1} {predicate} a {c2} {s2}") == {
        "objects": [{"name": s1, "attributes": [c1]}, {"name": s2, "attributes": [c2]}],
        "relations": [{"subject": 0, "predicate": predicate, "object": 1}]}


def test_same_graph_ignores_order_indices_and_bboxes():
    a = {"objects": [{"name": "circle", "attributes": ["red"], "bbox": [0, 0, 4, 4]},
                     {"name": "square", "attributes": ["blue"]}],
         "relations": [{"subject": 0, "predicate": "above", "object": 1}]}
    b = {"objects": [{"name": "square", "attributes": ["blue"]}, {"name": "circle", "attributes": ["red"]}],
         "relations": [{"subject": 1, "predicate": "above", "object": 0}]}
    assert sg.same_graph(a, b)
    assert not sg.same_graph(a, {**b, "relations": [{"subject": 0, "predicate": "above", "object": 1}]})
    assert not sg.same_graph(a, {"objects": b["objects"][:1], "relations": []})
    assert not sg.same_graph(a, {"objects": [], "relations": [{"subject": 3, "predicate": "x", "object": 0}]})
    assert sg.graph_agreement([a, a], [b, {"objects": [], "relations": []}]) == 0.5


def test_triples_match_what_the_knowledge_encoder_encodes(parser):
    from kclip_ds.models.graph import tokenize_triples

    class WordIds:  # encode(text) -> one id per distinct phrase, so rows can be read back
        def __init__(self):
            self.ids: dict[str, int] = {}

        def encode(self, text):
            return [self.ids.setdefault(text, len(self.ids) + 1)]

    graph = parser.parse("a red circle to the left of a blue square")
    tok = WordIds()
    out = tokenize_triples(graph, tok, max_triples=6, phrase_len=1)
    phrases = {i: text for text, i in tok.ids.items()}
    encoded = [tuple(phrases[int(out[k][row, 0])] for k in ("heads_ids", "rels_ids", "tails_ids"))
               for row in range(int(out["triple_mask"].sum()))]
    assert encoded == sg.triples(graph) == [("circle", "to the left of", "square"), ("circle", "is", "red"),
                                           ("square", "is", "blue")]


def test_parsed_graphs_drive_the_negative_generators(parser):
    caption = "a red circle to the left of a blue square"
    graph = parser.parse(caption)
    assert relation_swap(caption, graph, random.Random(0)) == "a blue square to the left of a red circle"
    assert attribute_swap(caption, graph, random.Random(0)) == "a blue circle to the left of a red square"


def test_agreement_with_demo_ground_truth(parser):
    samples = [make_sample(0, "train", i, 32) for i in range(300)]
    parsed = [parser.parse(s["txt"].decode()) for s in samples]
    agreement = sg.graph_agreement(parsed, [json.loads(s["sg.json"]) for s in samples])
    print(f"scene-graph agreement with demo ground truth: {agreement:.4f} on {len(samples)} samples")
    assert agreement >= 0.95


# ---------------------------------------------------------------------------------------------- the tool

def _write_input(root: Path, broken: bool = False) -> Path:
    """Two shards: demo samples (with an opaque .pyd member) and, in the second, a nonsense caption."""
    root.mkdir()
    manifest = Manifest()
    for shard, indices in enumerate((range(4), range(4, 8))):
        with AtomicShardWriter(root / f"{shard:06d}.tar") as writer:
            for i in indices:
                sample = make_sample(0, "val", i, 32)
                writer.write({**sample, "pyd": b"\x80\x04never unpickled"})
            if shard == 1:
                odd = {"__key__": "odd-000000", "txt": NONSENSE, "png": sample["png"]}
                writer.write({k: v for k, v in odd.items() if not (broken and k == "txt")})
            manifest.shards.append(writer.close())
    write_manifest(root, manifest)
    return root


def _samples(path: Path) -> dict[str, dict[str, bytes]]:
    return dict(sg._read_samples(path))


def test_tool_writes_parsed_shards(parser, tmp_path, kill_after_first_shard):
    source = _write_input(tmp_path / "in")
    out = tmp_path / "out"
    proc = subprocess.run([sys.executable, "tools/parse_scene_graphs.py", "--input", str(source), "--out", str(out),
                           "--workers", "2"], check=False, cwd=ROOT, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "2 written, 0 skipped" in proc.stdout and "1 empty, 0 failed" in proc.stdout
    manifest, original = read_manifest(out), read_manifest(source)
    assert manifest.counts() == original.counts() == {"000000.tar": 4, "000001.tar": 5}
    extra = manifest.extra
    assert (extra["parsed"], extra["empty"], extra["failed"]) == (8, 1, 0)
    assert extra["agreement"] == {"compared": 8, "same": 8, "fraction": 1.0}
    assert extra["member"] == "sg.json" and extra["versions"]["parser"] == "sng_parser"
    assert extra["versions"]["spacy"].startswith("3.") and extra["versions"]["SceneGraphParser"] == "0.1.0"
    for name in manifest.counts():
        before, after = _samples(source / name), _samples(out / name)
        assert list(after) == list(before)
        for key, members in after.items():
            assert set(members) == set(before[key]) | {"sg.json"}  # the nonsense sample had no sg.json
            assert {k: v for k, v in members.items() if k != "sg.json"} == \
                   {k: v for k, v in before[key].items() if k != "sg.json"}  # .pyd passes through as bytes
            assert json.loads(members["sg.json"]) == parser.parse(members["txt"].decode())
    assert (out / sg.ERRORS_NAME).read_text() == ""
    assert not list(out.glob(".*.tmp-*")) and not (out / sg.STATE_NAME).exists()

    # Reruns: a fresh single-worker run gives byte-identical shards; the finished directory is skipped.
    again = tmp_path / "again"
    logs: list[str] = []
    sg.parse_shards(source, again, workers=1, log=logs.append)
    for name in manifest.counts():
        assert (again / name).read_bytes() == (out / name).read_bytes()
    assert (again / "manifest.json").read_bytes() == (out / "manifest.json").read_bytes()
    mtimes = {p.name: p.stat().st_mtime_ns for p in out.glob("*.tar")}
    logs.clear()
    sg.parse_shards(source, out, workers=2, log=logs.append)
    assert "0 written, 2 skipped" in logs[-2]
    assert {p.name: p.stat().st_mtime_ns for p in out.glob("*.tar")} == mtimes

    # A run killed after shard 0, with shard 1 half-written (only its temp file exists) and no manifest yet.
    killed = tmp_path / "killed"
    kill_after_first_shard(lambda log: sg.parse_shards(source, killed, workers=1, log=log), killed,
                           (out / "000001.tar").read_bytes()[:1000])
    logs.clear()
    sg.parse_shards(source, killed, workers=1, log=logs.append)
    assert "1 written, 1 skipped" in logs[-2]
    for name in ("000000.tar", "000001.tar", "manifest.json"):
        assert (killed / name).read_bytes() == (again / name).read_bytes()
    assert not list(killed.glob(".*.tmp-*")) and not (killed / sg.STATE_NAME).exists()


def test_keep_existing_writes_sg_parsed(parser, tmp_path):
    source = _write_input(tmp_path / "in")
    out = tmp_path / "out"
    manifest = sg.parse_shards(source, out, keep_existing=True, log=lambda _: None)
    assert manifest.extra["member"] == "sg_parsed.json"
    sample = _samples(out / "000000.tar")["val-000000"]
    assert sample["sg.json"] == _samples(source / "000000.tar")["val-000000"]["sg.json"]
    assert sg.same_graph(json.loads(sample["sg_parsed.json"]), json.loads(sample["sg.json"]))
    with pytest.raises(ShardError, match="different input or parser"):
        sg.parse_shards(source, out, keep_existing=False, log=lambda _: None)


def test_user_errors_name_the_file_and_the_fix(parser, tmp_path):
    with pytest.raises(ShardError, match="no manifest.json; point --input at a shard directory"):
        sg.parse_shards(tmp_path, tmp_path / "out")
    source = _write_input(tmp_path / "in", broken=True)
    with pytest.raises(ShardError, match="000001.tar: sample odd-000000 has no .txt caption; add one or drop"):
        sg.parse_shards(source, tmp_path / "out", log=lambda _: None)
    # The bad shard never appears, not even half-written; the good one is finished and kept.
    assert sorted(p.name for p in (tmp_path / "out").iterdir() if not p.name.startswith(".")) == ["000000.tar"]
    assert not list((tmp_path / "out").glob(".*.tmp-*"))
    with pytest.raises(ShardError, match="is the input directory"):
        sg.parse_shards(source, source)


def test_tar_members_are_read_as_raw_bytes(tmp_path):
    path = tmp_path / "x.tar"
    with tarfile.open(path, "w") as tar:
        for name, data in (("a.txt", b"a dog"), ("a.pyd", b"\x80\x04junk"), ("b.txt", b"a cat")):
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    assert _samples(path) == {"a": {"txt": b"a dog", "pyd": b"\x80\x04junk"}, "b": {"txt": b"a cat"}}
