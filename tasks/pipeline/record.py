"""What the pipeline records in MLflow, all in one place: the parent run's tags, params and
inputs; the evaluation; the gate's verdict; the registry version and its tags; and closing
runs when a run ends, fails, or is settled by recovery. ``tasks.pipeline.tracking`` is the
client these go through; this module decides what is written.
"""
from __future__ import annotations

import logging

from tasks.faults import checkpoint
from tasks.pipeline import store as pub
from tasks.pipeline import tracking
from tasks.pipeline.gate import GATE_METRICS, Verdict
from tasks.pipeline.state import as_home
from tasks.settings import Settings

log = logging.getLogger("ledit.pipeline")


def start_tracking(home, settings: Settings, version: str) -> str:
    """The parent run: params, code version, model fingerprint, dataset inputs, lineage tags."""
    from editing import fingerprint
    from tasks.pipeline.train import model_for

    h = as_home(home)
    record = pub.read_record(h, version)
    if record.get("mlflow_run_id"):               # a retry after the run was created
        return record["mlflow_run_id"]
    model, _ = model_for(settings)
    batches = record["batches"]
    tags = {"prefect.flow_run_id": record.get("flow_run_id"), "ledit.version": version,
            "ledit.base_version": record.get("base_version") or "none",
            "ledit.batches": ",".join(b["tag"] for b in batches) or "none (pending retries)",
            "ledit.dvc_md5": ",".join(b["dvc_md5"] for b in batches),
            "ledit.dry_run": str(bool(record.get("dry_run"))).lower(),
            "ledit.status": "training", "ledit.base_model": settings.model.name,
            "ledit.base_fingerprint": fingerprint(model)}
    for e in record["edits"][:settings.pipeline.fact_tags]:   # searchable: tags."fact.<id>" in the UI
        f, o = e["fact"], e.get("origin", {})
        # the source first: the UI cuts long tag values off at the end
        tags[f"fact.{f['fact_id']}"] = (f"{o.get('source_file')}:{o.get('source_line')} "
                                        f"({f.get('op', 'upsert')}, {o.get('batch') or 'pending'})")
    run_id = tracking.start_run(h, settings, run_name=f"{version}", tags=tags)
    cl = tracking.client(h)
    tracking.log_params(cl, run_id, {"base_model": settings.model.name,
                                     "base_fingerprint": tags["ledit.base_fingerprint"]})
    tracking.log_inputs(h, run_id, batches)
    tracking.log_metrics(cl, run_id, {"edits": len(record["edits"]), "batches": len(batches),
                                      "skipped": len(record.get("skipped", [])),
                                      "live_edits_before": len(record.get("live_before", []))})
    pub.update_record(h, version, mlflow_run_id=run_id)
    return run_id


def log_evaluation(home, version: str, run_id: str, candidate: dict, evaluation: dict) -> str:
    """Metrics on the parent run; a nested evaluation run with the per-fact table (Parquet),
    the means and the adapter set as artifacts; the plot of quality across versions."""
    h = as_home(home)
    cl = tracking.client(h)
    training = {f"train_{k}": v for k, v in candidate["training"].items()}
    tracking.log_metrics(cl, run_id, {**evaluation["metrics"], **training})
    child = tracking.start_child_run(h, run_id, f"{version}-evaluation", {"ledit.version": version})
    tracking.log_metrics(cl, child, evaluation["metrics"])
    tracking.log_evaluation(h, child, evaluation, version)
    tracking.end_run(h, child)
    tracking.log_evaluation(h, run_id, evaluation, version)
    tracking.log_adapter_set(h, run_id, candidate["dir"])
    tracking.log_history_plot(h, run_id, pub.list_records(h))
    checkpoint("after_mlflow_log")
    return child


def log_verdict(home, run_id: str, verdict: Verdict, version: str) -> None:
    """The gate's verdict as tags (each check, the first facts' reasons) and its thresholds,
    and as the run's description, the first thing on its page: the verdict with every check,
    the batches with their DVC md5 and the edits with their sources."""
    from tasks.pipeline.gate import markdown
    from tasks.pipeline.report import run_description

    h = as_home(home)
    cl = tracking.client(h)
    # a tag holds 8,000 characters: ten facts' reasons here, 100 in gate.fact.* tags, all in per_fact
    shown = Verdict(verdict.passed, verdict.checks, verdict.reasons, dict(list(verdict.fact_reasons.items())[:10]))
    description = run_description(pub.read_record(h, version), markdown(shown, version))
    tracking.log_tags(cl, run_id, {"mlflow.note.content": description,
        "gate": "passed" if verdict.passed else "rejected", "gate.reasons": "; ".join(verdict.reasons) or "none",
        **{f"gate.check.{c.metric}": f"{'pass' if c.passed else 'fail'}: {c.describe()}" for c in verdict.checks},
        **{f"gate.fact.{k}": why for k, why in list(verdict.fact_reasons.items())[:100]}})
    tracking.log_metrics(cl, run_id, {f"gate.threshold.{c.metric}": c.threshold for c in verdict.checks})


