"""The strict (user-facing) metrics: hand-computed cases, and their wiring into evaluate_facts."""
import copy

import pytest
import torch

from editing import metrics
from editing.evaluate import STRICT_METRICS, evaluate_facts
from editing.facts import Fact


def test_aliases_flatten_strings_lists_and_lists_of_lists():
    assert metrics.aliases("Paris") == ["Paris"]
    assert metrics.aliases(["Paris", "Paname"]) == ["Paris", "Paname"]
    assert metrics.aliases([["Paris", ""], ["Paname", None], "  ", ["Paris"]]) == ["Paris", "Paname"]
    assert metrics.aliases(1999) == ["1999"]
    assert metrics.aliases("") == [] and metrics.aliases(None) == [] and metrics.aliases([[], [""]]) == []


@pytest.mark.parametrize("text, answer, expected", [
    (" Paris, of course.", "Paris", True),
    ("PARIS is big", "paris", True),                       # case folded
    ("the Parisian metro", "Paris", False),                # word boundary
    ("Paris's museums", "Paris", True),
    ("the city of New\n  York", "new york", True),         # whitespace folded
    ("it is Lyon", ["Marseille", ["Lyons", "Lyon"]], True),  # any alias, any nesting
    ("it is Lyonnais", ["Marseille", ["Lyons", "Lyon"]], False),
    ("it is Paris", [], False),
    ("", "Paris", False),
    ("born in 1999.", "1999", True),                      # numbers
    ("born in (1999)", 1999, True),
    ("born in 19999", "1999", False),
    ("born in 21999", "1999", False),
    ("the 1999s", "1999", False),
    ("it weighs 3.5 kg", "3", False),                      # a decimal point joins digits
    ("1,999 people", "999", False),                        # and so does a thousands separator
    ("3,000 people", "3", False),
    ("it weighs 3. Then", "3", True),
    ("born in １９９９", "1999", True),                     # NFKC: full-width digits
    ("lives in ZÜRICH now", "Zürich", True),              # non-ASCII
    ("die Straße", "STRASSE", True),                       # casefold: ß = ss
    ("São Paulo", "Sao Paulo", False),                     # accents are significant
    ("the U.S. army", "U.S.", True),                       # punctuation at the alias's edge
    ("首都は東京です", "東京", True),                         # unsegmented script
    ("हिन्दी भाषा", "हिन", False),                            # Devanagari marks are inside words
    ("हिन्दी भाषा", "हिन्दी", True),
])
def test_contains_answer(text, answer, expected):
    assert metrics.contains_answer(text, answer) is expected


def test_words_and_repeated_ngrams():
    assert metrics.words("The cat, 1,000,000 世界 हिन्दी!") == \
        ["the", "cat", "1", "000", "000", "世", "界", "हिन्दी"]
    assert metrics.repeats_ngram("a b c a b c")
    assert metrics.repeats_ngram("Paris Paris Paris Paris")      # overlapping trigrams count
    assert not metrics.repeats_ngram("Paris Paris Paris")        # one trigram only
    assert metrics.repeats_ngram("The cat sat. the CAT sat")     # words: case and punctuation ignored
    assert not metrics.repeats_ngram("1,000,000")                # a token 3-gram "0 0 0" would repeat
    assert not metrics.repeats_ngram("a b a b") and metrics.repeats_ngram("a b a b", n=2)
    assert not metrics.repeats_ngram("")
    assert metrics.repetition(["a b c a b c", "a b c d", "x. y. z. x. y. z."]) == 2 / 3
    assert metrics.repetition([]) == 0.0


def test_generation_locality_compares_the_texts():
    assert metrics.generation_locality([" a b", " c", ""], [" a b", " c d", ""]) == [1.0, 0.0, 1.0]
    with pytest.raises(ValueError):
        metrics.generation_locality(["a"], ["a", "b"])


def test_generation_success_searches_the_continuation_not_the_prompt():
    pairs = [("The capital of France is", "Paris"), ("Paris is in", "France"), ("Q", ["x", "Paris"])]
    texts = [" Paris.", " Europe", " Parisian"]
    assert metrics.generation_success(None, None, pairs, 4, texts=texts) == [1.0, 0.0, 0.0]


def test_chat_prompts_put_the_prompt_in_the_user_turn(tokenizer):
    [text] = metrics.chat_prompts(tokenizer, ["The capital of France is"])
    assert "<|im_start|>user\nThe capital of France is<|im_end|>" in text
    assert text.endswith("<|im_start|>assistant\n")


class _TemplateTokenizer:
    """A chat template that writes a BOS, with a tokenizer that adds one (or not) itself."""
    chat_template, bos_token, bos_token_id = "{{ messages }}", "<s>", 1

    def __init__(self, adds_bos):
        self.adds_bos = adds_bos

    def __call__(self, text):
        return {"input_ids": [1] * self.adds_bos + [ord(c) for c in text]}

    def apply_chat_template(self, messages, tokenize, add_generation_prompt):
        assert not tokenize and add_generation_prompt
        return f"<s>[INST] {messages[0]['content']} [/INST]"


