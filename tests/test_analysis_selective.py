"""The selective-training study on hand-made records with known answers."""

from __future__ import annotations

import pytest

from analysis_fakes import make_record
from peftbench.analysis import analyse_records
from peftbench.analysis.selective import findings, part, variants

LORA_ALL = {"target_modules": "all-linear", "layers_to_transform": None}


def _run(method: str, test: float, trainable: int, args: dict | None = None, **kw):
    """A completed run whose validation score is ``test + 1`` (its best point)."""
    kw.setdefault("scores", [50.0, test + 1.0])
    return make_record(method=method, test=test, trainable=trainable, method_args=args, **kw)


def study_records(task: str = "rotten_tomatoes", size: int = 100) -> list[dict]:
    kw = {"task": task, "train_size": size}
    return [
        _run("full", 80.0, 134_515_008, **kw),
        _run("partial", 79.0, 20_000_000, {"layers": "-6:", "modules": None}, **kw),
        _run("partial", 70.0, 10_000_000, {"layers": None, "modules": ["self_attn"]}, **kw),
        _run("lora", 78.0, 460_800, LORA_ALL, **kw),
        _run("lora", 78.5, 150_000, {**LORA_ALL, "layers_to_transform": "-10:"}, **kw),
        # the same variant at another learning rate, worse on validation: not selected
        _run("lora", 90.0, 150_000, {**LORA_ALL, "layers_to_transform": "-10:"}, lr=1e-2,
             scores=[50.0, 60.0], **kw),
        _run("bitfit", 74.0, 101_376, {"exclude": ["lm_head"]}, **kw),
    ]


def by_part(study):
    return {(v.method, v.part): v for v in study}


def test_parts_are_named_from_the_method_arguments():
    def named(method, args):
        return part(make_record(method=method, method_args=args))

    assert named("full", {}) == "all weights"
    assert named("lora", LORA_ALL) == "all layers · all-linear"
    assert named("lora", {"layers_to_transform": "-6:", "target_modules": ["q_proj", "v_proj"]}
                 ) == "last 6 layers · q_proj, v_proj"
    assert named("partial", {"layers": [20, 21, 22, 25], "modules": None}
                 ) == "layers 20-22, 25 · all modules"
    assert named("partial", {"layers": ":4", "modules": "self_attn"}
                 ) == "first 4 layers · self_attn"
    assert named("partial", {"layers": [3], "modules": None}) == "layer 3 · all modules"
    assert named("partial", {"layers": "10:20", "modules": None}) == "layers 10:20 · all modules"
    assert named("partial", {"layers": [-2, -1], "modules": None}) == "last 2 layers · all modules"
    assert named("partial", {"layers": [-3, -1], "modules": None}) == "layers -3, -1 · all modules"
    assert named("partial", {"layers": "-1:", "modules": None}) == "last layer · all modules"
    assert named("ia3", {"target_modules": None, "feedforward_modules": None}) == "default modules"
    assert named("bitfit", {"exclude": ["lm_head"]}) == "-"


def test_variants_references_verdicts_and_pareto_front():
    study = variants(study_records())
    found = by_part(study)
    assert [(v.method, v.part) for v in study] == [
        ("full", "all weights"), ("bitfit", "-"), ("lora", "all layers · all-linear"),
        ("lora", "last 10 layers · all-linear"), ("partial", "last 6 layers · all modules"),
        ("partial", "all layers · self_attn")]
    full = found[("full", "all weights")]
    last6 = found[("partial", "last 6 layers · all modules")]
    attention = found[("partial", "all layers · self_attn")]
    lora_all = found[("lora", "all layers · all-linear")]
    lora_last = found[("lora", "last 10 layers · all-linear")]
    bitfit = found[("bitfit", "-")]

    assert last6.reference is full and attention.reference is full
    assert lora_last.reference is lora_all and lora_all.reference is None
    assert full.reference is None and bitfit.reference is None
    assert last6.keeps is True and last6.delta == pytest.approx(-1.0)
    assert last6.fewer == pytest.approx(134_515_008 / 20_000_000)
    assert attention.keeps is False  # 70 < 0.95 x 80
    assert lora_last.keeps is True and lora_last.delta == pytest.approx(0.5)
    # the selected learning rate is the better one on validation, not on test
    assert lora_last.score.mean == 78.5 and lora_last.configs_tried == 2
    assert {(v.method, v.part) for v in study if v.pareto} == {
        ("full", "all weights"), ("partial", "last 6 layers · all modules"),
        ("lora", "last 10 layers · all-linear"), ("bitfit", "-")}


def test_cases_without_selective_runs_are_not_in_the_study():
    plain = [_run("full", 80.0, 134_515_008, task="cola"),
             _run("lora", 78.0, 460_800, LORA_ALL, task="cola")]
    assert variants(plain) == []
    study = variants(plain + study_records())
    assert {v.task for v in study} == {"rotten_tomatoes"}


