"""Hostile input files against the real git + DVC workspace: no file, however built, stops
the stream. Each class of file is quarantined with a reason (or, for UTF-16/32, read) and
the other files of the same run are taken in; a file that kills the ingest is quarantined
unread after ``max_read_attempts`` deaths."""
from __future__ import annotations

import codecs
import errno
import json
import signal
from pathlib import Path

import polars as pl
import pytest
import yaml

from editing.config import REPO_PARAMS, merge, read_yaml
from tasks.settings import IngestSettings
from tasks.stream import ledger, readers
from tasks.stream.chunks import PREVIEW
from tasks.stream.ingest import FAULT_ENV, default_limits, ingest, read_journal
from test_ingest import (_cli, assert_consistent, balanced, batch_frame, fact, home,  # noqa: F401
                         home_template, put)


def rejects(r) -> list[dict]:
    return [json.loads(x) for q in r.quarantine for x in Path(q).read_text().splitlines()]


def by_file(rows: list[dict], suffix: str) -> list[dict]:
    return [x for x in rows if x["file"].endswith(suffix)]


def jsonl(records) -> bytes:
    return "".join(json.dumps(x, ensure_ascii=False) + "\n" for x in records).encode()


# -- a file no parser survives ---------------------------------------------------------
def test_nested_brackets_json_is_quarantined_and_the_stream_goes_on(home):
    put(home, "good.jsonl", [fact(1), fact(2)])
    put(home, "brackets.json", b"[" * 100_000 + b"]" * 100_000)
    r = ingest(home)                                # the real defaults, from params.yaml
    balanced(r)
    assert (r.records_in, r.accepted, r.quarantined) == (3, 2, 1)
    [bad] = rejects(r)
    assert bad["file"].endswith("brackets.json") and (bad["line"], bad["record"]) == (1, 1)
    assert "RecursionError" in bad["reason"] and "nested too deeply" in bad["reason"]
    assert bad["field"] is None and bad["raw"].startswith("[[[[")
    assert read_journal(home) is None               # the run finished
    put(home, "later.jsonl", [fact(3)])
    r2 = ingest(home)
    assert (r2.records_in, r2.accepted, r2.recovered) == (1, 1, [])
    manifest = json.loads((home.workspace / f"batches/{r.batch}.json").read_text())
    stats = {f["name"].split("-", 1)[1]: f for f in manifest["files"]}
    assert (stats["brackets.json"]["records"], stats["brackets.json"]["quarantined"]) == (1, 1)
    assert_consistent(home)


def test_a_reader_crash_discards_what_the_file_produced(home, monkeypatch):
    """Any exception while reading one file: its parts and rejects so far are dropped and
    it becomes one entry; the other files and the counts are untouched."""
    real = readers.read_file

    def crashing(path, *a, **kw):
        for n, chunk in enumerate(real(path, *a, chunk_records=2, **kw)):
            yield chunk
            if "crashing" in Path(path).name and n == 1:
                raise MemoryError("simulated parser failure")

    monkeypatch.setattr(readers, "read_file", crashing)
    put(home, "crashing.jsonl", [fact(i) for i in range(3)] + [{"subject": "x"}, fact(4)])
    put(home, "fine.jsonl", [fact(10), {"subject": "y"}])
    r = ingest(home)
    balanced(r)
    assert (r.records_in, r.accepted, r.quarantined) == (1 + 2, 1, 2)
    rows = rejects(r)
    [crash] = by_file(rows, "crashing.jsonl")
    assert crash["reason"] == "file could not be read: MemoryError: simulated parser failure"
    assert crash["line"] is None and crash["record"] is None and crash["raw"].startswith('{"sub')
    assert batch_frame(home, r.batch)["subject"].to_list() == ["Subject 10"]
    assert Path(crash["archived"]).exists()
    files = ledger.ingested_files(home)
    assert {v["name"].split("-", 1)[1]: (v["records"], v["quarantined"])
            for v in files.values()} == {"crashing.jsonl": (1, 1), "fine.jsonl": (2, 1)}
    assert_consistent(home)


