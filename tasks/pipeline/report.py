"""What a run and production look like to a reader: the run's summary (the CLI's JSON) and its
Markdown, the table of its edits, and where production stands. Reads only; changes nothing.
"""
from __future__ import annotations

from tasks.pipeline import store as pub
from tasks.pipeline.gate import GATE_METRICS
from tasks.pipeline.state import as_home, read_state
from tasks.settings import Settings


def production_status(home, settings: Settings) -> dict:
    """Where production stands, for readers (takes no lock, changes nothing)::

        {"pointer": "v3", "alias": "v3", "alias_model_version": "3",
         "promotion": None, "agree": True}

    ``pointer``: the version ``published/production`` names; ``alias``: the version whose
    registry version the MLflow alias ``production`` names (None: no alias yet;
    ``alias_error`` says why when MLflow could not be read); ``promotion``: the switch in
    flight (``state/promotion.json``) or None. The two stores cannot switch atomically: they
    disagree only while ``promotion`` names the switch, until the next run or rollback
    finishes it; a disagreement without a record means someone moved one by hand. Without
    the lock, a read that spans a whole switch may still mix old and new: read again."""
    from mlflow.exceptions import MlflowException

    from tasks.pipeline import tracking

    h = as_home(home)
    before = pub.read_promotion(h)       # read around both stores: a switch begun or ended
    out = {"pointer": pub.production_version(h), "alias": None, "alias_model_version": None}
    try:
        mv = tracking.client(h).get_model_version_by_alias(tracking.registered_model_name(settings),
                                                           tracking.PRODUCTION_ALIAS)
    except MlflowException as exc:
        # no registered model yet, or no alias on it (MLflow says INVALID_PARAMETER_VALUE)
        if exc.error_code != "RESOURCE_DOES_NOT_EXIST" and "not found" not in str(exc):
            out["alias_error"] = f"{type(exc).__name__}: {exc}"
    except Exception as exc:        # an unreachable tracking server should not hide the pointer
        out["alias_error"] = f"{type(exc).__name__}: {exc}"
    else:
        out["alias_model_version"] = str(mv.version)
        out["alias"] = (mv.tags or {}).get("ledit.version") or next(
            (r["version"] for r in pub.list_records(h) if r.get("model_version") == str(mv.version)), None)
    out["promotion"] = before or pub.read_promotion(h)    # meanwhile still counts as in flight
    out["agree"] = "alias_error" not in out and out["pointer"] == out["alias"]
    return out


def run_summary(home, settings: Settings, plan: dict, outcome: dict | None = None, run_id: str | None = None,
                model_version: str | None = None, timings: dict | None = None,
                flow_run_id: str | None = None) -> dict:
    """The run's summary: its verdict and metrics, what changed, where production stands."""
    from tasks.pipeline import tracking

    h = as_home(home)
    version = plan.get("version")
    record = pub.read_record(h, version) if version else {}
    metrics = record.get("metrics") or {}
    verdict = record.get("verdict") or {}
    summary = {
        "status": (outcome or {}).get("status") or plan["status"], "version": version,
        "production_version": pub.production_version(h),
        "mlflow_run_id": run_id, "model_version": model_version, "flow_run_id": flow_run_id,
        "gate": {k: metrics.get(k) for k in GATE_METRICS}, "passed": verdict.get("passed"),
        "reasons": verdict.get("reasons", []), "batches": [b["tag"] for b in plan.get("batches", [])],
        "not_measured": {c["metric"]: c.get("note") or "nothing to measure"
                         for c in verdict.get("checks", []) if c.get("value") is None},
        "changes": record.get("changes"), "skipped": plan.get("skipped", []),
        "pending": len(read_state(h)["pending"]), "published_dir": (outcome or {}).get("published_dir"),
        "production": production_status(h, settings),
        "timings": timings or {}, "home": str(h.root),
        "mlflow_tracking_uri": tracking.tracking_uri(h)}
    summary.update({k: metrics.get(k) for k in GATE_METRICS})
    return summary


