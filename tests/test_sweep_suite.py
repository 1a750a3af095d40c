"""Suites: schema validation with file:line messages, and deterministic grid expansion."""

from __future__ import annotations

import textwrap
from pathlib import Path

import pytest

from peftbench.errors import UsageError
from peftbench.sweep import check_names, expand, load_suite, shipped_suites

SUITE = """\
name: grid
models: [tiny-random-llama, tiny-random-t5]
tasks: [toy_cls]
methods: [lora, prompt_tuning, bitfit]
train_sizes: [64, 128]
seeds: [0, 1]
defaults: {max_steps: 5, batch_size: 8, method_args: {}}
method_overrides:
  prompt_tuning: {lr: 0.1, method_args: {num_virtual_tokens: 10}}
lr_grid: {lora: [1.0e-3, 3e-3]}
"""


def write(tmp_path, text: str, name: str = "suite.yaml"):
    path = tmp_path / name
    path.write_text(textwrap.dedent(text))
    return path


def error_of(tmp_path, text: str) -> str:
    path = write(tmp_path, text)
    with pytest.raises(UsageError) as info:
        load_suite(path)
    return str(info.value)


def test_grid_is_ordered_merged_and_complete(tmp_path):
    specs = expand(load_suite(write(tmp_path, SUITE)))
    # 2 models x 1 task x 2 sizes x 2 seeds x (2 lora lrs + prompt_tuning + bitfit)
    assert len(specs) == 2 * 2 * 2 * 4
    assert len({s.run_hash() for s in specs}) == len(specs)
    first = [(s.model, s.train_size, s.seed, s.method, s.lr) for s in specs[:5]]
    assert first == [("tiny-random-llama", 64, 0, "lora", 1e-3),
                     ("tiny-random-llama", 64, 0, "lora", 3e-3),
                     ("tiny-random-llama", 64, 0, "prompt_tuning", 0.1),
                     ("tiny-random-llama", 64, 0, "bitfit", None),
                     ("tiny-random-llama", 64, 1, "lora", 1e-3)]
    tuning = specs[2]
    assert tuning.method_args == {"num_virtual_tokens": 10}
    assert all(s.max_steps == 5 and s.batch_size == 8 for s in specs)
    assert [s.run_hash() for s in specs] == [s.run_hash() for s in
                                             expand(load_suite(tmp_path / "suite.yaml"))]


def test_overrides_merge_defaults_then_task_then_method_then_lr_grid(tmp_path):
    suite = load_suite(write(tmp_path, """\
        models: [m]
        tasks: [toy_cls, toy_gen]
        methods: [lora, bitfit]
        defaults: {max_steps: 5, lr: 0.5, num_evals: 2, method_args: {r: 2}}
        task_overrides:
          toy_gen: {max_steps: 7, lr: 0.25, method_args: {alpha: 4, r: 3}}
        method_overrides:
          lora: {num_evals: 3, method_args: {r: 4}}
        lr_grid: {bitfit: [0.125]}
        """))
    runs = {(s.task, s.method): s for s in expand(suite)}
    assert runs["toy_cls", "lora"].max_steps == 5 and runs["toy_gen", "lora"].max_steps == 7
    assert runs["toy_cls", "lora"].lr == 0.5 and runs["toy_gen", "lora"].lr == 0.25
    assert runs["toy_gen", "bitfit"].lr == 0.125 and runs["toy_gen", "bitfit"].num_evals == 2
    assert runs["toy_gen", "lora"].num_evals == 3
    assert runs["toy_gen", "lora"].method_args == {"r": 4, "alpha": 4}
    assert runs["toy_cls", "bitfit"].method_args == {"r": 2}


def test_max_steps_and_epochs_are_one_budget_the_most_specific_section_sets(tmp_path):
    """A task that trains by epochs under defaults that train by steps trains by epochs (the
    steps from defaults no longer win over it), and the other way round."""
    suite = load_suite(write(tmp_path, """\
        models: [m]
        tasks: [toy_cls, toy_gen]
        methods: [lora, bitfit]
        defaults: {max_steps: 5}
        task_overrides:
          toy_gen: {epochs: 2, max_steps: null}
        method_overrides:
          bitfit: {max_steps: 9}
        """))
    runs = {(s.task, s.method): s for s in expand(suite)}
    assert (runs["toy_cls", "lora"].max_steps, runs["toy_cls", "lora"].epochs) == (5, None)
    assert (runs["toy_gen", "lora"].max_steps, runs["toy_gen", "lora"].epochs) == (None, 2)
    assert (runs["toy_gen", "bitfit"].max_steps, runs["toy_gen", "bitfit"].epochs) == (9, None)


