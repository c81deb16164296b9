"""Editing facts into an adapter set: the one call the CLI and the pipeline use."""
from __future__ import annotations

import torch

from .adapters import AdapterError, AdapterSet, Block
from .facts import Fact
from .trainer import train_block


def edit(model, tokenizer, facts: list[Fact], params: dict, base: AdapterSet | None = None,
         progress: bool = True, **block_meta) -> AdapterSet:
    """Train one block for ``facts`` and return the adapter set that holds it.

    ``params`` is the ``edit`` section of params.yaml. With ``base``, the new
    block is trained with ``base`` attached and appended to a copy of it.
    """
    method = params["method"]
    if not facts:
        raise ValueError("no facts to edit")
    if base is not None:
        base.check_base(model)
        if base.method != method:
            raise AdapterError(f"cannot extend a {base.method} adapter set with {method}")
        out = AdapterSet(base.base_model, base.base_fingerprint, method, list(base.blocks))
        existing = base.interventions() if method != "lora" else None
    else:
        out = AdapterSet.for_model(model, method)
        existing = None
    weights, report = train_block(model, tokenizer, facts, params, existing=existing, progress=progress)
    stats = {"steps": report.steps, "seconds": round(report.seconds, 3),
             "final_loss": report.final_loss, "stopped_early": report.stopped_early}
    block = Block(fact_ids=[f.fact_id for f in facts], stats=stats, **block_meta)
    if method == "lora":
        block.lora = weights
    else:
        block.interventions = weights
        per = next(iter(weights.values())).rank // len(facts)
        block.owner = torch.arange(len(facts)).repeat_interleave(per)
    out.add_block(block)
    return out
