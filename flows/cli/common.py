"""What every ``ledit`` command shares: the ``--home`` option and the one way a command fails.

Exit status, one scheme for every command:
- 0: done (a run whose candidate the gate rejected is done too);
- 1 (``FAILED``): the work itself failed or found nothing: a pipeline run or rollback that
  raised, a server that died, a fact with no lineage;
- 2 (``USER_ERROR``): what the command was given is wrong: a malformed facts file, an unknown
  fact id, an adapter set that does not load. click's own usage errors exit 2 as well.
Only click is imported here, so ``ledit --help`` stays instant.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import NoReturn

import click

FAILED = 1
USER_ERROR = 2

HOME_HELP = ("LEDIT_HOME: inbox, quarantine, archive, the git+DVC workspace and remote, published "
             "adapter sets, state, mlflow.db [env LEDIT_HOME; default ~/.ledit]")


def home_option(command):
    """``--home DIR`` (or ``$LEDIT_HOME``); the command receives it as given, None if neither."""
    return click.option("--home", envvar="LEDIT_HOME", default=None, metavar="DIR", help=HOME_HELP)(command)


def home_path(home: str | None) -> Path:
    """The ``--home`` value as the data home's directory (the default when None)."""
    from tasks.stream.workspace import resolve_home
    return resolve_home(home)


def fail(message: str | BaseException, code: int = FAILED, as_json: bool = False) -> NoReturn:
    """``error: MESSAGE`` on stderr (and, with ``as_json``, a ``failed`` JSON line on stdout), exit ``code``."""
    if as_json:
        click.echo(json.dumps({"status": "failed", "error": str(message)}))
    click.echo(f"error: {message}", err=True)
    sys.exit(code)