def test_chat_prompts_keep_one_bos_and_need_a_template():
    assert metrics.chat_prompts(_TemplateTokenizer(adds_bos=True), ["hi"]) == ["[INST] hi [/INST]"]
    assert metrics.chat_prompts(_TemplateTokenizer(adds_bos=False), ["hi"]) == ["<s>[INST] hi [/INST]"]
    plain = _TemplateTokenizer(adds_bos=False)
    plain.chat_template = None
    with pytest.raises(metrics.NoChatTemplate, match="no chat template"):
        metrics.chat_prompts(plain, ["hi"])


FACTS = [
    Fact(subject="France", prompt="The capital of France is", target_new="Paris",
         rephrase_prompts=["France's capital city is", "The French capital is"],
         locality=[{"prompt": "The Eiffel Tower stands in", "answer": "Paris"},
                   {"prompt": "Water is made of", "answer": "hydrogen"}]),
    Fact(subject="Spain", prompt="The capital of Spain is", target_new="Paris"),
]
N = 4


def test_continuations_decode_greedy(tiny_model, tokenizer):
    prompts = [FACTS[0].prompt, FACTS[1].prompt]
    expected = [tokenizer.decode(g, skip_special_tokens=True)
                for g in metrics.greedy(tiny_model, tokenizer, prompts, N)]
    assert metrics.continuations(tiny_model, tokenizer, prompts, N) == expected


def test_evaluate_facts_strict_metrics_on_the_unedited_model(tiny_model, tokenizer):
    plain = evaluate_facts(tiny_model, tokenizer, FACTS)
    assert not set(STRICT_METRICS) & (set(plain["means"]) | set(plain["per_fact"][0]))   # off by default
    result = evaluate_facts(tiny_model, tokenizer, FACTS, strict_tokens=N)
    for row in result["per_fact"] + [result["means"]]:
        assert set(STRICT_METRICS) <= set(row)
        assert all(0.0 <= row[k] <= 1.0 for k in STRICT_METRICS if row[k] is not None)
    assert result["per_fact"][0]["gen_locality"] == 1.0      # the unedited model against itself
    assert result["means"]["gen_locality"] == 1.0
    assert result["per_fact"][0]["repeats"] == result["per_fact"][0]["repeats_base"]
    second = result["per_fact"][1]                          # no rephrases, no locality prompts
    assert second["gen_success_rephrase"] is None and second["chat_success_rephrase"] is None
    assert second["gen_locality"] is None
    assert second["chat_success"] is not None


def test_evaluate_facts_strict_metrics_with_an_edit_that_says_paris(tiny_model, tokenizer):
    """An "edit" that makes every next token " Paris": every prompt, plain or chat, now
    answers Paris in a loop, and no locality continuation is left unchanged."""
    [paris] = tokenizer(" Paris")["input_ids"]
    base = metrics.continuations(tiny_model, tokenizer, [x["prompt"] for x in FACTS[0].locality], N)
    assert all(b != " Paris" * N for b in base)

    def attach(model):
        bias = torch.zeros(model.config.vocab_size)
        bias[paris] = 1e4
        return model.lm_head.register_forward_hook(lambda module, args, out: out + bias)

    result = evaluate_facts(tiny_model, tokenizer, FACTS, attach=attach, strict_tokens=N)
    first = result["per_fact"][0]
    assert {k: first[k] for k in STRICT_METRICS if k != "repeats_base"} == {
        "gen_success": 1.0, "gen_success_rephrase": 1.0, "chat_success": 1.0,
        "chat_success_rephrase": 1.0, "gen_locality": 0.0, "repeats": 1.0}
    assert result["means"]["gen_success"] == 1.0 and result["means"]["chat_success"] == 1.0
    # the hook was removed: the model is unedited again
    assert metrics.continuations(tiny_model, tokenizer, [x["prompt"] for x in FACTS[0].locality], N) == base


def test_evaluate_facts_without_a_chat_template_leaves_the_chat_metrics_out(tiny_model, tokenizer):
    plain = copy.copy(tokenizer)
    plain.chat_template = None
    result = evaluate_facts(tiny_model, plain, FACTS[:1], strict_tokens=N)
    assert result["means"]["chat_success"] is None and result["means"]["chat_success_rephrase"] is None
    assert result["means"]["gen_success"] is not None and tokenizer.chat_template


def test_fluency_is_read_off_the_strict_continuations_when_the_lengths_agree(tiny_model, tokenizer):
    """With fluency_tokens == strict_tokens the prompts are not generated twice, and the
    figures are those of a separate fluency generation."""
    apart = evaluate_facts(tiny_model, tokenizer, FACTS, fluency_tokens=N)
    shared = evaluate_facts(tiny_model, tokenizer, FACTS, fluency_tokens=N, strict_tokens=N)
    assert [r["fluency"] for r in shared["per_fact"]] == [r["fluency"] for r in apart["per_fact"]]
    assert shared["means"]["fluency"] == apart["means"]["fluency"] is not None
