"""Prefect tasks for the pipeline: thin wrappers over ``tasks.pipeline.core`` (the steps),
``tasks.pipeline.tracking`` (MLflow) and ``tasks.pipeline.store``, plus the Prefect UI artifacts.

Task inputs are small and plain (the home path, params, a version string, dicts of numbers):
the model stays in the process (``tasks.pipeline.core.model_for``) and candidates stay on disk, so
Prefect never hashes or pickles a model. The only cache is on a batch's facts, keyed on its
DVC md5 (content-addressed, so a cached result can never be stale). Retries where a retry
helps: MLflow and publishing (idempotent) and ingest (journal-driven); not training, whose
failures are not transient.
"""
from __future__ import annotations

import logging
import time

from prefect import task
from prefect.cache_policies import NO_CACHE

from tasks.pipeline import core as steps
from tasks.pipeline import store as pub
from tasks.pipeline import tracking
from tasks.faults import checkpoint
from tasks.pipeline.gate import GATE_METRICS, Verdict, markdown as gate_markdown
from tasks.stream.tasks import ingest_task as ingest_facts, submit_task as submit_facts  # noqa: F401

QUIET = {"cache_policy": NO_CACHE, "persist_result": False}
log = logging.getLogger("ledit.pipeline")


def _flow_run_id() -> str | None:
    try:
        from prefect.runtime import flow_run
        return str(flow_run.id) if flow_run.id else None
    except Exception:          # outside a flow run
        return None


# -- facts ------------------------------------------------------------------------------------
@task(name="find-new-batches", **QUIET)
def find_new_batches(home: str, force: bool = False) -> list[dict]:
    return steps.unprocessed_batches(home, force=force)


def _md5_key(context, parameters) -> str:
    return f"ledit-batch-facts-{parameters['dvc_md5']}"


@task(name="load-batch-facts", cache_key_fn=_md5_key, persist_result=True, retries=1,
      retry_delay_seconds=5, tags=["dvc"])
def load_batch(home: str, tag: str, dvc_md5: str) -> list[dict]:
    """A batch's facts; cached on the DVC md5, i.e. on the content itself."""
    return steps.batch_edits(home, tag, dvc_md5)


def _recover(home: str, params: dict) -> list[dict]:
    """``steps.recover`` (finishes a switch in flight, pointer and alias both), then closes
    the MLflow runs of what it settled. Caller holds the pipeline lock."""
    settled = steps.recover(home, params)
    h = steps.as_home(home)
    for s in settled:
        model_version = pub.read_record(h, s["version"]).get("model_version")
        if s["status"] == "abandoned" and model_version:
            # registered before the kill with its gate verdict: say it never reached production
            try:
                tracking.set_version_tags(h, params, model_version, {
                    "gate": "abandoned", "gate.reasons": "the run stopped before a verdict took effect"})
            except Exception as exc:
                log.warning("could not tag registry version %s of %s: %s", model_version, s["version"], exc)
        if s.get("mlflow_run_id"):
            try:
                tracking.end_run(h, s["mlflow_run_id"],
                                 "FINISHED" if s["status"] == "promoted" else "KILLED")
            except Exception as exc:   # the run may be gone; the record is what counts
                log.warning("could not close MLflow run %s of %s: %s", s["mlflow_run_id"], s["version"], exc)
    return settled


@task(name="load-production-set", **QUIET)
def load_production_set(home: str, params: dict) -> dict:
    """Settle what a killed run left open, then load production (checksum verified:
    a corrupted published set stops the run here, before anything changes)."""
    settled = _recover(home, params)
    version, adapter_set = pub.load_production(steps.as_home(home))
    return {"version": version, "live_edits": len(adapter_set.fact_ids) if adapter_set else 0,
            "recovered": settled}


@task(name="plan-edits", **QUIET)
def plan_edits(home: str, params: dict, batches: list[dict], batch_items: list[list[dict]],
               force: bool = False, dry_run: bool = False) -> dict:
    return steps.plan(home, params, batches, batch_items, force=force, dry_run=dry_run,
                      flow_run_id=_flow_run_id())


