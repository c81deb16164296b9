"""``ingest``: take the inbox in, validate, deduplicate and version it, losing nothing.

One run is a small state machine whose state is the journal
(``$LEDIT_HOME/state/journal.json``, rewritten atomically after every step)::

    claimed ──stage──> staged ──write──> written ──dvc add──> added ──commit+tag──> committed
       (files archived,   (validated,      (batch Parquet       (.dvc file)    (git commit,
        journal written,   deduplicated,    in the workspace)                    annotated tag)
        inbox drained)     quarantine out)
    committed ──ledgers──> recorded ──dvc push──> pushed ──finish──> (journal removed)

Every step is idempotent: after a crash anywhere, the next ``ingest`` finds the journal,
redoes the interrupted step and finishes the run before it claims anything new. A run with
no accepted record skips the versioning steps. The whole ingest holds the workspace lock,
so two ingests never interleave and DVC never runs twice at once.

Nothing is dropped: every record in is either accepted (batch), a duplicate (the run's
duplicates file, with its status) or quarantined (with file, line and reason); every file
taken in is archived by content hash and recorded in the files ledger.

No file stops the stream. One that cannot be read (a parser error, a crash in a reader,
any ``Exception``) becomes one quarantine entry, and the run goes on with the others. One
that kills the process is caught by the journal: before reading a file, ``stage`` counts
the attempt there (``read_started``; ``read_finished`` when it got through); once the
ingest has died ``ingest.max_read_attempts`` times while reading a file, the file is
quarantined unread. ``sources.ReadLimits`` bound what any one file may cost.
"""
from __future__ import annotations

import contextlib
import errno
import functools
import json
import os
import resource
import shutil
import time
import uuid
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path

from tasks.faults import FAULT_ENV, InjectedFault, checkpoint  # noqa: F401 (re-exported)
from tasks.stream.sources import ReadLimits
from tasks.stream.workspace import Home, atomic_write_json, ensure_initialised

FAULT_POINTS = ("after_claim", "reading_file", "after_stage", "after_parquet_write",
                "after_dvc_add", "after_commit", "after_ledger", "after_push")
PHASES = ("claimed", "staged", "written", "added", "committed", "recorded", "pushed", "done")


class IngestError(RuntimeError):
    pass


@dataclass
class IngestResult:
    """What one ``ingest`` call did: the sums over the runs it finished (a run recovered
    from a crash, then the new one). ``records_in = accepted + duplicates + quarantined``."""

    records_in: int = 0
    accepted: int = 0
    duplicates: int = 0
    quarantined: int = 0
    batch: str | None = None            # the tag of the last batch made, or None
    dvc_md5: str | None = None          # its DVC md5 (the dataset digest)
    commit: str | None = None
    batches: list[str] = field(default_factory=list)
    duplicate_counts: dict = field(default_factory=dict)
    files: int = 0
    files_skipped: list[dict] = field(default_factory=list)
    quarantine: list[str] = field(default_factory=list)
    runs: list[str] = field(default_factory=list)
    recovered: list[str] = field(default_factory=list)
    seconds: float = 0.0
    timings: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        return asdict(self)


