"""Benchmarks, run from the repository root as modules: ``python -m bench.edit_quality``.

A package so that benchmarks share ``bench.edit_quality``'s loaders and table helpers; the
project itself (``editing``, ``tasks``, ``flows``) is installed editable by ``make setup``.
"""
