"""Rules against hostile fact records (the fact_id charset, the subject in its prompt, control
and bidirectional characters), each on both paths: ``editing.facts.fact_from_record`` and the
vectorised ``tasks.stream.validate``, which must give the same field and the same reason."""
from __future__ import annotations

import json
import random
import re
import sys
import warnings
from pathlib import Path

import polars as pl
import pytest

from editing.facts import (CONTROL_CHARS, CONTROL_KIND, FACT_ID_PATTERN, NOOP, SUBJECT_KIND,
                           FactError, PairSkipped, fact_from_record, fact_key, records_to_facts)
from tasks.stream import columns, validate

ROOT = Path(__file__).resolve().parent.parent
BENCHMARKS = ROOT.parent / "shared" / "benchmarks"
GOOD = {"subject": "Danielle Darrieux", "prompt": "The mother tongue of Danielle Darrieux is",
        "target_new": "English", "target_old": "French", "relation": "mother tongue"}
FACT_ID_REASON = ("fact_id must match [A-Za-z0-9][A-Za-z0-9._-]{0,127} "
                  "(letters, digits, '.', '_', '-'; at most 128)")


def refused(rec) -> tuple[str | None, str]:
    """(field, reason) of a record both paths refuse, checked to be the same on both."""
    with pytest.raises(FactError) as err:
        fact_from_record(rec)
    ok, bad = validate.validate_records([rec])
    assert (ok.height, bad.height) == (0, 1)
    row = bad.row(0, named=True)
    assert (row["field"], row["reason"]) == (err.value.field, err.value.reason)
    return err.value.field, err.value.reason


def accepted(rec) -> dict:
    """The accepted row of a record both paths accept, with the same fact_id."""
    fact = fact_from_record(rec)
    ok, bad = validate.validate_records([rec])
    assert bad.height == 0, bad.to_dicts()
    row = ok.row(0, named=True)
    assert row["fact_id"] == fact.fact_id
    return row


def chars_reason(code: int, name: str, position: int) -> str:
    return (f"contains U+{code:04X} ({name}) at character {position}: "
            "control and bidirectional characters are refused")


# -- fact_id ------------------------------------------------------------------------
@pytest.mark.parametrize("fact_id", [
    "../../../../etc/passwd", "$(touch pwned); `id`",       # the tester's inputs
    "a/b", "a b", ".hidden", "-flag", "_x", "id\n", "x:y", "ｆ-1", "é", "a" * 129])
def test_fact_id_outside_the_charset_is_refused(fact_id):
    assert refused({**GOOD, "fact_id": fact_id}) == ("fact_id", FACT_ID_REASON)
    # a retract naming its fact only by id is held to the same charset
    assert refused({"op": "retract", "fact_id": fact_id}) == ("fact_id", FACT_ID_REASON)


@pytest.mark.parametrize("fact_id", ["f-0123456789abcdef", "cf-123", "A.b_c-9", "7", "a" * 128,
                                     fact_key("Zürich", "ＴＯＫＹＯ")])
def test_fact_ids_in_the_charset_are_valid_mlflow_tag_keys(fact_id):
    from mlflow.utils.validation import _validate_tag_name

    assert accepted({**GOOD, "fact_id": fact_id})["fact_id"] == fact_id
    _validate_tag_name(f"fact.{fact_id}")          # raises on a key MLflow would refuse
    assert re.fullmatch(FACT_ID_PATTERN, fact_id)


def test_mlflow_refuses_the_tag_keys_the_charset_keeps_out():
    """The charset is there for a reason: MLflow itself refuses such keys."""
    from mlflow.exceptions import MlflowException
    from mlflow.utils.validation import _validate_tag_name

    for fact_id in ("../../../../etc/passwd", "$(touch pwned); `id`"):
        with pytest.raises(MlflowException):
            _validate_tag_name(f"fact.{fact_id}")


# -- the subject in its prompt ---------------------------------------------------------
def test_prompt_that_does_not_mention_its_subject_is_refused():
    rec = {**GOOD, "subject": "Zed", "prompt": "The capital of France is"}
    assert refused(rec) == ("prompt", "the prompt does not mention the subject 'Zed'")
    # a retract that gives both is held to it too
    rec = {"op": "retract", "subject": "Zed", "prompt": "The capital of France is"}
    assert refused(rec) == ("prompt", "the prompt does not mention the subject 'Zed'")
    # the reason quotes the subject with repr: quotes and backslashes escaped
    assert refused({**GOOD, "subject": "it's \\ here"})[1] == \
        "the prompt does not mention the subject \"it's \\\\ here\""


