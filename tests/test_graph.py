"""TripleEncoder (the shared graph-transformer knowledge encoder) and tokenize_triples."""

from __future__ import annotations

import copy
import json
import math

import pytest
import torch
from open_clip.tokenizer import SimpleTokenizer
from torch import nn

from kclip_ds.data.demo_world import make_sample
from kclip_ds.export.extras import _REGISTRY
from kclip_ds.models.graph import TripleEncoder, TripleLayer, tokenize_triples

VOCAB, TOKEN_DIM, WIDTH, OUT_DIM, HEADS = 50, 12, 16, 8, 4
B, T, P = 3, 5, 4


def make_encoder(seed: int = 0, **kwargs) -> TripleEncoder:
    torch.manual_seed(seed)
    cfg = {"token_dim": TOKEN_DIM, "width": WIDTH, "out_dim": OUT_DIM, "layers": 2, "heads": HEADS, "max_triples": 6}
    return TripleEncoder(**{**cfg, **kwargs}).eval()


def make_embedding(seed: int = 1) -> nn.Embedding:
    torch.manual_seed(seed)
    return nn.Embedding(VOCAB, TOKEN_DIM)


def make_inputs(seed: int = 2) -> dict[str, torch.Tensor]:
    """Random triples; sample 0 has 3 real triples, sample 1 all 5, sample 2 none; some phrases padded."""
    g = torch.Generator().manual_seed(seed)
    ids = {k: torch.randint(1, VOCAB, (B, T, P), generator=g) for k in ("heads_ids", "rels_ids", "tails_ids")}
    for value in ids.values():
        value[:, :, 2:] *= torch.randint(0, 2, (B, T, P - 2), generator=g)  # ragged phrase lengths
    ids["rels_ids"][1, 4] = 0  # an all-padding phrase inside a real triple
    mask = torch.tensor([[True, False, True, True, False], [True] * 5, [False] * 5])
    entity_ids = torch.tensor([[[0, 1], [5, 5], [1, 2], [2, -1], [-1, -1]],
                               [[0, 1], [1, 0], [0, -1], [1, -1], [3, 4]],
                               [[-1, -1]] * 5])
    return {**ids, "triple_mask": mask, "entity_ids": entity_ids}


def run(enc: TripleEncoder, emb: nn.Embedding, inputs: dict[str, torch.Tensor]):
    return enc(inputs["heads_ids"], inputs["rels_ids"], inputs["tails_ids"], inputs["triple_mask"], emb,
               entity_ids=inputs["entity_ids"])


def test_shapes_and_unit_norm():
    out = run(make_encoder(), make_embedding(), make_inputs())
    assert out.k.shape == (B, OUT_DIM) and out.k.dtype == torch.float32
    assert torch.allclose(out.k.norm(dim=-1), torch.ones(B), atol=1e-5)
    assert out.has_knowledge.tolist() == [True, True, False]
    k, has_knowledge = out  # a plain tuple for callers that unpack
    assert k is out.k and has_knowledge is out.has_knowledge


def test_zero_triple_samples_are_finite():
    enc, emb, inputs = make_encoder(), make_embedding(), make_inputs()
    inputs["triple_mask"][:] = False
    out = run(enc, emb, inputs)
    assert torch.isfinite(out.k).all() and not out.has_knowledge.any()
    assert torch.allclose(out.k[0], out.k[1], atol=1e-6)  # only the summary token remains: same for all
    empty = {k: v[:, :0] for k, v in inputs.items()}  # T = 0 at all
    assert torch.allclose(run(enc, emb, empty).k, out.k, atol=1e-6)


@pytest.mark.parametrize("relation_bias", [False, True])
def test_padded_triples_are_never_attended(relation_bias: bool):
    enc, emb, inputs = make_encoder(relation_bias=relation_bias), make_embedding(), make_inputs()
    if relation_bias:
        nn.init.normal_(enc.relation_bias.weight)
    ref = run(enc, emb, inputs).k
    changed = copy.deepcopy(inputs)
    for key in ("heads_ids", "rels_ids", "tails_ids"):
        changed[key][0, [1, 4]] = torch.randint(1, VOCAB, (2, P))
        changed[key][2] = torch.randint(1, VOCAB, (T, P))
    changed["entity_ids"][0, 1] = torch.tensor([0, 2])  # a padded triple "sharing" entities changes nothing
    assert torch.allclose(run(enc, emb, changed).k, ref, atol=1e-6)