def test_finding_needs_the_score_kept_with_far_fewer_parameters():
    (finding,) = findings(variants(study_records()))
    assert finding.supported and finding.compared == 3
    assert finding.best is not None and finding.best.part == "last 6 layers · all modules"

    # kept only with 1.5x fewer parameters: not "far fewer"
    few = [_run("lora", 78.0, 300_000, LORA_ALL),
           _run("lora", 77.9, 200_000, {**LORA_ALL, "target_modules": ["q_proj", "v_proj"]})]
    (finding,) = findings(variants(few))
    assert not finding.supported and finding.best is not None
    assert finding.best.fewer == pytest.approx(1.5)

    # nothing kept
    lost = [_run("full", 80.0, 134_515_008), _run("partial", 60.0, 1_000_000, {
        "layers": [29], "modules": None})]
    (finding,) = findings(variants(lost))
    assert not finding.supported and finding.best is None


def test_keeping_a_negative_score_uses_the_signed_target():
    """MCC below zero: 95 % of -10 is -10.5 (not -9.5)."""
    records = [_run("full", -10.0, 134_515_008, task="cola"),
               _run("partial", -10.4, 5_000_000, {"layers": "-2:", "modules": None},
                    task="cola")]
    partial = by_part(variants(records))[("partial", "last 2 layers · all modules")]
    assert partial.keeps is True


def test_failed_runs_and_seeds_are_handled():
    records = [
        *study_records(),
        _run("partial", 81.0, 20_000_000, {"layers": "-6:", "modules": None}, seed=1),
        make_record(method="partial", status="failed",
                    method_args={"layers": "-3:", "modules": None})]
    study = variants(records)
    last6 = by_part(study)[("partial", "last 6 layers · all modules")]
    assert last6.score.n == 2 and last6.score.mean == pytest.approx(80.0)
    assert all(v.part != "last 3 layers · all modules" for v in study)


def test_report_tables_show_the_study_and_its_claim():
    from peftbench.report.tables import all_tables

    tables = all_tables(analyse_records(study_records()))
    table = tables["selective"]
    rows = {(r[2], r[3]): r for r in table.rows}
    last6 = rows[("partial", "last 6 layers · all modules")]
    assert last6[4] == "20.0M" and last6[7] == "-1.0 vs full (all weights)"
    assert last6[8] == "6.7x fewer" and last6[9] == "keeps" and last6[10] == "yes"
    assert rows[("partial", "all layers · self_attn")][9] == "loses"
    assert rows[("bitfit", "-")][7:10] == ["-", "-", "-"]
    assert any(n.startswith("rotten_tomatoes, 100 examples: supported: partial on last 6 "
                            "layers · all modules kept 99 % of full (all weights)'s score")
               for n in table.notes)
    assert all_tables(analyse_records([_run("full", 80.0, 1)]))["selective"].rows == []
    # the benchmark table says which configuration of a method it shows
    lora = next(r for r in tables["benchmark"].rows if r[2] == "lora")
    assert lora[5] == "0.0003 · target_modules=all-linear layers_to_transform=-10: (best of 3)"


def test_a_tie_for_the_most_parameters_names_no_reference_unless_one_is_every_layer():
    first = {**LORA_ALL, "layers_to_transform": "0:10"}
    last = {**LORA_ALL, "layers_to_transform": "-10:"}
    tied = [_run("lora", 78.0, 150_000, first), _run("lora", 82.0, 150_000, last)]
    for records in (tied, tied[::-1]):  # the same answer in either order
        study = variants(records)
        assert all(v.reference is None for v in study)
        assert findings(study) == []
    # among equal counts, LoRA on every layer is the reference
    every = [_run("lora", 80.0, 150_000, LORA_ALL), *tied]
    for records in (every, every[::-1]):
        refs = {v.reference.part for v in variants(records) if v.reference is not None}
        assert refs == {"all layers · all-linear"}


def test_missing_parameter_counts_leave_the_claim_undetermined():
    records = [_run("full", 80.0, 134_515_008),
               _run("partial", 79.0, 1, {"layers": "-6:", "modules": None})]
    del records[1]["params"]["trainable"]
    (finding,) = findings(variants(records))
    assert finding.verdict == "undetermined" and finding.reason == "parameter counts missing"


def test_a_reference_at_or_below_zero_leaves_the_claim_undetermined():
    records = [_run("full", 0.0, 134_515_008, task="cola"),
               _run("partial", 0.0, 10_000_000, {"layers": "-2:", "modules": None},
                    task="cola")]
    (finding,) = findings(variants(records))
    assert finding.verdict == "undetermined" and "at or below zero" in finding.reason


def test_partial_fine_tuning_is_not_a_peft_method_in_the_convergence_claim():
    """Adding partial runs must not change the verdict on 'PEFT converges slower'."""
    slow = [50.0, 55.0, 60.0, 70.0, 80.0]  # reaches 95 % of its best late
    fast = [50.0, 79.0, 80.0, 80.0, 80.0]  # early
    base = [make_record(method="full", scores=fast, test=80.0),
            make_record(method="lora", scores=slow, test=80.0, method_args=LORA_ALL)]
    with_partial = [*base, make_record(method="partial", scores=fast, test=80.0,
                                       method_args={"layers": "-6:", "modules": None})]
    (alone,) = analyse_records(base).claims
    (mixed,) = analyse_records(with_partial).claims
    assert alone.verdict == mixed.verdict == "supported"
    assert mixed.slower == ["lora"] and mixed.not_slower == []
