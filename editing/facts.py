"""The fact-update record, and readers for the formats facts arrive in.

The project's own format is JSONL, one record a line (DESIGN.md, "The fact-update
record"). EasyEdit's CounterFact, MEND's zsRE and KnowEdit JSON files are read as
they are, through the explicit mappings below.
"""
from __future__ import annotations

import hashlib
import json
import re
import unicodedata
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Iterable, Iterator

REQUIRED = ("subject", "prompt", "target_new")
OPTIONAL_STR = ("fact_id", "relation", "target_old", "source", "observed_at")
OPS = ("upsert", "retract")
MAX_STRING = 2000
# Fact ids go into file names, MLflow tag keys (``fact.<id>``: MLflow allows letters, digits,
# ``_ - . / :`` and space, 250 characters) and lineage output, so only a plain charset.
FACT_ID_PATTERN = r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}"
FACT_ID_REASON = (f"fact_id must match {FACT_ID_PATTERN} "
                  "(letters, digits, '.', '_', '-'; at most 128)")
# Characters refused in every text field, since they make what a reader sees differ from
# what the model is trained on: C0 controls but TAB, LF and CR; DEL and the C1 controls;
# the bidirectional marks, embeddings, overrides and isolates ("Trojan Source"); the
# invisible zero-width space, word joiner and BOM; the line and paragraph separators.
# ZWNJ and ZWJ (U+200C, U+200D) are allowed: Persian, Indic scripts and emoji need them.
# A plain (not raw) string: the class holds the characters themselves, which Python's re
# and polars' Rust regex both read (a regex \u escape would be \x{...} in Rust).
CONTROL_CHARS = ("[\x00-\x08\x0b\x0c\x0e-\x1f\x7f-\x9f\u061c\u200b\u200e\u200f"
                 "\u2028-\u202e\u2060\u2066-\u2069\ufeff]")
CONTROL_KIND = "control or bidirectional character"
SUBJECT_KIND = "the prompt does not mention the subject"
_CONTROL_RE = re.compile(CONTROL_CHARS)
_FACT_ID_RE = re.compile(FACT_ID_PATTERN)


class FactError(ValueError):
    """A record that cannot be used, naming the file, the record and the field."""

    def __init__(self, message: str, *, file: str | None = None, record: int | None = None,
                 field: str | None = None, kind: str | None = None):
        self.file, self.record, self.field, self.reason = file, record, field, message
        self.kind = kind or message     # the reason without its record-specific details
        where = ", ".join(x for x in (
            f"file {file}" if file else None,
            f"record {record}" if record is not None else None,
            f"field '{field}'" if field else None) if x)
        super().__init__(f"{where}: {message}" if where else message)


@dataclass
class Fact:
    subject: str
    prompt: str
    target_new: str
    fact_id: str = ""
    relation: str | None = None
    target_old: str | None = None
    rephrase_prompts: list[str] = field(default_factory=list)
    locality: list[dict] = field(default_factory=list)      # [{prompt, answer}]
    portability: list[dict] = field(default_factory=list)   # [{prompt, answer}]
    source: str | None = None
    observed_at: str | None = None
    op: str = "upsert"

    def __post_init__(self):
        if not self.fact_id:
            self.fact_id = fact_key(self.subject, self.relation or self.prompt)

    def to_dict(self) -> dict:
        return asdict(self)


def normalise(text: str) -> str:
    """The key form of a string: NFKC, whitespace folded, case folded."""
    return re.sub(r"\s+", " ", unicodedata.normalize("NFKC", text)).strip().casefold()


def fact_key(subject: str, relation_or_prompt: str) -> str:
    digest = hashlib.sha256(f"{normalise(subject)}\x1f{normalise(relation_or_prompt)}".encode())
    return "f-" + digest.hexdigest()[:16]


def control_char_reason(text: str) -> str | None:
    """Why ``text`` is refused for its first control or bidirectional character, or None."""
    m = _CONTROL_RE.search(text)
    if m is None:
        return None
    ch = m.group()
    return (f"contains U+{ord(ch):04X} ({unicodedata.name(ch, '<control>')}) at character "
            f"{m.start() + 1}: control and bidirectional characters are refused")


def subject_reason(subject: str) -> str:
    return f"{SUBJECT_KIND} {subject!r}"


def subject_in_prompt(subject: str, prompt: str) -> bool:
    """Whether the prompt mentions the subject (compared as ``normalise`` keys them)."""
    return normalise(subject) in normalise(prompt)


