"""Knowledge-CLIP (METHODS.md §1): image–caption pairs and knowledge-graph triplets in the same batch.

    v, c = f_img(pair images), f_txt(captions);   e_h, e_r, e_t = the towers' embeddings of each triplet element
    X = ElementEncoder(token features of h, r, t)  (one element hidden behind [MASK])
    L = w_clip · InfoNCE(v, c)
        (+ the cross-modal triplets (image, r, text) as pairs, with cross_modal_pairs)
      + ramp · [ w_e2e · InfoNCE(X[masked h or t] → e_h or e_t)                           (global batch)
               + w_e2r · CE(relation | X[masked r])  (classifier and/or relation-text contrast)
               + w_g2e · InfoNCE(TripleEncoder(neighbourhood of e, centre blanked) → e)   (global batch)
               + w_kd · KL(teacher ‖ student image–text similarities on the pairs) ]

Every tower call happens inside this forward, in ONE pass per tower over pairs and triplet elements
together (ZeRO-3 gathers each layer once); the token features come from forward hooks on the towers'
transformers.  The teacher is a frozen copy of the initial towers kept outside the module tree — no
gradients, not in the optimizer, not partitioned by ZeRO — in ``kd_teacher_dtype``; or, with
``kd_teacher=features``, its features are read from the shards (tools/precompute_teacher.py).
docs/METHODS.md lists the choices the paper leaves open and why these were made.
"""

from __future__ import annotations

import contextlib
import copy
import logging
from collections.abc import Iterator

import torch
from torch import nn

from kclip_ds.config import MethodConfig
from kclip_ds.kernels import build_contrastive_loss
from kclip_ds.losses.knowledge import DistillationLoss, EntityContrastiveLoss, GlobalCrossEntropy, rank
from kclip_ds.models.graph import ElementEncoder, TripleEncoder

MAX_LOGIT_SCALE = 100.0
HEAD, RELATION, TAIL = 0, 1, 2
log = logging.getLogger(__name__)


@contextlib.contextmanager
def tower_tokens(model: nn.Module) -> Iterator[dict[str, torch.Tensor]]:
    """Within the block, ``found["image"]`` / ``found["text"]`` hold the last output of the image / text
    transformer trunk ([N, S, width], batch first) of an open_clip ``CLIP``."""
    visual, text = getattr(getattr(model, "visual", None), "transformer", None), getattr(model, "transformer", None)
    if visual is None or text is None:
        raise ValueError(f"Knowledge-CLIP needs token features from open_clip's CLIP with a ViT image tower and "
                         f"its built-in text transformer; {type(model).__name__} has no visual.transformer/transformer")
    found: dict[str, torch.Tensor] = {}
    hooks = [visual.register_forward_hook(lambda _m, _i, out: found.__setitem__("image", out)),
             text.register_forward_hook(lambda _m, _i, out: found.__setitem__("text", out))]
    try:
        yield found
    finally:
        for hook in hooks:
            hook.remove()


