"""Why did the model say that: the edits whose bases opened on an input.

Every BaFT basis has a gate (baft.py), and every basis belongs to one fact (``Block.owner``),
so the gates that opened while the model read a prompt and wrote its answer name the facts
behind that answer. Weight-editing methods (ROME, MEMIT, LoRA) have no such record, and
neither has ReFT: its bases have no gates and act on every input.

A fact *fired* when one of its bases reached ``threshold`` (params.yaml ``audit.fired_weight``,
0.5: the basis wrote at least half of its edit) at some position of the prompt or of the generated answer. Its
``weight`` is the strongest weight any of its bases reached, on any edit layer; ``token`` and
``position`` say where the gate first opened that far, and ``phase`` whether that was in the
prompt or in the answer. The weights are the gate layer's causally pooled ones, which is what
the content hooks apply (a question gate, where a block has one, is not included).
"""
from __future__ import annotations

from dataclasses import asdict, dataclass

import torch

from .adapters import AdapterError, AdapterSet
from .metrics import greedy

@dataclass
class Firing:
    fact_id: str
    subject: str | None
    target_new: str | None
    weight: float          # the strongest basis weight of the fact, anywhere in the text
    position: int          # token index where it first reached the threshold
    token: str             # that token
    phase: str             # "prompt" or "answer"
    block_id: str

    def to_dict(self) -> dict:
        return asdict(self)


def basis_facts(adapter_set: AdapterSet, layer: int) -> list[tuple[int, int]]:
    """(block index, fact index in the block) of every stacked basis at ``layer``, in the
    order ``AdapterSet.interventions`` stacks them."""
    out = []
    for bi, block in enumerate(adapter_set.blocks):
        if layer not in block.interventions:
            continue
        rank = block.interventions[layer].rank
        owner = block.owner.tolist() if block.owner is not None else [0] * rank
        if len(owner) != rank:
            raise AdapterError(f"block {block.block_id}: {len(owner)} basis owners for {rank} bases")
        out += [(bi, o) for o in owner]
    return out


def _require_gates(adapter_set: AdapterSet) -> None:
    if adapter_set.method != "baft":
        raise AdapterError(f"a {adapter_set.method} adapter set has no gates: every one of its edits "
                           "acts on every input, so no answer can be traced to particular facts")


def _strongest(adapter_set: AdapterSet, weights: dict[int, torch.Tensor],
               threshold: float) -> dict[tuple[int, int], tuple[float, int]]:
    """(block, fact) -> (strongest weight, first position at ``threshold``) of every fact that
    fired, from one sequence's gate weights per layer ((T, rank), pooled: non-decreasing in T)."""
    best: dict[tuple[int, int], tuple[float, int]] = {}
    for layer, w in weights.items():
        peak = w.max(0).values
        for basis, key in enumerate(basis_facts(adapter_set, layer)):
            if peak[basis] < threshold:
                continue
            first = int((w[:, basis] >= threshold).nonzero()[0])
            weight, pos = best.get(key, (0.0, first))
            best[key] = (max(weight, float(peak[basis])), min(pos, first))
    return best


@torch.no_grad()
def fired_facts(model, adapter_set: AdapterSet, sequences: list[list[int]], threshold: float) -> list[list[str]]:
    """For each token sequence (a prompt and the answer given to it), the ids of the facts that
    fired on it, strongest first: ``explain``'s rule, for many texts in one right-padded pass
    (the gates pool causally, so a row's padding never reaches its own positions)."""
    _require_gates(adapter_set)
    if not sequences:
        return []
    device = next(model.parameters()).device
    width = max(len(s) for s in sequences)
    ids = torch.tensor([s + [0] * (width - len(s)) for s in sequences], device=device)
    mask = torch.tensor([[1] * len(s) + [0] * (width - len(s)) for s in sequences], device=device)
    with adapter_set.attach(model) as handle:
        model(input_ids=ids, attention_mask=mask, use_cache=False)
        weights = {L: state.weights.float().cpu() for L, state in handle.states.items()}
    out = []
    for row, seq in enumerate(sequences):
        best = _strongest(adapter_set, {L: w[row, :len(seq)] for L, w in weights.items()}, threshold)
        ranked = sorted(best.items(), key=lambda kv: -kv[1][0])
        out.append(list(dict.fromkeys(adapter_set.blocks[bi].fact_ids[fi] for (bi, fi), _ in ranked)))
    return out


@torch.no_grad()
def explain(model, tokenizer, adapter_set: AdapterSet, prompt: str, max_new_tokens: int,
            threshold: float) -> dict:
    """The edited model's greedy answer to ``prompt`` and every fact that fired on it.

    Returns ``{"prompt", "answer", "threshold", "firings": [Firing dict, strongest first]}``;
    ``firings`` is empty when no edit touched the input."""
    _require_gates(adapter_set)
    with adapter_set.attach(model) as handle:
        answer_ids = greedy(model, tokenizer, [prompt], max_new_tokens)[0]
        prompt_ids = tokenizer(prompt)["input_ids"]
        ids = torch.tensor([prompt_ids + answer_ids], device=next(model.parameters()).device)
        model(input_ids=ids, attention_mask=torch.ones_like(ids), use_cache=False)  # one pass: the gates' record
        weights = {L: state.weights[0].float().cpu() for L, state in handle.states.items()}
    best = _strongest(adapter_set, weights, threshold)
    all_ids = prompt_ids + answer_ids
    firings = []
    for (bi, fi), (weight, pos) in best.items():
        block = adapter_set.blocks[bi]
        record = block.records[fi] if fi < len(block.records) else {}
        firings.append(Firing(
            fact_id=block.fact_ids[fi], subject=record.get("subject"), target_new=record.get("target_new"),
            weight=round(weight, 4), position=pos, token=tokenizer.decode([all_ids[pos]]),
            phase="prompt" if pos < len(prompt_ids) else "answer", block_id=block.block_id))
    firings.sort(key=lambda f: -f.weight)
    return {"prompt": prompt, "answer": tokenizer.decode(answer_ids, skip_special_tokens=True),
            "threshold": threshold, "firings": [f.to_dict() for f in firings]}
