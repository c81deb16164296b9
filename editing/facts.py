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
import warnings
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
MISSING = "missing required field"
EMPTY = "empty or whitespace-only string"
LONG = f"string longer than {MAX_STRING} characters"
# Evaluation pairs (locality, portability) carry a kind: KnowEdit's group names, kept as
# they are. The kind goes into metric names (``locality.<kind>``, also MLflow keys), so only
# a plain charset. Pairs given without one get their format's kind: CounterFact's locality
# prompts are neighbourhood prompts (the same relation, other subjects), MEND zsRE's are
# unrelated NQ questions, and the project's own records say nothing (DEFAULT_KIND).
KIND_PATTERN = r"[A-Za-z][A-Za-z0-9_]{0,63}"
DEFAULT_KIND = "Unspecified"
KNOWEDIT_LOCALITY = ("Relation_Specificity", "Forgetfulness")
KNOWEDIT_PORTABILITY = ("Subject_Aliasing", "Reasoning", "Logical_Generalization")
ANSWER_SHAPE = "expected a string, a list of aliases or a list of alias lists"
NO_ALIAS = "no alias: the answer is empty"
_CONTROL_RE = re.compile(CONTROL_CHARS)
_FACT_ID_RE = re.compile(FACT_ID_PATTERN)
_KIND_RE = re.compile(KIND_PATTERN)


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


class PairSkipped(UserWarning):
    """An optional evaluation item (a rephrase, a locality or portability pair) left out of a
    record that is otherwise taken in, naming the file, the record and the field."""

    def __init__(self, reason: str, *, file: str | None = None, record: int | None = None,
                 field: str | None = None):
        self.file, self.record, self.field, self.reason = file, record, field, reason
        where = ", ".join(x for x in (
            f"file {file}" if file else None,
            f"record {record}" if record is not None else None,
            f"field '{field}'" if field else None) if x)
        super().__init__(f"{where}: skipped: {reason}" if where else f"skipped: {reason}")


@dataclass
class Fact:
    subject: str
    prompt: str
    target_new: str
    fact_id: str = ""
    relation: str | None = None
    target_old: str | None = None
    rephrase_prompts: list[str] = field(default_factory=list)
    # [{prompt, answer, kind[, aliases]}]: ``answer`` is the alias teacher forcing scores (the
    # first non-empty one); ``aliases``, where the answer came as a list, holds every alias as
    # a list of alias lists, for generation matching (``metrics.contains_answer``).
    locality: list[dict] = field(default_factory=list)
    portability: list[dict] = field(default_factory=list)
    source: str | None = None
    observed_at: str | None = None
    op: str = "upsert"

    def __post_init__(self):
        if not self.fact_id:
            self.fact_id = fact_key(self.subject, self.relation or self.prompt)

    def to_dict(self) -> dict:
        return asdict(self)

    @property
    def key(self) -> str | None:
        """The "same fact" key: see ``same_fact_key``."""
        return same_fact_key(self.subject, self.prompt)


def same_fact_key(subject: str | None, prompt: str | None) -> str | None:
    """Facts with the same normalised subject and prompt are one fact, whatever their ids;
    None where either is missing."""
    return fact_key(subject, prompt) if subject and prompt else None


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


def text_problem(value) -> tuple[str, str] | None:
    """The first rule-2 problem of a text value as ``(reason, tag)``, or None for a good
    string; tags ``missing``, ``type``, ``empty``, ``long``, ``control``. Both validation
    paths (``fact_from_record``, ``tasks.stream.validate``) word their reasons with it."""
    if value is None:
        return MISSING, "missing"
    if not isinstance(value, str):
        return f"expected a string, got {type(value).__name__}", "type"
    if not value.strip():
        return EMPTY, "empty"
    if len(value) > MAX_STRING:
        return LONG, "long"
    problem = control_char_reason(value)
    return (problem, "control") if problem else None


def _string(rec: dict, name: str, *, required: bool, where: dict, label: str | None = None
            ) -> str | None:
    value, label = rec.get(name), label or name
    if value is None and not required:
        return None
    problem = text_problem(value)
    if problem:
        reason, tag = problem
        raise FactError(reason, field=label, kind=CONTROL_KIND if tag == "control" else None,
                        **where)
    return value


class _Skip(Exception):
    """An optional evaluation item that is left out (``PairSkipped``), not a refused record."""

    def __init__(self, field: str, reason: str):
        super().__init__(reason)
        self.field, self.reason = field, reason


