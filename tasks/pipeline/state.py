"""What outlives a pipeline run, in ``$LEDIT_HOME/state/pipeline.json`` (atomic writes), and
the lock that serialises runs.

- ``processed_batches``: batch tags whose facts reached a verdict (promoted or rejected). A
  batch is marked only after its verdict, so a run killed during training leaves it
  unprocessed and the next run trains it again;
- ``pending``: facts that failed the gate, each with its reason and attempts; they join the
  next run's edits. After ``pipeline.max_attempts`` rejections a fact is *parked*: still
  pending, retried only by a forced run.

A second trigger waits on ``$LEDIT_HOME/.pipeline.lock`` until the first has finished.
"""
from __future__ import annotations

import json
from pathlib import Path

from tasks.stream.workspace import Home, atomic_write_json

# a candidate record in one of these is settled: recovery leaves it alone
FINAL = ("promoted", "rejected", "dry-run", "abandoned")


class PipelineError(RuntimeError):
    """A pipeline step that cannot go on; the message says what is wrong."""


def as_home(home) -> Home:
    return home if isinstance(home, Home) else Home.at(home)


def state_path(home: Home) -> Path:
    return home.state / "pipeline.json"


def read_state(home: Home) -> dict:
    try:
        state = json.loads(state_path(home).read_text(encoding="utf-8"))
    except FileNotFoundError:
        state = {}
    state.setdefault("processed_batches", [])
    state.setdefault("pending", {})
    return state


def write_state(home: Home, state: dict) -> None:
    atomic_write_json(state_path(home), state)


def close_batches(state: dict, batches: list[dict], cancelled: list[str]) -> None:
    """The batches reached a verdict: mark them processed; the retracts that cancelled
    pending facts take those facts out of pending."""
    state["processed_batches"] = sorted(set(state["processed_batches"]) | {b["tag"] for b in batches})
    for fid in cancelled:
        state["pending"].pop(fid, None)


def pipeline_lock(home: Home, timeout: float = -1):
    """Serialises pipeline runs (not the same file as the ingest lock, which a run takes too)."""
    from filelock import FileLock

    home.root.mkdir(parents=True, exist_ok=True)
    return FileLock(str(home.root / ".pipeline.lock"), timeout=timeout)


def pending_facts(home) -> list[dict]:
    """Every pending fact: fact_id, subject, prompt, target_new, op, reason, attempts, parked."""
    h = as_home(home)
    out = []
    for fid, item in sorted(read_state(h)["pending"].items()):
        f = item["fact"]
        out.append({"fact_id": fid, "op": f.get("op", "upsert"), "subject": f.get("subject"),
                    "prompt": f.get("prompt"), "target_new": f.get("target_new"),
                    "reason": item.get("reason"), "attempts": item.get("attempts", 0),
                    "parked": item.get("parked", False), "last_version": item.get("last_version"),
                    "batch": item.get("origin", {}).get("batch")})
    return out
