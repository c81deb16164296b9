"""Published adapter sets, the ``production`` pointer, and the record of every candidate.

Layout under ``LEDIT_HOME``::

    published/<version>/            a promoted adapter set (AdapterSet.save: atomic)
    published/production            symlink -> <version>, switched atomically with os.replace
    state/candidates/<version>/     a trained candidate, before the gate
    state/candidates/<version>.json the candidate's record: batches, edits, changes, metrics,
                                    gate verdict, MLflow run and model version, status
    state/production-history.jsonl  every switch of the pointer (promotions and rollbacks)
    state/promotion.json            the switch in flight (``begin_promotion``), absent when idle

Versions are ``v1``, ``v2``... in the order candidates were trained (rejected ones included),
allocated under the pipeline lock. Publishing is idempotent: redoing it after a crash finds
the set already there. Production is named twice, by the pointer here and by the MLflow
alias ``production``; ``tasks.pipeline.promote`` switches both under a promotion record.
"""
from __future__ import annotations

import json
import os
import re
import uuid
from datetime import datetime, timezone
from pathlib import Path

from tasks.stream.workspace import Home, atomic_write_json

POINTER = "production"
_VERSION = re.compile(r"^v(\d+)$")


class PublishError(RuntimeError):
    """A version that does not exist, was never published, or cannot be loaded."""


def now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


# -- paths ------------------------------------------------------------------------
def published_root(home: Home) -> Path:
    return home.root / "published"


def published_dir(home: Home, version: str) -> Path:
    return published_root(home) / version


def pointer_path(home: Home) -> Path:
    return published_root(home) / POINTER


def candidates_root(home: Home) -> Path:
    return home.state / "candidates"


def candidate_dir(home: Home, version: str) -> Path:
    return candidates_root(home) / version


def record_path(home: Home, version: str) -> Path:
    return candidates_root(home) / f"{version}.json"


def normalise_version(version: str | int) -> str:
    text = str(version).strip()
    if text.isdigit():
        text = f"v{int(text)}"
    if not _VERSION.match(text):
        raise PublishError(f"{version!r} is not an adapter version (expected v1, v2, ... or 1, 2, ...)")
    return text


def version_number(version: str) -> int:
    return int(_VERSION.match(version).group(1))


# -- candidate records ----------------------------------------------------------------
def read_record(home: Home, version: str) -> dict:
    version = normalise_version(version)
    try:
        return json.loads(record_path(home, version).read_text(encoding="utf-8"))
    except FileNotFoundError:
        known = ", ".join(r["version"] for r in list_records(home)[-5:]) or "none"
        raise PublishError(f"no adapter version {version} in {home.root} (latest: {known})") from None


def write_record(home: Home, record: dict) -> dict:
    record["updated_at"] = now()
    atomic_write_json(record_path(home, record["version"]), record)
    return record


def update_record(home: Home, version: str, **fields) -> dict:
    record = read_record(home, version)
    record.update(fields)
    return write_record(home, record)


def list_records(home: Home) -> list[dict]:
    """Every candidate record, oldest version first."""
    root = candidates_root(home)
    out = []
    for p in root.glob("v*.json") if root.exists() else ():
        if _VERSION.match(p.stem):
            try:
                out.append(json.loads(p.read_text(encoding="utf-8")))
            except json.JSONDecodeError:  # written atomically, so only a foreign file
                continue
    return sorted(out, key=lambda r: version_number(r["version"]))


def next_version(home: Home) -> str:
    """The next free version (caller holds the pipeline lock)."""
    root = candidates_root(home)
    used = [version_number(p.stem) for p in (root.glob("v*") if root.exists() else ())
            if _VERSION.match(p.stem)]
    used += [version_number(p.name) for p in (published_root(home).glob("v*")
             if published_root(home).exists() else ()) if _VERSION.match(p.name)]
    return f"v{max(used, default=0) + 1}"


