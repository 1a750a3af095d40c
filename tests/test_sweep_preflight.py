"""Before a sweep: models, task data and train sizes are checked, nothing runs on a mistake."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from cli_in_process import run_main_merged
from peftbench.errors import UsageError
from peftbench.sweep import expand, load_suite
from peftbench.sweep.preflight import check_runnable

SHARED = Path(os.environ.get("PEFTBENCH_SHARED_DATA")
              or Path(__file__).resolve().parents[2] / "shared" / "data")

SUITE = """\
name: pre
models: [tiny-random-llama, tiny-random-lama]
tasks: [toy_cls, toy_gen]
methods: [lora]
train_sizes: [32, 5000]
task_train_sizes:
  toy_gen: [16]
defaults: {max_steps: 2, batch_size: 8, max_eval_examples: 8, device: cpu, precision: fp32}
"""


def problems(tmp_path: Path, text: str, model: str | None = None) -> list[str]:
    path = tmp_path / "pre.yaml"
    path.write_text(text)
    suite = load_suite(path)
    with pytest.raises(UsageError) as info:
        check_runnable(suite, expand(suite, model=model), model)
    return str(info.value).splitlines()[1:]


def test_every_problem_is_listed_with_its_line(tmp_path):
    found = problems(tmp_path, SUITE)
    assert len(found) == 2, found
    assert found[0].startswith(f"{tmp_path / 'pre.yaml'}:2: models[1]: unknown model "
                               "'tiny-random-lama'")
    assert "Did you mean 'tiny-random-llama'?" in found[0]
    assert found[1] == (f"{tmp_path / 'pre.yaml'}:5: train_sizes[1]: 5000 training examples, "
                        "but task 'toy_cls' has 2000 in its training pool; give this task "
                        "smaller sizes (task_train_sizes: {toy_cls: [...]}; null = all 2000)")


def test_model_option_and_missing_data_are_named(tmp_path):
    text = SUITE.replace(", tiny-random-lama", "").replace("[32, 5000]", "[32]").replace(
        "toy_gen", "cola")
    found = problems(tmp_path, text, model="nope")
    assert found[0].startswith("--model: unknown model 'nope'")
    assert any(line.startswith(f"{tmp_path / 'pre.yaml'}:3: tasks[1]: task 'cola' needs "
                               "--data-dir") for line in found), found


def test_a_sound_suite_passes(tmp_path):
    path = tmp_path / "ok.yaml"
    path.write_text(SUITE.replace(", tiny-random-lama", "").replace("[32, 5000]", "[32]"))
    suite = load_suite(path)
    check_runnable(suite, expand(suite))


@pytest.mark.skipif(not (SHARED / "cola").is_dir(), reason=f"no CoLA copy under {SHARED}")
def test_paper_suite_sizes_fit_the_real_cola_pool():
    suite = load_suite("paper")
    specs = [s.model_copy(update={"data_dir": str(SHARED / "cola"), "model": "tiny-random-t5"})
             for s in expand(suite) if s.task == "cola"]
    check_runnable(suite, specs, "tiny-random-t5")


def cli(capsys, monkeypatch, *args: str) -> tuple[int, str]:
    """``peftbench ARGS`` in this process (the runs' fork server is shared between tests)."""
    return run_main_merged(capsys, monkeypatch, *args)


def test_run_refuses_before_anything_runs(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "pre.yaml").write_text(SUITE)
    code, out = cli(capsys, monkeypatch, "run", "pre.yaml", "--quiet")
    assert code == 2 and "nothing was run" in out and "Traceback" not in out
    assert not list(tmp_path.glob("runs/*/*"))
    code, out = cli(capsys, monkeypatch, "run", "smoke", "--model", "nope", "--quiet")
    assert code == 2 and "--model: unknown model 'nope'" in " ".join(out.split())
    assert not list(tmp_path.glob("runs/*/*"))


def test_out_dir_must_be_a_folder(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "file").write_text("x")
    code, out = cli(capsys, monkeypatch, "run", "smoke", "--out-dir", "file", "--quiet")
    assert code == 2 and "--out-dir file: is a file, not a folder" in " ".join(out.split())
    code, out = cli(capsys, monkeypatch, "run", "smoke", "--out-dir", "file/sub", "--quiet")
    assert code == 2 and "--out-dir file/sub: cannot create the folder" in " ".join(out.split())


def test_method_variants_are_tried_on_the_model_before_the_sweep(tmp_path):
    """Module names and layer selections the model lacks were found only when each run
    started (one failed run per grid cell)."""
    text = """\
name: sel
models: [tiny-random-llama]
tasks: [toy_cls]
methods: [lora, partial]
method_overrides:
  lora: {method_args: {r: 4}}
method_variants:
  lora: [{}, {target_modules: [q_proj, v_projj]}]
  partial: [{layers: "-1:"}, {layers: "-5:"}, {modules: attn}]
"""
    found = [" ".join(line.split()) for line in problems(tmp_path, text)]
    source = tmp_path / "pre.yaml"
    assert len(found) == 3, found
    assert found[0].startswith(f"{source}:8: method_variants.lora[1] on model "
                               "tiny-random-llama: target_modules=")
    assert "'v_projj' names no module of this model" in found[0]
    assert found[1].startswith(f"{source}:9: method_variants.partial[1] on model")
    assert "the model has 2 layers" in found[1]
    assert found[2].startswith(f"{source}:9: method_variants.partial[2] on model")
    assert "'attn' names no module" in found[2]


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a GPU")
def test_a_cuda_device_this_machine_lacks_is_named(tmp_path):
    text = SUITE.replace(", tiny-random-lama", "").replace("[32, 5000]", "[32]") + \
        "method_overrides: {lora: {device: cuda}}\n"
    found = problems(tmp_path, text)
    assert found == [f"{tmp_path / 'pre.yaml'}:9: method_overrides.lora.device: cuda, but no "
                     "CUDA GPU is visible to torch on this machine; use device: auto (or "
                     "cpu), or --backend ray with a cluster that has GPUs"]
    path = tmp_path / "pre.yaml"
    suite = load_suite(path)
    check_runnable(suite, expand(suite), local=False)  # a Ray cluster may have GPUs


def test_a_mistake_is_blamed_on_the_section_that_writes_it(tmp_path):
    text = """\
name: blame
models: [tiny-random-llama]
tasks: [toy_cls]
methods: [lora]
method_overrides:
  lora:
    method_args:
      r: 4
      target_modules: [q_proj, vv_proj]
method_variants:
  lora:
    - {alpha: 8}
    - {layers_to_transform: "-5:"}
"""
    found = [" ".join(line.split()) for line in problems(tmp_path, text)]
    assert [line.split(" on model")[0] for line in found] == [
        f"{tmp_path / 'pre.yaml'}:9: method_overrides.lora.method_args.target_modules",
        f"{tmp_path / 'pre.yaml'}:13: method_variants.lora[1]"]
    assert "'vv_proj' names no module" in found[0] and "2 layers" in found[1]


def test_a_dry_run_creates_nothing(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    code, out = cli(capsys, monkeypatch, "run", "smoke", "--dry-run", "--db", "new.sqlite")
    assert code == 0 and "80 runs" in out
    assert list(tmp_path.iterdir()) == []  # no database, no runs folder
    (tmp_path / "empty.sqlite").touch()  # an existing database is read, never written
    code, out = cli(capsys, monkeypatch, "run", "smoke", "--dry-run", "--db", "empty.sqlite")
    assert code == 0 and (tmp_path / "empty.sqlite").stat().st_size == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["empty.sqlite"]
    code, out = cli(capsys, monkeypatch, "run", "smoke", "--dry-run", "--db", str(tmp_path))
    assert code == 2 and "is a folder; give the results database file" in " ".join(out.split())
