"""Benchmark the fact-update stream: validate + deduplicate N generated records, then version.

    python -m bench.ingest                 # 1,000,000 records, 10% duplicates, 1% bad
    python -m bench.ingest --records 100000 --files 2

The records are written as JSON Lines files straight into the inbox of a fresh LEDIT_HOME
(generation is not timed). The ingest then runs in a child process, so its peak RSS is the
ingest's alone: validation and deduplication are timed together (the issue's target: at
most 60 s and 2 GB), and the DVC versioning (Parquet write, dvc add, git commit + tag,
dvc push) separately. The counts are checked against what was generated. The table goes
to stdout and to bench/results/ingest.md.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import random
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results" / "ingest.md"

RELATIONS = [("mother tongue", "The mother tongue of {} is", "{} grew up speaking"),
             ("capital", "The capital of {} is", "{}'s capital city is"),
             ("employer", "{} works for", "{} is employed by"),
             ("position", "{} plays in the position of", "On the field, {} is a"),
             ("located in", "{} is located in", "You can find {} in")]
BAD_KINDS = ("missing_field", "wrong_type", "empty_string", "whitespace_string", "over_long",
             "malformed_line", "noop_target", "undecodable_bytes", "bad_timestamp", "bad_op")


def good_record(i: int, rng: random.Random) -> dict:
    rel, prompt, reph = RELATIONS[i % len(RELATIONS)]
    subject = f"Entity {i} of set {i % 997}"
    return {"subject": subject, "prompt": prompt.format(subject),
            "target_new": f"Value {rng.randrange(10**6)}", "target_old": f"Old {i}",
            "relation": rel, "rephrase_prompts": [reph.format(subject)],
            "locality": [{"prompt": prompt.format(f"Other {i}"), "answer": f"Old {i + 1}"}],
            "source": f"feed-{i % 7}",
            "observed_at": f"2025-{1 + i % 12:02d}-{1 + i % 28:02d}T{i % 24:02d}:{i % 60:02d}:00Z"}


def bad_line(i: int, rng: random.Random) -> bytes:
    kind = BAD_KINDS[i % len(BAD_KINDS)]
    rec = good_record(10**9 + i, rng)
    if kind == "missing_field":
        del rec["target_new"]
    elif kind == "wrong_type":
        rec["subject"] = 12345
    elif kind == "empty_string":
        rec["prompt"] = ""
    elif kind == "whitespace_string":
        rec["target_new"] = " \t "
    elif kind == "over_long":
        rec["prompt"] = "x" * 2500
    elif kind == "malformed_line":
        return json.dumps(rec)[:-9].encode()
    elif kind == "noop_target":
        rec["target_old"] = rec["target_new"].upper()
    elif kind == "undecodable_bytes":
        return json.dumps(rec).encode().replace(b"Entity", b"Ent\xff\xfeity", 1)
    elif kind == "bad_timestamp":
        rec["observed_at"] = "last tuesday"
    elif kind == "bad_op":
        rec["op"] = "delete"
    return json.dumps(rec).encode()


def generate(inbox: Path, n: int, files: int, dup_frac: float, bad_frac: float, seed: int = 0
             ) -> dict:
    """JSON Lines files with exactly round(n*dup_frac) exact duplicates and round(n*bad_frac)
    bad records, shuffled; duplicates copy earlier good records, within and across files."""
    rng = random.Random(seed)
    n_bad, n_dup = round(n * bad_frac), round(n * dup_frac)
    n_good = n - n_bad - n_dup
    kinds = ["g"] * n_good + ["d"] * n_dup + ["b"] * n_bad
    rng.shuffle(kinds)
    # a duplicate must follow at least one good record
    first_good = kinds.index("g")
    if first_good:
        kinds[0], kinds[first_good] = kinds[first_good], kinds[0]
    inbox.mkdir(parents=True, exist_ok=True)
    per_file = -(-n // files)
    written, goods = [], []
    g = b = 0
    for fno in range(files):
        path = inbox / f"bench-{fno:03d}.jsonl"
        with open(path, "wb") as f:
            buf = []
            for kind in kinds[fno * per_file:(fno + 1) * per_file]:
                if kind == "g":
                    line = json.dumps(good_record(g, rng)).encode()
                    g += 1
                    goods.append(line)
                elif kind == "d":
                    line = goods[rng.randrange(len(goods))]
                else:
                    line = bad_line(b, rng)
                    b += 1
                buf.append(line)
                if len(buf) >= 50_000:
                    f.write(b"\n".join(buf) + b"\n")
                    buf = []
            if buf:
                f.write(b"\n".join(buf) + b"\n")
        written.append(path)
    size = sum(p.stat().st_size for p in written)
    return {"records": n, "good": n_good, "duplicates": n_dup, "bad": n_bad,
            "files": len(written), "bytes": size}


def child(home: str) -> None:
    """Run one ingest and print its result (with this process's peak RSS) as JSON."""
    import polars  # noqa: F401  (the imports' share of the peak is reported apart)

    from tasks.stream import dedupe, ledger, readers, sources, validate, version  # noqa: F401
    from tasks.stream.ingest import ingest

    import_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    t0 = time.perf_counter()
    r = ingest(home)
    out = r.to_dict()
    out["wall_s"] = round(time.perf_counter() - t0, 2)
    out["import_rss_mb"] = round(import_rss, 1)
    print(json.dumps(out))


def results_table(gen: dict, res: dict) -> tuple[list[tuple[str, str]], bool]:
    """The table's rows, and whether the counts match the generator and the targets hold."""
    t = res["timings"]
    vd = t["validate_s"] + t["dedupe_s"]
    version_s = sum(t.get(k, 0) for k in ("write_s", "dvc_add_s", "commit_s", "dvc_push_s"))
    ok_counts = (res["quarantined"] == gen["bad"] and res["accepted"] == gen["good"]
                 and res["duplicates"] == gen["duplicates"]
                 and res["records_in"] == res["accepted"] + res["duplicates"] + res["quarantined"])
    target = vd <= 60 and t["peak_rss_mb"] <= 2048
    rows = [
        ("records in (files)", f"{res['records_in']:,} ({gen['files']} JSONL files, "
                               f"{gen['bytes'] / 1e6:.0f} MB)"),
        ("accepted / duplicates / quarantined",
         f"{res['accepted']:,} / {res['duplicates']:,} / {res['quarantined']:,}"),
        ("counts match the generator", "yes" if ok_counts else "**NO**"),
        ("validate (read, parse, check, keys)", f"{t['validate_s']:.1f} s"),
        ("deduplicate (lazy polars, ledgers)", f"{t['dedupe_s']:.1f} s"),
        ("**validate + deduplicate**", f"**{vd:.1f} s** (target ≤ 60 s)"),
        ("peak RSS after validation", f"{t['peak_rss_validate_mb']:,.0f} MB"),
        ("**peak RSS, validate + deduplicate**",
         f"**{t['peak_rss_mb']:,.0f} MB** (target ≤ 2048 MB)"),
        ("RSS of the imports alone (polars, pyarrow, editing → torch)",
         f"{res['import_rss_mb']:,.0f} MB"),
        ("versioning: write batch Parquet", f"{t.get('write_s', 0):.1f} s"),
        ("versioning: dvc add", f"{t.get('dvc_add_s', 0):.1f} s"),
        ("versioning: git commit + tag", f"{t.get('commit_s', 0):.1f} s"),
        ("versioning: dvc push (local remote)", f"{t.get('dvc_push_s', 0):.1f} s"),
        ("**versioning total**", f"**{version_s:.1f} s**"),
        ("whole `ingest()` wall time", f"{res['wall_s']:.1f} s"),
        ("targets met", "yes" if target and ok_counts else "**NO**"),
    ]
    return rows, target and ok_counts


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--records", type=int, default=1_000_000)
    ap.add_argument("--files", type=int, default=4)
    ap.add_argument("--duplicates", type=float, default=0.10)
    ap.add_argument("--bad", type=float, default=0.01)
    ap.add_argument("--home", default=None, help="LEDIT_HOME to use (default: a temp dir, removed)")
    ap.add_argument("--out", default=str(RESULTS))
    ap.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        child(args.child)
        return 0

    from editing import offline

    offline.apply()
    tmp = None if args.home else tempfile.mkdtemp(prefix="ledit-bench-")
    home = Path(args.home or tmp)
    try:
        from tasks.stream.workspace import init_workspace

        load0 = os.getloadavg()[0]
        h = init_workspace(home)
        t0 = time.perf_counter()
        gen = generate(h.default_inbox, args.records, args.files, args.duplicates, args.bad)
        gen_s = time.perf_counter() - t0
        env = {**os.environ, "PYTHONPATH": str(ROOT)}
        proc = subprocess.run([sys.executable, __file__, "--child", str(home)], env=env,
                              capture_output=True, text=True)
        if proc.returncode:
            print(proc.stdout, proc.stderr, file=sys.stderr)
            return proc.returncode
        res = json.loads(proc.stdout.strip().splitlines()[-1])
    finally:
        if tmp:
            shutil.rmtree(tmp, ignore_errors=True)

    rows, met = results_table(gen, res)
    import polars as pl

    head = (f"Machine: {platform.machine()}, {os.cpu_count()} CPU cores (load average "
            f"{load0:.1f} when the run started: other work shared the cores), Python "
            f"{platform.python_version()}, polars {pl.__version__}. Generation "
            f"({gen_s:.0f} s) not timed. {args.duplicates:.0%} exact duplicates, "
            f"{args.bad:.0%} bad records ({', '.join(BAD_KINDS)}).")
    table = "| step | result |\n| --- | --- |\n" + "\n".join(f"| {a} | {b} |" for a, b in rows)
    text = (f"# Ingest benchmark: {args.records:,} records\n\n"
            f"`python -m bench.ingest --records {args.records} --files {args.files}`\n\n"
            f"{head}\n\n{table}\n")
    print(text)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(text, encoding="utf-8")
    return 0 if met else 1


if __name__ == "__main__":
    sys.exit(main())
