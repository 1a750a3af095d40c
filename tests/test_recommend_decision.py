"""The decision framework and `recommend`: ties broken by cost, preferences, caps, confidence."""

from __future__ import annotations

import pytest

from analysis_fakes import fake_suite, make_record
from peftbench.analysis.decision import DecisionConfig, decide, decision_table, pooled_noise
from peftbench.analysis.recommend import recommend
from peftbench.analysis.records import build_cells
from peftbench.analysis.scales import Scales
from peftbench.errors import UsageError


def case(scores: dict[str, list[float]], task: str = "rotten_tomatoes", size: int = 100,
         **kwargs) -> list[dict]:
    """Records of one task and size: ``{method: [test score per seed]}``."""
    return [make_record(task=task, method=m, train_size=size, seed=s, scores=[50.0, v + 1],
                        test=v, **kwargs)
            for m, values in scores.items() for s, v in enumerate(values)]


def ranking(records: list[dict], **config) -> list[str]:
    cells = build_cells(records)
    return [s.method for s in decide(cells, "classification", "low",
                                     DecisionConfig(**config)).ranking]


def test_single_seed_tie_within_one_point_is_broken_by_cost():
    records = case({"full": [80.0], "lora": [79.5], "prompt_tuning": [70.0]})
    assert ranking(records, prefer="accuracy")[:2] == ["lora", "full"]
    d = decide(build_cells(records), "classification", "low", DecisionConfig(prefer="accuracy"))
    assert d.noise == 1.0 and d.noise_kind == "single seed"
    assert "within 1.0 of full" in d.why and "fewer trainable parameters" in d.why


def test_difference_beyond_single_seed_noise_is_not_a_tie():
    records = case({"full": [80.0], "lora": [78.5]})
    assert ranking(records, prefer="accuracy") == ["full", "lora"]


def test_pooled_seed_std_sets_the_noise():
    records = case({"full": [80.0, 84.0], "lora": [79.0, 81.0]})
    cells = build_cells(records)
    noise, kind = pooled_noise(cells)
    assert kind == "pooled seed std"
    assert noise == pytest.approx(((8.0 + 2.0) / 2) ** 0.5)
    # means 82 vs 80: the 2-point gap is within the noise (2.24): tie -> cheaper lora
    assert ranking(records, prefer="accuracy") == ["lora", "full"]


def test_prefer_cheap_gives_up_more_score_than_accuracy():
    records = case({"full": [80.0], "lora": [78.0], "ia3": [76.0], "prompt_tuning": [60.0]})
    assert ranking(records, prefer="accuracy")[0] == "full"
    assert ranking(records, prefer="balanced")[0] == "lora"  # within 1 + 2 points
    assert ranking(records, prefer="cheap")[0] == "ia3"  # within 1 + 5, cheapest of those
    assert ranking(records, prefer="cheap")[-1] == "prompt_tuning"


def test_caps_on_trainable_parameters_and_memory():
    records = case({"full": [80.0], "lora": [79.0], "ia3": [70.0]})
    cells = build_cells(records)
    d = decide(cells, "classification", "low",
               DecisionConfig(prefer="accuracy", max_trainable_params=100_000))
    assert [s.method for s in d.ranking] == ["ia3"]
    assert {m for m, _ in d.excluded} == {"full", "lora"}
    d = decide(cells, "classification", "low", DecisionConfig(max_memory_mb=1400))
    assert [s.method for s in d.ranking] == ["ia3"]
    assert dict(d.excluded)["lora"].endswith("MB peak memory on smollm2-135m / "
                                             "rotten_tomatoes > cap 1,400 MB")
    d = decide(cells, "classification", "low", DecisionConfig(max_trainable_params=10))
    assert d.recommended is None and "no measured method fits the caps" in d.why


def test_a_cap_holds_on_every_model_not_on_the_mean_over_models():
    """LoRA at 16,384 trainable parameters on one model and 43,008 on another passed a 30K
    cap on their mean (29,696)."""
    records = [make_record(model=model, method="lora", trainable=n, test=80.0)
               for model, n in (("small", 16_384), ("big", 43_008))]
    records += [make_record(model=model, method="ia3", trainable=1_000, test=70.0)
                for model in ("small", "big")]
    d = decide(build_cells(records), "classification", "low",
               DecisionConfig(max_trainable_params=30_000))
    assert [s.method for s in d.ranking] == ["ia3"]
    assert dict(d.excluded)["lora"] == "43,008 trainable parameters on big / rotten_tomatoes " \
        "> cap 30,000"


