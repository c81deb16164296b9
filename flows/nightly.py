"""The Prefect flows: ``nightly_refresh``, ``manual_edit`` and ``rollback``.

One run, as the pipeline diagram in DESIGN.md draws it::

    inbox ─ingest (validate, dedupe, version with DVC)─> new batches + pending facts ─> plan
      └─> probe the base ─> train a candidate on top of production ─> evaluate ─> MLflow ─> gate
            ├─pass─> registry version; published/<version>; pointer + alias production
            │        switched under a promotion record (tasks.pipeline.recovery finishes it)
            └─fail─> rejected version; production unchanged; facts pending with reasons
      └─> report

Each flow takes ``home`` (LEDIT_HOME) and ``params`` (a whole params.yaml as a dict; None
reads params.yaml or $LEDIT_PARAMS), read once into ``Settings``, so a deployment, a test and
the CLI run the same code.
"""
from __future__ import annotations

import logging
import time
from datetime import datetime, timezone

from prefect import flow

from tasks.pipeline import record, recovery
from tasks.pipeline import tasks as t
from tasks.pipeline.state import as_home, pipeline_lock
from tasks.settings import Settings, as_settings


def _setup(home: str | None, params: dict | None) -> tuple[str, Settings]:
    return str(as_home(home).root), as_settings(params)


def _run_name(kind: str):
    """Flow runs named for what and when ("nightly-2026-12-02T0200Z"), not Prefect's random pair."""
    return lambda: f"{kind}-{datetime.now(timezone.utc):%Y-%m-%dT%H%MZ}"


@flow(name="nightly-refresh", flow_run_name=_run_name("nightly"), log_prints=True)
def nightly_refresh(home: str | None = None, params: dict | None = None) -> dict:
    """Take in the fact updates of the day and promote them if they pass the gate."""
    home, settings = _setup(home, params)
    return refresh(home, settings)


@flow(name="manual-edit", flow_run_name=_run_name("manual"), log_prints=True)
def manual_edit(facts: list[str] | None = None, dry_run: bool = False, force: bool = False,
                home: str | None = None, params: dict | None = None) -> dict:
    """The same pipeline now, on the given fact files (submitted to the inbox first).

    ``dry_run``: train and evaluate, never promote (facts stay unprocessed for the next run).
    ``force``: run even with nothing new (the latest batch again, and parked pending facts),
    re-applying facts already live, and refreshing the batch cache.
    """
    home, settings = _setup(home, params)
    if facts:
        t.submit_facts(list(facts), home)
    return refresh(home, settings, dry_run=dry_run, force=force)


@flow(name="rollback", flow_run_name=_run_name("rollback"), log_prints=True)
def rollback(version: str, home: str | None = None, params: dict | None = None) -> dict:
    """Move production (the published pointer and the MLflow alias) back to ``version``."""
    home, settings = _setup(home, params)
    return t.rollback_task(home, settings, version)


def refresh(home: str, settings: Settings, *, dry_run: bool = False, force: bool = False) -> dict:
    seen: dict = {}
    try:
        return _refresh(home, settings, seen, dry_run=dry_run, force=force)
    except Exception as exc:       # the error ends with where production and the facts stand
        exc.add_note(recovery.failure_note(home, seen.get("production", "?"), exc))
        raise


def _refresh(home: str, settings: Settings, seen: dict, *, dry_run: bool, force: bool) -> dict:
    timings: dict[str, float] = {}
    progress = t.Progress("ledit pipeline run")
    lap = _Lap(timings)
    with pipeline_lock(as_home(home), settings.pipeline.lock_timeout_s):
        lap("wait_lock")
        seen["production"] = t.load_production_set(home, settings)["version"]  # settle a killed run
        plan = _ingest_and_plan(home, settings, force, dry_run)
        lap("ingest_plan")
        progress(10, f"{len(plan['batches'])} new batch(es)")
        if plan["status"] == "nothing-to-do":
            progress(100, "nothing to do")
            return t.report(home, settings, plan, timings=timings)
        outcome, run_id, model_version = _candidate(home, settings, plan, progress, lap, dry_run)
        progress(100, f"{plan['version']} {outcome['status']}")
        return t.report(home, settings, plan, outcome, run_id, model_version, timings)


def _ingest_and_plan(home: str, settings: Settings, force: bool, dry_run: bool) -> dict:
    t.ingest_facts(home)                                                 # validate, dedupe, version
    batches = t.find_new_batches(home, force)
    facts = [t.load_batch.with_options(refresh_cache=force)(home, b["tag"], b["dvc_md5"])
             for b in batches]                                           # cached on the DVC md5
    return t.plan_edits(home, settings, batches, facts, force, dry_run)   # + pending retries


def _candidate(home: str, settings: Settings, plan: dict, progress, lap, dry_run: bool) -> tuple:
    """Probe, train, evaluate, track, gate, then publish or reject: ``(outcome, run_id, model_version)``."""
    version = plan["version"]
    run_id = None
    try:
        run_id = t.start_tracking(home, settings, version)               # MLflow parent run
        lap("tracking")
        t.probe(home, settings, version)                                 # the base's answers
        lap("probe")
        progress(15, f"training {version}: {plan['upserts']} upserts, {plan['retracts']} retracts")
        candidate = t.train(home, settings, version)                     # extends production
        lap("train")
        progress(60, f"evaluating {version}")
        evaluation = t.evaluate(home, settings, version)                 # new edits, retention, drift
        lap("evaluate")
        progress(85, f"tracking and gating {version}")
        t.log_evaluation(home, version, run_id, candidate, evaluation)
        verdict = t.gate(home, settings, version, run_id, evaluation)
        model_version = t.register(home, settings, version, run_id, verdict)
        lap("tracking")
        if verdict["passed"] and not dry_run:
            outcome = t.publish(home, settings, version, model_version)
        else:
            outcome = t.reject(home, settings, version, model_version, verdict, dry_run)
        lap("publish")
    except BaseException as exc:
        _abandon(home, version, run_id, exc)
        raise
    return outcome, run_id, model_version


def _abandon(home: str, version: str, run_id: str | None, exc: BaseException) -> None:
    """A failed run leaves production as it was; its record and MLflow run say why."""
    try:
        if recovery.abandon(home, version, exc) and run_id:
            record.mark_failed(home, run_id, exc)
    except Exception as cleanup:   # the next run's recovery settles it
        logging.getLogger("ledit.pipeline").warning(
            "run %s failed (%s) and could not be marked abandoned: %s; the next run settles it",
            version, exc, cleanup)


class _Lap:
    """Seconds per stage, summed, for the run summary and bench/pipeline.py."""

    def __init__(self, into: dict):
        self.into, self.t = into, time.perf_counter()

    def __call__(self, name: str) -> None:
        now = time.perf_counter()
        self.into[name] = round(self.into.get(name, 0.0) + now - self.t, 3)
        self.t = now
