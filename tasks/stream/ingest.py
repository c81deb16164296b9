"""``ingest``: take the inbox in, validate, deduplicate and version it, losing nothing.

Each call first finishes a run a crash interrupted (its state is the journal,
``tasks.stream.journal``), then claims what waits in the inbox and runs it through the same
steps. The whole ingest holds the workspace lock, so two ingests never interleave and DVC
never runs twice at once.

Nothing is dropped: every record in is either accepted (batch), a duplicate (the run's
duplicates file, with its status) or quarantined (with file, line and reason); every file
taken in is archived by content hash and recorded in the files ledger. No file stops the
stream (``tasks.stream.staging``); ``params.yaml`` ``ingest:`` bounds what any one file may
cost (``tasks.settings.IngestSettings``).
"""
from __future__ import annotations

import functools
import json
import os
import time
from dataclasses import asdict, dataclass, field

from tasks.faults import FAULT_ENV, InjectedFault  # noqa: F401 (re-exported)
from tasks.settings import IngestSettings, load_settings
from tasks.stream.journal import STEPS, claim, read_journal, save_journal
from tasks.stream.staging import stage
from tasks.stream.workspace import Home, ensure_initialised

FAULT_POINTS = ("after_claim", "reading_file", "after_stage", "write_batch",
                "after_parquet_write", "after_dvc_add", "after_commit", "after_ledger",
                "after_push")


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


def default_limits() -> IngestSettings:
    """``params.yaml``'s ``ingest:`` (``$LEDIT_PARAMS`` honoured), or the defaults where ledit
    is installed without a params.yaml and ``$LEDIT_PARAMS`` is unset."""
    try:
        return load_settings().ingest
    except FileNotFoundError:
        if os.environ.get("LEDIT_PARAMS"):
            raise
        return IngestSettings()


def _run(home: Home, j: dict, fault: str | None, limits: IngestSettings) -> dict:
    steps = {"claimed": functools.partial(stage, limits=limits), **STEPS}
    while j["phase"] != "done":
        j = steps[j["phase"]](home, j, fault)
        if j["phase"] != "done":
            save_journal(home, j)
    return j


def ingest(home: str | os.PathLike | Home | None = None, *, inbox: str | None = None,
           lock_timeout: float = -1, fault: str | None = None,
           limits: IngestSettings | None = None) -> IngestResult:
    """Process the inbox: finish any run a crash interrupted, then take in what is waiting.

    ``inbox`` overrides the configured inbox URL for this call. ``lock_timeout`` is how long
    to wait for a concurrent ingest (-1: as long as it takes). ``fault`` names a point in
    ``FAULT_POINTS`` at which to raise ``InjectedFault`` (crash tests). ``limits``: an
    ``IngestSettings`` (default: ``default_limits()``).
    """
    t0 = time.perf_counter()
    limits = limits or default_limits()
    h = home if isinstance(home, Home) else Home.at(home)
    with h.lock(lock_timeout):
        ensure_initialised(h)
        done, recovered = [], []
        pending = read_journal(h)
        if pending:
            recovered.append(pending["run_id"])
            done.append(_run(h, pending, fault, limits))
        j = claim(h, inbox or h.inbox_url, fault)
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
           "default_limits"]