# -- limits ------------------------------------------------------------------------------
KNOWEDIT = {"subject": "Subject 7", "prompt": "The employer of Subject 7 is",
            "target_new": "Company 7", "ground_truth": "Old 7",
            "locality": {"Relation_Specificity": [{"prompt": "Paris is in",
                                                   "ground_truth": [["France"]]}]},
            "portability": {"Reasoning": [{"prompt": "Who pays Subject 7?",
                                           "ground_truth": [["Company 7"]]}]}}


def nested(levels: int):
    value: list = [1]
    for _ in range(levels - 1):
        value = [value]
    return value


def test_deep_records_in_jsonl(home):
    deep = fact(2, extra={"a": nested(31)})               # 1 + 1 + 31 = 33 levels
    lines = [json.dumps(fact(1)).encode(), json.dumps(deep).encode(),
             b'{"subject": ' + b"[" * 5000 + b"]" * 5000 + b"}",       # past orjson's limit
             json.dumps(KNOWEDIT).encode()]                            # 6 levels: fine
    put(home, "deep.jsonl", b"\n".join(lines) + b"\n")
    r = ingest(home)                                # default max_depth (32)
    balanced(r)
    assert (r.records_in, r.accepted, r.quarantined) == (4, 2, 2)
    got = {x["line"]: (x["field"], x["reason"]) for x in rejects(r)}
    assert got[2] == (None, "nested deeper than 32 levels (ingest.max_depth)")
    assert got[3][1].startswith("nested deeper than 32 levels (ingest.max_depth): JSONDecodeError")
    df = batch_frame(home, r.batch)
    assert sorted(df["source_line"]) == [1, 4] and "knowedit" in set(df["source_format"])


def test_overlong_lines_and_records(home):
    limits = IngestSettings(max_line_bytes=1000)
    long = fact(2, relation="r" * 1500)
    put(home, "lines.jsonl", jsonl([fact(1), long, fact(3)]))
    put(home, "array.json", json.dumps([fact(4), long, fact(5)], indent=1).encode())
    put(home, "rows.csv", ("subject,prompt,target_new,relation\n"
                           f"Subject 6,The employer of Subject 6 is,C 6,{'r' * 1500}\n"
                           "Subject 7,The employer of Subject 7 is,C 7,employer\n").encode())
    r = ingest(home, limits=limits)
    balanced(r)
    assert (r.records_in, r.accepted, r.quarantined) == (8, 5, 3)
    rows = rejects(r)
    [line] = by_file(rows, "lines.jsonl")
    n = len(json.dumps(long).encode())
    assert (line["line"], line["record"], line["field"]) == (2, 2, None)
    assert line["reason"] == (f"line 2 is {n:,} bytes, longer than the limit of 1,000 "
                              "(ingest.max_line_bytes)")
    [rec] = by_file(rows, "array.json")
    assert rec["record"] == 2 and rec["reason"].startswith("record 2 is ")
    [row] = by_file(rows, "rows.csv")
    assert (row["line"], row["record"]) == (2, 1) and "ingest.max_line_bytes" in row["reason"]
    assert all(len(x["raw"]) <= PREVIEW for x in rows)
    assert sorted(batch_frame(home, r.batch)["subject"]) == [f"Subject {i}" for i in (1, 3, 4,
                                                                                     5, 7)]


