"""Pipeline commands: ``run``, ``serve``, ``rollback``, ``lineage``, ``pending``, ``demo``.

Every command takes ``--home`` (or ``$LEDIT_HOME``; default ``~/.ledit``) and runs its flows
on the Prefect API ``flows.cli.prefect_api`` sets up (``ledit server`` is ``flows.cli.server``).
MLflow tracks to ``$MLFLOW_TRACKING_URI``, else ``sqlite:///$LEDIT_HOME/mlflow.db``.
"""
from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import TYPE_CHECKING

import click

from flows.cli.common import FAILED, fail, home_option, home_path
from flows.cli.prefect_api import prepare_env, start_prefect_api

if TYPE_CHECKING:
    from tasks.settings import Settings

ROOT = Path(__file__).resolve().parents[2]
SAMPLE = ROOT / "data" / "samples" / "nightly-sample.jsonl"


def _print_summary(s: dict) -> None:
    click.echo(f"status       {s['status']}")
    if s.get("version"):
        click.echo(f"candidate    {s['version']}  (registry version {s.get('model_version')}, "
                   f"MLflow run {s.get('mlflow_run_id')})")
    click.echo(f"production   {s.get('production_version') or 'none'}")
    p = s.get("production") or {}       # tasks.pipeline.report.production_status
    if p and not p.get("agree", True):
        click.echo(f"warning      pointer {p.get('pointer')}, MLflow alias {p.get('alias') or p.get('alias_error')}"
                   + ("; a switch is in flight: the next run finishes it" if p.get("promotion") else ""))
    click.echo(f"batches      {', '.join(s.get('batches') or []) or 'none new'}")
    c = s.get("changes")
    if c:
        click.echo(f"edits        {len(c['added'])} added, {len(c['superseded'])} superseded, "
                   f"{len(c['retracted'])} retracted, {len(s.get('skipped') or [])} skipped")
    from tasks.pipeline.gate import GATE_METRICS

    measured = {k: s.get(k) for k in GATE_METRICS if s.get(k) is not None}
    if measured:
        click.echo("gate         " + ", ".join(f"{k} {v:.3f}" for k, v in measured.items()))
    for metric, why in (s.get("not_measured") or {}).items():
        click.echo(f"not measured {metric}: {why}")
    for r in s.get("reasons") or []:
        click.echo(f"rejected     {r}")
    click.echo(f"pending      {s.get('pending', 0)} fact(s)")


# -- run ----------------------------------------------------------------------------------
@click.command("run")
@home_option
@click.option("--facts", "fact_files", multiple=True, type=click.Path(exists=True, dir_okay=False),
              help="Fact files to submit and edit now (repeatable). Without: the nightly refresh.")
@click.option("--json", "as_json", is_flag=True,
              help="End with one JSON line: status, version, mlflow_run_id, the gate metrics, ...")
@click.option("--dry-run", is_flag=True, help="Train and evaluate, never promote.")
@click.option("--force", is_flag=True,
              help="Run even with nothing new: the latest batch again, parked pending facts, "
                   "facts already live.")
def run_cmd(home, fact_files, as_json, dry_run, force):
    """Run the pipeline now: ingest, train, evaluate, gate, publish.

    Status is `promoted`, `rejected` (production unchanged; the facts stay pending with their
    reasons; see `ledit pending`) or `nothing-to-do`. Exit status 0 for all three.
    """
    h = home_path(home)
    prepare_env(h)
    from flows.nightly import manual_edit, nightly_refresh

    try:
        start_prefect_api(h)
        if fact_files or dry_run or force:
            summary = manual_edit(facts=[str(Path(f).resolve()) for f in fact_files] or None,
                                  dry_run=dry_run, force=force, home=str(h))
        else:
            summary = nightly_refresh(home=str(h))
    except Exception as exc:
        fail("\n".join([f"{type(exc).__name__}: {exc}", *getattr(exc, "__notes__", ())]), as_json=as_json)
    if as_json:
        sys.stderr.flush()
        click.echo(json.dumps(summary, sort_keys=True, default=str))
    else:
        _print_summary(summary)


# -- serve / server ---------------------------------------------------------------------------
@click.command("serve")
@home_option
@click.option("--cron", default=None, help='Nightly schedule (default: params.yaml pipeline.schedule, "0 2 * * *").')
@click.option("--timezone", "tz", default=None, help="Time zone of the schedule (default: params.yaml, UTC).")
def serve_cmd(home, cron, tz):
    """Serve the nightly deployment on its cron schedule, plus manual-edit and rollback
    deployments (`prefect deployment run 'manual-edit/manual'` triggers one).

    Schedules need a Prefect server: start `ledit server` and export
    PREFECT_API_URL=http://127.0.0.1:4200/api first.
    """
    if not os.environ.get("PREFECT_API_URL"):
        fail("ledit serve needs a Prefect server (the ephemeral API runs no scheduler): start "
             "`ledit server`, then export PREFECT_API_URL=http://127.0.0.1:4200/api")
    h = home_path(home)
    prepare_env(h)
    from prefect import serve
    from prefect.schedules import Cron

    from flows.nightly import manual_edit, nightly_refresh, rollback
    from tasks.settings import load_settings

    schedule = load_settings().pipeline
    cron = cron or schedule.schedule
    tz = tz or schedule.timezone
    common = {"parameters": {"home": str(h)}, "concurrency_limit": 1, "tags": ["ledit"]}
    click.echo(f"serving nightly-refresh/nightly on '{cron}' ({tz}), manual-edit/manual, rollback/rollback")
    serve(nightly_refresh.to_deployment(name="nightly", schedule=Cron(cron, timezone=tz), **common),
          manual_edit.to_deployment(name="manual", **common),
          rollback.to_deployment(name="rollback", **common))


