"""The metrics on hand-computed cases."""
import math

import torch
from torch import nn

from editing import metrics


class CharTokenizer:
    """One token per character (its code point); left padding with id 0."""
    pad_token_id = 0

    def __call__(self, text):
        return {"input_ids": [ord(c) for c in text]}


class NextCodeModel(nn.Module):
    """Predicts, at every position, the code point after the current one."""
    def __init__(self, vocab=256):
        super().__init__()
        self.vocab = vocab
        self.anchor = nn.Parameter(torch.zeros(1))

    def forward(self, input_ids, attention_mask=None, use_cache=False):
        logits = torch.nn.functional.one_hot((input_ids + 1) % self.vocab, self.vocab).float()
        return type("Out", (), {"logits": logits})


def test_token_accuracy_is_teacher_forced_argmax_with_left_padding():
    model, tok = NextCodeModel(), CharTokenizer()
    # "ab" + " " + "!": answer tokens [' ', '!'] = [32, 33]; the model predicts
    # 'c' after 'b' (wrong) and '!' after ' ' (right): 0.5.
    # "xyz" + " " + "!#": answers [32, 33, 35]; predictions '{', '!', '"': 1/3.
    # The two rows have different lengths, so one is left-padded.
    assert metrics.token_accuracy(model, tok, [("ab", "!"), ("xyz", "!#")]) == [0.5, 1 / 3]


def test_locality_counts_unchanged_argmax_tokens():
    base = [([1, 2, 3], [1, 2, 3]), ([5], [5])]
    edited = [([1, 9, 3], [1, 2, 3]), ([5], [5])]
    assert metrics.locality(base, edited) == [2 / 3, 1.0]


def test_ngram_entropy_matches_the_easyedit_formula():
    # tokens a b a b: bigrams ab, ba, ab -> H2 = H(2/3, 1/3); trigrams aba, bab -> H3 = 1 bit
    h2 = -(2 / 3 * math.log2(2 / 3) + 1 / 3 * math.log2(1 / 3))
    expected = (2 / 3 * h2 + 4 / 3 * 1.0) / 2
    assert math.isclose(metrics.ngram_entropy("a b a b"), expected, rel_tol=1e-12)
    assert metrics.ngram_entropy("same same same same") == 0.0
    assert metrics.ngram_entropy("") == 0.0


def test_exact_match_needs_every_greedy_token(tiny_model, tokenizer):
    prompt = "The capital of France is"
    enc = tokenizer([prompt], return_tensors="pt")
    n = len(enc.input_ids[0])
    greedy = tiny_model.generate(**enc, max_new_tokens=4, do_sample=False, pad_token_id=tokenizer.pad_token_id)
    # The target is built from the model's own greedy tokens (ids, so no text round trip).
    target_ids = greedy[0, n:].tolist()
    answer = tokenizer.decode(target_ids)
    ids = tokenizer(prompt + " " + answer.lstrip())["input_ids"][n:]
    expected = float(ids == greedy[0, n:n + len(ids)].tolist())
    assert metrics.exact_match(tiny_model, tokenizer, [(prompt, answer.lstrip())]) == [expected]
    # one wrong token is enough to fail
    wrong = tokenizer.decode([(target_ids[0] + 1) % len(tokenizer)] + target_ids[1:])
    assert metrics.exact_match(tiny_model, tokenizer, [(prompt, "zebra crossing"), (prompt, wrong.lstrip())]) \
        == [0.0, 0.0]
