"""KnowEdit files read as they are (issue 17): the three formats load through
``editing.facts`` and through the ingest validation, keep their kinds and aliases, leave
unusable evaluation items out with a warning, and are scored per kind."""
from __future__ import annotations

import json
import warnings
from datetime import datetime, timezone
from pathlib import Path

import polars as pl
import pytest

from editing import metrics
from editing.evaluate import evaluate_facts, kind_keys
from editing.facts import (DEFAULT_KIND, NO_ALIAS, Fact, FactError, PairSkipped, detect_format,
                           fact_from_record, load_facts, read_records, records_to_facts)
from tasks.stream import readers, validate
from tasks.stream.prepare import FACT_FIELDS

ROOT = Path(__file__).resolve().parent.parent
SAMPLES = ROOT / "data" / "samples"
ZSRE = SAMPLES / "knowedit-zsre-sample.json"
WIKI_CF = SAMPLES / "knowedit-wiki-counterfact-sample.json"
RECENT = SAMPLES / "knowedit-wiki-recent-sample.json"
NOW = datetime(2025, 6, 1, tzinfo=timezone.utc)
GOOD = {"subject": "Danielle Darrieux", "prompt": "The mother tongue of Danielle Darrieux is",
        "target_new": "English", "target_old": "French"}

# What each sample holds, by hand from the files: (facts, refused no-op records, items left
# out as (record, field)).
EXPECTED = {
    ZSRE: (5, [3], []),
    WIKI_CF: (7, [7], [(5, "locality.Forgetfulness[0].ground_truth"),
                       (6, "locality.Relation_Specificity[0].ground_truth")]),
    RECENT: (8, [], [(3, "locality.Relation_Specificity[6].ground_truth[0][0]"),   # U+200E
                     (4, "locality.Relation_Specificity[3].ground_truth"),         # [[], []]
                     (5, "locality.Relation_Specificity[0].ground_truth"),         # [[]]
                     (5, "locality.Relation_Specificity[1].ground_truth"),
                     (5, "locality.Relation_Specificity[2].ground_truth"),
                     (6, "locality.Relation_Specificity[6].ground_truth[1][1]")]),
}


def load_with_warnings(path):
    """(facts, refused no-ops, items left out, the PairSkipped warnings) via ``load_facts``."""
    skipped: list = []
    collected: list = []
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        facts = load_facts([path], skipped=skipped, skipped_pairs=collected)
    warned = [w.message for w in caught if isinstance(w.message, PairSkipped)]
    return facts, skipped, collected, warned


def ingest(path):
    """(good, bad, items left out) through the ingest reader and the polars validation."""
    goods, bads, left_out = [], [], []
    for chunk in readers.read_file(path):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", PairSkipped)
            g, b = validate.validate_chunk(chunk, file=path.name, sha256="x", archived=str(path),
                                           seq=0, run_id="r", received_at=NOW,
                                           skipped_pairs=left_out)
        goods.append(g)
        bads.append(b)
    return pl.concat(goods), pl.concat(bads), left_out


def pairs_of(row_pairs):
    """Batch pairs as ``Fact`` pairs: the struct's null ``aliases`` is an absent key."""
    return [{k: v for k, v in p.items() if v is not None} for p in row_pairs]


# -- format detection ----------------------------------------------------------------
def test_every_knowedit_record_is_detected_as_knowedit_and_the_others_keep_theirs():
    for path in (ZSRE, WIKI_CF, RECENT):
        assert {detect_format(r) for r in read_records(path)} == {"knowedit"}, path.name
    assert {detect_format(r) for r in read_records(SAMPLES / "counterfact-sample.json")} == {"counterfact"}
    assert {detect_format(r) for r in read_records(SAMPLES / "zsre-sample.json")} == {"zsre"}
    # KnowEdit zsRE has CounterFact's rephrase_prompt; its groups or a list ground_truth decide
    assert detect_format({"rephrase_prompt": "x", "locality": {}}) == "knowedit"
    assert detect_format({"rephrase_prompt": "x", "ground_truth": ["a"]}) == "knowedit"
    assert detect_format({"rephrase_prompt": "x", "ground_truth": "a"}) == "counterfact"
    assert detect_format({**GOOD, "locality": [{"prompt": "p", "answer": "a"}]}) == "ledit"