def test_one_section_setting_max_steps_and_epochs_is_an_error(tmp_path):
    message = error_of(tmp_path, """\
        models: [m]
        tasks: [toy_cls]
        methods: [lora]
        task_overrides:
          toy_cls: {max_steps: 5, epochs: 2}
        """)
    assert (f"{tmp_path / 'suite.yaml'}:5: task_overrides.toy_cls.epochs: set max_steps or "
            "epochs, not both" in message)


def test_model_and_data_dir_overrides(tmp_path):
    suite = load_suite(write(tmp_path, SUITE))
    plain = expand(suite)
    other = expand(suite, model="smollm2-135m", data_dir=str(tmp_path))
    assert {s.model for s in other} == {"smollm2-135m"} and len(other) == len(plain) // 2
    assert all(s.data_dir == str(tmp_path) for s in other)
    # the data folder is where data is, not what is computed: same identity
    moved = expand(suite, data_dir=str(tmp_path))
    assert [s.run_hash() for s in moved] == [s.run_hash() for s in plain]


def test_unknown_keys_are_named_with_file_and_line(tmp_path):
    message = error_of(tmp_path, SUITE.replace("seeds: [0, 1]", "seeds: [0, 1]\nseed_list: [3]")
                       .replace("max_steps: 5", "max_stepz: 5"))
    path = tmp_path / "suite.yaml"
    assert f"{path}:7: seed_list: unknown key 'seed_list'" in message
    assert f"{path}:8: defaults.max_stepz: unknown key 'max_stepz'" in message
    assert "Did you mean 'max_steps'?" in message


def test_unknown_key_in_overrides_and_axis_keys(tmp_path):
    message = error_of(tmp_path, """\
        models: [m]
        tasks: [t]
        methods: [lora]
        method_overrides:
          lora:
            learning_rate: 0.1
        defaults:
          seed: 3
        """)
    assert ":6: method_overrides.lora.learning_rate: unknown key 'learning_rate'" in message
    assert ":8: defaults.seed: 'seed' is a grid axis: list it under 'seeds'" in message


@pytest.mark.parametrize(("change", "expected"), [
    (("train_sizes: [64, 128]", "train_sizes: [64, 0]"), ":5: train_sizes[1]: Input should be "
                                                         "greater than or equal to 1 (got 0)"),
    (("lora: [1.0e-3, 3e-3]", "lora: [1.0e-3, -3]"), ":10: lr_grid.lora[1]: Input should be "
                                                     "greater than 0"),
    (("batch_size: 8", "batch_size: many"), ":7: defaults.batch_size: Input should be a valid "
                                            "integer"),
    (("seeds: [0, 1]", "seeds: [0, 0]"), ":6: seeds[1]: duplicate entry 0"),
    (("{lr: 0.1,", "{precision: fp8,"), ":9: method_overrides.prompt_tuning.precision: Input "
                                        "should be 'auto', 'bf16' or 'fp32'"),
    (("prompt_tuning: {", "ia3: {"), ":9: method_overrides.ia3: 'ia3' is not one of this "
                                     "suite's methods"),
    (("method_overrides:", "task_overrides: {toy_gen: {}}\nmethod_overrides:"),
     ":8: task_overrides.toy_gen: 'toy_gen' is not one of this suite's tasks"),
    (("method_overrides:", "task_overrides: {toy_cls: {max_steps: 0}}\nmethod_overrides:"),
     ":8: task_overrides.toy_cls.max_steps: Input should be greater than or equal to 1"),
    (("lr_grid: {lora", "lr_grid: {full: [0.1], lora"), ":10: lr_grid.full: 'full' is"
                                                          " not one of"),
    (("tasks: [toy_cls]", "tasks: []"), ":3: tasks: List should have at least 1 item"),
    (("name: grid", "name: a/b"), ":1: name: use ASCII letters, digits, '_', '.' and '-' only"),
])
def test_bad_values_are_named_with_file_and_line(tmp_path, change, expected):
    message = error_of(tmp_path, SUITE.replace(*change))
    assert str(tmp_path / "suite.yaml") + expected in message, message


