"""Train a candidate: production's adapter set extended with the planned edits, saved under
``state/candidates/<version>`` and read back before the record says 'trained'.

The base model is loaded once per process (``model_for``) and never crosses a task boundary.
With ``pipeline.shards > 1`` the upserts are trained as shards in parallel through Ray
(``tasks.pipeline.shards``), each shard loading the model itself.
"""
from __future__ import annotations

import time
from pathlib import Path

from tasks.faults import checkpoint
from tasks.pipeline import store as pub
from tasks.pipeline.state import as_home
from tasks.settings import Settings

_MODELS: dict = {}


def model_for(settings: Settings):
    """``(model, tokenizer)`` of ``settings.model``, loaded once per process."""
    from editing import load_model

    if settings.model not in _MODELS:
        _MODELS.clear()           # one model at a time: they are large
        _MODELS[settings.model] = load_model(settings.model)
    return _MODELS[settings.model]


def train_candidate(home, settings: Settings, version: str) -> dict:
    """Extend the production set with the candidate's edits; save it under state/candidates.

    Retracted and superseded edits are removed first (``editing.editor.resolve``), on either path.
    """
    from editing import AdapterSet, Fact, edit

    h = as_home(home)
    record = pub.read_record(h, version)
    base = pub.load_published(h, record["base_version"]) if record["base_version"] else None
    facts = [Fact(**e["fact"]) for e in record["edits"]]
    meta = {"training_run": record.get("mlflow_run_id") or version,
            "data_version": ",".join(b["tag"] for b in record["batches"]) or "pending"}
    shards = settings.pipeline.shards
    t0 = time.perf_counter()
    checkpoint("during_training")
    if shards > 1 and any(f.op != "retract" for f in facts):
        candidate = _train_sharded(settings, base, facts, shards, meta)
    else:
        model, tokenizer = model_for(settings)
        candidate = edit(model, tokenizer, facts, settings.edit, base=base, progress=False, **meta)
    seconds = time.perf_counter() - t0
    checkpoint("write_adapter")
    out = candidate.save(pub.candidate_dir(h, version))
    AdapterSet.load(out)                      # what was written reads back, checksum and all
    changes, live_after = _changes(record, facts, candidate)
    block = candidate.blocks[-1] if candidate.blocks and changes.get("block_id") else None
    training = {"seconds": round(seconds, 3), "blocks": len(candidate.blocks),
                "live_facts": len(candidate.fact_ids), "shards": shards,
                "steps": (block.stats or {}).get("steps") if block else None,
                "final_loss": (block.stats or {}).get("final_loss") if block else None}
    pub.update_record(h, version, status="trained", changes=changes, live_after=live_after,
                      training=training, candidate_dir=str(out))
    checkpoint("after_training")
    return {"version": version, "dir": str(out), "changes": changes, "training": training}


def _changes(record: dict, facts: list, candidate) -> tuple[dict, list[dict]]:
    """What the candidate added, retracted and superseded, and its live facts as edit items."""
    changes = dict(getattr(candidate, "changes", None) or {})
    changes.setdefault("added", [f.fact_id for f in facts if f.op != "retract"])
    changes.setdefault("retracted", [f.fact_id for f in facts if f.op == "retract"])
    changes.setdefault("superseded", [])
    gone = set(changes["retracted"]) | set(changes["superseded"]) | set(changes["added"])
    by_id = {e["fact"]["fact_id"]: e for e in record["edits"]}
    live_after = [x for x in record["live_before"] if x["fact"]["fact_id"] not in gone]
    live_after += [{k: v for k, v in by_id[fid].items() if k != "retry"} for fid in changes["added"]
                   if fid in by_id]
    return changes, live_after


def _train_sharded(settings: Settings, base, facts: list, shards: int, meta: dict):
    """The upserts as up to ``shards`` blocks trained in parallel on top of ``base`` less
    what the facts retract and supersede."""
    import tempfile

    from editing.editor import resolve
    from tasks.pipeline.shards import train_shards

    resolution = resolve(base, facts)
    current = resolution.remaining
    with tempfile.TemporaryDirectory(prefix="ledit-shard-base-") as tmp:
        base_dir = current.save(Path(tmp) / "base") if current is not None and current.blocks else None
        out = train_shards(resolution.upserts, settings, base_dir, shards,
                           meta["training_run"], meta["data_version"])
    out.changes = resolution.changes(out.blocks[-1].block_id)
    return out
