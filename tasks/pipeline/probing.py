"""What the gate asks beyond the facts' own prompts: the standing suite, same-subject probes
and the strict checks (``editing.probes``, ``editing.metrics``), as pipeline steps.

    plan ─> probe the base (standing answers once per base model; subject probes) ─> train
         ─> evaluate: + relation specificity, standing locality, chat success, repetition

- The standing suite's base answers are recorded once per base model and suite, in the
  data workspace at ``probes/standing-<fingerprint>.json``, versioned with DVC beside the
  batches (a git tag ``probes-...`` names each recording), and read back every night.
- Subject probes are recorded for each candidate before training, into its record, since
  they depend on tonight's facts and on what is live.
- Each check's figure is None where it cannot be measured, and ``notes`` says why.

Sizes and lengths are ``params.yaml`` ``gate.probes`` (``ProbeSettings``): the suite's
size is the knob on the gate's cost (bench/pipeline.py reports it per check).
"""
from __future__ import annotations

import hashlib
import json
import logging
import time
from dataclasses import dataclass, fields
from pathlib import Path

from tasks.pipeline import store as pub
from tasks.stream.workspace import Home

_REPO = Path(__file__).resolve().parents[2]
log = logging.getLogger("ledit.pipeline")


class ProbeConfigError(ValueError):
    """A missing or malformed ``gate.probes`` setting in params.yaml."""


@dataclass(frozen=True)
class ProbeSettings:
    standing_prompts: str       # one prompt a line; relative to the repository
    standing_size: int          # the first N prompts, each asked plain and through the chat template
    standing_tokens: int        # greedy new tokens compared on each
    subject_probes: int         # per new fact: prompts on its subject's other relations
    subject_tokens: int         # new tokens of the base's recorded answer to each
    relation_templates: str
    strict_facts: int           # at most this many new facts get the generation checks
    strict_tokens: int          # greedy new tokens for chat success and repetition

    @classmethod
    def from_params(cls, params: dict) -> "ProbeSettings":
        raw = (params.get("gate") or {}).get("probes")
        if not isinstance(raw, dict):
            raise ProbeConfigError("params.yaml gate.probes is missing: the standing suite and "
                                   "subject probe settings")
        values = {}
        for f in fields(cls):
            v = raw.get(f.name)
            ok = isinstance(v, str) if f.type == "str" else (isinstance(v, int) and not isinstance(v, bool) and v >= 0)
            if not ok:
                raise ProbeConfigError(f"params.yaml gate.probes.{f.name} must be "
                                       f"{'a path' if f.type == 'str' else 'a whole number >= 0'}, got {v!r}")
            values[f.name] = v
        return cls(**values)

    def path(self, name: str) -> Path:
        p = Path(getattr(self, name)).expanduser()
        return p if p.is_absolute() else _REPO / p


# -- the standing suite -------------------------------------------------------------------------
def _suite_key(settings: ProbeSettings, prompts: list[str]) -> str:
    blob = json.dumps([prompts, settings.standing_tokens], ensure_ascii=False).encode()
    return hashlib.sha256(blob).hexdigest()[:12]


def standing_answers(h: Home, settings: ProbeSettings, model, tokenizer) -> dict | None:
    """The base's answers to the standing suite: read from the workspace, else recorded
    now (``model`` must be the unedited base) and versioned. None when the size is 0."""
    from editing import probes
    from editing.models import fingerprint

    if not settings.standing_size:
        return None
    prompts = probes.load_standing_prompts(settings.path("standing_prompts"), settings.standing_size)
    key = _suite_key(settings, prompts)
    fp = fingerprint(model)
    rel = f"probes/standing-{fp.removeprefix('sha256:')[:16]}.json"
    path = h.workspace / rel
    if path.exists():
        record = probes.load_standing_answers(path, model)
        if record.get("suite") == key:
            return record
    suite = probes.standing_suite(prompts, tokenizer)
    record = probes.record_standing_answers(model, tokenizer, suite, settings.standing_tokens)
    record["suite"] = key
    _version_standing(h, path, rel, record, f"probes-{fp.removeprefix('sha256:')[:12]}-{key}")
    return record


def _version_standing(h: Home, path: Path, rel: str, record: dict, tag: str) -> None:
    """Save, ``dvc add``, commit and tag under the workspace lock (an ingest may be
    committing too), then push; a push that fails is retried by the next ingest's."""
    from editing import probes
    from tasks.stream import version

    with h.lock():
        probes.save_standing_answers(path, record)
        md5 = version.dvc_add(h.workspace, rel)
        paths = [f"{rel}.dvc"] + (["probes/.gitignore"] if (h.workspace / "probes/.gitignore").exists() else [])
        version.commit_and_tag(h.workspace, paths, tag=tag, marker=f"standing {md5}",
                               message=f"{tag}: standing locality suite, base answers of "
                                       f"{record['base_model']}\n\nstanding {md5}\n")
    try:
        version.dvc_push(h.workspace, rel)
    except version.RemoteUnavailable as exc:
        log.warning("%s", exc)


