"""The Prefect flows: ``nightly_refresh``, ``manual_edit`` and ``rollback``.

One run, as the pipeline diagram in DESIGN.md draws it::

    inbox ─ingest (validate, dedupe, version with DVC)─> new batches + pending facts
      └─> probe the base ─> train a candidate on top of production ─> evaluate ─> MLflow ─> gate
            ├─pass─> registry version; published/<version>; pointer + alias production
            │        switched under a promotion record (tasks.pipeline.core: recover finishes it)
            └─fail─> rejected version; production unchanged; facts pending with reasons

Each flow takes ``home`` (LEDIT_HOME) and ``params`` (a whole params.yaml as a dict; None
reads params.yaml or $LEDIT_PARAMS), so a deployment, a test and the CLI run the same code.
"""
from __future__ import annotations

import logging
import time

from prefect import flow

from tasks.pipeline import tasks as t
from tasks.pipeline.core import as_home, failure_note, pipeline_lock, pipeline_params
from tasks.pipeline.store import update_record


def _setup(home: str | None, params: dict | None) -> tuple[str, dict]:
    from editing import load_params

    return str(as_home(home).root), (params or load_params())


@flow(name="nightly-refresh", log_prints=True)
def nightly_refresh(home: str | None = None, params: dict | None = None) -> dict:
    """Take in the fact updates of the day and promote them if they pass the gate."""
    home, params = _setup(home, params)
    return refresh(home, params)


@flow(name="manual-edit", log_prints=True)
def manual_edit(facts: list[str] | None = None, dry_run: bool = False, force: bool = False,
                home: str | None = None, params: dict | None = None) -> dict:
    """The same pipeline now, on the given fact files (submitted to the inbox first).

    ``dry_run``: train and evaluate, never promote (facts stay unprocessed for the next run).
    ``force``: run even with nothing new (the latest batch again, and parked pending facts),
    re-applying facts already live, and refreshing the batch cache.
    """
    home, params = _setup(home, params)
    if facts:
        t.submit_facts(list(facts), home)
    return refresh(home, params, dry_run=dry_run, force=force)


@flow(name="rollback", log_prints=True)
def rollback(version: str, home: str | None = None, params: dict | None = None) -> dict:
    """Move production (the published pointer and the MLflow alias) back to ``version``."""
    home, params = _setup(home, params)
    return t.rollback_task(home, params, version)


def refresh(home: str, params: dict, *, dry_run: bool = False, force: bool = False) -> dict:
    seen: dict = {}
    try:
        return _refresh(home, params, seen, dry_run=dry_run, force=force)
    except Exception as exc:       # the error ends with where production and the facts stand
        exc.add_note(failure_note(home, seen.get("production", "?"), exc))
        raise


def _refresh(home: str, params: dict, seen: dict, *, dry_run: bool, force: bool) -> dict:
    timings: dict[str, float] = {}
    progress = t.Progress("ledit pipeline run")
    lap = _Lap(timings)
    with pipeline_lock(as_home(home), float(pipeline_params(params).get("lock_timeout_s", -1))):
        lap("wait_lock")
        seen["production"] = t.load_production_set(home, params)["version"]  # settle a killed run
        t.ingest_facts(home)                                             # validate, dedupe, version
        batches = t.find_new_batches(home, force)
        facts = [t.load_batch.with_options(refresh_cache=force)(home, b["tag"], b["dvc_md5"])
                 for b in batches]                                       # cached on the DVC md5
        plan = t.plan_edits(home, params, batches, facts, force, dry_run)  # + pending retries
        lap("ingest_plan")
        progress(10, f"{len(batches)} new batch(es)")
        if plan["status"] == "nothing-to-do":
            progress(100, "nothing to do")
            return t.report(home, params, plan, timings=timings)
        version = plan["version"]
        run_id = None
        try:
            run_id = t.start_tracking(home, params, version)               # MLflow parent run
            lap("tracking")
            t.probe(home, params, version)                               # the base's answers
            lap("probe")
            progress(15, f"training {version}: {plan['upserts']} upserts, {plan['retracts']} retracts")
            candidate = t.train(home, params, version)                   # extends production
            lap("train")
            progress(60, f"evaluating {version}")
            evaluation = t.evaluate(home, params, version)               # new edits, retention, drift
            lap("evaluate")
            progress(85, f"tracking and gating {version}")
            t.log_evaluation(home, version, run_id, candidate, evaluation)
            verdict = t.gate(home, params, version, run_id, evaluation)
            model_version = t.register(home, params, version, run_id, verdict)
            lap("tracking")
            if verdict["passed"] and not dry_run:
                outcome = t.publish(home, params, version, model_version)
            else:
                outcome = t.reject(home, params, version, model_version, verdict, dry_run)
            lap("publish")
        except BaseException as exc:
            _abandon(home, version, run_id, exc)
            raise
        progress(100, f"{version} {outcome['status']}")
        return t.report(home, params, plan, outcome, run_id, model_version, timings)


def _abandon(home: str, version: str, run_id: str | None, exc: BaseException) -> None:
    """A failed run leaves production as it was; its record and MLflow run say why."""
    from tasks.pipeline.store import production_version, read_promotion

    try:
        promotion = read_promotion(as_home(home))
        if (promotion or {}).get("version") == version or production_version(as_home(home)) == version:
            return        # its promotion began: the next run's recovery finishes it
        update_record(as_home(home), version, status="abandoned",
                      abandoned_reason=f"{type(exc).__name__}: {exc}"[:2000])
        if run_id:
            from tasks.pipeline import tracking
            tracking.log_tags(tracking.client(as_home(home)), run_id,
                              {"ledit.status": "failed", "ledit.error": f"{type(exc).__name__}: {exc}"})
            tracking.end_run(as_home(home), run_id, "FAILED")
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
