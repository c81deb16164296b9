"""Staging, the journal's first step: read and validate every claimed file chunk by chunk,
write the quarantine, deduplicate; nothing is versioned yet.

No file stops the stream. One that cannot be read (a parser error, a crash in a reader,
any ``Exception``) becomes one quarantine entry, and the run goes on with the others. One
that kills the process is caught by the journal: before reading a file, staging counts the
attempt there (``read_started``; ``read_finished`` when it got through); once the ingest
has died ``ingest.max_read_attempts`` times while reading a file, the file is quarantined
unread.
"""
from __future__ import annotations

import contextlib
import os
import resource
import shutil
import time
from datetime import datetime
from pathlib import Path

from tasks.faults import checkpoint
from tasks.settings import IngestSettings
from tasks.stream.journal import IngestError, drain_inbox, save_journal
from tasks.stream.workspace import Home


def stage(home: Home, j: dict, fault: str | None, limits: IngestSettings) -> dict:
    """Validate every claimed file chunk by chunk, write the quarantine, deduplicate."""
    from tasks.stream import dedupe, ledger, version
    from tasks.stream.readers import gc_paused

    t0 = time.perf_counter()
    drain_inbox(j)
    run_dir = home.run_dir(j["run_id"])
    parts_dir = run_dir / "parts"
    shutil.rmtree(parts_dir, ignore_errors=True)
    parts_dir.mkdir(parents=True)
    received_at = datetime.fromisoformat(j["received_at"])
    per_file: dict = {}
    with gc_paused():
        parts, bad_frames, records_in = _validate_files(home, j, parts_dir, received_at,
                                                        per_file, limits, fault)
    t_validate = time.perf_counter() - t0
    rss_validate = _peak_rss_mb()
    quarantined = sum(b.height for b in bad_frames)
    qfile = _write_quarantine(home, j["run_id"], bad_frames)

    base = "batch-" + received_at.strftime("%Y%m%d-%H%M%S")
    tag = version.unique_tag(home.workspace, base)
    accepted_path = run_dir / "accepted.parquet"
    duplicates_path = run_dir / "duplicates.parquet"
    t1 = time.perf_counter()
    res = dedupe.dedupe(parts, facts=ledger.scan_facts(home), applied=ledger.scan_applied(home),
                        accepted_out=accepted_path, duplicates_out=duplicates_path, batch=tag)
    t_dedupe = time.perf_counter() - t1
    if records_in != res.accepted + res.duplicates + quarantined:
        raise IngestError(f"records do not add up: {records_in} in, {res.accepted} accepted, "
                          f"{res.duplicates} duplicates, {quarantined} quarantined")
    _count_per_file(per_file, {"accepted": (accepted_path, res.accepted),
                               "duplicates": (duplicates_path, res.duplicates)})
    j.update({
        "phase": "staged", "batch": tag if res.accepted else None, "records_in": records_in,
        "accepted": res.accepted, "duplicates": res.duplicates, "quarantined": quarantined,
        "duplicate_counts": res.counts, "quarantine_file": str(qfile) if qfile else None,
        "per_file": per_file, "staged_batch": str(accepted_path),
    })
    j["timings"].update({"validate_s": round(t_validate, 3), "dedupe_s": round(t_dedupe, 3),
                         "peak_rss_validate_mb": rss_validate, "peak_rss_mb": _peak_rss_mb()})
    checkpoint("after_stage", fault)
    return j


def _peak_rss_mb() -> float:
    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)


def _write_quarantine(home: Home, run_id: str, bad_frames: list) -> Path | None:
    if not bad_frames:
        return None
    import polars as pl

    qfile = home.quarantine / run_id / "rejects.jsonl"
    qfile.parent.mkdir(parents=True, exist_ok=True)
    tmp = qfile.with_name(".rejects.jsonl.tmp")
    pl.concat(bad_frames).write_ndjson(tmp)
    os.replace(tmp, qfile)
    return qfile


def _count_per_file(per_file: dict, written: dict[str, tuple[Path, int]]) -> None:
    """Each file's share of what was written, checked against the totals."""
    import polars as pl

    for name, (path, want) in written.items():
        counts = dict(pl.scan_parquet(path).group_by("source_file").len().collect().iter_rows())
        if sum(counts.values()) != want:
            raise IngestError(f"{name} file holds {sum(counts.values())} records, not {want}")
        for fname, stats in per_file.items():
            stats[name] = int(counts.get(fname, 0))


