"""Evaluate an edited model on facts: every metric, per fact and as means.

Locality and portability are scored per kind as well (KnowEdit's groups, e.g.
``locality.Relation_Specificity``, ``portability.Subject_Aliasing``; pairs of other formats
have their format's kind, ``editing.facts``), and, as EasyEdit summarises KnowEdit, a fact's
``locality`` / ``portability`` is the mean of its kinds' scores, each kind's score the mean
over its pairs. With one kind per fact, as in CounterFact, zsRE and most own records, that
is the plain mean over the fact's pairs.
"""
from __future__ import annotations

import contextlib
from statistics import mean

from . import metrics
from .facts import DEFAULT_KIND, KNOWEDIT_LOCALITY, KNOWEDIT_PORTABILITY, Fact

METRICS = ("reliability", "generality", "locality", "portability", "exact_match", "fluency")
# The strict (user-facing) metrics, measured when ``strict_tokens`` > 0 (metrics.py defines them).
STRICT_METRICS = ("gen_success", "gen_success_rephrase", "chat_success", "chat_success_rephrase",
                  "gen_locality", "repeats", "repeats_base")


def evaluate_facts(model, tokenizer, facts: list[Fact], attach=None, *, fluency_tokens: int = 0,
                   base_locality=None, strict_tokens: int = 0) -> dict:
    """Score ``facts`` on ``model`` with the adapter set ``attach`` (a callable
    ``attach(model)`` returning a context manager that detaches, as ``AdapterSet.attach``
    and torch's hook handles do; None for the unedited model).

    Locality compares against the bare model, so the base's argmax on the
    locality prompts is computed first (or passed in as ``base_locality``).

    ``strict_tokens`` > 0 adds the strict metrics (``STRICT_METRICS``), judged on greedy
    continuations of that many new tokens; the base's continuations (for generation
    locality and ``repeats_base``) are generated first too. Per fact: ``gen_success`` and
    ``chat_success`` of the prompt, their ``_rephrase`` means over the rephrases,
    ``gen_locality`` over the locality prompts, and ``repeats`` / ``repeats_base``, the
    repetition share of the edited / unedited continuations of the prompt and rephrases.
    Without a chat template the chat metrics are None.

    Locality and portability are also given per kind, ``locality.<kind>`` and
    ``portability.<kind>`` (module docstring), in each fact's row where it has pairs of that
    kind and in the means (``kind_keys`` orders them). Where ``fluency_tokens`` equals
    ``strict_tokens``, fluency is read off the prompts' strict continuations, not generated again. Teacher forcing scores each pair's
    ``answer`` (``teacher_answer``: the first non-empty alias).
    Returns ``{"per_fact": [...], "means": {...}}``.
    """
    rel_pairs = [(f.prompt, f.target_new) for f in facts]
    gen_pairs = [(p, f.target_new) for f in facts for p in f.rephrase_prompts]
    loc_pairs = [(x["prompt"], teacher_answer(x)) for f in facts for x in f.locality]
    port_pairs = [(x["prompt"], teacher_answer(x)) for f in facts for x in f.portability]
    if base_locality is None and loc_pairs:
        base_locality = metrics.answer_argmax(model, tokenizer, loc_pairs)
    # Strict metrics: per fact its prompt, then its rephrases; the locality prompts after.
    asked = [(p, f.target_new) for f in facts for p in (f.prompt, *f.rephrase_prompts)]
    strict_prompts = [p for p, _ in asked] + [p for p, _ in loc_pairs]
    chat = bool(strict_tokens) and metrics.has_chat_template(tokenizer)
    base_texts = metrics.continuations(model, tokenizer, strict_prompts, strict_tokens) if strict_tokens else []
    texts, gen_ok, chat_ok = [], [], None
    with attach(model) if attach else contextlib.nullcontext():
        rel = metrics.token_accuracy(model, tokenizer, rel_pairs)
        gen = metrics.token_accuracy(model, tokenizer, gen_pairs) if gen_pairs else []
        loc = metrics.locality(base_locality, metrics.answer_argmax(model, tokenizer, loc_pairs)) if loc_pairs else []
        port = metrics.token_accuracy(model, tokenizer, port_pairs) if port_pairs else []
        em = metrics.exact_match(model, tokenizer, rel_pairs)
        reuse = bool(strict_tokens) and fluency_tokens == strict_tokens
        flu = metrics.fluency(model, tokenizer, [f.prompt for f in facts], fluency_tokens) \
            if fluency_tokens and not reuse else []
        if strict_tokens:
            texts = metrics.continuations(model, tokenizer, strict_prompts, strict_tokens)
            if reuse:
                flu = [metrics.ngram_entropy(f.prompt + texts[i]) for f, i in zip(facts, _prompt_rows(facts))]
            gen_ok = metrics.generation_success(model, tokenizer, asked, strict_tokens, texts=texts[:len(asked)])
            chat_ok = metrics.chat_success(model, tokenizer, asked, strict_tokens) if chat else None

    per_fact = _fact_rows(facts, rel=rel, em=em, gen=gen, loc=loc, port=port, flu=flu)
    if strict_tokens:
        _add_strict(per_fact, facts, asked=len(asked), texts=texts, base_texts=base_texts,
                    gen_ok=gen_ok, chat_ok=chat_ok)
    means = {}
    for name in METRICS + (STRICT_METRICS if strict_tokens else ()) + kind_keys(per_fact):
        values = [r[name] for r in per_fact if r.get(name) is not None]
        means[name] = mean(values) if values else None
    return {"per_fact": per_fact, "means": means}