def test_lr_both_in_grid_and_override_is_an_error(tmp_path):
    message = error_of(tmp_path, SUITE.replace("prompt_tuning: {lr: 0.1", "lora: {lr: 0.1"))
    assert ":9: method_overrides.lora.lr: conflicts with lr_grid.lora" in message


def test_missing_key_duplicate_key_and_bad_yaml(tmp_path):
    assert "missing required key 'methods'" in error_of(
        tmp_path, "models: [m]\ntasks: [t]\n")
    assert ":3: key 'models' given twice" in error_of(
        tmp_path, "models: [m]\ntasks: [t]\nmodels: [n]\nmethods: [lora]\n")
    assert "suite.yaml:2: not valid YAML" in error_of(tmp_path, "models: [m\ntasks: [t]\n")
    assert error_of(tmp_path, "name: s\nmethods:\n\t- lora\n").endswith(
        "suite.yaml:3: not valid YAML: found character '\\t' that cannot start any token; "
        "YAML indents with spaces, not tabs")
    assert "a suite is a YAML mapping" in error_of(tmp_path, "- just a list\n")


def test_unknown_suite_names_and_files(tmp_path):
    with pytest.raises(UsageError, match="Did you mean 'smoke'"):
        load_suite("smoek")
    with pytest.raises(UsageError, match="suite file not found"):
        load_suite(tmp_path / "nope.yaml")


def test_check_names_catches_unknown_method_task_and_argument(tmp_path):
    text = SUITE.replace("bitfit]", "bitfitt]").replace("[toy_cls]", "[toy_cls, toy_clss]")
    text = text.replace("num_virtual_tokens: 10", "num_virtual_tokenz: 10")
    with pytest.raises(UsageError) as info:
        check_names(load_suite(write(tmp_path, text)))
    message = str(info.value)
    assert ":3: tasks[1]: unknown task 'toy_clss'" in message
    assert ":4: methods[2]: unknown method 'bitfitt'" in message
    assert ":9: method_overrides.prompt_tuning.method_args:" in message
    assert "num_virtual_tokenz" in message


VARIANTS = """\
name: variants
models: [tiny-random-llama]
tasks: [toy_cls]
methods: [full, lora, partial]
defaults: {max_steps: 5}
method_overrides:
  lora: {method_args: {r: 4}}
method_variants:
  lora:
    - {}
    - {layers_to_transform: "-1:"}
    - {layers_to_transform: "-1:", target_modules: [q_proj, v_proj]}
  partial:
    - {layers: "-1:"}
    - {modules: self_attn}
lr_grid: {partial: [1.0e-4, 1.0e-3]}
"""


def test_method_variants_are_one_run_each_merged_over_the_method_args(tmp_path):
    suite = load_suite(write(tmp_path, VARIANTS))
    check_names(suite)
    specs = expand(suite)
    assert [(s.method, s.method_args, s.lr) for s in specs] == [
        ("full", {}, None),
        ("lora", {"r": 4}, None),
        ("lora", {"r": 4, "layers_to_transform": "-1:"}, None),
        ("lora", {"r": 4, "layers_to_transform": "-1:", "target_modules": ["q_proj", "v_proj"]},
         None),
        ("partial", {"layers": "-1:"}, 1e-4), ("partial", {"layers": "-1:"}, 1e-3),
        ("partial", {"modules": "self_attn"}, 1e-4), ("partial", {"modules": "self_attn"}, 1e-3),
    ]
    assert len({s.run_hash() for s in specs}) == len(specs)