# -- MLflow -------------------------------------------------------------------------------------
@task(name="start-mlflow-run", retries=2, retry_delay_seconds=3, **QUIET)
def start_tracking(home: str, params: dict, version: str) -> str:
    """The parent run: params, code version, model fingerprint, dataset inputs, lineage tags."""
    from editing import fingerprint

    h = steps.as_home(home)
    record = pub.read_record(h, version)
    if record.get("mlflow_run_id"):               # a retry after the run was created
        return record["mlflow_run_id"]
    model, _ = steps.model_for(params)
    batches = record["batches"]
    tags = {"prefect.flow_run_id": _flow_run_id(), "ledit.version": version,
            "ledit.base_version": record.get("base_version") or "none",
            "ledit.batches": ",".join(b["tag"] for b in batches) or "none (pending retries)",
            "ledit.dvc_md5": ",".join(b["dvc_md5"] for b in batches),
            "ledit.dry_run": str(bool(record.get("dry_run"))).lower(),
            "ledit.status": "training", "ledit.base_model": params["model"]["name"],
            "ledit.base_fingerprint": fingerprint(model)}
    limit = int(steps.pipeline_params(params).get("fact_tags", 200))
    for e in record["edits"][:limit]:   # searchable: tags."fact.<id>" in the MLflow UI
        f, o = e["fact"], e.get("origin", {})
        tags[f"fact.{f['fact_id']}"] = (f"{f.get('op', 'upsert')} from {o.get('batch') or 'pending'} "
                                        f"{o.get('source_file')}:{o.get('source_line')}")
    run_id = tracking.start_run(h, params, run_name=f"{version}", tags=tags)
    cl = tracking.client(h)
    tracking.log_params(cl, run_id, {"base_model": params["model"]["name"],
                                     "base_fingerprint": tags["ledit.base_fingerprint"]})
    tracking.log_inputs(h, run_id, batches)
    tracking.log_metrics(cl, run_id, {"edits": len(record["edits"]), "batches": len(batches),
                                      "skipped": len(record.get("skipped", [])),
                                      "live_edits_before": len(record.get("live_before", []))})
    pub.update_record(h, version, mlflow_run_id=run_id)
    return run_id


@task(name="log-evaluation", retries=2, retry_delay_seconds=3, **QUIET)
def log_evaluation(home: str, version: str, run_id: str, candidate: dict, evaluation: dict) -> str:
    """Metrics on the parent run; a nested evaluation run with the per-fact table (Parquet),
    the means and the adapter set as artifacts; the plot of quality across versions."""
    h = steps.as_home(home)
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


@task(name="register-candidate", retries=1, retry_delay_seconds=3, **QUIET)
def register(home: str, params: dict, version: str, run_id: str, verdict: dict) -> str:
    """One registry version per candidate (rejected ones too), tagged with its lineage."""
    h = steps.as_home(home)
    record = pub.read_record(h, version)
    if record.get("model_version"):
        return record["model_version"]
    source, model_id = _pyfunc_source(h, params, run_id, record)
    source = source or f"runs:/{run_id}/{tracking.ADAPTER_ARTIFACT}"
    tags = {"ledit.version": version, "ledit.base_version": record.get("base_version") or "none",
            "ledit.batches": ",".join(b["tag"] for b in record["batches"]),
            "ledit.dvc_md5": ",".join(b["dvc_md5"] for b in record["batches"]),
            "ledit.facts_added": ",".join(record["changes"]["added"]),
            "ledit.facts_retracted": ",".join(record["changes"]["retracted"]),
            "ledit.facts_superseded": ",".join(record["changes"]["superseded"]),
            "ledit.mlflow_run_id": run_id, "prefect.flow_run_id": record.get("flow_run_id"),
            "gate": "passed" if verdict["passed"] else "rejected"}
    tags.update({f"gate.{k}": record["metrics"].get(k) for k in GATE_METRICS})
    model_version = tracking.register_candidate(
        h, params, run_id, source=source, tags=tags, model_id=model_id,
        description=f"ledit adapter set {version}: {len(record['changes']['added'])} new edits")
    pub.update_record(h, version, model_version=model_version)
    checkpoint("after_register")
    return model_version


