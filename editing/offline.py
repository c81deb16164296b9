"""The one table of environment variables that keep every run offline and untracked.

The model is embedded and nothing is downloaded, so the Hugging Face libraries must not reach
for the hub, and MLflow, Prefect, DVC and the tokenizers must not phone home or fork threads.
Python code applies this table (setdefault: a value the user set wins); the two places
outside Python that repeat it are the Makefile's ``export`` lines (make needs them before
Python starts) and prefect.yaml's ``env`` list (YAML). No heavy imports here.
"""
import os
from collections.abc import MutableMapping

OFFLINE_ENV: dict[str, str] = {
    "HF_HUB_OFFLINE": "1",
    "TRANSFORMERS_OFFLINE": "1",
    "HF_HUB_DISABLE_TELEMETRY": "1",
    "DO_NOT_TRACK": "true",
    "MLFLOW_DISABLE_TELEMETRY": "true",
    "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
    "DVC_NO_ANALYTICS": "1",
    "TOKENIZERS_PARALLELISM": "false",
}


def apply(environ: MutableMapping[str, str] = os.environ) -> MutableMapping[str, str]:
    """Set each offline variable that ``environ`` does not already have; return ``environ``."""
    for name, value in OFFLINE_ENV.items():
        environ.setdefault(name, value)
    return environ