def _validate_files(home: Home, j: dict, parts_dir: Path, received_at: datetime,
                    per_file: dict, limits: IngestSettings, fault: str | None):
    """Validate every claimed file chunk by chunk; good rows go to Parquet parts.

    Each file is isolated: if reading or checking it fails, what it produced is discarded
    and it counts as one record in, quarantined with the error. Each read is counted in
    the journal first, so a file that kills the process is found on recovery."""
    bad_frames, parts = [], []
    records_in = 0
    for f in j["files"]:
        stats = per_file.setdefault(f["name"], {"records": 0, "quarantined": 0})
        if f["skipped"]:
            continue
        archived = Path(f["archived"])
        if not archived.exists():
            raise IngestError(f"archived copy of {f['name']} is missing: {archived}")
        died = f.get("read_started", 0) - f.get("read_finished", 0)
        if died >= limits.max_read_attempts:
            bad_frames.append(_file_reject(
                f, j["run_id"], f"file not read: the ingest died while reading it {died} "
                f"times (ingest.max_read_attempts={limits.max_read_attempts})"))
            stats.update(records=1, quarantined=1)
            records_in += 1
            continue
        f["read_started"] = f.get("read_started", 0) + 1
        save_journal(home, j)         # also records the previous file's read_finished
        checkpoint("reading_file", fault)
        n_in, n_bad = _read_one(home, j, f, parts_dir, received_at, limits, parts, bad_frames)
        f["read_finished"] = f.get("read_finished", 0) + 1
        records_in += n_in
        stats["records"] += n_in
        stats["quarantined"] += n_bad
    save_journal(home, j)
    return parts, bad_frames, records_in


def _read_one(home: Home, j: dict, f: dict, parts_dir: Path, received_at: datetime,
              limits: IngestSettings, parts: list, bad_frames: list) -> tuple[int, int]:
    """One file's good rows onto ``parts``, its rejects onto ``bad_frames``; returns
    ``(records in, quarantined)``. If it fails, only its own share is discarded."""
    from tasks.stream import validate
    from tasks.stream.readers import read_file

    n_parts, n_frames = len(parts), len(bad_frames)
    n_in = n_bad = 0
    writing = False
    try:
        for n, chunk in enumerate(read_file(Path(f["archived"]), limits=limits)):
            good, bad = validate.validate_chunk(
                chunk, file=f["name"], sha256=f["sha256"], archived=f["archived"],
                seq=f["seq"], run_id=j["run_id"], received_at=received_at)
            n_in += len(chunk)
            n_bad += bad.height
            del chunk
            if bad.height:
                bad_frames.append(bad)
            if good.height:
                part = parts_dir / f"part-{f['seq']:05d}-{n:05d}.parquet"
                parts.append(part)        # first, so a torn write is removed too
                writing = True
                good.write_parquet(part)
                writing = False
    except BaseException as exc:
        if writing or not isinstance(exc, Exception):
            # our own write failed (a full disk) or an interrupt (Ctrl-C, SIGTERM's
            # exit): not the file's fault, so not an attempt; the run fails as before
            f["read_started"] -= 1
            with contextlib.suppress(OSError):
                save_journal(home, j)
            raise
        for part in parts[n_parts:]:
            part.unlink(missing_ok=True)
        del parts[n_parts:], bad_frames[n_frames:]
        detail = f"{type(exc).__name__}: {exc}"
        if len(detail) > 1000:
            detail = detail[:1000] + "..."
        bad_frames.append(_file_reject(f, j["run_id"], f"file could not be read: {detail}"))
        n_in = n_bad = 1
    return n_in, n_bad


def _file_reject(f: dict, run_id: str, reason: str):
    """One quarantine entry for a whole file (line, record and field null), with a preview
    of its first bytes."""
    import polars as pl

    from tasks.stream.chunks import PREVIEW, preview
    from tasks.stream.validate import QUARANTINE_SCHEMA

    try:
        with open(f["archived"], "rb") as fh:
            raw = preview(fh.read(PREVIEW))
    except OSError as exc:
        raw = f"<no preview: {exc}>"
    row = dict.fromkeys(QUARANTINE_SCHEMA)
    row.update(file=f["name"], sha256=f["sha256"], archived=f["archived"], reason=reason,
               raw=raw, run_id=run_id)
    return pl.DataFrame({k: [v] for k, v in row.items()}, schema=QUARANTINE_SCHEMA)
