"""The edited model as an MLflow pyfunc answering ``{"prompt": ...}`` rows with greedy
continuations. The pipeline logs it as ``pyfunc`` in each candidate's run, next to the chat
model (``chat.py``, ``chat``) that is the registry version's source and so what
``mlflow models serve -m models:/baft-adapter-set@production`` serves.

The logged model holds the adapter set as an artifact and names the base model in its
``model_config`` (or bundles its directory, ``bundle_model=True``). It is logged as
"models from code" (``serving_entry.py``), so loading it unpickles nothing; the adapter
set's checksum and base-model fingerprint are checked when the server loads it. MLflow
copies the entry file into every version: those logged before the move to
``tasks/pipeline/`` import ``tasks.serving``, kept as a shim for them.
"""
from __future__ import annotations

import threading
from importlib.metadata import version
from pathlib import Path

import mlflow
import pandas as pd

ENTRY = Path(__file__).with_name("serving_entry.py")
DEFAULT_MAX_NEW_TOKENS = 24


class AdapterSetModel(mlflow.pyfunc.PythonModel):
    """Greedy continuations of prompts by the base model with the adapter set attached."""

    def load_context(self, context):
        config = context.model_config or {}
        self.adapter_set, self.model, self.tokenizer = load_served(context)
        # Attached for the server's life (not ``with``): every predict call uses the edited
        # model; attach refuses another base model.
        self.handle = self.adapter_set.attach(self.model)
        self.max_new_tokens = int(config.get("max_new_tokens", DEFAULT_MAX_NEW_TOKENS))
        self.lock = threading.Lock()                          # the hooks keep per-call gate state

    def predict(self, context, model_input, params=None):
        from editing.metrics import greedy

        rows = _rows(model_input)
        default = int((params or {}).get("max_new_tokens", self.max_new_tokens))
        out = [""] * len(rows)
        by_len: dict[int, list[int]] = {}
        for i, row in enumerate(rows):
            n = row.get("max_new_tokens")
            by_len.setdefault(default if n is None or pd.isna(n) else int(n), []).append(i)
        with self.lock:
            for n, idx in by_len.items():
                gens = greedy(self.model, self.tokenizer, [rows[i]["prompt"] for i in idx], n)
                for i, g in zip(idx, gens):
                    out[i] = self.tokenizer.decode(g, skip_special_tokens=True)
        return out


def load_served(context):
    """``(adapter set, model, tokenizer)`` of a logged serving model: the adapter set first, so a
    corrupted file is refused before the model loads; the base named by the artifact (bundled),
    else by ``model_config``, else by the set itself."""
    from editing import AdapterSet, load_model
    from editing.config import ModelConfig

    config = context.model_config or {}
    adapter_set = AdapterSet.load(context.artifacts["adapter_set"])
    name = context.artifacts.get("base_model") or config.get("base_model") or adapter_set.base_model
    threads = int((config.get("serving") or {}).get("threads", 0))       # the chat model's ServingSettings
    model, tokenizer = load_model(ModelConfig(str(name), config.get("dtype", ModelConfig.dtype), threads))
    return adapter_set, model, tokenizer


def _rows(model_input) -> list[dict]:
    """DataFrame, dict of columns, list of records or of prompts, or one prompt."""
    if isinstance(model_input, pd.DataFrame):
        rows = model_input.to_dict("records")
    elif isinstance(model_input, str):
        rows = [{"prompt": model_input}]
    elif isinstance(model_input, dict):
        rows = pd.DataFrame(model_input if isinstance(model_input["prompt"], list)
                            else [model_input]).to_dict("records")
    else:
        rows = [r if isinstance(r, dict) else {"prompt": r} for r in model_input]
    for r in rows:
        if not isinstance(r.get("prompt"), str):
            raise ValueError("every input needs a string 'prompt'")
    return rows


def signature():
    from mlflow.models import ModelSignature
    from mlflow.types import ColSpec, Schema

    return ModelSignature(
        inputs=Schema([ColSpec("string", "prompt"), ColSpec("long", "max_new_tokens", required=False)]),
        outputs=Schema([ColSpec("string")]))


def pip_requirements() -> list[str]:
    """The packages the model needs, pinned to what is installed (serving uses --env-manager local)."""
    return [f"{p}=={version(p)}" for p in ("mlflow", "torch", "transformers", "safetensors", "pandas")]


def log_pyfunc_model(adapter_dir: str | Path, model_name_or_dir: str | Path, *, dtype: str = "float32",
                     max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS, bundle_model: bool = False):
    """Log the edited model as ``pyfunc`` in the active MLflow run; returns MLflow's ``ModelInfo``.
    The registry version is made by the caller (``tracking.register_candidate``).

    With ``bundle_model`` a base-model directory is copied into the artifact, so the
    model serves on hosts without it; otherwise the name or path is recorded.
    """
    artifacts = {"adapter_set": str(adapter_dir)}
    if bundle_model:
        artifacts["base_model"] = str(model_name_or_dir)
    return mlflow.pyfunc.log_model(
        name="pyfunc", python_model=str(ENTRY), artifacts=artifacts,
        model_config={"base_model": str(model_name_or_dir), "dtype": dtype, "max_new_tokens": max_new_tokens},
        signature=signature(), pip_requirements=pip_requirements())