def test_a_line_longer_than_the_read_block_is_never_held_whole(tmp_path):
    """Reader level: a line past max_line_bytes that spans several read blocks."""
    path = tmp_path / "x.jsonl"
    path.write_bytes(jsonl([fact(1)]) + b"z" * 50_000 + b"\n" + jsonl([fact(2)]) + b"y" * 3000)
    chunks = list(readers.read_file(path, chunk_records=4,
                                    limits=IngestSettings(max_line_bytes=2000)))
    rows = [(ln, rec, perr) for c in chunks for ln, rec, perr in zip(c.lines, c.records, c.perrs)]
    assert rows == [(1, 1, None),
                    (2, 2, "line 2 is 50,000 bytes, longer than the limit of 2,000 "
                           "(ingest.max_line_bytes)"),
                    (3, 3, None),
                    (4, 4, "line 4 is 3,000 bytes, longer than the limit of 2,000 "
                           "(ingest.max_line_bytes)")]
    assert max(len(r) for c in chunks for r in c.raws) <= PREVIEW


def test_max_records_from_a_params_file(home, tmp_path, monkeypatch):
    params = tmp_path / "params.yaml"
    repo = read_yaml(REPO_PARAMS)
    params.write_text(yaml.safe_dump(merge(repo, {"ingest": {"max_records": 3}})),
                      encoding="utf-8")
    monkeypatch.setenv("LEDIT_PARAMS", str(params))
    put(home, "many.jsonl", [fact(i) for i in range(6)])
    put(home, "many.json", json.dumps([fact(i) for i in range(10, 16)]).encode())
    put(home, "few.jsonl", [fact(20), fact(21), fact(22)])
    r = ingest(home)
    balanced(r)
    assert (r.records_in, r.accepted, r.quarantined) == (4 + 4 + 3, 9, 2)
    for bad in rejects(r):
        assert bad["record"] == 4 and bad["reason"] == (
            "more than 3 records in this file (ingest.max_records); the rest of the file from "
            "this record on was not read")
    assert {x["line"] for x in rejects(r)} == {4, 1}        # JSON: the array's one line
    params.write_text(yaml.safe_dump(merge(repo, {"ingest": {"max_records": 0}})),
                      encoding="utf-8")
    with pytest.raises(ValueError, match="ingest.max_records: expected a positive integer"):
        default_limits()


def test_a_file_over_max_file_bytes_is_quarantined_unread(home):
    big = jsonl([fact(i) for i in range(20)])
    put(home, "big.jsonl", big)
    put(home, "small.jsonl", [fact(100)])
    r = ingest(home, limits=IngestSettings(max_file_bytes=1000))
    balanced(r)
    assert (r.records_in, r.accepted, r.quarantined) == (2, 1, 1)
    [bad] = rejects(r)
    assert bad["file"].endswith("big.jsonl") and bad["line"] is None and bad["record"] is None
    assert bad["reason"] == (f"file is {len(big):,} bytes, over the limit of 1,000 "
                             "(ingest.max_file_bytes); not read")
    assert bad["raw"] == big[:PREVIEW].decode()
    assert Path(bad["archived"]).read_bytes() == big


# -- text encodings ------------------------------------------------------------------------
ENCODINGS = {"utf-16-le": codecs.BOM_UTF16_LE, "utf-16-be": codecs.BOM_UTF16_BE,
             "utf-32-le": codecs.BOM_UTF32_LE, "utf-32-be": codecs.BOM_UTF32_BE,
             "utf-8": codecs.BOM_UTF8}


