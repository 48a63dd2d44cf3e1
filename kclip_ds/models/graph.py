"""The graph-transformer encoder of scene-graph triples, shared by every knowledge method.

    enc = TripleEncoder(token_dim=512, width=256, out_dim=512)
    out = enc(heads_ids, rels_ids, tails_ids, triple_mask, model.token_embedding)   # out.k: [B, out_dim]

Structure-CLIP's Knowledge-Enhanced Encoder (METHODS.md §2): a phrase is the mean of its token embeddings,
a triple token is E(h) + E(r) − E(t), the triple tokens pass through a transformer with no positional
embedding across triples, and a summary token's output, projected and L2-normalised, is the knowledge
embedding k. Deliberate differences from the reference: phrases are embedded with the CLIP text tower's own
token embedding (one vocabulary, no second BERT model), the transformer is a small pre-LN stack trained from
scratch (``layers``/``heads``/``width``) instead of the pretrained 12-layer BERT, and a learned summary token
plays the part of BERT's first position. ``relation_bias=True`` adds a Graphormer-style attention bias
between triples that share an entity (beyond the reference).
"""

from __future__ import annotations

from typing import Any, NamedTuple

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from kclip_ds.export.extras import register_extra

PAD_ID = 0  # padding token of phrases (open_clip pads with 0 too; BPE id 0 is "!", never a phrase on its own)
NO_ENTITY = -1
# Relation "types" between two triples, each with a learned per-head attention bias.
REL_NONE, REL_SHARED_ENTITY, REL_SELF = 0, 1, 2
NUM_RELATION_TYPES = 3


class KnowledgeOutput(NamedTuple):
    k: torch.Tensor  # [B, out_dim], unit norm; a sample without triples gets the summary token's output alone
    has_knowledge: torch.Tensor  # [B] bool: the sample has at least one real triple


class TripleLayer(nn.Module):
    """Pre-LN transformer layer over the tokens ``x: [B, N, width]``; ``attn_mask: [B, 1 or heads, N, N]``
    is added to the attention logits (−inf for keys never to attend to)."""

    def __init__(self, width: int, heads: int, mlp_ratio: float = 4.0, dropout: float = 0.0) -> None:
        super().__init__()
        assert width % heads == 0, f"width {width} is not divisible by heads {heads}"
        self.heads, self.dropout = heads, dropout
        self.ln_1 = nn.LayerNorm(width)
        self.qkv = nn.Linear(width, 3 * width)
        self.out_proj = nn.Linear(width, width)
        self.ln_2 = nn.LayerNorm(width)
        hidden = int(width * mlp_ratio)
        self.mlp = nn.Sequential(nn.Linear(width, hidden), nn.GELU(), nn.Linear(hidden, width))
        self.drop = nn.Dropout(dropout)

    def attention(self, x: torch.Tensor, attn_mask: torch.Tensor) -> torch.Tensor:
        """Multi-head self-attention of ``x: [B, N, width]`` (already normalised) -> [B, N, width]."""
        b, n, w = x.shape
        q, k, v = self.qkv(x).view(b, n, 3, self.heads, w // self.heads).permute(2, 0, 3, 1, 4)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask,
                                             dropout_p=self.dropout if self.training else 0.0)
        return self.out_proj(out.transpose(1, 2).reshape(b, n, w))

    def forward(self, x: torch.Tensor, attn_mask: torch.Tensor) -> torch.Tensor:
        x = x + self.drop(self.attention(self.ln_1(x), attn_mask))
        return x + self.drop(self.mlp(self.ln_2(x)))


