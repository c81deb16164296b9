"""Where fact updates come from: the inbox (any fsspec URL), ``submit``, the archive, and
readers for every input format.

A reader turns one file into ``RawChunk``s: the parsed records with their line and record
numbers and original text, plus a reason for each record that could not even be parsed
(undecodable bytes, a malformed line, a non-object). Field-level checks happen later,
vectorised, in ``tasks.stream.validate``.

What one file may cost is bounded by ``ReadLimits`` (``params.yaml`` ``ingest:``): a file
too large is not parsed, an over-long line or record, one nested too deep and the records
past ``max_records`` are quarantined with their reason. Text files with a UTF-16 or UTF-32
byte-order mark are transcoded to UTF-8 first, so every reader sees UTF-8 bytes.
"""
from __future__ import annotations

import codecs
import csv
import hashlib
import io
import json
import os
import re
import tempfile
import uuid
from dataclasses import dataclass, field, fields
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, BinaryIO, Iterator

from tasks.stream.workspace import Home

try:  # orjson ships with prefect; the stdlib parser is the fallback
    import orjson as _orjson

    def _loads(text: str):
        return _orjson.loads(text)

    _JSON_ERRORS: tuple = (_orjson.JSONDecodeError, ValueError)
except ImportError:  # pragma: no cover
    _loads = json.loads
    _JSON_ERRORS = (json.JSONDecodeError, ValueError, RecursionError)

CHUNK_RECORDS = 100_000
_BUF = 1 << 20
_SURROGATE = re.compile("[\udc80-\udcff]")
FORMAT_BY_SUFFIX = {".jsonl": "jsonl", ".ndjson": "jsonl", ".json": "json", ".csv": "csv",
                    ".parquet": "parquet", ".pq": "parquet"}
FORMATS = ("jsonl", "json", "csv", "parquet")
PREVIEW = 500
#: Byte-order marks, UTF-32 first: the UTF-32-LE mark begins with the UTF-16-LE one.
BOMS = ((codecs.BOM_UTF32_LE, "utf-32-le", "UTF-32-LE"),
        (codecs.BOM_UTF32_BE, "utf-32-be", "UTF-32-BE"),
        (codecs.BOM_UTF16_LE, "utf-16-le", "UTF-16-LE"),
        (codecs.BOM_UTF16_BE, "utf-16-be", "UTF-16-BE"))
UTF8_BOM = codecs.BOM_UTF8


@dataclass(frozen=True)
class ReadLimits:
    """What one input file may cost. Defaults are ``params.yaml``'s ``ingest:`` values."""

    max_file_bytes: int = 4 << 30       # JSON and CSV are read whole: memory ~ 2-3x this
    max_line_bytes: int = 1 << 20       # one JSONL line / JSON-array record / CSV row
    max_records: int = 10_000_000       # per file
    max_depth: int = 32                 # nesting of one record (the record itself is 1)
    max_read_attempts: int = 2          # runs that may die while reading one file

    @classmethod
    def from_params(cls, params: dict | None = None) -> "ReadLimits":
        """The ``ingest:`` section of ``params`` (default: ``editing.params.load_params()``,
        which honours ``$LEDIT_PARAMS``); absent keys keep their defaults."""
        if params is None:
            from editing.params import load_params

            try:
                params = load_params()
            except FileNotFoundError:
                if os.environ.get("LEDIT_PARAMS"):
                    raise
                params = {}           # installed without the repo's params.yaml
        section = params.get("ingest") or {}
        names = {f.name for f in fields(cls)}
        unknown = sorted(set(section) - names)
        if unknown:
            raise ValueError(f"params ingest: unknown keys {unknown}; expected {sorted(names)}")
        for key, value in section.items():
            if value.__class__ is not int or value < 1:
                raise ValueError(f"params ingest.{key}: expected a positive integer, "
                                 f"got {value!r}")
        return cls(**section)


# -- inbox --------------------------------------------------------------------
def inbox_fs(url: str):
    """``(filesystem, root path)`` for an inbox URL or local directory."""
    import fsspec

    fs, path = fsspec.core.url_to_fs(url)
    return fs, path.rstrip("/") or "/"


def _stamp() -> str:
    return datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%S%fZ")