# -- journal --------------------------------------------------------------------
def read_journal(home: Home) -> dict | None:
    try:
        return json.loads(home.journal.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return None


def _save(home: Home, j: dict) -> dict:
    atomic_write_json(home.journal, j)
    return j


def _now() -> datetime:
    return datetime.now(timezone.utc)


# -- the run's steps ------------------------------------------------------------
def _claim(home: Home, inbox_url: str, fault: str | None) -> dict | None:
    """Archive every complete inbox file, write the journal, then drain the inbox."""
    from tasks.stream import ledger, sources

    items = sources.list_inbox(inbox_url)
    if not items:
        return None
    fs, _ = sources.inbox_fs(inbox_url)
    known = ledger.ingested_files(home)
    now = _now()
    run_id = now.strftime("%Y%m%dT%H%M%S%fZ") + "-" + uuid.uuid4().hex[:6]
    files, in_run = [], {}
    for seq, item in enumerate(items):
        sha, dest, size = sources.archive_from_inbox(home, fs, item)
        skip = None
        if sha in known:
            skip = f"already ingested (run {known[sha].get('run_id')}, " \
                   f"batch {known[sha].get('batch')}, as {known[sha].get('name')})"
        elif sha in in_run:
            skip = f"same content as {in_run[sha]} in this run"
        in_run.setdefault(sha, item.name)
        files.append({"name": item.name, "inbox_path": item.path, "sha256": sha,
                      "archived": str(dest), "size": size, "seq": seq, "skipped": skip})
    j = {"run_id": run_id, "phase": "claimed", "inbox": inbox_url,
         "received_at": now.isoformat(), "started_at": now.isoformat(), "files": files,
         "timings": {}}
    _save(home, j)
    checkpoint("after_claim", fault)
    _drain_inbox(j)
    return j


def _drain_inbox(j: dict) -> None:
    """Remove claimed files from the inbox (each is archived and in the journal).
    A file is removed only if it still has the claimed content."""
    from tasks.stream import sources

    fs, _ = sources.inbox_fs(j["inbox"])
    for f in j["files"]:
        if fs.exists(f["inbox_path"]) and sources.sha256_of(fs, f["inbox_path"]) == f["sha256"]:
            try:
                fs.rm(f["inbox_path"])
            except FileNotFoundError:
                pass


def _file_reject(f: dict, run_id: str, reason: str):
    """One quarantine entry for a whole file (line, record and field null), with a preview
    of its first bytes."""
    import polars as pl

    from tasks.stream import sources
    from tasks.stream.validate import QUARANTINE_SCHEMA

    try:
        with open(f["archived"], "rb") as fh:
            raw = sources._preview(fh.read(sources.PREVIEW))
    except OSError as exc:
        raw = f"<no preview: {exc}>"
    row = dict.fromkeys(QUARANTINE_SCHEMA)
    row.update(file=f["name"], sha256=f["sha256"], archived=f["archived"], reason=reason,
               raw=raw, run_id=run_id)
    return pl.DataFrame({k: [v] for k, v in row.items()}, schema=QUARANTINE_SCHEMA)


def _validate_files(home: Home, j: dict, parts_dir: Path, received_at: datetime,
                    per_file: dict, limits: ReadLimits, fault: str | None = None):
    """Validate every claimed file chunk by chunk; good rows go to Parquet parts.

    Each file is isolated: if reading or checking it fails, what it produced is discarded
    and it counts as one record in, quarantined with the error. Each read is counted in
    the journal first, so a file that kills the process is found on recovery."""
    from tasks.stream import sources, validate

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
        _save(home, j)                # also records the previous file's read_finished
        checkpoint("reading_file", fault)
        n_parts, n_frames = len(parts), len(bad_frames)
        n_in = n_bad = 0
        writing = False
        try:
            for n, chunk in enumerate(sources.read_file(archived, limits=limits)):
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
                    _save(home, j)
                raise
            for part in parts[n_parts:]:
                part.unlink(missing_ok=True)
            del parts[n_parts:], bad_frames[n_frames:]
            detail = f"{type(exc).__name__}: {exc}"
            if len(detail) > 1000:
                detail = detail[:1000] + "..."
            bad_frames.append(_file_reject(f, j["run_id"], f"file could not be read: {detail}"))
            n_in = n_bad = 1
        f["read_finished"] = f.get("read_finished", 0) + 1
        records_in += n_in
        stats["records"] += n_in
        stats["quarantined"] += n_bad
    _save(home, j)
    return parts, bad_frames, records_in


def _stage(home: Home, j: dict, fault: str | None, limits: ReadLimits | None = None) -> dict:
    """Validate every claimed file chunk by chunk, write the quarantine, deduplicate."""
    import polars as pl

    from tasks.stream import dedupe, ledger, sources, version

    limits = limits or ReadLimits.from_params()
    t0 = time.perf_counter()
    _drain_inbox(j)
    run_dir = home.run_dir(j["run_id"])
    parts_dir = run_dir / "parts"
    shutil.rmtree(parts_dir, ignore_errors=True)
    parts_dir.mkdir(parents=True)
    received_at = datetime.fromisoformat(j["received_at"])
    per_file: dict = {}
    with sources.gc_paused():
        parts, bad_frames, records_in = _validate_files(home, j, parts_dir, received_at,
                                                        per_file, limits, fault)
    t_validate = time.perf_counter() - t0
    rss_validate = _peak_rss_mb()

    quarantined = sum(b.height for b in bad_frames)
    qfile = None
    if bad_frames:
        qfile = home.quarantine / j["run_id"] / "rejects.jsonl"
        qfile.parent.mkdir(parents=True, exist_ok=True)
        tmp = qfile.with_name(".rejects.jsonl.tmp")
        pl.concat(bad_frames).write_ndjson(tmp)
        os.replace(tmp, qfile)

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
    for name, col, want in (("accepted", accepted_path, res.accepted),
                            ("duplicates", duplicates_path, res.duplicates)):
        counts = dict(pl.scan_parquet(col).group_by("source_file").len().collect().iter_rows())
        if sum(counts.values()) != want:
            raise IngestError(f"{name} file holds {sum(counts.values())} records, not {want}")
        for fname, stats in per_file.items():
            stats[name] = int(counts.get(fname, 0))
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


def _batch_rel(tag: str) -> str:
    return f"batches/{tag}.parquet"


def _write_batch(home: Home, j: dict, fault: str | None) -> dict:
    import polars as pl

    from tasks.stream.dedupe import batch_columns

    if not j.get("batch"):
        j["phase"] = "committed"
        return j
    t0 = time.perf_counter()
    dest = home.workspace / _batch_rel(j["batch"])
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.with_name(f".{dest.name}.tmp")
    checkpoint("write_batch", fault)
    try:
        pl.scan_parquet(j["staged_batch"]).select(batch_columns()).sink_parquet(tmp)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, dest)
    except BaseException as exc:
        tmp.unlink(missing_ok=True)      # a partial file keeps the space a full disk lacks
        if "os error 28" in str(exc):    # polars reports ENOSPC as its own ComputeError
            raise OSError(errno.ENOSPC, f"No space left on device writing batch {dest}") from exc
        raise
    checkpoint("after_parquet_write", fault)
    j["phase"] = "written"
    j["timings"]["write_s"] = round(time.perf_counter() - t0, 3)
    return j


