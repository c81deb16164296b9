"""``read_file``: one inbox file, whatever its format, as ``RawChunk``s of parsed records.

Field-level checks happen later, vectorised, in ``tasks.stream.validate``; a reader only
parses, and gives a reason for each record that could not even be parsed (undecodable
bytes, a malformed line, a non-object). What one file may cost is bounded by
``tasks.settings.IngestSettings`` (``params.yaml`` ``ingest:``): a file too large is not
parsed; an over-long line or record, one nested too deep and the records past
``max_records`` are quarantined with their reason. Text with a UTF-16 or UTF-32 byte-order
mark is transcoded to UTF-8 first, so every reader sees UTF-8 bytes.
"""
from __future__ import annotations

import codecs
import os
import tempfile
from pathlib import Path
from typing import BinaryIO, Iterator

from tasks.settings import IngestSettings
from tasks.stream.chunks import RawChunk, whole_file
from tasks.stream.read_json import read_json
from tasks.stream.read_jsonl import read_jsonl
from tasks.stream.read_tabular import read_csv, read_parquet

CHUNK_RECORDS = 100_000
_BUF = 1 << 20
FORMAT_BY_SUFFIX = {".jsonl": "jsonl", ".ndjson": "jsonl", ".json": "json", ".csv": "csv",
                    ".parquet": "parquet", ".pq": "parquet"}
TEXT_READERS = {"jsonl": read_jsonl, "json": read_json, "csv": read_csv}
#: Byte-order marks, UTF-32 first: the UTF-32-LE mark begins with the UTF-16-LE one.
BOMS = ((codecs.BOM_UTF32_LE, "utf-32-le", "UTF-32-LE"),
        (codecs.BOM_UTF32_BE, "utf-32-be", "UTF-32-BE"),
        (codecs.BOM_UTF16_LE, "utf-16-le", "UTF-16-LE"),
        (codecs.BOM_UTF16_BE, "utf-16-be", "UTF-16-BE"))


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


def bom_encoding(head: bytes) -> tuple[str, str, int] | None:
    """``(codec, label, BOM length)`` for a UTF-16/UTF-32 byte-order mark, else None."""
    for bom, codec, label in BOMS:
        if head.startswith(bom):
            return codec, label, len(bom)
    return None


def read_file(path: str | os.PathLike, fmt: str | None = None,
              chunk_records: int = CHUNK_RECORDS,
              limits: IngestSettings | None = None) -> Iterator[RawChunk]:
    """Chunks of raw records from one file, whatever its format.

    A file that cannot be read at all (unknown format, a corrupt Parquet file, over
    ``limits.max_file_bytes``) yields one chunk with one record-level error, so it is
    quarantined and counted, never dropped. UTF-16/32 text with a BOM is read as UTF-8.
    """
    path = Path(path)
    limits = limits or IngestSettings()
    with open(path, "rb") as f:
        head = f.read(4096)
        size = os.fstat(f.fileno()).st_size
    if size > limits.max_file_bytes:
        yield whole_file(head, f"file is {size:,} bytes, over the limit of "
                               f"{limits.max_file_bytes:,} (ingest.max_file_bytes); not read")
        return
    fmt = fmt or FORMAT_BY_SUFFIX.get(path.suffix.lower())
    bom = bom_encoding(head)
    if fmt == "parquet" or (fmt is None and bom is None and head.startswith(b"PAR1")):
        yield from read_parquet(path, chunk_records, limits)
        return
    label = bom[1] if bom else "UTF-8"
    try:
        src = _transcoded(path, bom, limits) if bom else open(path, "rb")
    except _TooLarge as exc:
        yield whole_file(head, f"file is {exc.size:,} bytes or more once transcoded from "
                               f"{label} to UTF-8, over the limit of "
                               f"{limits.max_file_bytes:,} (ingest.max_file_bytes); not read")
        return
    with src:
        if fmt is None:
            fmt = detect_file_format(path, src.read(4096))   # sniffed on UTF-8 text
            src.seek(0)
        if fmt is None:
            yield whole_file(head, "unknown file format: expected .jsonl, .json, .csv or "
                                   ".parquet")
            return
        yield from TEXT_READERS[fmt](src, chunk_records, limits, label)


class _TooLarge(Exception):
    def __init__(self, size: int):
        super().__init__(size)
        self.size = size


def _flag_undecodable(exc: UnicodeDecodeError) -> tuple[str, int]:
    # A lone surrogate, written out with surrogatepass, is invalid UTF-8 again: the record
    # holding the bad bytes is then quarantined as undecodable, like bad UTF-8.
    return "\udcff", exc.end


codecs.register_error("ledit.flag_undecodable", _flag_undecodable)


def _transcoded(path: Path, bom: tuple[str, str, int], limits: IngestSettings) -> BinaryIO:
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
