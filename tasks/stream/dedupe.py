"""Deduplication with lazy polars, over the staged valid records of one run.

Each staged record gets exactly one status:

- ``accepted``: the latest version of its fact in this run, and new;
- ``duplicate``: an exact copy (same normalised content) of the record kept for its fact;
- ``superseded``: an older version of a fact that this run also has a later version of;
- ``stale``: older than the version of the fact an earlier batch already accepted;
- ``already_applied``: the same update key (op and normalised target) as an edit the model
  already carries (``mark_applied``), with no different version pending;
- ``already_ingested``: identical (normalised content, apart from source and observed_at)
  to the version an earlier batch accepted, unless the model was moved off that version
  after it arrived (a rollback or a retraction recorded by ``mark_applied``).

"Latest" orders by ``observed_at`` (arrival time where absent), then file arrival order,
then record position. Keys are the normalised fact ids and content hashes computed in
``tasks.stream.validate``. Everything but ``accepted`` is written to the run's duplicates file
with its status, so nothing is dropped silently.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import polars as pl

from tasks.stream.validate import BATCH_SCHEMA

STATUSES = ("accepted", "duplicate", "superseded", "stale", "already_ingested",
            "already_applied")


@dataclass
class DedupeResult:
    accepted: int = 0
    counts: dict = field(default_factory=dict)   # status -> n (accepted excluded)

    @property
    def duplicates(self) -> int:
        return sum(self.counts.values())


KEY_COLUMNS = ["fact_id", "record_hash", "_update_key", "_order_ts", "_seq", "source_record"]
ROW_ID = ["_seq", "source_record"]     # unique per staged record: file order, record number


def classify(keys: pl.LazyFrame, facts: pl.LazyFrame, applied: pl.LazyFrame) -> pl.LazyFrame:
    """``dedupe_status`` for every staged record (see the module doc), from its keys only:
    returns ``_seq``, ``source_record`` and ``dedupe_status``."""
    seen = facts.select("fact_id", pl.col("record_hash").alias("_l_hash"),
                        pl.col("update_key").alias("_l_update"), pl.col("order_ts").alias("_l_ts"),
                        pl.col("ingested_at").alias("_l_in"))
    done = applied.select("fact_id", pl.col("update_key").alias("_a_update"),
                          pl.col("applied_at").alias("_a_at"))
    # the model was moved off the ingested version after it arrived (a rollback or a
    # retraction applied by hand): sending that version again is a real update
    moved_off = (pl.col("_a_update").is_not_null() & (pl.col("_a_update") != pl.col("_l_update"))
                 & (pl.col("_a_at") > pl.col("_l_in")))
    lf = (keys.select(KEY_COLUMNS)
          .sort(["fact_id", "_order_ts", "_seq", "source_record"])
          .with_columns(pl.col("fact_id").is_last_distinct().alias("_last"),
                        pl.col("record_hash").last().over("fact_id").alias("_win_hash"))
          .join(seen, on="fact_id", how="left")
          .join(done, on="fact_id", how="left"))
    status = (pl.when(~pl.col("_last") & (pl.col("record_hash") == pl.col("_win_hash")))
              .then(pl.lit("duplicate"))
              .when(~pl.col("_last")).then(pl.lit("superseded"))
              .when(pl.col("_l_ts").is_not_null() & (pl.col("_order_ts") < pl.col("_l_ts")))
              .then(pl.lit("stale"))
              .when((pl.col("_update_key") == pl.col("_a_update"))
                    & (pl.col("_l_update").is_null()
                       | (pl.col("_l_update") == pl.col("_a_update"))))
              .then(pl.lit("already_applied"))
              .when((pl.col("record_hash") == pl.col("_l_hash")) & ~moved_off.fill_null(False))
              .then(pl.lit("already_ingested"))
              .otherwise(pl.lit("accepted")))
    return lf.select(*ROW_ID, status.alias("dedupe_status"))


def dedupe(parts: list[Path], *, facts: pl.LazyFrame, applied: pl.LazyFrame,
           accepted_out: Path, duplicates_out: Path, batch: str | None) -> DedupeResult:
    """Classify the staged parts and write accepted and non-accepted records.

    Memory stays bounded: the statuses are computed on the key columns alone, then the
    full records stream from the staged Parquet parts through a join on the small status
    table into two Parquet sinks (one lazy plan, the streaming engine). ``accepted_out``
    keeps the internal dedupe columns, for the facts ledger.
    """
    accepted_out.parent.mkdir(parents=True, exist_ok=True)
    if not parts:
        empty = pl.DataFrame(schema={**BATCH_SCHEMA, "batch": pl.String})
        empty.write_parquet(accepted_out)
        empty.with_columns(pl.lit(None, pl.String).alias("dedupe_status")).write_parquet(
            duplicates_out)
        return DedupeResult(0, {s: 0 for s in STATUSES[1:]})
    files = [str(p) for p in parts]
    status = classify(pl.scan_parquet(files), facts, applied).collect(engine="streaming")
    lf = pl.scan_parquet(files).join(status.lazy(), on=ROW_ID, how="left",
                                     maintain_order="left")
    acc = (lf.filter(pl.col("dedupe_status") == "accepted").drop("dedupe_status")
           .with_columns(pl.lit(batch, pl.String).alias("batch")))
    dup = lf.filter(pl.col("dedupe_status") != "accepted")
    pl.collect_all([acc.sink_parquet(accepted_out, lazy=True),
                    dup.sink_parquet(duplicates_out, lazy=True)], engine="streaming")
    counts = dict(status.group_by("dedupe_status").len().iter_rows())
    n_acc = int(counts.pop("accepted", 0))
    return DedupeResult(n_acc, {s: int(counts.get(s, 0)) for s in STATUSES[1:]})


def batch_columns() -> list[str]:
    """Columns of a published batch file, in order."""
    return [*BATCH_SCHEMA, "batch"]
