"""The JSON Lines reader: the format a million-record inbox comes in, so the fast one.

The file is read in blocks of whole lines and parsed line by line with orjson; a line over
``ingest.max_line_bytes`` is counted through without being held, so memory stays about one
block whatever the file holds. Depth is checked only on lines with enough brackets to be
too deep, found for the whole block at once.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from typing import BinaryIO, Iterator

from tasks.settings import IngestSettings
from tasks.stream.chunks import (PREVIEW, SURROGATE, UTF8_BOM, RawChunk, decode_reason,
                                 depth_reason, json_type, many_openers, parser_depth_error,
                                 preview, rest_unread, shown, size_reason, too_deep, utf8_len)

try:  # orjson ships with prefect; the stdlib parser is the fallback
    import orjson as _orjson

    def _loads(text: str):
        return _orjson.loads(text)

    _JSON_ERRORS: tuple = (_orjson.JSONDecodeError, ValueError)
except ImportError:  # pragma: no cover
    _loads = json.loads
    _JSON_ERRORS = (json.JSONDecodeError, ValueError, RecursionError)


@dataclass
class _LongLine:
    head: bytes          # its first bytes, for the preview
    size: int            # its length in bytes, without the newline


@dataclass
class _Position:
    """Lines and records read so far, across blocks."""

    line: int = 0
    record: int = 0


def _line_blocks(f: BinaryIO, size: int, max_line: int) -> Iterator[bytes | _LongLine]:
    """``f`` as blocks of whole lines (each ends with a newline but maybe the file's last),
    and a ``_LongLine`` for each line that grows past ``max_line`` bytes before its end: such
    a line is counted through, never held, so memory stays ~ ``size + max_line``."""
    carry = b""
    while True:
        block = f.read(size)
        if not block:
            if carry:
                yield carry
            return
        data = carry + block if carry else block
        cut = data.rfind(b"\n") + 1
        if cut:
            yield data[:cut] if cut < len(data) else data
        carry = data[cut:]
        if len(carry) > max_line:
            head, n, carry = carry[:PREVIEW], len(carry), b""
            while block := f.read(size):
                end = block.find(b"\n")
                if end < 0:
                    n += len(block)
                    continue
                n += end
                carry = block[end + 1:]
                break
            yield _LongLine(head, n)


def read_jsonl(f: BinaryIO, chunk_records: int, limits: IngestSettings,
               enc: str) -> Iterator[RawChunk]:
    """One JSON object a line; blank lines are skipped; ``line`` is the line number."""
    at = _Position()
    if f.read(3) != UTF8_BOM:
        f.seek(0)
    for block in _line_blocks(f, chunk_records * 256, limits.max_line_bytes):
        if block.__class__ is _LongLine:
            chunk = _long_line(block, at, limits)
        else:
            texts, clean = _split_lines(block)
            deep = many_openers(block, limits.max_depth)
            del block                 # the lines' text is all that is needed from here on
            chunk = _parse_lines(texts, clean, deep, at, limits, enc)
        if len(chunk):
            yield chunk
        if at.record > limits.max_records:
            return


def _long_line(line: _LongLine, at: _Position, limits: IngestSettings) -> RawChunk:
    at.line += 1
    at.record += 1
    chunk = RawChunk()
    reason = (rest_unread(limits.max_records) if at.record > limits.max_records
              else size_reason(f"line {at.line}", line.size, limits.max_line_bytes))
    chunk.add(None, at.line, at.record, preview(line.head), reason)
    return chunk


def _split_lines(block: bytes) -> tuple[list[str], bool]:
    """The block's lines, and whether it was clean UTF-8 (bad bytes become surrogates)."""
    try:
        texts, clean = block.decode("utf-8").split("\n"), True
    except UnicodeDecodeError:
        texts, clean = block.decode("utf-8", errors="surrogateescape").split("\n"), False
    if texts and texts[-1] == "":
        texts.pop()
    return texts, clean


def _parse_lines(texts: list[str], clean: bool, deep: set[int], at: _Position,
                 limits: IngestSettings, enc: str) -> RawChunk:
    """The records of one block's lines (the hot loop: locals only, appends inlined)."""
    max_line, max_depth, max_records = limits.max_line_bytes, limits.max_depth, limits.max_records
    short = max_line // 4        # a line of fewer characters cannot be longer in UTF-8 bytes
    chunk = RawChunk()
    objs, lines, records, raws, perrs = (chunk.objs, chunk.lines, chunk.records, chunk.raws,
                                         chunk.perrs)
    loads, errors = _loads, _JSON_ERRORS
    lineno, record = at.line, at.record
    for i, text in enumerate(texts):
        lineno += 1
        if text[-1:] == "\r":
            text = text[:-1]
        if not text or text.isspace():
            continue
        record += 1
        if record > max_records:
            chunk.add(None, lineno, record, shown(text[:PREVIEW]), rest_unread(max_records))
            break
        # invalid bytes decode to lone surrogates, never in ASCII text (isascii is O(1))
        if not clean and not text.isascii() and SURROGATE.search(text):
            chunk.add(None, lineno, record, shown(text), decode_reason(
                text.encode("utf-8", errors="surrogateescape"), enc))
            continue
        if len(text) > short and (n := utf8_len(text)) > max_line:
            chunk.add(None, lineno, record, shown(text[:PREVIEW]),
                      size_reason(f"line {lineno}", n, max_line))
            continue
        try:
            obj = loads(text)
            if obj.__class__ is not dict:
                perr = f"expected a JSON object, got {json_type(obj)}"
            elif deep and i in deep and too_deep(obj, max_depth):
                perr = depth_reason(max_depth)
            else:
                perr = None
        except errors as exc:
            obj = None
            perr = (f"{depth_reason(max_depth)}: {exc.__class__.__name__}: {exc}"
                    if parser_depth_error(exc) else f"malformed JSON: {exc}")
        objs.append(obj if perr is None else {})
        lines.append(lineno)
        records.append(record)
        raws.append(text)
        perrs.append(perr)
    at.line, at.record = lineno, record
    return chunk
