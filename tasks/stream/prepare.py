"""The ``prepare`` stage of ``dvc.yaml``: a tagged data version -> a facts JSONL file.

The batch Parquet is read through ``dvc.api`` at the tag's git revision, so it comes from
the DVC cache or, if that is gone, from the remote: a data version is rebuilt from its tag
alone. ``scope='batch'`` gives that batch's facts; ``scope='cumulative'`` gives the state of
every fact as of the tag (all batches up to it, the latest version of each fact, retracted
facts removed), which is what rebuilding a whole adapter set needs.

Run as ``ledit prepare`` or ``python -m tasks.stream.prepare facts ...``;
``python -m tasks.stream.prepare last-json LOG OUT`` turns a command's output whose last line is
a JSON object (``ledit eval --json``) into a metrics file.
"""
from __future__ import annotations

import argparse
import io
import json
import os
import re
import sys
from pathlib import Path

from tasks.stream.workspace import Home, atomic_write_bytes, atomic_write_json

FACT_FIELDS = ("subject", "prompt", "target_new", "fact_id", "relation", "target_old",
               "rephrase_prompts", "locality", "portability", "source", "observed_at", "op")
_TAG = re.compile(r"^batch-(\d{8}-\d{6})(?:-(\d+))?$")


def _tag_key(tag: str):
    m = _TAG.match(tag)
    return (m.group(1), int(m.group(2) or 1)) if m else (tag, 0)


def batch_tags(home: str | os.PathLike | Home | None = None) -> list[str]:
    """Every batch tag of the workspace, oldest first."""
    from tasks.stream import version

    h = home if isinstance(home, Home) else Home.at(home)
    return sorted(version.tags(h.workspace), key=_tag_key)


def resolve_tag(home: Home, tag: str | None) -> str:
    tags = batch_tags(home)
    if tag in (None, "", "latest"):
        if not tags:
            raise LookupError(f"no batch has been ingested yet in {home.workspace}")
        return tags[-1]
    if tag not in tags:
        raise LookupError(f"no data version {tag!r} in {home.workspace}; "
                          f"known: {', '.join(tags[-5:]) or 'none'}")
    return tag


def read_batch(home: Home, tag: str, rel: str | None = None):
    """One batch Parquet file as it is at git revision ``tag`` (from the DVC cache/remote)."""
    import dvc.api
    import polars as pl

    os.environ.setdefault("DVC_NO_ANALYTICS", "1")
    os.environ.setdefault("DO_NOT_TRACK", "true")
    rel = rel or f"batches/{tag}.parquet"
    with dvc.api.open(rel, repo=str(home.workspace), rev=tag, mode="rb") as f:
        return pl.read_parquet(io.BytesIO(f.read()))


def batches_at(home: Home, tag: str) -> list[str]:
    """Paths of the batch files tracked at revision ``tag``, oldest first."""
    from tasks.stream import version

    out = version.git(home.workspace, "ls-tree", "--name-only", tag, "batches/").stdout.split()
    rels = [p[:-len(".dvc")] for p in out if p.endswith(".parquet.dvc")]
    return sorted(rels, key=lambda p: _tag_key(Path(p).name[:-len(".parquet")]))


def load_version(home: str | os.PathLike | Home | None = None, tag: str | None = "latest",
                 scope: str = "batch"):
    """The facts of a data version as a polars frame (batch columns), sorted by fact_id."""
    import polars as pl

    h = home if isinstance(home, Home) else Home.at(home)
    tag = resolve_tag(h, tag)
    if scope == "batch":
        return tag, read_batch(h, tag).sort("fact_id")
    if scope != "cumulative":
        raise ValueError(f"scope must be 'batch' or 'cumulative', not {scope!r}")
    frames = [read_batch(h, tag, rel).with_columns(pl.lit(i, pl.Int64).alias("_b"))
              for i, rel in enumerate(batches_at(h, tag))]
    df = pl.concat(frames, how="diagonal_relaxed")
    latest = (df.with_columns(pl.coalesce("observed_ts", "received_at").alias("_t"))
              .sort(["fact_id", "_t", "_b", "source_record"])
              .unique("fact_id", keep="last", maintain_order=True)
              .drop("_t", "_b"))
    return tag, latest.filter(pl.col("op") != "retract").sort("fact_id")


def prepare_facts(home: str | os.PathLike | Home | None = None, tag: str | None = "latest",
                  out: str | os.PathLike = "build/facts.jsonl", *, scope: str = "batch",
                  include_retracts: bool = False) -> dict:
    """Write the facts of a data version as JSONL (the ``editing.facts`` schema plus
    ``batch`` and ``record_hash`` for provenance); returns a summary."""
    from editing.facts import fact_from_record

    h = home if isinstance(home, Home) else Home.at(home)
    with h.lock():      # DVC must not read while an ingest runs dvc add/push
        tag, df = load_version(h, tag, scope)
    retracts = int((df["op"] == "retract").sum()) if df.height else 0
    if not include_retracts and df.height:
        df = df.filter(df["op"] != "retract")
    lines = []
    for i, row in enumerate(df.iter_rows(named=True)):
        rec = {k: row[k] for k in FACT_FIELDS if row.get(k) not in (None, [])}
        fact_from_record(rec, file=f"{tag}", record=i)     # the engine's own check
        rec["batch"], rec["record_hash"] = row["batch"], row["record_hash"]
        lines.append(json.dumps(rec, ensure_ascii=False, sort_keys=True))
    atomic_write_bytes(Path(out), ("\n".join(lines) + ("\n" if lines else "")).encode())
    return {"data_version": tag, "scope": scope, "facts": len(lines),
            "retracts": retracts if not include_retracts else 0, "out": str(out)}


def last_json(log: str | os.PathLike, out: str | os.PathLike) -> dict:
    """Copy the JSON object on the last non-empty line of ``log`` into ``out``."""
    from tasks.stream.ingest import last_json_line

    obj = last_json_line(Path(log).read_text(encoding="utf-8"))
    atomic_write_json(out, obj)
    return obj


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tasks.stream.prepare", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("facts", help="write the facts of a tagged data version as JSONL")
    p.add_argument("--home", default=None, help="LEDIT_HOME (default: $LEDIT_HOME or ~/.ledit)")
    p.add_argument("--tag", default="latest", help="batch tag, or 'latest'")
    p.add_argument("--scope", default="batch", choices=["batch", "cumulative"])
    p.add_argument("--include-retracts", action="store_true")
    p.add_argument("--out", required=True)
    q = sub.add_parser("last-json", help="the JSON object on a log's last line -> a file")
    q.add_argument("log")
    q.add_argument("out")
    args = parser.parse_args(argv)
    if args.cmd == "facts":
        summary = prepare_facts(args.home or None, args.tag, args.out, scope=args.scope,
                                include_retracts=args.include_retracts)
    else:
        summary = last_json(args.log, args.out)
    print(json.dumps(summary))
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
