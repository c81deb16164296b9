"""Audit commands: ``why`` (from an answer back to the facts behind it)."""
from __future__ import annotations

import json

import click

from flows.cli.common import USER_ERROR, fail, home_option, home_path


@click.command("why")
@click.argument("prompt")
@click.option("--adapter", "adapter_dir", type=click.Path(exists=True, file_okay=False), default=None,
              help="An adapter set directory (default: the published production set of --home).")
@home_option
@click.option("--version", default=None, help="A published version of --home, e.g. v3 (default: production).")
@click.option("--max-new-tokens", type=int, default=None,
              help="Length of the answer generated [default: params.yaml audit.answer_tokens, 24].")
@click.option("--threshold", type=float, default=None,
              help="Basis weight at which an edit counts as fired [default: params.yaml "
                   "audit.fired_weight, 0.5: half its edit written].")
@click.option("--json", "as_json", is_flag=True, help="One JSON object: answer, firings, lineage.")
def why_cmd(prompt, adapter_dir, home, version, max_new_tokens, threshold, as_json):
    """Answer PROMPT with the edited model and name every edit that shaped the answer.

    \b
    An edit fired when one of its bases opened to at least the threshold while the model read
    PROMPT or wrote its answer. Each is listed with its weight, the token where it opened, and,
    from LEDIT_HOME, its lineage: status, source file and line, batch tag and DVC md5, MLflow
    run, registry version and the adapter version it is live in. An input no edit touched says
    so. Only BaFT sets can answer: ReFT and LoRA edits have no gates and act on every input.
    """
    from editing.adapters import AdapterError
    from tasks.pipeline.lineage import why, why_text
    from tasks.pipeline.store import PublishError

    try:
        out = why(prompt, adapter_dir=adapter_dir, home=None if adapter_dir and home is None else home_path(home),
                  version=version, max_new_tokens=max_new_tokens, threshold=threshold)
    except (AdapterError, PublishError, ValueError) as exc:
        fail(exc, USER_ERROR)
    click.echo(json.dumps(out, default=str) if as_json else why_text(out))


def add_commands(group: click.Group) -> None:
    group.add_command(why_cmd)
