"""Reading and validating fact updates, without git or DVC: every bad-input class, the
formats, key normalisation, and agreement with ``editing.facts.fact_from_record``."""
from __future__ import annotations

import json
import random
from datetime import datetime, timezone
from pathlib import Path

import polars as pl
import pytest

from editing.facts import FactError, FORMATS, detect_format, fact_from_record, fact_key, normalise
from tasks.stream import columns, readers, validate

SAMPLES = Path(__file__).resolve().parent.parent / "data" / "samples"
NOW = datetime(2025, 6, 1, tzinfo=timezone.utc)
GOOD = {"subject": "Danielle Darrieux", "prompt": "The mother tongue of Danielle Darrieux is",
        "target_new": "English", "target_old": "French", "relation": "mother tongue"}


def run_file(path, fmt=None):
    goods, bads, n = [], [], 0
    for chunk in readers.read_file(path, fmt):
        n += len(chunk)
        g, b = validate.validate_chunk(chunk, file=path.name, sha256="x", archived=str(path),
                                       seq=0, run_id="r", received_at=NOW)
        goods.append(g)
        bads.append(b)
    return n, pl.concat(goods), pl.concat(bads)


def reasons(bad: pl.DataFrame) -> dict[int, tuple]:
    return {r["line"] if r["line"] is not None else r["record"]: (r["field"], r["reason"])
            for r in bad.iter_rows(named=True)}


# -- each bad-input class -------------------------------------------------------
BAD_CASES = {
    "missing field": ({k: v for k, v in GOOD.items() if k != "target_new"},
                      "target_new", "missing required field"),
    "wrong type": ({**GOOD, "subject": 42}, "subject", "expected a string, got int"),
    # a bad item of an optional list is left out with a warning (tests/test_knowedit.py);
    # a list field of the wrong shape refuses the record
    "wrong type of list": ({**GOOD, "rephrase_prompts": {"a": 7}}, "rephrase_prompts",
                           "expected a list of non-empty strings"),
    "empty string": ({**GOOD, "prompt": ""}, "prompt", "empty or whitespace-only string"),
    "whitespace-only string": ({**GOOD, "target_new": " \t\u3000"}, "target_new",
                               "empty or whitespace-only string"),
    "over-long string": ({**GOOD, "prompt": "x" * 2001}, "prompt",
                         "string longer than 2000 characters"),
    "target equal to old target": ({**GOOD, "target_new": "  FRENCH "}, "target_new",
                                   "target_new equals target_old: the update changes nothing"),
    "bad op": ({**GOOD, "op": "delete"}, "op", "unknown op 'delete'"),
    "bad observed_at": ({**GOOD, "observed_at": "last tuesday"}, "observed_at",
                        "not an ISO 8601 timestamp"),
    "locality not a list": ({**GOOD, "locality": "p"}, "locality",
                            "expected a list of {prompt, answer}"),
    "not an object": ([1, 2], None, "expected a JSON object, got list"),
}


@pytest.mark.parametrize("case", list(BAD_CASES))
def test_each_bad_record_class_is_quarantined_with_field_and_reason(tmp_path, case):
    rec, field, reason = BAD_CASES[case]
    path = tmp_path / "in.jsonl"
    path.write_text(json.dumps(GOOD) + "\n" + json.dumps(rec) + "\n", encoding="utf-8")
    n, good, bad = run_file(path)
    assert (n, good.height, bad.height) == (2, 1, 1)
    row = bad.row(0, named=True)
    assert row["line"] == 2 and row["record"] == 2 and row["file"] == "in.jsonl"
    assert row["field"] == field
    assert reason in row["reason"]
    assert json.loads(row["raw"]) == rec          # the original text is kept


def test_undecodable_bytes_and_malformed_lines_spare_the_good_lines(tmp_path):
    good = json.dumps(GOOD).encode()
    lines = [good,
             json.dumps({**GOOD, "subject": "Ent\udcffity"}, ensure_ascii=False)
             .encode("utf-8", "surrogateescape"),          # a raw 0xff byte
             b'{"subject": "A", "prompt": "p"',           # cut off
             b"",                                         # blank lines are not records
             b"not json at all",
             json.dumps({**GOOD, "subject": "Other"}).encode()]
    path = tmp_path / "mixed.jsonl"
    path.write_bytes(b"\n".join(lines) + b"\n")
    n, ok, bad = run_file(path)
    assert n == 5 and ok.height == 2 and bad.height == 3
    got = reasons(bad)
    assert got[2][1].startswith("undecodable bytes: not UTF-8")
    assert "\\xff" in bad.filter(pl.col("line") == 2)["raw"].item()
    assert got[3][1].startswith("malformed JSON") and got[5][1].startswith("malformed JSON")
    assert ok["source_line"].to_list() == [1, 6]


