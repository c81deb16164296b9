"""Kept for MLflow registry versions logged before the move to ``tasks/pipeline/``: their
code file (``serving_entry.py``, copied into each version) imports ``tasks.serving``."""
from tasks.pipeline.serving import AdapterSetModel  # noqa: F401
