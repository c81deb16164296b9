"""Versioning with git + DVC in the data workspace.

Every DVC command runs through ``dvc()``, which serialises them in this process (DVC holds
a repository-wide lock, so they must never run in parallel) and turns analytics off.
Across processes the workspace lock (``Home.lock``) does the same.
"""
from __future__ import annotations

import os
import subprocess
import sys
import threading
from pathlib import Path

import yaml

from editing.offline import OFFLINE_ENV

_DVC_LOCK = threading.Lock()
GIT_USER = ("ledit", "ledit@localhost")


class VersionError(RuntimeError):
    """A git or DVC command failed; the message carries its output."""


def quiet_env() -> dict:
    """The environment of a git or DVC command: offline and untracked, never prompting."""
    return {**os.environ, **OFFLINE_ENV, "GIT_TERMINAL_PROMPT": "0"}


# dvc.api also runs in this process (``tasks.stream.prepare``): no analytics from it either,
# unless the user set these
for _name in ("DVC_NO_ANALYTICS", "DO_NOT_TRACK"):
    os.environ.setdefault(_name, OFFLINE_ENV[_name])


def _run(cmd: list[str], cwd: Path, check: bool = True) -> subprocess.CompletedProcess:
    proc = subprocess.run(cmd, cwd=cwd, env=quiet_env(), capture_output=True, text=True)
    if check and proc.returncode != 0:
        raise VersionError(f"{' '.join(cmd)} failed in {cwd} (exit {proc.returncode}):\n"
                           f"{proc.stdout}{proc.stderr}".rstrip())
    return proc


def git(repo: Path, *args: str, check: bool = True) -> subprocess.CompletedProcess:
    return _run(["git", "-c", f"user.name={GIT_USER[0]}", "-c", f"user.email={GIT_USER[1]}",
                 "-c", "commit.gpgsign=false", "-c", "tag.gpgsign=false", *args],
                Path(repo), check=check)


def dvc(repo: Path, *args: str, check: bool = True) -> subprocess.CompletedProcess:
    """One DVC command, never two at once in this process."""
    with _DVC_LOCK:
        return _run([sys.executable, "-m", "dvc", *args], Path(repo), check=check)


def init_repo(repo: Path, *, remote_url: str, remote_name: str = "storage") -> None:
    """A git repository with DVC and a default remote; idempotent."""
    repo = Path(repo)
    (repo / "batches").mkdir(parents=True, exist_ok=True)
    if not (repo / ".git").exists():
        git(repo, "init", "-q", "-b", "main")
        git(repo, "config", "user.name", GIT_USER[0])
        git(repo, "config", "user.email", GIT_USER[1])
    if not (repo / ".dvc").is_dir():
        dvc(repo, "init", "-q")
    write_dvc_config(repo, remote_url=remote_url, remote_name=remote_name)
    readme = repo / "README.md"
    if not readme.exists():
        readme.write_text(
            "# ledit data workspace\n\n"
            "Each tag `batch-YYYYMMDD-HHMMSS` is one accepted batch of fact updates:\n"
            "`batches/<tag>.parquet` (tracked by DVC, pushed to the remote) and\n"
            "`batches/<tag>.json` (counts, source files, DVC md5). Written by `ledit ingest`;\n"
            "do not edit by hand.\n", encoding="utf-8")
    keep = repo / "batches" / ".gitkeep"
    if not keep.exists():
        keep.write_text("", encoding="utf-8")
    own = [p for p in ("README.md", ".dvcignore", ".dvc/config", ".dvc/.gitignore",
                       "batches/.gitkeep") if (repo / p).exists()]
    git(repo, "add", "--", *own)
    if git(repo, "diff", "--cached", "--quiet", "--", *own, check=False).returncode:
        git(repo, "commit", "-q", "-m", "ledit data workspace: git + DVC, default remote",
            "--", *own)


def write_dvc_config(repo: Path, *, remote_url: str, remote_name: str = "storage") -> None:
    """The workspace's ``.dvc/config``: analytics off, no autostage, one default remote.

    ledit owns this file (it is what ``dvc config`` / ``dvc remote add -d`` would write);
    credentials and other per-machine remote settings belong in ``.dvc/config.local``
    (``dvc remote modify --local``), which is never touched.
    """
    text = (f"[core]\n    remote = {remote_name}\n    analytics = false\n    autostage = false\n"
            f"['remote \"{remote_name}\"']\n    url = {_remote_url(remote_url)}\n")
    path = Path(repo) / ".dvc" / "config"
    if not path.exists() or path.read_text(encoding="utf-8") != text:
        path.write_text(text, encoding="utf-8")