# -- the three samples through load_facts ----------------------------------------------
@pytest.mark.parametrize("path", [ZSRE, WIKI_CF, RECENT], ids=lambda p: p.name)
def test_samples_load_and_warn_each_item_left_out_by_file_record_and_field(path):
    facts, skipped, collected, warned = load_with_warnings(path)
    n, noops, left_out = EXPECTED[path]
    assert len(facts) == n
    assert [(e.record, e.field) for e in skipped] == [(i, "target_new") for i in noops]
    assert [(w.record, w.field) for w in collected] == left_out
    assert [(w.file, w.record, w.field) for w in warned] == [(str(path), r, f) for r, f in left_out]
    assert all(str(path) in str(w) and f"record {w.record}" in str(w) and w.field in str(w)
               for w in warned)
    for fact in facts:
        for pair in fact.locality + fact.portability:
            assert isinstance(pair["answer"], str) and pair["answer"].strip()
            assert pair["kind"] != DEFAULT_KIND


def test_knowedit_zsre_maps_list_ground_truth_rephrase_and_every_portability_kind():
    facts, *_ = load_with_warnings(ZSRE)
    raw = read_records(ZSRE)
    first = facts[0]
    assert first.target_old == raw[0]["ground_truth"][0]          # the first alias
    assert first.rephrase_prompts == [raw[0]["rephrase_prompt"]]
    assert [p["kind"] for p in first.locality] == ["Relation_Specificity"] * 2
    assert first.locality[0]["aliases"] == [raw[0]["locality"]["Relation_Specificity"][0]["ground_truth"]]
    kinds = {p["kind"] for f in facts for p in f.portability}
    assert kinds == {"Subject_Aliasing", "Reasoning", "Logical_Generalization"}


def test_wiki_facts_keep_forgetfulness_apart_and_alias_lists_as_given():
    facts, *_ = load_with_warnings(WIKI_CF)
    raw = read_records(WIKI_CF)
    third = facts[2]                      # Relation_Specificity and Forgetfulness, in file order
    want = [(k, item["prompt"]) for k, items in raw[2]["locality"].items() for item in items]
    assert [(p["kind"], p["prompt"]) for p in third.locality] == want
    recent, *_ = load_with_warnings(RECENT)
    raw = read_records(RECENT)[2]["locality"]
    given = [(k, item) for k, items in raw.items() for item in items]
    assert [(p["kind"], p["prompt"], p["aliases"], p["answer"]) for p in recent[2].locality] \
        == [(k, x["prompt"], x["ground_truth"], x["ground_truth"][0][0]) for k, x in given]
    assert max(len(x["ground_truth"]) for _, x in given) > 1    # several answers, each aliased
    kinds = {p["kind"] for f in recent for p in f.portability}
    assert kinds == {"Subject_Aliasing", "Reasoning", "Logical_Generalization"}


# -- the answer's shapes and the alias rule ----------------------------------------------
@pytest.mark.parametrize("answer,teacher,alias_lists", [
    ("Paris", "Paris", None),
    (["Paris", "City of Light"], "Paris", [["Paris", "City of Light"]]),
    ([["Paris", "Lutetia"], ["Lyon"]], "Paris", [["Paris", "Lutetia"], ["Lyon"]]),
    ([[], [" ", "Lyon"]], "Lyon", [["Lyon"]]),           # blank aliases and empty lists left out
])
def test_teacher_forcing_takes_the_first_non_empty_alias_and_keeps_them_all(answer, teacher,
                                                                             alias_lists):
    fact = fact_from_record({**GOOD, "portability": [{"prompt": "q", "answer": answer}]})
    pair = fact.portability[0]
    assert pair["answer"] == teacher == metrics.aliases(answer)[0]   # the metrics' own rule
    assert pair.get("aliases") == alias_lists
    assert pair["kind"] == DEFAULT_KIND