def _string(rec: dict, name: str, *, required: bool, where: dict, label: str | None = None
            ) -> str | None:
    value, label = rec.get(name), label or name
    if value is None:
        if required:
            raise FactError("missing required field", field=label, **where)
        return None
    if not isinstance(value, str):
        raise FactError(f"expected a string, got {type(value).__name__}", field=label, **where)
    if not value.strip():
        raise FactError("empty or whitespace-only string", field=label, **where)
    if len(value) > MAX_STRING:
        raise FactError(f"string longer than {MAX_STRING} characters", field=label, **where)
    problem = control_char_reason(value)
    if problem:
        raise FactError(problem, field=label, kind=CONTROL_KIND, **where)
    return value


def _pairs(rec: dict, name: str, where: dict) -> list[dict]:
    value = rec.get(name) or []
    if not isinstance(value, list):
        raise FactError("expected a list of {prompt, answer}", field=name, **where)
    out = []
    for i, item in enumerate(value):
        if not isinstance(item, dict):
            raise FactError(f"item {i} is not an object", field=name, **where)
        p = _string(item, "prompt", required=True, where=where, label=f"{name}[{i}].prompt")
        a = _string(item, "answer", required=True, where=where, label=f"{name}[{i}].answer")
        out.append({"prompt": p, "answer": a})
    return out


def fact_from_record(rec: Any, *, file: str | None = None, record: int | None = None) -> Fact:
    """Validate one record of the project schema and build a Fact."""
    where = {"file": file, "record": record}
    if not isinstance(rec, dict):
        raise FactError(f"expected a JSON object, got {type(rec).__name__}", **where)
    op = rec.get("op", "upsert")
    if op not in OPS:
        raise FactError(f"unknown op {op!r}; expected one of {OPS}", field="op", **where)
    values = {name: _string(rec, name, required=op == "upsert", where=where) for name in REQUIRED}
    if op == "retract" and not (rec.get("fact_id") or (values["subject"] and values["prompt"])):
        raise FactError("a retract needs fact_id, or subject and prompt", field="fact_id", **where)
    for name in OPTIONAL_STR:
        values[name] = _string(rec, name, required=False, where=where)
        fid = values[name] if name == "fact_id" else None
        if fid is not None and not _FACT_ID_RE.fullmatch(fid):
            raise FactError(FACT_ID_REASON, field="fact_id", **where)
    rephrase = rec.get("rephrase_prompts") or []
    if isinstance(rephrase, str):
        rephrase = [rephrase]
    if not isinstance(rephrase, list) or not all(isinstance(x, str) and x.strip() for x in rephrase):
        raise FactError("expected a list of non-empty strings", field="rephrase_prompts", **where)
    for i, text in enumerate(rephrase):
        problem = control_char_reason(text)
        if problem:
            raise FactError(problem, field=f"rephrase_prompts[{i}]", kind=CONTROL_KIND, **where)
    if (op == "upsert" and values["target_old"] is not None
            and normalise(values["target_old"]) == normalise(values["target_new"])):
        raise FactError(NOOP, field="target_new", **where)
    # The editing method finds the subject in the prompt; a retract names its fact either way.
    if (values["subject"] is not None and values["prompt"] is not None
            and not subject_in_prompt(values["subject"], values["prompt"])):
        raise FactError(subject_reason(values["subject"]), field="prompt", kind=SUBJECT_KIND,
                        **where)
    return Fact(
        subject=values["subject"] or "", prompt=values["prompt"] or "",
        target_new=values["target_new"] or "", fact_id=values["fact_id"] or "",
        relation=values["relation"], target_old=values["target_old"],
        rephrase_prompts=list(rephrase), locality=_pairs(rec, "locality", where),
        portability=_pairs(rec, "portability", where), source=values["source"],
        observed_at=values["observed_at"], op=op)


# -- mappings from the public benchmark formats ---------------------------------
def _from_counterfact(rec: dict) -> dict:
    out = {"subject": rec.get("subject"), "prompt": rec.get("prompt"),
           "target_new": rec.get("target_new"), "target_old": rec.get("ground_truth")}
    if rec.get("case_id") is not None:
        out["fact_id"] = f"cf-{rec['case_id']}"
    if rec.get("rephrase_prompt"):
        out["rephrase_prompts"] = [rec["rephrase_prompt"]]
    if rec.get("locality_prompt"):
        out["locality"] = [{"prompt": rec["locality_prompt"],
                            "answer": rec.get("locality_ground_truth")}]
    return out


