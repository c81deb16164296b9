"""Vectorised validation of fact-update records with polars.

The rules are those of ``editing.facts.fact_from_record``, checked in the same order so a
record is rejected for the same first problem (a test holds the two to agreement), plus one
more: ``observed_at`` must be an ISO 8601 timestamp, since "the latest wins" needs an order.

``tasks.stream.columns`` pulls the fields out of the parsed records; every string check
(missing, type, empty or whitespace-only, over-long, control or bidirectional characters,
fact_id charset, no-op target, subject in the prompt) and the key normalisation run here
as polars expressions over a whole chunk. Reasons that name a detail of the value (which
character, where; which subject) are worded in Python by ``editing.facts`` for the flagged
rows only, so both paths say the same thing. Non-ASCII strings are normalised by
``editing.facts.normalise`` itself, so keys are exact.
"""
from __future__ import annotations

import hashlib
from datetime import datetime, timezone
from typing import Any, Iterable

import polars as pl

from editing.facts import (CONTROL_CHARS, DEFAULT_KIND, EMPTY, FACT_ID_PATTERN, FACT_ID_REASON,
                           LONG, MAX_STRING, MISSING, NOOP, OPTIONAL_STR, REQUIRED, PairSkipped,
                           control_char_reason, normalise, subject_reason, warn_skipped)
from tasks.stream.chunks import RawChunk
from tasks.stream.columns import PAIR, SEP, STR_FIELDS, WS_ONLY, frame_from_chunk

_WS_RUN = r"[\s\x1c-\x1f]+"
TS_PATTERN = (r"^(\d{4})-(\d{2})-(\d{2})(?:[T ](\d{2}):(\d{2})(?::(\d{2})(?:[.,](\d{1,9}))?)?)?"
              r"\s*(Z|z|[+-]\d{2}:?\d{2})?$")
TS_REASON = "not an ISO 8601 timestamp (YYYY-MM-DD[THH:MM[:SS[.fff]]][Z|+HH:MM])"

#: Columns of an accepted record, as written to a batch Parquet file.
BATCH_SCHEMA = {
    "fact_id": pl.String, "op": pl.String, "subject": pl.String, "prompt": pl.String,
    "relation": pl.String, "target_new": pl.String, "target_old": pl.String,
    "rephrase_prompts": pl.List(pl.String), "locality": pl.List(PAIR),
    "portability": pl.List(PAIR), "source": pl.String, "observed_at": pl.String,
    "observed_ts": pl.Datetime("us", "UTC"), "received_at": pl.Datetime("us", "UTC"),
    "record_hash": pl.String, "source_format": pl.String, "source_file": pl.String,
    "source_sha256": pl.String, "source_line": pl.Int64, "source_record": pl.Int64,
    "run_id": pl.String,
}
#: Extra columns staged for deduplication (not written to the batch).
DEDUPE_COLUMNS = {"_seq": pl.Int64, "_order_ts": pl.Datetime("us", "UTC"),
                  "_update_key": pl.String}
QUARANTINE_SCHEMA = {
    "file": pl.String, "sha256": pl.String, "archived": pl.String, "line": pl.Int64,
    "record": pl.Int64, "field": pl.String, "reason": pl.String, "raw": pl.String,
    "run_id": pl.String,
}


# -- polars side: the checks --------------------------------------------------
def normalise_series(s: pl.Series) -> pl.Series:
    """``editing.facts.normalise`` over a Series: polars for ASCII, Python for the rest."""
    out = (s.str.replace_all(_WS_RUN, " ").str.strip_chars(" ").str.to_lowercase())
    non_ascii = (s.str.len_bytes() != s.str.len_chars()).fill_null(False)
    if non_ascii.any():
        idx = non_ascii.arg_true()
        vals = [normalise(x) for x in s.gather(idx).to_list()]
        out = out.scatter(idx, pl.Series(vals, dtype=pl.String))
    return out.alias(s.name)


def _string_checks(name: str, required: bool) -> list[pl.Expr]:
    col, typ = pl.col(name), pl.col(name + "__t")
    checks = [pl.when(typ.is_not_null()).then(
        pl.concat_str([pl.lit(f"{name}{SEP}expected a string, got "), typ]))]
    if required:
        checks.append(pl.when((pl.col("op") == "upsert") & col.is_null() & typ.is_null())
                      .then(pl.lit(f"{name}{SEP}{MISSING}")))
    checks.append(pl.when(col.str.contains(WS_ONLY))
                  .then(pl.lit(f"{name}{SEP}{EMPTY}")))
    checks.append(pl.when(col.str.len_chars() > MAX_STRING)
                  .then(pl.lit(f"{name}{SEP}{LONG}")))
    checks.append(pl.concat_str([pl.lit(f"{name}{SEP}"), pl.col(name + "__c")]))
    return checks


def _reasons_where(s: pl.Series, flags: pl.Series, reason) -> pl.Series:
    """``reason(value)`` on the flagged rows (in Python, those rows only), null elsewhere."""
    out = pl.repeat(None, len(s), dtype=pl.String, eager=True)
    idx = flags.arg_true()
    if len(idx):
        out = out.scatter(idx, pl.Series([reason(v) for v in s.gather(idx).to_list()],
                                         dtype=pl.String))
    return out


