"""Measure a candidate: before training, the base's answers the gate compares with
(``probe``); after, the new edits, the retention of every previously live edit, the retracted
edits, the strict checks (``tasks.pipeline.probing``) and drift on plain text.

The measurements go into the candidate's record, so the gate and the report read them from disk.
"""
from __future__ import annotations

import time

from tasks.faults import checkpoint
from tasks.pipeline import store as pub
from tasks.pipeline.state import PipelineError, as_home
from tasks.pipeline.train import model_for
from tasks.settings import Settings, repo_path


def probe(home, settings: Settings, version: str) -> dict:
    """The base's answers the gate will compare with: the standing suite and the candidate's
    subject probes (``tasks.pipeline.probing``). Before training, on the unedited model."""
    from tasks.pipeline.probing import probe_base

    model, tokenizer = model_for(settings)
    return probe_base(as_home(home), settings, version, model, tokenizer)


def drift_texts(settings: Settings) -> list[str]:
    path = repo_path(settings.pipeline.drift_texts)
    try:
        lines = [x.strip() for x in path.read_text(encoding="utf-8").splitlines()]
    except FileNotFoundError:
        raise PipelineError(f"params.yaml pipeline.drift_texts: {path} does not exist") from None
    return [x for x in lines if x and not x.startswith("#")]


def evaluate_candidate(home, settings: Settings, version: str) -> dict:
    """New edits (reliability, generality, ...), retention of every previously live edit, the
    retracted edits, locality, strict checks, drift. Returns ``{"metrics": {...},
    "per_fact": [...], "notes": {metric: why not measured}, "changed": {...}}``."""
    from editing import AdapterSet
    from tasks.pipeline.probing import strict_checks

    h = as_home(home)
    record = pub.read_record(h, version)
    candidate = AdapterSet.load(pub.candidate_dir(h, version))
    model, tokenizer = model_for(settings)
    t0 = time.perf_counter()
    new, kept, retracted = _split(record)
    rows: list[dict] = []
    metrics = _fact_metrics(model, tokenizer, candidate, version, rows, new, kept, retracted)
    strict = strict_checks(h, settings, record, new, candidate, model, tokenizer)
    metrics.update(strict["metrics"])
    _add_strict_rows(rows, strict)
    notes = {**_unmeasured(metrics, new, kept), **strict["notes"]}
    metrics.update(_drift(model, tokenizer, candidate, drift_texts(settings)))
    metrics.update({"new_edits": len(new), "retained_edits": len(kept), "retracted_edits": len(retracted),
                    "superseded_edits": len(record["changes"]["superseded"]),
                    "live_edits": len(record.get("live_after", [])),
                    "eval_seconds": round(time.perf_counter() - t0, 3),
                    **{f"eval_seconds_{k}": v for k, v in strict["seconds"].items()}})
    evaluation = {"metrics": metrics, "per_fact": rows, "notes": notes, "changed": strict["changed"]}
    pub.update_record(h, version, status="evaluated", metrics=metrics, notes=notes)
    checkpoint("after_evaluation")
    return evaluation


def _split(record: dict) -> tuple[list[dict], list[dict], list[dict]]:
    """The candidate's new edits, the live edits it keeps, and those it retracts (edit items)."""
    changes = record["changes"]
    added, gone = set(changes["added"]), set(changes["retracted"]) | set(changes["superseded"])
    by_id = {e["fact"]["fact_id"]: e for e in record["edits"]}
    new = [by_id[f] for f in changes["added"] if f in by_id]
    kept = [x for x in record["live_before"] if x["fact"]["fact_id"] not in gone | added]
    retracted = [x for x in record["live_before"] if x["fact"]["fact_id"] in set(changes["retracted"])]
    return new, kept, retracted


def _fact_metrics(model, tokenizer, candidate, version: str, rows: list[dict], new: list[dict],
                  kept: list[dict], retracted: list[dict]) -> dict:
    """The facts' own metrics; one row per fact is appended to ``rows``. Fluency is read off
    the strict checks' continuations (``probing._generation``), not generated here again."""
    from statistics import mean

    new_means = _evaluate(model, tokenizer, candidate, version, rows, new, "new")
    checkpoint("during_evaluation")            # some facts evaluated, nothing saved yet
    kept_means = _evaluate(model, tokenizer, candidate, version, rows, kept, "retained")
    gone_means = _evaluate(model, tokenizer, candidate, version, rows, retracted, "retracted")
    metrics = dict(new_means or {})
    metrics.setdefault("reliability", None)
    metrics.setdefault("generality", None)
    metrics["retention"] = kept_means["reliability"] if kept_means else None
    metrics["retention_generality"] = kept_means["generality"] if kept_means else None
    # a retracted edit should be gone: how often its old answer still comes out
    metrics["retracted_reliability"] = gone_means["reliability"] if gone_means else None
    loc = [r["locality"] for r in rows if r["kind"] != "retracted" and r.get("locality") is not None]
    metrics["locality"] = mean(loc) if loc else None
    return metrics


def _evaluate(model, tokenizer, candidate, version: str, rows: list[dict], items: list[dict],
              kind: str) -> dict | None:
    from editing import Fact
    from editing.evaluate import evaluate_facts

    if not items:
        return None
    facts = [Fact(**x["fact"]) for x in items]
    result = evaluate_facts(model, tokenizer, facts, attach=candidate.attach)
    for item, row in zip(items, result["per_fact"]):
        f, o = item["fact"], item.get("origin", {})
        rows.append({**row, "kind": kind, "subject": f["subject"], "prompt": f["prompt"],
                     "target_new": f["target_new"], "batch": o.get("batch"),
                     "source_file": o.get("source_file"), "source_line": o.get("source_line"),
                     "version": version})
    return result["means"]


def _add_strict_rows(rows: list[dict], strict: dict) -> None:
    from tasks.pipeline.probing import changes_text

    for row in rows:
        if row["kind"] == "new":
            row.update(strict["per_fact"].get(row["fact_id"], {}))
            changed = strict["changed"].get("subject", {}).get(row["fact_id"])
            row["changed_answers"] = changes_text(changed) if changed else None


def _drift(model, tokenizer, candidate, texts: list[str]) -> dict:
    """Perplexity on plain text, base and candidate; drift is their ratio less one."""
    from editing.metrics import perplexity

    base_ppl = perplexity(model, tokenizer, texts)
    with candidate.attach(model):
        cand_ppl = perplexity(model, tokenizer, texts)
    return {"drift": cand_ppl / base_ppl - 1.0, "perplexity_base": base_ppl, "perplexity_candidate": cand_ppl}


def _unmeasured(metrics: dict, new: list[dict], kept: list[dict]) -> dict:
    """Why each of the facts' own metrics is None, for the gate's report."""
    why = {"reliability": "no new edits", "generality": "no new edit carries rephrased prompts",
           "retention": "no previously live edits",
           "locality": "no fact carries locality prompts (the standing suite still measures locality)"}
    if not new:
        why["generality"] = "no new edits"
    return {k: v for k, v in why.items() if metrics.get(k) is None}
