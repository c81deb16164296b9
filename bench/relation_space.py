"""Can a relation space learned from training data tell rephrasings from other relations?

    .venv/bin/python -m bench.relation_space                  # layer 20, 1,000 CounterFact train records

Issue 17's diagnostic, after bench/separability.py: there a fixed key (the raw last-token state)
separates a fact's rephrasings from its subject's other relations with an AUC of only 0.52-0.74.
Here a linear map P (hidden -> 64) is learned contrastively so that prompts asking the same
relation are close in P's space and the same subject asked about another relation is far:
- from the CounterFact **train** split (counterfact-train.json, never an evaluation file): each
  record's prompt against its rephrase and its locality prompt (the same relation, another
  subject), and against another record's prompt with this record's subject swapped in (almost
  always another relation);
- from relation labels in the style of Wikidata's (data/probes/wikidata-labels.txt, written
  for this project): "The name of the {label} of {subject} is" against "The {label} of
  {subject} is" and the same label with another subject, and against another label.
It is then read on the evaluation files, for measurement only: CounterFact rephrases against
the subject's other relations from the gate's probe templates, KnowEdit zsRE rephrases against
other relations asked as questions, and the share of KnowEdit Relation_Specificity prompts that
would open a gate at each threshold. Writes bench/results/relation_space.md.
"""
from __future__ import annotations

import argparse
import json
import random
import sys
import tempfile
import warnings
from pathlib import Path

import torch
import torch.nn.functional as F

from bench.edit_quality import load_dataset, write_atomic
from bench.separability import QUESTIONS
from editing import load_model
from editing.examples import asks, encode, load_training_templates
from editing.trainer import residual_at, text_center

ROOT = Path(__file__).resolve().parent.parent
LABELS = ROOT / "data" / "probes" / "wikidata-labels.txt"
PROBES = ROOT / "data" / "probes" / "relation-templates.yaml"


@torch.no_grad()
def states(model, tokenizer, texts: list[str], layer: int, center: torch.Tensor) -> torch.Tensor:
    """(n, hidden): the centred, normalised residual entering ``layer`` at each text's last token."""
    enc = encode(tokenizer, [(t, None, None, -1) for t in texts])
    out = []
    for i in range(0, len(texts), 128):
        h = residual_at(model, enc.ids[i:i + 128], (layer,))[0]
        out.append(h[torch.arange(len(h)), enc.lengths[i:i + 128] - 1])
    return F.normalize(torch.cat(out) - center, dim=-1)


def cached_states(model, tokenizer, texts: tuple[list[str], ...], layer: int, center: torch.Tensor,
                  cache: Path | None) -> list[torch.Tensor]:
    """``states`` of each list of texts, kept in ``cache`` (safetensors) keyed by the texts and layer."""
    import hashlib

    from safetensors.torch import load_file, save_file

    key = hashlib.sha256(json.dumps([layer, texts]).encode()).hexdigest()[:16]
    path = cache / f"relation-space-{key}.safetensors" if cache else None
    if path and path.exists():
        saved = load_file(path)
        return [saved[str(i)] for i in range(len(texts))]
    out = [states(model, tokenizer, t, layer, center) for t in texts]
    if path:
        cache.mkdir(parents=True, exist_ok=True)
        save_file({str(i): x.contiguous() for i, x in enumerate(out)}, str(path))
    return out


def training_texts(records: list[dict], labels: list[str], n_label: int, rng: random.Random):
    """(anchors, positives, second positives, negatives): four aligned lists of texts."""
    anchor, pos, pos2, neg = [], [], [], []
    for r in records:
        other = rng.choice(records)
        anchor.append(r["prompt"])
        pos.append(r["rephrase_prompt"])
        pos2.append(r["locality_prompt"])
        neg.append(other["prompt"].replace(other["subject"], r["subject"]))
    subjects = [r["subject"] for r in records]
    for _ in range(n_label):
        a, b = rng.sample(labels, 2)
        s, s2 = rng.sample(subjects, 2)
        anchor.append(f"The name of the {a} of {s} is")
        pos.append(f"The {a} of {s} is")
        pos2.append(f"The name of the {a} of {s2} is")
        neg.append(f"The name of the {b} of {s} is")
    return anchor, pos, pos2, neg


