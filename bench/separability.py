"""Can a key tell "the same question, other words" from "the same subject, another relation"?

    .venv/bin/python -m bench.separability            # 40 CounterFact facts, 40 KnowEdit zsRE facts

Issue 17's diagnostic. An edit should fire on its own fact's rephrasings and stay quiet when its
subject is asked about another relation. This measures, at each layer, whether the state of the
last prompt token can tell the two apart, by its centred cosine to the edit prompt's state:
- positives: the rephrases of the edit prompt;
- negatives: the subject asked about other relations, from the project's training templates
  (data/probes/training-templates.yaml; never a benchmark's prompts).
"AUC" is the chance that a positive is closer than a negative. "separable" is the share of facts
whose every positive is closer than every negative: what one threshold per fact needs.
The negatives are cloze statements ("{subject}'s profession is"). Where the rephrases are
questions (zsRE), the two differ in form as well as in relation, and the figure says only that
questions are told from statements: an upper bound, not evidence about relations. Use
``--negatives question`` there: the same relations asked as questions (QUESTIONS below).
Writes bench/results/separability.md.
"""
from __future__ import annotations

import argparse
import random
import sys
import warnings
from pathlib import Path

import torch
import torch.nn.functional as F

from bench.edit_quality import load_dataset, write_atomic
from editing import load_model
from editing.examples import asks, load_training_templates
from editing.trainer import text_center

ROOT = Path(__file__).resolve().parent.parent

LAYERS = (4, 8, 12, 16, 20, 24, 28)
# The training templates' relations asked as questions, for question-form facts (zsRE).
QUESTIONS = {
    "gender": "What is the gender of {subject}?", "birthplace": "Where was {subject} born?",
    "birth date": "When was {subject} born?", "death": "Where did {subject} die?",
    "citizenship": "Which country is {subject} a citizen of?", "country": "Which country is {subject} in?",
    "occupation": "What is the occupation of {subject}?", "employer": "Who is the employer of {subject}?",
    "education": "Where did {subject} study?", "language": "What language does {subject} speak?",
    "family": "Who is the father of {subject}?", "spouse": "Who is the spouse of {subject}?",
    "religion": "What is the religion of {subject}?", "team": "Which team does {subject} play for?",
    "headquarters": "Where is {subject} headquartered?", "founding": "When was {subject} founded?",
    "owner": "Who owns {subject}?", "creator": "Who created {subject}?"}


@torch.no_grad()
def last_states(model, tokenizer, texts: list[str], layers) -> torch.Tensor:
    """(n, layers, hidden): the residual entering each layer at each text's last token."""
    out = []
    for text in texts:
        enc = tokenizer(text, return_tensors="pt")
        hs = model(**enc, output_hidden_states=True).hidden_states
        out.append(torch.stack([hs[L][0, -1] for L in layers]))
    return torch.stack(out)


def other_relations(fact, k: int = 4, form: str = "cloze") -> list[str]:
    rng = random.Random(fact.subject)
    other = [t for t in load_training_templates() if not asks(fact, t[1]) and (form == "cloze" or t[0] in QUESTIONS)]
    chosen = rng.sample(other, min(k, len(other)))
    if form == "question":
        return [QUESTIONS[name].format(subject=fact.subject) for name, _, _ in chosen]
    return [rng.choice(texts).format(subject=fact.subject) for _, _, texts in chosen]


def measure(model, tokenizer, facts, layers, form: str = "cloze") -> list[tuple[int, float, float, float, float]]:
    centres = torch.stack([text_center(model, tokenizer, L) for L in layers])
    pos, neg, separable, n = [[] for _ in layers], [[] for _ in layers], [0] * len(layers), 0
    for f in facts:
        negatives = other_relations(f, form=form)
        if not (f.rephrase_prompts and negatives):
            continue
        n += 1
        texts = [f.prompt, *f.rephrase_prompts, *negatives]
        u = F.normalize(last_states(model, tokenizer, texts, layers) - centres, dim=-1)
        cos = (u[1:] * u[:1]).sum(-1)                          # (texts - 1, layers)
        p, q = cos[:len(f.rephrase_prompts)], cos[len(f.rephrase_prompts):]
        for j in range(len(layers)):
            pos[j] += p[:, j].tolist()
            neg[j] += q[:, j].tolist()
            separable[j] += int(p[:, j].min() > q[:, j].max())
    rows = []
    for j, L in enumerate(layers):
        a, b = torch.tensor(pos[j]), torch.tensor(neg[j])
        auc = float((a[:, None] > b[None]).float().mean())
        rows.append((L, auc, separable[j] / max(1, n), float(a.mean()), float(b.mean())))
    return rows, n


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--datasets", nargs="+", default=["counterfact", "knowedit-zsre"])
    ap.add_argument("--facts", type=int, default=40)
    ap.add_argument("--negatives", choices=["cloze", "question"], default="cloze",
                    help="the other relations as cloze statements (training templates) or as questions")
    ap.add_argument("--data-dir", type=Path, default=ROOT.parent / "shared" / "benchmarks")
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "separability.md")
    args = ap.parse_args(argv)
    model, tokenizer = load_model()
    lines = ["# Rephrasings against the subject's other relations, at the last prompt token", "",
             f"Command: `python -m bench.separability {' '.join(sys.argv[1:])}`", ""]
    for name in args.datasets:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            facts = load_dataset(name, args.data_dir)[:args.facts]
        rows, n = measure(model, tokenizer, facts, LAYERS, args.negatives)
        lines += [f"## {name} ({n} facts; other relations as {args.negatives} negatives)", "", "| layer | AUC | separable facts | mean cos, rephrases | "
                  "mean cos, other relations |", "|---:|---:|---:|---:|---:|"]
        lines += [f"| {L} | {auc:.3f} | {sep:.2f} | {p:.2f} | {q:.2f} |" for L, auc, sep, p, q in rows]
        lines.append("")
    if args.negatives == "cloze":
        lines.append("The negatives are cloze statements: where the rephrases are questions (zsRE) they differ "
                     "in form as well as relation, so that figure is an upper bound (see the docstring).")
    text = "\n".join(lines) + "\n"
    write_atomic(args.out, text)
    print(text)


if __name__ == "__main__":
    main()
