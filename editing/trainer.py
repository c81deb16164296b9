"""Training one block of edits: BaFT and its ReFT switch (the LoRA baseline is lora.py).

What a training run sees for each fact (positives, hard and easy negatives) is built in
``examples.py``.

The loss is the edit loss (cross-entropy on the target tokens), plus a locality
regulariser that pushes every basis weight toward 0 on the negatives and toward 1
on its own fact's subject, plus BaFT's load-balancing loss over the bases.

With ``baft.query_gate`` each basis also has a question gate (baft.py), trained open
at its fact's answer positions and at its prompt with other subjects, and shut on the
subject asked about other relations (``relation_swaps``, templates from
data/probes/training-templates.yaml, never the gate's probes nor a benchmark's
prompts), on other facts of the same subject and after the answer. With
``chat_positives`` each prompt is also trained as a chat user message, and with
``relation_positives`` each fact whose relation the templates recognise is also trained
on up to that many of its own relation's templates (positives like its prompt: the edit
loss, the question gate's open target at the answer, and its calibration).

Hidden states below the first intervened layer are frozen, so they are computed
once and every step runs only the layers above it.

``train_block`` reads top to bottom as its phases: the run's switches (``_setup``), the
training sequences (``_examples``), their frozen hidden states (``_frozen_states``), the
new bases with their keys (``_new_block``), where each gate must open and shut
(``_gate_targets``), the optimisation loop (``_train``), and the gates' calibration
(``_calibrate``). The helpers they use follow.
"""
from __future__ import annotations

import math
import random
import time
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from . import architecture
from .attach import attach_interventions
from .baft import BaFTIntervention, causal_pool
from .config import EditConfig
from .examples import (GENERIC_TEXT, TEXT_STARTERS, Encoded, base_continuations, chat_items, encode,
                       load_training_templates, model_prefixes, negative_items, positive_items,
                       relation_positive_items, relation_swap_items)
from .facts import Fact, normalise


@dataclass
class TrainReport:
    steps: int
    seconds: float
    final_loss: float
    stopped_early: bool


def train_block(model, tokenizer, facts: list[Fact], config: EditConfig,
                existing: dict[int, nn.Module] | None = None, progress: bool = True,
                earlier: list[Fact] = ()):
    """Train one block of BaFT (or ReFT) interventions that makes ``model`` state ``facts``.

    ``existing`` is the adapter set already in production ({layer: module}), attached and
    frozen while this block learns on top of it; ``earlier`` are facts it holds, up to
    ``baft.replay_negatives`` of which the new bases learn to stay closed on.
    Returns ``({layer: module}, TrainReport)``.
    """
    t0 = time.perf_counter()
    seed_all(config.seed)
    rng = random.Random(config.seed)
    run = _setup(model, config, existing)
    examples = _examples(model, tokenizer, facts, run, rng, existing, earlier)
    frozen = _frozen_states(model, tokenizer, examples, run, existing)
    block, owner = _new_block(model, tokenizer, len(facts), examples, frozen, run)
    targets = _gate_targets(facts, examples, frozen, owner, run)
    step, loss_value, stopped = _train(model, block, existing, examples, frozen, targets, run, rng,
                                       progress, f"{config.method} x{len(facts)}")
    if run.gated:
        _calibrate(block, len(facts), examples, frozen, targets, owner, run)
    for iv in block.values():
        iv.requires_grad_(False)
    return block, TrainReport(step, time.perf_counter() - t0, loss_value, stopped)


@dataclass
class _Run:
    """The switches of one training run: the method's and where it reads and writes."""
    config: EditConfig
    layers: list[int]              # the edit layers, ascending
    gated: bool                    # BaFT; ReFT has no gates
    gate_layer: int | None         # where the gates read the subject (None: at each edit layer)
    query: bool                    # a question gate per basis
    device: torch.device

    @property
    def start(self) -> int:
        """The first edit layer: the trunk resumes from the residual entering it."""
        return self.layers[0]

    @property
    def key_layer(self) -> int:
        """The layer whose residual the gates read."""
        return self.start if self.gate_layer is None else self.gate_layer


