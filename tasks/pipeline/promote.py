"""The verdict and what follows it: judge a candidate, then publish it or reject it.

Production is named twice: by ``published/production`` and by the MLflow alias
``production``. Two stores cannot switch atomically, so a promotion or rollback is a
journaled switch (``switch``): a record in ``state/promotion.json`` first, then the pointer,
the alias, the applied ledger and the state, then the record is removed. The pointer and the
alias may disagree only while that record names the switch; ``tasks.pipeline.recovery``,
which the next run and every rollback call first, finishes it.
"""
from __future__ import annotations

from tasks.faults import checkpoint
from tasks.pipeline import store as pub
from tasks.pipeline.plan import live_facts
from tasks.pipeline.state import as_home, close_batches, read_state, write_state
from tasks.settings import Settings
from tasks.stream.workspace import Home


def judge(home, settings: Settings, version: str, evaluation: dict) -> dict:
    """The gate's verdict on the candidate (retracted edits are not judged), into its record."""
    from tasks.pipeline.gate import gate

    verdict = gate(evaluation["metrics"], [r for r in evaluation["per_fact"] if r["kind"] != "retracted"],
                   settings.gate, evaluation.get("notes"))
    pub.update_record(as_home(home), version, verdict=verdict.to_dict())
    return verdict.to_dict()


def publish(home, settings: Settings, version: str) -> dict:
    """Copy the candidate to ``published/<version>``, then promote it with the journaled switch:
    pointer, MLflow alias, applied ledger, state.

    Every step is idempotent, so a publish interrupted anywhere is finished by redoing it; a
    killed one is finished by ``recover`` from the promotion record."""
    h = as_home(home)
    record = pub.read_record(h, version)
    path = pub.publish_set(h, version, pub.candidate_dir(h, version))
    switch(h, settings, begin(h, "promote", version, record.get("model_version")))
    return {"version": version, "published_dir": str(path), "status": "promoted"}


def begin(h: Home, kind: str, version: str, model_version: str | None) -> dict:
    """Record a switch of production (``kind`` 'promote' or 'rollback') before making it."""
    previous = pub.production_version(h)
    try:
        previous_mv = pub.read_record(h, previous).get("model_version") if previous else None
    except pub.PublishError:        # a set published without a record: nothing to name
        previous_mv = None
    return pub.begin_promotion(h, {"kind": kind, "version": version, "model_version": model_version,
                                   "previous": previous, "previous_model_version": previous_mv,
                                   "started_at": pub.now()})


def switch(h: Home, settings: Settings, promotion: dict) -> None:
    """Carry out a recorded switch of production; idempotent, so redone from any point.

    Order: pointer, alias, then the ledger and the state, then the record goes. A crash
    between the pointer and the alias leaves them disagreeing, with the record naming it."""
    from tasks.pipeline import tracking

    version, kind = promotion["version"], promotion["kind"]
    reason = "promoted" if kind == "promote" else f"rollback from {promotion.get('previous')}"
    pub.switch_production(h, version, reason=reason)
    checkpoint("after_pointer")
    if promotion.get("model_version"):
        tracking.set_production_alias(h, settings, promotion["model_version"])
    record = pub.read_record(h, version)
    if kind == "promote":
        checkpoint("after_publish")
        _settle_promoted(h, record)
    else:   # a rollback: the ledger follows production, the pending facts stay as they are
        _sync_ledger(h, live_facts(h, promotion.get("previous")), record["live_after"], version,
                     record.get("mlflow_run_id"))
    pub.end_promotion(h, promotion)


def _settle_promoted(h: Home, record: dict) -> None:
    """Mark the candidate's edits applied and its batches processed, and the record promoted."""
    version = record["version"]
    _sync_ledger(h, record["live_before"], record["live_after"], version, record.get("mlflow_run_id"))
    state = read_state(h)
    for e in record["edits"]:
        state["pending"].pop(e["fact"]["fact_id"], None)
    close_batches(state, record["batches"], record.get("cancelled", []))
    pub.update_record(h, version, status="promoted", published_dir=str(pub.published_dir(h, version)),
                      published_at=record.get("published_at") or pub.now())
    write_state(h, state)


def _sync_ledger(h: Home, before: list[dict], after: list[dict], version: str, run: str | None) -> None:
    """The applied ledger follows production: live facts applied, removed ones retracted."""
    from tasks.stream import ledger

    live = {x["fact"]["fact_id"] for x in after}
    edits = [x["fact"] for x in after]
    edits += [{"fact_id": x["fact"]["fact_id"], "op": "retract"} for x in before
              if x["fact"]["fact_id"] not in live]
    if edits:
        ledger.mark_applied(h, edits, run=run, adapter=version)


def reject(home, version: str, verdict: dict, *, dry_run: bool = False) -> dict:
    """Production unchanged; the candidate's facts stay pending, each with its reason, and are
    parked after the record's ``max_attempts`` rejections. A dry run changes no state."""
    from tasks.pipeline.gate import Verdict, pending_reason

    h = as_home(home)
    record = pub.read_record(h, version)
    v = Verdict.from_dict(verdict)
    status = "dry-run" if dry_run else "rejected"
    reasons = {e["fact"]["fact_id"]: pending_reason(e["fact"]["fact_id"], v, version, dry_run)
               for e in record["edits"]}
    if not dry_run:
        state = read_state(h)
        for e in record["edits"]:
            fid = e["fact"]["fact_id"]
            old = state["pending"].get(fid, {})
            attempts = old.get("attempts", 0) + 1
            state["pending"][fid] = {"fact": e["fact"], "origin": e.get("origin", {}),
                                     "reason": reasons[fid], "attempts": attempts,
                                     "parked": attempts >= record["max_attempts"], "last_version": version,
                                     "first_pending_at": old.get("first_pending_at", pub.now())}
        close_batches(state, record["batches"], record.get("cancelled", []))
        write_state(h, state)
    pub.update_record(h, version, status=status, pending_reasons=reasons)
    return {"version": version, "status": status, "reasons": v.reasons, "pending": reasons}
