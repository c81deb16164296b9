"""Where fact updates come from: the inbox (any fsspec URL), ``submit``, the archive, and
readers for every input format.

A reader turns one file into ``RawChunk``s: the parsed records with their line and record
numbers and original text, plus a reason for each record that could not even be parsed
(undecodable bytes, a malformed line, a non-object). Field-level checks happen later,
vectorised, in ``tasks.validate``.
"""
from __future__ import annotations

import csv
import hashlib
import io
import json
import os
import re
import uuid
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Iterator

from tasks.workspace import Home

try:  # orjson ships with prefect; the stdlib parser is the fallback
    import orjson as _orjson

    def _loads(text: str):
        return _orjson.loads(text)

    _JSON_ERRORS: tuple = (_orjson.JSONDecodeError, ValueError)
except ImportError:  # pragma: no cover
    _loads = json.loads
    _JSON_ERRORS = (json.JSONDecodeError, ValueError)

CHUNK_RECORDS = 100_000
_BUF = 1 << 20
_SURROGATE = re.compile("[\udc80-\udcff]")
FORMAT_BY_SUFFIX = {".jsonl": "jsonl", ".ndjson": "jsonl", ".json": "json", ".csv": "csv",
                    ".parquet": "parquet", ".pq": "parquet"}
FORMATS = ("jsonl", "json", "csv", "parquet")


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


def read_file(path: str | os.PathLike, fmt: str | None = None,
              chunk_records: int = CHUNK_RECORDS) -> Iterator[RawChunk]:
    """Chunks of raw records from one file, whatever its format.

    A file that cannot be read at all (unknown format, a corrupt Parquet file) yields one
    chunk with one record-level error, so it is quarantined and counted, never dropped.
    """
    path = Path(path)
    with open(path, "rb") as f:
        head = f.read(4096)
    fmt = fmt or detect_file_format(path, head)
    if fmt is None:
        chunk = RawChunk()
        chunk.add(None, None, None, _preview(head),
                  "unknown file format: expected .jsonl, .json, .csv or .parquet")
        yield chunk
        return
    reader = {"jsonl": _read_jsonl, "json": _read_json, "csv": _read_csv,
              "parquet": _read_parquet}[fmt]
    yield from reader(path, chunk_records)


def _preview(data: bytes, n: int = 500) -> str:
    return data[:n].decode("utf-8", errors="backslashreplace")


def _decode_reason(raw: bytes) -> str:
    try:
        raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        return f"undecodable bytes: not UTF-8 ({exc.reason} at byte {exc.start})"
    return "undecodable bytes: not UTF-8"


def _json_type(obj) -> str:
    return {list: "list", str: "str", int: "int", float: "float", bool: "bool",
            type(None): "null"}.get(obj.__class__, type(obj).__name__)


def _read_jsonl(path: Path, chunk_records: int) -> Iterator[RawChunk]:
    lineno = 0
    record = 0
    with open(path, "rb") as f:
        first = True
        while True:
            blines = f.readlines(chunk_records * 256)
            if not blines:
                break
            if first and blines[0].startswith(b"\xef\xbb\xbf"):
                blines[0] = blines[0][3:]
            first = False
            joined = b"".join(blines)
            try:
                texts = joined.decode("utf-8").split("\n")
                clean = True
            except UnicodeDecodeError:
                texts = joined.decode("utf-8", errors="surrogateescape").split("\n")
                clean = False
            if texts and texts[-1] == "":
                texts.pop()
            undecodable = set() if clean else _undecodable_lines(blines)
            chunk = RawChunk()
            objs, lines, records, raws, perrs = (chunk.objs, chunk.lines, chunk.records,
                                                 chunk.raws, chunk.perrs)
            loads, errors = _loads, _JSON_ERRORS
            for i, text in enumerate(texts):
                lineno += 1
                if text[-1:] == "\r":
                    text = text[:-1]
                if not text or text.isspace():
                    continue
                record += 1
                if i in undecodable:
                    chunk.add(None, lineno, record, _shown(text), _decode_reason(blines[i]))
                    continue
                try:
                    obj = loads(text)
                    perr = None if obj.__class__ is dict else \
                        f"expected a JSON object, got {_json_type(obj)}"
                except errors as exc:
                    obj, perr = None, f"malformed JSON: {exc}"
                objs.append(obj if perr is None else {})
                lines.append(lineno)
                records.append(record)
                raws.append(text)
                perrs.append(perr)
            if len(chunk):
                yield chunk