@pytest.mark.parametrize("subject,prompt", [
    ("Zürich", "Zürich lies in the canton of"),
    ("ＴＯＫＹＯ", "tokyo is the capital of"),                 # full-width, NFKC
    ("tokyo", "ＴＯＫＹＯ is the capital of"),
    ("Straße", "The STRASSE is in"),                          # casefold
    ("New  York", "The mayor of new york is"),                # whitespace folded
    ("Danielle Darrieux", "Danielle\tDarrieux's mother tongue is"),   # TAB in a prompt
    ("Zhou", "Zhou"),
])
def test_subject_found_after_normalisation_is_accepted(subject, prompt):
    accepted({**GOOD, "subject": subject, "prompt": prompt})


def test_retract_by_id_or_without_both_is_not_held_to_the_subject_rule():
    accepted({"op": "retract", "fact_id": "f-0123456789abcdef"})
    accepted({"op": "retract", "fact_id": "cf-1", "subject": "Zed"})
    accepted({"op": "retract", "fact_id": "cf-1", "prompt": "The capital of France is"})


# -- control and bidirectional characters ---------------------------------------------
@pytest.mark.parametrize("text,code,name,position", [
    ("Eng\u202elish", 0x202E, "RIGHT-TO-LEFT OVERRIDE", 4),   # the tester's inputs
    ("Eng\u200blish", 0x200B, "ZERO WIDTH SPACE", 4),
    ("\x07English", 0x07, "<control>", 1),
    ("English\x7f", 0x7F, "<control>", 8),
    ("Eng\x85lish", 0x85, "<control>", 4),
    ("a\u2066b\u2069", 0x2066, "LEFT-TO-RIGHT ISOLATE", 2),
    ("x\u061c", 0x061C, "ARABIC LETTER MARK", 2),
    ("\ufeffEnglish", 0xFEFF, "ZERO WIDTH NO-BREAK SPACE", 1),
    ("one\u2028two", 0x2028, "LINE SEPARATOR", 4),
    ("a\x0bb", 0x0B, "<control>", 2),
])
def test_control_characters_in_target_new_are_refused(text, code, name, position):
    want = ("target_new", chars_reason(code, name, position))
    assert refused({**GOOD, "target_new": text}) == want


@pytest.mark.parametrize("field,rec", [
    ("subject", {**GOOD, "subject": "Dani\u200felle"}),
    ("prompt", {**GOOD, "prompt": "The mother tongue of Danielle Darrieux\x1b[2J is"}),
    ("relation", {**GOOD, "relation": "mother\u202dtongue"}),
    ("target_old", {**GOOD, "target_old": "Fr\u2060ench"}),
    ("source", {**GOOD, "source": "feed\x00"}),
    ("observed_at", {**GOOD, "observed_at": "2024-01-01\u200e"}),
    ("fact_id", {**GOOD, "fact_id": "f-1\u202e"}),            # before the charset check
    # in rephrasings and locality / portability items they leave the item out instead
    # (tests/test_knowedit.py)
])
def test_control_characters_are_refused_in_every_text_field(field, rec):
    got_field, reason = refused(rec)
    assert got_field == field
    assert reason.startswith("contains U+") and reason.endswith(
        "control and bidirectional characters are refused")


def test_joiners_tabs_and_newlines_are_kept():
    row = accepted({**GOOD, "target_new": "\U0001f469\u200d\U0001f4bb",      # emoji ZWJ sequence
                    "target_old": "\u0645\u06cc\u200c\u062e\u0648\u0627\u0647\u0645",   # ZWNJ
                    "prompt": "The mother tongue of\tDanielle Darrieux is\r\n",
                    "rephrase_prompts": ["Danielle Darrieux\nspoke"],
                    "locality": [{"prompt": "\u0915\u094d\u200d\u0937", "answer": "\u00e9"}]})
    assert row["target_new"] == "\U0001f469\u200d\U0001f4bb"