@pytest.mark.parametrize("relation_bias", [False, True])
def test_permuting_triples_leaves_k_unchanged(relation_bias: bool):
    enc, emb, inputs = make_encoder(relation_bias=relation_bias), make_embedding(), make_inputs()
    if relation_bias:
        nn.init.normal_(enc.relation_bias.weight)
    ref = run(enc, emb, inputs).k
    perm = torch.tensor([3, 0, 4, 2, 1])  # mixes real and padded positions
    permuted = {k: v[:, perm] for k, v in inputs.items()}
    assert torch.allclose(run(enc, emb, permuted).k, ref, atol=1e-6)


def test_relation_bias_zero_is_noop_and_nonzero_matters():
    plain, emb, inputs = make_encoder(), make_embedding(), make_inputs()
    biased = make_encoder(seed=5, relation_bias=True)
    missing, unexpected = biased.load_state_dict(plain.state_dict(), strict=False)
    assert missing == ["relation_bias.weight"] and not unexpected
    assert torch.equal(biased.relation_bias.weight, torch.zeros(3, HEADS))  # zero-initialised
    ref = run(plain, emb, inputs).k
    assert torch.allclose(run(biased, emb, inputs).k, ref, atol=1e-6)
    with torch.no_grad():
        biased.relation_bias.weight[1] = torch.tensor([3.0, -2.0, 1.0, 4.0])  # shares an entity
    out = run(biased, emb, inputs).k
    assert not torch.allclose(out[:2], ref[:2], atol=1e-4)  # samples 0 and 1 have triples sharing entities
    assert torch.allclose(out[2], ref[2], atol=1e-6)  # no triples: the summary token's bias is always 0
    types = biased.relation_types(inputs["entity_ids"])
    assert types[0].tolist() == [[2, 0, 1, 0, 0], [0, 2, 0, 0, 0], [1, 0, 2, 1, 0], [0, 0, 1, 2, 0], [0, 0, 0, 0, 2]]


def test_relation_bias_needs_entity_ids():
    enc, emb, inputs = make_encoder(relation_bias=True), make_embedding(), make_inputs()
    with pytest.raises(AssertionError, match="entity_ids"):
        enc(inputs["heads_ids"], inputs["rels_ids"], inputs["tails_ids"], inputs["triple_mask"], emb)


def test_shape_assertions_name_the_tensor():
    enc, emb, inputs = make_encoder(max_triples=4), make_embedding(), make_inputs()
    with pytest.raises(AssertionError, match="max_triples=4"):
        run(enc, emb, inputs)
    enc = make_encoder()
    bad = {**inputs, "tails_ids": inputs["tails_ids"][:, :, :2]}
    with pytest.raises(AssertionError, match="tails_ids"):
        run(enc, emb, bad)
    with pytest.raises(AssertionError, match="triple_mask"):
        run(enc, emb, {**inputs, "triple_mask": inputs["triple_mask"].long()})


def naive_layer(layer: TripleLayer, x: torch.Tensor, attn_mask: torch.Tensor) -> torch.Tensor:
    """The same pre-LN layer with attention written out: softmax(q kᵀ / √d + mask) v."""
    b, n, w = x.shape
    d = w // layer.heads
    h = layer.ln_1(x)
    q, k, v = (h @ layer.qkv.weight.T + layer.qkv.bias).split(w, dim=-1)
    q, k, v = (t.reshape(b, n, layer.heads, d).transpose(1, 2) for t in (q, k, v))
    weights = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(d) + attn_mask, dim=-1)
    attn = (weights @ v).transpose(1, 2).reshape(b, n, w) @ layer.out_proj.weight.T + layer.out_proj.bias
    x = x + attn
    return x + layer.mlp(layer.ln_2(x))


@pytest.mark.parametrize("relation_bias", [False, True])
def test_sdpa_matches_naive_attention(relation_bias: bool):
    enc, inputs = make_encoder(relation_bias=relation_bias), make_inputs()
    if relation_bias:
        nn.init.normal_(enc.relation_bias.weight)
    x = torch.randn(B, T + 1, WIDTH)
    mask = enc.attention_mask(inputs["triple_mask"], inputs["entity_ids"], x.dtype)
    assert mask.shape == (B, HEADS if relation_bias else 1, T + 1, T + 1)
    with torch.no_grad():
        assert torch.allclose(enc.layers[0](x, mask), naive_layer(enc.layers[0], x, mask), atol=1e-5)