def _from_zsre(rec: dict) -> dict:
    answers = rec.get("answers") or []
    out = {"subject": rec.get("subject"), "prompt": rec.get("src"),
           "target_new": rec.get("alt"), "target_old": answers[0] if answers else None}
    if rec.get("rephrase"):
        out["rephrase_prompts"] = [rec["rephrase"]]
    if rec.get("loc"):
        out["locality"] = [{"prompt": rec["loc"], "answer": rec.get("loc_ans")}]
    return out


def _from_knowedit(rec: dict) -> dict:
    out = {"subject": rec.get("subject"), "prompt": rec.get("prompt"),
           "target_new": rec.get("target_new"), "target_old": rec.get("ground_truth")}
    if rec.get("rephrase"):
        out["rephrase_prompts"] = [rec["rephrase"]] if isinstance(rec["rephrase"], str) else rec["rephrase"]
    loc = rec.get("locality") or {}
    pairs = []
    for group in loc.values() if isinstance(loc, dict) else []:
        for item in group if isinstance(group, list) else [group]:
            if isinstance(item, dict) and item.get("prompt"):
                ans = item.get("ground_truth")
                while isinstance(ans, list) and ans:
                    ans = ans[0]
                pairs.append({"prompt": item["prompt"], "answer": ans})
    if pairs:
        out["locality"] = pairs
    return out


FORMATS = {"counterfact": _from_counterfact, "zsre": _from_zsre, "knowedit": _from_knowedit}


def detect_format(rec: dict) -> str:
    if "src" in rec and "alt" in rec:
        return "zsre"
    if "locality_prompt" in rec or "case_id" in rec or "rephrase_prompt" in rec:
        return "counterfact"
    if isinstance(rec.get("locality"), dict) or "portability" in rec and isinstance(rec["portability"], dict):
        return "knowedit"
    return "ledit"


NOOP = "target_new equals target_old: the update changes nothing"


def records_to_facts(records: Iterable[Any], *, file: str | None = None, fmt: str | None = None,
                     skipped: list | None = None, skip_refused: bool = False) -> Iterator[Fact]:
    """Map (if needed) and validate records; raises FactError on the first bad one.

    With a ``skipped`` list, no-op updates (target_new equal to target_old, which
    public benchmark files contain) are appended to it instead of raising; with
    ``skip_refused`` too, so is every refused record (for benchmark runs, which use
    the records they can; group them by ``FactError.kind``)."""
    if skip_refused and skipped is None:
        raise ValueError("skip_refused needs a skipped list to record what it skips")
    for i, rec in enumerate(records):
        kind = fmt or (detect_format(rec) if isinstance(rec, dict) else "ledit")
        mapped = FORMATS[kind](rec) if kind in FORMATS else rec
        try:
            yield fact_from_record(mapped, file=file, record=i)
        except FactError as exc:
            if skipped is None or not (skip_refused or exc.reason == NOOP):
                raise
            skipped.append(exc)


def read_records(path: str | Path) -> list[Any]:
    """The raw records of a JSONL file or a JSON array file, or a FactError."""
    path = Path(path)
    try:
        text = path.read_bytes().decode("utf-8")
    except UnicodeDecodeError as exc:
        raise FactError(f"not UTF-8 text ({exc.reason} at byte {exc.start})", file=str(path)) from exc
    except OSError as exc:
        raise FactError(str(exc), file=str(path)) from exc
    stripped = text.lstrip()
    if stripped.startswith("["):
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise FactError(f"bad JSON: {exc.msg} (line {exc.lineno})", file=str(path)) from exc
        return data
    records = []
    for lineno, line in enumerate(text.splitlines()):
        if not line.strip():
            continue
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError as exc:
            raise FactError(f"bad JSON on line {lineno + 1}: {exc.msg}", file=str(path),
                            record=len(records)) from exc
    return records


def load_facts(paths: Iterable[str | Path], fmt: str | None = None,
               skipped: list | None = None) -> list[Fact]:
    """Read and validate fact files (JSONL, or CounterFact / zsRE / KnowEdit JSON)."""
    facts: list[Fact] = []
    for path in paths:
        facts.extend(records_to_facts(read_records(path), file=str(path), fmt=fmt, skipped=skipped))
    return facts


def write_jsonl(facts: Iterable[Fact], path: str | Path) -> None:
    with open(path, "w", encoding="utf-8") as f:
        for fact in facts:
            f.write(json.dumps(fact.to_dict(), ensure_ascii=False) + "\n")
