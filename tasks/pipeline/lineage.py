"""Lineage: from a fact back to the update record, data version, run and adapter version.

For one ``fact_id``: every record of it ever accepted (source file and line, ingest batch = git
tag + DVC md5), every candidate that carried it (MLflow run, registry version, gate metrics,
verdict), and its status now:

- ``live``: production holds it;
- ``pending``: a rejected candidate carried it; it waits for the next run (with the reason);
- ``retracted``: a promoted retract removed it;
- ``superseded``: (for one record) a later record of the same fact replaced it;
- ``rolled-back``: it was live, and production was rolled back to a version without it;
- ``ingested``: accepted into a batch, not trained yet;
- ``unknown``: never seen.
"""
from __future__ import annotations

import json
from dataclasses import replace

from tasks.pipeline import store as pub
from tasks.pipeline.state import as_home, read_state
from tasks.settings import Settings, load_settings


def _records(h, fact_id: str) -> list[dict]:
    """Every accepted record of the fact, oldest batch first (from the workspace's batch files)."""
    import polars as pl

    from tasks.stream.prepare import batch_tags

    out = []
    for tag in batch_tags(h):
        path = h.workspace / "batches" / f"{tag}.parquet"
        meta = h.workspace / "batches" / f"{tag}.json"
        try:
            df = pl.scan_parquet(path).filter(pl.col("fact_id") == fact_id).collect()
        except FileNotFoundError:         # batch file only in the DVC cache/remote
            from tasks.stream.prepare import read_batch
            df = read_batch(h, tag).filter(pl.col("fact_id") == fact_id)
        md5 = json.loads(meta.read_text(encoding="utf-8")).get("dvc_md5") if meta.exists() else None
        for row in df.iter_rows(named=True):
            out.append({"batch": tag, "dvc_md5": md5, "op": row.get("op"),
                        "subject": row.get("subject"), "prompt": row.get("prompt"),
                        "target_new": row.get("target_new"), "target_old": row.get("target_old"),
                        "source_file": row.get("source_file"), "source_line": row.get("source_line"),
                        "source_sha256": row.get("source_sha256"), "record_hash": row.get("record_hash"),
                        "observed_at": str(row["observed_at"]) if row.get("observed_at") else None,
                        "ingest_run": row.get("run_id")})
    return out


def lineage(home, fact_id: str) -> dict:
    h = as_home(home)
    records = _records(h, fact_id) if (h.workspace / ".git").exists() else []
    production = pub.production_version(h)
    pending = read_state(h)["pending"].get(fact_id)
    candidates = [c for rec in pub.list_records(h) if (c := _candidate(rec, fact_id))]
    live_item = _live_item(h, production, fact_id)
    promoted = [c for c in candidates if c["status"] == "promoted"]
    if live_item is not None:
        status = "live"
    elif pending is not None:
        status = "pending"
    elif promoted and promoted[-1]["role"] == "retracted":
        status = "retracted"
    elif promoted:
        status = "rolled-back"
    elif records:
        status = "ingested"
    else:
        status = "unknown"
    live_hash = (live_item or {}).get("origin", {}).get("record_hash")
    for r in records:          # each record's own status
        if live_item is not None and r["record_hash"] == live_hash:
            r["status"] = "live"
        elif pending is not None and r["record_hash"] == pending.get("origin", {}).get("record_hash"):
            r["status"] = "pending"
        elif r is not records[-1]:
            r["status"] = "superseded"
        else:
            r["status"] = status
    live_version = None
    if live_item is not None:
        live_version = next((c["version"] for c in reversed(promoted) if c["role"] == "added"
                             and c.get("record_hash") == live_hash), None)
        live_version = live_version or next((c["version"] for c in reversed(promoted)
                                             if c["role"] == "added"), None)
    latest = candidates[-1] if candidates else None
    return {"fact_id": fact_id, "status": status, "production_version": production,
            "live_in": live_version, "pending": None if pending is None else {
                "reason": pending.get("reason"), "attempts": pending.get("attempts"),
                "parked": pending.get("parked"), "last_version": pending.get("last_version")},
            "records": records, "candidates": candidates, "latest": latest}


def _candidate(rec: dict, fact_id: str) -> dict | None:
    """What candidate ``rec`` did with the fact, or None if it did not carry it."""
    changes = rec.get("changes") or {}
    role = next((name for name in ("added", "retracted", "superseded")
                 if fact_id in changes.get(name, [])), None)
    edit = next((e for e in rec.get("edits", []) if e["fact"]["fact_id"] == fact_id), None)
    if not role and edit is None:
        return None
    verdict = rec.get("verdict") or {}
    return {
        "version": rec["version"], "status": rec.get("status"), "role": role or "carried",
        "batch": (edit or {}).get("origin", {}).get("batch"),
        "record_hash": (edit or {}).get("origin", {}).get("record_hash"),
        "mlflow_run_id": rec.get("mlflow_run_id"), "model_version": rec.get("model_version"),
        "flow_run_id": rec.get("flow_run_id"),
        "gate_metrics": {k: (rec.get("metrics") or {}).get(k) for k in
                         ("reliability", "generality", "retention", "locality", "drift")},
        "gate_passed": verdict.get("passed"), "gate_reasons": verdict.get("reasons", []),
        "pending_reason": (rec.get("pending_reasons") or {}).get(fact_id),
        "created_at": rec.get("created_at")}


def _live_item(h, production: str | None, fact_id: str) -> dict | None:
    """The fact's item in production's record, or None when production does not hold it."""
    if not production:
        return None
    try:
        return next((x for x in pub.read_record(h, production).get("live_after", [])
                     if x["fact"]["fact_id"] == fact_id), None)
    except pub.PublishError:
        return None