def _setup(model, config: EditConfig, existing) -> _Run:
    architecture.check(model)
    layers = sorted(config.layers)
    gated = config.method == "baft"
    gate_layer = config.baft.gate_layer if gated else None
    if gate_layer is not None and gate_layer >= layers[0]:
        raise ValueError(f"baft.gate_layer ({gate_layer}) must come before the first edit layer ({layers[0]})")
    for L, module in (existing or {}).items():
        if getattr(module, "gate_layer", None) != gate_layer:
            raise ValueError("the existing adapter set reads its gates at another layer; "
                             "blocks of one set must share baft.gate_layer")
    return _Run(config, layers, gated, gate_layer, gated and config.baft.query_gate,
                next(model.parameters()).device)


@dataclass
class _Examples:
    """A block's training sequences, tokenised. ``pos``: per fact its prompt and prefixed
    variants (the first ``n_facts * (1 + len(prefixes))`` rows), then the chat rows, then
    its own relation in template wordings (``relation_positives``);
    ``neg``: swapped subjects, earlier facts and generic text; ``anchors``: each subject
    behind each prefix; ``swaps``: the subject asked about other relations (question gate)
    and, per swap, the facts whose question gates must stay shut on it."""
    prefixes: list[str]
    pos: Encoded
    neg: Encoded
    anchors: Encoded
    swaps: list[tuple]
    swap_closes: list[list[int]]
    n_relation: int = 0            # the last rows of ``pos``: the facts' own relation in template wordings

    def plain_rows(self, n_facts: int) -> torch.Tensor:
        """Each fact's own prompt, unprefixed."""
        return torch.arange(n_facts) * (1 + len(self.prefixes))

    def question_rows(self, n_facts: int) -> torch.Tensor:
        """The rows the question gates are calibrated on: each fact's own prompt and its
        template wordings (``relation_positives``), unprefixed."""
        n = len(self.pos.ids)
        return torch.cat([self.plain_rows(n_facts), torch.arange(n - self.n_relation, n)])


def _examples(model, tokenizer, facts: list[Fact], run: _Run, rng: random.Random, existing,
              earlier: list[Fact]) -> _Examples:
    cfg, seed = run.config.baft, run.config.seed
    prefixes = model_prefixes(model, tokenizer, cfg.prefixes, cfg.prefix_tokens, seed)
    with attach_interventions(model, existing or {}):
        continuations = base_continuations(model, tokenizer, facts, cfg.continuation_tokens)
    # Chat rows and then template rows come last: the first n_facts * (1 + prefixes) rows stay
    # each fact's prompt and its prefixed variants.
    chat = chat_items(tokenizer, facts) if run.gated and cfg.chat_positives else []
    own = relation_positive_items(facts, cfg.relation_positives, load_training_templates(), continuations) \
        if run.gated and cfg.relation_positives else []
    pos = encode(tokenizer, positive_items(facts, prefixes, continuations) + chat + own)
    replay = list(earlier)
    if len(replay) > cfg.replay_negatives:
        replay = rng.sample(replay, cfg.replay_negatives)
    # A different seed from the prefixes: these are other texts, not the same ones again.
    texts = model_prefixes(model, tokenizer, cfg.text_negatives, cfg.text_negative_tokens, seed + 1, TEXT_STARTERS)
    neg = encode(tokenizer, negative_items(facts, cfg.subject_swaps, rng, replay, texts))
    # Anchors: the subject behind each prefix, so the weights open on the subject
    # wherever it stands (causal: only what precedes it matters).
    # Without prefixes, the prompt itself is the anchor.
    anchors = encode(tokenizer, [(text, None, f.subject, i) for i, f in enumerate(facts)
                                 for text in [p + " " + f.subject for p in prefixes] or [f.prompt]])
    swaps, closes = relation_swap_items(facts, cfg.relation_swaps, rng, load_training_templates()) \
        if run.query else ([], [])
    return _Examples(prefixes, pos, neg, anchors, swaps, closes, len(own))


