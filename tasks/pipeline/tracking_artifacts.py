"""What a pipeline run records besides params, metrics and tags: the batches as MLflow
dataset inputs (a DVC-versioned batch file at its git tag), the candidate adapter set, the
evaluation tables and the quality plot across versions."""
from __future__ import annotations

import json
import tempfile
from pathlib import Path

from tasks.pipeline.tracking_store import client
from tasks.stream.workspace import Home

ADAPTER_ARTIFACT = "adapter_set"


# -- the dataset: a DVC-versioned batch --------------------------------------------------
def _dvc_source_class():
    from mlflow.data.dataset_source import DatasetSource

    class DVCDatasetSource(DatasetSource):
        """A batch file in the git + DVC data workspace at a git tag."""

        def __init__(self, repo: str, path: str, rev: str, md5: str | None = None):
            self.repo, self.path, self.rev, self.md5 = repo, path, rev, md5

        @staticmethod
        def _get_source_type() -> str:
            return "dvc"

        def load(self, dst_path=None) -> str:
            import dvc.api

            dst = Path(dst_path or tempfile.mkdtemp()) / Path(self.path).name
            with dvc.api.open(self.path, repo=self.repo, rev=self.rev, mode="rb") as f:
                dst.write_bytes(f.read())
            return str(dst)

        @staticmethod
        def _can_resolve(raw_source) -> bool:
            return isinstance(raw_source, str) and raw_source.startswith("dvc://")

        @classmethod
        def _resolve(cls, raw_source: str):
            body, _, rev = raw_source.removeprefix("dvc://").rpartition("@")
            repo, _, path = body.partition("::")
            return cls(repo, path, rev)

        def to_dict(self) -> dict:
            return {"url": f"dvc://{self.repo}::{self.path}@{self.rev}", "repo": self.repo,
                    "path": self.path, "rev": self.rev, "git_tag": self.rev, "dvc_md5": self.md5}

        @classmethod
        def from_dict(cls, d: dict):
            return cls(d["repo"], d["path"], d["rev"], d.get("dvc_md5"))

    return DVCDatasetSource


def batch_dataset_input(home: Home, tag: str, md5: str, frame=None):
    """The batch as an MLflow dataset input: name = git tag, digest = DVC md5 (polars' own
    digest differs between versions), source = the file in the workspace at that tag."""
    import mlflow.data
    import polars as pl
    from mlflow.entities import DatasetInput, InputTag

    rel = f"batches/{tag}.parquet"
    if frame is None:
        local = home.workspace / rel
        if local.exists():
            frame = pl.read_parquet(local)
        else:
            from tasks.stream.prepare import read_batch
            frame = read_batch(home, tag)
    source = _dvc_source_class()(str(home.workspace), rel, tag, md5)
    ds = mlflow.data.from_polars(frame, source=source, name=tag, digest=md5)
    return DatasetInput(dataset=ds._to_mlflow_entity(),
                        tags=[InputTag("mlflow.data.context", "training")])


def log_inputs(home: Home, run_id: str, batches: list[dict]) -> None:
    if batches:
        client(home).log_inputs(run_id, datasets=[batch_dataset_input(home, b["tag"], b["dvc_md5"])
                                                  for b in batches])


def log_adapter_set(home: Home, run_id: str, directory: str | Path) -> str:
    """The candidate adapter set as the run's ``adapter_set`` artifact; returns its URI."""
    cl = client(home)
    cl.log_artifacts(run_id, str(directory), ADAPTER_ARTIFACT)
    return f"runs:/{run_id}/{ADAPTER_ARTIFACT}"


def log_evaluation(home: Home, run_id: str, evaluation: dict, version: str) -> None:
    """Per-fact results as Parquet and as an MLflow table, the means as JSON and Markdown."""
    import polars as pl

    cl = client(home)
    rows = evaluation["per_fact"]
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "evaluation"
        out.mkdir()
        if rows:
            pl.DataFrame(rows, infer_schema_length=None).write_parquet(out / "per_fact.parquet")
        (out / "metrics.json").write_text(json.dumps(evaluation["metrics"], indent=2, sort_keys=True))
        for name in ("notes", "changed"):     # why a check was not measured; the answers it changed
            if evaluation.get(name):
                (out / f"{name}.json").write_text(json.dumps(evaluation[name], indent=1, ensure_ascii=False))
        (out / "summary.md").write_text(metrics_markdown(evaluation["metrics"], version))
        cl.log_artifacts(run_id, str(out), "evaluation")
    if rows:
        table = {k: [r.get(k) for r in rows] for k in rows[0]}
        cl.log_table(run_id, table, "evaluation/per_fact_table.json")


def metrics_markdown(metrics: dict, version: str) -> str:
    lines = [f"### Evaluation of {version}", "", "| metric | value |", "|---|---|"]
    for k in sorted(metrics):
        v = metrics[k]
        lines.append(f"| {k} | {'-' if v is None else (f'{v:.4f}' if isinstance(v, float) else v)} |")
    return "\n".join(lines) + "\n"


def log_history_plot(home: Home, run_id: str, records: list[dict]) -> None:
    """Quality and retention across versions (every candidate, rejected ones marked)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in records if r.get("metrics")]
    if not rows:
        return
    versions = [r["version"] for r in rows]
    fig, ax = plt.subplots(figsize=(max(5, 0.6 * len(rows) + 3), 3.5))
    for metric in ("reliability", "generality", "retention", "locality"):
        ys = [r["metrics"].get(metric) for r in rows]
        ax.plot(versions, [float("nan") if y is None else y for y in ys], marker="o", label=metric)
    for i, r in enumerate(rows):
        if r.get("status") == "rejected":
            ax.axvspan(i - 0.4, i + 0.4, color="red", alpha=0.08)
    ax.set_ylim(-0.05, 1.05)
    ax.set_xlabel("adapter version (red: rejected)")
    ax.set_title("Edit quality and retention across versions")
    ax.legend(loc="lower left", fontsize="small")
    fig.tight_layout()
    client(home).log_figure(run_id, fig, "plots/quality_across_versions.png")
    plt.close(fig)
