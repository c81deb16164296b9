"""Vectorised validation of fact-update records with polars.

The rules are those of ``editing.facts.fact_from_record``, checked in the same order so a
record is rejected for the same first problem (a test holds the two to agreement), plus one
more: ``observed_at`` must be an ISO 8601 timestamp, since "the latest wins" needs an order.

Python touches each record only to pull its fields out of the parsed JSON and to check the
nested list fields; every string check (missing, type, empty or whitespace-only, over-long,
control or bidirectional characters, fact_id charset, no-op target, subject in the prompt)
and the key normalisation run as polars expressions over a whole chunk. Reasons that name
a detail of the value (which character, where; which subject) are worded in Python by
``editing.facts`` for the flagged rows only, so both paths say the same thing.
Non-ASCII strings are normalised by ``editing.facts.normalise`` itself, so keys are exact.
"""
from __future__ import annotations

import hashlib
from datetime import datetime
from typing import Any, Iterable

import polars as pl

from editing.facts import (CONTROL_CHARS, FACT_ID_PATTERN, FACT_ID_REASON, FORMATS, MAX_STRING,
                           OPS, control_char_reason, detect_format, normalise, subject_reason)
from tasks.sources import RawChunk

REQUIRED = ("subject", "prompt", "target_new")
OPTIONAL_STR = ("fact_id", "relation", "target_old", "source", "observed_at")
STR_FIELDS = REQUIRED + OPTIONAL_STR
PAIR = pl.Struct({"prompt": pl.String, "answer": pl.String})
SEP = "\x1f"
_OPSET = frozenset(OPS)
_WS_ONLY = r"^[\s\x1c-\x1f]*$"      # Python's str.isspace() set, checked equal in tests
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
DEDUPE_COLUMNS = {"_seq": pl.Int64, "_order_ts": pl.Datetime("us", "UTC"), "_edit_key": pl.String}
QUARANTINE_SCHEMA = {
    "file": pl.String, "sha256": pl.String, "archived": pl.String, "line": pl.Int64,
    "record": pl.Int64, "field": pl.String, "reason": pl.String, "raw": pl.String,
    "run_id": pl.String,
}


# -- Python side: pull fields out of parsed records --------------------------
def _string_error(where: str, value) -> str | None:
    if value is None:
        return where + "missing required field"
    if value.__class__ is not str:
        return where + f"expected a string, got {type(value).__name__}"
    if not value.strip():
        return where + "empty or whitespace-only string"
    if len(value) > MAX_STRING:
        return where + f"string longer than {MAX_STRING} characters"
    problem = control_char_reason(value)
    return where + problem if problem else None


def _list_array(offsets: list[int], values, mask: list[bool]) -> pl.Series:
    import pyarrow as pa

    arr = pa.ListArray.from_arrays(pa.array(offsets, pa.int32()), values,
                                   mask=pa.array(mask, pa.bool_()))
    return pl.from_arrow(arr)


_REPHRASE_BAD = f"rephrase_prompts{SEP}expected a list of non-empty strings"


def _rephrase_error(v) -> str | None:
    """``fact_from_record``'s rule: absent/empty is ``[]``, one string is a list of one,
    otherwise a list of non-empty strings. ``v`` has had a lone string wrapped already."""
    if not v:
        return None
    if v.__class__ is not list:
        return _REPHRASE_BAD
    for x in v:
        if x.__class__ is not str or not x.strip():
            return _REPHRASE_BAD
    for i, x in enumerate(v):
        problem = control_char_reason(x)
        if problem:
            return f"rephrase_prompts[{i}]{SEP}{problem}"
    return None


def _pairs_error(name: str, v) -> str | None:
    if not v:
        return None
    if v.__class__ is not list:
        return f"{name}{SEP}expected a list of {{prompt, answer}}"
    for i, item in enumerate(v):
        if item.__class__ is not dict:
            return f"{name}{SEP}item {i} is not an object"
        p, a = item.get("prompt"), item.get("answer")
        err = (_string_error(f"{name}[{i}].prompt{SEP}", p)
               or _string_error(f"{name}[{i}].answer{SEP}", a))
        if err:
            return err
    return None


def _arrow_types():
    import pyarrow as pa

    pair = pa.struct([("prompt", pa.string()), ("answer", pa.string())])
    return pa.list_(pa.string()), pa.list_(pair)


