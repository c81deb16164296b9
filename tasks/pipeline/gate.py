"""The promotion gate: a candidate adapter set replaces production only if every check holds.

The thresholds are the ``gate`` section of params.yaml (``tasks.settings.GateSettings``).
A metric that could not be measured (no new upsert, no previously live fact, no locality
prompt, no chat template) is reported as not measured, with why, and does not block; every
other check compares one number against one threshold. The checks on what users see
(relation specificity, the standing suite, chat success, repetition) need nothing from the
facts: ``tasks.pipeline.probing`` measures them every night.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field

from tasks.settings import GateConfigError, GateSettings, ProbeSettings, load_settings

__all__ = ["CHECKS", "GATE_METRICS", "Check", "GateConfigError", "Verdict", "gate", "markdown",
           "open_thresholds", "pending_reason"]

# metric -> (threshold key in params.yaml ``gate``, comparison, what it means)
CHECKS = {
    "reliability": ("min_reliability", ">=", "new edits: accuracy of the new answer after the prompt"),
    "generality": ("min_generality", ">=", "new edits: the same on rephrased prompts"),
    "retention": ("min_retention", ">=", "previously live edits: reliability on the candidate"),
    "locality": ("min_locality", ">=", "the facts' locality prompts: answers unchanged against the base"),
    "drift": ("max_drift", "<=", "relative perplexity increase on unrelated text"),
    "relation_specificity": ("min_relation_specificity", ">=",
                             "new edits' subjects asked about their other relations: answers unchanged"),
    "standing_locality": ("min_standing_locality", ">=",
                          "the standing suite, plain and chat: generations unchanged against the base"),
    "chat_success": ("min_chat_success", ">=",
                     "new edits asked through the chat template: the answer holds the new target"),
    "repetition_excess": ("max_repetition_excess", "<=",
                          "new edits' generations with a repeated 3-gram, minus the base's share"),
}
GATE_METRICS = tuple(CHECKS)
FACT_THRESHOLDS = ("fact_min_reliability", "fact_min_generality", "fact_min_relation_specificity")


@dataclass
class Check:
    metric: str
    value: float | None
    threshold: float
    op: str
    passed: bool
    note: str | None = None     # why it was not measured

    def describe(self) -> str:
        if self.value is None:
            return f"{self.metric}: not measured" + (f" ({self.note})" if self.note else "")
        return f"{self.metric} {self.value:.3f} (needs {self.op} {self.threshold:g})"


@dataclass
class Verdict:
    passed: bool
    checks: list[Check] = field(default_factory=list)
    reasons: list[str] = field(default_factory=list)          # one line per failed check
    fact_reasons: dict[str, str] = field(default_factory=dict)  # fact_id -> why that fact failed

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "Verdict":
        return cls(d["passed"], [Check(**c) for c in d.get("checks", [])], list(d.get("reasons", [])),
                   dict(d.get("fact_reasons", {})))


def open_thresholds(probes: ProbeSettings | None = None) -> GateSettings:
    """``gate`` settings whose thresholds pass every candidate: for runs that test the
    pipeline's mechanics on a model too small to learn (tests, bench/robustness.py).
    ``probes`` are params.yaml's unless given; ``.thresholds()`` gives the open values
    as a mapping for ``Settings.override``."""
    open_values = {key: (0.0 if op == ">=" else 1e9) for key, op, _ in CHECKS.values()}
    open_values.update({key: 0.0 for key in FACT_THRESHOLDS})
    return GateSettings(**open_values, probes=probes or load_settings().gate.probes)


def gate(metrics: dict, per_fact: list[dict], gate_settings: GateSettings,
         notes: dict | None = None) -> Verdict:
    """Judge a candidate from its evaluation (``metrics``: the means; ``per_fact``: rows with
    ``fact_id``, ``kind`` ('new' or 'retained'), ``reliability``, ``generality`` and, for new
    edits, ``relation_specificity`` and ``changed_answers``; ``notes``: why a metric is None)."""
    t = gate_settings.thresholds()
    notes = notes or {}
    checks, reasons = [], []
    for metric, (key, op, meaning) in CHECKS.items():
        value = metrics.get(metric)
        passed = value is None or (value >= t[key] if op == ">=" else value <= t[key])
        check = Check(metric, None if value is None else float(value), t[key], op, passed,
                      notes.get(metric) if value is None else None)
        checks.append(check)
        if not passed:
            reasons.append(f"{check.describe()} ({meaning})")
    fact_reasons = {row["fact_id"]: why for row in per_fact if (why := _fact_reason(row, t))}
    return Verdict(not reasons, checks, reasons, fact_reasons)


def _fact_reason(row: dict, t: dict) -> str:
    """Why one fact falls below a per-fact bar ('' when it does not)."""
    why = []
    rel, gen = row.get("reliability"), row.get("generality")
    spec = row.get("relation_specificity")
    kind = "new edit" if row.get("kind") == "new" else "previously live edit"
    if rel is not None and rel < t["fact_min_reliability"]:
        why.append(f"{kind} reliability {rel:.2f} < {t['fact_min_reliability']:g}")
    if row.get("kind") == "new" and gen is not None and gen < t["fact_min_generality"]:
        why.append(f"generality {gen:.2f} < {t['fact_min_generality']:g}")
    if row.get("kind") == "new" and spec is not None and spec < t["fact_min_relation_specificity"]:
        why.append(f"damaged its subject: relation specificity {spec:.2f} < "
                   f"{t['fact_min_relation_specificity']:g}"
                   + (f" ({row['changed_answers']})" if row.get("changed_answers") else ""))
    return "; ".join(why)


def pending_reason(fact_id: str, verdict: Verdict, version: str, dry_run: bool = False) -> str:
    """Why a fact of a rejected candidate stays pending: its own failure, else the gate's."""
    if dry_run:
        return f"dry run of {version}: not promoted"
    own = verdict.fact_reasons.get(fact_id)
    if own:
        return f"{version} rejected; this fact: {own}"
    return f"{version} rejected by the gate: " + "; ".join(verdict.reasons)


def markdown(verdict: Verdict, version: str) -> str:
    """The gate's table for the Prefect UI and the run summary."""
    head = f"### Gate for {version}: {'**passed**' if verdict.passed else '**rejected**'}\n\n"
    rows = ["| check | value | threshold | result |", "|---|---|---|---|"]
    for c in verdict.checks:
        value = f"{c.value:.3f}" if c.value is not None else (
            f"not measured: {c.note}" if c.note else "not measured")
        rows.append(f"| {c.metric} | {value} | {c.op} {c.threshold:g} | "
                    f"{'pass' if c.passed else '**fail**'} |")
    out = head + "\n".join(rows) + "\n"
    if verdict.reasons:
        out += "\n**Why it was rejected**\n\n" + "\n".join(f"- {r}" for r in verdict.reasons) + "\n"
    if verdict.fact_reasons:
        out += "\n**Facts below a per-fact bar**\n\n" + "\n".join(
            f"- `{fid}`: {why}" for fid, why in sorted(verdict.fact_reasons.items())) + "\n"
    return out
