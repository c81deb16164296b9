"""The ingest journal and the steps of one run, so a crash anywhere is finished later.

One run is a small state machine whose state is the journal
(``$LEDIT_HOME/state/journal.json``, rewritten atomically after every step)::

    claimed ──stage──> staged ──write──> written ──dvc add──> added ──commit+tag──> committed
       (files archived,   (validated,      (batch Parquet       (.dvc file)    (git commit,
        journal written,   deduplicated,    in the workspace)                    annotated tag)
        inbox drained)     quarantine out)
    committed ──ledgers──> recorded ──dvc push──> pushed ──finish──> (journal removed)

Every step is idempotent: after a crash anywhere, the next ``ingest`` finds the journal and
redoes the interrupted step. A run with no accepted record skips the versioning steps.
Claiming is here; staging (reading, validating, deduplicating) is ``tasks.stream.staging``;
the steps after it are ``STEPS``.
"""
from __future__ import annotations

import errno
import json
import os
import shutil
import time
import uuid
from datetime import datetime, timezone
from pathlib import Path

from tasks.faults import checkpoint
from tasks.stream.workspace import Home, atomic_write_json

PHASES = ("claimed", "staged", "written", "added", "committed", "recorded", "pushed", "done")


class IngestError(RuntimeError):
    pass


def read_journal(home: Home) -> dict | None:
    try:
        return json.loads(home.journal.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return None


def save_journal(home: Home, j: dict) -> dict:
    atomic_write_json(home.journal, j)
    return j


def _now() -> datetime:
    return datetime.now(timezone.utc)


# -- the start of a run -------------------------------------------------------------------
def claim(home: Home, inbox_url: str, fault: str | None) -> dict | None:
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
    save_journal(home, j)
    checkpoint("after_claim", fault)
    drain_inbox(j)
    return j


def drain_inbox(j: dict) -> None:
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


# -- the steps after staging ----------------------------------------------------------------
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


#: phase -> the step that takes a run out of it (``claimed`` is staging's)
STEPS = {"staged": _write_batch, "written": _dvc_add, "added": _commit,
         "committed": _record, "recorded": _push, "pushed": _finish}