# -- the production pointer ----------------------------------------------------------
def production_version(home: Home) -> str | None:
    """The version ``published/production`` names, or None before the first promotion."""
    try:
        target = os.readlink(pointer_path(home))
    except FileNotFoundError:
        return None
    except OSError as exc:
        raise PublishError(f"{pointer_path(home)} is not a symlink to a published version: {exc}")
    return normalise_version(Path(target).name)


def switch_production(home: Home, version: str, *, reason: str) -> bool:
    """Point ``production`` at ``version`` atomically; returns False if it already did."""
    version = normalise_version(version)
    if not published_dir(home, version).is_dir():
        raise PublishError(f"{version} was never published ({published_dir(home, version)} is missing)")
    previous = production_version(home)
    if previous == version:
        return False
    tmp = published_root(home) / f".{POINTER}.{uuid.uuid4().hex[:8]}"
    os.symlink(version, tmp)              # relative: the home may move
    os.replace(tmp, pointer_path(home))   # readers see the old target or the new, never none
    _log_switch(home, {"at": now(), "version": version, "previous": previous, "reason": reason})
    return True


def _log_switch(home: Home, entry: dict) -> None:
    path = home.state / "production-history.jsonl"
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a", encoding="utf-8") as f:
        f.write(json.dumps(entry, sort_keys=True) + "\n")
        f.flush()
        os.fsync(f.fileno())


def load_published(home: Home, version: str):
    """The published adapter set of ``version``; a corrupted file is refused (AdapterError)."""
    from editing.adapters import AdapterSet

    version = normalise_version(version)
    path = published_dir(home, version)
    if not path.is_dir():
        raise PublishError(f"{version} was never published ({path} is missing)")
    return AdapterSet.load(path)


def load_production(home: Home):
    """``(version, AdapterSet)`` of production, or ``(None, None)`` before the first promotion."""
    version = production_version(home)
    if version is None:
        return None, None
    return version, load_published(home, version)


# -- publishing -----------------------------------------------------------------------
def publish_set(home: Home, version: str, source_dir: str | Path) -> Path:
    """Copy a candidate to ``published/<version>`` (verifying its checksum on the way).
    Idempotent. Production is not switched here: ``tasks.pipeline.promote`` does that, journaled."""
    from editing.adapters import AdapterError, AdapterSet

    version = normalise_version(version)
    dest = published_dir(home, version)
    try:
        already = AdapterSet.load(dest) if dest.is_dir() else None
    except AdapterError:
        already = None              # a damaged copy is rewritten from the candidate
    if already is None:
        AdapterSet.load(source_dir).save(dest)
    return dest


# -- the promotion record -------------------------------------------------------------
def promotion_path(home: Home) -> Path:
    return home.state / "promotion.json"


def read_promotion(home: Home) -> dict | None:
    """The switch in flight: ``kind`` (promote or rollback), ``version``, ``model_version``,
    ``previous``, ``previous_model_version``, ``started_at``; None when there is none."""
    try:
        return json.loads(promotion_path(home).read_text(encoding="utf-8"))
    except FileNotFoundError:
        return None


def begin_promotion(home: Home, entry: dict) -> dict:
    """Record a switch of production before any store is touched; returns the record in
    flight. Redone for the same switch (a retry), the first record stands: its ``previous``
    is what production was. A different switch in flight is refused: it must be settled
    first (``tasks.pipeline.recovery.recover``). Caller holds the pipeline lock."""
    current = read_promotion(home)
    if current is not None:
        if (current["kind"], current["version"]) == (entry["kind"], entry["version"]):
            return current
        raise PublishError(f"a {current['kind']} to {current['version']} is in flight "
                           f"({promotion_path(home)}); the next run or rollback settles it first")
    atomic_write_json(promotion_path(home), entry)
    return entry


def end_promotion(home: Home, entry: dict) -> None:
    """Remove the record once both stores and the ledger name ``entry``'s version."""
    current = read_promotion(home)
    if current is not None and (current["kind"], current["version"]) == (entry["kind"], entry["version"]):
        promotion_path(home).unlink(missing_ok=True)