@pytest.mark.parametrize("item,field,reason", [
    ({"prompt": "q", "answer": []}, "locality[0].answer", NO_ALIAS),
    ({"prompt": "q", "answer": [[], []]}, "locality[0].answer", NO_ALIAS),
    ({"prompt": "q", "answer": ""}, "locality[0].answer", "empty or whitespace-only string"),
    ({"prompt": "q"}, "locality[0].answer", "missing required field"),
    ({"prompt": "q", "answer": 7}, "locality[0].answer", "expected a string, a list of aliases"),
    ({"prompt": "q", "answer": ["a", ["b"]]}, "locality[0].answer", "strings and lists are mixed"),
    ({"prompt": "q", "answer": ["a", 3]}, "locality[0].answer[1]", "expected a string, got int"),
    ({"prompt": " ", "answer": "a"}, "locality[0].prompt", "empty or whitespace-only string"),
    ({"prompt": "q\u202e", "answer": "a"}, "locality[0].prompt", "contains U+202E"),
    ({"prompt": "q", "answer": ["a\u200b"]}, "locality[0].answer[0]", "contains U+200B"),
    ({"prompt": "q", "answer": "a", "kind": "Relation Specificity"}, "locality[0].kind",
     "kind must match"),
    ("q", "locality[0]", "expected an object"),
])
def test_an_unusable_evaluation_item_is_left_out_on_both_paths(item, field, reason):
    rec = {**GOOD, "locality": [item, {"prompt": "kept", "answer": "a"}]}
    with pytest.warns(PairSkipped) as warned:
        fact = fact_from_record(rec, file="f.jsonl", record=4)
    assert [(w.message.file, w.message.record, w.message.field) for w in warned] == [
        ("f.jsonl", 4, field)]
    assert reason in warned[0].message.reason
    assert [p["prompt"] for p in fact.locality] == ["kept"]
    left_out: list = []
    with pytest.warns(PairSkipped):
        ok, bad = validate.validate_records([rec], file="f.jsonl", skipped_pairs=left_out)
    assert (ok.height, bad.height) == (1, 0)
    assert [(w.file, w.record, w.field, w.reason) for w in left_out] == [
        ("f.jsonl", 1, field, warned[0].message.reason)]               # ingest counts from 1
    assert pairs_of(ok["locality"][0].to_list()) == fact.locality


def test_rephrasings_that_cannot_be_used_are_left_out_too():
    rec = {**GOOD, "rephrase_prompts": ["ok", 7, " ", "bad\u2066"]}
    with pytest.warns(PairSkipped) as warned:
        fact = fact_from_record(rec)
    assert fact.rephrase_prompts == ["ok"]
    assert [w.message.field for w in warned] == [f"rephrase_prompts[{i}]" for i in (1, 2, 3)]
    with pytest.warns(PairSkipped):
        ok, bad = validate.validate_records([rec])
    assert ok["rephrase_prompts"].to_list() == [["ok"]] and bad.height == 0


def test_a_refused_record_warns_nothing_about_its_items():
    rec = {**GOOD, "subject": "Zed", "locality": [{"prompt": "q", "answer": ""}]}
    with warnings.catch_warnings():
        warnings.simplefilter("error", PairSkipped)
        with pytest.raises(FactError):
            fact_from_record(rec)
        ok, bad = validate.validate_records([rec])
    assert (ok.height, bad["field"].to_list()) == (0, ["prompt"])


