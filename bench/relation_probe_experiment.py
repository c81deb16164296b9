"""Does a relation subspace learned from training templates separate rephrases from other relations?"""
import random, sys, json, warnings
from pathlib import Path
import torch, torch.nn.functional as F
sys.path.insert(0, "/work/main")
from bench.edit_quality import load_dataset
from bench.separability import last_states, QUESTIONS
from editing import load_model
from editing.examples import load_training_templates, asks, FALLBACK_SUBJECTS
from editing.trainer import text_center
import yaml

LAYERS = (8, 12, 16, 20, 24)
model, tok = load_model()
train_templates = load_training_templates()
probe = yaml.safe_load(open("/work/main/data/probes/relation-templates.yaml"))["relations"]
probe_t = [(name, tuple(r.get("keywords") or ()), tuple(r["templates"])) for name, r in probe.items()]
# training subjects: fallback + CounterFact *train* split subjects
import json as js
train_recs = js.load(open("/work/shared/benchmarks/counterfact-train.json"))
rng = random.Random(0)
subs = list(FALLBACK_SUBJECTS) + [r.get("subject") or r["requested_rewrite"]["subject"] for r in rng.sample(train_recs, 40)]
texts, labels = [], []
for ri, (name, kw, tmpl) in enumerate(train_templates):
    for t in tmpl:
        for s in rng.sample(subs, 12):
            texts.append(t.format(subject=s)); labels.append(ri)
print(len(texts), "training texts", len(train_templates), "relations", flush=True)
centres = torch.stack([text_center(model, tok, L) for L in LAYERS])
X = last_states(model, tok, texts, LAYERS) - centres   # (n, layers, d)
y = torch.tensor(labels)
nrel = len(train_templates)

def lda(Xl, y, k, lam=1e-1):
    mu = Xl.mean(0)
    Sw = torch.zeros(Xl.shape[1], Xl.shape[1]); Sb = torch.zeros_like(Sw)
    for c in range(nrel):
        Xc = Xl[y == c]; mc = Xc.mean(0)
        Sw += (Xc - mc).T @ (Xc - mc)
        Sb += len(Xc) * torch.outer(mc - mu, mc - mu)
    Sw = Sw / len(Xl); Sb = Sb / len(Xl)
    Sw += lam * torch.eye(len(Sw)) * Sw.diagonal().mean()
    L = torch.linalg.cholesky(Sw)
    Li = torch.linalg.inv(L)
    M = Li @ Sb @ Li.T
    ev, V = torch.linalg.eigh(M)
    W = Li.T @ V[:, -k:]
    return W

def logreg(Xl, y, steps=300):
    W = torch.zeros(Xl.shape[1], nrel, requires_grad=True); b = torch.zeros(nrel, requires_grad=True)
    Xn = F.normalize(Xl, dim=-1) * 10
    opt = torch.optim.Adam([W, b], lr=0.05)
    for _ in range(steps):
        loss = F.cross_entropy(Xn @ W + b, y) + 1e-3 * (W ** 2).sum()
        opt.zero_grad(); loss.backward(); opt.step()
    return lambda Z: (F.normalize(Z, dim=-1) * 10 @ W + b).detach()

probes = {}
for j, L in enumerate(LAYERS):
    Xl = X[:, j]
    probes[L] = {"lda": lda(Xl, y, nrel - 1), "lr": logreg(Xl, y)}

def auc(p, q):
    a, b = torch.tensor(p), torch.tensor(q)
    return float((a[:, None] > b[None]).float().mean()) if len(a) and len(b) else float("nan")

def run(name, facts, negs_fn):
    res = {L: {"raw": ([], []), "lda": ([], []), "lr": ([], []), "lrp": ([], [])} for L in LAYERS}
    n = 0
    for f in facts:
        negs = negs_fn(f)
        if not (f.rephrase_prompts and negs): continue
        n += 1
        T = [f.prompt, *f.rephrase_prompts, *negs]
        Z = last_states(model, tok, T, LAYERS) - centres
        npos = len(f.rephrase_prompts)
        for j, L in enumerate(LAYERS):
            z = Z[:, j]
            sims = {"raw": F.cosine_similarity(z[1:], z[:1]),
                    "lda": F.cosine_similarity(z[1:] @ probes[L]["lda"], z[:1] @ probes[L]["lda"]),
                    "lr": F.cosine_similarity(probes[L]["lr"](z[1:]), probes[L]["lr"](z[:1]))}
            pr = probes[L]["lr"](z).softmax(-1); sims["lrp"] = (pr[1:] * pr[:1]).sum(-1)
            for k, s in sims.items():
                res[L][k][0].extend(s[:npos].tolist()); res[L][k][1].extend(s[npos:].tolist())
    print(f"## {name}: {n} facts")
    for L in LAYERS:
        print(L, {k: round(auc(*v), 3) for k, v in res[L].items()}, flush=True)

def probe_negs(f):
    rr = random.Random(f.subject)
    other = [t for t in probe_t if not asks(f, t[1])]
    return [rr.choice(t[2]).format(subject=f.subject) for t in rr.sample(other, min(4, len(other)))]
def question_negs(f):
    rr = random.Random(f.subject)
    other = [t for t in train_templates if not asks(f, t[1]) and t[0] in QUESTIONS]
    return [QUESTIONS[t[0]].format(subject=f.subject) for t in rr.sample(other, min(4, len(other)))]
with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    cf = load_dataset("counterfact", Path("/work/shared/benchmarks"))[:40]
    zs = load_dataset("knowedit-zsre", Path("/work/shared/benchmarks"))[:40]
run("counterfact, held-out probe-template negatives", cf, probe_negs)
run("knowedit-zsre, question negatives", zs, question_negs)