def _pyfunc_source(h, params, run_id, record) -> tuple[str | None, str | None]:
    """The pyfunc model (tasks.pipeline.serving) as the version's source, so that
    ``mlflow models serve -m models:/baft-adapter-set@production`` answers prompts.
    Returns ``(model_uri, model_id)``, or ``(None, None)`` where it is switched off
    (params ``pipeline.log_pyfunc``) or not available."""
    if not steps.pipeline_params(params).get("log_pyfunc", True):
        return None, None
    try:
        from tasks.pipeline.serving import log_pyfunc_model
    except ImportError:
        return None, None
    import mlflow

    uri = tracking.tracking_uri(h)
    mlflow.set_tracking_uri(uri)
    mlflow.set_registry_uri(uri)
    # log_pyfunc_model logs into the active (fluent) run: resume ours for that call only
    with mlflow.start_run(run_id=run_id):
        info = log_pyfunc_model(record["candidate_dir"], params["model"]["name"],
                                dtype=str(params["model"].get("dtype") or "float32"))
    tracking.client(h).update_run(run_id, status="RUNNING")    # start_run's exit finished it
    return str(info.model_uri), getattr(info, "model_id", None)


# -- probe, train, evaluate, gate, publish, reject ---------------------------------------------
@task(name="probe-base", **QUIET)
def probe(home: str, params: dict, version: str) -> dict:
    """The base's answers to the standing suite (recorded and versioned once per base model)
    and to the candidate's subject probes, before training."""
    return steps.probe(home, params, version)


@task(name="train-candidate", **QUIET)
def train(home: str, params: dict, version: str) -> dict:
    return steps.train_candidate(home, params, version)


@task(name="evaluate-candidate", **QUIET)
def evaluate(home: str, params: dict, version: str) -> dict:
    return steps.evaluate_candidate(home, params, version)


@task(name="gate", **QUIET)
def gate(home: str, params: dict, version: str, run_id: str, evaluation: dict) -> dict:
    """Judge the candidate; the verdict goes to MLflow tags and a Markdown artifact."""
    verdict = steps.judge(home, params, version, evaluation)
    v = Verdict.from_dict(verdict)
    cl = tracking.client(steps.as_home(home))
    tracking.log_tags(cl, run_id, {
        "gate": "passed" if v.passed else "rejected", "gate.reasons": "; ".join(v.reasons) or "none",
        **{f"gate.check.{c.metric}": f"{'pass' if c.passed else 'fail'}: {c.describe()}" for c in v.checks},
        **{f"gate.fact.{k}": why for k, why in list(v.fact_reasons.items())[:100]}})
    tracking.log_metrics(cl, run_id, {f"gate.threshold.{c.metric}": c.threshold for c in v.checks})
    _artifact("markdown", key="ledit-gate", description=f"gate verdict for {version}",
              markdown=gate_markdown(v, version) + changed_markdown(evaluation.get("changed") or {}))
    return verdict


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


@task(name="publish", retries=2, retry_delay_seconds=3, **QUIET)
def publish(home: str, params: dict, version: str, model_version: str) -> dict:
    """published/<version>, then the journaled switch of the production pointer and the
    registry alias, the applied ledger. The alias goes to the candidate record's
    ``model_version`` (``register`` wrote it there; the argument orders the tasks)."""
    return steps.publish(home, params, version)


@task(name="reject", retries=1, **QUIET)
def reject(home: str, params: dict, version: str, model_version: str, verdict: dict,
           dry_run: bool = False) -> dict:
    out = steps.reject(home, params, version, verdict, dry_run=dry_run)
    reasons = "; ".join(out["reasons"]) or ("dry run" if dry_run else "rejected")
    tracking.set_version_tags(steps.as_home(home), params, model_version,
                              {"gate": out["status"], "gate.reasons": reasons})
    return out


@task(name="rollback", retries=1, **QUIET)
def rollback_task(home: str, params: dict, version: str) -> dict:
    h = steps.as_home(home)
    with steps.pipeline_lock(h, float(steps.pipeline_params(params).get("lock_timeout_s", -1))):
        _recover(home, params)            # a switch left in flight is finished first
        out = steps.rollback(h, version, params)     # pointer and alias, journaled
        if out.get("model_version"):
            tracking.set_version_tags(h, params, out["model_version"],
                                      {"ledit.rolled_back_at": pub.now(),
                                       "ledit.rolled_back_from": out["previous"]})
    _artifact("markdown", key="ledit-rollback",
              markdown=f"### Rollback\n\nproduction: **{out['previous']} -> {out['version']}** "
                       f"(registry version {out.get('model_version')})\n")
    return out