def submit(paths: list[str | os.PathLike], home: str | os.PathLike | Home | None = None, *,
           inbox: str | None = None) -> list[str]:
    """Copy files into the inbox atomically; returns their inbox paths.

    Each copy is written under a hidden temporary name and renamed when complete, so an
    ingest never sees half a file. The name gets a UTC timestamp prefix, so the inbox's
    name order is the arrival order (used to break ties between equal ``observed_at``).
    """
    h = home if isinstance(home, Home) else Home.at(home)
    if inbox is None:
        h.ensure()
    url = inbox or h.inbox_url
    fs, root = inbox_fs(url)
    fs.makedirs(root, exist_ok=True)
    out = []
    for src in paths:
        src = Path(src)
        if not src.is_file():
            raise FileNotFoundError(f"not a file: {src}")
        final = f"{root}/{_stamp()}-{src.name}"
        tmp = f"{root}/.tmp-{uuid.uuid4().hex}-{src.name}"
        with open(src, "rb") as fin, fs.open(tmp, "wb") as fout:
            while block := fin.read(_BUF):
                fout.write(block)
        fs.mv(tmp, final)
        out.append(final)
    return out


@dataclass
class InboxFile:
    path: str            # path inside the inbox filesystem
    name: str            # base name


def list_inbox(url: str) -> list[InboxFile]:
    """Complete files in the inbox, in name (arrival) order; hidden/temporary names skipped."""
    fs, root = inbox_fs(url)
    if not fs.exists(root):
        return []
    files = []
    for info in fs.ls(root, detail=True):
        if info.get("type") != "file":
            continue
        name = info["name"].rstrip("/").rsplit("/", 1)[-1]
        if name.startswith("."):
            continue
        files.append(InboxFile(path=info["name"], name=name))
    return sorted(files, key=lambda f: f.name)


def archive_path(home: Home, sha: str, name: str) -> Path:
    return home.archive / sha[:2] / f"{sha}-{name}"


def archive_from_inbox(home: Home, fs, item: InboxFile) -> tuple[str, Path, int]:
    """Copy an inbox file into the archive (content-addressed), hashing as it streams.

    Returns ``(sha256, archived path, size)``. The archived copy is written atomically and
    never replaced or deleted.
    """
    h = hashlib.sha256()
    home.archive.mkdir(parents=True, exist_ok=True)
    tmp = home.archive / f".in-{uuid.uuid4().hex}"
    size = 0
    try:
        with fs.open(item.path, "rb") as fin, open(tmp, "wb") as fout:
            while block := fin.read(_BUF):
                h.update(block)
                fout.write(block)
                size += len(block)
            fout.flush()
            os.fsync(fout.fileno())
        sha = h.hexdigest()
        dest = archive_path(home, sha, item.name)
        dest.parent.mkdir(parents=True, exist_ok=True)
        if dest.exists():
            tmp.unlink()
        else:
            os.replace(tmp, dest)
            os.chmod(dest, 0o444)
        return sha, dest, size
    finally:
        if tmp.exists():
            tmp.unlink()


def sha256_of(fs, path: str) -> str | None:
    h = hashlib.sha256()
    try:
        with fs.open(path, "rb") as f:
            while block := f.read(_BUF):
                h.update(block)
    except FileNotFoundError:
        return None
    return h.hexdigest()


# -- readers ------------------------------------------------------------------
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


def detect_file_format(path: Path, head: bytes) -> str | None:
    fmt = FORMAT_BY_SUFFIX.get(path.suffix.lower())
    if fmt:
        return fmt
    if head.startswith(b"PAR1"):
        return "parquet"
    text = head.lstrip(b"\xef\xbb\xbf \t\r\n")
    if text.startswith(b"["):
        return "json"
    if text.startswith(b"{"):
        return "jsonl"
    return None


def _whole_file(head: bytes, reason: str) -> RawChunk:
    """One chunk with one file-level error: the file is quarantined and counted once."""
    chunk = RawChunk()
    chunk.add(None, None, None, _preview(head), reason)
    return chunk


def bom_encoding(head: bytes) -> tuple[str, str, int] | None:
    """``(codec, label, BOM length)`` for a UTF-16/UTF-32 byte-order mark, else None."""
    for bom, codec, label in BOMS:
        if head.startswith(bom):
            return codec, label, len(bom)
    return None