@register_extra("triple_encoder")
class TripleEncoder(nn.Module):
    """Scene-graph triples -> knowledge embedding ``k: [B, out_dim]`` (unit norm).

    ``token_dim`` is the width of the shared token embedding passed to ``forward``; ``max_triples`` bounds
    T (there is no positional embedding, so it only validates inputs); ``relation_bias`` turns on the
    entity-sharing attention bias, which then needs ``entity_ids``.
    """

    def __init__(self, token_dim: int, width: int, out_dim: int, layers: int = 2, heads: int = 4,
                 max_triples: int = 6, mlp_ratio: float = 4.0, relation_bias: bool = False,
                 dropout: float = 0.0) -> None:
        super().__init__()
        self._config = {"token_dim": token_dim, "width": width, "out_dim": out_dim, "layers": layers,
                        "heads": heads, "max_triples": max_triples, "mlp_ratio": mlp_ratio,
                        "relation_bias": relation_bias, "dropout": dropout}
        self.token_dim, self.heads, self.max_triples = token_dim, heads, max_triples
        self.in_proj = nn.Linear(token_dim, width)
        self.ln_in = nn.LayerNorm(width)
        self.summary_token = nn.Parameter(torch.randn(width) * width ** -0.5)
        self.layers = nn.ModuleList(TripleLayer(width, heads, mlp_ratio, dropout) for _ in range(layers))
        self.ln_post = nn.LayerNorm(width)
        self.out_proj = nn.Linear(width, out_dim)
        # Zero-initialised: training starts from plain attention and learns how much entity sharing matters.
        self.relation_bias = nn.Embedding(NUM_RELATION_TYPES, heads) if relation_bias else None
        if self.relation_bias is not None:
            nn.init.zeros_(self.relation_bias.weight)
        self.grad_checkpointing = False

    def extra_config(self) -> dict[str, Any]:
        """The constructor's keyword arguments: ``TripleEncoder(**m.extra_config())`` rebuilds the module."""
        return dict(self._config)

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        self.grad_checkpointing = enable

    def embed_triples(self, heads_ids: torch.Tensor, rels_ids: torch.Tensor, tails_ids: torch.Tensor,
                      token_embedding: nn.Embedding) -> torch.Tensor:
        """``*_ids: [B, T, P]`` -> triple tokens ``[B, T, width]``: LN(Linear(E(h) + E(r) − E(t)))."""
        ids = torch.stack((heads_ids, rels_ids, tails_ids))  # [3, B, T, P]: one embedding call, one ZeRO-3 gather
        emb = token_embedding(ids)  # through forward, never .weight: ZeRO-3 gathers parameters only there
        assert emb.shape[-1] == self.token_dim, \
            f"token_embedding width {emb.shape[-1]} != token_dim {self.token_dim}"
        keep = (ids != PAD_ID).unsqueeze(-1).to(emb.dtype)  # [3, B, T, P, 1]
        phrase = (emb * keep).sum(-2) / keep.sum(-2).clamp(min=1.0)  # an all-padding phrase is 0, not NaN
        h, r, t = phrase.unbind(0)
        return self.ln_in(self.in_proj(h + r - t))

    def relation_types(self, entity_ids: torch.Tensor) -> torch.Tensor:
        """``entity_ids: [B, T, 2]`` -> ``[B, T, T]`` int64: REL_SELF on the diagonal, REL_SHARED_ENTITY where
        two triples share an entity (−1 matches nothing), else REL_NONE."""
        e_i, e_j = entity_ids[:, :, None, :, None], entity_ids[:, None, :, None, :]  # [B, T, 1, 2, 1], [B, 1, T, 1, 2]
        shared = ((e_i == e_j) & (e_i != NO_ENTITY)).flatten(3).any(-1)  # [B, T, T]
        types = shared.long() * REL_SHARED_ENTITY
        eye = torch.eye(entity_ids.shape[1], dtype=torch.bool, device=entity_ids.device)
        return types.masked_fill(eye, REL_SELF)

    def attention_mask(self, triple_mask: torch.Tensor, entity_ids: torch.Tensor | None,
                       dtype: torch.dtype) -> torch.Tensor:
        """Additive logits mask over [summary, triples]: ``[B, 1, T+1, T+1]``, or ``[B, heads, T+1, T+1]`` with
        the relation bias (0 in the summary token's row and column); −inf for padded keys."""
        b, t = triple_mask.shape
        valid = torch.cat((triple_mask.new_ones(b, 1), triple_mask), 1)  # the summary token is always valid
        mask = torch.zeros(b, 1, 1, t + 1, dtype=dtype, device=triple_mask.device)
        mask = mask.masked_fill(~valid[:, None, None, :], float("-inf")).expand(b, 1, t + 1, t + 1)
        if self.relation_bias is None:
            return mask
        bias = self.relation_bias(self.relation_types(entity_ids)).permute(0, 3, 1, 2).to(dtype)  # [B, H, T, T]
        return mask + F.pad(bias, (1, 0, 1, 0))

    def forward(self, heads_ids: torch.Tensor, rels_ids: torch.Tensor, tails_ids: torch.Tensor,
                triple_mask: torch.Tensor, token_embedding: nn.Embedding,
                entity_ids: torch.Tensor | None = None) -> KnowledgeOutput:
        """``heads_ids, rels_ids, tails_ids: [B, T, P]`` int64 phrase token ids (0 = padding),
        ``triple_mask: [B, T]`` bool (True = real triple), ``token_embedding``: the CLIP text tower's,
        ``entity_ids: [B, T, 2]`` int64 head/tail entity of each triple (−1 = none; needed with relation_bias).
        Returns ``KnowledgeOutput(k: [B, out_dim] unit norm, has_knowledge: [B] bool)``."""
        assert heads_ids.dim() == 3, f"heads_ids must be [B, T, P], got {tuple(heads_ids.shape)}"
        b, t, p = heads_ids.shape
        assert rels_ids.shape == heads_ids.shape, f"rels_ids {tuple(rels_ids.shape)} != heads_ids {(b, t, p)}"
        assert tails_ids.shape == heads_ids.shape, f"tails_ids {tuple(tails_ids.shape)} != heads_ids {(b, t, p)}"
        assert t <= self.max_triples, f"heads_ids has T={t} triples, more than max_triples={self.max_triples}"
        assert triple_mask.shape == (b, t) and triple_mask.dtype == torch.bool, \
            f"triple_mask must be bool [B, T] = {(b, t)}, got {triple_mask.dtype} {tuple(triple_mask.shape)}"
        if self.relation_bias is not None:
            assert entity_ids is not None, "entity_ids [B, T, 2] is required when relation_bias=True"
            assert entity_ids.shape == (b, t, 2), f"entity_ids must be [B, T, 2] = {(b, t, 2)}, got " \
                                                  f"{tuple(entity_ids.shape)}"
        x = self.embed_triples(heads_ids, rels_ids, tails_ids, token_embedding)  # [B, T, width]
        x = torch.cat((self.summary_token.to(x.dtype).expand(b, 1, -1), x), 1)  # [B, T+1, width]
        attn_mask = self.attention_mask(triple_mask, entity_ids, x.dtype)
        for layer in self.layers:
            if self.grad_checkpointing and self.training and torch.is_grad_enabled():
                x = checkpoint(layer, x, attn_mask, use_reentrant=False)
            else:
                x = layer(x, attn_mask)
        k = F.normalize(self.out_proj(self.ln_post(x[:, 0])), dim=-1)
        return KnowledgeOutput(k, triple_mask.any(1))


