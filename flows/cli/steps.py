"""Plain functions behind ``ledit edit / eval / generate`` and the train/evaluate steps."""
from __future__ import annotations

from pathlib import Path

from editing import AdapterSet, edit, load_facts, load_model, load_params
from editing.evaluate import evaluate_facts
from editing.metrics import greedy


def read_facts(fact_paths: list[str], warn=print, retracts: bool = False) -> list:
    """Facts to edit (and, with ``retracts``, to retract), with no-op updates skipped and named."""
    skipped: list = []
    facts = [f for f in load_facts(fact_paths, skipped=skipped) if retracts or f.op == "upsert"]
    for exc in skipped:
        warn(f"skipped: {exc}")
    return facts


def train_adapter_set(fact_paths: list[str], out: str | Path, *, model_name: str | None = None,
                      method: str | None = None, base_adapter: str | Path | None = None,
                      params: dict | None = None, progress: bool = True, model_and_tokenizer=None,
                      **block_meta) -> AdapterSet:
    """Read facts, train one block (on top of ``base_adapter`` if given), save atomically."""
    params = params or load_params()
    edit_params = dict(params["edit"])
    if method:
        edit_params["method"] = method
    facts = read_facts(fact_paths, retracts=True)
    base = AdapterSet.load(base_adapter) if base_adapter else None
    model, tokenizer = model_and_tokenizer or load_model(model_name or params["model"]["name"],
                                                         dtype=params["model"]["dtype"])
    adapter_set = edit(model, tokenizer, facts, edit_params, base=base, progress=progress, **block_meta)
    adapter_set.save(out)
    return adapter_set


def evaluate_adapter_set(adapter_dir: str | Path | None, fact_paths: list[str], *,
                         model_name: str | None = None, params: dict | None = None,
                         model_and_tokenizer=None) -> dict:
    """Every metric of ``fact_paths`` on the base model with the adapter set attached."""
    params = params or load_params()
    adapter_set = AdapterSet.load(adapter_dir) if adapter_dir else None
    name = model_name or (adapter_set.base_model if adapter_set else None) or params["model"]["name"]
    model, tokenizer = model_and_tokenizer or load_model(name, dtype=params["model"]["dtype"])
    facts = read_facts(fact_paths)
    return evaluate_facts(model, tokenizer, facts, attach=adapter_set.attach if adapter_set else None,
                          fluency_tokens=params["eval"]["fluency_tokens"])


def generate_with_adapter_set(adapter_dir: str | Path | None, prompts: list[str], *,
                              model_name: str | None = None, max_new_tokens: int = 24,
                              model_and_tokenizer=None) -> list[str]:
    """Greedy continuations of ``prompts`` by the edited model."""
    adapter_set = AdapterSet.load(adapter_dir) if adapter_dir else None
    params = load_params()
    name = model_name or (adapter_set.base_model if adapter_set else None) or params["model"]["name"]
    model, tokenizer = model_and_tokenizer or load_model(name, dtype=params["model"]["dtype"])
    handle = adapter_set.attach(model) if adapter_set else None
    try:
        return [tokenizer.decode(g, skip_special_tokens=True)
                for g in greedy(model, tokenizer, prompts, max_new_tokens)]
    finally:
        if handle:
            handle.remove()