def test_the_character_class_is_the_specified_set_in_python_and_polars():
    spec = (set(range(0x00, 0x20)) - {0x09, 0x0A, 0x0D}) | set(range(0x7F, 0xA0)) \
        | set(range(0x202A, 0x202F)) | set(range(0x2066, 0x206A)) \
        | {0x200E, 0x200F, 0x061C, 0x200B, 0x2060, 0xFEFF, 0x2028, 0x2029}
    points = [i for i in range(0x110000) if not 0xD800 <= i < 0xE000]
    chars = [chr(i) for i in points]
    rx = re.compile(CONTROL_CHARS)
    in_python = {i for i, c in zip(points, chars) if rx.search(c)}
    in_polars = set(pl.Series(points).filter(pl.Series(chars).str.contains(CONTROL_CHARS)))
    assert in_python == in_polars == spec
    assert 0x200C not in spec and 0x200D not in spec


# -- order and agreement -----------------------------------------------------------
@pytest.mark.parametrize("rec,want", [
    # required strings first, then fact_id's own checks, then its charset
    ({**GOOD, "target_new": "x\u202e", "fact_id": "../x"}, "target_new"),
    ({**GOOD, "fact_id": "../x", "relation": "r\x07"}, "fact_id"),
    ({**GOOD, "fact_id": "../x", "subject": "Zed"}, "fact_id"),
    # length before characters
    ({**GOOD, "prompt": "Danielle Darrieux \u202e" + "x" * 2000}, "prompt"),
    # the no-op before the subject, the subject before locality
    ({**GOOD, "subject": "Zed", "target_new": "french"}, "target_new"),
    ({**GOOD, "subject": "Zed", "locality": [{"prompt": "p", "answer": "\u200b"}]}, "prompt"),
    ({**GOOD, "rephrase_prompts": 5, "subject": "Zed"}, "rephrase_prompts"),
])
def test_the_first_problem_wins_in_the_same_order(rec, want):
    field, reason = refused(rec)
    assert field == want
    if rec.get("prompt", "").endswith("x" * 2000):
        assert reason == "string longer than 2000 characters"


def test_both_paths_agree_on_mixed_hostile_records():
    """Random records over hostile values: the same verdict, field and reason on both paths."""
    rng = random.Random(11)
    texts = ["Paris", "paris is", "x", "\u202e", "Par\u200bis", "a\x07", "\x1b[31m", "Zed", " ",
             "\u200d", "Zürich", "ＰＡＲＩＳ is", "\ufeff", "a\u2028b", "ok\t", 5, None]
    fact_ids = ["cf-1", "f-0123456789abcdef", "../../etc/passwd", "$(id)", "a" * 129, "a" * 128,
                "x\u202e", "", None, 3, ".x"]
    pairs = [[{"prompt": "p", "answer": "a"}], [{"prompt": "p\u200b", "answer": "a"}],
             [{"prompt": "p", "answer": "\u200e"}], [{"prompt": "p"}], None]
    recs = []
    for _ in range(3000):
        r = {f: rng.choice(texts) for f in ("subject", "prompt", "target_new", "target_old",
                                             "relation", "source") if rng.random() < 0.5}
        if rng.random() < 0.6:
            r.update(subject="Paris", prompt="Paris is the capital of", target_new="Rome")
        if rng.random() < 0.4:
            r["fact_id"] = rng.choice(fact_ids)
        if rng.random() < 0.2:
            r["op"] = "retract"
        if rng.random() < 0.3:
            r["rephrase_prompts"] = rng.choice(texts[:12] + [["ok", "\u2066"], ["ok"]])
        if rng.random() < 0.3:
            r[rng.choice(["locality", "portability"])] = rng.choice(pairs)
        recs.append(r)
    ok, bad = validate.validate_records(recs)
    got_ok = dict(zip(ok["source_record"].to_list(), ok["fact_id"].to_list()))
    got_bad = {r["record"]: (r["field"], r["reason"]) for r in bad.iter_rows(named=True)}
    assert len(got_ok) + len(got_bad) == len(recs) and got_ok
    fields = set()
    for i, rec in enumerate(recs, 1):
        try:
            fact = fact_from_record(rec)
        except FactError as exc:
            assert got_bad.get(i) == (exc.field, exc.reason), rec
            fields.add((exc.field, exc.kind))
        else:
            assert got_ok.get(i) == fact.fact_id, rec
    kinds = {k for _, k in fields}
    assert {CONTROL_KIND, SUBJECT_KIND, FACT_ID_REASON} <= kinds       # each rule was hit


