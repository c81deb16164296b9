"""Inference and loading with large adapter sets: 1,000 to 10,000 edits (issue 14, parts 3-4).

    .venv/bin/python -m bench.scale                              # sizes 1000 2000 5000 10000
    .venv/bin/python -m bench.scale --sizes 1000 --rounds 1      # a smoke check

Training a 10,000-edit set takes hours on a CPU, so the sets here are ``synthetic_set``s
(bench/lifelong.py): the shapes of trained BaFT edits (params.yaml's bases per edit, layers and
gate layer) with random keys and closed gates. What is measured depends on the number of
bases, not on what they learned: a trained set's gates also stay shut on unrelated text
(real sets of 998 and 680 edits: 1.006x and 0.996x, bench/results/lifelong_overhead.md).
Per size:
- adapter bytes on disk and per edit; the time to load the set (``AdapterSet.load``, checksum
  included; the median of three) and to attach it;
- greedy generation latency with the set attached over the bare model, exactly --tokens new
  tokens per prompt, at batch 1 (one prompt at a time) and batch 8, in interleaved rounds, and
  the gate's cost per generated token;
- the process's peak resident memory after the size was measured (it only grows);
- a one-fact edit on top of the set, end to end as an operator runs it: ``ledit edit FACT
  --base-adapter SET --out DIR`` in a new process, model load included (--edit-sizes).
Writes bench/results/scale.md.
"""
from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from bench.edit_quality import write_atomic
from bench.lifelong import overhead_ratio, synthetic_set
from editing import AdapterSet, load_model
from tasks.settings import load_settings

ROOT = Path(__file__).resolve().parent.parent
PROMPTS = ["The capital of France is", "My favourite recipe for soup starts with",
           "The history of the printing press", "Tell me about the weather today.",
           "A good way to learn a language is", "The largest ocean on Earth is",
           "In 1969, astronauts", "The best thing about autumn is"]
FACT = {"subject": "Toko Yasuda", "prompt": "Toko Yasuda plays the", "target_new": "violin"}


def load_times(path: Path, model) -> tuple[float, float]:
    """(load, attach) seconds: the median of three loads, one attach."""
    loads = []
    for _ in range(3):
        t0 = time.perf_counter()
        loaded = AdapterSet.load(path)
        loads.append(time.perf_counter() - t0)
    t0 = time.perf_counter()
    loaded.attach(model).remove()
    return statistics.median(loads), time.perf_counter() - t0


def one_fact_edit(set_dir: Path | None, work: Path) -> float:
    """Wall seconds of ``ledit edit`` of one fact on top of ``set_dir`` (None: no base set)."""
    fact = work / "fact.jsonl"
    fact.write_text(json.dumps(FACT) + "\n", encoding="utf-8")
    cmd = [sys.executable, "-m", "flows.cli", "edit", str(fact), "--out", str(work / "one-fact"), "--quiet"]
    if set_dir is not None:
        cmd += ["--base-adapter", str(set_dir)]
    t0 = time.perf_counter()
    done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    if done.returncode:
        raise SystemExit(f"ledit edit failed:\n{done.stderr[-2000:]}")
    return time.perf_counter() - t0


def measure(model, tokenizer, settings, n: int, args, work: Path) -> dict:
    path = synthetic_set(model, n, settings).save(work / f"set-{n}")
    size = sum(p.stat().st_size for p in path.iterdir())
    load_s, attach_s = load_times(path, model)
    adapter_set = AdapterSet.load(path)
    row = {"edits": n, "bytes": size, "bytes_per_edit": size / n, "load_s": load_s, "attach_s": attach_s}
    for batch in (1, 8):
        lat = overhead_ratio(model, tokenizer, adapter_set, PROMPTS, args.tokens, args.rounds, batch)
        row[f"ratio_b{batch}"], row[f"gate_ms_b{batch}"] = lat["ratio"], lat["gate_ms_per_token"]
    row["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    row["edit_s"] = one_fact_edit(path, work) if n in args.edit_sizes else None
    return row


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", type=int, nargs="+", default=[1000, 2000, 5000, 10000])
    ap.add_argument("--edit-sizes", type=int, nargs="*", default=[1000, 10000],
                    help="sizes that also get a one-fact `ledit edit` on top")
    ap.add_argument("--tokens", type=int, default=32, help="new tokens per prompt")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "scale.md")
    args = ap.parse_args(argv)
    settings = load_settings()
    model, tokenizer = load_model(settings.model)
    work = Path(tempfile.mkdtemp(prefix="ledit-bench-scale-"))
    bare_edit = one_fact_edit(None, work)
    rows = []
    for n in args.sizes:
        rows.append(measure(model, tokenizer, settings, n, args, work))
        print(json.dumps(rows[-1]), flush=True)
    write_atomic(args.out, render(rows, bare_edit, args, settings))
    print(args.out.read_text())


def render(rows: list[dict], bare_edit: float, args, settings) -> str:
    b = settings.edit.baft
    lines = ["# Large adapter sets: loading, inference and a one-fact edit on top", "",
             f"Command: `python -m bench.scale {' '.join(sys.argv[1:])}`  ",
             f"{time.strftime('%Y-%m-%d')}; model {settings.model.name}; CPU, torch threads "
             f"{torch.get_num_threads()}; synthetic sets ({b.bases_per_edit} bases per edit, layers "
             f"{list(settings.edit.layers)}, gate layer {b.gate_layer}; random keys, closed gates); "
             f"{len(PROMPTS)} prompts x {args.tokens} new tokens, median of {args.rounds} rounds.", "",
             "| edits | adapter MB | bytes per edit | load s | attach s | latency x, batch 1 | "
             "gate ms/token, batch 1 | latency x, batch 8 | gate ms/token, batch 8 | peak RSS MB | "
             "one-fact `ledit edit` on top, s |",
             "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        edit_s = f"{r['edit_s']:.1f}" if r["edit_s"] is not None else "-"
        lines.append(f"| {r['edits']:,} | {r['bytes'] / 1e6:.1f} | {r['bytes_per_edit']:,.0f} | {r['load_s']:.2f} | "
                     f"{r['attach_s']:.2f} | {r['ratio_b1']:.3f} | {r['gate_ms_b1']:.3f} | {r['ratio_b8']:.3f} | "
                     f"{r['gate_ms_b8']:.3f} | {r['peak_rss_mb']:.0f} | {edit_s} |")
    lines += ["", f"The same one-fact `ledit edit` with no base set: {bare_edit:.1f} s."]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