def read_file(path: str | os.PathLike, fmt: str | None = None,
              chunk_records: int = CHUNK_RECORDS,
              limits: ReadLimits | None = None) -> Iterator[RawChunk]:
    """Chunks of raw records from one file, whatever its format.

    A file that cannot be read at all (unknown format, a corrupt Parquet file, over
    ``limits.max_file_bytes``) yields one chunk with one record-level error, so it is
    quarantined and counted, never dropped. UTF-16/32 text with a BOM is read as UTF-8.
    """
    path = Path(path)
    limits = limits or ReadLimits()
    with open(path, "rb") as f:
        head = f.read(4096)
        size = os.fstat(f.fileno()).st_size
    if size > limits.max_file_bytes:
        yield _whole_file(head, f"file is {size:,} bytes, over the limit of "
                                f"{limits.max_file_bytes:,} (ingest.max_file_bytes); not read")
        return
    fmt = fmt or FORMAT_BY_SUFFIX.get(path.suffix.lower())
    bom = bom_encoding(head)
    if fmt == "parquet" or (fmt is None and bom is None and head.startswith(b"PAR1")):
        yield from _read_parquet(path, chunk_records, limits)
        return
    label = bom[1] if bom else "UTF-8"
    try:
        src = _transcoded(path, bom, limits) if bom else open(path, "rb")
    except _TooLarge as exc:
        yield _whole_file(head, f"file is {exc.size:,} bytes or more once transcoded from "
                                f"{label} to UTF-8, over the limit of "
                                f"{limits.max_file_bytes:,} (ingest.max_file_bytes); not read")
        return
    with src:
        if fmt is None:
            fmt = detect_file_format(path, src.read(4096))   # sniffed on UTF-8 text
            src.seek(0)
        if fmt is None:
            yield _whole_file(head, "unknown file format: expected .jsonl, .json, .csv or "
                                    ".parquet")
            return
        reader = {"jsonl": _read_jsonl, "json": _read_json, "csv": _read_csv}[fmt]
        yield from reader(src, chunk_records, limits, label)


class _TooLarge(Exception):
    def __init__(self, size: int):
        super().__init__(size)
        self.size = size


def _flag_undecodable(exc: UnicodeDecodeError) -> tuple[str, int]:
    # A lone surrogate, written out with surrogatepass, is invalid UTF-8 again: the record
    # holding the bad bytes is then quarantined as undecodable, like bad UTF-8.
    return "\udcff", exc.end


codecs.register_error("ledit.flag_undecodable", _flag_undecodable)


def _transcoded(path: Path, bom: tuple[str, str, int], limits: ReadLimits) -> BinaryIO:
    """The file after its BOM as UTF-8 bytes, in a spooled temporary file (on disk when
    large), at most ``limits.max_file_bytes`` long."""
    codec, _, skip = bom
    decoder = codecs.getincrementaldecoder(codec)(errors="ledit.flag_undecodable")
    out = tempfile.SpooledTemporaryFile(max_size=64 << 20, prefix="ledit-utf8-")
    try:
        with open(path, "rb") as f:
            f.seek(skip)
            while True:
                block = f.read(_BUF)
                out.write(decoder.decode(block, final=not block)
                          .encode("utf-8", errors="surrogatepass"))
                if out.tell() > limits.max_file_bytes:
                    raise _TooLarge(out.tell())
                if not block:
                    break
        out.seek(0)
        return out
    except BaseException:
        out.close()
        raise


def _preview(data: bytes, n: int = PREVIEW) -> str:
    return data[:n].decode("utf-8", errors="backslashreplace")


def _not_text(enc: str) -> str:
    return "undecodable bytes: not UTF-8" if enc == "UTF-8" else \
        f"undecodable bytes: not valid {enc}"


def _decode_reason(raw: bytes, enc: str = "UTF-8") -> str:
    if enc != "UTF-8":    # offsets in the transcoded text would mislead
        return _not_text(enc)
    try:
        raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        return f"undecodable bytes: not UTF-8 ({exc.reason} at byte {exc.start})"
    return "undecodable bytes: not UTF-8"


def _too_deep(obj, limit: int) -> bool:
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