def test_unknown_preference_and_bad_scales_are_usage_errors():
    with pytest.raises(UsageError, match="--prefer"):
        DecisionConfig(prefer="fast")
    with pytest.raises(UsageError, match="LOW,HIGH"):
        Scales.parse("500")
    with pytest.raises(UsageError, match="0 < LOW < HIGH"):
        Scales.parse("5000,500")
    assert Scales.parse("10,20").of(15) == "medium"


def test_gaps_are_per_case_so_metrics_do_not_mix():
    # MCC around 30, accuracy around 80: gaps to the best of each case are averaged
    records = (case({"full": [30.0], "lora": [29.0]}, task="cola")
               + case({"full": [80.0], "lora": [81.0]}))
    d = decide(build_cells(records), "classification", "low", DecisionConfig(prefer="accuracy"))
    gaps = {s.method: s.gap.mean for s in d.ranking}
    assert gaps == {"full": pytest.approx(-0.5), "lora": pytest.approx(-0.5)}
    assert d.recommended.method == "lora"  # tie -> cheaper


def test_decision_table_has_one_row_per_type_and_scale():
    cells = build_cells(fake_suite(sizes=(100, 1000, 10000)))
    table = decision_table(cells, DecisionConfig())
    assert [(d.task_type, d.scale) for d in table] == [
        ("classification", "low"), ("classification", "medium"), ("classification", "high"),
        ("generation", "low"), ("generation", "medium"), ("generation", "high")]
    assert all(d.recommended is not None and d.runner_up is not None for d in table)


def test_recommend_in_range_with_seeds_and_tasks_is_high_confidence():
    records = fake_suite(tasks=("rotten_tomatoes", "cola"), sizes=(100, 1000), seeds=(0, 1, 2))
    rec = recommend(build_cells(records), "classification", 300, DecisionConfig(prefer="cheap"))
    assert rec.scale == "low" and rec.method is not None
    assert rec.lr is not None and rec.evidence
    assert {e.task for e in rec.evidence} == {"rotten_tomatoes", "cola"}
    if all(e.tied_with_best for e in rec.evidence):
        assert rec.confidence == "high"
    else:
        assert rec.confidence == "medium"


def test_recommend_single_seed_or_extrapolated_is_low_confidence():
    cells = build_cells(fake_suite(sizes=(100, 1000)))
    rec = recommend(cells, "classification", 300, DecisionConfig())
    assert rec.confidence == "low"
    assert any("single seed" in r for r in rec.confidence_reasons)
    cells3 = build_cells(fake_suite(sizes=(100, 1000), seeds=(0, 1)))
    far = recommend(cells3, "generation", 50_000, DecisionConfig())
    assert far.confidence == "low" and far.scale == "high"
    assert far.evidence_sizes == [1000]  # nothing at high scale: the nearest size stands in
    assert any("extrapolated" in r for r in far.confidence_reasons)


def test_recommend_configuration_comes_from_the_nearest_measured_size():
    records = case({"lora": [80.0]}, size=100, lr=1e-3) + case({"lora": [85.0]}, size=400,
                                                                lr=3e-4)
    rec = recommend(build_cells(records), "classification", 350, DecisionConfig())
    assert rec.method == "lora" and rec.lr == 3e-4
    assert rec.resolved_args["r"] == 8


def test_recommend_errors_name_the_problem():
    cells = build_cells(fake_suite(tasks=("rotten_tomatoes",)))
    with pytest.raises(UsageError, match="no results for this task type"):
        recommend(cells, "generation", 100, DecisionConfig())
    with pytest.raises(UsageError, match="--task-type"):
        recommend(cells, "regression", 100, DecisionConfig())


def test_a_recommendation_from_untrained_scores_says_so():
    """Best validation at step 0 in every run: the base model's score, not the method's."""
    flat = [make_record(method=m, scores=[60.0, 55.0, 50.0], test=59.0, trainable=n)
            for m, n in (("full", 134_000_000), ("ia3", 1_000))]
    d = decide(build_cells(flat), "classification", "low", DecisionConfig())
    assert d.recommended.method == "ia3"
    assert "its best validation score was the untrained model's (step 0)" in d.why
    trained = [make_record(method=m, trainable=n) for m, n in (("full", 134_000_000),
                                                               ("ia3", 1_000))]
    assert "untrained" not in decide(build_cells(trained), "classification", "low",
                                     DecisionConfig()).why
