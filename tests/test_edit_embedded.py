"""The engine end to end on the embedded SmolLM2-135M, and the engine's command line."""
import json
from pathlib import Path

import pytest
from click.testing import CliRunner

from editing import AdapterSet, edit, load_facts
from editing.evaluate import evaluate_facts
from flows.cli import main
from tasks.settings import load_settings

ROOT = Path(__file__).resolve().parent.parent
DEMO = ROOT / "data" / "samples" / "demo-facts.jsonl"


@pytest.mark.integration
def test_four_facts_are_learned_without_leaking(embedded, tmp_path):
    model, tokenizer = embedded
    facts = load_facts([DEMO])
    assert len(facts) == 4
    before = evaluate_facts(model, tokenizer, facts)["means"]
    adapter_set = edit(model, tokenizer, facts, load_settings().edit, progress=False)
    adapter_set.save(tmp_path / "set")
    after = evaluate_facts(model, tokenizer, facts, attach=AdapterSet.load(tmp_path / "set").attach)["means"]
    assert before["reliability"] < 0.5
    assert after["reliability"] >= 0.9
    assert after["locality"] >= 0.9


@pytest.mark.integration
def test_cli_edit_eval_generate(tmp_path):
    runner = CliRunner()
    out = tmp_path / "set"
    facts = tmp_path / "facts.jsonl"
    facts.write_text(DEMO.read_text().splitlines()[1] + "\n")   # the Eiffel Tower -> Rome
    result = runner.invoke(main, ["edit", str(facts), "--out", str(out), "--quiet"])
    assert result.exit_code == 0, result.output
    assert (out / "manifest.json").exists()
    result = runner.invoke(main, ["eval", str(out), str(facts), "--json"])
    assert result.exit_code == 0, result.output
    means = json.loads(result.stdout.strip().splitlines()[-1])["means"]
    assert means["reliability"] >= 0.9
    result = runner.invoke(main, ["generate", str(out), "The Eiffel Tower is located in the city of"])
    assert result.exit_code == 0, result.output
    assert "Rome" in result.stdout
    # ledit why, both ways: the edited prompt names its fact, an unrelated one names none
    eiffel = json.loads(facts.read_text())
    result = runner.invoke(main, ["why", "--adapter", str(out), "--json", "The Eiffel Tower is located in the city of"])
    assert result.exit_code == 0, result.output
    fired = json.loads(result.stdout)["firings"]
    assert [f["fact_id"] for f in fired] == [AdapterSet.load(out).fact_ids[0]]
    assert fired[0]["subject"] == eiffel["subject"] and fired[0]["phase"] == "prompt"
    result = runner.invoke(main, ["why", "--adapter", str(out), "The capital of Japan is"])
    assert result.exit_code == 0, result.output
    assert "no edit touched this input" in result.stdout


def test_cli_edit_rejects_bad_records_and_writes_nothing(tmp_path):
    runner = CliRunner()
    cases = {
        "missing.jsonl": ('{"subject": "A", "prompt": "A is"}\n', "record 0", "target_new"),
        "empty.jsonl": ('{"subject": "A", "prompt": "A is", "target_new": "x"}\n'
                        '{"subject": "B", "prompt": "B is", "target_new": "  "}\n', "record 1", "target_new"),
        "type.jsonl": ('{"subject": 3, "prompt": "A is", "target_new": "x"}\n', "record 0", "subject"),
        "badjson.jsonl": ('{"subject": "A", "prompt": "A is", "target_new": "x"}\n{oops\n', "record 1", "bad JSON"),
    }
    for name, (text, record, field) in cases.items():
        path = tmp_path / name
        path.write_text(text)
        out = tmp_path / f"out-{name}"
        result = runner.invoke(main, ["edit", str(path), "--out", str(out)])
        assert result.exit_code == 2, (name, result.output)
        assert name in result.output and record in result.output and field in result.output, result.output
        assert not out.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(cases)


def test_benchmark_formats_are_read_as_they_are():
    cf = load_facts([ROOT / "data" / "samples" / "counterfact-sample.json"])
    skipped = []
    zs = load_facts([ROOT / "data" / "samples" / "zsre-sample.json"], skipped=skipped)
    assert [e.record for e in skipped] == [14] and skipped[0].field == "target_new"
    assert cf[0].fact_id.startswith("cf-") and cf[0].rephrase_prompts and cf[0].locality
    raw = json.loads((ROOT / "data" / "samples" / "zsre-sample.json").read_text())[0]
    assert zs[0].prompt == raw["src"] and zs[0].target_new == raw["alt"]
    assert zs[0].locality == [{"prompt": raw["loc"], "answer": raw["loc_ans"], "kind": "Unrelated"}]