@dataclass
class _Frozen:
    """Hidden states under the frozen model and set, computed once: the residual at the
    first edit layer (``*_h``, the trunk resumes from it) and at the key layer (``*_g``,
    the gates read it); ``pos_next`` the model's own next-token argmax on the positives."""
    pos_h: torch.Tensor
    pos_g: torch.Tensor
    pos_next: torch.Tensor
    neg_h: torch.Tensor
    neg_g: torch.Tensor
    anchor_g: torch.Tensor
    rel: Encoded | None = None     # the relation swaps, tokenised, and their residual
    rel_h: torch.Tensor | None = None


def _frozen_states(model, tokenizer, ex: _Examples, run: _Run, existing) -> _Frozen:
    with attach_interventions(model, existing or {}):
        (pos_h, pos_g), pos_next = residual_at(model, ex.pos.ids, (run.start, run.key_layer), with_argmax=True)
        neg_h, neg_g = residual_at(model, ex.neg.ids, (run.start, run.key_layer))
        anchor_g = residual_at(model, ex.anchors.ids, (run.key_layer,))[0]
        out = _Frozen(pos_h, pos_g, pos_next, neg_h, neg_g, anchor_g)
        if ex.swaps:
            out.rel = encode(tokenizer, ex.swaps)
            out.rel_h = residual_at(model, out.rel.ids, (run.start,))[0]
    return out


def _new_block(model, tokenizer, n_facts: int, ex: _Examples, fz: _Frozen, run: _Run):
    """The new bases at every edit layer, ``bases_per_edit`` per fact, each gate keyed on
    its fact's subject; returns ``({layer: module}, owner)``, owner the fact of each basis."""
    cfg = run.config.baft
    per = cfg.bases_per_edit
    rank = n_facts * per
    owner = torch.arange(n_facts).repeat_interleave(per)          # fact of each basis
    block = {L: BaFTIntervention(architecture.hidden_size(model), rank, run.gated, cfg.sharpness,
                                 cfg.threshold, run.gate_layer, run.query).to(run.device) for L in run.layers}
    # Keys: the subject's last token behind the prefixes (the anchors).
    n_anchor = len(ex.prefixes) or 1
    rows = torch.tensor([i * n_anchor + (j % n_anchor) for i in range(n_facts) for j in range(per)])
    keys = fz.anchor_g[rows, ex.anchors.subject_pos[rows].clamp_min(1)]
    center = text_center(model, tokenizer, run.key_layer)
    for iv in block.values():
        iv.center.copy_(center)
        iv.init_keys(keys)
        with torch.no_grad():
            iv.W.copy_(iv.R)  # Phi(h) = h at initialisation
    if run.query:
        # Question keys: each fact's prompt at its last token, at the (first) edit layer.
        plain = ex.plain_rows(n_facts)
        first_answer = ex.pos.target_mask.long().argmax(1)
        qcenter = text_center(model, tokenizer, run.start)
        for iv in block.values():
            iv.qcenter.copy_(qcenter)
            iv.init_query(fz.pos_h[plain, first_answer[plain]][owner], cfg.query_threshold)
    return block, owner


@dataclass
class _GateTargets:
    """Where each basis's gate must open and stay shut: (rows, rank) masks with the states
    they are read on, and the positions whose weights count (real tokens)."""
    pos_subj_g: torch.Tensor       # each positive's key-layer state at its subject
    own_open: torch.Tensor         # ... the bases that must open there
    anchor_s: torch.Tensor         # each anchor's state at its subject
    anchor_own: torch.Tensor       # ... the bases that must open there
    neg_shut: torch.Tensor         # the bases that must stay shut on each negative
    cross: torch.Tensor            # ... and on each positive of another subject
    neg_valid: torch.Tensor
    pos_valid: torch.Tensor
    question: tuple | None = None  # ((states, open mask), (states, shut mask)) of the question gate


