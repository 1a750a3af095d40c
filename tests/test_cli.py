"""The command line: a real run end to end, listings, and clear errors with exit code 2."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from peftbench.cli import parse_method_args
from peftbench.errors import UsageError


def peftbench(*args: str, cwd=None) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    return subprocess.run([sys.executable, "-m", "peftbench.cli", *args], capture_output=True,
                          text=True, cwd=cwd, env=env, timeout=300)


def test_train_writes_result_and_prints_summary(tmp_path):
    out = tmp_path / "run"
    proc = peftbench("train", "--model", "tiny-random-llama", "--task", "toy_cls",
                     "--method", "lora", "--method-arg", "r=4", "--train-size", "64",
                     "--max-steps", "6", "--max-eval-examples", "16", "--lr", "0.01",
                     "--out", str(out), "--quiet")
    assert proc.returncode == 0, proc.stderr
    assert "status completed" in proc.stdout
    assert "trainable parameters" in proc.stdout
    record = json.loads((out / "result.json").read_text())
    assert record["run"]["config"]["method_args"] == {"r": 4}
    assert record["run"]["method_args"]["r"] == 4
    assert (out / "adapter" / "adapter_config.json").exists()


def test_version():
    from peftbench import __version__

    proc = peftbench("--version")
    assert proc.returncode == 0 and proc.stdout.strip() == f"peftbench {__version__}"


@pytest.mark.parametrize("command", ["tasks", "methods", "models"])
def test_listings(command):
    proc = peftbench(command)
    assert proc.returncode == 0, proc.stderr
    expected = {"tasks": ["cola", "e2e_nlg", "toy_cls"], "methods": ["bitfit", "prompt_tuning"],
                "models": ["smollm2-135m", "tiny-random-t5"]}[command]
    for word in expected:
        assert word in proc.stdout


BAD_INPUTS = [
    (["--model", "no-such-model-xyz"], "unknown model 'no-such-model-xyz'"),
    (["--task", "no_such_task"], "no_such_task"),
    (["--method", "lorra"], "Did you mean 'lora'"),
    (["--method-arg", "rank=4"], "has no argument 'rank'"),
    (["--method-arg", "r=abc"], "expected an integer"),
    (["--method-arg", "novalue"], "expected KEY=VALUE"),
    (["--train-size", "0"], "--train-size"),
    (["--precision", "fp8"], "--precision"),
    (["--method", "partial"], "to train every weight use method 'full'"),
    (["--seed", "-1"], "--seed: Input should be greater than or equal to 0"),
    (["--lr", "inf"], "--lr: Input should be a finite number"),
    (["--epochs", "inf"], "--epochs: Input should be a finite number"),
    (["--epochs", "2"], "--max-steps 1 and --epochs 2: give one of them"),
    (["--model", ""], "--model: String should have at least 1 character"),
    (["--method", "partial", "--method-arg", "layers=40:"], "a range's ends go from -2 to 2"),
    (["--method", "partial", "--method-arg", "layers=1:0"], "selects none of the model's 2"),
]


@pytest.mark.parametrize(("override", "message"), BAD_INPUTS)
def test_bad_input_is_one_clear_message_and_exit_2(tmp_path, override, message):
    args = {"--model": "tiny-random-llama", "--task": "toy_cls", "--method": "lora"}
    extra = []
    for flag, value in zip(override[::2], override[1::2], strict=True):
        if flag in args:
            args[flag] = value
        else:
            extra += [flag, value]
    argv = [x for pair in args.items() for x in pair] + extra
    proc = peftbench("train", *argv, "--max-steps", "1", "--out", str(tmp_path), "--quiet")
    assert proc.returncode == 2, (proc.stdout, proc.stderr)
    assert message in " ".join(proc.stderr.split())  # rich wraps long messages
    assert "Traceback" not in proc.stderr + proc.stdout


@pytest.mark.parametrize(("argv", "message"), [
    (["train", "--model", "tiny-random-llama", "--bogus"], "error: No such option: --bogus"),
    (["train", "--model", "tiny-random-llama"],
     "error: Missing option '--task'. See `peftbench train --help`."),
    (["nosuch"], "error: No such command 'nosuch'. See `peftbench --help`."),
    (["train", "--model"], "error: Option '--model' requires an argument."),
    (["run", "--workers", "0"], "error: Invalid value for '--workers': Input should be greater "
     "than or equal to 1. See `peftbench run --help`."),
])
def test_command_line_mistakes_are_usage_errors_without_traceback(argv, message):
    """Unknown options, missing options and unknown commands (click's errors, which typer
    raises from its own copy of click) print one line in peftbench's own style, as its
    other usage errors do, naming the command's help; not click's block, not a traceback."""
    proc = peftbench(*argv)
    assert proc.returncode == 2, (proc.stdout, proc.stderr)
    assert message in " ".join(proc.stderr.split())
    command = "peftbench" if argv == ["nosuch"] else f"peftbench {argv[0]}"
    assert f"See `{command} --help`." in " ".join(proc.stderr.split())
    assert "Usage:" not in proc.stderr and "Traceback" not in proc.stderr + proc.stdout


def test_the_bare_command_still_shows_its_help():
    proc = peftbench()
    assert proc.returncode == 2 and "Usage: peftbench [OPTIONS] COMMAND" in proc.stdout + \
        proc.stderr


def test_missing_data_dir_file_is_a_clear_error(tmp_path):
    proc = peftbench("train", "--model", "tiny-random-llama", "--task", "cola", "--method",
                     "lora", "--data-dir", str(tmp_path), "--quiet", "--out", str(tmp_path / "o"))
    assert proc.returncode == 2
    assert "in_domain_train.tsv" in proc.stderr
    assert "Traceback" not in proc.stderr


@pytest.mark.parametrize("command", ["train", "run"])
def test_a_data_dir_that_is_not_a_folder_is_a_usage_error(tmp_path, command):
    """Even for a task that reads no files (toy_cls, the quickstart suite): a mistyped
    --data-dir is reported, not silently ignored."""
    args = (["train", "--model", "tiny-random-llama", "--task", "toy_cls", "--method", "full",
             "--quiet", "--out", str(tmp_path / "o")] if command == "train"
            else ["run", "quickstart", "--dry-run", "--db", str(tmp_path / "r.sqlite")])
    missing = tmp_path / "no-such-data"
    proc = peftbench(*args, "--data-dir", str(missing))
    assert proc.returncode == 2, (proc.stdout, proc.stderr)
    message = " ".join(proc.stderr.split())  # the console wraps long lines
    assert f"--data-dir {missing}: no such folder" in message
    assert "Traceback" not in proc.stderr
    (tmp_path / "a-file").write_text("x")
    proc = peftbench(*args, "--data-dir", str(tmp_path / "a-file"))
    assert proc.returncode == 2 and "is a file, not a folder" in " ".join(proc.stderr.split())


def test_a_data_dir_for_a_generated_task_is_noted_as_unused(tmp_path):
    proc = peftbench("train", "--model", "tiny-random-llama", "--task", "toy_cls", "--method",
                     "bitfit", "--max-steps", "1", "--max-eval-examples", "4", "--quiet",
                     "--out", str(tmp_path / "o"), "--data-dir", str(tmp_path))
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr == (f"note: --data-dir {tmp_path} is not used: task 'toy_cls' is "
                           "generated and reads no files.\n")


def test_parse_method_args_types():
    assert parse_method_args(["r=8", "alpha=16.5", "target_modules=[q_proj,v_proj]",
                              "init=random"]) == {
        "r": 8, "alpha": 16.5, "target_modules": ["q_proj", "v_proj"], "init": "random"}
    with pytest.raises(UsageError):
        parse_method_args(["=3"])
    # a layer range is text: YAML 1.1 alone would read "-6:" as the mapping {-6: None} and
    # "10:20" as the base-60 number 620
    assert parse_method_args(["layers=-6:", "layers_to_transform=20:", "x=10:20"]) == {
        "layers": "-6:", "layers_to_transform": "20:", "x": "10:20"}


def test_a_method_argument_given_twice_is_a_usage_error():
    """Keeping the last of `r=4 r=2` silently trained another adapter than one typed."""
    with pytest.raises(UsageError, match=r"--method-arg r: given twice \(r=4 and r= 2\); "
                                         r"give each argument once\.$"):
        parse_method_args(["r=4", "alpha=8", "r= 2"])


def test_an_error_before_the_first_step_leaves_no_empty_progress_bar(capsys):
    from rich.console import Console

    from peftbench.training.progress import RunProgress

    def shown(steps: int) -> str:
        console = Console(force_terminal=True, width=100)
        with pytest.raises(UsageError), RunProgress(console) as progress:
            for step in range(1, steps + 1):
                progress.update({"type": "step", "step": step, "total": 5, "loss": 1.0})
            raise UsageError("bad")
        return capsys.readouterr().out

    assert "step 2/5" in shown(2).rsplit("\r", 1)[-1]  # a started run keeps its bar
    assert "\x1b[2K" in shown(0).rsplit("step 0/None", 1)[-1]  # the empty one is erased


def test_a_failed_run_exits_non_zero_and_an_unusable_out_folder_is_a_usage_error(tmp_path):
    base = ["train", "--model", "tiny-random-llama", "--task", "toy_cls", "--method", "full",
            "--train-size", "64", "--max-eval-examples", "8", "--quiet"]
    proc = peftbench(*base, "--lr", "1e30", "--max-steps", "30", "--out", str(tmp_path / "d"))
    assert proc.returncode == 1, (proc.stdout, proc.stderr)  # diverged
    assert "diverged" in proc.stdout
    blocker = tmp_path / "a_file"
    blocker.write_text("x")
    proc = peftbench(*base, "--max-steps", "1", "--out", str(blocker / "run"))
    assert proc.returncode == 2
    assert "cannot create the output folder" in " ".join(proc.stderr.split())
    assert "Traceback" not in proc.stderr


def test_an_out_folder_with_another_runs_results_is_kept_unless_overwrite(tmp_path):
    """The same run again may replace its own results; another run may not, unless asked:
    nothing of the first run is touched when it is refused."""
    out = tmp_path / "run"
    base = ["train", "--model", "tiny-random-llama", "--task", "toy_cls", "--train-size", "16",
            "--max-steps", "1", "--max-eval-examples", "4", "--quiet", "--out", str(out)]
    assert peftbench(*base, "--method", "bitfit").returncode == 0
    again = peftbench(*base, "--method", "bitfit")
    assert again.returncode == 0, again.stderr
    other = peftbench(*base, "--method", "ia3")
    message = " ".join(other.stderr.split())
    assert other.returncode == 2 and "Traceback" not in other.stderr
    assert f"--out {out}: holds the results of another run" in message
    assert "tiny-random-llama / toy_cls / bitfit, completed" in message
    assert "--overwrite" in message
    assert json.loads((out / "result.json").read_text())["run"]["config"]["method"] == "bitfit"
    replaced = peftbench(*base, "--method", "ia3", "--overwrite")
    assert replaced.returncode == 0, replaced.stderr
    record = json.loads((out / "result.json").read_text())
    assert record["run"]["config"]["method"] == "ia3"


def test_messages_quote_user_text_as_typed():
    """rich would turn ':smile:' into an emoji."""
    proc = peftbench("train", "--model", "tiny-random-llama", "--task", "toy_cls", "--method",
                     "lora", "--method-arg", "r=:smile:", "--max-steps", "1")
    assert proc.returncode == 2 and "r=':smile:'" in proc.stderr


def test_none_as_printed_by_methods_means_the_default():
    assert parse_method_args(["target_modules=None", "layers=null"]) == {
        "target_modules": None, "layers": None}


def test_a_long_error_is_one_line_when_piped():
    """rich wrapped errors at 80 columns on a pipe: one error came out as several lines."""
    proc = peftbench("train", "--model", "tiny-random-llama", "--task", "toy_cls", "--method",
                     "lora", "--method-arg", "rank=4")
    assert proc.returncode == 2
    assert len(proc.stderr) > 100 and proc.stderr.count("\n") == 1, proc.stderr
