"""Probes the promotion gate can always run: same-subject probes and a standing suite.

A feed of fact updates carries a subject, a prompt and a new target, rarely locality
prompts, so locality measured from the facts is often "not measured". And where facts do
carry it, teacher-forced locality asks about *other* subjects, which cannot see the damage
an edit most often does: overwriting the edited subject's *other* facts (KnowEdit's
Relation_Specificity of 0.12-0.14). Two measures that need nothing from the feed:

- same-subject probes (``subject_probes``): for each edited fact, cloze prompts about the
  same subject on other relations (``data/probes/relation-templates.yaml``), each in the
  label form and one template, chosen by a stable hash of the fact id. The base model's own answers (the first line of its greedy
  continuation) are recorded before training (``record_subject_probes``); relation
  specificity (``relation_specificity``) is KnowEdit's Relation_Specificity on them: the
  share of answers whose teacher-forced argmax tokens are unchanged, each changed one named.
- a standing locality suite (``data/probes/standing-prompts.txt``): everyday questions and
  openings of the kinds users send, asked as plain text and through the chat template. The
  base model's answers are recorded once per base model, keyed by its ``fingerprint``
  (``record_standing_answers``, ``save_standing_answers``, ``load_standing_answers``), and
  ``standing_locality`` compares an edited model's with them every night.

The standing suite compares decoded greedy continuations (``metrics.continuations``), what
a user reads, under ``metrics.generation_locality``'s rule. Prompts are run in one fixed
order, so recording and measuring batch them alike and an unchanged model scores exactly 1.0.
"""
from __future__ import annotations

import hashlib
import json
import os
import re
import tempfile
from contextlib import nullcontext
from pathlib import Path

import yaml

from . import metrics
from .facts import normalise
from .models import fingerprint

PROBES_DIR = Path(__file__).resolve().parent.parent / "data" / "probes"
TEMPLATES = PROBES_DIR / "relation-templates.yaml"
STANDING_PROMPTS = PROBES_DIR / "standing-prompts.txt"
FORMS = ("plain", "chat")


class FingerprintMismatch(ValueError):
    """Recorded base answers belong to another base model than the one given."""


# --- relation templates and same-subject probes ----------------------------------------

def load_templates(path: str | Path = TEMPLATES) -> dict[str, dict]:
    """``{relation: {"label", "keywords": [...], "templates": [...]}}``; every template must
    hold ``{subject}`` and every relation have a label and at least one template."""
    with open(path, encoding="utf-8") as f:
        relations = (yaml.safe_load(f) or {}).get("relations") or {}
    out = {}
    for name, spec in relations.items():
        templates = list(spec.get("templates") or [])
        if not templates or any("{subject}" not in t for t in templates) or not spec.get("label"):
            raise ValueError(f"{path}: relation {name!r} needs a label and templates that each "
                             "hold {subject}")
        out[str(name)] = {"label": str(spec["label"]),
                          "keywords": [str(k) for k in spec.get("keywords") or []],
                          "templates": templates}
    return out


def _mentions(text: str, phrase: str) -> bool:
    """Whether ``phrase`` occurs in ``text`` as whole words (both normalised)."""
    return re.search(rf"(?<!\w){re.escape(normalise(phrase))}(?!\w)", normalise(text)) is not None


def own_relations(fact, templates: dict[str, dict]) -> set[str]:
    """The relations a fact is about: named by its ``relation`` field (the name itself or a
    keyword), or a keyword in its prompt with the subject taken out (so a subject such as
    "Born Free" does not count as "born")."""
    rest = normalise(fact.prompt).replace(normalise(fact.subject), " ")
    own = set()
    for name, spec in templates.items():
        words = [name, *spec["keywords"]]
        if fact.relation and any(_mentions(fact.relation, w) for w in words):
            own.add(name)
        if any(_mentions(rest, w) for w in spec["keywords"]):
            own.add(name)
    return own


def _rank(fact_id: str, name: str) -> int:
    return int(hashlib.sha256(f"{fact_id}\x1f{name}".encode()).hexdigest(), 16)


def subject_probes(fact, templates: dict[str, dict] | None = None, k: int = 5,
                   exclude: set[str] = frozenset()) -> list[str]:
    """Prompts about ``fact.subject`` on ``k`` (default 5) relations other than its own
    (``own_relations``) and those in ``exclude`` (the relations of other facts on the same
    subject, whose answers may change by right), each in two forms: the label form "The
    {label} of {subject} is" and one of the relation's templates. Relations are ordered by
    a hash of the fact id and the relation, and the template picked the same way, so a fact
    always gets the same probes and facts on one subject spread over different relations.
    Fewer when fewer relations are left."""
    templates = load_templates() if templates is None else templates
    own = own_relations(fact, templates) | set(exclude)
    names = sorted((n for n in templates if n not in own), key=lambda n: _rank(fact.fact_id, n))
    out = []
    for name in names[:k]:
        options = templates[name]["templates"]
        out.append(f"The {templates[name]['label']} of {fact.subject} is")
        out.append(options[_rank(fact.fact_id, name) % len(options)].replace("{subject}", fact.subject))
    return out