def test_unquoted_layer_ranges_stay_text_in_suites(tmp_path):
    """YAML 1.1 reads 10:20 as the base-60 number 620; suites do not."""
    suite = load_suite(write(tmp_path, VARIANTS.replace('{layers: "-1:"}', "{layers: 0:1}")))
    assert {"layers": "0:1"} in [s.method_args for s in expand(suite)]
    text = VARIANTS.replace('{layers: "-1:"}', "{layers: 10:20}").replace(
        "lr_grid: {partial: [1.0e-4, 1.0e-3]}", "lr_grid: {partial: [1.0e-4, 3e-3]}")
    specs = expand(load_suite(write(tmp_path, text)))
    assert {"layers": "10:20"} in [s.method_args for s in specs]
    assert {s.lr for s in specs if s.method == "partial"} == {1e-4, 3e-3}


def test_method_variant_mistakes_are_named_with_file_and_line(tmp_path):
    message = error_of(tmp_path, VARIANTS.replace("  partial:\n    - {layers",
                                                   "  bitfit:\n    - {layers"))
    assert ":13: method_variants.bitfit: 'bitfit' is not one of this suite's methods" in message
    message = error_of(tmp_path, VARIANTS.replace('    - {layers_to_transform: "-1:"}\n',
                                                   "    - {}\n"))
    assert ":11: method_variants.lora[1]: duplicate variant" in message
    assert "empty list" in error_of(tmp_path, VARIANTS.replace(
        "  partial:\n    - {layers: \"-1:\"}\n    - {modules: self_attn}", "  partial: []"))
    with pytest.raises(UsageError) as info:
        check_names(load_suite(write(tmp_path, VARIANTS.replace("{modules: self_attn}",
                                                                "{module: self_attn}"))))
    assert ":15: method_variants.partial[1]: module='self_attn'" in str(info.value)
    with pytest.raises(UsageError) as info:
        check_names(load_suite(write(tmp_path, VARIANTS.replace('{layers: "-1:"}', "{}"))))
    assert ":14: method_variants.partial[0]:" in str(info.value)
    assert "use method 'full'" in str(info.value)


@pytest.mark.parametrize("name", ["smoke", "quickstart", "paper"])
def test_shipped_suites_are_valid(name):
    assert name in shipped_suites()
    suite = load_suite(name)
    check_names(suite)
    specs = expand(suite)
    spec = suite.spec
    sizes = sum(len(spec.task_train_sizes.get(task, spec.train_sizes)) for task in spec.tasks)
    assert len(specs) == len(spec.models) * sizes * len(spec.seeds) * len(spec.methods)
    assert set(spec.methods) == {"full", "lora", "ia3", "prompt_tuning", "bitfit"}


def test_selective_suite_compares_parts_of_the_model():
    suite = load_suite("selective")
    check_names(suite)
    specs = expand(suite)
    parts = {(s.method, str(sorted(s.method_args.items()))) for s in specs}
    assert len(specs) == 12 and len(parts) == 6 and {s.seed for s in specs} == {0, 1}
    assert ("partial", "[('layers', '-10:')]") in parts
    assert ("lora", "[]") in parts  # the reference: LoRA on every layer


def test_paper_suite_is_the_reference_grid():
    spec = load_suite("paper").spec
    assert spec.models == ["google/flan-t5-base"]
    assert spec.tasks == ["ag_news", "cola", "e2e_nlg", "samsum"]
    assert spec.train_sizes == [100, 1000, 10000] and len(spec.seeds) == 3
    assert spec.task_train_sizes == {"cola": [100, 1000, 8000]}  # its pool: 8,051
    specs = expand(load_suite("paper"))
    assert len(specs) == 4 * 3 * 3 * 5
    assert {s.train_size for s in specs if s.task == "cola"} == {100, 1000, 8000}
    assert {s.train_size for s in specs if s.task == "samsum"} == {100, 1000, 10000}


def test_task_train_sizes_mistakes_are_located(tmp_path):
    base = ("name: s\nmodels: [m]\ntasks: [toy_cls]\nmethods: [lora]\n"
            "train_sizes: [8, 16]\n")
    assert ":6: task_train_sizes.toy_gen: 'toy_gen' is not one of this suite's tasks" in \
        error_of(tmp_path, base + "task_train_sizes: {toy_gen: [4]}\n")
    assert ":6: task_train_sizes.toy_cls[1]: duplicate entry 4" in \
        error_of(tmp_path, base + "task_train_sizes: {toy_cls: [4, 4]}\n")
    assert ":6: task_train_sizes.toy_cls: empty list" in \
        error_of(tmp_path, base + "task_train_sizes: {toy_cls: []}\n")
    assert ":6: task_train_sizes.toy_cls[0]: Input should be greater than or equal to 1" in \
        error_of(tmp_path, base + "task_train_sizes: {toy_cls: [0]}\n")