# -- before training ------------------------------------------------------------------------------
def probe_base(home, params: dict, version: str, model, tokenizer) -> dict:
    """Record the base's answers before training: the standing suite (once per base model)
    and the subject probes of the candidate's new upserts, into its record."""
    from editing import Fact, probes

    h = Home.at(home) if not isinstance(home, Home) else home
    settings = ProbeSettings.from_params(params)
    record = pub.read_record(h, version)
    t0 = time.perf_counter()
    standing = standing_answers(h, settings, model, tokenizer)
    t1 = time.perf_counter()
    new = [Fact(**e["fact"]) for e in record["edits"] if e["fact"].get("op", "upsert") != "retract"]
    live = [Fact(**x["fact"]) for x in record.get("live_before", [])]
    subject = probes.record_subject_probes(
        model, tokenizer, new, k=settings.subject_probes, max_new_tokens=settings.subject_tokens,
        templates=probes.load_templates(settings.path("relation_templates")), neighbours=live) \
        if settings.subject_probes and new else []
    seconds = {"standing_record": round(t1 - t0, 3), "subject_record": round(time.perf_counter() - t1, 3)}
    pub.update_record(h, version, subject_probes=subject, probe_seconds=seconds,
                      standing_suite=None if standing is None else standing["suite"])
    return {"subject_probes": sum(len(r["prompts"]) for r in subject),
            "standing_prompts": 0 if standing is None else len(standing["answers"]), "seconds": seconds}


# -- after training -------------------------------------------------------------------------------
def strict_checks(h: Home, params: dict, record: dict, new_items: list[dict], candidate,
                  model, tokenizer) -> dict:
    """The gate's checks on what users see, for the candidate ``candidate`` (an AdapterSet).

    Returns ``{"metrics", "per_fact": {fact_id: {...}}, "notes": {metric: why not measured},
    "changed": {...}, "seconds": {check: s}}``."""
    from editing import Fact, metrics, probes
    from editing.evaluate import evaluate_facts

    settings = ProbeSettings.from_params(params)
    out = {"metrics": {}, "per_fact": {}, "notes": {}, "changed": {}, "seconds": {}}
    m, notes = out["metrics"], out["notes"]

    t0 = time.perf_counter()
    recorded = record.get("subject_probes") or []
    if not new_items:
        notes["relation_specificity"] = "no new edits"
    elif not settings.subject_probes:
        notes["relation_specificity"] = "gate.probes.subject_probes is 0"
    elif not recorded:
        notes["relation_specificity"] = "no subject probes were recorded before training (the probe step did not run)"
    elif not any(r["prompts"] for r in recorded):
        notes["relation_specificity"] = "no probe left: every template relation is the edited facts' own"
    if recorded and "relation_specificity" not in notes:
        spec = probes.relation_specificity(model, tokenizer, recorded, attach=candidate)
        m["relation_specificity"] = spec["mean"]
        for f in spec["per_fact"]:
            out["per_fact"].setdefault(f["fact_id"], {})["relation_specificity"] = f["specificity"]
            if f["changed"]:
                out["changed"].setdefault("subject", {})[f["fact_id"]] = f["changed"]
    out["seconds"]["relation_specificity"] = round(time.perf_counter() - t0, 3)

    t0 = time.perf_counter()
    standing = standing_answers(h, settings, model, tokenizer) if settings.standing_size else None
    if standing is None:
        notes["standing_locality"] = "gate.probes.standing_size is 0"
    else:
        loc = probes.standing_locality(model, tokenizer, standing, attach=candidate)
        m["standing_locality"] = loc["mean"]
        for form, share in loc["per_form"].items():
            m[f"standing_locality_{form}"] = share
        out["changed"]["standing"] = loc["changed"]
    out["seconds"]["standing_locality"] = round(time.perf_counter() - t0, 3)

    t0 = time.perf_counter()
    sample = sorted(new_items, key=lambda x: hashlib.sha256(x["fact"]["fact_id"].encode()).hexdigest())
    sample = sample[:settings.strict_facts]
    if not new_items:
        notes["chat_success"] = notes["repetition_excess"] = "no new edits"
    elif not sample or not settings.strict_tokens:
        notes["chat_success"] = notes["repetition_excess"] = "gate.probes.strict_facts or strict_tokens is 0"
    else:
        facts = [Fact(**{**x["fact"], "locality": []}) for x in sample]   # locality: measured above
        result = evaluate_facts(model, tokenizer, facts, attach=candidate.attach,
                                strict_tokens=settings.strict_tokens)
        means = result["means"]
        for key in ("gen_success", "gen_success_rephrase", "chat_success", "chat_success_rephrase"):
            m[key] = means.get(key)
        m["repetition"], m["repetition_base"] = means.get("repeats"), means.get("repeats_base")
        m["repetition_excess"] = (m["repetition"] - m["repetition_base"]
                                  if m["repetition"] is not None else None)
        if not metrics.has_chat_template(tokenizer):
            notes["chat_success"] = "the tokenizer has no chat template"
        for row in result["per_fact"]:
            out["per_fact"].setdefault(row["fact_id"], {}).update(
                {k: row.get(k) for k in ("gen_success", "chat_success", "repeats")})
        m["strict_facts"] = len(sample)
    out["seconds"]["generation"] = round(time.perf_counter() - t0, 3)
    return out


def changes_text(changed: list[dict], limit: int = 3) -> str:
    """Changed answers in one line: ``'prompt': 'base' -> 'edited'``."""
    parts = [f"{c['prompt']!r}: {c['base']!r} -> {c['edited']!r}" for c in changed[:limit]]
    more = len(changed) - limit
    return "; ".join(parts) + (f"; and {more} more" if more > 0 else "")