def _many_openers(block: bytes, limit: int) -> set[int]:
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


def _depth_reason(limit: int) -> str:
    return f"nested deeper than {limit} levels (ingest.max_depth)"


def _parser_depth_error(exc: Exception) -> bool:
    """The parser gave up on nesting (orjson stops at 1024 levels, the stdlib at Python's
    recursion limit)."""
    return exc.__class__ is RecursionError or "depth limit" in str(exc)


def _utf8_len(text: str) -> int:
    return len(text.encode("utf-8", errors="surrogateescape"))


def _size_reason(what: str, n: int, limit: int) -> str:
    return f"{what} is {n:,} bytes, longer than the limit of {limit:,} (ingest.max_line_bytes)"


def _rest_unread(limit: int) -> str:
    return (f"more than {limit:,} records in this file (ingest.max_records); the rest of the "
            "file from this record on was not read")


def _json_type(obj) -> str:
    return {list: "list", str: "str", int: "int", float: "float", bool: "bool",
            type(None): "null"}.get(obj.__class__, type(obj).__name__)


@dataclass
class _LongLine:
    head: bytes          # its first bytes, for the preview
    size: int            # its length in bytes, without the newline


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


def _read_jsonl(f: BinaryIO, chunk_records: int, limits: ReadLimits,
                enc: str = "UTF-8") -> Iterator[RawChunk]:
    lineno = 0
    record = 0
    max_line, max_depth, max_records = limits.max_line_bytes, limits.max_depth, limits.max_records
    short = max_line // 4        # a line of fewer characters cannot be longer in UTF-8 bytes
    if f.read(3) != UTF8_BOM:
        f.seek(0)
    for block in _line_blocks(f, chunk_records * 256, max_line):
        chunk = RawChunk()
        if block.__class__ is _LongLine:
            lineno += 1
            record += 1
            if record > max_records:
                chunk.add(None, lineno, record, _preview(block.head), _rest_unread(max_records))
                yield chunk
                return
            chunk.add(None, lineno, record, _preview(block.head),
                      _size_reason(f"line {lineno}", block.size, max_line))
            yield chunk
            continue
        try:
            texts = block.decode("utf-8").split("\n")
            clean = True
        except UnicodeDecodeError:
            texts = block.decode("utf-8", errors="surrogateescape").split("\n")
            clean = False
        if texts and texts[-1] == "":
            texts.pop()
        deep = _many_openers(block, max_depth)
        del block
        objs, lines, records, raws, perrs = (chunk.objs, chunk.lines, chunk.records,
                                             chunk.raws, chunk.perrs)
        loads, errors = _loads, _JSON_ERRORS
        truncated = False
        for i, text in enumerate(texts):
            lineno += 1
            if text[-1:] == "\r":
                text = text[:-1]
            if not text or text.isspace():
                continue
            record += 1
            if record > max_records:
                chunk.add(None, lineno, record, _shown(text[:PREVIEW]), _rest_unread(max_records))
                truncated = True
                break
            # invalid bytes decode to lone surrogates, never in ASCII text (isascii is O(1))
            if not clean and not text.isascii() and _SURROGATE.search(text):
                chunk.add(None, lineno, record, _shown(text), _decode_reason(
                    text.encode("utf-8", errors="surrogateescape"), enc))
                continue
            if len(text) > short and (n := _utf8_len(text)) > max_line:
                chunk.add(None, lineno, record, _shown(text[:PREVIEW]),
                          _size_reason(f"line {lineno}", n, max_line))
                continue
            try:
                obj = loads(text)
                if obj.__class__ is not dict:
                    perr = f"expected a JSON object, got {_json_type(obj)}"
                elif deep and i in deep and _too_deep(obj, max_depth):
                    perr = _depth_reason(max_depth)
                else:
                    perr = None
            except errors as exc:
                obj = None
                perr = (f"{_depth_reason(max_depth)}: {exc.__class__.__name__}: {exc}"
                        if _parser_depth_error(exc) else f"malformed JSON: {exc}")
            objs.append(obj if perr is None else {})
            lines.append(lineno)
            records.append(record)
            raws.append(text)
            perrs.append(perr)
        if len(chunk):
            yield chunk
        if truncated:
            return