def test_grad_checkpointing_same_output_and_grads():
    inputs = make_inputs()
    results = []
    for ckpt in (False, True):
        enc, emb = make_encoder(relation_bias=True).train(), make_embedding()
        nn.init.normal_(enc.relation_bias.weight)
        enc.set_grad_checkpointing(ckpt)
        k = run(enc, emb, inputs).k
        (k * torch.linspace(-1, 1, OUT_DIM)).sum().backward()
        grads = {n: p.grad.clone() for n, p in enc.named_parameters()}
        results.append((k.detach(), grads, emb.weight.grad.clone()))
    (k0, g0, e0), (k1, g1, e1) = results
    assert torch.allclose(k0, k1, atol=1e-6) and torch.allclose(e0, e1, atol=1e-6)
    assert g0.keys() == g1.keys()
    for name in g0:
        assert torch.allclose(g0[name], g1[name], atol=1e-6), name


def test_backward_reaches_shared_token_embedding():
    enc, emb, inputs = make_encoder(), make_embedding(), make_inputs()
    run(enc, emb, inputs).k.sum().backward()
    grad = emb.weight.grad
    used = torch.cat([inputs[k][:2].flatten() for k in ("heads_ids", "rels_ids", "tails_ids")]).unique()
    assert grad[used[used != 0]].abs().sum(-1).gt(0).any()
    assert torch.equal(grad[0], torch.zeros(TOKEN_DIM))  # the padding id never contributes


def test_extra_config_round_trip():
    enc = make_encoder(relation_bias=True, dropout=0.1, mlp_ratio=2.0)
    cfg = json.loads(json.dumps(enc.extra_config()))
    rebuilt = TripleEncoder(**cfg)
    assert _REGISTRY["triple_encoder"] is TripleEncoder and TripleEncoder.extra_type == "triple_encoder"
    assert {n: p.shape for n, p in rebuilt.named_parameters()} == {n: p.shape for n, p in enc.named_parameters()}
    rebuilt.load_state_dict(enc.state_dict(), strict=True)


@pytest.fixture(scope="module")
def bpe() -> SimpleTokenizer:
    return SimpleTokenizer()


def expected_triples(graph: dict) -> list[tuple[str, str, str, int, int]]:
    objs = graph["objects"]
    rels = [(objs[r["subject"]]["name"], r["predicate"], objs[r["object"]]["name"], r["subject"], r["object"])
            for r in graph["relations"]]
    return rels + [(o["name"], "is", a, i, -1) for i, o in enumerate(objs) for a in o["attributes"]]


@pytest.mark.parametrize("index", range(4))
def test_tokenize_triples_on_demo_scene_graphs(index: int, bpe: SimpleTokenizer):
    graph = json.loads(make_sample(0, "train", index, 64)["sg.json"])
    expected = expected_triples(graph)
    assert len(graph["relations"]) >= 1 and 3 <= len(expected) <= 6
    out = tokenize_triples(graph, bpe, max_triples=6, phrase_len=5)
    assert out["heads_ids"].shape == out["rels_ids"].shape == out["tails_ids"].shape == (6, 5)
    assert out["triple_mask"].tolist() == [True] * len(expected) + [False] * (6 - len(expected))
    assert out["entity_ids"].tolist() == [[h, t] for *_, h, t in expected] + [[-1, -1]] * (6 - len(expected))
    for row, (head, rel, tail, *_) in enumerate(expected):
        for key, text in (("heads_ids", head), ("rels_ids", rel), ("tails_ids", tail)):
            ids = [i for i in out[key][row].tolist() if i != 0]
            assert ids == bpe.encode(text)[:5], (key, text)
    assert not out["heads_ids"][len(expected):].any()


def test_tokenize_triples_truncates_and_feeds_the_encoder(bpe: SimpleTokenizer):
    graph = json.loads(make_sample(0, "train", 0, 64)["sg.json"])
    n_rel = len(graph["relations"])
    out = tokenize_triples(graph, bpe, max_triples=n_rel, phrase_len=2)
    assert out["triple_mask"].all() and (out["entity_ids"] >= 0).all()  # relation triples come first
    long_phrase = tokenize_triples({"objects": [{"name": "a very long object name here", "attributes": []}] * 2,
                                    "relations": [{"subject": 0, "predicate": "to the left of", "object": 1}]},
                                   bpe, max_triples=2, phrase_len=3)
    assert long_phrase["rels_ids"][0].tolist() == bpe.encode("to the left of")[:3]
    with pytest.raises(TypeError, match="encode"):
        tokenize_triples(graph, object(), max_triples=6, phrase_len=5)

    batch = [tokenize_triples(json.loads(make_sample(0, "train", i, 64)["sg.json"]), bpe, 6, 5) for i in range(2)]
    inputs = {k: torch.stack([b[k] for b in batch]) for k in batch[0]}
    enc = make_encoder(token_dim=8, relation_bias=True)
    emb = nn.Embedding(bpe.vocab_size, 8)
    out = run(enc, emb, inputs)
    assert torch.isfinite(out.k).all() and out.has_knowledge.all()