# -- required fields still refuse --------------------------------------------------------
@pytest.mark.parametrize("change,field,reason", [
    ({"target_new": 5}, "target_new", "expected a string, got int"),
    ({"target_new": []}, "target_new", "empty or whitespace-only string"),   # no alias at all
    ({"subject": None}, "subject", "missing required field"),
    ({"prompt": "   "}, "prompt", "empty or whitespace-only string"),
    ({"subject": "Somebody else"}, "prompt", "the prompt does not mention the subject"),
])
def test_a_bad_required_field_of_a_knowedit_record_still_refuses_it(tmp_path, change, field,
                                                                     reason):
    records = read_records(WIKI_CF)[:3]
    records[1] = {**records[1], **change}
    path = tmp_path / "ke.json"
    path.write_text(json.dumps(records), encoding="utf-8")
    with pytest.raises(FactError) as err:
        load_facts([path])
    assert (err.value.file, err.value.record, err.value.field) == (str(path), 1, field)
    assert reason in err.value.reason
    ok, bad, _ = ingest(path)
    assert ok.height == 2 and bad.select("record", "field").rows() == [(2, field)]
    assert reason in bad["reason"].item()


def test_a_list_target_new_is_trained_on_its_first_alias():
    rec = {**read_records(ZSRE)[0], "target_new": [["", "Noctuidae"], ["Owlet moths"]]}
    fact = next(records_to_facts([rec]))
    assert fact.target_new == "Noctuidae"


# -- the ingest path agrees and batches keep kinds and aliases --------------------------
@pytest.mark.parametrize("path", [ZSRE, WIKI_CF, RECENT], ids=lambda p: p.name)
def test_ingest_validation_accepts_the_same_facts_and_items(path):
    facts, skipped, collected, _ = load_with_warnings(path)
    ok, bad, left_out = ingest(path)
    assert ok.height == len(facts) and bad.height == len(skipped)
    assert set(bad["reason"]) <= {"target_new equals target_old: the update changes nothing"}
    assert ok["source_format"].unique().to_list() == ["knowedit"]
    assert ok["fact_id"].to_list() == [f.fact_id for f in facts]
    assert [(w.record - 1, w.field) for w in left_out] == [(w.record, w.field) for w in collected]
    for row, fact in zip(ok.iter_rows(named=True), facts):
        assert pairs_of(row["locality"]) == fact.locality
        assert pairs_of(row["portability"]) == fact.portability
        # a batch row read back as the pipeline does gives the same fact, kinds and aliases kept
        again = fact_from_record({k: row[k] for k in FACT_FIELDS if row.get(k) not in (None, [])})
        assert again.to_dict() == fact.to_dict()


def test_batches_written_before_kinds_still_read(tmp_path):
    old_pair = pl.Struct({"prompt": pl.String, "answer": pl.String})
    pl.DataFrame({"subject": ["S"], "prompt": ["P of S"], "target_new": ["T"],
                  "locality": [[{"prompt": "q", "answer": "a"}]]},
                 schema={"subject": pl.String, "prompt": pl.String, "target_new": pl.String,
                         "locality": pl.List(old_pair)}).write_parquet(tmp_path / "old.parquet")
    ok, _, _ = ingest(tmp_path / "old.parquet")
    new = ok.select("subject", "prompt", "target_new", "locality")
    both = pl.concat([pl.read_parquet(tmp_path / "old.parquet"), new], how="diagonal_relaxed")
    for row in both.iter_rows(named=True):
        fact = fact_from_record({k: v for k, v in row.items() if v is not None})
        assert fact.locality == [{"prompt": "q", "answer": "a", "kind": DEFAULT_KIND}]
    # and a record of the project's own format hashes as it did before kinds existed
    plain = validate.validate_records([{**GOOD, "locality": [{"prompt": "q", "answer": "a"}]}])[0]
    with_kind = validate.validate_records(
        [{**GOOD, "locality": [{"prompt": "q", "answer": "a", "kind": "Forgetfulness"}]}])[0]
    assert plain["locality"][0].to_list()[0]["kind"] == DEFAULT_KIND
    assert plain["record_hash"].item() != with_kind["record_hash"].item()


def test_the_edit_and_eval_commands_read_the_samples_as_they_are():
    from flows.cli.steps import read_facts

    notes: list[str] = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", PairSkipped)
        facts = read_facts([str(ZSRE), str(WIKI_CF), str(RECENT)], warn=notes.append)
    assert len(facts) == 5 + 7 + 8 and len(notes) == 2     # the two no-op updates, named