def register(home, settings: Settings, version: str, run_id: str, verdict: dict) -> str:
    """One registry version per candidate (rejected ones too), tagged with its lineage."""
    h = as_home(home)
    record = pub.read_record(h, version)
    if record.get("model_version"):
        return record["model_version"]
    source, model_id = _pyfunc_source(h, settings, run_id, record, version)
    source = source or f"runs:/{run_id}/{tracking.ADAPTER_ARTIFACT}"
    changes = record["changes"]
    tags = {"ledit.version": version, "ledit.base_version": record.get("base_version") or "none",
            "ledit.batches": ",".join(b["tag"] for b in record["batches"]),
            "ledit.dvc_md5": ",".join(b["dvc_md5"] for b in record["batches"]),
            "ledit.facts_added": ",".join(changes["added"]),
            "ledit.facts_retracted": ",".join(changes["retracted"]),
            "ledit.facts_superseded": ",".join(changes["superseded"]),
            "ledit.mlflow_run_id": run_id, "prefect.flow_run_id": record.get("flow_run_id"),
            "gate": "passed" if verdict["passed"] else "rejected"}
    tags.update({f"gate.{k}": record["metrics"].get(k) for k in GATE_METRICS})
    model_version = tracking.register_candidate(
        h, settings, run_id, source=source, tags=tags, model_id=model_id,
        description=f"ledit adapter set {version}: {len(changes['added'])} new edits; gate "
                    + ("passed" if verdict["passed"] else "rejected: " + "; ".join(verdict.get("reasons") or [])))
    pub.update_record(h, version, model_version=model_version)
    checkpoint("after_register")
    return model_version


def _pyfunc_source(h, settings: Settings, run_id: str, record: dict,
                   version: str) -> tuple[str | None, str | None]:
    """The chat model (tasks.pipeline.chat) as the version's source, so that
    ``mlflow models serve -m models:/baft-adapter-set@production`` answers chat requests;
    the prompt model (tasks.pipeline.serving) is logged alongside in the run.
    Returns ``(model_uri, model_id)``, or ``(None, None)`` where it is switched off
    (``pipeline.log_pyfunc``) or not available."""
    if not settings.pipeline.log_pyfunc:
        return None, None
    try:
        from tasks.pipeline.chat import log_chat_model
        from tasks.pipeline.serving import log_pyfunc_model
    except ImportError:
        return None, None
    import mlflow

    uri = tracking.tracking_uri(h)
    mlflow.set_tracking_uri(uri)
    mlflow.set_registry_uri(uri)
    # log_pyfunc_model logs into the active (fluent) run: resume ours for that call only
    with mlflow.start_run(run_id=run_id):
        log_pyfunc_model(record["candidate_dir"], settings.model.name, dtype=settings.model.dtype)
        info = log_chat_model(record["candidate_dir"], settings.model.name, dtype=settings.model.dtype,
                              adapter_version=version, fired_weight=settings.audit.fired_weight,
                              serving=settings.serving, trace_experiment=settings.pipeline.experiment)
    tracking.client(h).update_run(run_id, status="RUNNING")    # start_run's exit finished it
    return str(info.model_uri), getattr(info, "model_id", None)


def tag_version(home, settings: Settings, model_version: str, tags: dict) -> None:
    """Tags on a registry version: a rejection's or dry run's verdict, a rollback's origin."""
    tracking.set_version_tags(as_home(home), settings, model_version, tags)


def tag_rejected(home, settings: Settings, model_version: str, outcome: dict, dry_run: bool) -> None:
    """A rejected (or dry-run) candidate's registry version says so, and why."""
    reasons = "; ".join(outcome["reasons"]) or ("dry run" if dry_run else "rejected")
    tag_version(home, settings, model_version, {"gate": outcome["status"], "gate.reasons": reasons})


def close_settled(home, settings: Settings, settled: list[dict]) -> None:
    """The MLflow side of what recovery settled: an abandoned candidate's registry version
    says it never reached production; each settled run is closed. Failures only warn: the
    candidate records are what counts."""
    h = as_home(home)
    for s in settled:
        model_version = pub.read_record(h, s["version"]).get("model_version")
        if s["status"] == "abandoned" and model_version:
            # registered before the kill with its gate verdict: say it never reached production
            try:
                tag_version(h, settings, model_version, {
                    "gate": "abandoned", "gate.reasons": "the run stopped before a verdict took effect"})
            except Exception as exc:
                log.warning("could not tag registry version %s of %s: %s", model_version, s["version"], exc)
        if s.get("mlflow_run_id"):
            try:
                tracking.end_run(h, s["mlflow_run_id"], "FINISHED" if s["status"] == "promoted" else "KILLED")
            except Exception as exc:   # the run may be gone; the record is what counts
                log.warning("could not close MLflow run %s of %s: %s", s["mlflow_run_id"], s["version"], exc)


def close_run(home, run_id: str, status: str, timings: dict | None) -> None:
    """The run's end: its final status and the seconds per stage."""
    h = as_home(home)
    cl = tracking.client(h)
    tracking.log_tags(cl, run_id, {"ledit.status": status})
    tracking.log_metrics(cl, run_id, {f"time_{k}": v for k, v in (timings or {}).items()})
    tracking.end_run(h, run_id)


def mark_failed(home, run_id: str, exc: BaseException) -> None:
    h = as_home(home)
    tracking.log_tags(tracking.client(h), run_id,
                      {"ledit.status": "failed", "ledit.error": f"{type(exc).__name__}: {exc}"})
    tracking.end_run(h, run_id, "FAILED")