def test_run_hash_covers_resolved_method_defaults(monkeypatch):
    """A run that relied on a default is another run once the default changes."""
    from peftbench.config import RunSpec
    from peftbench.methods import get_method

    implicit = RunSpec(model="m", task="t", method="lora")
    explicit = RunSpec(model="m", task="t", method="lora", lr=get_method("lora").default_lr,
                       method_args={"r": 8, "target_modules": "all-linear"})
    assert implicit.run_hash() == explicit.run_hash()
    assert implicit.run_hash() != RunSpec(model="m", task="t", method="lora",
                                          method_args={"r": 16}).run_hash()
    pinned = explicit.run_hash()
    before = implicit.run_hash()
    monkeypatch.setitem(get_method("lora").defaults, "target_modules", "q_proj,v_proj")
    assert implicit.run_hash() != before
    before = implicit.run_hash()
    monkeypatch.setattr(type(get_method("lora")), "default_lr", 5e-4)
    assert implicit.run_hash() != before  # the default LR moved
    assert explicit.run_hash() == pinned  # everything spelled out: no default involved


def test_method_argument_mistakes_are_blamed_where_they_are_written(tmp_path):
    def problem(text: str) -> str:
        with pytest.raises(UsageError) as info:
            check_names(load_suite(write(tmp_path, text)))
        return str(info.value)

    # a bad shared value with valid variants: the override's line, not a variant's
    bad_rank = VARIANTS.replace("lora: {method_args: {r: 4}}", 'lora: {method_args: {r: "x"}}')
    assert ":7: method_overrides.lora.method_args: r='x'" in problem(bad_rank)
    # partial without arguments and nothing that sets any: its entry in methods
    bare = "models: [m]\ntasks: [toy_cls]\nmethods: [full, partial]\n"
    assert ":3: methods[1]: method 'partial' trains chosen parts" in problem(bare)


def test_values_outside_a_runs_range_are_usage_errors_before_any_run(tmp_path):
    path = write(tmp_path, "models: [m]\ntasks: [toy_cls]\nmethods: [lora]\n"
                           "defaults: {max_steps: 0}\n")
    with pytest.raises(UsageError, match=r":4: defaults.max_steps: Input should be greater "
                                         r"than or equal to 1 \(got 0\)"):
        expand(load_suite(path))
    path = write(tmp_path, "models: [m]\ntasks: [toy_cls]\nmethods: [lora]\nseeds: [-1]\n")
    with pytest.raises(UsageError, match=r":4: seeds\[0\]: Input should be greater than or "
                                         r"equal to 0 \(got -1\)"):
        load_suite(path)


def test_a_suite_file_that_is_not_utf8_is_a_usage_error(tmp_path):
    path = tmp_path / "latin1.yaml"
    path.write_bytes("name: café\nmodels: [m]\n".encode("latin-1"))
    with pytest.raises(UsageError, match=r"cannot read suite file .*a suite is a UTF-8 YAML"):
        load_suite(path)


def test_task_files_are_found_beside_the_suite_and_identified_by_place_and_content(
        tmp_path, monkeypatch):
    import shutil

    from peftbench.config import RunSpec

    example = Path(__file__).resolve().parents[1] / "examples" / "my_task"
    shutil.copytree(example, tmp_path / "suites" / "my_task")
    suite_file = tmp_path / "suites" / "mine.yaml"
    suite_file.write_text("name: mine\nmodels: [tiny-random-llama]\n"
                          "tasks: [my_task/task.yaml]\nmethods: [lora]\n"
                          "task_overrides: {my_task/task.yaml: {max_steps: 2}}\n")
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)  # not the suite's folder: the task is found all the same
    suite = load_suite(suite_file)
    check_names(suite)
    [run] = expand(suite)
    assert run.task == str(tmp_path / "suites" / "my_task" / "task.yaml")
    assert run.max_steps == 2  # the override still applies to the task as written

    # the run's identity is the task file (where it is, what it says), not its spelling
    monkeypatch.chdir(tmp_path)
    relative = RunSpec(**{**run.model_dump(), "task": "suites/my_task/task.yaml"})
    assert relative.run_hash() == run.run_hash()
    shutil.copytree(example, tmp_path / "copy")  # same file, other data folder: other run
    assert RunSpec(**{**run.model_dump(), "task": "copy/task.yaml"}).run_hash() != \
        run.run_hash()
    task_file = tmp_path / "suites" / "my_task" / "task.yaml"
    before = run.run_hash()
    task_file.write_text(task_file.read_text().replace("Sentiment:", "Verdict:"))
    assert relative.run_hash() == run.run_hash() != before  # an edited task: another run