def _undecodable_lines(blines: list[bytes]) -> set[int]:
    """Indices of the lines that are not valid UTF-8."""
    bad = set()
    for i, b in enumerate(blines):
        try:
            b.decode("utf-8")
        except UnicodeDecodeError:
            bad.add(i)
    return bad


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


def _decode_file(path: Path) -> tuple[str, bool]:
    """The file's text without a BOM, and whether it was clean UTF-8 (undecodable
    bytes survive as surrogates, so the record can be quarantined with its reason)."""
    data = path.read_bytes()
    if data.startswith(b"\xef\xbb\xbf"):
        data = data[3:]
    try:
        return data.decode("utf-8"), True
    except UnicodeDecodeError:
        return data.decode("utf-8", errors="surrogateescape"), False


def _read_json(path: Path, chunk_records: int) -> Iterator[RawChunk]:
    """A JSON array of records (CounterFact, zsRE, KnowEdit, or the project schema), a
    single JSON object, or JSON Lines saved as .json. Records carry their starting line."""
    text, clean = _decode_file(path)
    start = len(text) - len(text.lstrip())
    if not text[start:start + 1] == "[":
        stripped = text.strip()
        if stripped.startswith("{") and "\n" in stripped:
            try:
                json.loads(stripped)
            except json.JSONDecodeError:
                yield from _read_jsonl(path, chunk_records)   # JSON Lines under a .json name
                return
        chunk = RawChunk()
        if not stripped:
            return
        if not clean and _SURROGATE.search(stripped):
            chunk.add(None, 1, 1, _shown(stripped[:2000]), "undecodable bytes: not UTF-8")
        else:
            try:
                obj = json.loads(stripped)
                perr = None if obj.__class__ is dict else \
                    f"expected a JSON array or object, got {_json_type(obj)}"
            except json.JSONDecodeError as exc:
                obj, perr = None, f"malformed JSON: {exc.msg} (line {exc.lineno})"
            chunk.add(obj, 1, 1, stripped[:2000], perr)
        yield chunk
        return
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
        try:
            obj, end = dec.raw_decode(text, pos)
        except json.JSONDecodeError as exc:
            ln = line_at(pos)
            chunk.add(None, ln, record, _shown(text[pos:pos + 2000]),
                      f"malformed JSON: {exc.msg} (line {exc.lineno}); the rest of the file "
                      "from this record on cannot be read")
            break
        ln = line_at(pos)
        raw = text[pos:end]
        if not clean and _SURROGATE.search(raw):
            chunk.add(None, ln, record, _shown(raw), "undecodable bytes: not UTF-8")
        elif obj.__class__ is not dict:
            chunk.add(None, ln, record, raw, f"expected a JSON object, got {_json_type(obj)}")
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


def _read_csv(path: Path, chunk_records: int) -> Iterator[RawChunk]:
    """CSV with a header row. Empty cells are absent fields; ``line`` is the row's first line."""
    text, clean = _decode_file(path)
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
        raw = json.dumps(dict(zip(header, row)), ensure_ascii=False)
        if not clean and any(_SURROGATE.search(c) for c in row):
            chunk.add(None, start, record, _shown(raw), "undecodable bytes: not UTF-8")
        elif len(row) != len(header):
            chunk.add(None, start, record, raw,
                      f"malformed CSV row: {len(row)} cells for {len(header)} columns")
        else:
            chunk.add({k: _csv_cell(k, v) for k, v in zip(header, row) if v != ""},
                      start, record, raw)
        if len(chunk) >= chunk_records:
            yield chunk
            chunk = RawChunk()
    if len(chunk):
        yield chunk


def _read_parquet(path: Path, chunk_records: int) -> Iterator[RawChunk]:
    """Parquet rows; null cells are absent fields; ``line`` is None, ``record`` the row."""
    import pyarrow.parquet as pq

    try:
        pf = pq.ParquetFile(path)
        batches = pf.iter_batches(batch_size=chunk_records)
        record = 0
        for batch in batches:
            chunk = RawChunk(json_types=False)
            for row in batch.to_pylist():
                record += 1
                obj = {k: v for k, v in row.items() if v is not None}
                chunk.add(obj, None, record, json.dumps(obj, ensure_ascii=False, default=str))
            yield chunk
    except Exception as exc:  # a corrupt or unreadable file: quarantine it whole
        chunk = RawChunk()
        chunk.add(None, None, None, "", f"unreadable Parquet file: {exc}")
        yield chunk
