"""A relation space for the question gate: what a prompt asks, not how it words it.

A question gate keyed on the raw residual learns its prompt's wording: on SmolLM2-135M the last
prompt token's state tells "the same relation, other words" from "the same subject, another
relation" with an AUC of only 0.52-0.74 (bench/separability.py). A linear classifier of the
relation, trained on the training templates (data/probes/training-templates.yaml) filled with
fixed subjects, maps that state to one logit per template relation; compared in that space the
AUC rises (bench/results/separability.md). The question gate then reads

    u'(h) = norm(P^T norm(h - m) + b)

with P, b the classifier's weights and biases. The space depends only on the base model and
the templates, so every block of a set gets the same one and blocks still stack.
"""
from __future__ import annotations

import random

import torch
import torch.nn.functional as F

from .examples import FALLBACK_SUBJECTS, load_training_templates

# The classifier sees each template with this many subjects (from FALLBACK_SUBJECTS).
SUBJECTS_PER_TEMPLATE = 12
# Its inputs are unit vectors; this scale lets a few hundred Adam steps fit them.
SCALE = 10.0


def fit_relation_space(model, tokenizer, layer: int, center: torch.Tensor, steps: int = 300,
                       seed: int = 0, weight_decay: float = 1e-3) -> tuple[torch.Tensor, torch.Tensor]:
    """(P, b): (hidden, n_relations) and (n_relations,), a logistic regression of the template
    relation on the centred, normalised residual entering ``layer`` at the last prompt token."""
    from .trainer import residual_at   # (trainer imports this module)
    from .examples import encode

    templates = load_training_templates()
    rng = random.Random(seed)
    texts, labels = [], []
    for k, (_, _, wordings) in enumerate(templates):
        for wording in wordings:
            for subject in rng.sample(FALLBACK_SUBJECTS, min(SUBJECTS_PER_TEMPLATE, len(FALLBACK_SUBJECTS))):
                texts.append(wording.format(subject=subject))
                labels.append(k)
    enc = encode(tokenizer, [(t, None, None, -1) for t in texts])
    h = residual_at(model, enc.ids, (layer,))[0]
    last = h[torch.arange(len(texts)), enc.lengths - 1].cpu()
    x = F.normalize(last - center.cpu(), dim=-1) * SCALE
    y = torch.tensor(labels)
    with torch.enable_grad(), torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        P = torch.zeros(x.shape[1], len(templates), requires_grad=True)
        b = torch.zeros(len(templates), requires_grad=True)
        opt = torch.optim.Adam([P, b], lr=0.05)
        for _ in range(steps):
            loss = F.cross_entropy(x @ P + b, y) + weight_decay * (P ** 2).sum()
            opt.zero_grad()
            loss.backward()
            opt.step()
    return (P.detach() * SCALE).to(center), b.detach().to(center)
