"""Prefect tasks for the fact-update stream: thin wrappers over the plain functions.

Importing this module imports Prefect; the plain functions in ``tasks.stream`` do not, so
they run (and are tested) without a Prefect server. ``ingest`` is one task on purpose: it
holds the workspace lock and runs its DVC steps in sequence (DVC must never run in
parallel). Retries are safe: an interrupted ingest is finished by the next one from its
journal.
"""
from __future__ import annotations

from prefect import task

from tasks.stream import ledger, sources
from tasks.stream.ingest import ingest

submit_task = task(name="submit-facts")(sources.submit)


@task(name="ingest-facts", retries=1, retry_delay_seconds=5, tags=["dvc"])
def ingest_task(home=None, inbox=None) -> dict:
    """Validate, deduplicate and version the inbox; returns ``IngestResult.to_dict()``."""
    return ingest(home, inbox=inbox).to_dict()


@task(name="mark-applied")
def mark_applied_task(facts, home=None, run=None, adapter=None) -> int:
    return ledger.mark_applied(home, facts, run=run, adapter=adapter)
