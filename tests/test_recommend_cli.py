"""`peftbench recommend / analyze / reference`: results from a database, a JSON file or the
shipped reference; clear errors (exit 2) for missing or empty results."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from analysis_fakes import fake_suite, make_record
from cli_in_process import run_main
from peftbench import reference
from peftbench.store import ResultStore


def cli(capsys, monkeypatch, *args: str) -> tuple[int, str, str]:
    code, out, err = run_main(capsys, monkeypatch, *args)
    return code, out, " ".join(err.split())  # rich wraps long errors


@pytest.fixture(scope="module")
def db(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("db") / "results.sqlite"
    records = fake_suite(tasks=("rotten_tomatoes", "cola", "news_headlines"),
                         sizes=(100, 1000), seeds=(0, 1))
    records.append(make_record(method="lora", seed=9, status="diverged",
                               error="training loss became nan at step 3"))
    with ResultStore(path) as store:
        for record in records:
            store.save(record, suite="fake")
    return path


def test_recommend_from_a_database(capsys, monkeypatch, db):
    code, out, err = cli(capsys, monkeypatch, "recommend", "--task-type", "classification",
                         "--train-size", "300", "--db", str(db))
    assert code == 0, err
    assert "recommended" in out and "confidence" in out and "evidence" in out
    assert f"Results database {db}" in out


def test_recommend_json_has_configuration_evidence_and_confidence(capsys, monkeypatch, db):
    code, out, err = cli(capsys, monkeypatch, "recommend", "--task-type", "generation",
                         "--train-size", "1000", "--db", str(db), "--prefer", "accuracy",
                         "--json")
    assert code == 0, err
    data = json.loads(out)
    assert data["scale"] == "medium" and data["prefer"] == "accuracy"
    assert data["recommended"]["method"] in {"full", "lora", "ia3", "prompt_tuning", "bitfit"}
    assert data["recommended"]["lr"] > 0
    assert data["confidence"]["level"] == "medium"  # one generation task measured
    assert [e["task"] for e in data["evidence"]] == ["news_headlines"]
    assert data["source"]["kind"] == "database"


def test_caps_that_exclude_everything_are_a_usage_error(capsys, monkeypatch, db):
    code, _, err = cli(capsys, monkeypatch, "recommend", "--task-type", "generation",
                       "--train-size", "100", "--db", str(db), "--max-trainable-params", "5")
    assert code == 2 and "no measured method fits the caps" in err


def test_reference_build_and_recommend_from_the_shipped_reference(capsys, monkeypatch, db,
                                                                  tmp_path):
    out_file = tmp_path / "fake.json"
    code, out, err = cli(capsys, monkeypatch, "reference", "build", "--db", str(db), "--suite",
                         "fake", "--out", str(out_file))
    assert code == 0, err
    data = json.loads(out_file.read_text())
    assert data["format"] == "peftbench-reference" and data["suite"] == "fake"
    assert data["model"] == "smollm2-135m" and data["date"] == "2026-05-01"
    assert len(data["runs"]) == 61 and data["git_sha"] == "9a602a3"
    monkeypatch.setattr(reference, "shipped", lambda: [out_file])
    code, out, err = cli(capsys, monkeypatch, "recommend", "--task-type", "classification",
                         "--train-size", "100")
    assert code == 0, err
    assert "Reference results shipped with peftbench: suite fake, model smollm2-135m, " \
           "2026-05-01" in out
    # the same file works as --db
    code, out, err = cli(capsys, monkeypatch, "recommend", "--task-type", "classification",
                         "--train-size", "100", "--db", str(out_file), "--json")
    assert code == 0, err
    assert json.loads(out)["source"]["suite"] == "fake"


def test_reference_build_without_a_suite_and_to_an_unwritable_place(capsys, monkeypatch, db,
                                                                    tmp_path):
    records = tmp_path / "one.json"
    code, out, _ = cli(capsys, monkeypatch, "results", "--db", str(db), "--format", "json")
    records.write_text(json.dumps(json.loads(out)[:1]))
    code, out, err = cli(capsys, monkeypatch, "reference", "build", "--db", str(records),
                         "--out", str(tmp_path / "ref.json"))
    assert code == 0, err
    assert "(1 run, suite (none), model smollm2-135m" in " ".join(out.split())
    (tmp_path / "file").write_text("x")
    code, _, err = cli(capsys, monkeypatch, "reference", "build", "--db", str(records),
                       "--out", str(tmp_path / "file" / "ref.json"))
    assert code == 2 and "cannot write the reference file" in err


def test_reference_build_never_overwrites_its_input_or_an_existing_file(capsys, monkeypatch,
                                                                         db, tmp_path):
    copy = tmp_path / "results.sqlite"
    copy.write_bytes(db.read_bytes())
    code, _, err = cli(capsys, monkeypatch, "reference", "build", "--db", str(copy), "--suite",
                       "fake", "--out", str(copy), "--overwrite")
    assert code == 2 and "is the --db file itself" in err
    assert copy.read_bytes() == db.read_bytes()  # the database is untouched
    records = tmp_path / "records.json"
    code, out, _ = cli(capsys, monkeypatch, "results", "--db", str(db), "--format", "json")
    records.write_text(out)
    before = records.read_text()
    code, _, err = cli(capsys, monkeypatch, "reference", "build", "--db", str(records),
                       "--out", str(records), "--overwrite")
    assert code == 2 and "is the --db file itself" in err and records.read_text() == before
    target = tmp_path / "ref.json"
    target.write_text("keep me")
    code, _, err = cli(capsys, monkeypatch, "reference", "build", "--db", str(copy), "--suite",
                       "fake", "--out", str(target))
    assert code == 2 and "exists" in err and "--overwrite" in err
    assert target.read_text() == "keep me"
    code, _, err = cli(capsys, monkeypatch, "reference", "build", "--db", str(copy), "--suite",
                       "fake", "--out", str(target), "--overwrite")
    assert code == 0, err
    assert json.loads(target.read_text())["suite"] == "fake"
    code, _, err = cli(capsys, monkeypatch, "reference", "build", "--db", str(copy), "--suite",
                       "fake", "--out", str(tmp_path))
    assert code == 2 and "is a folder" in err


def test_reference_build_from_json_refuses_a_suite(capsys, monkeypatch, db, tmp_path):
    records = tmp_path / "records.json"
    code, out, _ = cli(capsys, monkeypatch, "results", "--db", str(db), "--format", "json")
    records.write_text(out)
    code, _, err = cli(capsys, monkeypatch, "reference", "build", "--db", str(records),
                       "--suite", "nosuch", "--out", str(tmp_path / "ref.json"))
    assert code == 2 and "have no suites" in err
    assert not (tmp_path / "ref.json").exists()


def test_missing_reference_is_a_clear_usage_error(capsys, monkeypatch):
    monkeypatch.setattr(reference, "shipped", lambda: [])
    code, out, err = cli(capsys, monkeypatch, "recommend", "--task-type", "classification",
                         "--train-size", "100")
    assert code == 2
    assert "no reference results are shipped" in err and "reference build" in err
    assert "Traceback" not in out + err


def test_empty_missing_or_malformed_results_are_usage_errors(capsys, monkeypatch, tmp_path):
    empty = tmp_path / "empty.sqlite"
    ResultStore(empty).close()
    code, _, err = cli(capsys, monkeypatch, "recommend", "--task-type", "classification",
                       "--train-size", "100", "--db", str(empty))
    assert code == 2 and "no runs" in err
    code, _, err = cli(capsys, monkeypatch, "report", "--db", str(tmp_path / "nope.sqlite"),
                       "--out", str(tmp_path / "r.html"))
    assert code == 2 and "no such results database" in err
    bad = tmp_path / "bad.json"
    bad.write_text('{"not": "records"}')
    code, _, err = cli(capsys, monkeypatch, "analyze", "--db", str(bad))
    assert code == 2 and "not a peftbench reference file" in err
    code, _, err = cli(capsys, monkeypatch, "recommend", "--task-type", "classification",
                       "--train-size", "100", "--db", str(bad.with_name("x.sqlite")),
                       "--reference", "quickstart")
    assert code == 2 and "give one of them" in err


@pytest.mark.parametrize(("content", "expected"), [
    (b"[1, 2]", "runs[0]: Input should be a valid dictionary"),
    (b'[{"run": {"config": {"model": "m", "task": "t"}}, "status": "completed"}]',
     "runs[0].run.config.method: Field required"),
    (b'[{"run": {"config": {"model": "m", "task": "t", "method": "lora"}}}]',
     "runs[0].status: Field required"),
    (b'[{"run": {"config": {}}}]\xe9', "not readable JSON"),
])
def test_malformed_run_records_are_usage_errors(capsys, monkeypatch, tmp_path, content,
                                                expected):
    path = tmp_path / "runs.json"
    path.write_bytes(content)
    for command in (["analyze"], ["report", "--out", str(tmp_path / "r.html")],
                    ["recommend", "--task-type", "classification", "--train-size", "100"]):
        code, _, err = cli(capsys, monkeypatch, *command, "--db", str(path))
        assert code == 2 and expected in err, (command, err)


def test_read_only_commands_leave_other_files_alone(capsys, monkeypatch, tmp_path):
    import sqlite3

    empty, foreign = tmp_path / "empty.sqlite", tmp_path / "foreign.sqlite"
    empty.touch()
    with sqlite3.connect(foreign) as conn:
        conn.execute("CREATE TABLE notes (x)")
    before = foreign.read_bytes()
    for path, says in ((empty, "an empty file"), (foreign, "with tables notes")):
        for command in (["results"], ["analyze"], ["report", "--out", str(tmp_path / "r.html")]):
            code, _, err = cli(capsys, monkeypatch, *command, "--db", str(path))
            assert code == 2 and "not a peftbench results database" in err and says in err
    assert empty.read_bytes() == b"" and foreign.read_bytes() == before
    with pytest.raises(Exception, match="not a peftbench results database"):
        ResultStore(foreign)  # nor does a sweep add its tables there


def test_analyze_prints_the_tables_and_json(capsys, monkeypatch, db):
    code, out, err = cli(capsys, monkeypatch, "analyze", "--db", str(db))
    assert code == 0, err
    for title in ("Convergence", "Claim", "Data requirement per task type", "Decision table",
                  "Failed and diverged runs"):
        assert title in out
    code, out, err = cli(capsys, monkeypatch, "analyze", "--db", str(db), "--json")
    data = json.loads(out)
    assert code == 0 and data["tables"]["failed"]["rows"][0][5] == "diverged"
    verdicts = {row[3] for row in data["tables"]["claim"]["rows"]}
    assert verdicts <= {"supported", "not supported", "mixed", "insufficient data"}


def test_analyze_prints_the_selective_study_only_when_one_was_run(capsys, monkeypatch,
                                                                    tmp_path, db):
    code, out, _ = cli(capsys, monkeypatch, "analyze", "--db", str(db))
    assert code == 0 and "Selective training" not in out
    path = tmp_path / "selective.sqlite"
    lora = {"target_modules": "all-linear", "layers_to_transform": None}
    records = [
        make_record(method="full", test=80.0, scores=[50.0, 81.0]),
        make_record(method="lora", test=78.0, scores=[50.0, 79.0], trainable=2_442_240,
                    method_args=lora),
        make_record(method="lora", test=79.0, scores=[50.0, 80.0], trainable=814_080,
                    method_args={**lora, "layers_to_transform": "-10:"})]
    with ResultStore(path) as store:
        for record in records:
            store.save(record, suite="selective")
    code, out, err = cli(capsys, monkeypatch, "analyze", "--db", str(path))
    assert code == 0, err
    assert "Selective training" in out and "last 10 layers" in out
    assert "rotten_tomatoes, 100 examples: supported: lora on last 10 layers" in " ".join(
        out.split())


def test_report_to_an_unwritable_place_is_a_usage_error(capsys, monkeypatch, tmp_path, db):
    blocker = tmp_path / "a_file"
    blocker.write_text("x")
    code, _, err = cli(capsys, monkeypatch, "report", "--db", str(db), "--out",
                       str(blocker / "r.html"))
    assert code == 2 and "cannot write the report" in err


@pytest.mark.parametrize("cap", ["nan", "-1", "0", "inf"])
def test_caps_must_be_positive_numbers(capsys, monkeypatch, db, cap):
    code, _, err = cli(capsys, monkeypatch, "recommend", "--task-type", "classification",
                       "--train-size", "100", "--db", str(db), "--max-trainable-params", cap)
    assert code == 2 and "give a positive number" in err


def test_a_parameter_cap_may_be_written_as_recommend_prints_counts(capsys, monkeypatch, db):
    from peftbench.cli_analysis import parse_count

    assert [parse_count(t, "--x") for t in ("500000", "1.5M", "16.4K", "2e6", " 3 k",
                                            "16,384")] == [
        500000, 1.5e6, pytest.approx(16400), 2e6, 3000, 16384]
    base = ["recommend", "--task-type", "classification", "--train-size", "100", "--db",
            str(db)]
    assert cli(capsys, monkeypatch, *base, "--max-trainable-params", "1.5M")[0] == 0
    code, _, err = cli(capsys, monkeypatch, *base, "--max-trainable-params", "1X")
    assert code == 2 and "--max-trainable-params '1X': expected a number, optionally with " \
        "K, M or G (e.g. 1.5M)." in err


@pytest.mark.parametrize(("args", "says"), [
    (["--model", "smollm"],
     "--model 'smollm' matches no run; the models with runs are smollm2-135m (Results "),
    (["--scales", "5000,500"], "--scales 5000,500: the thresholds LOW,HIGH need 0 < LOW < HIGH"),
])
def test_filters_that_match_nothing_say_what_there_is(capsys, monkeypatch, db, args, says):
    code, _, err = cli(capsys, monkeypatch, "recommend", "--task-type", "generation",
                       "--train-size", "100", "--db", str(db), *args)
    assert code == 2 and says in err, err
    if args[0] == "--model":
        assert err.endswith(f"(Results database {db}).")


def test_runs_of_another_setup_are_named_on_stderr_and_in_the_report(capsys, monkeypatch,
                                                                     tmp_path):
    path = tmp_path / "mixed.sqlite"
    with ResultStore(path) as store:
        for steps, when in ((20, "2026-05-01T10:00:00"), (4, "2026-05-02T10:00:00")):
            for seed in (0, 1):
                record = make_record(method="lora", seed=seed)
                record["run"]["config"]["max_steps"] = steps
                record["run"]["finished_at"] = when
                record["run"]["hash"] += str(steps)
                store.save(record, suite=f"s{steps}")
    code, out, err = cli(capsys, monkeypatch, "analyze", "--db", str(path), "--json")
    assert code == 0 and json.loads(out)["tables"]
    assert err.startswith("note: 2 runs set aside: another setup than the latest runs of "
                          "their cell, or an older run of a seed run again: rotten_tomatoes / "
                          "smollm2-135m / lora / n=100 (max_steps 4 kept)")
    code, out, _ = cli(capsys, monkeypatch, "report", "--db", str(path), "--out",
                       str(tmp_path / "r.html"))
    assert code == 0 and "2 set aside)" in out
    assert "2 set aside)" in (tmp_path / "r.md").read_text()


def test_a_suite_not_run_to_its_end_says_how_many_runs_are_missing(capsys, monkeypatch,
                                                                   tmp_path):
    path = tmp_path / "partial.sqlite"
    done = make_record(method="lora", seed=0)
    with ResultStore(path) as store:
        store.add_to_suite("grid", [done["run"]["hash"], "f" * 16, "e" * 16])
        store.save(done, suite="grid")
    code, out, _ = cli(capsys, monkeypatch, "analyze", "--db", str(path), "--suite", "grid")
    assert code == 0
    assert "suite grid (2 of its planned runs have no result yet: `peftbench run` the suite " \
        "again to finish it)" in " ".join(out.split())
    with ResultStore(path) as store:  # the suite file edited: its grid is the stored run
        store.add_to_suite("grid", [done["run"]["hash"]])
    code, out, _ = cli(capsys, monkeypatch, "analyze", "--db", str(path), "--suite", "grid")
    assert code == 0 and "planned runs" not in out


def test_results_reads_json_run_records_too(capsys, monkeypatch, db, tmp_path):
    records = tmp_path / "records.json"
    code, out, _ = cli(capsys, monkeypatch, "results", "--db", str(db), "--format", "json")
    records.write_text(out)
    code, out, err = cli(capsys, monkeypatch, "results", "--db", str(records), "--format",
                         "csv")
    assert code == 0, err
    assert len(out.strip().splitlines()) == 1 + len(json.loads(records.read_text()))
    code, _, err = cli(capsys, monkeypatch, "results", "--db", str(records), "--suite", "fake")
    assert code == 2 and "JSON results have no suites" in err
    code, _, err = cli(capsys, monkeypatch, "recommend", "--task-type", "classification",
                       "--train-size", "100", "--reference", str(records))
    assert code == 2 and "read with --db FILE.json" in err