def markdown(info: dict) -> str:
    """A readable trail for ``ledit lineage``."""
    lines = [f"fact {info['fact_id']}: {info['status'].upper()}"
             + (f" in {info['live_in']} (production {info['production_version']})" if info["live_in"] else "")]
    if info.get("pending"):
        p = info["pending"]
        lines.append(f"  pending after {p['attempts']} attempt(s){' (parked)' if p['parked'] else ''}: {p['reason']}")
    lines.append("records:")
    for r in info["records"] or [{"batch": None}]:
        if r["batch"] is None:
            lines.append("  (none ingested)")
            continue
        lines.append(f"  [{r['status']}] {r['op']} {r['subject']!r} -> {r['target_new']!r}")
        lines.append(f"      source {r['source_file']} line {r['source_line']} (sha256 {str(r['source_sha256'])[:12]})")
        lines.append(f"      batch {r['batch']} (git tag), DVC md5 {r['dvc_md5']}")
    lines.append("adapter versions:")
    for c in info["candidates"] or [None]:
        if c is None:
            lines.append("  (none yet)")
            continue
        m = ", ".join(f"{k} {v:.3f}" for k, v in c["gate_metrics"].items() if v is not None)
        lines.append(f"  {c['version']} [{c['status']}] {c['role']}; MLflow run {c['mlflow_run_id']}, "
                     f"registry version {c['model_version']}")
        if m:
            lines.append(f"      gate metrics: {m}")
        for reason in c["gate_reasons"]:
            lines.append(f"      rejected: {reason}")
    return "\n".join(lines)


# -- from an answer back to its facts -------------------------------------------------------
def why(prompt: str, *, adapter_dir=None, home=None, version: str | None = None,
        settings: Settings | None = None, max_new_tokens: int | None = None,
        threshold: float | None = None, model_and_tokenizer=None) -> dict:
    """``ledit why``: the edited model's answer to ``prompt`` and every fact whose bases opened
    on it (``editing.provenance.explain``), each with its lineage where a home is given.

    ``max_new_tokens`` and ``threshold`` default to ``settings.audit`` (``settings``: params.yaml
    unless given); the base model is the set's own, in ``settings.model.dtype``.
    The adapter set is ``adapter_dir``, else ``version`` of ``home``'s published sets, else
    its production. Returns explain's dict plus ``"adapter"`` (where the set came from) and,
    per firing, ``"lineage"``: status, source file and line, batch tag, DVC md5, MLflow run,
    registry version and the adapter version it is live in (None without a home)."""
    from editing import load_model
    from editing.provenance import explain

    h = as_home(home) if home is not None else None
    adapter_set, where = _adapter_set(h, adapter_dir, version)
    settings = settings or load_settings()
    model_config = replace(settings.model, name=adapter_set.base_model or settings.model.name)
    model, tokenizer = model_and_tokenizer or load_model(model_config)
    audit = settings.audit
    out = explain(model, tokenizer, adapter_set, prompt,
                  audit.answer_tokens if max_new_tokens is None else max_new_tokens,
                  audit.fired_weight if threshold is None else threshold)
    out["adapter"] = where
    for firing in out["firings"]:
        firing["lineage"] = _trail(lineage(h, firing["fact_id"])) if h is not None else None
    return out


def _adapter_set(h, adapter_dir, version: str | None):
    """``(AdapterSet, where it came from)``: ``adapter_dir``, else ``version`` of ``h``, else
    its production."""
    from editing.adapters import AdapterSet

    if adapter_dir is not None:
        return AdapterSet.load(adapter_dir), str(adapter_dir)
    if h is None:
        raise ValueError("give an adapter directory or a LEDIT_HOME")
    version = version or pub.production_version(h)
    if version is None:
        raise pub.PublishError(f"{h.root}: nothing has been promoted yet; give --version or --adapter")
    return pub.load_published(h, version), version


def _trail(info: dict) -> dict:
    """The lineage of one fired fact in one line's worth: its live (else latest) record and candidate."""
    records, candidates = info["records"], info["candidates"]
    record = next((r for r in records if r.get("status") == "live"), records[-1] if records else {})
    candidate = next((c for c in reversed(candidates) if c["version"] == info["live_in"]),
                     candidates[-1] if candidates else {})
    return {"status": info["status"], "source_file": record.get("source_file"),
            "source_line": record.get("source_line"), "batch": record.get("batch"),
            "dvc_md5": record.get("dvc_md5"), "mlflow_run_id": candidate.get("mlflow_run_id"),
            "model_version": candidate.get("model_version"), "live_in": info["live_in"]}


def why_text(out: dict) -> str:
    """``ledit why``'s readable answer."""
    answer = " ".join(out["answer"].split())
    lines = [f"prompt  {out['prompt']}", f"answer  {answer or '(nothing)'}   [adapter set {out['adapter']}]"]
    if not out["firings"]:
        lines.append(f"no edit touched this input (no basis reached weight {out['threshold']})")
        return "\n".join(lines)
    lines.append(f"{len(out['firings'])} edit(s) fired (basis weight >= {out['threshold']}):")
    for f in out["firings"]:
        lines.append(f"  {f['fact_id']}  {f['subject']!r} -> {f['target_new']!r}  weight {f['weight']:.3f}, "
                     f"opened at {f['token']!r} (token {f['position']}, {f['phase']})")
        t = f.get("lineage")
        if t and t["status"] == "unknown":
            lines.append("      no lineage: LEDIT_HOME has never seen this fact")
        elif t:
            lines.append(f"      {t['status']}; source {t['source_file']} line {t['source_line']}; batch {t['batch']} "
                         f"(DVC md5 {t['dvc_md5']}); MLflow run {t['mlflow_run_id']}, registry version "
                         f"{t['model_version']}; live in {t['live_in']}")
    return "\n".join(lines)
