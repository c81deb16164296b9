"""Where fact updates come from: the inbox (any fsspec URL), ``submit`` into it, and the
archive every file taken in is copied to (content-addressed, never replaced).

Reading a file's records is ``tasks.stream.readers``; this module moves whole files only.
"""
from __future__ import annotations

import hashlib
import os
import uuid
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

from tasks.stream.workspace import Home

_BUF = 1 << 20


def inbox_fs(url: str):
    """``(filesystem, root path)`` for an inbox URL or local directory."""
    import fsspec

    fs, path = fsspec.core.url_to_fs(url)
    return fs, path.rstrip("/") or "/"


def _stamp() -> str:
    return datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%S%fZ")


def submit(paths: list[str | os.PathLike], home: str | os.PathLike | Home | None = None, *,
           inbox: str | None = None) -> list[str]:
    """Copy files into the inbox atomically; returns their inbox paths.

    Each copy is written under a hidden temporary name and renamed when complete, so an
    ingest never sees half a file. The name gets a UTC timestamp prefix, so the inbox's
    name order is the arrival order (used to break ties between equal ``observed_at``).
    """
    h = home if isinstance(home, Home) else Home.at(home)
    if inbox is None:
        h.ensure()
    url = inbox or h.inbox_url
    fs, root = inbox_fs(url)
    fs.makedirs(root, exist_ok=True)
    out = []
    for src in paths:
        src = Path(src)
        if not src.is_file():
            raise FileNotFoundError(f"not a file: {src}")
        final = f"{root}/{_stamp()}-{src.name}"
        tmp = f"{root}/.tmp-{uuid.uuid4().hex}-{src.name}"
        with open(src, "rb") as fin, fs.open(tmp, "wb") as fout:
            while block := fin.read(_BUF):
                fout.write(block)
        fs.mv(tmp, final)
        out.append(final)
    return out


@dataclass
class InboxFile:
    path: str            # path inside the inbox filesystem
    name: str            # base name


def list_inbox(url: str) -> list[InboxFile]:
    """Complete files in the inbox, in name (arrival) order; hidden/temporary names skipped."""
    fs, root = inbox_fs(url)
    if not fs.exists(root):
        return []
    files = []
    for info in fs.ls(root, detail=True):
        if info.get("type") != "file":
            continue
        name = info["name"].rstrip("/").rsplit("/", 1)[-1]
        if name.startswith("."):
            continue
        files.append(InboxFile(path=info["name"], name=name))
    return sorted(files, key=lambda f: f.name)


def archive_path(home: Home, sha: str, name: str) -> Path:
    return home.archive / sha[:2] / f"{sha}-{name}"


def archive_from_inbox(home: Home, fs, item: InboxFile) -> tuple[str, Path, int]:
    """Copy an inbox file into the archive (content-addressed), hashing as it streams.

    Returns ``(sha256, archived path, size)``. The archived copy is written atomically and
    never replaced or deleted.
    """
    h = hashlib.sha256()
    home.archive.mkdir(parents=True, exist_ok=True)
    tmp = home.archive / f".in-{uuid.uuid4().hex}"
    size = 0
    try:
        with fs.open(item.path, "rb") as fin, open(tmp, "wb") as fout:
            while block := fin.read(_BUF):
                h.update(block)
                fout.write(block)
                size += len(block)
            fout.flush()
            os.fsync(fout.fileno())
        sha = h.hexdigest()
        dest = archive_path(home, sha, item.name)
        dest.parent.mkdir(parents=True, exist_ok=True)
        if dest.exists():
            tmp.unlink()
        else:
            os.replace(tmp, dest)
            os.chmod(dest, 0o444)
        return sha, dest, size
    finally:
        if tmp.exists():
            tmp.unlink()


def sha256_of(fs, path: str) -> str | None:
    h = hashlib.sha256()
    try:
        with fs.open(path, "rb") as f:
            while block := f.read(_BUF):
                h.update(block)
    except FileNotFoundError:
        return None
    return h.hexdigest()