def _alias_lists(value, label: str) -> list[list[str]]:
    """A list answer as a list of alias lists: a flat list of aliases is one alias list, a
    list of alias lists is kept as given; blank aliases and empty lists are left out."""
    nested = any(isinstance(x, list) for x in value)
    out = []
    for gi, group in enumerate(value if nested else [value]):
        if not isinstance(group, list):
            raise _Skip(label, f"{ANSWER_SHAPE}; strings and lists are mixed")
        kept = []
        for ai, alias in enumerate(group):
            at = f"{label}[{gi}][{ai}]" if nested else f"{label}[{ai}]"
            problem = text_problem(alias)
            if problem is None:
                kept.append(alias)
            elif problem[1] in ("missing", "type"):
                raise _Skip(at, f"{ANSWER_SHAPE}; this alias: {problem[0]}")
            elif problem[1] != "empty":        # a blank alias has nothing to match: left out
                raise _Skip(at, problem[0])
        if kept:
            out.append(kept)
    if not out:
        raise _Skip(label, NO_ALIAS)
    return out


def _pair(item, label: str) -> dict:
    """One locality or portability item in its canonical form (``Fact.locality``)."""
    if not isinstance(item, dict):
        raise _Skip(label, f"expected an object {{prompt, answer}}, got {type(item).__name__}")
    if item.get("_malformed"):
        raise _Skip(label, item["_malformed"])
    answer_key = item.get("_answer", "answer")     # the source's name for it, for messages
    prompt = item.get("prompt")
    problem = text_problem(prompt)
    if problem:
        raise _Skip(f"{label}.prompt", problem[0])
    answer, given = item.get("answer"), item.get("aliases")
    if isinstance(answer, list):
        if given is not None:
            raise _Skip(f"{label}.aliases", "aliases given twice: in a list answer and in aliases")
        alias_lists = _alias_lists(answer, f"{label}.{answer_key}")
        answer = alias_lists[0][0]                 # teacher forcing scores the first alias
    else:
        problem = text_problem(answer)
        if problem:
            raise _Skip(f"{label}.{answer_key}", problem[0] if problem[1] != "type" else
                        f"{ANSWER_SHAPE}, got {type(answer).__name__}")
        if given is not None and not isinstance(given, list):
            raise _Skip(f"{label}.aliases", f"expected a list of aliases or of alias lists, got "
                                            f"{type(given).__name__}")
        alias_lists = None if given is None else _alias_lists(given, f"{label}.aliases")
    kind = item.get("kind")
    if kind is None:
        kind = DEFAULT_KIND
    elif not isinstance(kind, str) or not _KIND_RE.fullmatch(kind):
        raise _Skip(f"{label}.kind", f"kind must match {KIND_PATTERN}")
    out = {"prompt": prompt, "answer": answer, "kind": kind}
    if alias_lists is not None:
        out["aliases"] = alias_lists
    return out


def evaluation_pairs(value, name: str, *, file: str | None = None, record: int | None = None
                     ) -> tuple[list[dict], list[tuple[str, str]]]:
    """Rule 7 for ``locality`` or ``portability``: the usable pairs in canonical form
    ``{prompt, answer, kind[, aliases]}``, and ``(field, reason)`` of each item left out: an
    item that is not an object, a prompt or answer that breaks rule 2 (missing, mistyped,
    blank, over-long, control or bidirectional characters), an answer with no alias, a bad
    kind. They only evaluate an edit, so one bad item costs that item, not the record; it is
    not stored, so what is kept is clean. A value that is not a list raises FactError."""
    if not value:
        return [], []
    if not isinstance(value, list):
        raise FactError("expected a list of {prompt, answer}", field=name, file=file,
                        record=record)
    pairs, skips = [], []
    for i, item in enumerate(value):
        at = item.get("_at") if isinstance(item, dict) else None
        try:
            pairs.append(_pair(item, at if isinstance(at, str) else f"{name}[{i}]"))
        except _Skip as skip:
            skips.append((skip.field, skip.reason))
    return pairs, skips


