"""Sweeps end to end on a tiny suite: run, skip what is done, failures, export, kills, Ray."""

from __future__ import annotations

import contextlib
import json
import os
import random
import signal
import sqlite3
import subprocess
import sys
import threading
import time
from pathlib import Path

import psutil
import pytest

from cli_in_process import run_main_merged
from peftbench.store import ResultStore
from peftbench.sweep import execute_runs, expand, load_suite, plan_runs
from peftbench.sweep.worker import kill_all, run_isolated

TINY = """\
name: tiny
models: [tiny-random-llama]
tasks: [toy_cls]
methods: {methods}
train_sizes: [32]
seeds: {seeds}
execution: {{cpus_per_run: 1}}
defaults: {{max_steps: 3, batch_size: 8, num_evals: 2, max_eval_examples: 16, precision: fp32,
           device: cpu, lr: 1.0e-2}}
"""


def tiny_suite(tmp_path: Path, methods: str = "[lora, bitfit]", seeds: str = "[0]",
               extra: str = "") -> Path:
    path = tmp_path / "tiny.yaml"
    path.write_text(TINY.format(methods=methods, seeds=seeds) + extra)
    return path


def cli(capsys, monkeypatch, *args: str) -> tuple[int, str]:
    """``peftbench ARGS`` in this process (the runs' fork server is shared between tests)."""
    return run_main_merged(capsys, monkeypatch, *args)


def check_store(db: Path) -> dict[str, dict]:
    """No corruption, one row per run, every stored run final and with all its curve rows.

    A sweep killed while starting up may not have created the store (or its tables) yet.
    """
    if not db.exists():
        return {}
    with sqlite3.connect(db) as conn:
        assert conn.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
        if not conn.execute("SELECT name FROM sqlite_master WHERE name = 'runs'").fetchone():
            return {}
        hashes = [r[0] for r in conn.execute("SELECT run_hash FROM runs")]
        orphans = conn.execute("SELECT COUNT(*) FROM curve WHERE run_hash NOT IN "
                               "(SELECT run_hash FROM runs)").fetchone()[0]
    assert len(hashes) == len(set(hashes)) and orphans == 0
    with ResultStore(db) as store:
        records = {r["run"]["hash"]: r for r in store.records()}
    for record in records.values():
        assert record["status"] == "completed", record["error"]
        assert [p["step"] for p in record["curve"]] == [0, 2, 3]
    return records