class gc_paused:
    """Pause Python's cyclic GC while building many small objects (dicts of parsed
    records): collections over them cost more than the parsing. Reference counting still
    frees everything; the GC is restored on exit."""

    def __enter__(self):
        import gc

        self._was = gc.isenabled()
        gc.disable()

    def __exit__(self, *exc):
        import gc

        if self._was:
            gc.enable()


def _shown(text: str) -> str:
    """Text with undecodable bytes shown as \\xNN escapes."""
    return text.encode("utf-8", errors="surrogateescape").decode("utf-8", errors="backslashreplace")


def _decode_file(f: BinaryIO) -> tuple[str, bool]:
    """The file's text without a BOM, and whether it was clean UTF-8 (undecodable
    bytes survive as surrogates, so the record can be quarantined with its reason)."""
    data = f.read()
    if data.startswith(UTF8_BOM):
        data = data[3:]
    try:
        return data.decode("utf-8"), True
    except UnicodeDecodeError:
        return data.decode("utf-8", errors="surrogateescape"), False


def _recursion_reason(exc: RecursionError) -> str:
    return f"nested too deeply to parse (RecursionError: {exc})"


def _json_object(text: str, clean: bool, limits: ReadLimits, enc: str) -> RawChunk | None:
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
        obj, perr = None, _recursion_reason(exc)
    if not clean and _SURROGATE.search(stripped):
        chunk.add(None, 1, 1, _shown(stripped[:2000]), _not_text(enc))
        return chunk
    if perr is None:
        if obj.__class__ is not dict:
            perr = f"expected a JSON array or object, got {_json_type(obj)}"
        elif (n := _utf8_len(stripped)) > limits.max_line_bytes:
            perr = _size_reason("the record", n, limits.max_line_bytes)
        elif _too_deep(obj, limits.max_depth):
            perr = _depth_reason(limits.max_depth)
    chunk.add(obj, 1, 1, stripped[:2000], perr)
    return chunk


def _read_json(f: BinaryIO, chunk_records: int, limits: ReadLimits,
               enc: str = "UTF-8") -> Iterator[RawChunk]:
    """A JSON array of records (CounterFact, zsRE, KnowEdit, or the project schema), a
    single JSON object, or JSON Lines saved as .json. Records carry their starting line."""
    text, clean = _decode_file(f)
    start = len(text) - len(text.lstrip())
    if not text[start:start + 1] == "[":
        chunk = _json_object(text, clean, limits, enc)
        del text
        if chunk is None:                       # JSON Lines under a .json name
            f.seek(0)
            yield from _read_jsonl(f, chunk_records, limits, enc)
        elif len(chunk):
            yield chunk
        return
    max_line, max_depth, max_records = limits.max_line_bytes, limits.max_depth, limits.max_records
    short = max_line // 4
    dec = json.JSONDecoder()
    ws = re.compile(r"[ \t\r\n]*")
    pos = ws.match(text, start + 1).end()
    line, line_pos = 1, 0
    record = 0
    chunk = RawChunk()

    def line_at(p):
        nonlocal line, line_pos
        line += text.count("\n", line_pos, p)
        line_pos = p
        return line

    if text[pos:pos + 1] == "]":
        return
    while True:
        record += 1
        if record > max_records:
            chunk.add(None, line_at(pos), record, _shown(text[pos:pos + PREVIEW]),
                      _rest_unread(max_records))
            break
        try:
            obj, end = dec.raw_decode(text, pos)
        except json.JSONDecodeError as exc:
            ln = line_at(pos)
            chunk.add(None, ln, record, _shown(text[pos:pos + 2000]),
                      f"malformed JSON: {exc.msg} (line {exc.lineno}); the rest of the file "
                      "from this record on cannot be read")
            break
        except RecursionError as exc:       # where the record ends is unknown
            chunk.add(None, line_at(pos), record, _shown(text[pos:pos + PREVIEW]),
                      _recursion_reason(exc) + "; the rest of the file from this record on "
                      "cannot be read")
            break
        ln = line_at(pos)
        raw = text[pos:end]
        if not clean and _SURROGATE.search(raw):
            chunk.add(None, ln, record, _shown(raw), _not_text(enc))
        elif obj.__class__ is not dict:
            chunk.add(None, ln, record, raw, f"expected a JSON object, got {_json_type(obj)}")
        elif end - pos > short and (n := _utf8_len(raw)) > max_line:
            chunk.add(None, ln, record, raw[:PREVIEW], _size_reason(f"record {record}", n,
                                                                  max_line))
        elif (raw.count("{") + raw.count("[") > max_depth and _too_deep(obj, max_depth)):
            chunk.add(None, ln, record, raw[:2000], _depth_reason(max_depth))
        else:
            chunk.add(obj, ln, record, raw)
        if len(chunk) >= chunk_records:
            yield chunk
            chunk = RawChunk()
        pos = ws.match(text, end).end()
        nxt = text[pos:pos + 1]
        if nxt == ",":
            pos = ws.match(text, pos + 1).end()
            continue
        if nxt == "]":
            break
        record += 1
        chunk.add(None, line_at(pos), record, _shown(text[pos:pos + 2000]),
                  "malformed JSON: expected ',' or ']' between records; the rest of the file "
                  "from here on cannot be read")
        break
    if len(chunk):
        yield chunk


