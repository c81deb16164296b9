"""Where a lifelong BaFT set's locality leaks, and what lowering its gate biases buys.

    .venv/bin/python -m bench.lifelong --datasets zsre --T 100 --methods baft \\
        --set edit.baft.gate_margin=0 --save-sets /tmp/sets --overhead-rounds 0 --overhead-edits 0
    .venv/bin/python -m bench.gate_diagnosis /tmp/sets/zsre-T100-baft --dataset zsre --T 100

The set's facts are the first T usable records of the dataset from --offset, as
in bench/lifelong.py. For every locality prompt: does the set change the base
model's answer, and what is the strongest pooled basis weight anywhere in it?
A leak through many small weights adding up would show small strongest weights
on the failing prompts; half-open bases show large ones. Then every gate bias is
moved down by each --shifts value (what ``edit.baft.gate_margin`` does after
training), with --ceiling also each basis down to that ceiling on its own fact's
prompt (``edit.baft.gate_ceiling``), and all the facts are scored again on the set. Writes
bench/results/gate_diagnosis.md and prints it.
"""
from __future__ import annotations

import argparse
import dataclasses
import statistics
import sys
from pathlib import Path

import torch

from bench.edit_quality import device_name, load_dataset, write_atomic
from editing import AdapterSet, load_model
from editing.evaluate import evaluate_facts
from editing.metrics import answer_argmax, locality
from editing.models import EMBEDDED_MODEL
from editing.examples import encode
from editing.trainer import gate_shift, residual_at

ROOT = Path(__file__).resolve().parent.parent


@torch.no_grad()
def argmax_and_strongest_weights(model, tokenizer, adapter_set, pairs, batch_size=64):
    """With the set attached, per (prompt, answer): ``answer_argmax``'s tokens and the
    largest pooled basis weight at any of its positions, from one forward pass."""
    argmax, strongest = [], []
    with adapter_set.attach(model) as handle:
        if not handle.states:
            raise SystemExit("the set reads no pooled gate weights (ReFT, LoRA or gate_layer null)")
        for i in range(0, len(pairs), batch_size):
            argmax.extend(answer_argmax(model, tokenizer, pairs[i:i + batch_size], batch_size))
            # causal_pool has already zeroed padding; the running maximum ends at the last token.
            top = torch.stack([state.weights[:, -1].amax(-1) for state in handle.states.values()]).amax(0)
            strongest.extend(top.tolist())
    return argmax, strongest


def shifted(adapter_set: AdapterSet, shift: float, ceiling: float | None = None,
            model=None, tokenizer=None, facts=None) -> AdapterSet:
    """A copy of the set with every gate bias moved down by ``shift`` logits (negative:
    up), and with ``ceiling`` further down until its fact's prompt holds it open by at
    most ``ceiling`` logits: what ``edit.baft.gate_margin`` and ``gate_ceiling`` do
    after training (``gate_shift``), applied to a finished set."""
    by_id = {f.fact_id: f for f in facts or []}
    out = adapter_set.copy()
    out.blocks = []
    for block in adapter_set.blocks:
        moved = {}
        for L, iv in block.interventions.items():
            moved[L] = iv.select(torch.arange(iv.rank))   # a copy
            if ceiling is None:
                moved[L].lower_gates(shift)
                continue
            enc = encode(tokenizer, [(by_id[f].prompt, by_id[f].target_new, by_id[f].subject, i)
                                     for i, f in enumerate(block.fact_ids)])
            prompt_g = residual_at(model, enc.ids, (iv.gate_layer,))[0]
            valid = torch.arange(enc.ids.shape[1])[None, :] < enc.lengths[:, None]
            moved[L].lower_gates(gate_shift(iv, prompt_g, enc.target_mask, valid, block.owner, shift, ceiling))
        out.blocks.append(dataclasses.replace(block, interventions=moved))
    return out


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("set_dir", type=Path, help="a BaFT adapter set (bench/lifelong.py --save-sets)")
    ap.add_argument("--dataset", choices=["zsre", "counterfact"], default="zsre")
    ap.add_argument("--T", type=int, required=True, help="how many facts the set edits")
    ap.add_argument("--offset", type=int, default=0)
    ap.add_argument("--data-dir", type=Path, default=ROOT.parent / "shared" / "benchmarks")
    ap.add_argument("--shifts", nargs="+", type=float, default=[0.0, 0.5, 1.0, 2.0],
                    help="gate-bias shifts (logits) to score; negative ones raise the biases")
    ap.add_argument("--ceiling", type=float, default=None,
                    help="also lower each basis until its fact's prompt holds it open by at most this "
                         "(edit.baft.gate_ceiling, on top of whatever the set was trained with)")
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "gate_diagnosis.md")
    args = ap.parse_args(argv)

    adapter_set = AdapterSet.load(args.set_dir)
    if adapter_set.method != "baft":
        raise SystemExit(f"{args.set_dir} is a {adapter_set.method} set; only BaFT sets have gates")
    model, tokenizer = load_model(adapter_set.base_model or EMBEDDED_MODEL)
    facts = load_dataset(args.dataset, args.data_dir)[args.offset:args.offset + args.T]
    if not set(adapter_set.fact_ids) <= {f.fact_id for f in facts}:   # superseded facts are gone
        raise SystemExit(f"{args.set_dir} does not edit the first {args.T} {args.dataset} facts "
                         f"from offset {args.offset}")

    pairs = [(x["prompt"], x["answer"]) for f in facts for x in f.locality]
    base = answer_argmax(model, tokenizer, pairs)
    edited, top = argmax_and_strongest_weights(model, tokenizer, adapter_set, pairs)
    kept = locality(base, edited)
    failing = [w for w, k in zip(top, kept) if k < 1]
    passing = [w for w, k in zip(top, kept) if k == 1]

    def median(xs):
        return f"{statistics.median(xs):.3g}" if xs else "-"

    lines = [
        "# Gate diagnosis", "",
        f"Set `{args.set_dir}` ({len(facts)} {args.dataset} facts, "
        f"{sum(iv.rank for b in adapter_set.blocks for iv in b.interventions.values())} bases), "
        f"device `{device_name()}`.", "",
        f"Command: `python -m bench.gate_diagnosis {' '.join(sys.argv[1:] if argv is None else argv)}`", "",
        "## Strongest pooled basis weight on the locality prompts", "",
        "| locality prompts | count | median strongest weight | max |", "|---|---|---|---|",
        f"| answer changed (locality < 1) | {len(failing)} | {median(failing)} | "
        f"{max(failing, default=float('nan')):.3g} |",
        f"| answer kept | {len(passing)} | {median(passing)} | {max(passing, default=float('nan')):.3g} |",
        "", "## Every gate bias moved down after training"
        + (f", and each down to a ceiling of {args.ceiling:g} logits on its fact's prompt" if args.ceiling is not None else ""),
        "", "| shift (logits) | reliability | generality | locality |", "|---|---|---|---|",
    ]
    for shift in args.shifts:
        moved = shifted(adapter_set, shift, args.ceiling, model, tokenizer, facts)
        m = evaluate_facts(model, tokenizer, facts, attach=moved.attach,
                           base_locality=base)["means"]
        lines.append(f"| {shift:g} | {m['reliability']:.3f} | {m['generality']:.3f} | {m['locality']:.3f} |")
        print(lines[-1], flush=True)
    text = "\n".join(lines) + "\n"
    write_atomic(args.out, text)
    print(text)


if __name__ == "__main__":
    main()