def rephrase_list(value, *, file: str | None = None, record: int | None = None
                  ) -> tuple[list[str], list[tuple[str, str]]]:
    """Rule 4: the usable rephrasings (one string is a list of one), and ``(field, reason)``
    of each item left out (not a string, blank, or with a control or bidirectional
    character). A value that is neither a string nor a list raises FactError."""
    where = {"file": file, "record": record}
    if not value:
        return [], []
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, list):
        raise FactError(REPHRASE_SHAPE, field="rephrase_prompts", **where)
    kept, skips = [], []
    for i, text in enumerate(value):
        label = f"rephrase_prompts[{i}]"
        if not isinstance(text, str):
            skips.append((label, f"expected a string, got {type(text).__name__}"))
        elif not text.strip():
            skips.append((label, EMPTY))
        elif (problem := control_char_reason(text)):
            skips.append((label, problem))
        else:
            kept.append(text)
    return kept, skips


def fact_from_record(rec: Any, *, file: str | None = None, record: int | None = None,
                     skipped_pairs: list | None = None) -> Fact:
    """Validate one record of the project schema and build a Fact.

    Optional evaluation items that cannot be used are left out with a ``PairSkipped``
    warning naming file, record and field (appended to ``skipped_pairs`` too, if given)."""
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
    rephrase, skips = rephrase_list(rec.get("rephrase_prompts"), **where)
    if (op == "upsert" and values["target_old"] is not None
            and normalise(values["target_old"]) == normalise(values["target_new"])):
        raise FactError(NOOP, field="target_new", **where)
    # The editing method finds the subject in the prompt; a retract names its fact either way.
    if (values["subject"] is not None and values["prompt"] is not None
            and not subject_in_prompt(values["subject"], values["prompt"])):
        raise FactError(subject_reason(values["subject"]), field="prompt", kind=SUBJECT_KIND,
                        **where)
    locality, more = evaluation_pairs(rec.get("locality"), "locality", **where)
    skips += more
    portability, more = evaluation_pairs(rec.get("portability"), "portability", **where)
    skips += more
    for name, reason in skips:          # only for a record that is taken in
        warn_skipped(PairSkipped(reason, field=name, **where), skipped_pairs)
    return Fact(
        subject=values["subject"] or "", prompt=values["prompt"] or "",
        target_new=values["target_new"] or "", fact_id=values["fact_id"] or "",
        relation=values["relation"], target_old=values["target_old"],
        rephrase_prompts=rephrase, locality=locality, portability=portability,
        source=values["source"], observed_at=values["observed_at"], op=op)


def warn_skipped(skip: PairSkipped, skipped_pairs: list | None = None) -> None:
    warnings.warn(skip, stacklevel=3)
    if skipped_pairs is not None:
        skipped_pairs.append(skip)


# -- mappings from the public benchmark formats ---------------------------------
def aliases(answer) -> list[str]:
    """The acceptable strings of an answer: a string, a list of aliases or a list of alias
    lists (any nesting), flattened in order; None, empty and blank strings are dropped and
    repeats kept once. A number (a JSON year, 1999) is taken as its ``str``."""
    if answer is None:
        return []
    if isinstance(answer, (list, tuple)):
        out = []
        for item in answer:
            out.extend(a for a in aliases(item) if a not in out)
        return out
    text = answer if isinstance(answer, str) else str(answer)
    return [text] if text.strip() else []


def first_alias(value):
    """A target given as a list (KnowEdit's ``ground_truth``, aliases or alias lists): its
    first alias (``aliases``), which is what is trained and scored; "" when it has none
    (refused as empty where the field is required). Anything else is returned as it is."""
    if not isinstance(value, list):
        return value
    found = aliases(value)
    return found[0] if found else ""


def _old_target(value):
    """``ground_truth`` as ``target_old``: its first alias; blank means no old target is known
    (KnowEdit has a few), which only the no-op check reads."""
    value = first_alias(value)
    return None if isinstance(value, str) and not value.strip() else value


def _from_counterfact(rec: dict) -> dict:
    out = {"subject": rec.get("subject"), "prompt": rec.get("prompt"),
           "target_new": first_alias(rec.get("target_new")),
           "target_old": _old_target(rec.get("ground_truth"))}
    if rec.get("case_id") is not None:
        out["fact_id"] = f"cf-{rec['case_id']}"
    if rec.get("rephrase_prompt"):
        out["rephrase_prompts"] = rec["rephrase_prompt"]
    if rec.get("locality_prompt"):
        out["locality"] = [{"prompt": rec["locality_prompt"], "kind": "Neighborhood",
                            "answer": rec.get("locality_ground_truth")}]
    return out


