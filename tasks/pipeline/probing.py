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
from contextlib import contextmanager
from pathlib import Path

from tasks.pipeline import store as pub
from tasks.settings import ProbeSettings, Settings
from tasks.stream.workspace import Home

log = logging.getLogger("ledit.pipeline")


# -- the standing suite -------------------------------------------------------------------------
def _suite_key(probe_settings: ProbeSettings, prompts: list[str]) -> str:
    blob = json.dumps([prompts, probe_settings.standing_tokens], ensure_ascii=False).encode()
    return hashlib.sha256(blob).hexdigest()[:12]


def standing_answers(h: Home, probe_settings: ProbeSettings, model, tokenizer) -> dict | None:
    """The base's answers to the standing suite: read from the workspace, else recorded
    now (``model`` must be the unedited base) and versioned. None when the size is 0."""
    from editing import probes
    from editing.models import fingerprint

    if not probe_settings.standing_size:
        return None
    prompts = probes.load_standing_prompts(probe_settings.path("standing_prompts"),
                                           probe_settings.standing_size)
    key = _suite_key(probe_settings, prompts)
    fp = fingerprint(model)
    rel = f"probes/standing-{fp.removeprefix('sha256:')[:16]}.json"
    path = h.workspace / rel
    if path.exists():
        record = probes.load_standing_answers(path, model)
        if record.get("suite") == key:
            return record
    suite = probes.standing_suite(prompts, tokenizer)
    record = probes.record_standing_answers(model, tokenizer, suite, probe_settings.standing_tokens)
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
def probe_base(home, settings: Settings, version: str, model, tokenizer) -> dict:
    """Record the base's answers before training: the standing suite (once per base model)
    and the subject probes of the candidate's new upserts, into its record."""
    from editing import Fact, probes

    h = Home.at(home) if not isinstance(home, Home) else home
    probe = settings.gate.probes
    record = pub.read_record(h, version)
    t0 = time.perf_counter()
    standing = standing_answers(h, probe, model, tokenizer)
    t1 = time.perf_counter()
    new = [Fact(**e["fact"]) for e in record["edits"] if e["fact"].get("op", "upsert") != "retract"]
    live = [Fact(**x["fact"]) for x in record.get("live_before", [])]
    subject = probes.record_subject_probes(
        model, tokenizer, new, k=probe.subject_probes, max_new_tokens=probe.subject_tokens,
        templates=probes.load_templates(probe.path("relation_templates")), neighbours=live) \
        if probe.subject_probes and new else []
    seconds = {"standing_record": round(t1 - t0, 3), "subject_record": round(time.perf_counter() - t1, 3)}
    pub.update_record(h, version, subject_probes=subject, probe_seconds=seconds,
                      standing_suite=None if standing is None else standing["suite"])
    return {"subject_probes": sum(len(r["prompts"]) for r in subject),
            "standing_prompts": 0 if standing is None else len(standing["answers"]), "seconds": seconds}


# -- after training -------------------------------------------------------------------------------
def strict_checks(h: Home, settings: Settings, record: dict, new_items: list[dict], candidate,
                  model, tokenizer) -> dict:
    """The gate's checks on what users see, for the candidate ``candidate`` (an AdapterSet).

    Returns ``{"metrics", "per_fact": {fact_id: {...}}, "notes": {metric: why not measured},
    "changed": {...}, "seconds": {check: s}}``."""
    probe = settings.gate.probes
    out = {"metrics": {}, "per_fact": {}, "notes": {}, "changed": {}, "seconds": {}}
    with _timed(out["seconds"], "relation_specificity"):
        _relation_specificity(out, probe, record, new_items, candidate, model, tokenizer)
    with _timed(out["seconds"], "standing_locality"):
        _standing_locality(out, h, probe, candidate, model, tokenizer)
    with _timed(out["seconds"], "generation"):
        _generation(out, probe, new_items, candidate, model, tokenizer)
    return out


@contextmanager
def _timed(seconds: dict, name: str):
    t0 = time.perf_counter()
    yield
    seconds[name] = round(time.perf_counter() - t0, 3)


