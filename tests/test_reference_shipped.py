"""The reference results shipped with peftbench: produced by peftbench's own quickstart suite,
consistent with that suite, and what `recommend` answers from without a database."""

from __future__ import annotations

import json
import sys
from collections import Counter
from pathlib import Path

from peftbench import reference
from peftbench.sweep.grid import expand
from peftbench.sweep.plan import plan_runs
from peftbench.sweep.suite import load_suite


def _shipped_quickstart() -> dict:
    paths = {path.name: path for path in reference.shipped()}
    assert "quickstart.json" in paths, "regenerate with: " + reference.REGENERATE
    return json.loads(paths["quickstart.json"].read_text())


def test_shipped_reference_is_a_complete_quickstart_run():
    data = _shipped_quickstart()
    assert data["format"] == reference.FORMAT and data["suite"] == "quickstart"
    assert data["model"] == "smollm2-135m" and data["date"] and data["git_sha"]
    suite = load_suite("quickstart")
    planned = {run.run_hash for run in plan_runs(expand(suite), Path("runs"))}
    shipped = Counter(record["run"]["hash"] for record in data["runs"])
    # the same resolved configs (hash of model, task, method, size, seed, budgets ...)
    assert set(shipped) == planned and max(shipped.values()) == 1, \
        "the quickstart suite changed: " + reference.REGENERATE
    for record in data["runs"]:
        assert record["status"] == "completed", record["run"]
        assert record["model"]["pretrained"] is True
        assert record["provenance"]["data_fingerprint"]
        assert record["provenance"]["model_fingerprint"]
        assert record["curve"][0]["step"] == 0 and len(record["curve"]) >= 2
        assert record["scores"]["test"][record["scores"]["primary"]] is not None


def test_recommend_answers_from_the_shipped_reference(capsys, monkeypatch):
    from peftbench.cli import main

    monkeypatch.setattr(sys, "argv", ["peftbench", "recommend", "--task-type",
                                      "classification", "--train-size", "64", "--json"])
    try:
        main()
        code = 0
    except SystemExit as exc:
        code = exc.code or 0
    out = capsys.readouterr().out
    assert code == 0
    answer = json.loads(out)
    shipped = _shipped_quickstart()
    assert answer["source"]["suite"] == "quickstart"
    assert answer["source"]["git_sha"] == shipped["git_sha"]  # answered from that very file
    assert answer["evidence"] and all(row["task"] == "rotten_tomatoes"
                                      for row in answer["evidence"])
    assert answer["recommended"]["method"] in {"full", "lora", "ia3", "prompt_tuning", "bitfit"}