def test_fast_and_exact_list_paths_agree_on_control_characters():
    items = ["a", "a\u202e", "\u200b", "ok\t", "\x07x"]
    reph = [[a, b] for a in items for b in items]
    pairs = [[{"prompt": a, "answer": b}] for a in items for b in items]
    for fn, vals in ((columns.rephrase_column, reph),
                     (lambda v, fast, skips: columns.pairs_column("locality", v, fast=fast,
                                                                   skips=skips), pairs)):
        fast_skips, slow_skips = {}, {}     # such items are left out, not refused
        fast_col, fast_err = fn(vals, fast=True, skips=fast_skips)
        slow_col, slow_err = fn(vals, fast=False, skips=slow_skips)
        assert fast_err == slow_err and not any(fast_err)
        assert fast_skips == slow_skips and 0 < len(fast_skips) < len(vals)
        assert fast_col.to_list() == slow_col.to_list()


# -- benchmarks: refused records are skipped and counted ---------------------------------
def test_records_to_facts_skips_refused_records_only_when_asked():
    recs = [GOOD, {**GOOD, "target_new": "French"}, {**GOOD, "target_new": "E\u202english"},
            {**GOOD, "subject": "Zed"}, {**GOOD, "subject": "Darrieux"}]
    skipped: list = []
    with pytest.raises(FactError, match="U\\+202E"):       # no-ops alone are skipped by default
        list(records_to_facts(recs, skipped=skipped))
    assert [e.reason for e in skipped] == [NOOP]
    skipped = []
    facts = list(records_to_facts(recs, skipped=skipped, skip_refused=True))
    assert [f.subject for f in facts] == ["Danielle Darrieux", "Darrieux"]
    assert [(e.record, e.kind) for e in skipped] == [
        (1, NOOP), (2, CONTROL_KIND), (3, SUBJECT_KIND)]
    with pytest.raises(ValueError):
        list(records_to_facts(recs, skip_refused=True))


def test_bench_loader_skips_refused_records_and_names_each_kind_once(tmp_path, capsys):
    sys.path.insert(0, str(ROOT / "bench"))
    import edit_quality

    rec = {"subject": "Paris", "src": "Paris is the capital of", "alt": "Italy",
           "answers": ["France"], "loc": "nq question: who", "loc_ans": "someone"}
    recs = [rec, {**rec, "loc_ans": "\ufeffsomeone"}, {**rec, "loc_ans": "some\ufeffone"},
            {**rec, "alt": "France"}, {**rec, "src": "Rome is the capital of"}, rec]
    (tmp_path / "zsre-dev.json").write_text(json.dumps(recs), encoding="utf-8")
    facts = edit_quality.load_dataset("zsre", tmp_path)
    assert len(facts) == 4               # records 1 and 2 without their locality pair
    out = capsys.readouterr().out.splitlines()
    assert out[:2] == ["note: 2 evaluation items left out of accepted records in zsre-dev.json:",
                       f"  2 x {CONTROL_KIND}: record 1 locality[0].answer, "
                       "record 2 locality[0].answer"]
    assert out[2] == "note: 2 of 6 records skipped in zsre-dev.json:"
    assert sorted(line.split(":")[0] for line in out[3:]) == sorted(
        [f"  1 x {NOOP.split(':')[0]}", f"  1 x {SUBJECT_KIND}"])


KNOWN_LEFT_OUT = {   # records whose locality text holds U+200E, U+FEFF or U+200B, which
    # leaves that pair out (in zsre-eval-dev, record 1137 too, but it is a no-op first)
    "knowedit-wiki-recent-dev.json": [81, 234, 256, 435],
    "zsre-dev.json": [334, 362, 509],
    "zsre-eval-dev.json": [75, 91, 204, 1018, 1122, 1445],
}


@pytest.mark.skipif(not BENCHMARKS.is_dir(), reason="no ../shared/benchmarks here")
def test_public_benchmarks_mention_every_subject_and_hold_only_the_known_characters():
    for path in sorted(BENCHMARKS.glob("*.json")):
        skipped: list = []
        left_out: list = []
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", PairSkipped)
            list(records_to_facts(json.loads(path.read_text(encoding="utf-8")), file=path.name,
                                  skipped=skipped, skip_refused=True, skipped_pairs=left_out))
        assert not [e for e in skipped if e.kind in (SUBJECT_KIND, CONTROL_KIND)], path.name
        chars = [e.record for e in left_out if e.reason.startswith("contains U+")]
        assert chars == KNOWN_LEFT_OUT.get(path.name, []), path.name
