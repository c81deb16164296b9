"""Named fault points, one injector for the whole pipeline (crash and failure tests).

``LEDIT_INJECT_FAULT=point[:kind][,point[:kind]...]`` (or a ``fault`` argument where a step
takes one) makes ``checkpoint(point)`` fail there:

- ``point``: raise ``InjectedFault`` (a crash the process survives);
- ``point:kill``: SIGKILL the process itself, as a power cut or the OOM killer would;
- ``point:enospc``: raise ``OSError(ENOSPC)``, a full disk at that write.

Production code calls ``checkpoint`` at each point a crash must be survivable; with the
variable unset it costs one environment lookup.
"""
from __future__ import annotations

import errno
import os
import signal

FAULT_ENV = "LEDIT_INJECT_FAULT"


class InjectedFault(RuntimeError):
    """Raised at a named point to simulate a crash."""


def checkpoint(point: str, fault: str | None = None) -> None:
    """Fail at ``point`` if ``fault`` (else ``$LEDIT_INJECT_FAULT``) names it."""
    wanted = fault or os.environ.get(FAULT_ENV)
    if not wanted:
        return
    for spec in wanted.split(","):
        name, _, kind = spec.strip().partition(":")
        if name != point:
            continue
        if kind == "kill":
            os.kill(os.getpid(), signal.SIGKILL)
        if kind == "enospc":
            raise OSError(errno.ENOSPC, f"{os.strerror(errno.ENOSPC)} (injected at {point})")
        raise InjectedFault(f"injected fault at {point}")
