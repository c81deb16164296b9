"""What every reader hands on, and the words it uses to refuse a record.

A reader (``tasks.stream.readers``) turns one file into ``RawChunk``s: the parsed records
with their line and record numbers and original text, plus a reason for each record that
could not even be parsed. The readers of the four formats share the limits' checks and the
reasons' wording here, so a record refused in JSONL, JSON or CSV reads the same.
"""
from __future__ import annotations

import codecs
import re
from dataclasses import dataclass, field
from typing import Any, BinaryIO

PREVIEW = 500
UTF8_BOM = codecs.BOM_UTF8
#: invalid bytes decode (``surrogateescape``) to lone surrogates in this range
SURROGATE = re.compile("[\udc80-\udcff]")


@dataclass
class RawChunk:
    """Records of one file as parsed, before field checks. Lists are parallel."""

    objs: list[Any] = field(default_factory=list)        # dict, or {} when perr is set
    lines: list[int | None] = field(default_factory=list)
    records: list[int | None] = field(default_factory=list)
    raws: list[str] = field(default_factory=list)
    perrs: list[str | None] = field(default_factory=list)  # record-level reason, or None
    #: values hold only JSON types (str, int, float, bool, None, list, dict); False for
    #: Parquet, whose bytes values the fast list converters would take for strings
    json_types: bool = True

    def add(self, obj, line, record, raw, perr=None):
        self.objs.append(obj if perr is None else {})
        self.lines.append(line)
        self.records.append(record)
        self.raws.append(raw)
        self.perrs.append(perr)

    def __len__(self):
        return len(self.objs)


def whole_file(head: bytes, reason: str) -> RawChunk:
    """One chunk with one file-level error: the file is quarantined and counted once."""
    chunk = RawChunk()
    chunk.add(None, None, None, preview(head), reason)
    return chunk


# -- text ----------------------------------------------------------------------------------------
def preview(data: bytes, n: int = PREVIEW) -> str:
    return data[:n].decode("utf-8", errors="backslashreplace")


def shown(text: str) -> str:
    """Text with undecodable bytes shown as \\xNN escapes."""
    return text.encode("utf-8", errors="surrogateescape").decode("utf-8", errors="backslashreplace")


def utf8_len(text: str) -> int:
    return len(text.encode("utf-8", errors="surrogateescape"))


def decode_file(f: BinaryIO) -> tuple[str, bool]:
    """The whole file's text without a BOM, and whether it was clean UTF-8 (undecodable
    bytes survive as surrogates, so the record can be quarantined with its reason)."""
    data = f.read()
    if data.startswith(UTF8_BOM):
        data = data[3:]
    try:
        return data.decode("utf-8"), True
    except UnicodeDecodeError:
        return data.decode("utf-8", errors="surrogateescape"), False


# -- nesting ----------------------------------------------------------------------------------
def too_deep(obj, limit: int) -> bool:
    """Whether dicts and lists nest more than ``limit`` levels (``obj`` is level 1).
    Iterative, so no depth can exhaust the stack; visits only containers' items."""
    stack = [(obj, 1)]
    while stack:
        o, d = stack.pop()
        for v in (o.values() if o.__class__ is dict else o):
            if v.__class__ is dict or v.__class__ is list:
                if d >= limit:
                    return True
                stack.append((v, d + 1))
    return False


_KEEP_OPENERS = bytes(b for b in range(256) if b not in b"[{\n")   # bytes.translate's delete


def many_openers(block: bytes, limit: int) -> set[int]:
    """Indices of the lines of ``block`` with more than ``limit`` '[' and '{' together:
    only those can nest deeper than ``limit``. Found in C over the whole block (a per-line
    count would cost the 1M-record ingest about a second)."""
    kept = block.translate(None, _KEEP_OPENERS)
    lines, line, last = set(), 0, 0
    for m in re.finditer(rb"[^\n]{%d,}" % (limit + 1), kept):
        line += kept.count(b"\n", last, m.start())
        last = m.start()
        lines.add(line)
    return lines


def parser_depth_error(exc: Exception) -> bool:
    """The parser gave up on nesting (orjson stops at 1024 levels, the stdlib at Python's
    recursion limit)."""
    return exc.__class__ is RecursionError or "depth limit" in str(exc)


# -- reasons ----------------------------------------------------------------------------------
def not_text(enc: str) -> str:
    return "undecodable bytes: not UTF-8" if enc == "UTF-8" else \
        f"undecodable bytes: not valid {enc}"


def decode_reason(raw: bytes, enc: str = "UTF-8") -> str:
    if enc != "UTF-8":    # offsets in the transcoded text would mislead
        return not_text(enc)
    try:
        raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        return f"undecodable bytes: not UTF-8 ({exc.reason} at byte {exc.start})"
    return "undecodable bytes: not UTF-8"


def depth_reason(limit: int) -> str:
    return f"nested deeper than {limit} levels (ingest.max_depth)"


def recursion_reason(exc: RecursionError) -> str:
    return f"nested too deeply to parse (RecursionError: {exc})"


def size_reason(what: str, n: int, limit: int) -> str:
    return f"{what} is {n:,} bytes, longer than the limit of {limit:,} (ingest.max_line_bytes)"


def rest_unread(limit: int) -> str:
    return (f"more than {limit:,} records in this file (ingest.max_records); the rest of the "
            "file from this record on was not read")


def json_type(obj) -> str:
    return {list: "list", str: "str", int: "int", float: "float", bool: "bool",
            type(None): "null"}.get(obj.__class__, type(obj).__name__)

