"""The engine commands' work (``ledit edit / eval / generate``) as plain functions, so that
tests and notebooks call them without click. Each takes the model from ``--model``, else
from the adapter set it extends or attaches, else from params.yaml."""
from __future__ import annotations

from contextlib import nullcontext
from pathlib import Path
from typing import TYPE_CHECKING

from editing import AdapterSet, edit, load_facts, load_model
from editing.evaluate import evaluate_facts
from editing.metrics import greedy

if TYPE_CHECKING:
    from tasks.settings import Settings


def read_facts(fact_paths: list[str], warn=print, retracts: bool = False) -> list:
    """Facts to edit (and, with ``retracts``, to retract), with no-op updates skipped and named."""
    skipped: list = []
    facts = [f for f in load_facts(fact_paths, skipped=skipped) if retracts or f.op == "upsert"]
    for exc in skipped:
        warn(f"skipped: {exc}")
    return facts


def _model(settings: Settings | None, model_name: str | None, adapter_set: AdapterSet | None = None):
    """``(model, tokenizer)``: ``model_name``, else the adapter set's base model, else params.yaml's,
    at params.yaml's dtype."""
    if settings is None:
        from tasks.settings import load_settings
        settings = load_settings()
    name = model_name or (adapter_set.base_model if adapter_set else None)
    return load_model(settings.model.override({"name": name}) if name else settings.model)


def train_adapter_set(settings: Settings, fact_paths: list[str], out: str | Path, *,
                      model_name: str | None = None, method: str | None = None,
                      base_adapter: str | Path | None = None, progress: bool = True) -> AdapterSet:
    """Read facts, train one block (on top of ``base_adapter`` if given), save atomically."""
    config = settings.edit.override({"method": method}) if method else settings.edit
    facts = read_facts(fact_paths, retracts=True)
    base = AdapterSet.load(base_adapter) if base_adapter else None
    model, tokenizer = _model(settings, model_name)
    adapter_set = edit(model, tokenizer, facts, config, base=base, progress=progress)
    adapter_set.save(out)
    return adapter_set


def evaluate_adapter_set(settings: Settings, adapter_dir: str | Path | None, fact_paths: list[str], *,
                         model_name: str | None = None) -> dict:
    """Every metric of ``fact_paths`` on the base model with the adapter set attached."""
    adapter_set = AdapterSet.load(adapter_dir) if adapter_dir else None
    model, tokenizer = _model(settings, model_name, adapter_set)
    facts = read_facts(fact_paths)
    return evaluate_facts(model, tokenizer, facts, attach=adapter_set.attach if adapter_set else None,
                          fluency_tokens=settings.eval.fluency_tokens)


def generate_with_adapter_set(adapter_dir: str | Path | None, prompts: list[str], *,
                              model_name: str | None = None, max_new_tokens: int = 24,
                              model_and_tokenizer=None, settings: Settings | None = None) -> list[str]:
    """Greedy continuations of ``prompts`` by the edited model (``model_and_tokenizer``: the base
    already loaded; ``settings``: params.yaml when None)."""
    adapter_set = AdapterSet.load(adapter_dir) if adapter_dir else None
    model, tokenizer = model_and_tokenizer or _model(settings, model_name, adapter_set)
    with adapter_set.attach(model) if adapter_set else nullcontext():
        return [tokenizer.decode(g, skip_special_tokens=True)
                for g in greedy(model, tokenizer, prompts, max_new_tokens)]
