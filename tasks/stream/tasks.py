"""Prefect tasks for the fact-update stream: thin wrappers over the plain functions.

Importing this module imports Prefect; the plain functions in ``tasks.stream.ingest``,
``tasks.stream.sources``, ``tasks.stream.ledger`` and ``tasks.stream.prepare`` do not, so they run (and are
tested) without a Prefect server. ``ingest`` is one task on purpose: it holds the
workspace lock and runs its DVC steps in sequence (DVC must never run in parallel).
Retries are safe: an interrupted ingest is finished by the next one from its journal.
"""
from __future__ import annotations

from prefect import task

from tasks.stream import ingest as _ingest
from tasks.stream import ledger as _ledger
from tasks.stream import prepare as _prepare
from tasks.stream import sources as _sources
from tasks.stream import workspace as _workspace


@task(name="init-data-home")
def init_workspace_task(home=None, inbox=None, remote=None) -> str:
    return str(_workspace.init_workspace(home, inbox=inbox, remote=remote).root)


@task(name="submit-facts")
def submit_task(paths, home=None, inbox=None) -> list[str]:
    return _sources.submit(paths, home, inbox=inbox)


@task(name="ingest-facts", retries=1, retry_delay_seconds=5, tags=["dvc"])
def ingest_task(home=None, inbox=None) -> dict:
    """Validate, deduplicate and version the inbox; returns ``IngestResult.to_dict()``."""
    return _ingest.ingest(home, inbox=inbox).to_dict()


@task(name="prepare-facts", tags=["dvc"])
def prepare_task(home=None, tag="latest", out="build/facts.jsonl", scope="batch") -> dict:
    return _prepare.prepare_facts(home, tag, out, scope=scope)


@task(name="mark-applied")
def mark_applied_task(facts, home=None, run=None, adapter=None) -> int:
    return _ledger.mark_applied(home, facts, run=run, adapter=adapter)
