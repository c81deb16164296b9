"""Data commands: ``init``, ``submit``, ``ingest``, ``prepare`` (the fact-update stream).

Every command takes ``--home`` (or ``$LEDIT_HOME``; default ``~/.ledit``). Heavy imports
(polars, DVC) happen inside the commands. ``python -m flows.cli.ingest`` runs these commands
alone, without the engine's commands.
"""
from __future__ import annotations

import json
import sys

import click

from flows.cli.common import fail, home_option


@click.command("init")
@home_option
@click.option("--inbox", default=None, metavar="URL",
              help="Inbox directory or any fsspec URL (default: HOME/inbox).")
@click.option("--remote", default=None, metavar="URL",
              help="DVC remote for the batches, e.g. s3://bucket/ledit (default: HOME/remote).")
def init_cmd(home, inbox, remote):
    """Create the data home and its git + DVC workspace (idempotent).

    Every other data command does this on first use; run it to choose the inbox or the
    DVC remote, or to see where things live.
    """
    from tasks.stream.workspace import init_workspace

    h = init_workspace(home, inbox=inbox, remote=remote)
    cfg = h.config()
    click.echo(f"home        {h.root}")
    click.echo(f"inbox       {cfg['inbox']}")
    click.echo(f"workspace   {h.workspace}  (git + DVC; one tag per batch)")
    click.echo(f"remote      {cfg['remote']}  (DVC remote '{cfg['remote_name']}')")
    click.echo(f"quarantine  {h.quarantine}")
    click.echo(f"archive     {h.archive}")


@click.command("submit")
@home_option
@click.option("--inbox", default=None, metavar="URL",
              help="Submit to this inbox instead of the configured one.")
@click.argument("files", nargs=-1, required=True, type=click.Path(exists=True, dir_okay=False))
def submit_cmd(home, inbox, files):
    """Copy FILES into the inbox atomically, to be taken in by the next `ledit ingest`.

    Formats: JSON Lines (.jsonl), CSV with a header (.csv), Parquet (.parquet), and JSON
    arrays (.json) in the project schema or as EasyEdit CounterFact, MEND zsRE or KnowEdit
    files, read as they are.
    """
    from tasks.stream.sources import submit

    for path in submit(list(files), home, inbox=inbox):
        click.echo(path)


@click.command("ingest")
@home_option
@click.option("--inbox", default=None, metavar="URL", help="Read this inbox instead of the configured one.")
@click.option("--json", "as_json", is_flag=True,
              help="Print one JSON object (the last line): records_in, accepted, duplicates, "
                   "quarantined, batch, dvc_md5 and more.")
@click.option("--wait", default=3600.0, show_default=True, metavar="SECONDS",
              help="How long to wait for another ingest holding the lock (-1: forever).")
def ingest_cmd(home, inbox, as_json, wait):
    """Take in the inbox: validate, deduplicate, version with DVC.

    \b
    - bad records go to HOME/quarantine/<run>/rejects.jsonl with file, line and reason;
      the good records of the same file proceed;
    - every file is archived by content hash and never taken in twice;
    - duplicates, older versions and updates identical to applied edits are skipped
      (listed in HOME/state/runs/<run>/duplicates.parquet);
    - accepted facts become batches/<tag>.parquet in the workspace: dvc add, git commit,
      tag batch-YYYYMMDD-HHMMSS, dvc push.
    A run a crash interrupted is finished first. records_in = accepted + duplicates +
    quarantined.
    """
    from filelock import Timeout

    from tasks.stream.ingest import ingest

    try:
        result = ingest(home, inbox=inbox, lock_timeout=wait)
    except Timeout:
        fail(f"another ingest holds the lock; waited {wait} s")
    except Exception as exc:
        fail(f"{type(exc).__name__}: {exc}\nThe run's state is kept in the journal; "
             "the next `ledit ingest` finishes it.")
    d = result.to_dict()
    if as_json:
        click.echo(json.dumps(d, sort_keys=True))
        return
    for rid in result.recovered:
        click.echo(f"finished interrupted run {rid}")
    click.echo(f"records in   {result.records_in}")
    click.echo(f"accepted     {result.accepted}")
    dup = ", ".join(f"{k} {v}" for k, v in result.duplicate_counts.items() if v)
    click.echo(f"duplicates   {result.duplicates}" + (f"  ({dup})" if dup else ""))
    click.echo(f"quarantined  {result.quarantined}" +
               (f"  -> {', '.join(result.quarantine)}" if result.quarantine else ""))
    for f in result.files_skipped:
        click.echo(f"skipped file {f['name']}: {f['reason']}")
    click.echo(f"batch        {result.batch or '-'}" +
               (f"  (dvc md5 {result.dvc_md5})" if result.batch else ""))


@click.command("prepare")
@home_option
@click.option("--tag", default="latest", show_default=True,
              help="Data version: a batch tag (batch-YYYYMMDD-HHMMSS) or 'latest'.")
@click.option("--scope", type=click.Choice(["batch", "cumulative"]), default="batch",
              show_default=True,
              help="batch: that batch's facts; cumulative: every fact's latest version as of the tag.")
@click.option("--include-retracts", is_flag=True, help="Keep op=retract records (batch scope).")
@click.option("--out", required=True, type=click.Path(dir_okay=False), help="Facts JSONL to write.")
def prepare_cmd(home, tag, scope, include_retracts, out):
    """Write the facts of a tagged data version as JSONL for `ledit edit` (dvc.yaml's prepare).

    The batch is read at the tag's git revision through DVC, from the cache or the remote.
    """
    from tasks.stream.prepare import prepare_facts

    summary = prepare_facts(home, tag, out, scope=scope, include_retracts=include_retracts)
    click.echo(json.dumps(summary))


COMMANDS = (init_cmd, submit_cmd, ingest_cmd, prepare_cmd)


def add_commands(group: click.Group) -> None:
    """Register this module's commands on the ``ledit`` group."""
    for cmd in COMMANDS:
        group.add_command(cmd)


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
def data_main():
    """ledit data commands: init | submit | ingest | prepare."""


add_commands(data_main)

if __name__ == "__main__":  # pragma: no cover
    sys.exit(data_main())
