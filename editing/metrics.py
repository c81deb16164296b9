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

Strict (user-facing) metrics judge what a user reads, the decoded greedy continuation
of at most N new tokens (``continuations``), not teacher-forced argmax tokens:

- generation success: the continuation of the prompt, or of a rephrase, contains the
  new target (``contains_answer``: any alias, normalised, on word boundaries);
- chat success: the same with the prompt asked as a user message through the chat
  template (``chat_prompts``);
- generation locality: the continuation of a locality prompt is the same text as the
  unedited model's;
- repetition: the share of continuations with a repeated word 3-gram
  (``repeats_ngram``), reported beside the unedited model's share on the same prompts.

Every function takes the model as it should be measured: attach an adapter set
before calling, or don't for the base.
"""
from __future__ import annotations

import math
import re
import unicodedata
from collections import Counter

import torch

from .facts import aliases, normalise  # noqa: F401 (aliases: part of this module's API)


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


# --- Strict (user-facing) metrics ------------------------------------------------------

# Scripts written without spaces between words (Thai, Lao, Myanmar, Khmer, Japanese kana,
# CJK ideographs) and Hangul, whose particles attach to the noun ("서울에"): there a word
# boundary cannot be seen in the text, so each such character counts as a word by itself.
_UNSEGMENTED = re.compile("[\u0e00-\u0eff\u1000-\u109f\u1780-\u17ff\u3040-\u30ff\u31f0-\u31ff"
                          "\u3400-\u4dbf\u4e00-\u9fff\uac00-\ud7af\uf900-\ufaff\U00020000-\U0003134f]")


def _in_word(c: str) -> bool:
    """A letter, mark or digit of a script that separates words (marks count: Devanagari
    vowel signs and viramas are marks, and Python's ``\\w`` would split words at them)."""
    return unicodedata.category(c)[0] in "LMN" and not _UNSEGMENTED.match(c)


def _joined(text: str, i: int) -> bool:
    """Whether the gap before ``text[i]`` lies inside a word: between two word characters,
    or at a decimal or thousands separator between digits (so "3" is not in "3.5" and
    "999" is not in "1,999")."""
    if i <= 0 or i >= len(text):
        return False
    a, b = text[i - 1], text[i]
    if _in_word(a) and _in_word(b):
        return True
    digit = str.isdecimal
    return ((digit(a) and b in ".," and i + 1 < len(text) and digit(text[i + 1]))
            or (a in ".," and digit(b) and i >= 2 and digit(text[i - 2])))


def words(text: str) -> list[str]:
    """The words of ``normalise(text)``: runs of letters, marks and digits; each character
    of an unsegmented script (``_UNSEGMENTED``) is a word of its own; the rest separates."""
    out, current = [], []
    for c in normalise(text) + " ":
        if _in_word(c):
            current.append(c)
            continue
        if current:
            out.append("".join(current))
            current = []
        if _UNSEGMENTED.match(c):
            out.append(c)
    return out


def contains_answer(text: str, answer) -> bool:
    """Whether ``text`` contains any alias of ``answer`` as whole words.

    Both sides are ``normalise``d (NFKC, whitespace folded, case folded). An occurrence
    counts unless it is glued to the text around it (``_joined``): "Paris" is not in
    "Parisian", "1999" is not in "19999" nor "3" in "3.5", but "Paris" is in "Paris." and
    in "Paris's". Punctuation at an alias's own edge is matched as written ("U.S." is in
    "the U.S. army"). In unsegmented scripts (CJK, Thai, Hangul) every character is a word
    boundary, so "東京" is in "首都は東京です"."""
    haystack = normalise(text)
    for alias in aliases(answer):
        needle = normalise(alias)
        start = haystack.find(needle)
        while start >= 0:
            end = start + len(needle)
            if not _joined(haystack, start) and not _joined(haystack, end):
                return True
            start = haystack.find(needle, start + 1)
    return False


def continuations(model, tokenizer, prompts: list[str], max_new_tokens: int) -> list[str]:
    """The greedy continuation of each prompt, at most ``max_new_tokens`` new tokens, decoded
    without special tokens as the server returns it: generation stops at EOS, so the text
    ends at the first EOS."""
    return [tokenizer.decode(g, skip_special_tokens=True)
            for g in greedy(model, tokenizer, prompts, max_new_tokens)]


class NoChatTemplate(ValueError):
    """The tokenizer has no chat template, so chat success cannot be measured."""


def has_chat_template(tokenizer) -> bool:
    return bool(getattr(tokenizer, "chat_template", None))


def chat_prompts(tokenizer, prompts: list[str]) -> list[str]:
    """Each prompt as one user message through the tokenizer's chat template, with the
    assistant turn opened (``add_generation_prompt=True``) and the template's default system
    prompt, if any, left in: what a chat user of the served model sends.

    The strings are tokenised like any prompt (``greedy``), so where the tokenizer adds a
    BOS itself and the template writes one too, the template's is dropped: the ids then
    equal ``apply_chat_template(..., tokenize=True)``'s."""
    if not has_chat_template(tokenizer):
        name = getattr(tokenizer, "name_or_path", "") or type(tokenizer).__name__
        raise NoChatTemplate(f"tokenizer {name!r} has no chat template: chat success needs one "
                             "(a chat or instruct model, or set tokenizer.chat_template)")
    bos = getattr(tokenizer, "bos_token", None)
    adds_bos = bos is not None and tokenizer("")["input_ids"][:1] == [tokenizer.bos_token_id]
    out = []
    for prompt in prompts:
        text = tokenizer.apply_chat_template([{"role": "user", "content": prompt}],
                                             tokenize=False, add_generation_prompt=True)
        out.append(text[len(bos):] if adds_bos and text.startswith(bos) else text)
    return out


def generation_success(model, tokenizer, pairs: list[tuple[str, object]], max_new_tokens: int, *,
                       texts: list[str] | None = None) -> list[float]:
    """Generation success of each (prompt, answer): 1.0 where the prompt's greedy continuation
    (``continuations``; the prompt itself is not searched) contains the answer
    (``contains_answer``). ``texts``: those continuations, when already generated."""
    if texts is None:
        texts = continuations(model, tokenizer, [p for p, _ in pairs], max_new_tokens)
    return [float(contains_answer(t, a)) for t, (_, a) in zip(texts, pairs, strict=True)]


def chat_success(model, tokenizer, pairs: list[tuple[str, object]], max_new_tokens: int) -> list[float]:
    """Generation success with each prompt asked through the chat template (``chat_prompts``)."""
    asked = chat_prompts(tokenizer, [p for p, _ in pairs])
    return generation_success(model, tokenizer, [(c, a) for c, (_, a) in zip(asked, pairs)], max_new_tokens)


def generation_locality(base_continuations: list[str], edited_continuations: list[str]) -> list[float]:
    """Generation locality of each locality prompt: 1.0 where the edited model's continuation
    (``continuations``, same N) is exactly the unedited model's text. Decoded text, so the
    comparison ends at each side's first EOS and what a user reads is what is compared."""
    return [float(b == e) for b, e in zip(base_continuations, edited_continuations, strict=True)]


def repeats_ngram(text: str, n: int = 3) -> bool:
    """Whether some n-gram of ``words(text)`` occurs twice (overlaps count: "a a a a").

    Words rather than model tokens: the figure reads as the user sees the text and does
    not depend on the tokenizer, and token n-grams repeat in ordinary text (SmolLM2 splits
    numbers into digits, so "1,000,000" repeats the token 3-gram "0 0 0")."""
    w = words(text)
    grams = [tuple(w[i:i + n]) for i in range(len(w) - n + 1)]
    return len(set(grams)) < len(grams)


def repetition(texts: list[str], n: int = 3) -> float:
    """The share of ``texts`` with a repeated word n-gram (``repeats_ngram``); 0.0 for none."""
    return sum(repeats_ngram(t, n) for t in texts) / max(1, len(texts))