def _dvc_add(home: Home, j: dict, fault: str | None) -> dict:
    from tasks.stream import version

    t0 = time.perf_counter()
    j["dvc_md5"] = version.dvc_add(home.workspace, _batch_rel(j["batch"]))
    checkpoint("after_dvc_add", fault)
    j["phase"] = "added"
    j["timings"]["dvc_add_s"] = round(time.perf_counter() - t0, 3)
    return j


def _commit(home: Home, j: dict, fault: str | None) -> dict:
    from tasks.stream import version

    t0 = time.perf_counter()
    tag, rel = j["batch"], _batch_rel(j["batch"])
    manifest = {
        "batch": tag, "run_id": j["run_id"], "dvc_md5": j["dvc_md5"], "path": rel,
        "received_at": j["received_at"], "records_in": j["records_in"],
        "accepted": j["accepted"], "duplicates": j["duplicates"],
        "quarantined": j["quarantined"], "duplicate_counts": j["duplicate_counts"],
        "files": [{k: f[k] for k in ("name", "sha256", "size", "skipped")}
                  | j["per_file"].get(f["name"], {}) for f in j["files"]],
    }
    atomic_write_json(home.workspace / f"batches/{tag}.json", manifest)
    message = (f"{tag}: {j['accepted']} facts accepted, {j['duplicates']} duplicates, "
               f"{j['quarantined']} quarantined\n\nrun {j['run_id']}\ndvc md5 {j['dvc_md5']}\n")
    paths = [f"{rel}.dvc", f"batches/{tag}.json"]
    if (home.workspace / "batches/.gitignore").exists():
        paths.append("batches/.gitignore")
    j["commit"] = version.commit_and_tag(home.workspace, paths, tag=tag, message=message,
                                         marker=f"run {j['run_id']}")
    checkpoint("after_commit", fault)
    j["phase"] = "committed"
    j["timings"]["commit_s"] = round(time.perf_counter() - t0, 3)
    return j


def _record(home: Home, j: dict, fault: str | None) -> dict:
    from tasks.stream import ledger

    if j.get("batch"):
        ledger.record_facts(home, Path(j["staged_batch"]), j["batch"])
    ledger.record_files(home, [
        {"sha256": f["sha256"], "name": f["name"], "archived": f["archived"],
         "size": f["size"], "run_id": j["run_id"], "batch": j.get("batch"),
         "ingested_at": j["received_at"], **j["per_file"].get(f["name"], {})}
        for f in j["files"] if not f["skipped"]])
    checkpoint("after_ledger", fault)
    j["phase"] = "recorded"
    return j


def _push(home: Home, j: dict, fault: str | None) -> dict:
    from tasks.stream import version

    if j.get("batch"):
        t0 = time.perf_counter()
        version.dvc_push(home.workspace)
        j["timings"]["dvc_push_s"] = round(time.perf_counter() - t0, 3)
    checkpoint("after_push", fault)
    j["phase"] = "pushed"
    return j


def _finish(home: Home, j: dict, fault: str | None) -> dict:
    run_dir = home.run_dir(j["run_id"])
    shutil.rmtree(run_dir / "parts", ignore_errors=True)
    staged = run_dir / "accepted.parquet"
    if staged.exists():
        staged.unlink()      # the batch is in the workspace, the DVC cache and the remote
    j["phase"] = "done"
    j["finished_at"] = _now().isoformat()
    atomic_write_json(run_dir / "report.json", j)
    home.journal.unlink(missing_ok=True)
    return j