def _first_line(text: str) -> str:
    return text.strip().split("\n", 1)[0].strip()


def short_answer(text: str) -> str:
    """The answer in a continuation: its first line up to the first sentence or clause mark,
    as benchmarks give an answer ("Paris", not "Paris, which is also ...")."""
    return re.split(r"[.,;:!?(]", _first_line(text), maxsplit=1)[0].strip()


def record_subject_probes(model, tokenizer, facts, k: int = 5, max_new_tokens: int = 8,
                          templates: dict[str, dict] | None = None, neighbours=()) -> list[dict]:
    """Per fact ``{"fact_id", "subject", "prompts", "base", "base_argmax", "max_new_tokens"}``.

    ``model`` must be the unedited base: call before training. ``base`` is the base's own
    answer, the ``short_answer`` of its greedy continuation of each probe (default 8 new
    tokens); a probe the base answers with nothing is dropped. ``base_argmax`` holds the base's
    teacher-forced argmax tokens on that answer, what ``relation_specificity`` compares.
    Relations of ``neighbours`` (other facts, e.g. those already live) and of the other
    ``facts`` on the same subject are not probed."""
    templates = load_templates() if templates is None else templates
    taken: dict[str, set[str]] = {}
    for f in [*neighbours, *facts]:
        taken.setdefault(normalise(f.subject), set()).update(own_relations(f, templates))
    probes = [{"fact_id": f.fact_id, "subject": f.subject,
               "prompts": subject_probes(f, templates, k, taken.get(normalise(f.subject), set()))}
              for f in facts]
    asked = [p for r in probes for p in r["prompts"]]
    generated = metrics.greedy(model, tokenizer, asked, max_new_tokens)
    texts = [tokenizer.decode(g, skip_special_tokens=True) for g in generated]
    at = 0
    for r in probes:
        m = len(r["prompts"])
        answered = [(p, short_answer(t), g) for p, t, g in zip(r["prompts"], texts[at:at + m], generated[at:at + m])]
        at += m
        r["prompts"] = [p for p, a, _ in answered if a]
        r["base"] = [a for _, a, _ in answered if a]
        # The base's teacher-forced argmax on its own greedy answer is that answer's tokens,
        # where the answer re-tokenises to a prefix of what was generated; else forced below.
        r["base_argmax"] = [_greedy_prefix(tokenizer, p, a, g) for p, a, g in answered if a]
        r["max_new_tokens"] = max_new_tokens
    todo = [(r, i) for r in probes for i, ids in enumerate(r["base_argmax"]) if ids is None]
    forced = metrics.answer_argmax(model, tokenizer, [(r["prompts"][i], r["base"][i]) for r, i in todo]) if todo else []
    for (r, i), (pred, _) in zip(todo, forced):
        r["base_argmax"][i] = pred
    return probes


def _greedy_prefix(tokenizer, prompt: str, answer: str, generated: list[int]) -> list[int] | None:
    """The answer's tokens (as ``metrics.answer_argmax`` tokenises prompt and answer) where
    they are the start of the greedy ``generated`` ids, else None."""
    p = tokenizer(prompt)["input_ids"]
    full = tokenizer(prompt + " " + answer)["input_ids"]
    tokens = full[len(p):]
    return tokens if full[:len(p)] == p and generated[:len(tokens)] == tokens else None


def _attached(model, attach):
    """``attach`` (anything whose ``.attach(model)`` is a context manager, an ``AdapterSet``)
    on ``model`` for a ``with`` block; nothing when None."""
    return attach.attach(model) if attach is not None else nullcontext()


def relation_specificity(model, tokenizer, probes: list[dict], attach=None, show: int = 3) -> dict:
    """Relation specificity of an edit, KnowEdit's Relation_Specificity with the base
    model's own answers (``record_subject_probes``) in place of a benchmark's: a probe is
    kept when every teacher-forced argmax token of its answer is unchanged against the base
    (KnowEdit's answers are a few tokens, so its token share is nearly this); per fact, the
    share of its probes kept, with its first ``show`` (default 3) changed answers: the base's
    and the edited model's greedy one (generated only for those, as generation is the cost).
    ``mean`` is over facts with probes; None when there are none."""
    pairs = [(p, a) for r in probes for p, a in zip(r["prompts"], r["base"])]
    if not pairs:
        return {"per_fact": [{"fact_id": r["fact_id"], "specificity": None, "changed": []}
                             for r in probes], "mean": None}
    with _attached(model, attach):
        edited = metrics.answer_argmax(model, tokenizer, pairs)
        base = [(b, None) for r in probes for b in r["base_argmax"]]
        scores = [float(share == 1.0) for share in metrics.locality(base, edited)]
        changed_at, at = [], 0
        for r in probes:
            m = len(r["prompts"])
            changed_at += [i for i in range(at, at + m) if scores[i] < 1.0][:show]
            at += m
        n = max((r["max_new_tokens"] for r in probes), default=8)
        said = dict(zip(changed_at, metrics.continuations(
            model, tokenizer, [pairs[i][0] for i in changed_at], n))) if changed_at else {}
    per_fact, at = [], 0
    for r in probes:
        m = len(r["prompts"])
        mine = scores[at:at + m]
        per_fact.append({
            "fact_id": r["fact_id"],
            "specificity": sum(mine) / m if m else None,
            "changed": [{"prompt": pairs[i][0], "base": pairs[i][1], "edited": short_answer(said[i]) or _first_line(said[i])}
                        for i in range(at, at + m) if i in said]})
        at += m
    scored = [f["specificity"] for f in per_fact if f["specificity"] is not None]
    return {"per_fact": per_fact, "mean": sum(scored) / len(scored) if scored else None}