def parse_timestamps(s: pl.Expr) -> pl.Expr:
    """ISO 8601 strings to UTC datetimes (null where unparseable); no zone means UTC."""
    g = s.str.extract_groups(TS_PATTERN)
    f = g.struct.field
    zone = (f("8").replace({"Z": "+00:00", "z": "+00:00"}).fill_null("+00:00")
            .str.replace(r"^([+-]\d{2})(\d{2})$", "${1}:${2}"))
    canon = pl.concat_str([f("1"), pl.lit("-"), f("2"), pl.lit("-"), f("3"), pl.lit("T"),
                           f("4").fill_null("00"), pl.lit(":"), f("5").fill_null("00"), pl.lit(":"),
                           f("6").fill_null("00"), pl.lit("."), f("7").fill_null("0"), zone])
    return (canon.str.to_datetime("%Y-%m-%dT%H:%M:%S%.f%:z", strict=False, time_unit="us")
            .dt.convert_time_zone("UTC"))


def check_frame(df: pl.DataFrame) -> pl.DataFrame:
    """Add ``_field`` and ``_reason`` (null for a good record): the first problem found,
    in ``fact_from_record``'s order. Also adds normalised subject, prompt and targets (the
    keys reuse them) and ``observed_ts``."""
    df = df.with_columns(
        normalise_series(df["target_new"]).alias("_tn_n"),
        normalise_series(df["target_old"]).alias("_to_n"),
        normalise_series(df["subject"]).alias("_subj_n"),
        normalise_series(df["prompt"]).alias("_prompt_n"),
    )
    flags = df.select(
        *[pl.col(n).str.contains(CONTROL_CHARS).fill_null(False) for n in STR_FIELDS],
        _subj=~pl.col("_prompt_n").str.contains(pl.col("_subj_n"), literal=True).fill_null(True))
    df = df.with_columns(
        *[_reasons_where(df[n], flags[n], control_char_reason).alias(n + "__c")
          for n in STR_FIELDS],
        _reasons_where(df["subject"], flags["_subj"], subject_reason).alias("_subj_e"))
    upsert = pl.col("op") == "upsert"
    checks: list[pl.Expr] = [
        pl.when(pl.col("_perr").is_not_null()).then(pl.concat_str([pl.lit(SEP), pl.col("_perr")])),
        pl.col("op__e"),
    ]
    for name in REQUIRED:
        checks += _string_checks(name, required=True)
    checks.append(pl.when((pl.col("op") == "retract") & ~pl.col("_fid_truthy")
                          & (pl.col("subject").is_null() | pl.col("prompt").is_null()))
                  .then(pl.lit(f"fact_id{SEP}a retract needs fact_id, or subject and prompt")))
    for name in OPTIONAL_STR:
        checks += _string_checks(name, required=False)
        if name == "fact_id":
            checks.append(pl.when(~pl.col("fact_id").str.contains(f"^(?:{FACT_ID_PATTERN})$"))
                          .then(pl.lit(f"fact_id{SEP}{FACT_ID_REASON}")))
    checks.append(pl.col("rephrase_prompts__e"))
    checks.append(pl.when(upsert & pl.col("target_old").is_not_null()
                          & (pl.col("_tn_n") == pl.col("_to_n")))
                  .then(pl.lit(f"target_new{SEP}{NOOP}")))
    checks.append(pl.concat_str([pl.lit(f"prompt{SEP}"), pl.col("_subj_e")]))
    checks += [pl.col("locality__e"), pl.col("portability__e")]
    checks.append(pl.when(pl.col("observed_at").is_not_null() & pl.col("observed_ts").is_null())
                  .then(pl.lit(f"observed_at{SEP}{TS_REASON}")))
    df = df.with_columns(parse_timestamps(pl.col("observed_at")).alias("observed_ts"))
    err = pl.coalesce(checks)
    return df.with_columns(err.alias("_err")).with_columns(
        pl.col("_err").str.split_exact(SEP, 1).struct.rename_fields(["_field", "_reason"])
        .alias("_e")).unnest("_e").with_columns(
        pl.when(pl.col("_field") == "").then(None).otherwise(pl.col("_field")).alias("_field"))


def _sha_keys(values: Iterable[str]) -> list[str]:
    return ["f-" + hashlib.sha256(v.encode()).hexdigest()[:16] for v in values]


def _blake(values: Iterable[str]) -> list[str]:
    return [hashlib.blake2b(v.encode("utf-8", "surrogatepass"), digest_size=16).hexdigest()
            for v in values]


def _pairs_text(name: str) -> pl.Expr:
    # The kind and aliases count only where they say something, so a record of the project's
    # own format hashes as it did before pairs had kinds.
    el = pl.element()
    kind = el.struct.field("kind")
    aliases = el.struct.field("aliases").list.eval(pl.element().list.join("\x1b")).list.join("\x1a")
    return (pl.col(name).list.eval(pl.concat_str(
        [el.struct.field("prompt"), el.struct.field("answer"),
         pl.when(kind != DEFAULT_KIND).then(kind), aliases],
        separator="\x1d", ignore_nulls=True)).list.join("\x1c"))