class ElementOutput(NamedTuple):
    triplet: torch.Tensor  # [B, out_dim] unit norm: the summary token's output, a representation of (h, r, t)
    slots: torch.Tensor  # [B, 3, out_dim] unit norm: each element's first position (the [MASK] where masked)
    hidden: torch.Tensor  # [B, 3, width]: the same positions before the projection (for classifier heads)


@register_extra("element_encoder")
class ElementEncoder(nn.Module):
    """Knowledge-CLIP's multi-modal triplet encoder over the token features of (head, relation, tail).

        enc = ElementEncoder(image_width=768, text_width=512, width=256, out_dim=512, num_relations=18)
        slots = enc.embed_text(text_tokens)                       # [N, L, width]; embed_image likewise
        out = enc(slots, slot_mask, masked)                       # ElementOutput

    The tower tokens of each element are projected to ``width`` (per modality, with a modality embedding),
    get a role embedding (head / relation / tail), and one sequence [summary, h…, r…, t…] runs through
    the same pre-LN layers as the scene-graph :class:`TripleEncoder`, with key-padding masks.  A masked
    element is replaced by a single learned [MASK] token: its output predicts the element (E2E / E2R).
    ``num_relations`` > 0 adds the relation classifier ``classify_relation`` (E2R's classify mode).
    """

    def __init__(self, image_width: int, text_width: int, width: int, out_dim: int, layers: int = 2, heads: int = 4,
                 num_relations: int = 0, mlp_ratio: float = 4.0, dropout: float = 0.0) -> None:
        super().__init__()
        self._config = {"image_width": image_width, "text_width": text_width, "width": width, "out_dim": out_dim,
                        "layers": layers, "heads": heads, "num_relations": num_relations, "mlp_ratio": mlp_ratio,
                        "dropout": dropout}
        self.width = width
        self.image_proj = nn.Linear(image_width, width)
        self.text_proj = nn.Linear(text_width, width)
        self.modality = nn.Embedding(2, width)  # 0 = image, 1 = text
        self.role = nn.Embedding(3, width)  # 0 = head, 1 = relation, 2 = tail
        self.mask_token = nn.Parameter(torch.randn(width) * width ** -0.5)
        self.summary_token = nn.Parameter(torch.randn(width) * width ** -0.5)
        self.ln_in = nn.LayerNorm(width)
        self.layers = nn.ModuleList(TripleLayer(width, heads, mlp_ratio, dropout) for _ in range(layers))
        self.ln_post = nn.LayerNorm(width)
        self.out_proj = nn.Linear(width, out_dim)
        self.relation_head = nn.Linear(width, num_relations) if num_relations > 0 else None
        self.grad_checkpointing = False

    def extra_config(self) -> dict[str, Any]:
        return dict(self._config)

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        self.grad_checkpointing = enable

    def embed_image(self, tokens: torch.Tensor) -> torch.Tensor:
        """Image tower tokens ``[N, S, image_width]`` -> ``[N, S, width]``."""
        x = self.image_proj(tokens)
        return x + self.modality(x.new_zeros((), dtype=torch.long))

    def embed_text(self, tokens: torch.Tensor) -> torch.Tensor:
        """Text tower tokens ``[N, L, text_width]`` -> ``[N, L, width]``."""
        x = self.text_proj(tokens)
        return x + self.modality(x.new_ones((), dtype=torch.long))

    def classify_relation(self, hidden: torch.Tensor) -> torch.Tensor:
        """``hidden: [B, width]`` (the relation slot's) -> logits ``[B, num_relations]``."""
        assert self.relation_head is not None, "built with num_relations=0: no relation classifier"
        return self.relation_head(hidden)

    def forward(self, slots: torch.Tensor, slot_mask: torch.Tensor, masked: torch.Tensor) -> ElementOutput:
        """``slots: [B, 3, S, width]`` embedded element tokens (head, relation, tail; padded to S),
        ``slot_mask: [B, 3, S]`` bool (True = real token; each element needs its first one),
        ``masked: [B, 3]`` bool (True = the element is hidden behind [MASK])."""
        b, n_roles, s, w = slots.shape
        assert n_roles == 3 and w == self.width, f"slots must be [B, 3, S, {self.width}], got {tuple(slots.shape)}"
        assert slot_mask.shape == (b, 3, s) and masked.shape == (b, 3), \
            f"slot_mask [B, 3, S] / masked [B, 3] expected, got {tuple(slot_mask.shape)} / {tuple(masked.shape)}"
        first = torch.zeros(s, dtype=torch.bool, device=slots.device)
        first[0] = True
        hide = masked[:, :, None, None]
        x = torch.where(hide & first[None, None, :, None], self.mask_token.to(slots.dtype), slots)
        x = torch.where(hide & ~first[None, None, :, None], torch.zeros_like(x), x)
        keep = torch.where(masked[:, :, None], first[None, None, :].expand(b, 3, s), slot_mask)
        roles = self.role(torch.arange(3, device=slots.device)).to(x.dtype)  # [3, width]
        x = self.ln_in((x + roles[None, :, None, :]).reshape(b, 3 * s, w))
        x = torch.cat((self.summary_token.to(x.dtype).expand(b, 1, -1), x), 1)  # [B, 1 + 3S, width]
        keep = torch.cat((keep.new_ones(b, 1), keep.reshape(b, 3 * s)), 1)
        attn_mask = torch.zeros(b, 1, 1, 1 + 3 * s, dtype=x.dtype, device=x.device)
        attn_mask = attn_mask.masked_fill(~keep[:, None, None, :], float("-inf"))
        for layer in self.layers:
            if self.grad_checkpointing and self.training and torch.is_grad_enabled():
                x = checkpoint(layer, x, attn_mask, use_reentrant=False)
            else:
                x = layer(x, attn_mask)
        x = self.ln_post(x)
        hidden = x[:, 1:].reshape(b, 3, s, w)[:, :, 0]  # [B, 3, width]
        out = F.normalize(self.out_proj(torch.cat((x[:, :1], hidden), 1)), dim=-1)  # [B, 4, out_dim]
        return ElementOutput(out[:, 0], out[:, 1:], hidden)


