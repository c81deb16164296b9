"""What a run edits: pending facts, then every new batch, less what needs no training.

Planning opens the candidate's record (``tasks.pipeline.store``): every later step reads the
candidate from it, so a step can be redone from disk after a crash. An edit is never
doubled: a fact already live with the same answer is skipped here.
"""
from __future__ import annotations

from editing.facts import normalise, same_fact_key
from tasks.pipeline import store as pub
from tasks.pipeline.state import as_home, close_batches, read_state, write_state
from tasks.settings import Settings
from tasks.stream.workspace import Home


def live_facts(home: Home, version: str | None) -> list[dict]:
    """The live facts of a version as edit items (from its record; else from its manifest)."""
    if version is None:
        return []
    try:
        return pub.read_record(home, version)["live_after"]
    except pub.PublishError:
        adapter_set = pub.load_published(home, version)
        return [{"fact": f.to_dict(), "origin": {}} for f in adapter_set.facts()]


def plan(home, settings: Settings, batches: list[dict], batch_items: list[list[dict]], *,
         force: bool = False, dry_run: bool = False, flow_run_id: str | None = None) -> dict:
    """Decide the run's edits and open a candidate record; ``status`` 'nothing-to-do' or 'planned'.

    Edits = pending facts (unless parked, or forced), then every unprocessed batch in order; a
    later version of a fact replaces an earlier one. Skipped, each with a reason: upserts
    already live with the same answer (unless forced), retracts of facts that are not live,
    and batch records that today's record rules refuse (a batch ingested under older rules).
    A retract of a pending fact removes it from pending.
    """
    h = as_home(home)
    state = read_state(h)
    base_version = pub.production_version(h)
    live = {x["fact"]["fact_id"]: x for x in live_facts(h, base_version)}
    edits, skipped, cancelled = _sort_out(_chosen(state, batch_items, force), live, state, base_version, force)
    summary = {"batches": batches, "skipped": skipped, "cancelled": cancelled,
               "base_version": base_version}
    if not edits:
        if not dry_run and (batches or cancelled):   # nothing to train: the batches are done
            close_batches(state, batches, cancelled)
            write_state(h, state)
        return {"status": "nothing-to-do", "version": None, **summary}
    version = pub.next_version(h)
    pub.write_record(h, {"version": version, "status": "planned", "created_at": pub.now(),
                         "dry_run": dry_run, "force": force, "flow_run_id": flow_run_id, "edits": edits,
                         "live_before": list(live.values()),
                         "max_attempts": settings.pipeline.max_attempts, **summary})
    return {"status": "planned", "version": version, **summary,
            "upserts": sum(1 for e in edits if e["fact"].get("op") != "retract"),
            "retracts": sum(1 for e in edits if e["fact"].get("op") == "retract")}


def _chosen(state: dict, batch_items: list[list[dict]], force: bool) -> dict[str, dict]:
    """Pending facts (unless parked, or forced), then the batches' in arrival order."""
    chosen: dict[str, dict] = {}
    for fid, item in state["pending"].items():
        if item.get("parked") and not force:
            continue
        chosen[fid] = {"fact": item["fact"], "origin": item.get("origin", {}),
                       "retry": item.get("attempts", 0)}
    for items in batch_items:
        for item in items:
            chosen.pop(item["fact"]["fact_id"], None)     # keep arrival order: re-insert at end
            chosen[item["fact"]["fact_id"]] = dict(item, retry=0)
    return chosen


def _sort_out(chosen: dict[str, dict], live: dict[str, dict], state: dict, base_version: str | None,
              force: bool) -> tuple[list[dict], list[dict], list[str]]:
    """``(edits, skipped, cancelled)``: what to train, what not (with why), and the pending
    facts that a retract removes."""
    # the engine also matches a fact by its normalised subject and prompt
    live_key = {_key(x["fact"]): fid for fid, x in live.items() if _key(x["fact"])}
    edits, skipped, cancelled = [], [], []
    for fid, item in chosen.items():
        if item.get("refused"):
            skipped.append({"fact_id": fid, "reason": f"refused by the current record rules: {item['refused']}"})
            continue
        f = item["fact"]
        live_id = fid if fid in live else live_key.get(_key(f))
        if f.get("op") == "retract":
            if live_id:
                edits.append(item)
            elif fid in state["pending"]:
                cancelled.append(fid)
                skipped.append({"fact_id": fid, "reason": "retract of a pending fact: removed from pending"})
            else:
                skipped.append({"fact_id": fid, "reason": "retract of a fact that is not live"})
        elif live_id and _same_answer(live[live_id]["fact"], f) and not force:
            skipped.append({"fact_id": fid, "reason": f"already live in {base_version} with this answer"})
        else:
            edits.append(item)
    return edits, skipped, cancelled


def _key(fact: dict) -> str | None:
    return same_fact_key(fact.get("subject"), fact.get("prompt"))


def _same_answer(a: dict, b: dict) -> bool:
    return normalise(a.get("target_new") or "") == normalise(b.get("target_new") or "")
