"""The ``ledit`` command line.

Heavy libraries (torch, transformers, polars, prefect) are imported inside the
commands, so ``ledit --help`` answers at once.
"""
from __future__ import annotations

import click


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
def main():
    """Lifelong knowledge editing: BaFT adapters that keep a language model's facts current.

    \b
    Engine:    ledit edit | eval | generate | adapter show/retract/drop-block/consolidate
    Data:      ledit init | submit | ingest | prepare
    Pipeline:  ledit run | serve | server | rollback | lineage | pending
    Audit:     ledit why
    Demo:      ledit demo
    """


def _register_command_groups():
    from flows.cli import adapter, audit, edit, ingest, pipeline, server

    for group in (edit, adapter, ingest, pipeline, server, audit):
        group.add_commands(main)


_register_command_groups()

if __name__ == "__main__":  # pragma: no cover
    main()
