"""What a block of edits learns on: the training sequences of ``editing.trainer``.

For each fact: positives (its prompt, alone and behind short prefixes the base model wrote
itself, followed by ``target_new``; with ``chat_positives`` also as a chat user message; with
``relation_positives`` also its own relation in training templates' wordings),
hard negatives (its prompt with other subjects; the facts of earlier blocks), easy negatives
(generic text), and for the question gate the subject asked about other relations
(data/probes/training-templates.yaml, never the gate's probes nor a benchmark's prompts).
``encode`` turns them into one padded batch with the positions the losses read.
"""
from __future__ import annotations

import functools
import random
import re
from dataclasses import dataclass
from pathlib import Path

import torch
import yaml

from .facts import Fact, normalise

# Used as swapped-in subjects when a batch has too few subjects of its own.
FALLBACK_SUBJECTS = (
    "Albert Einstein", "Toyota", "the Amazon River", "Marie Curie", "Nintendo",
    "Buenos Aires", "Pablo Picasso", "the BBC", "Mount Kilimanjaro", "Beyoncé",
    "Microsoft Windows", "the Roman Empire", "Serena Williams", "Lake Baikal",
    "Johann Sebastian Bach", "IKEA", "Vladimir Nabokov", "the Golden Gate Bridge",
)


GENERIC_TEXT = (
    "The weather today is mild with a light breeze from the west.",
    "She opened the window and listened to the rain for a while.",
    "Add two cups of flour and stir until the batter is smooth.",
    "The meeting was moved to Thursday afternoon at three o'clock.",
    "Many people enjoy reading a good book before going to sleep.",
    "The train to the coast leaves every hour from platform four.",
    "He wrote a short letter to thank his neighbours for their help.",
    "Prices of fresh vegetables rose slightly during the winter months.",
)


PREFIX_STARTERS = ("The", "Therefore", "Because", "I", "You", "It", "In", "When", "This", "A")


# Model-written easy negatives start like prose and like questions, the two kinds of
# unrelated input an edit must leave alone.
TEXT_STARTERS = PREFIX_STARTERS + ("Who", "What", "Where", "Which", "How many", "Why", "Is", "Name")


@dataclass
class Encoded:
    """A padded batch of token sequences with the positions the losses read."""
    ids: torch.Tensor          # (n, T) right-padded
    lengths: torch.Tensor      # (n,)
    fact: torch.Tensor         # (n,) index of the fact, -1 for generic text
    target_mask: torch.Tensor  # (n, T) positions whose *next* token is a target token
    subject_pos: torch.Tensor  # (n,) position of the subject's last token, -1 if none
    keep_mask: torch.Tensor    # (n, T) positions whose next token continues after the target


def subject_last_token(tokenizer, text: str, subject: str) -> int:
    start = text.rfind(subject)
    if start < 0:
        lowered = text.lower().rfind(subject.lower())
        start = lowered
    if start < 0:
        return -1
    end = start + len(subject)
    enc = tokenizer(text, return_offsets_mapping=True, add_special_tokens=True)
    last = -1
    for i, (a, b) in enumerate(enc["offset_mapping"]):
        if a < end and b > start and b > a:
            last = i
    return last


