"""``ledit why`` on held-out facts: does it name the right fact, and nothing where nothing was edited?

    .venv/bin/python -m bench.why                                  # 64 CounterFact facts, batch 64
    .venv/bin/python -m bench.why --dataset zsre --facts 64 --locality 2

Edits a batch of held-out facts (records from --offset, the same slice as bench/edit_quality.py),
then runs ``editing.provenance.explain`` on each edited prompt, each rephrase and up to
--locality locality prompts per fact (other subjects, or unrelated questions), at params.yaml's
``audit`` settings. Targets (issue 15): the right fact named for >= 95% of edited prompts, and
no fact named for >= 95% of locality prompts. Writes bench/results/why.md.
"""
from __future__ import annotations

import argparse
import platform
import sys
import time
from pathlib import Path

import torch

from bench.edit_quality import load_dataset, write_atomic
from editing import edit, load_model
from editing.provenance import explain
from tasks.settings import load_settings

ROOT = Path(__file__).resolve().parent.parent


def count_named(facts, names, locality: int) -> dict[str, list[int]]:
    """Per kind of prompt, [right, alone, n]: its fact named, only its fact named (for a locality
    prompt: no fact named), and how many prompts; ``names(prompt)`` lists the facts that fired."""
    rows = {"prompt": [0, 0, 0], "rephrase": [0, 0, 0], "locality": [0, 0, 0]}
    for f in facts:
        for kind, prompts in (("prompt", [f.prompt]), ("rephrase", f.rephrase_prompts)):
            for p in prompts:
                fired = names(p)
                rows[kind][0] += f.fact_id in fired
                rows[kind][1] += fired == [f.fact_id]
                rows[kind][2] += 1
        for pair in f.locality[:locality]:
            fired = names(pair["prompt"])
            rows["locality"][0] += not fired
            rows["locality"][2] += 1
    return rows


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dataset", default="counterfact",
                    choices=["counterfact", "zsre", "knowedit-counterfact", "knowedit-recent", "knowedit-zsre"])
    ap.add_argument("--facts", type=int, default=64)
    ap.add_argument("--offset", type=int, default=0)
    ap.add_argument("--locality", type=int, default=2, help="locality prompts per fact")
    ap.add_argument("--data-dir", type=Path, default=ROOT.parent / "shared" / "benchmarks")
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "why.md")
    args = ap.parse_args(argv)

    settings = load_settings()
    audit = settings.audit
    model, tokenizer = load_model(settings.model)
    facts = load_dataset(args.dataset, args.data_dir)[args.offset:args.offset + args.facts]
    t0 = time.perf_counter()
    adapter_set = edit(model, tokenizer, facts, settings.edit, progress=False)
    train_s = time.perf_counter() - t0

    def names(prompt):
        out = explain(model, tokenizer, adapter_set, prompt, audit.answer_tokens, audit.fired_weight)
        return [f["fact_id"] for f in out["firings"]]

    t0 = time.perf_counter()
    rows = count_named(facts, names, args.locality)
    explain_s = time.perf_counter() - t0
    n_explained = sum(r[2] for r in rows.values())

    def share(a, n):
        return "-" if not n else f"{a / n:.3f}"

    lines = [f"# ledit why on held-out facts ({time.strftime('%Y-%m-%d')})", "",
             f"Command: `python -m bench.why {' '.join(sys.argv[1:])}`  ",
             f"{len(facts)} {args.dataset} facts from record {args.offset}, one batch; model {settings.model.name}, "
             f"fired weight {audit.fired_weight}, {audit.answer_tokens} answer tokens; "
             f"{platform.machine()}, torch {torch.__version__}, {torch.get_num_threads()} threads.  ",
             f"Training {train_s:.0f} s; {n_explained} explanations in {explain_s:.0f} s "
             f"({explain_s / max(1, n_explained):.2f} s each).", "",
             "| prompts | n | its fact named | only its fact named | no fact named |",
             "|---|---:|---:|---:|---:|"]
    for kind, (right, alone, n) in rows.items():
        if kind == "locality":
            lines.append(f"| locality prompts | {n} | - | - | {share(right, n)} |")
        else:
            lines.append(f"| edited {kind}s | {n} | {share(right, n)} | {share(alone, n)} | - |")
    lines += ["", "Targets (issue 15): its fact named for >= 0.95 of edited prompts; no fact named for "
              ">= 0.95 of locality prompts."]
    text = "\n".join(lines) + "\n"
    write_atomic(args.out, text)
    print(text)


if __name__ == "__main__":
    main()