# -- per-kind metrics ------------------------------------------------------------------
# Hand-set scores per prompt: teacher-forced accuracy (reliability, generality, portability)
# and locality (argmax unchanged against the base).
ACC = {"pa1": 0.5, "pr1": 1.0, "pr2": 0.0, "pb1": 0.25}
LOC = {"la1": 1.0, "la2": 0.0, "lf1": 1.0, "lb1": 1.0, "lc1": 0.5}


def _fact(subject, locality=(), portability=()):
    return Fact(subject=subject, prompt=f"{subject} is", target_new="x",
                locality=[{"prompt": p, "answer": "a", "kind": k} for p, k in locality],
                portability=[{"prompt": p, "answer": "a", "kind": k} for p, k in portability])


@pytest.fixture()
def scored(monkeypatch):
    """evaluate_facts with the model's scores replaced by ACC and LOC."""
    seen: list = []

    def accuracy(model, tokenizer, pairs):
        seen.extend(pairs)
        return [ACC.get(p, 1.0) for p, _ in pairs]

    monkeypatch.setattr(metrics, "token_accuracy", accuracy)
    monkeypatch.setattr(metrics, "answer_argmax", lambda m, t, pairs: [([p], [a]) for p, a in pairs])
    monkeypatch.setattr(metrics, "locality", lambda base, edited: [LOC[b[0][0]] for b in base])
    monkeypatch.setattr(metrics, "exact_match", lambda m, t, pairs: [1.0] * len(pairs))
    return seen


def test_locality_and_portability_are_scored_per_kind_and_averaged_over_kinds(scored):
    facts = [
        _fact("A", locality=[("la1", "Relation_Specificity"), ("la2", "Relation_Specificity"),
                             ("lf1", "Forgetfulness")],
              portability=[("pa1", "Subject_Aliasing"), ("pr1", "Reasoning"),
                           ("pr2", "Reasoning")]),
        _fact("B", locality=[("lb1", "Relation_Specificity")],
              portability=[("pb1", "Logical_Generalization")]),
        _fact("C", locality=[("lc1", "Neighborhood")]),
        _fact("D"),
    ]
    result = evaluate_facts(None, None, facts)
    a, b, c, d = result["per_fact"]
    # A: RS (1 + 0) / 2 = 0.5, F 1.0 -> locality (0.5 + 1) / 2 = 0.75 (not the pooled 2/3);
    #    SA 0.5, Reasoning (1 + 0) / 2 = 0.5 -> portability 0.5
    assert (a["locality"], a["locality.Relation_Specificity"], a["locality.Forgetfulness"]) == (
        0.75, 0.5, 1.0)
    assert (a["portability"], a["portability.Subject_Aliasing"], a["portability.Reasoning"]) == (
        0.5, 0.5, 0.5)
    assert "portability.Logical_Generalization" not in a
    assert (b["locality"], b["locality.Relation_Specificity"], b["portability"],
            b["portability.Logical_Generalization"]) == (1.0, 1.0, 0.25, 0.25)
    assert (c["locality"], c["locality.Neighborhood"], c["portability"]) == (0.5, 0.5, None)
    assert d["locality"] is None and d["portability"] is None
    m = result["means"]
    assert m["locality"] == pytest.approx((0.75 + 1.0 + 0.5) / 3)
    assert m["locality.Relation_Specificity"] == 0.75            # facts A and B
    assert m["locality.Forgetfulness"] == 1.0 and m["locality.Neighborhood"] == 0.5
    assert m["portability"] == pytest.approx((0.5 + 0.25) / 2)
    assert (m["portability.Subject_Aliasing"], m["portability.Reasoning"],
            m["portability.Logical_Generalization"]) == (0.5, 0.5, 0.25)
    # KnowEdit's kinds in EasyEdit's order, then the others
    assert [k for k in m if "." in k] == [
        "locality.Relation_Specificity", "locality.Forgetfulness",
        "portability.Subject_Aliasing", "portability.Reasoning",
        "portability.Logical_Generalization", "locality.Neighborhood"]
    assert kind_keys(result["per_fact"]) == tuple(k for k in m if "." in k)


