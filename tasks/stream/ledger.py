"""The ledgers under ``$LEDIT_HOME/state/ledger``.

- ``files.jsonl``: one line per file ever taken in (its sha256, name, archive path, run and
  batch), so the same content is never ingested twice. Append-only.
- ``facts.parquet``: the latest accepted version of every fact (fact_id, record_hash,
  update key, order timestamp, op, batch): later updates are deduplicated against it.
- ``applied.parquet``: the edits the training pipeline has applied (``mark_applied``), so an
  update identical to an applied edit is skipped.

Every write is atomic (temporary file + rename) and idempotent, so a step redone after a
crash changes nothing the second time.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Iterable

import polars as pl

from editing.facts import Fact, normalise
from tasks.stream.columns import SEP
from tasks.stream.workspace import Home

FACTS_SCHEMA = {"fact_id": pl.String, "record_hash": pl.String, "update_key": pl.String,
                "order_ts": pl.Datetime("us", "UTC"), "op": pl.String, "batch": pl.String,
                "ingested_at": pl.Datetime("us", "UTC")}
APPLIED_SCHEMA = {"fact_id": pl.String, "update_key": pl.String, "op": pl.String,
                  "target_new": pl.String, "applied_at": pl.Datetime("us", "UTC"),
                  "run": pl.String, "adapter": pl.String}
#: the update key's column as ledgers and staged runs written before its rename call it
_OLD_NAMES = {"edit_key": "update_key", "_edit_key": "_update_key"}


def files_path(home: Home) -> Path:
    return home.ledger / "files.jsonl"


def facts_path(home: Home) -> Path:
    return home.ledger / "facts.parquet"


def applied_path(home: Home) -> Path:
    return home.ledger / "applied.parquet"


# -- files --------------------------------------------------------------------
def ingested_files(home: Home) -> dict[str, dict]:
    """sha256 -> the ledger entry of every file already taken in."""
    out: dict[str, dict] = {}
    try:
        with open(files_path(home), encoding="utf-8") as f:
            for line in f:
                try:
                    entry = json.loads(line)
                except json.JSONDecodeError:   # a torn last line from a crash: ignore it
                    continue
                out.setdefault(entry["sha256"], entry)
    except FileNotFoundError:
        pass
    return out


def record_files(home: Home, entries: Iterable[dict]) -> None:
    """Append entries whose sha256 is not yet in the ledger (idempotent)."""
    known = ingested_files(home)
    new = [e for e in entries if e["sha256"] not in known]
    if not new:
        return
    home.ledger.mkdir(parents=True, exist_ok=True)
    path = files_path(home)
    # a crash may have left a torn line without newline: start on a fresh line
    needs_nl = path.exists() and path.stat().st_size > 0 and not _ends_with_newline(path)
    with open(path, "a", encoding="utf-8") as f:
        if needs_nl:
            f.write("\n")
        for e in new:
            f.write(json.dumps(e, sort_keys=True, default=str) + "\n")
        f.flush()
        os.fsync(f.fileno())


def _ends_with_newline(path: Path) -> bool:
    with open(path, "rb") as f:
        f.seek(-1, os.SEEK_END)
        return f.read(1) == b"\n"


# -- facts --------------------------------------------------------------------
def _empty(schema: dict) -> pl.LazyFrame:
    return pl.LazyFrame(schema=schema)


def _scan(path: Path) -> pl.LazyFrame:
    lf = pl.scan_parquet(path)
    old = {k: v for k, v in _OLD_NAMES.items() if k in lf.collect_schema()}
    return lf.rename(old) if old else lf


def scan_facts(home: Home) -> pl.LazyFrame:
    p = facts_path(home)
    return _scan(p) if p.exists() else _empty(FACTS_SCHEMA)


def scan_applied(home: Home) -> pl.LazyFrame:
    p = applied_path(home)
    return _scan(p) if p.exists() else _empty(APPLIED_SCHEMA)


def _write_atomic(lf: pl.LazyFrame, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    lf.sink_parquet(tmp)
    with open(tmp, "rb") as f:
        os.fsync(f.fileno())
    os.replace(tmp, path)


def record_facts(home: Home, accepted: Path, batch: str) -> None:
    """Merge a batch's accepted facts into the facts ledger: the latest version per fact
    wins (ties: the batch being recorded). Re-recording the same batch changes nothing."""
    new = _scan(accepted).select(
        "fact_id", "record_hash", pl.col("_update_key").alias("update_key"),
        pl.col("_order_ts").alias("order_ts"), "op", pl.lit(batch, pl.String).alias("batch"),
        pl.col("received_at").alias("ingested_at"))
    merged = (pl.concat([scan_facts(home).select(list(FACTS_SCHEMA)), new], how="vertical")
              .with_row_index("_i")
              .sort(["fact_id", "order_ts", "_i"])
              .unique("fact_id", keep="last", maintain_order=True)
              .drop("_i"))
    _write_atomic(merged, facts_path(home))


# -- applied edits ---------------------------------------------------------------
@dataclass
class AppliedEdit:
    fact_id: str
    target_new: str | None
    op: str = "upsert"

    @property
    def update_key(self) -> str:
        return update_key(self.op, self.target_new)


def update_key(op: str, target_new: str | None) -> str:
    """What an update makes the model say (its op and normalised answer, whatever the
    fact); equal keys mean identical edits. Not the "same fact" key (``Fact.key``)."""
    return f"{op}{SEP}{normalise(target_new) if target_new else ''}"


def _as_applied(item: Any) -> AppliedEdit:
    if isinstance(item, AppliedEdit):
        return item
    if isinstance(item, Fact):
        return AppliedEdit(item.fact_id, item.target_new if item.op == "upsert" else None, item.op)
    if isinstance(item, dict):
        op = item.get("op") or ("upsert" if item.get("target_new") else "retract")
        return AppliedEdit(item["fact_id"], item.get("target_new") if op == "upsert" else None, op)
    if isinstance(item, (tuple, list)) and len(item) == 2:
        fid, target = item
        return AppliedEdit(fid, target, "upsert" if target is not None else "retract")
    raise TypeError(f"cannot read an applied edit from {item!r}: give a Fact, a dict with "
                    "fact_id and target_new (and op), or a (fact_id, target_new) pair")


def mark_applied(home: str | os.PathLike | Home | None, facts: Iterable[Any], *,
                 run: str | None = None, adapter: str | None = None) -> int:
    """Record edits as applied to the production model; returns how many were recorded.

    Called by the training pipeline once an adapter set carrying the edits is promoted.
    ``facts``: ``Fact`` objects, dicts with ``fact_id`` and ``target_new`` (``op``
    optional), or ``(fact_id, target_new)`` pairs; a ``None`` target (or ``op='retract'``)
    records a retraction. A later call for the same fact replaces the earlier entry. Later
    updates identical to an applied edit are then skipped by ``ingest``.
    """
    h = home if isinstance(home, Home) else Home.at(home)
    edits = [_as_applied(x) for x in facts]
    if not edits:
        return 0
    now = datetime.now(timezone.utc)
    new = pl.LazyFrame({
        "fact_id": [e.fact_id for e in edits], "update_key": [e.update_key for e in edits],
        "op": [e.op for e in edits], "target_new": [e.target_new for e in edits],
        "applied_at": [now] * len(edits), "run": [run] * len(edits),
        "adapter": [adapter] * len(edits)}, schema=APPLIED_SCHEMA)
    with h.lock():
        h.ledger.mkdir(parents=True, exist_ok=True)
        merged = (pl.concat([scan_applied(h).select(list(APPLIED_SCHEMA)), new])
                  .unique("fact_id", keep="last", maintain_order=True))
        _write_atomic(merged, applied_path(h))
    return len(edits)


def applied_edits(home: str | os.PathLike | Home | None) -> pl.DataFrame:
    h = home if isinstance(home, Home) else Home.at(home)
    return scan_applied(h).collect()


def latest_facts(home: str | os.PathLike | Home | None) -> pl.DataFrame:
    h = home if isinstance(home, Home) else Home.at(home)
    return scan_facts(h).collect()