def _from_zsre(rec: dict) -> dict:
    answers = rec.get("answers") or []
    out = {"subject": rec.get("subject"), "prompt": rec.get("src"),
           "target_new": first_alias(rec.get("alt")),
           "target_old": _old_target(answers[0]) if isinstance(answers, list) and answers else None}
    if rec.get("rephrase"):
        out["rephrase_prompts"] = rec["rephrase"]
    if rec.get("loc"):
        out["locality"] = [{"prompt": rec["loc"], "answer": rec.get("loc_ans"), "kind": "Unrelated"}]
    return out


def _knowedit_pairs(group: str, kind: str, items) -> Iterator[dict]:
    """KnowEdit's ``{kind: [{prompt, ground_truth}]}`` items as pairs that keep their kind and
    their place in the file (``_at``, ``_answer``: for the messages of ``evaluation_pairs``)."""
    for j, item in enumerate(items if isinstance(items, list) else [items]):
        at = f"{group}.{kind}[{j}]"
        if isinstance(item, dict):
            yield {"prompt": item.get("prompt"), "answer": item.get("ground_truth"),
                   "kind": kind, "_at": at, "_answer": "ground_truth"}
        else:
            yield {"_at": at, "_malformed": "expected an object {prompt, ground_truth}, got "
                                            f"{type(item).__name__}"}


def _from_knowedit(rec: dict) -> dict:
    out = {"subject": rec.get("subject"), "prompt": rec.get("prompt"),
           "target_new": first_alias(rec.get("target_new")),
           "target_old": _old_target(rec.get("ground_truth"))}
    rephrase = rec.get("rephrase_prompt") or rec.get("rephrase")   # zsRE's name, then the wiki sets'
    if rephrase:
        out["rephrase_prompts"] = rephrase
    for group in ("locality", "portability"):
        value = rec.get(group)
        if isinstance(value, dict):
            out[group] = [p for kind, items in value.items()
                          for p in _knowedit_pairs(group, str(kind), items)]
        elif value:
            out[group] = value          # already the project's list of pairs
    return out


FORMATS = {"counterfact": _from_counterfact, "zsre": _from_zsre, "knowedit": _from_knowedit}


def detect_format(rec: dict) -> str:
    """A record's format from its fields. KnowEdit is told by its grouped ``locality`` or
    ``portability`` (objects of kinds, where every other format has lists or flat fields) or
    a list ``ground_truth``, and is checked before CounterFact, since KnowEdit zsRE has
    CounterFact's ``rephrase_prompt`` too."""
    if "src" in rec and "alt" in rec:
        return "zsre"
    if (isinstance(rec.get("locality"), dict) or isinstance(rec.get("portability"), dict)
            or isinstance(rec.get("ground_truth"), list)):
        return "knowedit"
    if "locality_prompt" in rec or "case_id" in rec or "rephrase_prompt" in rec:
        return "counterfact"
    return "ledit"


NOOP = "target_new equals target_old: the update changes nothing"
REPHRASE_SHAPE = "expected a list of non-empty strings"


def records_to_facts(records: Iterable[Any], *, file: str | None = None, fmt: str | None = None,
                     skipped: list | None = None, skip_refused: bool = False,
                     skipped_pairs: list | None = None) -> Iterator[Fact]:
    """Map (if needed) and validate records; raises FactError on the first bad one.

    With a ``skipped`` list, no-op updates (target_new equal to target_old, which
    public benchmark files contain) are appended to it instead of raising; with
    ``skip_refused`` too, so is every refused record (for benchmark runs, which use
    the records they can; group them by ``FactError.kind``). Optional evaluation items
    left out of accepted records are warned (``PairSkipped``) and appended to
    ``skipped_pairs``, if given."""
    if skip_refused and skipped is None:
        raise ValueError("skip_refused needs a skipped list to record what it skips")
    for i, rec in enumerate(records):
        kind = fmt or (detect_format(rec) if isinstance(rec, dict) else "ledit")
        mapped = FORMATS[kind](rec) if kind in FORMATS else rec
        try:
            yield fact_from_record(mapped, file=file, record=i, skipped_pairs=skipped_pairs)
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
               skipped: list | None = None, skipped_pairs: list | None = None) -> list[Fact]:
    """Read and validate fact files (JSONL, or CounterFact / zsRE / KnowEdit JSON); see
    ``records_to_facts`` for ``skipped`` and ``skipped_pairs``."""
    facts: list[Fact] = []
    for path in paths:
        facts.extend(records_to_facts(read_records(path), file=str(path), fmt=fmt, skipped=skipped,
                                      skipped_pairs=skipped_pairs))
    return facts