def test_sweep_runs_skips_done_runs_and_exports(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    suite = tiny_suite(tmp_path)
    code, out = cli(capsys, monkeypatch, "run", str(suite), "--db", "r.sqlite", "--quiet")
    assert code == 0, out
    assert "this time: 2 completed" in out
    records = check_store(tmp_path / "r.sqlite")
    assert len(records) == 2
    results = {h: tmp_path / "runs" / "tiny" / h / "result.json" for h in records}
    for run_hash, path in results.items():  # what execute wrote == what the store gives back
        assert json.loads(path.read_text()) == records[run_hash]
    written = {h: p.stat().st_mtime_ns for h, p in results.items()}

    code, out = cli(capsys, monkeypatch, "run", str(suite), "--db", "r.sqlite", "--quiet")
    assert code == 0 and "2 already done; this time: nothing to do" in out
    assert {h: p.stat().st_mtime_ns for h, p in results.items()} == written

    code, out = cli(capsys, monkeypatch, "results", "--db", "r.sqlite", "--format", "json")
    assert code == 0
    exported = json.loads(out)
    assert {r["run"]["hash"]: r for r in exported} == records
    assert all(set(r) >= {"run", "status", "error", "params", "curve", "scores",
                          "efficiency", "provenance", "task", "model"} for r in exported)
    code, out = cli(capsys, monkeypatch, "results", "--db", "r.sqlite", "--format", "csv",
                    "--suite", "tiny")
    lines = out.strip().splitlines()
    assert code == 0 and len(lines) == 3 and lines[0].startswith("run_hash,model,task,method")
    code, out = cli(capsys, monkeypatch, "results", "--db", "r.sqlite")
    assert code == 0 and "lora" in out and "bitfit" in out and "completed" in out
    code, out = cli(capsys, monkeypatch, "results", "--db", "r.sqlite", "--format", "xml")
    assert code == 2 and "--format 'xml'" in out


def test_failing_run_is_recorded_and_the_sweep_goes_on(tmp_path, monkeypatch, capsys):
    """A model folder whose weights file is damaged passes the checks before the sweep
    (they read its config only) and fails when its run loads it."""
    from peftbench.models import load_model

    monkeypatch.chdir(tmp_path)
    tiny = load_model("tiny-random-llama")
    tiny.model.save_pretrained(tmp_path / "damaged")
    tiny.tokenizer.save_pretrained(tmp_path / "damaged")
    with open(tmp_path / "damaged" / "model.safetensors", "r+b") as weights:
        weights.truncate(100)
    suite = tiny_suite(tmp_path, methods="[lora]")
    suite.write_text(suite.read_text().replace(
        "models: [tiny-random-llama]", f"models: [tiny-random-llama, {tmp_path / 'damaged'}]"))
    code, out = cli(capsys, monkeypatch, "run", str(suite), "--quiet")
    assert code == 11, out  # 10 + one failed run
    assert "1 completed, 1 failed" in out and "could not load model" in out
    with ResultStore("peftbench-results.sqlite") as store:
        by_model = {Path(r["run"]["config"]["model"]).name: r for r in store.records("tiny")}
    assert by_model["tiny-random-llama"]["status"] == "completed"
    assert by_model["damaged"]["status"] == "failed"
    assert "deserializing header" in by_model["damaged"]["error"]
    # failed runs are retried, completed ones are not
    code, out = cli(capsys, monkeypatch, "run", str(suite), "--quiet")
    assert code == 11 and "1 already done; this time: 1 failed" in out


def test_bad_suite_is_a_usage_error(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    suite = tiny_suite(tmp_path, methods="[lora, bitfitt]")
    code, out = cli(capsys, monkeypatch, "run", str(suite))
    assert code == 2
    assert "tiny.yaml:4: methods[1]: unknown method 'bitfitt'" in " ".join(out.split())
    assert not list(tmp_path.glob("runs/*/*"))  # nothing ran


def test_a_run_folder_holding_other_files_is_a_usage_error_and_kept(tmp_path, monkeypatch,
                                                                    capsys):
    """A sweep used to empty ``<out-dir>/<hash>`` whole before each run."""
    monkeypatch.chdir(tmp_path)
    suite = tiny_suite(tmp_path, methods="[lora]")
    [planned] = plan_runs(expand(load_suite(suite)), tmp_path / "runs" / "tiny")
    planned.out_dir.mkdir(parents=True)
    (planned.out_dir / "notes.txt").write_text("mine")
    code, out = cli(capsys, monkeypatch, "run", str(suite), "--db", "r.sqlite", "--quiet")
    assert code == 2, out
    assert f"1 run folder to be written holds files peftbench did not write: " \
           f"{planned.out_dir}: notes.txt" in " ".join(out.split())
    assert (planned.out_dir / "notes.txt").read_text() == "mine"
    assert not check_store(tmp_path / "r.sqlite")


def test_a_run_clears_only_its_own_earlier_files(tmp_path):
    from peftbench.sweep.worker import clear_run_folder, foreign_entries

    folder = tmp_path / "run"
    (folder / "adapter").mkdir(parents=True)
    (folder / ".adapter.x1").mkdir()
    for name in ("result.json", "worker.log", ".result.json.abc.tmp", "mine.txt"):
        (folder / name).write_text("x")
    assert foreign_entries(folder) == ["mine.txt"]
    clear_run_folder(folder)
    assert sorted(p.name for p in folder.iterdir()) == ["mine.txt"]
    (tmp_path / "file").write_text("x")
    assert foreign_entries(tmp_path / "file") == ["file"]
    assert foreign_entries(tmp_path / "absent") == []


def test_killed_run_process_is_recorded_as_failed(tmp_path):
    spec = expand(load_suite(tiny_suite(tmp_path)))[0]
    started = threading.Event()

    def on_event(event):
        if event["type"] == "step":
            started.set()

    def killer():
        started.wait(60)
        kill_all()  # as the kernel's OOM killer would

    thread = threading.Thread(target=killer)
    thread.start()
    record = run_isolated(spec, tmp_path / "run", on_event, threads=1)
    thread.join()
    assert record["status"] == "failed"
    assert "killed by SIGKILL" in record["error"]
    assert json.loads((tmp_path / "run" / "result.json").read_text()) == record


def _wait_for_a_run(out_root: Path, since: float, proc: subprocess.Popen, timeout: float = 60):
    """Until some run of this attempt has started (its worker.log is new) or the sweep ended."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and proc.poll() is None:
        if any(_modified_since(log, since) for log in out_root.glob("*/worker.log")):
            return
        time.sleep(0.05)


def _modified_since(path: Path, since: float) -> bool:
    """False also for a file gone between listing and stat: a resumed sweep clears the
    folder of a run it restarts."""
    try:
        return path.stat().st_mtime >= since
    except FileNotFoundError:
        return False


def test_sweep_killed_at_random_points_resumes_without_duplicates(tmp_path):
    suite = tiny_suite(tmp_path, methods="[lora, bitfit, ia3]", seeds="[0, 1, 2, 3]")
    expected = {spec.run_hash() for spec in expand(load_suite(suite))}
    db, out_root = tmp_path / "r.sqlite", tmp_path / "runs" / "tiny"
    command = [sys.executable, "-m", "peftbench.cli", "run", str(suite), "--db", str(db),
               "--quiet"]
    rng = random.Random(20240601)
    kills = 0
    for trial in range(6):
        since = time.time()
        proc = subprocess.Popen(command, cwd=tmp_path, stdout=subprocess.DEVNULL,
                                stderr=subprocess.DEVNULL)
        if trial == 0:
            time.sleep(rng.uniform(0.5, 3.0))  # while starting up
        else:
            _wait_for_a_run(out_root, since, proc)
            time.sleep(rng.uniform(0.0, 0.8))  # during a run, a store write, in between
        family = psutil.Process(proc.pid).children(recursive=True) if proc.poll() is None \
            else []
        kills += proc.poll() is None
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        # the runs' processes die with the sweep: nothing keeps writing
        _, alive = psutil.wait_procs(family, timeout=20)
        assert not alive, alive
        assert set(check_store(db)) <= expected

    assert kills >= 5  # the sweep was still at work when killed
    finished = subprocess.run(command, cwd=tmp_path, capture_output=True, text=True,
                              timeout=300)
    assert finished.returncode == 0, finished.stdout + finished.stderr
    records = check_store(db)
    assert set(records) == expected
    with sqlite3.connect(db) as conn:
        assert conn.execute("SELECT COUNT(*) FROM runs").fetchone()[0] == len(expected)
        assert conn.execute("SELECT COUNT(*) FROM curve").fetchone()[0] == 3 * len(expected)


def _ctrl_c_as_at_a_terminal() -> None:
    """Default Ctrl-C handling in the child even when the tests run in a background job
    (a non-interactive shell's ``cmd &`` starts it with SIGINT ignored, and children
    inherit that)."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def test_ctrl_c_while_the_fork_server_starts_is_a_quiet_interrupt(tmp_path):
    """Ctrl-C reaches the whole process group: the fork server, busy importing torch, must
    not print a traceback, and the sweep ends with 130 and says so."""
    suite = tiny_suite(tmp_path)
    proc = subprocess.Popen([sys.executable, "-m", "peftbench.cli", "run", str(suite), "--db",
                             str(tmp_path / "r.sqlite"), "--quiet"], cwd=tmp_path,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True, preexec_fn=_ctrl_c_as_at_a_terminal)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and proc.poll() is None:
        with contextlib.suppress(psutil.Error):
            if any("forkserver" in " ".join(child.cmdline())
                   for child in psutil.Process(proc.pid).children()):
                break
        time.sleep(0.02)
    time.sleep(0.5)  # inside the fork server's preload (about 5 s of imports)
    os.killpg(proc.pid, signal.SIGINT)
    out, _ = proc.communicate(timeout=60)
    assert proc.returncode == 130, out
    assert "Traceback" not in out and "interrupted" in out, out


def test_a_check_process_that_dies_is_a_clear_error():
    from peftbench.errors import CrashError
    from peftbench.sweep.worker import call_in_fork_server

    with pytest.raises(CrashError, match="abort: its process killed by SIGABRT; run the "
                                         "command again"):
        call_in_fork_server(os.abort)
    assert CrashError.exit_code == 1  # printed as one line by the CLI, not a traceback


def test_fork_server_calls_ignore_ctrl_c_and_runs_restore_it():
    from peftbench.sweep.worker import call_in_fork_server

    here = signal.getsignal(signal.SIGINT)
    assert call_in_fork_server(signal.getsignal, signal.SIGINT) == signal.SIG_IGN
    assert signal.getsignal(signal.SIGINT) is here  # not changed here


def timeless(curve: list[dict]) -> list[dict]:
    return [{k: v for k, v in point.items() if k != "seconds"} for point in curve]


def test_ray_backend_gives_the_local_results(tmp_path):
    ray = pytest.importorskip("ray")
    specs = expand(load_suite(tiny_suite(tmp_path)))

    def sweep(backend: str) -> tuple[dict[str, dict], set[tuple[str, str]]]:
        events: set[tuple[str, str]] = set()
        with ResultStore(tmp_path / f"{backend}.sqlite") as store:
            counts = execute_runs(plan_runs(specs, tmp_path / backend), store, "tiny",
                                  backend=backend, workers=1, cpus_per_run=1,
                                  on_event=lambda h, e: events.add((h, e["type"])))
            assert counts == {"completed": len(specs)}
            return {r["run"]["hash"]: r for r in store.records("tiny")}, events

    local, _ = sweep("local")
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        remote, events = sweep("ray")
    finally:
        ray.shutdown()
    assert set(remote) == set(local) == {s.run_hash() for s in specs}
    for run_hash, record in local.items():
        other = remote[run_hash]
        assert timeless(other["curve"]) == timeless(record["curve"])
        assert other["scores"] == record["scores"]
        assert other["params"] == record["params"]
        assert (run_hash, "eval") in events  # progress came back through the Ray queue


@pytest.mark.parametrize(("address", "says"), [
    ("closed", "Connection refused"),
    ("no-port-here", "is not host:port"),
    ("http://127.0.0.1:6379", "unknown scheme 'http'"),
    ("rays://127.0.0.1:6379", "unknown scheme 'rays'"),
])
def test_an_unreachable_ray_address_is_a_usage_error_at_once(tmp_path, capsys, monkeypatch,
                                                             address, says):
    pytest.importorskip("ray")
    import socket

    if address == "closed":  # a port nobody listens on: bound, then released
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            address = f"ray://127.0.0.1:{probe.getsockname()[1]}"
    started = time.monotonic()
    code, out = cli(capsys, monkeypatch, "run", str(tiny_suite(tmp_path)), "--backend", "ray",
                    "--ray-address", address, "--db", str(tmp_path / "r.sqlite"),
                    "--out-dir", str(tmp_path / "runs"))
    assert code == 2, out
    flat = " ".join(out.split())
    assert f"--ray-address {address!r}" in flat and says in flat
    assert "ray start --head" in flat and "Traceback" not in out
    assert time.monotonic() - started < 30
    assert not (tmp_path / "r.sqlite").exists()  # checked before the store is touched