def keys_for_good(df: pl.DataFrame) -> pl.DataFrame:
    """Normalised keys of good records: ``fact_id`` (given, else ``editing.facts.fact_key``
    computed the same way), ``record_hash`` (content apart from source and observed_at) and
    ``_update_key`` (what an applied edit makes the model say)."""
    subj_n = df["_subj_n"].fill_null("")          # from check_frame
    prompt_n = df["_prompt_n"].fill_null("")
    rel_n = normalise_series(df["relation"])
    missing = df["fact_id"].is_null()
    fact_id = df["fact_id"]
    if missing.any():
        idx = missing.arg_true()
        second = rel_n.gather(idx).fill_null(prompt_n.gather(idx))
        key_src = (subj_n.gather(idx) + SEP + second).to_list()
        fact_id = fact_id.scatter(idx, pl.Series(_sha_keys(key_src), dtype=pl.String))
    df = df.with_columns(fact_id.alias("fact_id"), subj_n.alias("_subj_n"),
                         prompt_n.alias("_prompt_n"), rel_n.alias("_rel_n"))
    content = pl.concat_str(
        [pl.col(c).fill_null("\x00") for c in ("fact_id", "op", "_subj_n", "_prompt_n", "_rel_n",
                                                "_tn_n", "_to_n")]
        + [pl.col("rephrase_prompts").list.join("\x1d").fill_null(""),
           _pairs_text("locality").fill_null(""), _pairs_text("portability").fill_null("")],
        separator="\x1e")
    text = df.select(content.alias("c"))["c"].to_list()
    return df.with_columns(
        pl.Series("record_hash", _blake(text), dtype=pl.String),
        pl.concat_str([pl.col("op"), pl.when(pl.col("op") == "upsert")
                       .then(pl.col("_tn_n")).otherwise(pl.lit("")).fill_null("")],
                      separator=SEP).alias("_update_key"))


def validate_chunk(chunk: RawChunk, *, file: str, sha256: str, archived: str, seq: int,
                   run_id: str, received_at: datetime,
                   skipped_pairs: list | None = None) -> tuple[pl.DataFrame, pl.DataFrame]:
    """``(good, bad)``: good rows in batch + dedupe columns; bad rows in the quarantine schema.

    Optional evaluation items left out of good rows are warned (``PairSkipped``, naming the
    file, the record and the field) and appended to ``skipped_pairs``, if given."""
    df = check_frame(frame_from_chunk(chunk))
    bad_mask = df["_reason"].is_not_null()
    left_out = df.filter(~bad_mask & df["_skipped"].is_not_null())
    for rec, items in zip(left_out["_record"].to_list(), left_out["_skipped"].to_list()):
        for item in items.split("\x1e"):
            name, reason = item.split(SEP, 1)
            warn_skipped(PairSkipped(reason, file=file, record=rec, field=name), skipped_pairs)
    bad = df.filter(bad_mask).select(
        pl.lit(file, pl.String).alias("file"), pl.lit(sha256, pl.String).alias("sha256"),
        pl.lit(archived, pl.String).alias("archived"), pl.col("_line").alias("line"),
        pl.col("_record").alias("record"), pl.col("_field").alias("field"),
        pl.col("_reason").alias("reason"), pl.col("_raw").alias("raw"),
        pl.lit(run_id, pl.String).alias("run_id")).cast(QUARANTINE_SCHEMA)
    good = df.filter(~bad_mask)
    if good.height:
        good = keys_for_good(good)
    received = pl.lit(received_at, pl.Datetime("us", "UTC"))
    good = good.with_columns(
        received.alias("received_at"), pl.lit(file, pl.String).alias("source_file"),
        pl.lit(sha256, pl.String).alias("source_sha256"), pl.col("_line").alias("source_line"),
        pl.col("_record").alias("source_record"), pl.lit(run_id, pl.String).alias("run_id"),
        pl.lit(seq, pl.Int64).alias("_seq"),
        pl.coalesce(pl.col("observed_ts"), received).alias("_order_ts"),
        *([] if good.height else [pl.lit(None, pl.String).alias(c)
                                  for c in ("record_hash", "_update_key")]),
    )
    schema = {**BATCH_SCHEMA, **DEDUPE_COLUMNS}
    good = good.select([pl.col(c).cast(t) for c, t in schema.items()])
    return good, bad


def validate_records(records: list[Any], *, file: str = "<records>",
                     skipped_pairs: list | None = None) -> tuple[pl.DataFrame, pl.DataFrame]:
    """Validate in-memory records (dicts or anything else): ``(good, bad)`` frames."""
    chunk = RawChunk()
    for i, rec in enumerate(records):
        perr = None if rec.__class__ is dict else \
            f"expected a JSON object, got {type(rec).__name__}"
        chunk.add(rec, None, i + 1, repr(rec)[:2000], perr)
    return validate_chunk(chunk, file=file, sha256="", archived="", seq=0, run_id="",
                          received_at=datetime.now(timezone.utc), skipped_pairs=skipped_pairs)