def _prompt_rows(facts: list[Fact]) -> list[int]:
    """Where each fact's own prompt sits among the strict prompts (each fact's prompt, then its rephrases)."""
    rows, at = [], 0
    for f in facts:
        rows.append(at)
        at += 1 + len(f.rephrase_prompts)
    return rows


def _fact_rows(facts: list[Fact], *, rel, em, gen, loc, port, flu) -> list[dict]:
    """Each fact's row of teacher-forced scores; ``gen``, ``loc`` and ``port`` hold every
    fact's rephrases, locality and portability pairs in fact order."""
    per_fact, gi, li, pi = [], 0, 0, 0
    for i, f in enumerate(facts):
        row = {"fact_id": f.fact_id, "reliability": rel[i], "exact_match": em[i]}
        n = len(f.rephrase_prompts)
        row["generality"] = mean(gen[gi:gi + n]) if n else None
        _add_kinds(row, "locality", f.locality, loc[li:li + len(f.locality)])
        _add_kinds(row, "portability", f.portability, port[pi:pi + len(f.portability)])
        gi, li, pi = gi + n, li + len(f.locality), pi + len(f.portability)
        if flu:
            row["fluency"] = flu[i]
        per_fact.append(row)
    return per_fact


def teacher_answer(pair: dict) -> str:
    """The answer teacher forcing scores: the first non-empty alias (``metrics.aliases``).
    Loaded facts already hold it in ``answer``; this also takes a list answer given directly."""
    answer = pair["answer"]
    if isinstance(answer, str):
        return answer
    found = metrics.aliases(answer)
    return found[0] if found else ""


def pair_kind(pair: dict) -> str:
    return pair.get("kind") or DEFAULT_KIND      # pairs of facts built before kinds existed


def _add_kinds(row: dict, name: str, pairs: list[dict], scores: list[float]) -> None:
    """``row[name]``: the mean of the per-kind means (None without pairs), as EasyEdit's
    KnowEdit summary; ``row[f"{name}.{kind}"]``: each kind's mean over its pairs."""
    by_kind: dict[str, list[float]] = {}
    for pair, score in zip(pairs, scores, strict=True):
        by_kind.setdefault(pair_kind(pair), []).append(score)
    kind_means = {k: mean(v) for k, v in by_kind.items()}
    row[name] = mean(kind_means.values()) if kind_means else None
    row.update({f"{name}.{k}": v for k, v in kind_means.items()})


def kind_keys(per_fact: list[dict]) -> tuple[str, ...]:
    """The per-kind keys present in ``per_fact``: KnowEdit's kinds in EasyEdit's order first,
    then any others by name, locality before portability."""
    present = {k for row in per_fact for k in row if k.startswith(("locality.", "portability."))}
    order = ([f"locality.{k}" for k in KNOWEDIT_LOCALITY]
             + [f"portability.{k}" for k in KNOWEDIT_PORTABILITY])
    rest = sorted(present - set(order), key=lambda k: (not k.startswith("locality."), k))
    return tuple(k for k in order if k in present) + tuple(rest)


def _add_strict(per_fact: list[dict], facts: list[Fact], *, asked: int, texts: list[str],
                base_texts: list[str], gen_ok: list[float], chat_ok: list[float] | None) -> None:
    """Add the strict metrics to each fact's row. ``texts`` and ``base_texts`` hold the
    edited and unedited continuations: the first ``asked`` of each fact's prompt and
    rephrases, in fact order, then of every locality prompt; ``gen_ok`` and ``chat_ok``
    (None: no chat template) score the first ``asked``."""
    def mean_or_none(values):
        return mean(values) if values else None

    loc = metrics.generation_locality(base_texts[asked:], texts[asked:])
    ai = li = 0
    for row, f in zip(per_fact, facts):
        n, m = 1 + len(f.rephrase_prompts), len(f.locality)
        row["gen_success"] = gen_ok[ai]
        row["gen_success_rephrase"] = mean_or_none(gen_ok[ai + 1:ai + n])
        row["chat_success"] = chat_ok[ai] if chat_ok is not None else None
        row["chat_success_rephrase"] = mean_or_none(chat_ok[ai + 1:ai + n]) if chat_ok is not None else None
        row["gen_locality"] = mean_or_none(loc[li:li + m])
        row["repeats"] = metrics.repetition(texts[ai:ai + n])
        row["repeats_base"] = metrics.repetition(base_texts[ai:ai + n])
        ai, li = ai + n, li + m
