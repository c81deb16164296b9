"""The steps of a pipeline run, in order, as plain functions (no Prefect), for callers that
drive them by hand: benchmarks, tests, a notebook. The flows run the same functions as Prefect
tasks (``tasks.pipeline.tasks``).

    ingest ─> new batches + pending facts ─> plan ─> probe the base ─> train candidate
                                                           ─> evaluate ─> gate ├pass─> publish
                                                                               └fail─> reject (facts pending)

Steps hand each other an adapter *version* (``v7``); everything about a candidate lives in its
record (``tasks.pipeline.store``), so a step can be redone from disk after a crash and nothing
large crosses a Prefect task boundary. Each stage is its own module; this one only names them.
"""
from __future__ import annotations

from tasks.pipeline.batches import batch_edits, unprocessed_batches
from tasks.pipeline.evaluate import evaluate_candidate, probe
from tasks.pipeline.plan import plan
from tasks.pipeline.promote import judge, publish, reject
from tasks.pipeline.recovery import recover, rollback
from tasks.pipeline.state import pending_facts, read_state
from tasks.pipeline.train import model_for, train_candidate

__all__ = ["batch_edits", "evaluate_candidate", "judge", "model_for", "pending_facts", "plan", "probe",
           "publish", "read_state", "recover", "reject", "rollback", "train_candidate", "unprocessed_batches"]