def encode(tokenizer, items: list[tuple]) -> Encoded:
    """items: (prompt, target or None, subject or None, fact index[, continuation])."""
    rows, masks, keeps, subj = [], [], [], []
    for prompt, target, subject, _, *rest in items:
        p_ids = tokenizer(prompt)["input_ids"]
        t_ids = tokenizer(prompt + " " + target)["input_ids"] if target else p_ids
        ids = tokenizer(prompt + " " + target + rest[0])["input_ids"] if target and rest and rest[0] else t_ids
        mask, keep = [0] * len(ids), [0] * len(ids)
        for t in range(len(p_ids), len(t_ids)):
            mask[t - 1] = 1
        for t in range(len(t_ids), len(ids)):
            keep[t - 1] = 1
        rows.append(ids)
        masks.append(mask)
        keeps.append(keep)
        subj.append(subject_last_token(tokenizer, prompt, subject) if subject else -1)
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), tokenizer.pad_token_id, dtype=torch.long)
    tmask = torch.zeros((len(rows), width), dtype=torch.bool)
    kmask = torch.zeros((len(rows), width), dtype=torch.bool)
    for i, (r, m, k) in enumerate(zip(rows, masks, keeps)):
        ids[i, : len(r)] = torch.tensor(r)
        tmask[i, : len(m)] = torch.tensor(m, dtype=torch.bool)
        kmask[i, : len(k)] = torch.tensor(k, dtype=torch.bool)
    return Encoded(ids, torch.tensor([len(r) for r in rows]),
                   torch.tensor([it[3] for it in items]), tmask, torch.tensor(subj), kmask)


@torch.no_grad()
def model_prefixes(model, tokenizer, n: int, length: int, seed: int,
                   starters: tuple[str, ...] = PREFIX_STARTERS) -> list[str]:
    """Short random contexts written by the base model (as ROME and WISE do).

    Each starts a new line so an instruct model writes plain prose, and stops at
    the first line break."""
    if n <= 0:
        return []
    device = next(model.parameters()).device
    starters = [starters[i % len(starters)] for i in range(n)]
    enc = tokenizer(["\n" + s for s in starters], return_tensors="pt", padding=True).to(device)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        out = model.generate(**enc, max_new_tokens=length, do_sample=True, top_k=40, temperature=0.8,
                             pad_token_id=tokenizer.pad_token_id)
    texts = tokenizer.batch_decode(out[:, enc["input_ids"].shape[1]:], skip_special_tokens=True)
    prefixes = []
    for starter, text in zip(starters, texts):
        words = " ".join((starter + text.split("\n")[0]).split())
        prefixes.append(words.rstrip(" .,;:") + ".")
    return prefixes


def positive_items(facts: list[Fact], prefixes: list[str], continuations: list[str] | None = None) -> list[tuple]:
    items = []
    for i, f in enumerate(facts):
        for ctx in [""] + prefixes:
            items.append(((ctx + " " + f.prompt).strip(), f.target_new, f.subject, i,
                          continuations[i] if continuations else ""))
    return items


@torch.no_grad()
def base_continuations(model, tokenizer, facts: list[Fact], n_tokens: int) -> list[str]:
    """What the model says after each new answer, so the edit can learn to stop there."""
    if n_tokens <= 0:
        return ["" for _ in facts]
    from .metrics import greedy

    texts = [f.prompt + " " + f.target_new for f in facts]
    return [tokenizer.decode(g, skip_special_tokens=True) for g in greedy(model, tokenizer, texts, n_tokens)]


def negative_items(facts: list[Fact], swaps: int, rng: random.Random,
                    earlier: list[Fact] = (), texts: list[str] = ()) -> list[tuple]:
    """Hard negatives (each fact's prompt with other subjects), facts edited in
    earlier blocks (the new bases must leave them to their own), and generic text
    (fixed sentences and ``texts`` the model wrote)."""
    items = []
    subjects = list(dict.fromkeys(f.subject for f in facts))
    for i, f in enumerate(facts):
        others = [s for s in subjects if normalise(s) != normalise(f.subject)]
        pool = others + [s for s in FALLBACK_SUBJECTS if normalise(s) != normalise(f.subject)]
        chosen = rng.sample(others, min(swaps, len(others)))
        chosen += rng.sample(pool[len(others):], swaps - len(chosen))
        for other in chosen:
            if f.subject in f.prompt:
                items.append((f.prompt.replace(f.subject, other), None, other, i))
    ours = {normalise(f.subject) for f in facts}
    for f in earlier:
        if normalise(f.subject) not in ours:
            items.append((f.prompt, None, f.subject, -1))
    for text in (*GENERIC_TEXT, *texts):
        items.append((text, None, None, -1))
    return items


