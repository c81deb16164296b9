"""EasyEdit-compatible editing metrics (DESIGN.md, "Metrics").

- reliability / generality / portability: teacher-forced token accuracy of the
  answer after the prompt (the argmax at each answer position);
- locality: the fraction of argmax tokens at the locality-answer positions that
  are unchanged against the unedited base;
- exact match: greedy decoding of the target's length equals the target;
- fluency: n-gram entropy of a greedy generation, bigrams weighted 2/3 and
  trigrams 4/3 (EasyEdit's ``n_gram_entropy``);
- perplexity: of fixed unrelated text, for drift (the edited model's perplexity
  over the base's, minus one).

Every function takes the model as it should be measured: attach an adapter set
before calling, or don't for the base.
"""
from __future__ import annotations

import math
import re
from collections import Counter

import torch


def _pairs_to_batch(tokenizer, pairs: list[tuple[str, str]]):
    """Left-padded prompt+answer ids and, per row, the answer token positions."""
    rows, spans = [], []
    for prompt, answer in pairs:
        p = tokenizer(prompt)["input_ids"]
        full = tokenizer(prompt + " " + answer)["input_ids"]
        rows.append(full)
        spans.append((len(p), len(full)))
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), tokenizer.pad_token_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    offsets = []
    for i, r in enumerate(rows):
        off = width - len(r)
        ids[i, off:] = torch.tensor(r)
        mask[i, off:] = 1
        offsets.append(off)
    return ids, mask, [(a + o, b + o) for (a, b), o in zip(spans, offsets)]


@torch.no_grad()
def answer_argmax(model, tokenizer, pairs: list[tuple[str, str]], batch_size: int = 64):
    """For each (prompt, answer): (predicted argmax tokens, answer tokens) at the answer positions."""
    device = next(model.parameters()).device
    out = []
    for i in range(0, len(pairs), batch_size):
        chunk = pairs[i:i + batch_size]
        ids, mask, spans = _pairs_to_batch(tokenizer, chunk)
        logits = model(input_ids=ids.to(device), attention_mask=mask.to(device), use_cache=False).logits
        pred = logits.argmax(-1).cpu()
        for row, (a, b) in enumerate(spans):
            out.append((pred[row, a - 1:b - 1].tolist(), ids[row, a:b].tolist()))
    return out


def token_accuracy(model, tokenizer, pairs: list[tuple[str, str]]) -> list[float]:
    """Teacher-forced accuracy of each answer: reliability, generality, portability."""
    return [sum(p == t for p, t in zip(pred, gold)) / max(1, len(gold))
            for pred, gold in answer_argmax(model, tokenizer, pairs)]


def locality(base_argmax: list[tuple[list, list]], edited_argmax: list[tuple[list, list]]) -> list[float]:
    """Fraction of argmax tokens at the answer positions unchanged against the base."""
    return [sum(a == b for a, b in zip(base, edited)) / max(1, len(base))
            for (base, _), (edited, _) in zip(base_argmax, edited_argmax)]


@torch.no_grad()
def greedy(model, tokenizer, prompts: list[str], max_new_tokens: int, batch_size: int = 32) -> list[list[int]]:
    device = next(model.parameters()).device
    out = []
    for i in range(0, len(prompts), batch_size):
        enc = tokenizer(prompts[i:i + batch_size], return_tensors="pt", padding=True).to(device)
        gen = model.generate(**enc, max_new_tokens=max_new_tokens, do_sample=False,
                             pad_token_id=tokenizer.pad_token_id)
        out.extend(gen[:, enc["input_ids"].shape[1]:].cpu().tolist())
    return out


def exact_match(model, tokenizer, pairs: list[tuple[str, str]]) -> list[float]:
    """1.0 where greedy decoding of the target's length reproduces the target."""
    scores = [0.0] * len(pairs)
    by_len: dict[int, list[int]] = {}
    targets = []
    for i, (prompt, answer) in enumerate(pairs):
        p = tokenizer(prompt)["input_ids"]
        t = tokenizer(prompt + " " + answer)["input_ids"][len(p):]
        targets.append(t)
        by_len.setdefault(len(t), []).append(i)
    for n, idx in by_len.items():
        gens = greedy(model, tokenizer, [pairs[i][0] for i in idx], n)
        for i, g in zip(idx, gens):
            scores[i] = float(g[:n] == targets[i])
    return scores


_WORD = re.compile(r"\w+|[^\w\s]")


def ngram_entropy(text: str, ns=(2, 3), weights=(2 / 3, 4 / 3)) -> float:
    """EasyEdit's compute_n_gram_entropy: the mean of weighted n-gram entropies (bits)."""
    tokens = _WORD.findall(text)
    values = []
    for n, w in zip(ns, weights):
        grams = Counter(tuple(tokens[i:i + n]) for i in range(len(tokens) - n + 1))
        total = sum(grams.values())
        ent = -sum(c / total * math.log2(c / total) for c in grams.values()) if total else 0.0
        values.append(w * ent)
    return sum(values) / len(values)


def fluency(model, tokenizer, prompts: list[str], max_new_tokens: int) -> list[float]:
    gens = greedy(model, tokenizer, prompts, max_new_tokens)
    return [ngram_entropy(p + tokenizer.decode(g, skip_special_tokens=True)) for p, g in zip(prompts, gens)]


@torch.no_grad()
def perplexity(model, tokenizer, texts: list[str], batch_size: int = 16) -> float:
    """Token-weighted perplexity of ``texts`` (each scored from its second token on)."""
    device = next(model.parameters()).device
    total, count = 0.0, 0
    for i in range(0, len(texts), batch_size):
        enc = tokenizer(texts[i:i + batch_size], return_tensors="pt", padding=True).to(device)
        logits = model(**enc, use_cache=False).logits[:, :-1].float()
        labels = enc["input_ids"][:, 1:]
        keep = enc["attention_mask"][:, 1:].bool() & enc["attention_mask"][:, :-1].bool()
        nll = torch.nn.functional.cross_entropy(logits[keep], labels[keep], reduction="sum")
        total, count = total + float(nll), count + int(keep.sum())
    return math.exp(total / max(1, count))