def test_a_file_of_unknown_format_is_one_quarantined_record(tmp_path):
    path = tmp_path / "notes.txt"
    path.write_bytes(b"\x00\x01binary")
    n, ok, bad = run_file(path)
    assert (n, ok.height, bad.height) == (1, 0, 1)
    assert "unknown file format" in bad["reason"].item()


def test_broken_json_array_keeps_the_records_before_the_break(tmp_path):
    path = tmp_path / "arr.json"
    path.write_text("[\n" + json.dumps(GOOD) + ",\n" + json.dumps({**GOOD, "subject": "Darrieux"})
                    + ",\n {\"subject\": oops}\n]", encoding="utf-8")
    n, ok, bad = run_file(path)
    assert ok.height == 2 and bad.height == 1 and n == 3
    assert bad["line"].item() == 4 and "malformed JSON" in bad["reason"].item()


# -- formats --------------------------------------------------------------------
def test_counterfact_and_zsre_samples_read_as_they_are():
    n, ok, bad = run_file(SAMPLES / "counterfact-sample.json")
    assert n == ok.height + bad.height and ok.height > 0
    assert set(ok["source_format"]) == {"counterfact"}
    first = ok.row(0, named=True)
    assert first["fact_id"].startswith("cf-") and first["rephrase_prompts"]
    assert first["source_line"] == 2          # the record's opening line in the file
    n, ok, bad = run_file(SAMPLES / "zsre-sample.json")
    assert set(ok["source_format"]) == {"zsre"} and ok.height + bad.height == n
    # zsRE records whose new answer is the old one are no-ops
    assert set(bad["reason"]) <= {"target_new equals target_old: the update changes nothing"}


def test_knowedit_csv_and_parquet(tmp_path):
    ke = [{"subject": "Paris", "prompt": "Paris is the capital of", "target_new": "Italy",
           "ground_truth": "France", "rephrase": "The capital city Paris belongs to",
           "locality": {"Relation_Specificity": [{"prompt": "Rome is the capital of",
                                                  "ground_truth": ["Italy"]}]}}]
    (tmp_path / "ke.json").write_text(json.dumps(ke), encoding="utf-8")
    n, ok, bad = run_file(tmp_path / "ke.json")
    row = ok.row(0, named=True)
    assert (n, bad.height, row["source_format"], row["target_old"]) == (1, 0, "knowedit", "France")
    assert row["locality"] == [{"prompt": "Rome is the capital of", "answer": "Italy",
                                "kind": "Relation_Specificity", "aliases": [["Italy"]]}]

    csv_text = ("subject,prompt,target_new,target_old,rephrase_prompts,locality\n"
                'A,The capital of A is,X,Y,"[""A\'s capital is""]",'
                '"[{""prompt"": ""p"", ""answer"": ""a""}]"\n'
                "B,The capital of B is,,Y,,\n"
                '"C, the city","Where is\nC, the city?",Z,,A plain rephrasing,\n')
    (tmp_path / "f.csv").write_text(csv_text, encoding="utf-8")
    n, ok, bad = run_file(tmp_path / "f.csv")
    assert (n, ok.height, bad.height) == (3, 2, 1)
    assert reasons(bad)[3] == ("target_new", "missing required field")   # empty cell = absent
    assert ok["rephrase_prompts"].to_list() == [["A's capital is"], ["A plain rephrasing"]]
    assert ok["source_line"].to_list() == [2, 4]      # multi-line cell: the row's first line

    df = pl.DataFrame({"subject": ["A", "B"], "prompt": ["p A", "p B"],
                       "target_new": ["x", None], "observed_at": ["2024-01-01", None]})
    df.write_parquet(tmp_path / "f.parquet")
    n, ok, bad = run_file(tmp_path / "f.parquet")
    assert (n, ok.height, bad.height) == (2, 1, 1)
    assert bad["record"].item() == 2 and bad["line"].item() is None
    (tmp_path / "bad.parquet").write_bytes(b"PAR1 not really")
    n, ok, bad = run_file(tmp_path / "bad.parquet")
    assert (n, ok.height, bad.height) == (1, 0, 1) and "unreadable Parquet" in bad["reason"].item()


# -- keys -------------------------------------------------------------------------
def test_normalise_series_equals_editing_normalise():
    samples = ["  Danielle   DARRIEUX ", "Stra\u00dfe", "STRASSE", "\ufb01ne", "ＡＢＣ",
               "a\u00a0b", "x\x1cy", "İstanbul", "ς final", "e\u0301", "\u2003lead", "", None]
    got = validate.normalise_series(pl.Series(samples, dtype=pl.String)).to_list()
    assert got == [normalise(s) if s is not None else None for s in samples]


