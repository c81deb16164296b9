"""Processes sharing a host: does each one's training slow down, and does a share of the cores help?

    .venv/bin/python -m bench.threads                      # 3 processes, 16 CounterFact facts each
    .venv/bin/python -m bench.threads --processes 2 --facts 8

Issue 14: timed beside other jobs, the same edits ran up to 10x slower (three processes with
two torch threads each on two cores). This trains the same facts (CounterFact records from
1000 on, off the held-out slice) in one process alone, then in N processes at once, first
with every process on torch's default thread count (every core), then with each given its
share (``model.threads`` = cores / N, at least 1). Each process reports its own training
seconds; the table gives the slowest and the mean. Writes bench/results/threads.md.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from statistics import mean

from bench.edit_quality import write_atomic

ROOT = Path(__file__).resolve().parent.parent


def worker(n_facts: int, threads: int) -> None:
    """One process: load the model with ``threads``, train ``n_facts``, print JSON seconds."""
    import warnings

    import torch

    from bench.edit_quality import load_dataset
    from editing import edit, load_model
    from tasks.settings import load_settings

    settings = load_settings()
    model, tokenizer = load_model(settings.model.override({"threads": threads}))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        facts = load_dataset("counterfact", ROOT.parent / "shared" / "benchmarks")
    facts = facts[1000:1000 + n_facts] if len(facts) > 1000 + n_facts else facts[:n_facts]
    t0 = time.perf_counter()
    edit(model, tokenizer, facts, settings.edit, progress=False)
    print(json.dumps({"seconds": time.perf_counter() - t0, "threads": torch.get_num_threads()}))


def run_together(n: int, n_facts: int, threads: int) -> list[dict]:
    """``n`` worker processes started at once; each one's JSON line."""
    cmd = [sys.executable, "-m", "bench.threads", "--worker", "--facts", str(n_facts), "--threads", str(threads)]
    procs = [subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for _ in range(n)]
    outs = [p.communicate() for p in procs]
    for p, (_, err) in zip(procs, outs):
        if p.returncode:
            raise SystemExit(f"a worker failed:\n{err[-2000:]}")
    return [json.loads(out.strip().splitlines()[-1]) for out, _ in outs]


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--processes", type=int, default=3)
    ap.add_argument("--facts", type=int, default=16)
    ap.add_argument("--threads", type=int, default=0, help=argparse.SUPPRESS)
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "threads.md")
    args = ap.parse_args(argv)
    if args.worker:
        return worker(args.facts, args.threads)
    cores = os.cpu_count() or 1
    share = max(1, cores // args.processes)
    runs = [("alone, every core", 1, 0), (f"{args.processes} at once, every core each", args.processes, 0),
            (f"{args.processes} at once, {share} thread(s) each", args.processes, share)]
    lines = ["# Training beside other processes on one host", "",
             f"Command: `python -m bench.threads {' '.join(sys.argv[1:])}`  ",
             f"{args.facts} CounterFact facts per process (records from 1000), params.yaml's edit settings; "
             f"{cores} CPU cores; {time.strftime('%Y-%m-%d')}.", "",
             "| run | torch threads per process | slowest process, s | mean, s | s per edit (mean) |",
             "|---|---:|---:|---:|---:|"]
    for name, n, threads in runs:
        results = run_together(n, args.facts, threads)
        seconds = [r["seconds"] for r in results]
        lines.append(f"| {name} | {results[0]['threads']} | {max(seconds):.1f} | {mean(seconds):.1f} | "
                     f"{mean(seconds) / args.facts:.2f} |")
        print(lines[-1], flush=True)
    text = "\n".join(lines) + "\n"
    write_atomic(args.out, text)
    print(text)


if __name__ == "__main__":
    main()
