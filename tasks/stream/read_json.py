"""The JSON reader: an array of records (CounterFact, zsRE, KnowEdit, or the project's
schema), a single object, or JSON Lines saved under a .json name.

An array is decoded one record at a time (``raw_decode``), so each record gets its own
line number and its own reason; a record the decoder cannot get past ends the file there,
and the rest is one quarantine entry.
"""
from __future__ import annotations

import json
import re
from typing import BinaryIO, Iterator

from tasks.settings import IngestSettings
from tasks.stream.chunks import (PREVIEW, SURROGATE, RawChunk, decode_file, depth_reason,
                                 json_type, not_text, recursion_reason, rest_unread, shown,
                                 size_reason, too_deep, utf8_len)
from tasks.stream.read_jsonl import read_jsonl

_WS = re.compile(r"[ \t\r\n]*")
_REST = "; the rest of the file from this record on cannot be read"


def read_json(f: BinaryIO, chunk_records: int, limits: IngestSettings,
              enc: str) -> Iterator[RawChunk]:
    """Records carry their starting line."""
    text, clean = decode_file(f)
    start = len(text) - len(text.lstrip())
    if not text[start:start + 1] == "[":
        chunk = _json_object(text, clean, limits, enc)
        del text
        if chunk is None:                       # JSON Lines under a .json name
            f.seek(0)
            yield from read_jsonl(f, chunk_records, limits, enc)
        elif len(chunk):
            yield chunk
        return
    yield from _json_array(text, start, clean, chunk_records, limits, enc)


def _json_object(text: str, clean: bool, limits: IngestSettings, enc: str) -> RawChunk | None:
    """A .json file that is not an array: one record (a single object), or None when it
    is JSON Lines under a .json name."""
    stripped = text.strip()
    chunk = RawChunk()
    if not stripped:
        return chunk
    try:
        obj, perr = json.loads(stripped), None
    except json.JSONDecodeError as exc:
        if stripped.startswith("{") and "\n" in stripped:
            return None
        obj, perr = None, f"malformed JSON: {exc.msg} (line {exc.lineno})"
    except RecursionError as exc:
        obj, perr = None, recursion_reason(exc)
    if not clean and SURROGATE.search(stripped):
        chunk.add(None, 1, 1, shown(stripped[:2000]), not_text(enc))
        return chunk
    if perr is None:
        if obj.__class__ is not dict:
            perr = f"expected a JSON array or object, got {json_type(obj)}"
        elif (n := utf8_len(stripped)) > limits.max_line_bytes:
            perr = size_reason("the record", n, limits.max_line_bytes)
        elif too_deep(obj, limits.max_depth):
            perr = depth_reason(limits.max_depth)
    chunk.add(obj, 1, 1, stripped[:2000], perr)
    return chunk


class _Lines:
    """The line number of positions in ``text``, asked in increasing order."""

    def __init__(self, text: str):
        self.text, self.line, self.pos = text, 1, 0

    def at(self, pos: int) -> int:
        self.line += self.text.count("\n", self.pos, pos)
        self.pos = pos
        return self.line


def _json_array(text: str, start: int, clean: bool, chunk_records: int,
                limits: IngestSettings, enc: str) -> Iterator[RawChunk]:
    """The records of the array opening at ``text[start]``."""
    dec = json.JSONDecoder()
    pos = _WS.match(text, start + 1).end()
    if text[pos:pos + 1] == "]":
        return
    lines = _Lines(text)
    record = 0
    chunk = RawChunk()
    while True:
        record += 1
        if record > limits.max_records:
            chunk.add(None, lines.at(pos), record, shown(text[pos:pos + PREVIEW]),
                      rest_unread(limits.max_records))
            break
        try:
            obj, end = dec.raw_decode(text, pos)
        except json.JSONDecodeError as exc:
            chunk.add(None, lines.at(pos), record, shown(text[pos:pos + 2000]),
                      f"malformed JSON: {exc.msg} (line {exc.lineno}){_REST}")
            break
        except RecursionError as exc:       # where the record ends is unknown
            chunk.add(None, lines.at(pos), record, shown(text[pos:pos + PREVIEW]),
                      recursion_reason(exc) + _REST)
            break
        _add_record(chunk, obj, text[pos:end], lines.at(pos), record, clean, limits, enc)
        if len(chunk) >= chunk_records:
            yield chunk
            chunk = RawChunk()
        pos = _WS.match(text, end).end()
        nxt = text[pos:pos + 1]
        if nxt == ",":
            pos = _WS.match(text, pos + 1).end()
            continue
        if nxt == "]":
            break
        record += 1
        chunk.add(None, lines.at(pos), record, shown(text[pos:pos + 2000]),
                  "malformed JSON: expected ',' or ']' between records; the rest of the file "
                  "from here on cannot be read")
        break
    if len(chunk):
        yield chunk


def _add_record(chunk: RawChunk, obj, raw: str, line: int, record: int, clean: bool,
                limits: IngestSettings, enc: str) -> None:
    """One decoded array item: the record, or its first problem."""
    max_line, max_depth = limits.max_line_bytes, limits.max_depth
    if not clean and SURROGATE.search(raw):
        chunk.add(None, line, record, shown(raw), not_text(enc))
    elif obj.__class__ is not dict:
        chunk.add(None, line, record, raw, f"expected a JSON object, got {json_type(obj)}")
    elif len(raw) > max_line // 4 and (n := utf8_len(raw)) > max_line:
        chunk.add(None, line, record, raw[:PREVIEW], size_reason(f"record {record}", n, max_line))
    elif raw.count("{") + raw.count("[") > max_depth and too_deep(obj, max_depth):
        chunk.add(None, line, record, raw[:2000], depth_reason(max_depth))
    else:
        chunk.add(obj, line, record, raw)
