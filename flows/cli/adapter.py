"""Adapter-set commands: show, retract, drop-block, consolidate.

Each writes a new set (atomically) and leaves the input set as it was; the nightly
pipeline does the same through ``AdapterSet`` and publishes the result.
"""
from __future__ import annotations

import json

import click

from flows.cli.common import USER_ERROR, fail


def _load(path):
    from editing import AdapterError, AdapterSet
    try:
        return AdapterSet.load(path)
    except AdapterError as exc:
        fail(exc, USER_ERROR)


def _saved(adapter_set, out, what: str) -> None:
    adapter_set.save(out)
    click.echo(f"{what} -> {out} [{len(adapter_set.blocks)} block(s), {len(adapter_set.fact_ids)} live edits]")


def _change(adapter_dir, out, what: str, change) -> None:
    """Load ``adapter_dir``, make the new set ``change(loaded)`` and save it at ``out``."""
    from editing import AdapterError
    try:
        new = change(_load(adapter_dir))
    except AdapterError as exc:
        fail(exc, USER_ERROR)
    _saved(new, out, what)


@click.group("adapter")
def adapter_group():
    """Inspect and change adapter sets (retract, roll back a block, consolidate)."""


@adapter_group.command("show")
@click.argument("adapter_dir", type=click.Path(exists=True, file_okay=False))
@click.option("--json", "as_json", is_flag=True, help="Print the manifest as JSON.")
@click.option("--facts", "with_facts", is_flag=True, help="Also list every live edit.")
def show_cmd(adapter_dir, as_json, with_facts):
    """Blocks and live edits of ADAPTER_DIR (its checksum is verified)."""
    adapter_set = _load(adapter_dir)
    if as_json:
        click.echo(json.dumps(adapter_set.manifest()))
        return
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"{adapter_dir}: {adapter_set.method} on {adapter_set.base_model} "
                        f"({adapter_set.base_fingerprint[:12]}), layers {adapter_set.layers}")
    for col in ("block", "edits", "bases", "training run", "data version", "created"):
        table.add_column(col)
    for b in adapter_set.blocks:
        bases = sum(iv.rank for iv in b.interventions.values()) if b.interventions else "lora"
        table.add_row(b.block_id, str(len(b.fact_ids)), str(bases), b.training_run or "-",
                      b.data_version or "-", b.created_at[:19])
    console = Console()
    console.print(table)
    if with_facts:
        facts = Table(title="live edits")
        for col in ("fact_id", "subject", "prompt", "target_new"):
            facts.add_column(col)
        for f in adapter_set.facts():
            facts.add_row(f.fact_id, f.subject, f.prompt, f.target_new)
        console.print(facts)


@adapter_group.command("retract")
@click.argument("adapter_dir", type=click.Path(exists=True, file_okay=False))
@click.argument("fact_ids", nargs=-1, required=True)
@click.option("--out", required=True, type=click.Path(file_okay=False), help="Directory of the new set.")
def retract_cmd(adapter_dir, fact_ids, out):
    """Remove the edits FACT_IDS exactly (their bases are dropped). Unknown ids are an error."""
    _change(adapter_dir, out, f"retracted {len(fact_ids)} edit(s)", lambda s: s.retract(list(fact_ids)))


@adapter_group.command("drop-block")
@click.argument("adapter_dir", type=click.Path(exists=True, file_okay=False))
@click.argument("block_id")
@click.option("--out", required=True, type=click.Path(file_okay=False), help="Directory of the new set.")
def drop_block_cmd(adapter_dir, block_id, out):
    """Roll back one block (a whole batch); outputs become exactly those without it."""
    _change(adapter_dir, out, f"dropped block {block_id}", lambda s: s.rollback(block_id))


@adapter_group.command("consolidate")
@click.argument("adapter_dir", type=click.Path(exists=True, file_okay=False))
@click.option("--out", required=True, type=click.Path(file_okay=False), help="Directory of the new set.")
def consolidate_cmd(adapter_dir, out):
    """Merge every block into one stacked module per layer (identical outputs)."""
    _change(adapter_dir, out, "consolidated", lambda s: s.consolidate())


def add_commands(group: click.Group) -> None:
    group.add_command(adapter_group)
