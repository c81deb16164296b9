"""Editing facts into an adapter set: the one call the CLI and the pipeline use.

One call applies one batch of fact updates, in arrival order:
- within the batch, a later update of the same fact (same ``fact_id``, or same
  normalised subject and prompt) replaces an earlier one;
- ``op: retract`` removes the fact's live edit (unknown facts raise
  ``UnknownFactError``, and nothing changes);
- an upsert of a live fact supersedes it: its old bases are removed before the
  new block is trained, so the old target no longer comes out;
- the remaining upserts become one new block, trained with the rest of the set
  attached and frozen (the incremental form of BaFT's load balancing: new edits
  take fresh bases, old bases are kept as they are).
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Mapping

import torch

from .adapters import AdapterError, AdapterSet, Block, UnknownFactError, record_of
from .config import EditConfig, as_edit_config
from .facts import Fact
from .lora import train_lora
from .trainer import TrainReport, train_block


def newest_per_fact(facts: list[Fact]) -> list[Fact]:
    """The last update of each fact, in the order of those last updates."""
    slot_of: dict[str, int] = {}
    slots: list[Fact | None] = []
    for f in facts:
        names = [f"id:{f.fact_id}"] + ([f"key:{f.key}"] if f.key else [])
        for old in {slot_of[n] for n in names if n in slot_of}:
            slots[old] = None
        slot_of.update({n: len(slots) for n in names})
        slots.append(f)
    return [f for f in slots if f is not None]


def edit(model, tokenizer, facts: list[Fact], config: EditConfig | Mapping | None = None,
         base: AdapterSet | None = None, progress: bool = True, **block_meta) -> AdapterSet:
    """Apply a batch of fact updates and return the new adapter set.

    ``config`` is the ``edit`` section (an ``EditConfig``, or a mapping read as one; None:
    params.yaml's). ``base`` (the set in production) is extended, not modified. The returned
    set's ``changes`` says what was added, superseded and retracted, and the new block's id
    (None if the batch held only retracts). ``block_meta`` (``training_run``,
    ``data_version``) is recorded on the new block.
    """
    config = as_edit_config(config)
    if not facts:
        raise ValueError("no facts to edit")
    if base is not None:
        base.check_base(model)
        if base.method != config.method:
            raise AdapterError(f"cannot extend a {base.method} adapter set with {config.method}")
        current = base.copy()
    else:
        current = AdapterSet.for_model(model, config.method)
    plan = resolve(current, facts)
    upserts, current, changes = plan.upserts, plan.remaining, plan.changes()
    if not upserts:
        current.changes = changes
        return current
    parts, report = TRAINERS[config.method](model, tokenizer, upserts, config, current, progress)
    stats = {"steps": report.steps, "seconds": round(report.seconds, 3),
             "final_loss": report.final_loss, "stopped_early": report.stopped_early}
    block = Block(fact_ids=[f.fact_id for f in upserts], records=[record_of(f) for f in upserts],
                  stats=stats, **parts, **block_meta)
    current.add_block(block)
    current.changes = dict(changes, block_id=block.block_id)
    return current


def _interventions(model, tokenizer, facts: list[Fact], config: EditConfig, current: AdapterSet,
                   progress: bool) -> tuple[dict, TrainReport]:
    """BaFT and ReFT: a block of bases trained beside the set's, which stay frozen."""
    weights, report = train_block(model, tokenizer, facts, config, existing=current.interventions() or None,
                                  progress=progress, earlier=current.facts())
    per = next(iter(weights.values())).rank // len(facts)
    return {"interventions": weights, "owner": torch.arange(len(facts)).repeat_interleave(per)}, report


def _lora(model, tokenizer, facts: list[Fact], config: EditConfig, current: AdapterSet,
          progress: bool) -> tuple[dict, TrainReport]:
    """The LoRA baseline trains on top of the set's earlier LoRA blocks, attached."""
    with current.attach(model) if current.blocks else contextlib.nullcontext():
        weights, report = train_lora(model, tokenizer, facts, config, progress=progress)
    return {"lora": weights}, report


# The one place a method's name picks its trainer: (model, tokenizer, facts, config, current
# set, progress) -> (the new Block's weights as keyword arguments, TrainReport).
TRAINERS = {"baft": _interventions, "reft": _interventions, "lora": _lora}


@dataclass
class Resolution:
    """What a batch does to an adapter set before anything is trained."""
    upserts: list[Fact]             # the newest update of each fact, to train
    retracted: list[str]            # fact ids of the set that retracts remove
    superseded: list[str]           # fact ids of the set that newer updates replace
    remaining: AdapterSet | None    # the set without both

    def changes(self, block_id: str | None = None) -> dict:
        return {"added": [f.fact_id for f in self.upserts], "superseded": self.superseded,
                "retracted": self.retracted, "block_id": block_id}


def resolve(current: AdapterSet | None, facts: list[Fact]) -> Resolution:
    """The one retract/supersede rule. The newest update of each fact wins; a retract must
    name a fact of ``current`` or one this batch upserted earlier, else ``UnknownFactError``."""
    batch = newest_per_fact(facts)
    retracts = [f for f in batch if f.op == "retract"]
    upserts = [f for f in batch if f.op != "retract"]
    # A retract of a fact this batch also upserted earlier is already handled by newest_per_fact.
    earlier = {f.fact_id for f in facts if f.op != "retract"} | {f.key for f in facts if f.op != "retract"}
    found = (lambda f: bool(current.locate(f))) if current is not None else (lambda f: False)
    unknown = [f.fact_id for f in retracts if not found(f) and f.fact_id not in earlier and f.key not in earlier]
    if unknown:
        raise UnknownFactError(unknown)
    if current is None:
        return Resolution(upserts, [], [], None)
    retracted = [f for f in retracts if found(f)]
    superseded = [current.blocks[bi].fact_ids[fi] for f in upserts for bi, fi in current.locate(f)]
    return Resolution(upserts, [f.fact_id for f in retracted], superseded,
                      current.retract(retracted + superseded))
