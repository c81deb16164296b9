"""Evaluate an edited model on facts: every metric, per fact and as means."""
from __future__ import annotations

from statistics import mean

from . import metrics
from .facts import Fact

METRICS = ("reliability", "generality", "locality", "portability", "exact_match", "fluency")


def evaluate_facts(model, tokenizer, facts: list[Fact], attach=None, *, fluency_tokens: int = 0,
                   base_locality=None) -> dict:
    """Score ``facts`` on ``model`` with the adapter set ``attach`` (a callable
    ``attach(model) -> handle``, or None for the unedited model).

    Locality compares against the bare model, so the base's argmax on the
    locality prompts is computed first (or passed in as ``base_locality``).
    Returns ``{"per_fact": [...], "means": {...}}``.
    """
    rel_pairs = [(f.prompt, f.target_new) for f in facts]
    gen_pairs = [(p, f.target_new) for f in facts for p in f.rephrase_prompts]
    loc_pairs = [(x["prompt"], x["answer"]) for f in facts for x in f.locality]
    port_pairs = [(x["prompt"], x["answer"]) for f in facts for x in f.portability]
    if base_locality is None and loc_pairs:
        base_locality = metrics.answer_argmax(model, tokenizer, loc_pairs)
    handle = attach(model) if attach else None
    try:
        rel = metrics.token_accuracy(model, tokenizer, rel_pairs)
        gen = metrics.token_accuracy(model, tokenizer, gen_pairs) if gen_pairs else []
        loc = metrics.locality(base_locality, metrics.answer_argmax(model, tokenizer, loc_pairs)) if loc_pairs else []
        port = metrics.token_accuracy(model, tokenizer, port_pairs) if port_pairs else []
        em = metrics.exact_match(model, tokenizer, rel_pairs)
        flu = metrics.fluency(model, tokenizer, [f.prompt for f in facts], fluency_tokens) if fluency_tokens else []
    finally:
        if handle is not None:
            handle.remove()

    per_fact, gi, li, pi = [], 0, 0, 0
    for i, f in enumerate(facts):
        row = {"fact_id": f.fact_id, "reliability": rel[i], "exact_match": em[i]}
        for name, values, n, cursor in (("generality", gen, len(f.rephrase_prompts), gi),
                                        ("locality", loc, len(f.locality), li),
                                        ("portability", port, len(f.portability), pi)):
            row[name] = mean(values[cursor:cursor + n]) if n else None
        gi, li, pi = gi + len(f.rephrase_prompts), li + len(f.locality), pi + len(f.portability)
        if flu:
            row["fluency"] = flu[i]
        per_fact.append(row)
    means = {}
    for name in METRICS:
        values = [r[name] for r in per_fact if r.get(name) is not None]
        means[name] = mean(values) if values else None
    return {"per_fact": per_fact, "means": means}