def test_a_task_files_data_is_part_of_the_run_identity(tmp_path):
    """Rewritten data, or other data found through a link or --data-dir, was taken for a
    run already done and silently skipped."""
    import os
    import shutil

    from peftbench.config import RunSpec

    example = Path(__file__).resolve().parents[1] / "examples" / "my_task"
    shutil.copytree(example, tmp_path / "a")
    spec = RunSpec(model="m", task=str(tmp_path / "a" / "task.yaml"), method="lora")
    first = spec.run_hash()
    train = tmp_path / "a" / "data" / "train.csv"
    original = train.read_bytes()
    train.write_bytes(original.replace(b",pos", b",neg", 1))
    assert spec.run_hash() != first  # rewritten data: another run
    train.write_bytes(original)
    assert spec.run_hash() == first  # the same bytes again: the same run
    (tmp_path / "b").mkdir()  # the same task file through a link, with data of its own
    os.symlink(tmp_path / "a" / "task.yaml", tmp_path / "b" / "task.yaml")
    shutil.copytree(tmp_path / "a" / "data", tmp_path / "b" / "data")
    linked = RunSpec(model="m", task=str(tmp_path / "b" / "task.yaml"), method="lora")
    assert linked.run_hash() == first  # same file, same data
    (tmp_path / "b" / "data" / "dev.csv").write_text("movie,review,sentiment\nX,fine,pos\n")
    assert linked.run_hash() != first
    # files missing beside the task are found in data_dir: their content counts
    bare = tmp_path / "bare"
    bare.mkdir()
    shutil.copy(tmp_path / "a" / "task.yaml", bare / "task.yaml")
    via = [RunSpec(model="m", task=str(bare / "task.yaml"), method="lora",
                   data_dir=str(tmp_path / folder)) for folder in ("a", "b")]
    assert via[0].run_hash() != via[1].run_hash()


def test_odd_values_in_a_suite_are_located(tmp_path):
    base = "name: s\nmodels: [m]\ntasks: [toy_cls]\nmethods: [lora]\n"
    message = error_of(tmp_path, base + "defaults: {1: 2}\n")
    assert ":5: defaults[1]: 1 is not a setting name" in message and "[key]" not in message
    assert ":5: lr_grid.lora[0]: Input should be a finite number" in error_of(
        tmp_path, base + "lr_grid: {lora: [.inf]}\n")
    assert ":5: defaults.max_steps: expected a number, not true/false" in \
        error_of(tmp_path, base + "defaults: {max_steps: true}\n")  # was taken as 1
    message = error_of(tmp_path, base + "seeds: [-1, 99999999999999999999]\n")
    assert ":5: seeds[0]: Input should be greater than or equal to 0" in message
    assert ":5: seeds[1]: Input should be less than or equal to 4294967295" in message


def test_a_suite_without_name_takes_its_file_name_made_valid(tmp_path):
    path = tmp_path / "my suite (ü).yaml"
    path.write_text("models: [m]\ntasks: [toy_cls]\nmethods: [lora]\n")
    assert load_suite(path).spec.name == "my_suite"


def test_an_unknown_execution_key_lists_the_keys_there_are(tmp_path):
    base = "name: s\nmodels: [m]\ntasks: [toy_cls]\nmethods: [lora]\n"
    message = error_of(tmp_path, base + "execution: {workerz: 2}\n")
    assert ":5: execution.workerz: unknown key 'workerz'. Did you mean 'workers'? Choose " \
        "one of: cpus_per_run, workers." in message
