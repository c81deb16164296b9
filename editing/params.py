"""``params.yaml``: the single source of every hyperparameter and threshold."""
from __future__ import annotations

import copy
import os
from pathlib import Path

import yaml

_REPO_PARAMS = Path(__file__).resolve().parent.parent / "params.yaml"


def params_path() -> Path:
    return Path(os.environ.get("LEDIT_PARAMS", _REPO_PARAMS))


def load_params(path: str | Path | None = None, overrides: dict | None = None) -> dict:
    """The parsed params.yaml, with optional nested overrides merged on top."""
    with open(path or params_path(), encoding="utf-8") as f:
        params = yaml.safe_load(f)
    return merge(params, overrides or {})


def merge(base: dict, overrides: dict) -> dict:
    out = copy.deepcopy(base)
    for key, value in overrides.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = merge(out[key], value)
        else:
            out[key] = value
    return out