STEPS = {"claimed": _stage, "staged": _write_batch, "written": _dvc_add, "added": _commit,
         "committed": _record, "recorded": _push, "pushed": _finish}


def _run(home: Home, j: dict, fault: str | None, limits: ReadLimits | None = None) -> dict:
    steps = {**STEPS, "claimed": functools.partial(_stage, limits=limits)}   # only staging reads files
    while j["phase"] != "done":
        j = steps[j["phase"]](home, j, fault)
        if j["phase"] != "done":
            _save(home, j)
    return j


# -- the API ----------------------------------------------------------------------
def ingest(home: str | os.PathLike | Home | None = None, *, inbox: str | None = None,
           lock_timeout: float = -1, fault: str | None = None,
           limits: ReadLimits | None = None) -> IngestResult:
    """Process the inbox: finish any run a crash interrupted, then take in what is waiting.

    ``inbox`` overrides the configured inbox URL for this call. ``lock_timeout`` is how long
    to wait for a concurrent ingest (-1: as long as it takes). ``fault`` names a point in
    ``FAULT_POINTS`` at which to raise ``InjectedFault`` (crash tests). ``limits``: a
    ``sources.ReadLimits`` (default: ``params.yaml`` ``ingest:``, via ``$LEDIT_PARAMS``).
    """
    t0 = time.perf_counter()
    limits = limits or ReadLimits.from_params()
    h = home if isinstance(home, Home) else Home.at(home)
    with h.lock(lock_timeout):
        ensure_initialised(h)
        done, recovered = [], []
        pending = read_journal(h)
        if pending:
            recovered.append(pending["run_id"])
            done.append(_run(h, pending, fault, limits))
        j = _claim(h, inbox or h.inbox_url, fault)
        if j:
            done.append(_run(h, j, fault, limits))
    return _summarise(done, recovered, time.perf_counter() - t0)


def _summarise(runs: list[dict], recovered: list[str], seconds: float) -> IngestResult:
    r = IngestResult(recovered=recovered, seconds=round(seconds, 3))
    for j in runs:
        r.runs.append(j["run_id"])
        for k in ("records_in", "accepted", "duplicates", "quarantined"):
            setattr(r, k, getattr(r, k) + j.get(k, 0))
        for k, v in j.get("duplicate_counts", {}).items():
            r.duplicate_counts[k] = r.duplicate_counts.get(k, 0) + v
        r.files += sum(1 for f in j["files"] if not f["skipped"])
        r.files_skipped += [{"name": f["name"], "sha256": f["sha256"], "reason": f["skipped"]}
                            for f in j["files"] if f["skipped"]]
        if j.get("quarantine_file"):
            r.quarantine.append(j["quarantine_file"])
        if j.get("batch"):
            r.batches.append(j["batch"])
            r.batch, r.dvc_md5, r.commit = j["batch"], j.get("dvc_md5"), j.get("commit")
        for k, v in j.get("timings", {}).items():
            r.timings[k] = (max(v, r.timings.get(k, 0)) if k.startswith("peak_rss")
                            else round(r.timings.get(k, 0) + v, 3))
    return r


def status(home: str | os.PathLike | Home | None = None) -> dict:
    """Inbox size, pending journal, batches and ledger sizes; takes no lock."""
    from tasks.stream import ledger, sources, version
    from tasks.stream.workspace import is_initialised

    h = home if isinstance(home, Home) else Home.at(home)
    out = {"home": str(h.root), "initialised": is_initialised(h), "inbox": h.inbox_url}
    try:
        out["inbox_files"] = len(sources.list_inbox(h.inbox_url))
    except Exception as exc:  # an unreachable inbox should not hide the rest
        out["inbox_files"] = f"unreadable: {exc}"
    j = read_journal(h)
    out["pending_run"] = {"run_id": j["run_id"], "phase": j["phase"]} if j else None
    out["batches"] = version.tags(h.workspace) if out["initialised"] else []
    out["files_ingested"] = len(ledger.ingested_files(h))
    return out


def last_json_line(text: str) -> dict:
    """The JSON object on the last non-empty line of ``text`` (CLI contract helper)."""
    for line in reversed(text.strip().splitlines()):
        if line.strip():
            return json.loads(line)
    raise ValueError("no output")


__all__ = ["ingest", "IngestResult", "InjectedFault", "FAULT_POINTS", "status", "read_journal",
           "ReadLimits"]