# -- the run's report -------------------------------------------------------------------------
@task(name="report", retries=1, **QUIET)
def report(home: str, params: dict, plan: dict, outcome: dict | None = None,
           run_id: str | None = None, model_version: str | None = None,
           timings: dict | None = None) -> dict:
    """The run's summary (the CLI's JSON), a Markdown summary and a table of the edits in the
    Prefect UI; closes the MLflow run."""
    h = steps.as_home(home)
    version = plan.get("version")
    record = pub.read_record(h, version) if version else {}
    metrics = record.get("metrics") or {}
    verdict = record.get("verdict") or {}
    status = (outcome or {}).get("status") or plan["status"]
    summary = {
        "status": status, "version": version, "production_version": pub.production_version(h),
        "mlflow_run_id": run_id, "model_version": model_version, "flow_run_id": _flow_run_id(),
        "gate": {k: metrics.get(k) for k in GATE_METRICS}, "passed": verdict.get("passed"),
        "reasons": verdict.get("reasons", []), "batches": [b["tag"] for b in plan.get("batches", [])],
        "not_measured": {c["metric"]: c.get("note") or "nothing to measure"
                         for c in verdict.get("checks", []) if c.get("value") is None},
        "changes": record.get("changes"), "skipped": plan.get("skipped", []),
        "pending": len(steps.read_state(h)["pending"]), "published_dir": (outcome or {}).get("published_dir"),
        "production": steps.production_status(h, params),
        "timings": timings or {}, "home": str(h.root),
        "mlflow_tracking_uri": tracking.tracking_uri(h)}
    summary.update({k: metrics.get(k) for k in GATE_METRICS})
    if run_id:
        cl = tracking.client(h)
        tracking.log_tags(cl, run_id, {"ledit.status": status})
        tracking.log_metrics(cl, run_id, {f"time_{k}": v for k, v in (timings or {}).items()})
        tracking.end_run(h, run_id)
    _artifact("markdown", key="ledit-run-summary", markdown=summary_markdown(summary),
              description=f"ledit pipeline run: {status}")
    rows = [{"fact_id": e["fact"]["fact_id"], "op": e["fact"].get("op", "upsert"),
             "subject": e["fact"]["subject"], "prompt": e["fact"]["prompt"],
             "target_new": e["fact"].get("target_new"), "batch": e.get("origin", {}).get("batch"),
             "source": f"{e.get('origin', {}).get('source_file')}:{e.get('origin', {}).get('source_line')}",
             "result": status, "reason": (record.get("pending_reasons") or {}).get(e["fact"]["fact_id"], "")}
            for e in record.get("edits", [])]
    rows += [{"fact_id": s["fact_id"], "result": "skipped", "reason": s["reason"]} for s in plan.get("skipped", [])]
    if rows:
        _artifact("table", key="ledit-edits", table=rows, description=f"edits of {version or 'this run'}")
    return summary


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


# -- Prefect UI helpers (never fail a run for the UI's sake) ------------------------------------
def _artifact(kind: str, **kwargs):
    from prefect import artifacts

    try:
        return getattr(artifacts, f"create_{kind}_artifact")(**kwargs)
    except Exception as exc:
        log.warning("Prefect %s artifact %r not created: %s", kind, kwargs.get("key"), exc)
        return None


class Progress:
    """A Prefect progress artifact the flow moves along its steps."""

    def __init__(self, description: str):
        self.id = _artifact("progress", progress=0.0, key="ledit-progress", description=description)
        self.t0 = time.perf_counter()

    def __call__(self, percent: float, description: str | None = None) -> None:
        if self.id is None:
            return
        from prefect.artifacts import update_progress_artifact

        try:
            update_progress_artifact(self.id, progress=float(percent), description=description)
        except Exception as exc:
            log.warning("Prefect progress artifact not updated: %s", exc)
