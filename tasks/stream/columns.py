"""The Python side of validation: parsed records pulled apart into the columns of a polars
frame, which ``tasks.stream.validate`` then checks as a whole.

Python touches each record only to pull its fields out of the parsed JSON and to check the
nested list fields. The list fields (rephrasings, locality and portability pairs) go
through ``editing.facts``' own functions wherever polars sees an item that is not plainly
good: one rule, one place. pyarrow's C++ converter builds the columns where every row has
the right types.
"""
from __future__ import annotations

from typing import Any

import polars as pl

from editing.facts import (CONTROL_CHARS, DEFAULT_KIND, FORMATS, KIND_PATTERN, MAX_STRING, OPS,
                           OPTIONAL_STR, REQUIRED, FactError, detect_format, evaluation_pairs,
                           rephrase_list)
from tasks.stream.chunks import RawChunk

STR_FIELDS = REQUIRED + OPTIONAL_STR
# A locality or portability pair as ``editing.facts.evaluation_pairs`` leaves it: ``answer``
# is the alias teacher forcing scores, ``aliases`` (null unless the answer came as a list)
# every alias, ``kind`` KnowEdit's group or the format's default. Batches written before
# kinds have only prompt and answer; polars reads them with the two new fields null.
PAIR = pl.Struct({"prompt": pl.String, "answer": pl.String, "kind": pl.String,
                  "aliases": pl.List(pl.List(pl.String))})
SEP = "\x1f"
_OPSET = frozenset(OPS)
WS_ONLY = r"^[\s\x1c-\x1f]*$"      # Python's str.isspace() set, checked equal in tests


def _arrow_types():
    import pyarrow as pa

    pair = pa.struct([("prompt", pa.string()), ("answer", pa.string()), ("kind", pa.string()),
                      ("aliases", pa.list_(pa.list_(pa.string())))])
    return pa.list_(pa.string()), pa.list_(pair)


def _fast_list(values: list, arrow_type) -> pl.Series | None:
    """The column through pyarrow's C++ converter, or None if some row has a wrong type."""
    import pyarrow as pa

    try:
        return pl.from_arrow(pa.array(values, type=arrow_type))
    except (pa.ArrowException, TypeError, ValueError, OverflowError):
        return None


def _blank(e: pl.Expr) -> pl.Expr:
    return e.is_null() | e.str.contains(WS_ONLY)


def _rephrase_row(v) -> tuple[list | None, str | None, list]:
    """``editing.facts.rephrase_list`` on one row: (kept, error, skips)."""
    try:
        kept, skips = rephrase_list(v)
    except FactError as exc:
        return None, f"{exc.field}{SEP}{exc.reason}", []
    return kept, None, skips


def _pairs_row(name: str, v) -> tuple[list | None, str | None, list]:
    """``editing.facts.evaluation_pairs`` on one row: (canonical pairs, error, skips)."""
    try:
        pairs, skips = evaluation_pairs(v, name)
    except FactError as exc:
        return None, f"{exc.field}{SEP}{exc.reason}", []
    return pairs, None, skips


def _checked_column(vals: list, arrow_type, exact, flag, fast: bool, skips: dict | None
                    ) -> tuple[pl.Series, list[str | None]]:
    """A list column, and the error of each bad row. The rules are ``editing.facts``' own
    (``exact(row) -> (kept, error, skips)``); polars only picks the rows they need to see.
    Fast path: pyarrow converts the whole column and ``flag`` marks rows with an item that
    is not plainly good; only those (or, if a type is wrong somewhere, every row) go through
    ``exact``, and the column is rebuilt from what it keeps. ``skips``, if given, gets
    ``{row: [(field, reason), ...]}`` for the rows with items left out."""
    import pyarrow as pa

    col = _fast_list(vals, arrow_type) if fast else None
    rows = range(len(vals)) if col is None else flag(col).arg_true().to_list()
    errs: list[str | None] = [None] * len(vals)
    if len(rows):
        vals = list(vals)
        for i in rows:
            vals[i], errs[i], row_skips = exact(vals[i])
            if row_skips and skips is not None:
                skips.setdefault(i, []).extend(row_skips)
        col = pl.from_arrow(pa.array(vals, type=arrow_type))
    return col, errs


def rephrase_column(values: list, *, fast: bool = True, skips: dict | None = None
                    ) -> tuple[pl.Series, list[str | None]]:
    """``rephrase_prompts`` as a List(String) column, and the error of each bad row (a bad
    row is null); rule 4 as ``editing.facts.rephrase_list`` words it."""
    vals = [([v] if v.__class__ is str else v) if v else [] for v in values]

    def flag(col: pl.Series) -> pl.Series:
        el = pl.element()
        return col.to_frame("r").select(
            pl.col("r").list.eval(_blank(el) | el.str.contains(CONTROL_CHARS))
            .list.any().fill_null(False))["r"]

    return _checked_column(vals, _arrow_types()[0], _rephrase_row, flag, fast, skips)


def pairs_column(name: str, values: list, *, fast: bool = True, skips: dict | None = None
                 ) -> tuple[pl.Series, list[str | None]]:
    """``locality`` / ``portability`` as List(PAIR), and row errors (a bad row is null);
    rule 7 as ``editing.facts.evaluation_pairs`` words it, pairs without a kind given
    ``DEFAULT_KIND`` as it does."""
    vals = [v if v else [] for v in values]

    def flag(col: pl.Series) -> pl.Series:
        el = pl.element()
        kind = el.struct.field("kind")
        bad_item = (el.is_null() | el.struct.field("aliases").is_not_null()
                    | (kind.is_not_null() & ~kind.str.contains(f"^(?:{KIND_PATTERN})$")))
        for part in (el.struct.field("prompt"), el.struct.field("answer")):
            bad_item = (bad_item | _blank(part) | (part.str.len_chars() > MAX_STRING)
                        | part.str.contains(CONTROL_CHARS))
        return col.to_frame("r").select(
            pl.col("r").list.eval(bad_item).list.any().fill_null(False))["r"]

    col, errs = _checked_column(vals, _arrow_types()[1], lambda v: _pairs_row(name, v), flag,
                                fast, skips)
    col = col.to_frame("r").select(pl.col("r").list.eval(pl.element().struct.with_fields(
        pl.field("kind").fill_null(DEFAULT_KIND))))["r"]
    return col, errs


def frame_from_chunk(chunk: RawChunk) -> pl.DataFrame:
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
        kind = detect_format(obj)
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
    skips: dict[int, list] = {}       # row -> items left out, in fact_from_record's order
    col, errs = rephrase_column([o.get("rephrase_prompts") for o in mapped],
                                fast=chunk.json_types, skips=skips)
    cols["rephrase_prompts"] = col.cast(pl.List(pl.String))
    cols["rephrase_prompts__e"] = pl.Series(errs, dtype=pl.String)
    for name in ("locality", "portability"):
        col, errs = pairs_column(name, [o.get(name) for o in mapped], fast=chunk.json_types,
                                 skips=skips)
        cols[name] = col.cast(pl.List(PAIR))
        cols[name + "__e"] = pl.Series(errs, dtype=pl.String)
    # the optional items left out, "field<SEP>reason" joined by RS (null for most rows):
    # warned in validate_chunk for accepted records only
    left_out = [None] * len(mapped)
    for i, items in skips.items():
        left_out[i] = "\x1e".join(f"{f}{SEP}{r}" for f, r in items)
    cols["_skipped"] = pl.Series(left_out, dtype=pl.String)
    return pl.DataFrame(cols)

