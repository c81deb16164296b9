"""The readers of tabular files, CSV and Parquet: a row is a record, its cells the fields.

CSV cells are strings, so the list fields travel as JSON text in a cell; Parquet keeps its
types, and a file the library cannot read is quarantined whole.
"""
from __future__ import annotations

import csv
import io
import json
from pathlib import Path
from typing import BinaryIO, Iterator

from tasks.settings import IngestSettings
from tasks.stream.chunks import (PREVIEW, SURROGATE, RawChunk, decode_file, depth_reason,
                                 not_text, recursion_reason, rest_unread, shown, size_reason,
                                 too_deep, utf8_len)

LIST_FIELDS = ("rephrase_prompts", "locality", "portability")


def _csv_cell(name: str, value: str):
    """CSV cells are strings; list fields hold JSON text (or one plain rephrasing)."""
    if name in LIST_FIELDS and value[:1] in "[{":
        try:
            return json.loads(value)
        except json.JSONDecodeError:
            return value
    return value


def read_csv(f: BinaryIO, chunk_records: int, limits: IngestSettings,
             enc: str) -> Iterator[RawChunk]:
    """CSV with a header row. Empty cells are absent fields; ``line`` is the row's first line."""
    text, clean = decode_file(f)
    reader = csv.reader(io.StringIO(text, newline=""))
    chunk = RawChunk()
    try:
        header = next(reader)
    except StopIteration:
        return
    except csv.Error as exc:
        chunk.add(None, 1, None, shown(text[:500]), f"malformed CSV header: {exc}")
        yield chunk
        return
    header = [h.strip() for h in header]
    record = 0
    line = reader.line_num + 1
    while True:
        try:
            row = next(reader)
        except StopIteration:
            break
        except csv.Error as exc:
            record += 1
            chunk.add(None, line, record, "", f"malformed CSV: {exc}")
            break
        start, line = line, reader.line_num + 1
        if not any(c.strip() for c in row):
            continue
        record += 1
        if record > limits.max_records:
            chunk.add(None, start, record, shown(json.dumps(row, ensure_ascii=False)[:PREVIEW]),
                      rest_unread(limits.max_records))
            break
        _add_row(chunk, header, row, start, record, clean, limits, enc)
        if len(chunk) >= chunk_records:
            yield chunk
            chunk = RawChunk()
    if len(chunk):
        yield chunk


def _add_row(chunk: RawChunk, header: list[str], row: list[str], line: int, record: int,
             clean: bool, limits: IngestSettings, enc: str) -> None:
    """One CSV row: the record, or its first problem."""
    max_line, max_depth = limits.max_line_bytes, limits.max_depth
    raw = json.dumps(dict(zip(header, row)), ensure_ascii=False)
    if not clean and any(SURROGATE.search(c) for c in row):
        chunk.add(None, line, record, shown(raw), not_text(enc))
    elif len(row) != len(header):
        chunk.add(None, line, record, raw,
                  f"malformed CSV row: {len(row)} cells for {len(header)} columns")
    elif len(raw) > max_line // 4 and (n := utf8_len(raw)) > max_line:
        chunk.add(None, line, record, shown(raw[:PREVIEW]),
                  size_reason(f"record {record}", n, max_line))
    else:
        try:
            obj = {k: _csv_cell(k, v) for k, v in zip(header, row) if v != ""}
            perr = depth_reason(max_depth) if too_deep(obj, max_depth) else None
        except RecursionError as exc:       # a list cell nested past the parser
            obj, perr = None, recursion_reason(exc)
        chunk.add(obj, line, record, raw, perr)


def read_parquet(path: Path, chunk_records: int, limits: IngestSettings) -> Iterator[RawChunk]:
    """Parquet rows; null cells are absent fields; ``line`` is None, ``record`` the row."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        pf = pq.ParquetFile(path)
        # flat columns cannot nest: only a file with list/struct/map columns is checked
        nested = any(pa.types.is_nested(t.type) for t in pf.schema_arrow)
        batches = pf.iter_batches(batch_size=chunk_records)
        record = 0
        for batch in batches:
            chunk = RawChunk(json_types=False)
            for row in batch.to_pylist():
                record += 1
                if record > limits.max_records:
                    chunk.add(None, None, record, "", rest_unread(limits.max_records))
                    yield chunk
                    return
                obj = {k: v for k, v in row.items() if v is not None}
                raw = json.dumps(obj, ensure_ascii=False, default=str)
                if nested and too_deep(obj, limits.max_depth):
                    chunk.add(None, None, record, raw[:2000], depth_reason(limits.max_depth))
                else:
                    chunk.add(obj, None, record, raw)
            yield chunk
    except Exception as exc:  # a corrupt or unreadable file: quarantine it whole
        chunk = RawChunk()
        chunk.add(None, None, None, "", f"unreadable Parquet file: {exc}")
        yield chunk