def _fast_list(values: list, arrow_type) -> pl.Series | None:
    """The column through pyarrow's C++ converter, or None if some row has a wrong type."""
    import pyarrow as pa

    try:
        return pl.from_arrow(pa.array(values, type=arrow_type))
    except (pa.ArrowException, TypeError, ValueError, OverflowError):
        return None


def _blank(e: pl.Expr) -> pl.Expr:
    return e.is_null() | e.str.contains(_WS_ONLY)


def rephrase_column(values: list, *, fast: bool = True) -> tuple[pl.Series, list[str | None]]:
    """``rephrase_prompts`` as a List(String) column, and the error of each bad row.

    Fast path: pyarrow converts the whole column and polars flags rows with a blank item;
    only flagged rows (or, if a type is wrong somewhere, every row) are checked in Python,
    which words the error exactly as ``fact_from_record`` does."""
    import pyarrow as pa

    vals = [([v] if v.__class__ is str else v) if v else [] for v in values]
    col = _fast_list(vals, _arrow_types()[0]) if fast else None
    if col is not None:
        errs: list[str | None] = [None] * len(vals)
        el = pl.element()
        flagged = col.to_frame("r").select(
            pl.col("r").list.eval(_blank(el) | el.str.contains(CONTROL_CHARS))
            .list.any().fill_null(False))["r"]
        for i in flagged.arg_true().to_list():
            errs[i] = _rephrase_error(vals[i])
        return col, errs
    flat: list[str] = []
    offsets, mask, errs = [0], [], []
    for v in vals:
        err = _rephrase_error(v)
        if v and err is None:
            flat.extend(v)
        errs.append(err)
        mask.append(err is not None)
        offsets.append(len(flat))
    return _list_array(offsets, pa.array(flat, pa.string()), mask), errs


def pairs_column(name: str, values: list, *, fast: bool = True
                 ) -> tuple[pl.Series, list[str | None]]:
    """``locality`` / ``portability`` as List(Struct{prompt, answer}), and row errors
    (fast path as in ``rephrase_column``)."""
    import pyarrow as pa

    vals = [v if v else [] for v in values]
    col = _fast_list(vals, _arrow_types()[1]) if fast else None
    if col is not None:
        errs: list[str | None] = [None] * len(vals)
        el = pl.element()
        bad_item = el.is_null()
        for part in (el.struct.field("prompt"), el.struct.field("answer")):
            bad_item = (bad_item | _blank(part) | (part.str.len_chars() > MAX_STRING)
                        | part.str.contains(CONTROL_CHARS))
        flagged = col.to_frame("r").select(
            pl.col("r").list.eval(bad_item).list.any().fill_null(False))["r"]
        for i in flagged.arg_true().to_list():
            errs[i] = _pairs_error(name, vals[i])
        return col, errs
    prompts: list[str] = []
    answers: list[str] = []
    offsets, mask, errs = [0], [], []
    for v in vals:
        err = _pairs_error(name, v)
        if v and err is None:
            for item in v:
                prompts.append(item["prompt"])
                answers.append(item["answer"])
        errs.append(err)
        mask.append(err is not None)
        offsets.append(len(prompts))
    values_arr = pa.StructArray.from_arrays(
        [pa.array(prompts, pa.string()), pa.array(answers, pa.string())],
        names=["prompt", "answer"])
    return _list_array(offsets, values_arr, mask), errs