def phrase_ids(tokenizer: Any, text: str, phrase_len: int) -> list[int]:
    ids = list(tokenizer.encode(text))[:phrase_len]
    return ids + [PAD_ID] * (phrase_len - len(ids))


def tokenize_triples(graph: dict[str, Any], tokenizer: Any, max_triples: int,
                     phrase_len: int) -> dict[str, torch.Tensor]:
    """An ``sg.json`` scene graph -> the TripleEncoder inputs of one sample, padded to ``max_triples``.

    Relation triples (subject name, predicate, object name) come first, then attribute triples
    (object name, "is", attribute), as in Structure-CLIP; the list is truncated to ``max_triples``.
    ``tokenizer`` is open_clip's ``SimpleTokenizer`` (its ``encode(text)`` gives BPE ids without start/end
    tokens); each phrase is truncated or padded with 0 to ``phrase_len``.

    Returns ``heads_ids, rels_ids, tails_ids: [T, P]`` int64, ``triple_mask: [T]`` bool, ``entity_ids:
    [T, 2]`` int64 (the object index of relation heads/tails and attribute heads, −1 for attribute tails).
    """
    if not callable(getattr(tokenizer, "encode", None)):
        raise TypeError(f"tokenize_triples needs a tokenizer with encode(text) -> BPE ids (open_clip's "
                        f"SimpleTokenizer), got {type(tokenizer).__name__}")
    objects = graph.get("objects", [])
    triples: list[tuple[str, str, str, int, int]] = []
    for rel in graph.get("relations", []):
        s, o = int(rel["subject"]), int(rel["object"])
        triples.append((objects[s]["name"], rel["predicate"], objects[o]["name"], s, o))
    for i, obj in enumerate(objects):
        triples.extend((obj["name"], "is", attr, i, NO_ENTITY) for attr in obj.get("attributes", []))
    triples = triples[:max_triples]

    out = {key: torch.zeros(max_triples, phrase_len, dtype=torch.long) for key in ("heads_ids", "rels_ids", "tails_ids")}
    out["triple_mask"] = torch.zeros(max_triples, dtype=torch.bool)
    out["entity_ids"] = torch.full((max_triples, 2), NO_ENTITY, dtype=torch.long)
    for row, (head, rel, tail, head_entity, tail_entity) in enumerate(triples):
        out["heads_ids"][row] = torch.tensor(phrase_ids(tokenizer, head, phrase_len))
        out["rels_ids"][row] = torch.tensor(phrase_ids(tokenizer, rel, phrase_len))
        out["tails_ids"][row] = torch.tensor(phrase_ids(tokenizer, tail, phrase_len))
        out["triple_mask"][row] = True
        out["entity_ids"][row] = torch.tensor([head_entity, tail_entity])
    return out