def _gate_targets(facts: list[Fact], ex: _Examples, fz: _Frozen, owner: torch.Tensor, run: _Run) -> _GateTargets:
    pos, device = ex.pos, run.device
    subj = pos.subject_pos.clone()
    no_subject = subj < 0
    subj[no_subject] = (pos.lengths - 1 - pos.target_mask.sum(1))[no_subject]  # last prompt token
    # Position 0 is an attention sink that looks alike whatever its token: a subject
    # that opens the prompt is keyed from the anchors instead (the subject behind a
    # prefix), and its own prompt does not pull the weights open at position 0.
    opens_prompt = subj < 1
    subj = subj.clamp_min(1)
    own = (owner.unsqueeze(0) == pos.fact.unsqueeze(1)).to(device)   # (n_pos, rank)
    anchors = ex.anchors
    targets = _GateTargets(
        pos_subj_g=fz.pos_g[torch.arange(len(subj)), subj],
        own_open=own & ~opens_prompt.to(device).unsqueeze(1),
        anchor_s=fz.anchor_g[torch.arange(len(anchors.ids)), anchors.subject_pos.clamp_min(1)],
        anchor_own=(owner.unsqueeze(0) == anchors.fact.unsqueeze(1)).to(device),
        neg_shut=_negative_mask(ex.neg, owner, device) > 0,
        cross=~own & _different_subject(pos.fact, owner, facts).to(device),
        # Positions whose weights count: real tokens after the first (see causal_pool).
        neg_valid=(torch.arange(fz.neg_g.shape[1])[None, :] < ex.neg.lengths[:, None])
        & (torch.arange(fz.neg_g.shape[1]) > 0),
        pos_valid=torch.arange(fz.pos_g.shape[1])[None, :] < pos.lengths[:, None])
    if run.query:
        swaps = ex.swaps and (fz.rel, fz.rel_h, ex.swap_closes)
        q_open, q_shut = _question_examples(pos, fz.pos_h, ex.neg, fz.neg_h, swaps, facts, owner)
        targets.question = tuple(tuple(t.to(device) for t in x) for x in (q_open, q_shut))
    return targets


class _Forward:
    """The positives' target logits with the block (and the frozen set) attached: the
    gates' pooled weights handed to the content hooks, then the decoder resumed above
    the frozen layers."""

    def __init__(self, model, handle, beside: dict, ex: _Examples, fz: _Frozen, targets: _GateTargets, run: _Run):
        self.model, self.handle, self.beside, self.pos, self.fz = model, handle, beside, ex.pos, fz
        self.valid, self.device = targets.pos_valid, run.device
        self.trunk = Trunk(model, run.start)

    def __call__(self, rows: torch.Tensor):
        """(logits, labels, (logits, labels) after the answer) at the target positions of ``rows``."""
        # Two groups of similar lengths: chat and prefixed rows are longer, and
        # padding every row of a step to the longest would cost its tokens again.
        parts = [self._group(g) for g in _length_groups(rows, self.pos.lengths[rows])]
        logits, labels = (torch.cat([p[i] for p in parts]) for i in (0, 1))
        return logits, labels, tuple(torch.cat([p[2][i] for p in parts]) for i in (0, 1))

    def _group(self, rows: torch.Tensor):
        pos, fz, device = self.pos, self.fz, self.device
        width = int(pos.lengths[rows].max())
        ids = pos.ids[rows, :width].to(device)
        # The gate layer is below the trunk: hand the content hooks their pooled weights.
        for L, state in self.handle.states.items():
            state.weights = causal_pool(self.beside[L].weights(fz.pos_g[rows, :width]), self.valid[rows, :width])
        states = self.trunk.states(ids, fz.pos_h[rows, :width])
        tmask = pos.target_mask[rows, :width].to(device)
        kmask = pos.keep_mask[rows, :width].to(device)
        keep = (architecture.logits(self.model, states[kmask]).float(), fz.pos_next[rows, :width].to(device)[kmask])
        return architecture.logits(self.model, states[tmask]).float(), next_tokens(ids, tmask), keep


