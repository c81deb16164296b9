"""bench/lifelong.py --render-only: the kept rows file is read back as one row per run setting."""
import json

from bench import lifelong


def _row(fin_reliability, overrides=None):
    row = {"dataset": "zsre", "T": 20, "batch": 10, "method": "baft",
           **{f"{p}_{k}": 1.0 for p in ("imm", "fin") for k in ("reliability", "generality", "locality")},
           "s_per_edit": 2.0, "bytes_per_edit": 100.0, "overhead": float("nan"), "retention": [1.0, 1.0]}
    row["fin_reliability"] = fin_reliability
    if overrides is not None:     # rows written before overrides were recorded lack the field
        row["overrides"] = overrides
    return row


def test_ablation_rows_sit_beside_the_default_row_and_reruns_replace(tmp_path):
    rows = tmp_path / "rows.jsonl"
    rows.write_text("".join(json.dumps(r) + "\n" for r in
                            [_row(0.5), _row(0.7, "edit.baft.replay_negatives=0"), _row(0.9, "")]))
    out = tmp_path / "ablation.md"
    lifelong.main(["--rows", str(rows), "--render-only", "--out", str(out)])

    table = [line for line in out.read_text().splitlines() if line.startswith("| zsre")]
    assert len(table) == 2
    assert "| baft |" in table[0] and "| 0.900 |" in table[0] and "0.500" not in table[0]
    assert "| baft (edit.baft.replay_negatives=0) |" in table[1] and "| 0.700 |" in table[1]
    assert (tmp_path / "ablation-zsre-T20.png").is_file()