# --- the standing locality suite ------------------------------------------------------

def load_standing_prompts(path: str | Path = STANDING_PROMPTS, n: int | None = None) -> list[str]:
    """The first ``n`` (default: all, 60 bundled) non-blank, non-comment lines of ``path``."""
    lines = [line.strip() for line in Path(path).read_text(encoding="utf-8").splitlines()]
    prompts = [line for line in lines if line and not line.startswith("#")]
    return prompts[:n] if n is not None else prompts


def standing_suite(prompts: list[str], tokenizer, chat: bool = True) -> list[dict]:
    """``[{"form", "prompt", "text"}]``: each prompt as plain text and, when ``chat`` is on
    (the default) and the tokenizer has a chat template, also through it
    (``metrics.chat_prompts``); ``text`` is what the model is given."""
    suite = [{"form": "plain", "prompt": p, "text": p} for p in prompts]
    if chat and metrics.has_chat_template(tokenizer):
        suite += [{"form": "chat", "prompt": p, "text": t}
                  for p, t in zip(prompts, metrics.chat_prompts(tokenizer, prompts))]
    return suite


def record_standing_answers(model, tokenizer, suite: list[dict], max_new_tokens: int = 24) -> dict:
    """The unedited model's continuations (default 24 new tokens) of the suite, with its
    ``fingerprint`` and name and the settings, to save once per base model."""
    texts = metrics.continuations(model, tokenizer, [s["text"] for s in suite], max_new_tokens)
    return {"fingerprint": fingerprint(model),
            "base_model": getattr(model.config, "name_or_path", "") or type(model).__name__,
            "max_new_tokens": max_new_tokens,
            "forms": sorted({s["form"] for s in suite}, key=FORMS.index),
            "answers": [{**s, "base": t} for s, t in zip(suite, texts, strict=True)]}


def save_standing_answers(path: str | Path, record: dict) -> Path:
    """Write ``record`` as JSON whole or not at all: a temporary file beside ``path``,
    fsynced, then ``os.replace``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.tmp-", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            json.dump(record, f, ensure_ascii=False, indent=1)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def _check_base(record: dict, model, where: str) -> None:
    found = fingerprint(model)
    if record.get("fingerprint") != found:
        raise FingerprintMismatch(
            f"{where}: the standing answers were recorded on base model "
            f"{record.get('base_model')!r} (fingerprint {record.get('fingerprint')}); the model "
            f"given has fingerprint {found}. Record them again for this base model.")


def load_standing_answers(path: str | Path, model) -> dict:
    """The record saved at ``path``; ``FingerprintMismatch`` if ``model`` is not the base
    model it was recorded on."""
    with open(path, encoding="utf-8") as f:
        record = json.load(f)
    _check_base(record, model, str(path))
    return record


def standing_locality(model, tokenizer, record: dict, attach=None) -> dict:
    """``{"mean", "per_form": {form: share}, "changed": [{"form", "prompt", "base",
    "edited"}]}``: the share of the suite whose continuation is the recorded base text
    (``metrics.generation_locality``), at the recorded ``max_new_tokens``. ``model`` must be
    the recorded base (checked by fingerprint); ``attach`` the edit to measure."""
    _check_base(record, model, "standing_locality")
    answers = record["answers"]
    with _attached(model, attach):
        edited = metrics.continuations(model, tokenizer, [a["text"] for a in answers],
                                       record["max_new_tokens"])
    same = metrics.generation_locality([a["base"] for a in answers], edited)
    per_form = {}
    for form in FORMS:
        scores = [s for a, s in zip(answers, same) if a["form"] == form]
        if scores:
            per_form[form] = sum(scores) / len(scores)
    return {"mean": sum(same) / len(same) if same else None, "per_form": per_form,
            "changed": [{"form": a["form"], "prompt": a["prompt"], "base": a["base"], "edited": e}
                        for a, e, s in zip(answers, edited, same) if not s]}
