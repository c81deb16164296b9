"""Data commands: init, submit, ingest (the fact-update stream). Being built."""
import click


def add_commands(group: click.Group) -> None:
    """Register this module's commands on the ``ledit`` group."""
