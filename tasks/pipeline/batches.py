"""The versioned batches a run trains from: which are new, and their facts as edit items.

A batch is read from the workspace file when its md5 matches the DVC md5, else through DVC
at its git tag, so its content is fixed by the md5 and callers may cache on it.
"""
from __future__ import annotations

import json

from tasks.pipeline.state import as_home, read_state
from tasks.stream.workspace import Home


def batch_md5(home: Home, tag: str) -> str:
    meta = home.workspace / "batches" / f"{tag}.json"
    try:
        return json.loads(meta.read_text(encoding="utf-8"))["dvc_md5"]
    except (FileNotFoundError, KeyError, json.JSONDecodeError):
        import yaml

        from tasks.stream import version
        text = version.git(home.workspace, "show", f"{tag}:batches/{tag}.parquet.dvc").stdout
        return yaml.safe_load(text)["outs"][0]["md5"]


def unprocessed_batches(home, force: bool = False) -> list[dict]:
    """Batches not yet trained into a verdict, oldest first (``force``: at least the latest)."""
    from tasks.stream.prepare import batch_tags
    from tasks.stream.workspace import is_initialised

    h = as_home(home)
    if not is_initialised(h):
        return []
    done = set(read_state(h)["processed_batches"])
    tags = batch_tags(h)
    todo = [t for t in tags if t not in done]
    if force and not todo and tags:
        todo = tags[-1:]
    return [{"tag": t, "dvc_md5": batch_md5(h, t)} for t in todo]


def batch_edits(home, tag: str, dvc_md5: str) -> list[dict]:
    """The facts of one batch as edit items ``{"fact": {...}, "origin": {...}}``; a record
    today's rules refuse is an item with ``refused`` (the plan skips it, with its reason)."""
    from editing.facts import FactError, fact_from_record
    from tasks.stream.prepare import FACT_FIELDS

    items = []
    for i, row in enumerate(_batch_frame(as_home(home), tag, dvc_md5).iter_rows(named=True)):
        rec = {k: row[k] for k in FACT_FIELDS if row.get(k) not in (None, [])}
        origin = {"batch": tag, "dvc_md5": dvc_md5, "source_file": row.get("source_file"),
                  "source_line": row.get("source_line"), "source_sha256": row.get("source_sha256"),
                  "record_hash": row.get("record_hash"), "ingest_run": row.get("run_id"),
                  "observed_at": str(row["observed_at"]) if row.get("observed_at") else None}
        try:
            fact = fact_from_record(rec, file=f"batch {tag}", record=i)
        except FactError as exc:
            # accepted by an older rule set: one such record must not stop the batch
            items.append({"fact": {"fact_id": rec.get("fact_id") or f"{tag}#{i}"}, "origin": origin,
                          "refused": str(exc)})
            continue
        items.append({"fact": fact.to_dict(), "origin": origin})
    return items


def _batch_frame(h: Home, tag: str, dvc_md5: str):
    import hashlib

    import polars as pl

    from tasks.stream.prepare import read_batch

    local = h.workspace / "batches" / f"{tag}.parquet"
    if local.exists() and hashlib.md5(local.read_bytes()).hexdigest() == dvc_md5:
        return pl.read_parquet(local)
    with h.lock():               # DVC must not read while an ingest runs dvc add/push
        return read_batch(h, tag)