# -- rollback / lineage / pending --------------------------------------------------------------
@click.command("rollback")
@home_option
@click.argument("version")
@click.option("--json", "as_json", is_flag=True)
def rollback_cmd(home, version, as_json):
    """Move production (published pointer and MLflow alias `production`) back to VERSION."""
    h = home_path(home)
    prepare_env(h)
    from flows.nightly import rollback

    try:
        out = rollback(version, home=str(h))
    except Exception as exc:
        fail(f"{type(exc).__name__}: {exc}", as_json=as_json)
    if as_json:
        click.echo(json.dumps(out, sort_keys=True))
    else:
        click.echo(f"production {out['previous']} -> {out['version']} (registry version {out.get('model_version')})")


@click.command("lineage")
@home_option
@click.argument("fact_id")
@click.option("--json", "as_json", is_flag=True)
def lineage_cmd(home, fact_id, as_json):
    """Trace FACT_ID: source file and line, ingest batch (git tag, DVC md5), MLflow run,
    adapter version and gate metrics, and its status now."""
    from tasks.pipeline.lineage import lineage, markdown

    info = lineage(home_path(home), fact_id)
    if as_json:
        click.echo(json.dumps(info, sort_keys=True, default=str))
    else:
        click.echo(markdown(info))
    if info["status"] == "unknown":
        sys.exit(FAILED)


@click.command("pending")
@home_option
@click.option("--json", "as_json", is_flag=True)
def pending_cmd(home, as_json):
    """Facts waiting for the next run, each with the reason it was not promoted."""
    from tasks.pipeline.state import pending_facts

    rows = pending_facts(home_path(home))
    if as_json:
        click.echo(json.dumps(rows, sort_keys=True))
        return
    for r in rows:
        click.echo(f"{r['fact_id']}  {r['subject']!r} -> {r['target_new']!r}  "
                   f"[{r['attempts']} attempt(s){', parked' if r['parked'] else ''}] {r['reason']}")
    if not rows:
        click.echo("no pending facts")


# -- demo ----------------------------------------------------------------------------------------
@click.command("demo")
@home_option
@click.option("--facts", "facts_path", type=click.Path(exists=True, dir_okay=False), default=None,
              help="Default: data/samples/nightly-sample.jsonl (8 CounterFact edits).")
def demo_cmd(home, facts_path):
    """Run the whole nightly flow once on a bundled sample stream: ephemeral Prefect API, SQLite
    MLflow, a local DVC remote, the embedded SmolLM2. Prints the summary and how to open both UIs."""
    h = home_path(home)
    prepare_env(h)
    from flows.nightly import nightly_refresh
    from tasks.settings import load_settings
    from tasks.stream.sources import submit
    from tasks.stream.workspace import init_workspace

    settings = load_settings()
    click.echo(f"LEDIT_HOME {h}")
    init_workspace(h)
    submit([facts_path or str(SAMPLE)], h)
    click.echo(f"submitted {facts_path or SAMPLE.relative_to(ROOT)}; running the nightly flow "
               f"(model {settings.model.name}, edit method {settings.edit.method})...")
    start_prefect_api(h)
    summary = nightly_refresh(home=str(h), params=settings.to_dict())
    click.echo("")
    _print_summary(summary)
    _print_production_answers(h, settings)
    click.echo(f"""
Open the UIs:
  ledit server --home {h}
  Prefect  http://127.0.0.1:4200   (flow runs, the run summary, the edits table, the gate)
  MLflow   http://127.0.0.1:5000   (experiment '{settings.pipeline.experiment}', model '{settings.pipeline.registered_model}' @production)
Trace a fact:  ledit lineage --home {h} <fact_id>     Roll back:  ledit rollback --home {h} v1""")


def _print_production_answers(home: Path, settings: Settings) -> None:
    """The production set's greedy answers to the prompts of its first 8 live edits."""
    from editing import Fact
    from editing.metrics import greedy
    from tasks.pipeline import store
    from tasks.pipeline.train import model_for
    from tasks.stream.workspace import Home

    h = Home(home)
    version = store.production_version(h)
    if not version:
        return
    facts = [Fact(**x["fact"]) for x in store.read_record(h, version)["live_after"]][:8]
    model, tokenizer = model_for(settings)
    with store.load_published(h, version).attach(model):
        answers = greedy(model, tokenizer, [f.prompt for f in facts], 4)
    click.echo(f"\nproduction {version} answers:")
    for f, a in zip(facts, answers):
        click.echo(f"  {f.prompt} -> {tokenizer.decode(a, skip_special_tokens=True).strip()!r}"
                   f"  (wanted {f.target_new!r})")


COMMANDS = (run_cmd, serve_cmd, rollback_cmd, lineage_cmd, pending_cmd, demo_cmd)


def add_commands(group: click.Group) -> None:
    for command in COMMANDS:
        group.add_command(command)