def edit_rows(home, plan: dict, status: str) -> list[dict]:
    """One row per edit of the run (with its result and reason) and per skipped fact."""
    version = plan.get("version")
    record = pub.read_record(as_home(home), version) if version else {}
    reasons = record.get("pending_reasons") or {}
    rows = [{"fact_id": e["fact"]["fact_id"], "op": e["fact"].get("op", "upsert"),
             "subject": e["fact"]["subject"], "prompt": e["fact"]["prompt"],
             "target_new": e["fact"].get("target_new"), "batch": e.get("origin", {}).get("batch"),
             "source": f"{e.get('origin', {}).get('source_file')}:{e.get('origin', {}).get('source_line')}",
             "result": status, "reason": reasons.get(e["fact"]["fact_id"], "")}
            for e in record.get("edits", [])]
    rows += [{"fact_id": s["fact_id"], "result": "skipped", "reason": s["reason"]} for s in plan.get("skipped", [])]
    return rows


def summary_markdown(s: dict) -> str:
    lines = [f"## ledit run: **{s['status']}**", ""]
    if s["version"]:
        lines.append(f"- candidate **{s['version']}**, registry version {s['model_version']}, "
                     f"MLflow run `{s['mlflow_run_id']}`")
    lines.append(f"- production now: **{s['production_version'] or 'none'}**")
    lines.append(f"- batches: {', '.join(s['batches']) or 'none new'}; pending facts: {s['pending']}")
    if s.get("changes"):
        c = s["changes"]
        lines.append(f"- edits: {len(c['added'])} added, {len(c['superseded'])} superseded, "
                     f"{len(c['retracted'])} retracted; {len(s['skipped'])} skipped")
    measured = {k: v for k, v in s["gate"].items() if v is not None}
    if measured:
        lines += ["", "| " + " | ".join(measured) + " |", "|" + "---|" * len(measured),
                  "| " + " | ".join(f"{v:.3f}" for v in measured.values()) + " |"]
    if s["reasons"]:
        lines += ["", "**Rejected because**", ""] + [f"- {r}" for r in s["reasons"]]
    if s.get("timings"):
        lines += ["", "timings (s): " + ", ".join(f"{k} {v:.1f}" for k, v in s["timings"].items())]
    return "\n".join(lines) + "\n"


def summary_line(s: dict) -> str:
    """The run in one line, for the flow run's log."""
    line = f"ledit run: {s['status']}"
    if s["version"]:
        line += f" {s['version']} (registry version {s['model_version']}, MLflow run {s['mlflow_run_id']})"
    line += f"; production now {s['production_version'] or 'none'}"
    return line + (f"; rejected because: {'; '.join(s['reasons'])}" if s["reasons"] else "")


def run_description(record: dict, verdict_markdown: str, limit: int = 20) -> str:
    """The MLflow run's description: the gate's table, then the data and the edits with their sources."""
    lines = [verdict_markdown, "**Data** (each batch is a git tag of the data workspace; the md5 is DVC's)", ""]
    lines += [f"- `{b['tag']}`: DVC md5 `{b['dvc_md5']}`" for b in record.get("batches", [])] or ["- none new"]
    edits = record.get("edits", [])
    lines += ["", f"**Edits** ({len(edits)}; first {min(limit, len(edits))}; per-fact results: the artifact "
              "`evaluation/per_fact_table.json`)", "", "| fact | op | subject | new target | source |",
              "|---|---|---|---|---|"]
    for e in edits[:limit]:
        f, o = e["fact"], e.get("origin", {})
        lines.append(f"| `{f['fact_id']}` | {f.get('op', 'upsert')} | {_cell(f['subject'], 40)} | "
                     f"{_cell(f.get('target_new', ''), 40)} | {_cell(o.get('source_file'), 60)}:{o.get('source_line')} |")
    return "\n".join(lines) + "\n"


def changed_markdown(changed: dict, limit: int = 5) -> str:
    """A few of the answers the candidate changed, for the gate's artifact."""
    standing = changed.get("standing") or []
    if not standing:
        return ""
    rows = ["", f"**Standing suite: {len(standing)} answer(s) changed** (first {min(limit, len(standing))})", "",
            "| form | prompt | base | candidate |", "|---|---|---|---|"]
    rows += [f"| {c['form']} | {_cell(c['prompt'])} | {_cell(c['base'])} | {_cell(c['edited'])} |"
             for c in standing[:limit]]
    return "\n".join(rows) + "\n"


def _cell(text: str, width: int = 80) -> str:
    return " ".join(str(text).split()).replace("|", "\\|")[:width]