def _train(model, block: dict, existing, ex: _Examples, fz: _Frozen, targets: _GateTargets, run: _Run,
           rng: random.Random, progress: bool, desc: str) -> tuple[int, float, bool]:
    """Adam on the new bases, the set's earlier blocks frozen beside them; early stopping
    once every target is learned. Returns (steps taken, final loss, stopped early)."""
    config = run.config
    trainable = [p for iv in block.values() for n, p in iv.named_parameters() if run.gated or n in ("R", "W", "b")]
    opt = torch.optim.Adam(trainable, lr=config.lr)
    steps, batch, check = config.steps, config.batch_size, config.early_stop
    order = list(range(len(ex.pos.ids)))
    rng.shuffle(order)
    cursor, loss_value, stopped, step = 0, math.nan, False, 0
    bar = progress_bar(steps, progress, desc)
    # The set trains as it will run: old and new bases side by side, each reading the same h.
    beside = {L: _SideBySide(existing[L], block[L]) if L in block else existing[L] for L in existing or {}}
    beside.update({L: m for L, m in block.items() if L not in beside})
    with attach_interventions(model, beside) as handle:
        forward = _Forward(model, handle, beside, ex, fz, targets, run)
        for step in range(1, steps + 1):
            if cursor + batch > len(order):
                rng.shuffle(order)
                cursor = 0
            rows = torch.tensor(order[cursor:cursor + batch])
            cursor += batch
            loss, edit_loss = _loss(block, forward(rows), fz, targets, run)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            for iv in block.values():
                iv.orthonormalise()
            loss_value = float(loss.detach())
            bar.set_postfix(loss=f"{loss_value:.3f}", edit=f"{float(edit_loss.detach()):.3f}")
            bar.update(1)
            if step % check.check_every == 0 and _every_target_learned(
                    forward, len(ex.pos.ids), batch, check.min_target_prob):
                stopped = True
                break
    bar.close()
    return step, loss_value, stopped


def _loss(block: dict, outputs, fz: _Frozen, t: _GateTargets, run: _Run) -> tuple[torch.Tensor, torch.Tensor]:
    """(the step's loss, its edit term): the edit, the continuation after it, and for BaFT
    the gates' locality terms, load balancing and the question gate."""
    w = run.config.loss_weights
    logits, labels, (keep_logits, keep_labels) = outputs
    edit_loss = F.cross_entropy(logits, labels)
    loss = w.edit * edit_loss
    if len(keep_labels):   # after the answer, the model goes on as before
        loss = loss + w.continuation * F.cross_entropy(keep_logits, keep_labels)
    for iv in block.values() if run.gated else ():
        s_pos = iv.weights(t.pos_subj_g)                                  # (n_pos, rank)
        # Open on the fact's own subject, in its prompts and as an anchor.
        gate_pos = _bce(s_pos, t.own_open, positive=True) + _bce(iv.weights(t.anchor_s), t.anchor_own, positive=True)
        # Closed on swapped subjects, generic text and the other facts'
        # sequences (cross), at their worst position.
        gate_neg = _bce(_worst(iv.weights(fz.neg_g), t.neg_valid), t.neg_shut, positive=False) \
            + _bce(_worst(iv.weights(fz.pos_g), t.pos_valid & (torch.arange(fz.pos_g.shape[1]) > 0)), t.cross,
                   positive=False)
        # Load balancing: every basis carries its share of the edits.
        usage = s_pos.mean(0)
        balance = iv.rank * ((usage / usage.sum().clamp_min(1e-6)) ** 2).sum() - 1
        loss = loss + w.gate_positive * gate_pos + w.gate_negative * gate_neg + w.balance * balance
        if t.question is not None:
            # The question gate: open where its fact is asked (any subject: the relation
            # is what it reads), shut on the subject's other questions and after the answer.
            (h_open, m_open), (h_shut, m_shut) = t.question
            loss = loss + w.query_positive * _bce(torch.sigmoid(iv.query_logits(h_open)), m_open, True) \
                + w.query_negative * _bce(torch.sigmoid(iv.query_logits(h_shut)), m_shut, False)
    return loss, edit_loss