def test_whitespace_class_matches_python_isspace():
    chars = [chr(i) for i in range(0x3100)] + ["\u205f", "\u3000", "\ufeff"]
    got = pl.Series(chars).str.contains(columns.WS_ONLY).to_list()
    assert got == [c.isspace() or c == "" for c in chars]


def test_fact_ids_match_editing_fact_key():
    recs = [GOOD, {**GOOD, "subject": "  danielle  darrieux", "relation": "Mother  Tongue"},
            {k: v for k, v in GOOD.items() if k != "relation"},
            {**GOOD, "fact_id": "given-1"}]
    ok, bad = validate.validate_records(recs)
    assert bad.height == 0
    want = [fact_from_record(r).fact_id for r in recs]
    assert ok["fact_id"].to_list() == want
    assert want[0] == want[1] == fact_key("Danielle Darrieux", "mother tongue")
    # normalised duplicates share their content hash too
    assert ok["record_hash"][0] == ok["record_hash"][1] != ok["record_hash"][2]


def test_timestamps_parse_to_utc():
    s = pl.Series(["2024-05-01", "2024-05-01T12:30:45+02:00", "2024-05-01 10:30:45.5Z",
                   "2024-02-30", "soon"])
    out = pl.select(validate.parse_timestamps(pl.lit(s))).to_series().to_list()
    assert out[0] == datetime(2024, 5, 1, tzinfo=timezone.utc)
    assert out[1] == datetime(2024, 5, 1, 10, 30, 45, tzinfo=timezone.utc)
    assert out[2] == datetime(2024, 5, 1, 10, 30, 45, 500000, tzinfo=timezone.utc)
    assert out[3] is None and out[4] is None


def test_vectorised_validation_agrees_with_fact_from_record():
    """Random records over awkward values: the same verdict, the same first reason."""
    rng = random.Random(7)
    vals = [None, "", " ", "x", "Paris", "paris ", 5, 1.5, True, [], ["a"], ["a", " "], ["a", 3],
            {}, {"a": 1}, [{"prompt": "p", "answer": "a"}], [{"prompt": "p"}],
            [{"prompt": " ", "answer": "a"}], [None], "x" * 2001, "upsert", "retract", "f-1",
            "\u00a0", "ＡＢ", [{"prompt": "p", "answer": "a" * 2001}]]
    fields = ["subject", "prompt", "target_new", "target_old", "relation", "fact_id", "source",
              "op", "rephrase_prompts", "locality", "portability"]
    recs = []
    for _ in range(3000):
        r = {f: rng.choice(vals) for f in fields if rng.random() < 0.4}
        if rng.random() < 0.6:
            r.update(subject="S", prompt="P of S", target_new="T")
        recs.append(r)
    ok, bad = validate.validate_records(recs)
    got_ok = dict(zip(ok["source_record"].to_list(), ok["fact_id"].to_list()))
    got_bad = dict(zip(bad["record"].to_list(), bad["reason"].to_list()))
    assert len(got_ok) + len(got_bad) == len(recs) and got_ok and got_bad
    for i, rec in enumerate(recs, 1):
        kind = detect_format(rec)
        try:
            fact = fact_from_record(FORMATS[kind](rec) if kind in FORMATS else rec)
        except FactError as exc:
            assert got_bad.get(i) == exc.reason, rec
        else:
            assert got_ok.get(i) == fact.fact_id, rec


def test_fast_and_exact_list_paths_agree():
    rng = random.Random(3)
    items = ["a", " ", "", "x" * 2001, "\t\u3000"]
    reph = [None if rng.random() < .2 else rng.choice(items) if rng.random() < .2
            else [rng.choice(items) for _ in range(rng.randrange(3))] for _ in range(2000)]
    pairs = [None if rng.random() < .2 else
             [{k: rng.choice(items) for k in ("prompt", "answer") if rng.random() < .9}
              for _ in range(rng.randrange(1, 3))] for _ in range(2000)]
    for fn, vals in ((columns.rephrase_column, reph),
                     (lambda v, fast, skips: columns.pairs_column("locality", v, fast=fast,
                                                                   skips=skips), pairs)):
        fast_skips, slow_skips = {}, {}     # bad items are left out, not refused
        fast_col, fast_err = fn(vals, fast=True, skips=fast_skips)
        slow_col, slow_err = fn(vals, fast=False, skips=slow_skips)
        assert fast_err == slow_err
        assert fast_skips == slow_skips and 0 < len(fast_skips) < len(vals)
        assert fast_col.to_list() == slow_col.to_list()
