"""After a failure: settle what a killed run or rollback left open, move production back on
request, and say where production and the facts stand when a run fails.

What recovery settles is decided from disk (candidate records, the promotion record); the
MLflow side of it (closing runs, tagging registry versions) is ``tasks.pipeline.record``.
"""
from __future__ import annotations

from tasks.pipeline import record
from tasks.pipeline import store as pub
from tasks.pipeline.promote import begin, publish, switch
from tasks.pipeline.state import FINAL, PipelineError, as_home, pipeline_lock, read_state
from tasks.settings import Settings


def recover(home, settings: Settings) -> list[dict]:
    """Settle what a killed run or rollback left open, before anything else (caller holds the
    pipeline lock):

    - a promotion record: the switch it names is finished (pointer, alias, ledger, state),
      whichever step it had reached; a recorded switch is only ever rolled forward;
    - a candidate the pointer names but not promoted (a home from before promotions were
      recorded): promoted the same way;
    - any other open candidate: abandoned (its batches are still unprocessed, so the next
      plan takes its facts again).

    ``settings`` names the registered model whose alias moves.
    Returns what was settled, each with the MLflow run to close."""
    h = as_home(home)
    settled = []
    promotion = pub.read_promotion(h)
    if promotion is not None:
        switch(h, settings, promotion)
        promoted = promotion["kind"] == "promote"
        run = pub.read_record(h, promotion["version"]).get("mlflow_run_id") if promoted else None
        settled.append({"version": promotion["version"], "previous": promotion.get("previous"),
                        "status": "promoted" if promoted else "rolled-back", "mlflow_run_id": run})
    production = pub.production_version(h)
    for record in pub.list_records(h):
        if record["version"] == production and record.get("status") != "promoted":
            publish(h, settings, record["version"])
            settled.append({"version": record["version"], "status": "promoted",
                            "mlflow_run_id": record.get("mlflow_run_id")})
        elif record.get("status") not in FINAL:
            pub.update_record(h, record["version"], status="abandoned",
                              abandoned_reason="the run stopped before a verdict")
            settled.append({"version": record["version"], "status": "abandoned",
                            "mlflow_run_id": record.get("mlflow_run_id")})
    return settled


def settle(home, settings: Settings) -> list[dict]:
    """``recover``, then close in MLflow what it settled. Caller holds the pipeline lock."""
    settled = recover(home, settings)
    record.close_settled(home, settings, settled)
    return settled


def load_production_set(home, settings: Settings) -> dict:
    """Settle what a killed run left open, then load production (checksum verified:
    a corrupted published set stops the run here, before anything changes)."""
    settled = settle(home, settings)
    version, adapter_set = pub.load_production(as_home(home))
    return {"version": version, "live_edits": len(adapter_set.fact_ids) if adapter_set else 0,
            "recovered": settled}


def rollback_production(home, settings: Settings, version: str) -> dict:
    """``rollback`` under the pipeline lock, a switch left in flight finished first; the
    registry version says when and from where it was rolled back to."""
    h = as_home(home)
    with pipeline_lock(h, settings.pipeline.lock_timeout_s):
        settle(h, settings)
        out = rollback(h, version, settings)     # pointer and alias, journaled
        if out.get("model_version"):
            record.tag_version(h, settings, out["model_version"],
                               {"ledit.rolled_back_at": pub.now(), "ledit.rolled_back_from": out["previous"]})
    return out


def rollback(home, version: str, settings: Settings) -> dict:
    """Point production (pointer and alias) back at a promoted ``version`` with the journaled
    switch; the applied ledger follows. Call ``recover`` first: a different switch in flight
    is refused (``PublishError``)."""
    h = as_home(home)
    version = pub.normalise_version(version)
    record = pub.read_record(h, version)
    if record.get("status") != "promoted":
        raise PipelineError(f"{version} was never promoted (status {record.get('status')}); "
                            "only a published version can be production")
    pub.load_published(h, version)     # refuse a missing or corrupted set before switching
    promotion = begin(h, "rollback", version, record.get("model_version"))
    switch(h, settings, promotion)
    return {"version": version, "previous": promotion.get("previous"),
            "model_version": record.get("model_version"), "status": "rolled-back"}


def abandon(home, version: str, exc: BaseException) -> bool:
    """A failed run's candidate is abandoned, its record saying why; False (nothing done)
    where its promotion began: the next run's recovery finishes that."""
    h = as_home(home)
    promotion = pub.read_promotion(h)
    if (promotion or {}).get("version") == version or pub.production_version(h) == version:
        return False
    pub.update_record(h, version, status="abandoned", abandoned_reason=f"{type(exc).__name__}: {exc}"[:2000])
    return True


def failure_note(home, before: str | None, exc: BaseException) -> str:
    """Where production and the waiting facts stand after a failed run, read from disk only
    (never MLflow, which may be what failed); appended to the run's error."""
    import errno
    import shutil

    h = as_home(home)
    try:
        now, switch_ = pub.production_version(h), pub.read_promotion(h)
        if switch_:
            where = (f"a switch of production to {switch_['version']} is in flight (pointer at {now}); "
                     "the next run finishes it")
        elif now == before:
            where = f"production unchanged ({now or 'none yet'})"
        else:
            where = f"production is {now} (was {before})"
        waiting = _waiting(h)
        note = f"ledit: the run failed; {where}; " + (
            f"the facts stay pending for the next run: {'; '.join(waiting)}" if waiting
            else "no facts were waiting")
        if isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT):
            note += f". Disk full: {shutil.disk_usage(h.root).free / 2**20:.0f} MiB free under {h.root}"
        return note
    except Exception as unread:
        return f"ledit: the run failed; where production and the facts stand could not be read: {unread}"


def _waiting(h) -> list[str]:
    """The facts a failed run leaves for the next: an unfinished ingest, batches, pending facts."""
    from tasks.pipeline.batches import unprocessed_batches
    from tasks.stream.ingest import read_journal

    waiting = []
    j = read_journal(h)
    if j and j["phase"] in ("claimed", "staged", "written", "added"):
        waiting.append(f"{j.get('accepted', 'the')} accepted fact(s) in ingest run {j['run_id']}, "
                       f"stopped at '{j['phase']}'")
    batches = [b["tag"] for b in unprocessed_batches(h)]
    if batches:
        waiting.append(f"{len(batches)} unprocessed batch(es) ({', '.join(batches)})")
    pending = len(read_state(h)["pending"])
    if pending:
        waiting.append(f"{pending} pending fact(s)")
    return waiting