def _calibrate(block: dict, n_facts: int, ex: _Examples, fz: _Frozen, targets: _GateTargets,
               owner: torch.Tensor, run: _Run) -> None:
    """Move each new gate's bias down (``gate_shift``), and each question gate's the same
    way, read at the first answer position of its fact's prompt and template wordings."""
    cfg, pos = run.config.baft, ex.pos
    plain = ex.plain_rows(n_facts)
    rows = ex.question_rows(n_facts)
    first_answer = pos.target_mask.long().argmax(1)
    for iv in block.values():
        iv.lower_gates(gate_shift(iv, fz.pos_g[plain], pos.target_mask[plain], targets.pos_valid[plain],
                                   owner, cfg.gate_margin, cfg.gate_ceiling))
        if run.query:
            with torch.no_grad():
                z = iv.query_logits(fz.pos_h[rows, first_answer[rows]].to(run.device))
                # The weakest of its own wordings: the ceiling must not shut the templates
                # trained open (without them, its prompt's logit alone).
                mine = (pos.fact[rows][:, None] == owner[None]).to(z.device)
                own = z.masked_fill(~mine, torch.inf).amin(0)
                shift = torch.full_like(own, float(cfg.query_margin))
                if cfg.query_ceiling is not None:
                    shift = torch.maximum(shift, own - cfg.query_ceiling)
                iv.d -= shift


@torch.no_grad()
def residual_at(model, ids: torch.Tensor, layers: tuple[int, ...], chunk: int = 64,
                with_argmax: bool = False):
    """Hidden states entering each decoder layer in ``layers``, for right-padded
    ``ids``; with ``with_argmax`` also the model's next-token argmax everywhere."""
    device = next(model.parameters()).device
    out = [[] for _ in layers]
    argmax = []
    for i in range(0, len(ids), chunk):
        part = ids[i:i + chunk].to(device)
        result = model(input_ids=part, output_hidden_states=True, use_cache=False)
        for k, L in enumerate(layers):
            out[k].append(result.hidden_states[L].float())
        if with_argmax:
            argmax.append(result.logits.argmax(-1))
    states = [torch.cat(o) for o in out]
    return (states, torch.cat(argmax)) if with_argmax else states


class Trunk:
    """Runs the decoder from a cached residual stream at ``start`` upward (``architecture.final_states``)."""

    def __init__(self, model, start: int):
        self.model, self.start = model, start

    def states(self, ids: torch.Tensor, cached: torch.Tensor) -> torch.Tensor:
        """Final-norm hidden states for every position."""
        return architecture.final_states(self.model, ids, cached, self.start)


def seed_all(seed: int) -> None:
    random.seed(seed)
    torch.manual_seed(seed)