TRAINING_TEMPLATES = Path(__file__).resolve().parent.parent / "data" / "probes" / "training-templates.yaml"


@functools.lru_cache(maxsize=4)
def load_training_templates(path: str | Path = TRAINING_TEMPLATES) -> tuple[tuple[str, tuple, tuple], ...]:
    """(relation, keywords, templates) of the relation-swap negatives (never the gate's probes)."""
    with open(path, encoding="utf-8") as f:
        relations = (yaml.safe_load(f) or {}).get("relations") or {}
    return tuple((name, tuple(r.get("keywords") or ()), tuple(r["templates"])) for name, r in relations.items())


def asks(fact: Fact, keywords: tuple) -> bool:
    """Whether the fact's relation (its ``relation`` field or its prompt less the subject) names a keyword."""
    return bool(named_keywords(fact, keywords))


def named_keywords(fact: Fact, keywords: tuple) -> list[str]:
    """The keywords the fact's relation (its ``relation`` field or its prompt less the subject) names."""
    text = normalise(f"{fact.relation or ''} {fact.prompt.replace(fact.subject, ' ')}")
    return [k for k in keywords if re.search(rf"(?<!\w){re.escape(normalise(k))}(?!\w)", text)]


def own_relation(fact: Fact, templates) -> tuple | None:
    """The template relation the fact asks, or None. Keywords overlap across relations ("born",
    "position", "created"), so the one naming the longest keyword wins (the most specific:
    "country of citizenship" is citizenship, not country); on a tie the first in the file."""
    best, best_len = None, 0
    for relation in templates:
        longest = max((len(k) for k in named_keywords(fact, relation[1])), default=0)
        if longest > best_len:
            best, best_len = relation, longest
    return best


def relation_positive_items(facts: list[Fact], n: int, templates,
                            continuations: list[str] | None = None) -> list[tuple]:
    """Up to ``n`` more wordings of each fact's own relation (``own_relation``'s first templates,
    filled with its subject), answered by its target, so the question gate learns the relation
    rather than the prompt's wording. Templates only: never a benchmark's evaluation prompts.
    A fact whose relation no template relation asks gets none; a template that is the prompt
    itself is left out (it is already a positive)."""
    items = []
    for i, f in enumerate(facts):
        relation = own_relation(f, templates) if n > 0 else None
        texts = [t.format(subject=f.subject) for t in relation[2]] if relation else []
        texts = [t for t in texts if normalise(t) != normalise(f.prompt)][:n]
        items += [(t, f.target_new, f.subject, i, continuations[i] if continuations else "") for t in texts]
    return items


def relation_swap_items(facts: list[Fact], swaps: int, rng: random.Random, templates) -> tuple[list, list]:
    """Each fact's subject asked about ``swaps`` other relations (templates), and per item the
    facts whose question gates must stay shut on it: every fact of that subject whose own
    relation the template does not ask."""
    items, closes = [], []
    subject = [normalise(f.subject) for f in facts]
    for i, f in enumerate(facts):
        other = [t for t in templates if not asks(f, t[1])]
        for _, keywords, texts in rng.sample(other, min(swaps, len(other))):
            items.append((rng.choice(texts).format(subject=f.subject), None, f.subject, i))
            closes.append([j for j, g in enumerate(facts) if subject[j] == subject[i] and not asks(g, keywords)])
    return items, closes


def chat_items(tokenizer, facts: list[Fact]) -> list[tuple]:
    """Each prompt asked as a chat user message, answered by the target (what chat users see)."""
    from .metrics import chat_prompts, has_chat_template

    if not has_chat_template(tokenizer):
        return []
    return [(c, f.target_new, f.subject, i, "") for i, (f, c) in
            enumerate(zip(facts, chat_prompts(tokenizer, [f.prompt for f in facts])))]