def frame_from_chunk(chunk: RawChunk, fmt: str | None = None) -> pl.DataFrame:
    """The chunk as a polars frame: string fields, their JSON type names where they are not
    strings, checked list fields, and the record-level parse errors."""
    perrs = list(chunk.perrs)
    mapped: list[dict] = []
    formats: list[str | None] = []
    for i, obj in enumerate(chunk.objs):
        if perrs[i] is not None:
            mapped.append({})
            formats.append(None)
            continue
        kind = fmt or detect_format(obj)
        formats.append(kind)
        if kind in FORMATS:
            try:
                obj = FORMATS[kind](obj)
            except Exception as exc:  # a record the mapping cannot read
                perrs[i] = f"cannot read as a {kind} record: {exc!r}"
                obj = {}
        mapped.append(obj)

    cols: dict[str, Any] = {
        "_line": pl.Series(chunk.lines, dtype=pl.Int64),
        "_record": pl.Series(chunk.records, dtype=pl.Int64),
        "_raw": pl.Series(chunk.raws, dtype=pl.String),
        "_perr": pl.Series(perrs, dtype=pl.String),
        "source_format": pl.Series(formats, dtype=pl.String),
    }
    for name in STR_FIELDS:
        vals = [o.get(name) for o in mapped]
        cols[name] = pl.Series([v if v.__class__ is str else None for v in vals], dtype=pl.String)
        cols[name + "__t"] = pl.Series(
            [None if v is None or v.__class__ is str else type(v).__name__ for v in vals],
            dtype=pl.String)
    ops = [o.get("op", "upsert") for o in mapped]
    ok_op = [v.__class__ is str and v in _OPSET for v in ops]
    cols["op"] = pl.Series([v if ok else None for v, ok in zip(ops, ok_op)], dtype=pl.String)
    cols["op__e"] = pl.Series(
        [None if ok else f"op{SEP}unknown op {v!r}; expected one of {OPS}"
         for v, ok in zip(ops, ok_op)], dtype=pl.String)
    cols["_fid_truthy"] = pl.Series([bool(o.get("fact_id")) for o in mapped], dtype=pl.Boolean)
    col, errs = rephrase_column([o.get("rephrase_prompts") for o in mapped],
                                fast=chunk.json_types)
    cols["rephrase_prompts"] = col.cast(pl.List(pl.String))
    cols["rephrase_prompts__e"] = pl.Series(errs, dtype=pl.String)
    for name in ("locality", "portability"):
        col, errs = pairs_column(name, [o.get(name) for o in mapped], fast=chunk.json_types)
        cols[name] = col.cast(pl.List(PAIR))
        cols[name + "__e"] = pl.Series(errs, dtype=pl.String)
    return pl.DataFrame(cols)


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
                      .then(pl.lit(f"{name}{SEP}missing required field")))
    checks.append(pl.when(col.str.contains(_WS_ONLY))
                  .then(pl.lit(f"{name}{SEP}empty or whitespace-only string")))
    checks.append(pl.when(col.str.len_chars() > MAX_STRING)
                  .then(pl.lit(f"{name}{SEP}string longer than {MAX_STRING} characters")))
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
                  .then(pl.lit(f"target_new{SEP}target_new equals target_old: "
                               "the update changes nothing")))
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
    return (pl.col(name).list.eval(pl.concat_str(
        [pl.element().struct.field("prompt"), pl.element().struct.field("answer")],
        separator="\x1d")).list.join("\x1c"))


def keys_for_good(df: pl.DataFrame) -> pl.DataFrame:
    """Normalised keys of good records: ``fact_id`` (given, else ``editing.facts.fact_key``
    computed the same way), ``record_hash`` (content apart from source and observed_at) and
    ``_edit_key`` (what an applied edit makes the model say)."""
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
                      separator=SEP).alias("_edit_key"))


def validate_chunk(chunk: RawChunk, *, file: str, sha256: str, archived: str, seq: int,
                   run_id: str, received_at: datetime, fmt: str | None = None
                   ) -> tuple[pl.DataFrame, pl.DataFrame]:
    """``(good, bad)``: good rows in batch + dedupe columns; bad rows in the quarantine schema."""
    df = check_frame(frame_from_chunk(chunk, fmt))
    bad_mask = df["_reason"].is_not_null()
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
                                  for c in ("record_hash", "_edit_key")]),
    )
    schema = {**BATCH_SCHEMA, **DEDUPE_COLUMNS}
    good = good.select([pl.col(c).cast(t) for c, t in schema.items()])
    return good, bad


def validate_records(records: list[Any], *, file: str = "<records>", fmt: str | None = None
                     ) -> tuple[pl.DataFrame, pl.DataFrame]:
    """Validate in-memory records (dicts or anything else): ``(good, bad)`` frames."""
    from datetime import timezone

    chunk = RawChunk()
    for i, rec in enumerate(records):
        perr = None if rec.__class__ is dict else \
            f"expected a JSON object, got {type(rec).__name__}"
        chunk.add(rec, None, i + 1, repr(rec)[:2000], perr)
    return validate_chunk(chunk, file=file, sha256="", archived="", seq=0, run_id="",
                          received_at=datetime.now(timezone.utc), fmt=fmt)