# -- the losses and the gates' calibration -------------------------------------------------
def _question_examples(pos: Encoded, pos_h, neg: Encoded, neg_h, swaps, facts: list[Fact], owner):
    """Where each basis's question gate opens and where it stays shut, as
    ((states, mask), (states, mask)): states (n, hidden) at the edit layer, mask (n, rank).

    Open: the answer positions of its fact's positives, and the last token of its prompt
    with other subjects (the same question about anyone). Shut, at every position after
    the subject: its fact's rows outside the answer, the rows of other facts of the same
    subject, and the subject asked about other relations (``swaps``)."""
    subject = [normalise(f.subject) for f in facts]
    same = torch.tensor([[a == b for b in subject] for a in subject])            # (n_facts, n_facts)
    width = pos_h.shape[1]
    after = (torch.arange(width)[None] > pos.subject_pos[:, None]) & (torch.arange(width) > 0) & \
        (torch.arange(width)[None] < pos.lengths[:, None])
    r, t = pos.target_mask.nonzero(as_tuple=True)
    swapped = (neg.fact >= 0).nonzero().squeeze(1)
    h_open = torch.cat([pos_h[r, t], neg_h[swapped, neg.lengths[swapped] - 1]])
    fact_open = torch.cat([pos.fact[r], neg.fact[swapped]])
    m_open = owner[None] == fact_open[:, None]
    r, t = after.nonzero(as_tuple=True)
    fi = pos.fact[r]
    m_shut = same[fi][:, owner] & ((owner[None] != fi[:, None]) | ~pos.target_mask[r, t, None])
    h_shut = [pos_h[r, t]]
    m_shut = [m_shut]
    if swaps:
        rel, rel_h, closes = swaps
        after = (torch.arange(rel_h.shape[1])[None] > rel.subject_pos[:, None]) & \
            (torch.arange(rel_h.shape[1])[None] < rel.lengths[:, None])
        r, t = after.nonzero(as_tuple=True)
        shut = torch.zeros(len(closes), len(facts), dtype=torch.bool)
        for k, js in enumerate(closes):
            shut[k, js] = True
        h_shut.append(rel_h[r, t])
        m_shut.append(shut[r][:, owner])
    return (h_open, m_open), (torch.cat(h_shut), torch.cat(m_shut))


@torch.no_grad()
def gate_shift(iv: BaFTIntervention, prompt_g: torch.Tensor, target_mask: torch.Tensor,
               valid: torch.Tensor, owner: torch.Tensor, margin: float, ceiling: float | None) -> torch.Tensor:
    """How far each new basis's bias moves down after training.

    Training leaves the gates' boundary just past the negatives it saw and far past
    the positives; moving it toward the positives keeps unseen unrelated text shut.
    Every basis moves by ``margin`` logits, and one that its own fact's prompt still
    holds open by more than ``ceiling`` logits moves on until it holds it by ``ceiling``:
    the more confident a gate, the further it can move without losing its fact.
    """
    shift = torch.full((iv.rank,), float(margin), device=iv.c.device)
    if ceiling is None:
        return shift
    # The prompt's own positions (up to the token before the answer), pooled as at inference.
    before_answer = (target_mask.long().cumsum(1) - target_mask.long()) == 0
    seen = (valid & before_answer & (torch.arange(valid.shape[1]) > 0)).to(prompt_g.device)
    z = iv.gate_logits(prompt_g).masked_fill(~seen.unsqueeze(-1), -torch.inf).amax(1)   # (n_facts, rank)
    own = z[owner.to(z.device), torch.arange(iv.rank, device=z.device)]
    return torch.maximum(shift, own - ceiling)


class _SideBySide(nn.Module):
    """A frozen set's bases and a new block's at one layer, as ``BaFTIntervention.stack``
    would combine them (a sum of basis terms on the same h), with gradients for the block."""

    def __init__(self, old: nn.Module, new: BaFTIntervention):
        super().__init__()
        self.old, self.new, self.gate_layer = old, new, new.gate_layer

    def weights(self, h: torch.Tensor) -> torch.Tensor:
        return torch.cat([self.old.weights(h), self.new.weights(h)], dim=-1)

    def forward(self, h: torch.Tensor, weights: torch.Tensor | None = None) -> torch.Tensor:
        s = self.weights(h) if weights is None else weights
        r = self.old.rank
        return self.old(h, s[..., :r]) + self.new(h, s[..., r:]) - h