LIST_FIELDS = ("rephrase_prompts", "locality", "portability")


def _csv_cell(name: str, value: str):
    """CSV cells are strings; list fields hold JSON text (or one plain rephrasing)."""
    if name in LIST_FIELDS and value[:1] in "[{":
        try:
            return json.loads(value)
        except json.JSONDecodeError:
            return value
    return value


def _read_csv(f: BinaryIO, chunk_records: int, limits: ReadLimits,
              enc: str = "UTF-8") -> Iterator[RawChunk]:
    """CSV with a header row. Empty cells are absent fields; ``line`` is the row's first line."""
    text, clean = _decode_file(f)
    reader = csv.reader(io.StringIO(text, newline=""))
    chunk = RawChunk()
    try:
        header = next(reader)
    except StopIteration:
        return
    except csv.Error as exc:
        chunk.add(None, 1, None, _shown(text[:500]), f"malformed CSV header: {exc}")
        yield chunk
        return
    header = [h.strip() for h in header]
    max_line, max_depth, max_records = limits.max_line_bytes, limits.max_depth, limits.max_records
    short = max_line // 4
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
        if record > max_records:
            chunk.add(None, start, record, _shown(json.dumps(row, ensure_ascii=False)[:PREVIEW]),
                      _rest_unread(max_records))
            break
        raw = json.dumps(dict(zip(header, row)), ensure_ascii=False)
        if not clean and any(_SURROGATE.search(c) for c in row):
            chunk.add(None, start, record, _shown(raw), _not_text(enc))
        elif len(row) != len(header):
            chunk.add(None, start, record, raw,
                      f"malformed CSV row: {len(row)} cells for {len(header)} columns")
        elif len(raw) > short and (n := _utf8_len(raw)) > max_line:
            chunk.add(None, start, record, _shown(raw[:PREVIEW]),
                      _size_reason(f"record {record}", n, max_line))
        else:
            try:
                obj = {k: _csv_cell(k, v) for k, v in zip(header, row) if v != ""}
                perr = _depth_reason(max_depth) if _too_deep(obj, max_depth) else None
            except RecursionError as exc:       # a list cell nested past the parser
                obj, perr = None, _recursion_reason(exc)
            chunk.add(obj, start, record, raw, perr)
        if len(chunk) >= chunk_records:
            yield chunk
            chunk = RawChunk()
    if len(chunk):
        yield chunk


def _read_parquet(path: Path, chunk_records: int, limits: ReadLimits) -> Iterator[RawChunk]:
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
                    chunk.add(None, None, record, "", _rest_unread(limits.max_records))
                    yield chunk
                    return
                obj = {k: v for k, v in row.items() if v is not None}
                raw = json.dumps(obj, ensure_ascii=False, default=str)
                if nested and _too_deep(obj, limits.max_depth):
                    chunk.add(None, None, record, raw[:2000], _depth_reason(limits.max_depth))
                else:
                    chunk.add(obj, None, record, raw)
            yield chunk
    except Exception as exc:  # a corrupt or unreadable file: quarantine it whole
        chunk = RawChunk()
        chunk.add(None, None, None, "", f"unreadable Parquet file: {exc}")
        yield chunk