def test_utf16_and_utf32_files_with_a_bom_are_read(home):
    expected, k = {}, 0
    for enc, bom in ENCODINGS.items():
        for fmt in ("jsonl", "json", "csv", "sniffed"):
            k += 1
            rec = fact(k, target_new=f"Zürich 東京 🚀 {k}")   # past the BMP: a surrogate pair
            expected[rec["subject"]] = rec["target_new"]
            if fmt == "jsonl":
                text = json.dumps(rec, ensure_ascii=False) + "\r\n"
            elif fmt == "csv":
                text = ("subject,prompt,target_new\r\n"
                        f"{rec['subject']},{rec['prompt']},{rec['target_new']}\r\n")
            else:
                text = json.dumps([rec], ensure_ascii=False, indent=2)
            name = f"{enc}-{fmt}" + ("" if fmt == "sniffed" else f".{fmt}")
            put(home, name, bom + text.encode(enc))
    # an odd trailing byte: the record with it is quarantined, the one before is read
    k += 1
    ok = fact(k, target_new="Genève")
    expected[ok["subject"]] = ok["target_new"]
    put(home, "truncated.jsonl", codecs.BOM_UTF16_LE
        + jsonl([ok, fact(k + 1)]).decode().encode("utf-16-le")[:-3])
    r = ingest(home)
    balanced(r)
    assert (r.records_in, r.accepted, r.quarantined) == (len(ENCODINGS) * 4 + 2, k, 1)
    [bad] = rejects(r)
    assert bad["file"].endswith("truncated.jsonl") and bad["line"] == 2
    assert bad["reason"] == "undecodable bytes: not valid UTF-16-LE"
    df = batch_frame(home, r.batch)
    assert dict(zip(df["subject"], df["target_new"])) == expected
    assert_consistent(home)


# -- a file that kills the process ---------------------------------------------------------
def test_a_file_that_kills_the_ingest_twice_is_quarantined_unread(home):
    put(home, "a-deadly.jsonl", [fact(1), fact(2)])
    put(home, "b-fine.jsonl", [fact(3)])
    for attempt in (1, 2):                       # SIGKILL while reading, as the OOM killer would
        run = _cli(home, "ingest", "--json", env={FAULT_ENV: "reading_file:kill"})
        assert run.returncode == -signal.SIGKILL, run.stderr
        j = read_journal(home)
        assert j["phase"] == "claimed"
        assert [(f.get("read_started", 0), f.get("read_finished", 0)) for f in j["files"]] \
            == [(attempt, 0), (0, 0)]
    put(home, "c-new.jsonl", [fact(4)])
    r = ingest(home)
    balanced(r)
    assert r.recovered == [j["run_id"]] and len(r.runs) == 2
    assert (r.records_in, r.accepted, r.quarantined) == (1 + 1 + 1, 2, 1)
    [bad] = rejects(r)
    assert bad["file"].endswith("a-deadly.jsonl") and bad["line"] is None
    assert bad["reason"] == ("file not read: the ingest died while reading it 2 times "
                             "(ingest.max_read_attempts=2)")
    assert Path(bad["archived"]).exists()
    subjects = pl.concat([batch_frame(home, t) for t in r.batches])["subject"].sort().to_list()
    assert subjects == ["Subject 3", "Subject 4"]
    report = json.loads((home.run_dir(j["run_id"]) / "report.json").read_text())
    assert [(f.get("read_started"), f.get("read_finished")) for f in report["files"]] \
        == [(2, None), (1, 1)]
    assert_consistent(home)


@pytest.mark.parametrize("failure", ["interrupt", "full disk"])
def test_an_interrupt_or_a_full_disk_is_not_counted_against_the_file(home, monkeypatch,
                                                                      failure):
    """Neither is the file's fault: the run fails (the journal keeps it), no attempt counts."""
    def interrupted(*a, **kw):
        raise KeyboardInterrupt
        yield  # pragma: no cover

    def full(*a, **kw):
        raise OSError(errno.ENOSPC, "No space left on device")

    put(home, "a.jsonl", [fact(1)])
    if failure == "interrupt":
        monkeypatch.setattr(readers, "read_file", interrupted)
    else:
        monkeypatch.setattr(pl.DataFrame, "write_parquet", full)
    for _ in range(3):
        with pytest.raises(KeyboardInterrupt if failure == "interrupt" else OSError):
            ingest(home)
    [f] = read_journal(home)["files"]
    assert f.get("read_started", 0) == f.get("read_finished", 0) == 0
    monkeypatch.undo()
    r = ingest(home)
    assert (r.accepted, r.quarantined) == (1, 0)