@torch.no_grad()
def text_center(model, tokenizer, layer: int, skip: int = 2) -> torch.Tensor:
    """Mean residual of generic text at ``layer``, leaving out the first positions
    (attention sinks). Fixed text, so every block of a set gets the same centre."""
    enc = encode(tokenizer, [(t, None, None, -1) for t in GENERIC_TEXT])
    h = residual_at(model, enc.ids, (layer,))[0]
    valid = torch.arange(h.shape[1])[None, :] < enc.lengths[:, None]
    valid[:, :skip] = False
    return h[valid].mean(0)


@torch.no_grad()
def _every_target_learned(forward_targets, n_rows: int, batch: int, min_prob: float) -> bool:
    """Early stopping: every target token of every positive (prompt and prefixed
    variants) is the argmax and at least ``min_prob`` likely."""
    for i in range(0, n_rows, batch):
        logits, labels, _ = forward_targets(torch.arange(i, min(i + batch, n_rows)))
        probs = logits.softmax(-1)
        if (probs.gather(1, labels[:, None]) < min_prob).any() or (probs.argmax(-1) != labels).any():
            return False
    return True


def _length_groups(rows: torch.Tensor, lengths: torch.Tensor) -> list[torch.Tensor]:
    """``rows`` in one or two groups by length, split where the padded tokens are fewest."""
    order = lengths.argsort(stable=True)
    rows, lengths = rows[order], lengths[order]
    n = len(rows)
    cost = [k * int(lengths[k - 1]) + (n - k) * int(lengths[-1]) for k in range(1, n)]
    if not cost or min(cost) > 0.8 * n * int(lengths[-1]):
        return [rows]
    k = 1 + cost.index(min(cost))
    return [rows[:k], rows[k:]]


def _worst(s: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """(n, T, rank) weights -> (n, rank) the largest over each sequence's real positions."""
    return (s * valid[..., None].to(s.dtype)).amax(1)


def _bce(s: torch.Tensor, select: torch.Tensor, positive: bool) -> torch.Tensor:
    """Mean -log s (positive) or -log(1 - s) over the selected weights."""
    p = s if positive else 1 - s
    select = select.to(s.dtype)
    return -(torch.log(p.clamp_min(1e-6)) * select).sum() / select.sum().clamp_min(1)


def next_tokens(ids: torch.Tensor, tmask: torch.Tensor) -> torch.Tensor:
    shifted = torch.roll(ids, -1, dims=1)
    return shifted[tmask]


def _different_subject(fact_of_row: torch.Tensor, owner: torch.Tensor, facts: list[Fact]) -> torch.Tensor:
    """(rows, rank): True where the row's fact and the basis's fact name different subjects."""
    ids: dict[str, int] = {}
    subject = torch.tensor([ids.setdefault(normalise(f.subject), len(ids)) for f in facts])
    row_subject = torch.where(fact_of_row >= 0, subject[fact_of_row.clamp_min(0)], -1)
    return row_subject.unsqueeze(1) != subject[owner].unsqueeze(0)


def _negative_mask(neg: Encoded, owner: torch.Tensor, device) -> torch.Tensor:
    """(n_neg, rank): which bases must stay closed on which negative."""
    m = torch.zeros(len(neg.fact), len(owner), dtype=torch.bool)
    for r, fi in enumerate(neg.fact.tolist()):
        # Generic text closes every basis; a subject-swapped prompt closes its
        # own fact's bases (the swapped-in subject may be another fact's).
        m[r] = True if fi < 0 else owner == fi
    return m.float().to(device)


def progress_bar(total: int, enabled: bool, desc: str):
    from tqdm.auto import tqdm
    return tqdm(total=total, disable=not enabled, desc=desc, leave=False)


__all__ = ["train_block", "residual_at", "TrainReport"]