def _relation_specificity(out, probe, record, new_items, candidate, model, tokenizer) -> None:
    """New edits' subjects asked about their other relations, against the recorded base answers."""
    from editing import probes

    m, notes = out["metrics"], out["notes"]
    recorded = record.get("subject_probes") or []
    if not new_items:
        notes["relation_specificity"] = "no new edits"
    elif not probe.subject_probes:
        notes["relation_specificity"] = "gate.probes.subject_probes is 0"
    elif not recorded:
        notes["relation_specificity"] = ("no subject probes were recorded before training "
                                         "(the probe step did not run)")
    elif not any(r["prompts"] for r in recorded):
        notes["relation_specificity"] = "no probe left: every template relation is the edited facts' own"
    if not recorded or "relation_specificity" in notes:
        return
    spec = probes.relation_specificity(model, tokenizer, recorded, attach=candidate,
                                       show=probe.shown_changes)
    m["relation_specificity"] = spec["mean"]
    for f in spec["per_fact"]:
        out["per_fact"].setdefault(f["fact_id"], {})["relation_specificity"] = f["specificity"]
        if f["changed"]:
            out["changed"].setdefault("subject", {})[f["fact_id"]] = f["changed"]


def _standing_locality(out, h, probe, candidate, model, tokenizer) -> None:
    """The standing suite, plain and chat, against the base's recorded generations."""
    from editing import probes

    m = out["metrics"]
    standing = standing_answers(h, probe, model, tokenizer) if probe.standing_size else None
    if standing is None:
        out["notes"]["standing_locality"] = "gate.probes.standing_size is 0"
        return
    loc = probes.standing_locality(model, tokenizer, standing, attach=candidate)
    m["standing_locality"] = loc["mean"]
    for form, share in loc["per_form"].items():
        m[f"standing_locality_{form}"] = share
    out["changed"]["standing"] = loc["changed"]


def _generation(out, probe, new_items, candidate, model, tokenizer) -> None:
    """Chat success, repetition and fluency on a sample of the new edits, by fact-id hash:
    each asked by its prompt and its first rephrase (generation is the gate's cost)."""
    from editing import Fact, metrics
    from editing.evaluate import evaluate_facts

    m, notes = out["metrics"], out["notes"]
    sample = sorted(new_items, key=lambda x: hashlib.sha256(x["fact"]["fact_id"].encode()).hexdigest())
    sample = sample[:probe.strict_facts]
    if not new_items:
        notes["chat_success"] = notes["repetition_excess"] = "no new edits"
        return
    if not sample or not probe.strict_tokens:
        notes["chat_success"] = notes["repetition_excess"] = "gate.probes.strict_facts or strict_tokens is 0"
        return
    facts = [Fact(**{**x["fact"], "locality": [],                       # locality: measured above
                     "rephrase_prompts": list(x["fact"].get("rephrase_prompts") or [])[:1]}) for x in sample]
    result = evaluate_facts(model, tokenizer, facts, attach=candidate.attach,
                            strict_tokens=probe.strict_tokens, fluency_tokens=probe.strict_tokens)
    means = result["means"]
    for key in ("gen_success", "gen_success_rephrase", "chat_success", "chat_success_rephrase"):
        m[key] = means.get(key)
    m["repetition"], m["repetition_base"] = means.get("repeats"), means.get("repeats_base")
    m["fluency"] = means.get("fluency")
    m["repetition_excess"] = m["repetition"] - m["repetition_base"] if m["repetition"] is not None else None
    if not metrics.has_chat_template(tokenizer):
        notes["chat_success"] = "the tokenizer has no chat template"
    for row in result["per_fact"]:
        out["per_fact"].setdefault(row["fact_id"], {}).update(
            {k: row.get(k) for k in ("gen_success", "chat_success", "repeats", "fluency")})
    m["strict_facts"] = len(sample)


def changes_text(changed: list[dict], limit: int = 3) -> str:
    """Changed answers in one line: ``'prompt': 'base' -> 'edited'``."""
    parts = [f"{c['prompt']!r}: {c['base']!r} -> {c['edited']!r}" for c in changed[:limit]]
    more = len(changed) - limit
    return "; ".join(parts) + (f"; and {more} more" if more > 0 else "")
