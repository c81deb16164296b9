"""Prefect tasks for the pipeline: one line per step (the steps are plain functions in the
stage modules), plus the Prefect UI artifacts.

Task inputs are small and plain (the home path, settings, a version string, dicts of numbers):
the model stays in the process (``tasks.pipeline.train.model_for``) and candidates stay on disk, so
Prefect never hashes or pickles a model. The only cache is on a batch's facts, keyed on its
DVC md5 (content-addressed, so a cached result can never be stale). Retries where a retry
helps: MLflow and publishing (idempotent) and ingest (journal-driven); not training, whose
failures are not transient.
"""
from __future__ import annotations

import logging

from prefect import task
from prefect.cache_policies import NO_CACHE

from tasks.pipeline import batches as batch_reading, evaluate as evaluating, plan as planning
from tasks.pipeline import promote, record, recovery, report as reporting, train as training
from tasks.pipeline.gate import Verdict, markdown as gate_markdown
from tasks.settings import Settings
from tasks.stream.tasks import ingest_task as ingest_facts, submit_task as submit_facts  # noqa: F401

QUIET = {"cache_policy": NO_CACHE, "persist_result": False}
log = logging.getLogger("ledit.pipeline")


def _flow_run_id() -> str | None:
    try:
        from prefect.runtime import flow_run
        return str(flow_run.id) if flow_run.id else None
    except Exception:          # outside a flow run
        return None


def _md5_key(context, parameters) -> str:
    return f"ledit-batch-facts-{parameters['dvc_md5']}"


# -- facts and plan ------------------------------------------------------------------------------
find_new_batches = task(name="find-new-batches", **QUIET)(batch_reading.unprocessed_batches)
# a batch's facts, cached on the DVC md5, i.e. on the content itself
load_batch = task(name="load-batch-facts", cache_key_fn=_md5_key, persist_result=True, retries=1,
                  retry_delay_seconds=5, tags=["dvc"])(batch_reading.batch_edits)
load_production_set = task(name="load-production-set", **QUIET)(recovery.load_production_set)


@task(name="plan-edits", **QUIET)
def plan_edits(home: str, settings: Settings, batches: list[dict], batch_items: list[list[dict]],
               force: bool = False, dry_run: bool = False) -> dict:
    return planning.plan(home, settings, batches, batch_items, force=force, dry_run=dry_run,
                         flow_run_id=_flow_run_id())


# -- probe, train, evaluate, track ---------------------------------------------------------------
start_tracking = task(name="start-mlflow-run", retries=2, retry_delay_seconds=3, **QUIET)(record.start_tracking)
probe = task(name="probe-base", **QUIET)(evaluating.probe)
train = task(name="train-candidate", **QUIET)(training.train_candidate)
evaluate = task(name="evaluate-candidate", **QUIET)(evaluating.evaluate_candidate)
log_evaluation = task(name="log-evaluation", retries=2, retry_delay_seconds=3, **QUIET)(record.log_evaluation)
register = task(name="register-candidate", retries=1, retry_delay_seconds=3, **QUIET)(record.register)


# -- gate, then publish or reject ----------------------------------------------------------------
@task(name="gate", **QUIET)
def gate(home: str, settings: Settings, version: str, run_id: str, evaluation: dict) -> dict:
    """Judge the candidate; the verdict goes to MLflow tags and a Markdown artifact."""
    verdict = promote.judge(home, settings, version, evaluation)
    record.log_verdict(home, run_id, Verdict.from_dict(verdict), version)
    _artifact("markdown", key="ledit-gate", description=f"gate verdict for {version}",
              markdown=gate_markdown(Verdict.from_dict(verdict), version)
              + reporting.changed_markdown(evaluation.get("changed") or {}))
    return verdict


@task(name="publish", retries=2, retry_delay_seconds=3, **QUIET)
def publish(home: str, settings: Settings, version: str, model_version: str) -> dict:
    """``model_version`` only orders the tasks: ``register`` wrote it into the record."""
    return promote.publish(home, settings, version)


@task(name="reject", retries=1, **QUIET)
def reject(home: str, settings: Settings, version: str, model_version: str, verdict: dict,
           dry_run: bool = False) -> dict:
    out = promote.reject(home, version, verdict, dry_run=dry_run)
    record.tag_rejected(home, settings, model_version, out, dry_run)
    return out


@task(name="rollback", retries=1, **QUIET)
def rollback_task(home: str, settings: Settings, version: str) -> dict:
    out = recovery.rollback_production(home, settings, version)
    _artifact("markdown", key="ledit-rollback",
              markdown=f"### Rollback\n\nproduction: **{out['previous']} -> {out['version']}** "
                       f"(registry version {out.get('model_version')})\n")
    return out


# -- the run's report ------------------------------------------------------------------------------
@task(name="report", retries=1, **QUIET)
def report(home: str, settings: Settings, plan: dict, outcome: dict | None = None,
           run_id: str | None = None, model_version: str | None = None,
           timings: dict | None = None) -> dict:
    """The run's summary (the CLI's JSON), a Markdown summary and a table of the edits in the
    Prefect UI; closes the MLflow run."""
    summary = reporting.run_summary(home, settings, plan, outcome, run_id, model_version, timings, _flow_run_id())
    if run_id:
        record.close_run(home, run_id, summary["status"], timings)
    _artifact("markdown", key="ledit-run-summary", markdown=reporting.summary_markdown(summary),
              description=f"ledit pipeline run: {summary['status']}")
    _log_line(reporting.summary_line(summary))
    rows = reporting.edit_rows(home, plan, summary["status"])
    if rows:
        _artifact("table", key="ledit-edits", table=rows, description=f"edits of {plan.get('version') or 'this run'}")
    return summary


# -- Prefect UI helpers (never fail a run for the UI's sake) ------------------------------------
def _artifact(kind: str, **kwargs):
    from prefect import artifacts

    try:
        return getattr(artifacts, f"create_{kind}_artifact")(**kwargs)
    except Exception as exc:
        log.warning("Prefect %s artifact %r not created: %s", kind, kwargs.get("key"), exc)
        return None


def _log_line(text: str) -> None:
    """One line in the flow run's log, where the Prefect UI shows it."""
    from prefect.logging import get_run_logger

    try:
        get_run_logger().info(text)
    except Exception:          # outside a flow or task run: the summary artifact still says it
        log.info(text)


class Progress:
    """A Prefect progress artifact the flow moves along its steps."""

    def __init__(self, description: str):
        self.id = _artifact("progress", progress=0.0, key="ledit-progress", description=description)

    def __call__(self, percent: float, description: str | None = None) -> None:
        if self.id is None:
            return
        from prefect.artifacts import update_progress_artifact

        try:
            update_progress_artifact(self.id, progress=float(percent), description=description)
        except Exception as exc:
            log.warning("Prefect progress artifact not updated: %s", exc)