def test_one_kind_per_fact_gives_the_plain_mean_over_pairs_as_before(scored):
    facts = [_fact("A", locality=[("la1", "Neighborhood"), ("la2", "Neighborhood"),
                                  ("lf1", "Neighborhood")])]
    row = evaluate_facts(None, None, facts)["per_fact"][0]
    assert row["locality"] == pytest.approx(2 / 3) == row["locality.Neighborhood"]


def test_pairs_without_a_kind_and_list_answers_given_directly_are_scored(scored):
    fact = Fact(subject="A", prompt="A is", target_new="x",
                portability=[{"prompt": "pa1", "answer": [["", "first"], ["second"]]}])
    result = evaluate_facts(None, None, [fact])
    assert ("pa1", "first") in scored                    # teacher forcing: the first alias
    assert result["per_fact"][0][f"portability.{DEFAULT_KIND}"] == 0.5


def test_the_unedited_model_keeps_every_locality_kind(tiny_model, tokenizer):
    """On a real (tiny) model: the base against itself keeps every kind's argmax tokens."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", PairSkipped)
        facts = load_facts([WIKI_CF], skipped=[])[:4]
    means = evaluate_facts(tiny_model, tokenizer, facts)["means"]
    assert means["locality"] == means["locality.Relation_Specificity"] == 1.0
    assert means["locality.Forgetfulness"] == 1.0
    assert 0.0 <= means["portability.Subject_Aliasing"] <= 1.0


# -- the benchmark -----------------------------------------------------------------------
def test_bench_reads_the_knowedit_datasets_and_tables_their_kinds(tmp_path, capsys):
    from bench import edit_quality
    from tasks.settings import load_settings

    facts = edit_quality.load_dataset("knowedit-recent", tmp_path)      # falls back to the sample
    assert len(facts) == 8
    out = capsys.readouterr().out
    assert "6 evaluation items left out" in out
    assert "4 x no alias: the answer is empty" in out
    for name in ("knowedit-counterfact", "knowedit-zsre"):
        assert edit_quality.load_dataset(name, tmp_path)
    cf = {"dataset": "counterfact", "method": "baft", "batch": 4, "reliability": 1.0,
          "generality": 1.0, "locality": 1.0, "exact_match": 1.0, "fluency": None,
          "locality.Neighborhood": 1.0, "s_per_edit": 1.0, "bytes_per_edit": 10.0}
    ke = {**cf, "dataset": "knowedit-counterfact", "locality": 0.5, "portability": 0.25,
          "locality.Relation_Specificity": 0.4, "locality.Forgetfulness": 0.6,
          "portability.Subject_Aliasing": 0.25}
    ke.pop("locality.Neighborhood")
    assert edit_quality.row_means([ke, {**ke, "portability.Subject_Aliasing": 0.75}])[
        "portability.Subject_Aliasing"] == 0.5
    args = type("Args", (), {"offset": 0, "overrides": [], "note": []})()
    table = edit_quality.render([cf, ke], args, load_settings()).splitlines()
    header = next(line for line in table if line.startswith("| dataset"))
    assert ("| fluency | portability | locality.Relation_Specificity | locality.Forgetfulness "
            "| portability.Subject_Aliasing | mean of rel/gen/loc |") in header
    assert "Neighborhood" not in header                  # the same as locality there
    cf_line = next(line for line in table if line.startswith("| counterfact"))
    ke_line = next(line for line in table if line.startswith("| knowedit-counterfact"))
    assert "| - | - | - | - | - |" in cf_line
    assert "| 0.250 | 0.400 | 0.600 | 0.250 |" in ke_line
    assert len(cf_line.split("|")) == len(header.split("|")) == len(ke_line.split("|"))