def place(rows: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
    """``values: [n, ...]`` at the True positions of ``rows: [B]`` (n = rows.sum()), zeros elsewhere."""
    out = values.new_zeros((rows.shape[0], *values.shape[1:]))
    return out.index_put((rows.nonzero(as_tuple=True)[0],), values)


def pad_tokens(x: torch.Tensor, length: int) -> torch.Tensor:
    return torch.nn.functional.pad(x, (0, 0, 0, length - x.shape[1]))


class KnowledgeClipMethod(nn.Module):
    def __init__(self, model: nn.Module, cfg: MethodConfig, relation_tokens: torch.Tensor, with_teacher: bool = True):
        """``relation_tokens: [R, L]``: the tokenised relation vocabulary (E2R's classes and contrast texts);
        ``with_teacher=False``: no online teacher copy (evaluation and export never compute the loss)."""
        super().__init__()
        self.model = model
        embed_dim = model.text_projection.shape[1]
        self.weights = {"clip": cfg.clip_weight, "e2e": cfg.e2e_weight, "e2r": cfg.e2r_weight,
                        "g2e": cfg.g2e_weight, "kd": cfg.kd_weight}
        self.e2r_mode, self.cross_modal_pairs, self.e2e_filter = cfg.e2r_mode, cfg.cross_modal_pairs, cfg.e2e_filter
        self.e2e_hide, self.knowledge_image_grad = cfg.e2e_hide, cfg.knowledge_image_grad
        classify = cfg.e2r_weight > 0 and cfg.e2r_mode in ("classify", "both")
        self.element_encoder = ElementEncoder(
            image_width=model.visual.transformer.width, text_width=model.transformer.width, width=cfg.graph_width,
            out_dim=embed_dim, layers=cfg.graph_layers, heads=cfg.graph_heads,
            num_relations=len(relation_tokens) if classify else 0)
        self.graph_encoder = TripleEncoder(token_dim=model.token_embedding.embedding_dim, width=cfg.graph_width,
                                           out_dim=embed_dim, layers=cfg.graph_layers, heads=cfg.graph_heads,
                                           max_triples=cfg.neighbour_edges)
        for module in (self.element_encoder, self.graph_encoder):
            module.set_grad_checkpointing(cfg.graph_grad_checkpointing)
        self.register_buffer("relation_tokens", relation_tokens.clone(), persistent=False)
        self.contrastive = build_contrastive_loss(cfg.fused_loss, cfg.loss_tile)
        self.entity_loss, self.relation_loss, self.distill = EntityContrastiveLoss(), GlobalCrossEntropy(), DistillationLoss()
        # A list, not an attribute: the teacher stays out of the module tree (state dict, optimizer, ZeRO).
        self._teacher: list[nn.Module] = []
        if with_teacher and cfg.kd_weight > 0 and cfg.kd_teacher == "online":
            dtype = torch.bfloat16 if cfg.kd_teacher_dtype == "bf16" else torch.float32
            teacher = copy.deepcopy(model).eval().requires_grad_(False).to(dtype)
            teacher.set_grad_checkpointing(False)
            self._teacher.append(teacher)
        log.info("Knowledge-CLIP: weights %s, %d relations, E2R %s, KD teacher %s",
                 self.weights, len(relation_tokens), cfg.e2r_mode,
                 "off" if cfg.kd_weight == 0 else f"{cfg.kd_teacher} ({cfg.kd_teacher_dtype})")

    # ------------------------------------------------------------------------------------------- teacher

    @torch.no_grad()
    def teacher_features(self, images: torch.Tensor, texts: torch.Tensor, rows: torch.Tensor
                         ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The online teacher's (image [B, D], text [B, D], exp(τ)) on ``rows`` (zeros elsewhere)."""
        teacher = self._teacher[0]
        if next(teacher.parameters()).device != images.device:
            teacher.to(images.device)
        dtype = next(teacher.parameters()).dtype
        if not rows.any():  # nothing to distil on this rank (the teacher is local: skipping it is safe)
            zeros = images.new_zeros(len(rows), teacher.text_projection.shape[1], dtype=torch.float32)
            return zeros, zeros, images.new_ones(1, dtype=torch.float32)
        out = teacher(image=images[rows].to(dtype), text=texts[rows])
        return (place(rows, out["image_features"].float()), place(rows, out["text_features"].float()),
                out["logit_scale"].float())

    # ------------------------------------------------------------------------------------------- forward

    def forward(self, images: torch.Tensor | None = None, texts: torch.Tensor | None = None,
                valid: torch.Tensor | None = None, knowledge: dict[str, torch.Tensor] | None = None,
                teacher: dict[str, torch.Tensor] | None = None, ramp: float = 1.0, mode: str = "loss",
                **_: object) -> dict:
        """images [B,3,H,W]; texts [B,L]; valid [B] bool; knowledge: the triplet rows of the batch
        (kclip_ds.knowledge.triplet_batch; None = pairs only); teacher: {"image", "text" [B, D], "scale"}
        precomputed teacher features (None: the online teacher, if KD is on); ramp: the factor on the
        knowledge objectives.  mode="encode": the towers' {"image_features", "text_features"}."""
        if mode == "encode":
            out = self.model(image=images, text=texts)
            return {"image_features": out["image_features"], "text_features": out["text_features"]}
        if mode != "loss":
            raise ValueError(f"unknown mode {mode!r} (expected 'loss' or 'encode')")
        valid = valid if valid is not None else torch.ones(len(images), dtype=torch.bool, device=images.device)
        kg = knowledge
        trip = valid & kg["triplet"] if kg is not None else torch.zeros_like(valid)
        pair = valid & ~trip
        self._outputs: list[torch.Tensor] = []  # every module output of this step (see the end of forward)
        feats, tokens = self.encode_all(images, texts, pair, trip, kg)
        scale = feats["logit_scale"].clamp(max=MAX_LOGIT_SCALE)
        v, c = feats["pair_image"], feats["pair_text"]
        v_c, c_c, rows = v, c, pair
        if kg is not None and self.cross_modal_pairs:  # an (image, r, text) fact is an image–text pair as well
            cross = trip & (kg["head_is_image"] ^ kg["tail_is_image"])
            image_first = kg["head_is_image"][:, None]
            v_c = torch.where(cross[:, None], torch.where(image_first, feats["head"], feats["tail"]), v)
            c_c = torch.where(cross[:, None], torch.where(image_first, feats["tail"], feats["head"]), c)
            rows = pair | cross
        losses = {"clip": self.contrastive(v_c, c_c, scale, rows)}
        if kg is not None:
            losses.update(self.knowledge_losses(kg, trip, feats, tokens, scale))
        if self.weights["kd"] > 0:
            if teacher is None:
                tv, tc, t_scale = self.teacher_features(images, texts, pair)
            else:
                tv, tc, t_scale = teacher["image"], teacher["text"], teacher["scale"]
            losses["kd"] = self.distill(v, c, scale, tv, tc, t_scale, pair & teacher_rows(teacher, pair))
        loss = sum(self.weights[name] * (1.0 if name == "clip" else ramp) * value
                   for name, value in losses.items() if self.weights[name] > 0)
        # Every module output enters the graph, with weight 0: a rank whose batch gives some module no loss
        # rows still runs that module's backward, so ZeRO-3's gathers for recomputed (checkpointed) layers
        # and its gradient reductions happen on every rank alike instead of hanging the others.
        loss = loss + 0.0 * sum(x.float().sum() for x in self._outputs)
        self._outputs = []
        logs = {f"loss_{name}": value.detach() for name, value in losses.items()}
        logs["logit_scale"] = scale.detach().float().mean()
        return {"loss": loss, "logs": logs}

    def encode_all(self, images: torch.Tensor, texts: torch.Tensor, pair: torch.Tensor, trip: torch.Tensor,
                   kg: dict[str, torch.Tensor] | None) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
        """One image-tower and one text-tower pass over every element of the batch.

        Returns (features, tokens): features["pair_image"/"pair_text"] [B, D], ["head"/"tail"] [B, D] (image or
        text embedding per row), ["relation_vocab"] [R, D], ["logit_scale"]; tokens["head"/"relation"/"tail"]
        [B, S, width] embedded element tokens with ["<role>_mask"] [B, S]."""
        image_parts, text_parts = [(pair, images)], [(pair, texts)]
        if kg is not None:
            for side in ("head", "tail"):
                is_image = kg[f"{side}_is_image"]
                image_parts.append((trip & is_image, kg[f"{side}_image"]))
                text_parts.append((trip & ~is_image, kg[f"{side}_text"]))
            text_parts.append((trip, kg["rel_text"]))
        image_in = torch.cat([x[rows] for rows, x in image_parts])
        text_in = torch.cat([x[rows] for rows, x in text_parts] + [self.relation_tokens])
        if len(image_in) == 0:  # every rank must call each tower once (ZeRO-3 gathers inside), so never skip one
            image_in = images[:1]
        with tower_tokens(self.model) as found:
            out = self.model(image=image_in, text=text_in)
        self._outputs += [out["image_features"], out["text_features"], *found.values()]
        split = lambda x, parts: x[: sum(int(rows.sum()) for rows, _ in parts)].split(
            [int(rows.sum()) for rows, _ in parts])
        v_parts, c_parts = split(out["image_features"], image_parts), split(out["text_features"], text_parts)
        feats = {"pair_image": place(pair, v_parts[0]), "pair_text": place(pair, c_parts[0]),
                 "relation_vocab": out["text_features"][-len(self.relation_tokens):],
                 "logit_scale": out["logit_scale"]}
        tokens: dict[str, torch.Tensor] = {}
        if kg is None:
            return feats, tokens
        enc = self.element_encoder
        img_tok, txt_tok = split(found["image"], image_parts), split(found["text"], text_parts)
        if not self.knowledge_image_grad:  # the triplets' images are inputs to the knowledge objectives, not targets
            v_parts = (v_parts[0], *(x.detach() for x in v_parts[1:]))
            img_tok = (img_tok[0], *(x.detach() for x in img_tok[1:]))
        txt_keep = split((text_in != 0)[:, : found["text"].shape[1]], text_parts)  # the tower may trim padding
        length = max(found["image"].shape[1], found["text"].shape[1])
        for j, side in enumerate(("head", "tail"), start=1):
            is_image = kg[f"{side}_is_image"]
            feats[side] = place(trip & is_image, v_parts[j]) + place(trip & ~is_image, c_parts[j])
            tokens[side] = (place(trip & is_image, pad_tokens(enc.embed_image(img_tok[j]), length))
                            + place(trip & ~is_image, pad_tokens(enc.embed_text(txt_tok[j]), length)))
            image_keep = torch.ones(img_tok[j].shape[:2], dtype=torch.bool, device=images.device)
            tokens[f"{side}_mask"] = (place(trip & is_image, pad_tokens(image_keep[..., None], length)[..., 0])
                                      | place(trip & ~is_image, pad_tokens(txt_keep[j][..., None], length)[..., 0]))
        tokens["relation"] = place(trip, pad_tokens(enc.embed_text(txt_tok[3]), length))
        tokens["relation_mask"] = place(trip, pad_tokens(txt_keep[3][..., None], length)[..., 0])
        return feats, tokens

    def knowledge_losses(self, kg: dict[str, torch.Tensor], trip: torch.Tensor, feats: dict[str, torch.Tensor],
                         tokens: dict[str, torch.Tensor], scale: torch.Tensor) -> dict[str, torch.Tensor]:
        roles = ("head", "relation", "tail")
        slots = torch.stack([tokens[r] for r in roles], 1)  # [B, 3, S, width]
        slot_mask = torch.stack([tokens[f"{r}_mask"] for r in roles], 1)
        rows = torch.arange(len(trip), device=trip.device)
        losses: dict[str, torch.Tensor] = {}
        if self.weights["e2e"] > 0:
            mask_tail, e2e_rows = e2e_sides(kg, self.e2e_hide)
            hidden = torch.where(mask_tail, TAIL, HEAD)
            masked = nn.functional.one_hot(hidden, 3).bool()
            encoded = self.element_encoder(slots, slot_mask, masked)
            self._outputs += [encoded.slots, encoded.triplet, encoded.hidden]
            query = encoded.slots[rows, hidden]
            target = torch.where(mask_tail[:, None], feats["tail"], feats["head"])
            ids = torch.where(mask_tail, kg["tail_id"], kg["head_id"])
            groups = e2e_query_groups(kg, mask_tail) if self.e2e_filter else None
            losses["e2e"] = self.entity_loss(query, target, ids, trip & e2e_rows, scale, groups)
        if self.weights["e2r"] > 0:
            masked = nn.functional.one_hot(torch.full_like(rows, RELATION), 3).bool()
            out = self.element_encoder(slots, slot_mask, masked)
            self._outputs += [out.slots, out.triplet, out.hidden]
            known = trip & (kg["relation"] >= 0)
            labels = kg["relation"].clamp(min=0)
            terms = []
            if self.e2r_mode in ("classify", "both"):
                terms.append(self.relation_loss(self.element_encoder.classify_relation(out.hidden[:, RELATION]),
                                                labels, known))
            if self.e2r_mode in ("contrast", "both"):
                logits = scale.reshape(()) * out.slots[:, RELATION] @ feats["relation_vocab"].T
                terms.append(self.relation_loss(logits, labels, known))
            losses["e2r"] = sum(terms) / len(terms)
        if self.weights["g2e"] > 0:
            flat = {k: kg[k].flatten(0, 1) for k in ("nb_heads_ids", "nb_rels_ids", "nb_tails_ids", "nb_mask")}
            graph = self.graph_encoder(flat["nb_heads_ids"], flat["nb_rels_ids"], flat["nb_tails_ids"],
                                       flat["nb_mask"], self.model.token_embedding)
            self._outputs.append(graph.k)
            target = torch.stack((feats["head"], feats["tail"]), 1).flatten(0, 1)
            ids = torch.stack((kg["head_id"], kg["tail_id"]), 1).flatten()
            losses["g2e"] = self.entity_loss(graph.k.to(target.dtype), target, ids,
                                             graph.has_knowledge & trip.repeat_interleave(2), scale)
        return losses


def e2e_sides(kg: dict[str, torch.Tensor], hide: str = "any") -> tuple[torch.Tensor, torch.Tensor]:
    """(mask_tail [B] bool, rows [B] bool): which side each E2E row hides, and the rows E2E uses.
    hide="any": the side sampled into the batch (``kg["mask_tail"]``), every row.  hide="text": a row with one
    image and one text entity hides the text, so E2E never asks for an image and the image embeddings are left
    to the CLIP term; rows of two images are left out; text–text rows keep their sampled side."""
    if hide == "any":
        return kg["mask_tail"], torch.ones_like(kg["mask_tail"])
    head_image, tail_image = kg["head_is_image"], kg["tail_is_image"]
    mask_tail = torch.where(head_image ^ tail_image, head_image, kg["mask_tail"])
    return mask_tail, ~(head_image & tail_image)


def e2e_query_groups(kg: dict[str, torch.Tensor], mask_tail: torch.Tensor | None = None) -> torch.Tensor:
    """[B, 3] int64: what each E2E row asks — (relation, the entity left visible, which side is hidden);
    ``mask_tail`` defaults to the batch's sampled sides.  Equal rows share their answers: (?, is an image of,
    boot) is answered by every boot image of the batch.  A relation outside the vocabulary (index −1) gets a
    value of its own per row, so it never groups."""
    mask_tail = kg["mask_tail"] if mask_tail is None else mask_tail
    rows = torch.arange(len(kg["relation"]), device=kg["relation"].device)
    relation = torch.where(kg["relation"] >= 0, kg["relation"], -1 - (rows + rank() * len(rows)))
    known = torch.where(mask_tail, kg["head_id"], kg["tail_id"])
    return torch.stack((relation, known, mask_tail.long()), 1)


def teacher_rows(teacher: dict[str, torch.Tensor] | None, rows: torch.Tensor) -> torch.Tensor:
    """Rows with teacher features: all of them for the online teacher, else where the shards had them."""
    return rows if teacher is None else teacher["present"]