def _remote_url(url: str) -> str:
    if "://" in url:
        return url
    return str(Path(os.path.expanduser(url)).resolve())


def dvc_add(repo: Path, relpath: str) -> str:
    """``dvc add`` one file; returns its md5 from the .dvc file."""
    dvc(repo, "add", "-q", relpath)
    return dvc_md5(repo, relpath)


def dvc_md5(repo: Path, relpath: str) -> str:
    meta = yaml.safe_load((Path(repo) / f"{relpath}.dvc").read_text(encoding="utf-8"))
    return meta["outs"][0]["md5"]


class RemoteUnavailable(VersionError):
    """``dvc push`` could not write to the remote; what it pushes stays in the local cache."""


def dvc_push(repo: Path, relpath: str | None = None) -> None:
    # no -q: under it DVC prints only its "Having any troubles?" footer, not the error
    proc = dvc(repo, "push", *([f"{relpath}.dvc"] if relpath else []), check=False)
    if proc.returncode:
        name, url = default_remote(repo)
        errors = [line.removeprefix("ERROR:").strip().removeprefix("unexpected error - ")
                  for line in (proc.stdout + proc.stderr).splitlines() if line.startswith("ERROR:")]
        raise RemoteUnavailable(
            f"dvc push to the DVC remote '{name}' ({url}) failed: "
            f"{'; '.join(errors) or f'exit {proc.returncode}'}. The data stays in the workspace "
            f"{repo} and its DVC cache; the next ingest retries the push")


def default_remote(repo: Path) -> tuple[str, str]:
    """The default DVC remote's name and URL (``.dvc/config.local`` over ``.dvc/config``)."""
    import configparser

    cfg = configparser.ConfigParser(interpolation=None, strict=False)
    try:
        cfg.read([Path(repo) / ".dvc" / "config", Path(repo) / ".dvc" / "config.local"])
    except configparser.Error:
        return "?", "unknown URL"
    name = cfg.get("core", "remote", fallback="?")
    for section in (f"'remote \"{name}\"'", f'remote "{name}"'):   # as ledit and as DVC quote it
        if cfg.has_option(section, "url"):
            return name, cfg.get(section, "url")
    return name, "unknown URL"


def tag_exists(repo: Path, tag: str) -> bool:
    return git(repo, "rev-parse", "-q", "--verify", f"refs/tags/{tag}", check=False).returncode == 0


def tags(repo: Path, pattern: str = "batch-*") -> list[str]:
    out = git(repo, "tag", "--list", pattern, "--sort=creatordate").stdout
    return [t for t in out.split() if t]


def head_message(repo: Path) -> str:
    proc = git(repo, "log", "-1", "--format=%B", check=False)
    return proc.stdout if proc.returncode == 0 else ""


def commit_and_tag(repo: Path, paths: list[str], *, tag: str, message: str, marker: str) -> str:
    """Commit ``paths`` and tag the commit; idempotent, so a crashed attempt can be redone.

    ``marker`` is a string unique to this batch in the commit message: if HEAD already
    carries it, the commit happened before a crash and only the tag may be missing.
    Returns the commit id.
    """
    if tag_exists(repo, tag):
        return git(repo, "rev-list", "-n", "1", tag).stdout.strip()
    if marker not in head_message(repo):
        git(repo, "add", "--", *paths)
        if git(repo, "diff", "--cached", "--quiet", "--", *paths, check=False).returncode:
            git(repo, "commit", "-q", "-m", message, "--", *paths)
    git(repo, "tag", "-a", tag, "-m", message)
    return git(repo, "rev-parse", "HEAD").stdout.strip()


def unique_tag(repo: Path, base: str) -> str:
    """``base``, or ``base-2``, ``base-3``... whichever no tag has yet."""
    existing = set(tags(repo, f"{base}*"))
    if base not in existing:
        return base
    n = 2
    while f"{base}-{n}" in existing:
        n += 1
    return f"{base}-{n}"