def fit(A, Pz, P2, N, n_train: int, dims: int = 64, steps: int = 400, tau: float = 0.1, seed: int = 0):
    """P (hidden, dims): InfoNCE, each anchor against its positive, the batch's other positives
    and its own swapped-relation negative."""
    g = torch.Generator().manual_seed(seed)
    P = (torch.randn(A.shape[1], dims, generator=g) * 0.05).requires_grad_(True)
    opt = torch.optim.Adam([P], lr=0.01)
    for _ in range(steps):
        idx = torch.randint(0, n_train, (256,), generator=g)
        a, n = F.normalize(A[idx] @ P, dim=-1), F.normalize(N[idx] @ P, dim=-1)
        loss = 0
        for positive, weight in ((Pz, 1.0), (P2, 0.5)):
            p = F.normalize(positive[idx] @ P, dim=-1)
            logits = torch.cat([a @ p.T, (a * n).sum(-1, keepdim=True)], 1) / tau
            loss = loss + weight * F.cross_entropy(logits, torch.arange(len(idx)))
        opt.zero_grad()
        loss.backward()
        opt.step()
    return P.detach()


def auc(pos, neg) -> float:
    a, b = torch.tensor(pos), torch.tensor(neg)
    return float((a[:, None] > b[None]).float().mean()) if len(a) and len(b) else float("nan")


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--layer", type=int, default=20)
    ap.add_argument("--train-records", type=int, default=1000, help="CounterFact train records")
    ap.add_argument("--label-pairs", type=int, default=1000, help="Wikidata-style label examples (0: none)")
    ap.add_argument("--facts", type=int, default=60, help="evaluation facts per dataset")
    ap.add_argument("--data-dir", type=Path, default=ROOT.parent / "shared" / "benchmarks")
    ap.add_argument("--cache", type=Path, default=Path(tempfile.gettempdir()) / "ledit-bench",
                    help="where the training states are kept between runs")
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "relation_space.md")
    args = ap.parse_args(argv)
    import yaml

    torch.manual_seed(0)
    rng = random.Random(0)
    model, tokenizer = load_model()
    records = [r for r in json.loads((args.data_dir / "counterfact-train.json").read_text())
               if r["subject"] in r["prompt"]]
    records = rng.sample(records, args.train_records)
    labels = [x.strip() for x in LABELS.read_text().splitlines() if x.strip() and not x.startswith("#")]
    texts = training_texts(records, labels, args.label_pairs, rng)
    center = text_center(model, tokenizer, args.layer)
    A, Pz, P2, N = cached_states(model, tokenizer, texts, args.layer, center, args.cache)
    # Held out: the last 10% of each source.
    n_cf, n_lab = args.train_records, args.label_pairs
    train = torch.cat([torch.arange(int(0.9 * n_cf)), n_cf + torch.arange(int(0.9 * n_lab))])
    P = fit(A[train], Pz[train], P2[train], N[train], len(train))
    held = torch.cat([torch.arange(int(0.9 * n_cf), n_cf), n_cf + torch.arange(int(0.9 * n_lab), n_lab)])

    def space(x):
        return F.normalize(x @ P, dim=-1)

    lines = [f"# A learned relation space (layer {args.layer})", "",
             f"Command: `python -m bench.relation_space {' '.join(sys.argv[1:])}`  ",
             f"Trained on {args.train_records} CounterFact train records and {args.label_pairs} "
             "Wikidata-style label examples (90%; the rest held out). AUC: the chance that a "
             "rephrase is closer to its prompt than the subject asked about another relation.", "",
             "| set | negatives | AUC, raw state | AUC, learned space |", "|---|---|---:|---:|"]
    lines.append(f"| held-out training records | swapped relation, same subject | "
                 f"{auc((A[held] * Pz[held]).sum(-1).tolist(), (A[held] * N[held]).sum(-1).tolist()):.3f} | "
                 f"{auc((space(A[held]) * space(Pz[held])).sum(-1).tolist(), (space(A[held]) * space(N[held])).sum(-1).tolist()):.3f} |")
    probes = yaml.safe_load(PROBES.read_text())["relations"]
    probe_t = [(tuple(r.get("keywords") or ()), tuple(r["templates"])) for r in probes.values()]
    train_t = load_training_templates()

    def probe_negatives(f):
        r = random.Random(f.subject)
        other = [t for t in probe_t if not asks(f, t[0])]
        return [r.choice(t[1]).format(subject=f.subject) for t in r.sample(other, min(4, len(other)))]

    def question_negatives(f):
        r = random.Random(f.subject)
        other = [t for t in train_t if not asks(f, t[1]) and t[0] in QUESTIONS]
        return [QUESTIONS[t[0]].format(subject=f.subject) for t in r.sample(other, min(4, len(other)))]

    def similarities(facts, negatives):
        out = {"raw": ([], []), "learned": ([], [])}
        for f in facts:
            neg = negatives(f)
            if not (f.rephrase_prompts and neg):
                continue
            z = states(model, tokenizer, [f.prompt, *f.rephrase_prompts, *neg], args.layer, center)
            k = len(f.rephrase_prompts)
            for name, e in (("raw", z), ("learned", space(z))):
                c = (e[1:] * e[:1]).sum(-1)
                out[name][0].extend(c[:k].tolist())
                out[name][1].extend(c[k:].tolist())
        return out

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        cf = load_dataset("counterfact", args.data_dir)[:args.facts]
        zs = load_dataset("knowedit-zsre", args.data_dir)[:args.facts]
        wc = load_dataset("knowedit-counterfact", args.data_dir)[:args.facts]
        wr = load_dataset("knowedit-recent", args.data_dir)[:args.facts]
    cf_sims = similarities(cf, probe_negatives)
    zs_sims = similarities(zs, question_negatives)
    for name, negs, sims in (("CounterFact (eval)", "probe templates", cf_sims),
                             ("KnowEdit zsRE", "questions", zs_sims)):
        lines.append(f"| {name} | {negs} | {auc(*sims['raw']):.3f} | {auc(*sims['learned']):.3f} |")

    def rs_similarities(facts):
        out = []
        for f in facts:
            prompts = [x["prompt"] for x in f.locality if x.get("kind") == "Relation_Specificity"]
            if prompts:
                e = space(states(model, tokenizer, [f.prompt, *prompts], args.layer, center))
                out.extend((e[1:] * e[:1]).sum(-1).tolist())
        return out

    wc_rs, wr_rs = rs_similarities(wc), rs_similarities(wr)
    lines += ["", "Share that a gate at each threshold of the learned space's cosine would open on:", "",
              "| threshold | CounterFact rephrases | CounterFact probe negatives | KnowEdit zsRE rephrases | "
              "KnowEdit zsRE question negatives | KnowEdit WikiData_counterfact RS prompts | "
              "KnowEdit WikiData_recent RS prompts |", "|---:|---:|---:|---:|---:|---:|---:|"]
    for thr in (0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8):
        share = [sum(x > thr for x in v) / max(1, len(v)) for v in
                 (cf_sims["learned"][0], cf_sims["learned"][1], zs_sims["learned"][0], zs_sims["learned"][1],
                  wc_rs, wr_rs)]
        lines.append(f"| {thr} | " + " | ".join(f"{x:.2f}" for x in share) + " |")
    text = "\n".join(lines) + "\n"
    write_atomic(args.out, text)
    print(text)


if __name__ == "__main__":
    main()
