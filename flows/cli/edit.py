"""Engine commands: edit, eval, generate."""
from __future__ import annotations

import json

import click

from editing.config import METHODS
from flows.cli.common import USER_ERROR, fail

FACTS_HELP = ("FACTS are files of fact updates: the project's JSONL schema, or EasyEdit "
              "CounterFact / MEND zsRE / KnowEdit JSON files as they are.")


@click.command("edit", help="Edit FACTS into a new adapter set at --out.\n\n" + FACTS_HELP)
@click.argument("facts", nargs=-1, required=True, type=click.Path(exists=True, dir_okay=False))
@click.option("--out", required=True, type=click.Path(file_okay=False), help="Directory of the new adapter set.")
@click.option("--model", "model_name", default=None, help="HF directory or cached hub id (default: params.yaml, the embedded SmolLM2).")
@click.option("--method", type=click.Choice(METHODS), default=None, help="Default: params.yaml edit.method.")
@click.option("--base-adapter", type=click.Path(exists=True, file_okay=False), default=None,
              help="Extend this adapter set: train the new block with it attached.")
@click.option("--quiet", is_flag=True, help="No progress bar.")
def edit_cmd(facts, out, model_name, method, base_adapter, quiet):
    from editing import AdapterError, FactError
    from flows.cli.steps import train_adapter_set
    from tasks.settings import load_settings

    try:
        adapter_set = train_adapter_set(load_settings(), list(facts), out, model_name=model_name,
                                        method=method, base_adapter=base_adapter, progress=not quiet)
    except (FactError, AdapterError) as exc:
        fail(exc, USER_ERROR)
    changes = adapter_set.changes
    trained = next((b for b in adapter_set.blocks if b.block_id == changes.get("block_id")), None)
    done = f"edited {len(changes['added'])} facts" + (
        f" in {trained.stats['seconds']:.1f}s ({trained.stats['steps']} steps)" if trained else "")
    for name in ("superseded", "retracted"):
        if changes.get(name):
            done += f", {name} {len(changes[name])}"
    click.echo(f"{done} -> {out} [{adapter_set.method}, {len(adapter_set.blocks)} block(s), "
               f"{len(adapter_set.fact_ids)} live edits, layers {adapter_set.layers}]")


@click.command("eval", help="Evaluate ADAPTER_DIR on FACTS (use 'none' for the unedited model).\n\n" + FACTS_HELP)
@click.argument("adapter_dir")
@click.argument("facts", nargs=-1, required=True, type=click.Path(exists=True, dir_okay=False))
@click.option("--model", "model_name", default=None, help="Base model (default: the one the adapter set names).")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object with the means and per-fact rows.")
def eval_cmd(adapter_dir, facts, model_name, as_json):
    from editing import AdapterError, FactError
    from flows.cli.steps import evaluate_adapter_set
    from tasks.settings import load_settings

    try:
        result = evaluate_adapter_set(load_settings(), None if adapter_dir == "none" else adapter_dir,
                                      list(facts), model_name=model_name)
    except (FactError, AdapterError) as exc:
        fail(exc, USER_ERROR)
    if as_json:
        click.echo(json.dumps(result))
        return
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"{adapter_dir}: {len(result['per_fact'])} facts")
    for name in result["means"]:
        table.add_column(name, justify="right")
    table.add_row(*("-" if v is None else f"{v:.3f}" for v in result["means"].values()))
    Console().print(table)


@click.command("generate", help="Print the edited model's greedy continuation of PROMPT.")
@click.argument("adapter_dir")
@click.argument("prompt")
@click.option("--model", "model_name", default=None)
@click.option("--max-new-tokens", default=24, show_default=True)
def generate_cmd(adapter_dir, prompt, model_name, max_new_tokens):
    from editing import AdapterError
    from flows.cli.steps import generate_with_adapter_set

    try:
        text = generate_with_adapter_set(None if adapter_dir == "none" else adapter_dir, [prompt],
                                         model_name=model_name, max_new_tokens=max_new_tokens)[0]
    except AdapterError as exc:
        fail(exc, USER_ERROR)
    click.echo(prompt + text)


def add_commands(group: click.Group) -> None:
    for command in (edit_cmd, eval_cmd, generate_cmd):
        group.add_command(command)
