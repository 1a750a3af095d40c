"""The training loop on tiny random models: learning, determinism, reload, divergence."""

from __future__ import annotations

import json
import os

import pytest
import torch

from peftbench.config import RunSpec
from peftbench.evaluation.evaluator import Evaluator
from peftbench.methods import get_method
from peftbench.models import load_model
from peftbench.tasks import load_task
from peftbench.training.device import autocast_factory
from peftbench.training.encoding import TextEncoder
from peftbench.training.runner import execute

METHODS = ["full", "lora", "ia3", "prompt_tuning", "bitfit", "partial"]
MODELS = ["tiny-random-llama", "tiny-random-t5"]
# tiny random models learn from scratch: larger steps than the pretrained-model defaults
TEST_LR = {"full": 3e-3, "lora": 1e-2, "ia3": 3e-2, "prompt_tuning": 1e-1, "bitfit": 1e-2,
           "partial": 3e-3}
# methods that need arguments: partial trains the last layer
ARGS = {"partial": {"layers": "-1:"}}


def _spec(model: str, method: str, **overrides) -> RunSpec:
    fields = {"model": model, "task": "toy_cls", "method": method, "train_size": 256,
              "max_steps": 40, "batch_size": 16, "lr": TEST_LR[method], "eval_every": 20,
              "max_eval_examples": 32, "precision": "fp32", "device": "cpu", "seed": 0,
              "method_args": ARGS.get(method, {})}
    fields.update(overrides)
    return RunSpec(**fields)


@pytest.mark.parametrize("model", MODELS)
@pytest.mark.parametrize("method", METHODS)
def test_each_method_trains_and_loss_falls(tmp_path, model, method):
    record = execute(_spec(model, method), tmp_path)
    assert record["status"] == "completed", record["error"]
    losses = [p["train_loss"] for p in record["curve"] if p["train_loss"] is not None]
    assert losses[-1] < losses[0], losses
    assert [p["step"] for p in record["curve"]] == [0, 20, 40]
    saved = json.loads((tmp_path / "result.json").read_text())
    assert saved["run"]["hash"] == record["run"]["hash"]
    assert set(saved) >= {"run", "status", "error", "params", "curve", "scores",
                          "efficiency", "provenance"}
    assert saved["scores"]["test"]["primary"] == "accuracy"
    assert saved["efficiency"]["adapter_bytes"] > 0
    assert saved["provenance"]["model_fingerprint"] and saved["provenance"]["data_fingerprint"]


def test_same_seed_same_curve_other_seed_other_curve(tmp_path):
    def curve(seed: int, name: str):
        record = execute(_spec("tiny-random-llama", "lora", seed=seed), tmp_path / name)
        return [(p["step"], p["samples"], p["train_loss"], p["val_score"])
                for p in record["curve"]]

    assert curve(1, "a") == curve(1, "b")
    assert curve(1, "a") != curve(2, "c")


@pytest.mark.parametrize("model", MODELS)
@pytest.mark.parametrize("method", METHODS)
def test_saved_adapter_reproduces_test_predictions(tmp_path, model, method):
    spec = _spec(model, method, task="toy_gen" if method == "lora" else "toy_cls",
                 max_steps=20, eval_every=10)
    record = execute(spec, tmp_path)
    assert record["status"] == "completed", record["error"]

    base = load_model(model, seed=spec.seed)
    m = get_method(method)
    reloaded = m.load(base.model, tmp_path / "adapter", m.resolve_args(ARGS.get(method, {})),
                      encoder_decoder=base.is_encoder_decoder)
    task = load_task(spec.task, train_size=spec.train_size, seed=spec.seed,
                     max_eval_examples=spec.max_eval_examples)
    encoder = TextEncoder(base.tokenizer, base.is_encoder_decoder, spec.max_source_length,
                          spec.max_target_length)
    evaluator = Evaluator(task.spec, encoder, task.test, torch.device("cpu"),
                          autocast_factory(torch.device("cpu"), "fp32"), 32,
                          record_max_new_tokens(record, encoder, task))
    assert evaluator.evaluate(reloaded) == record["scores"]["test"]


def record_max_new_tokens(record, encoder, task) -> int:
    from peftbench.training.loop import max_new_tokens

    return max_new_tokens(encoder.encode_many([(e.input, e.target) for e in task.train]),
                          record["run"]["config"]["max_target_length"])


def test_nan_loss_stops_the_run_as_diverged(tmp_path):
    record = execute(_spec("tiny-random-llama", "full", lr=1e30, max_steps=30), tmp_path)
    assert record["status"] == "diverged"
    assert "loss became" in record["error"]
    def strict(constant: str) -> None:
        raise AssertionError(f"{constant} is not JSON")

    saved = json.loads((tmp_path / "result.json").read_text(), parse_constant=strict)
    assert saved["status"] == "diverged"  # the NaN loss written as null, not a bare NaN
    assert (tmp_path / "result.json").stat().st_mode & 0o777 == 0o666 & ~_umask()


def _umask() -> int:
    umask = os.umask(0)
    os.umask(umask)
    return umask


def test_best_validation_checkpoint_is_the_one_tested(tmp_path):
    record = execute(_spec("tiny-random-llama", "lora", max_steps=40, eval_every=10), tmp_path)
    best = max(record["curve"], key=lambda p: p["val_score"])
    assert record["scores"]["best_step"] == best["step"]
    assert record["scores"]["val"]["accuracy"] == best["val_score"]


@pytest.mark.parametrize("method", ["lora", "prompt_tuning", "full"])
def test_gathered_target_logits_give_the_models_own_loss(method):
    from peftbench.training.encoding import collate
    from peftbench.training.objective import mean_loss, supports_gathered_logits

    loaded = load_model("tiny-random-llama", seed=0)
    m = get_method(method)
    model = m.apply(loaded.model, m.resolve_args({}), encoder_decoder=False).eval()
    task = load_task("toy_gen", train_size=8)
    encoder = TextEncoder(loaded.tokenizer, False, 256, 64)
    batch = collate([encoder.encode(e.input, e.target) for e in task.train], encoder.pad_id)
    assert supports_gathered_logits(model, batch)
    with torch.no_grad():
        expected = model(**batch).loss
        assert torch.allclose(mean_loss(model, batch, False, gather=True), expected, atol=1e-5)


@pytest.mark.filterwarnings("ignore:precision bf16:RuntimeWarning")  # on AVX2-only CPUs
@pytest.mark.parametrize("method", METHODS)
def test_bf16_keeps_frozen_weights_bf16_and_trainable_fp32(tmp_path, method):
    from peftbench.training.precision import store_frozen_in_bf16

    loaded = load_model("tiny-random-llama", seed=0)
    m = get_method(method)
    model = m.apply(loaded.model, m.resolve_args(ARGS.get(method, {})), encoder_decoder=False)
    store_frozen_in_bf16(model)
    for name, param in model.named_parameters():
        frozen_matrix = not param.requires_grad and param.dim() >= 2
        assert param.dtype == (torch.bfloat16 if frozen_matrix else torch.float32), name
    record = execute(_spec("tiny-random-llama", method, precision="bf16"), tmp_path)
    assert record["status"] == "completed", record["error"]
    losses = [p["train_loss"] for p in record["curve"] if p["train_loss"] is not None]
    assert losses[-1] < losses[0], losses


@pytest.mark.parametrize("name", ["tiny-random-llama", "tiny-random-t5"])
def test_bf16_keeps_the_residual_stream_fp32_as_plain_autocast_does(name):
    """Frozen bf16 storage changes where rounding happens, not the dtype of the stream."""
    from peftbench.training.precision import store_frozen_in_bf16

    loaded = load_model(name, seed=0)
    m = get_method("lora")
    model = m.apply(loaded.model, m.resolve_args({}), encoder_decoder=name.endswith("t5")).eval()
    ids = torch.tensor([[5, 6, 7, 8]])
    extra = {"decoder_input_ids": ids} if name.endswith("t5") else {}
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        reference = model(input_ids=ids, output_hidden_states=True, **extra)
        store_frozen_in_bf16(model)
        store_frozen_in_bf16(model)  # idempotent: one hook, not two
        stored = model(input_ids=ids, output_hidden_states=True, **extra)
    embeddings = [m for m in model.modules() if isinstance(m, torch.nn.Embedding)]
    assert embeddings and all(len(m._forward_hooks) == 1 for m in embeddings)
    key = "decoder_hidden_states" if name.endswith("t5") else "hidden_states"
    assert stored[key][0].dtype == torch.float32
    assert stored[key][-1].dtype == reference[key][-1].dtype
    scale = reference.logits.float().abs().max().item()
    difference = (stored.logits.float() - reference.logits.float()).abs().max().item()
    assert difference <= 0.03 * scale, (difference, scale)  # bf16 rounding, not another model


def test_a_reused_output_folder_holds_only_the_last_runs_adapter(tmp_path):
    full = execute(_spec("tiny-random-llama", "full", max_steps=2, eval_every=2), tmp_path)
    lora = execute(_spec("tiny-random-llama", "lora", max_steps=2, eval_every=2), tmp_path)
    files = {p.name for p in (tmp_path / "adapter").iterdir()}
    assert files == {"README.md", "adapter_config.json", "adapter_model.safetensors"}, files
    on_disk = sum(p.stat().st_size for p in (tmp_path / "adapter").iterdir())
    assert lora["efficiency"]["adapter_bytes"] == on_disk
    assert on_disk < full["efficiency"]["adapter_bytes"]
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".adapter")]
    assert (tmp_path / "adapter").stat().st_mode & 0o777 == 0o777 & ~_umask()  # as mkdir
    for written in (tmp_path / "adapter").iterdir():  # as open: colleagues can load them
        assert written.stat().st_mode & 0o777 == 0o666 & ~_umask(), written.name


def test_epochs_that_overshoot_are_recorded_and_warned(tmp_path):
    from peftbench.training.loop import epochs_warning

    spec = _spec("tiny-random-llama", "lora", max_steps=None, epochs=1, grad_accum=8,
                 train_size=32, eval_every=None)
    record = execute(spec, tmp_path)
    assert record["run"]["total_steps"] == 1 and record["run"]["epochs"] == 4.0
    assert any("1 step(s) train 4.0 epochs" in w for w in record["run"]["warnings"])
    fine = _spec("tiny-random-llama", "lora", max_steps=None, epochs=3, train_size=1000)
    assert epochs_warning(fine, 188, 1000) is None  # 3.008 epochs: rounding, not a problem
    tiny = _spec("tiny-random-llama", "lora", max_steps=None, epochs=0.01)
    assert "2 step(s) train 0.016 epochs" in epochs_warning(tiny, 2, 2000)  # was "0.0"


def test_evaluation_examples_that_were_trained_on_are_warned():
    from peftbench.tasks.base import Example
    from peftbench.training.loop import overlap_warning

    train = [Example(f"text {i}", "yes") for i in range(50)]
    fresh = [Example(f"other {i}", "yes") for i in range(20)]
    assert overlap_warning(train, {"validation": fresh, "test": fresh}) is None
    one = fresh[:19] + train[:1]  # 1 of 20: the odd duplicate real datasets have
    assert overlap_warning(train, {"validation": one, "test": fresh}) is None
    warning = overlap_warning(train, {"validation": fresh, "test": fresh[:10] + train[:10]})
    assert warning and warning.startswith("10 of 20 test examples are also training")
    relabelled = [Example(e.input, "no") for e in train[:20]]  # same text, other target
    assert overlap_warning(train, {"validation": relabelled, "test": []}) is None


def test_tiny_evaluation_splits_are_warned_unless_capped_on_purpose():
    from peftbench.training.loop import small_split_warning

    spec = _spec("tiny-random-llama", "lora", max_eval_examples=None)
    warning = small_split_warning(spec, {"train": 10, "validation": 1, "test": 4})
    assert warning and "(validation 1, test 4)" in warning and "worth 100 points" in warning
    assert small_split_warning(spec, {"train": 5, "validation": 20, "test": 300}) is None
    capped = _spec("tiny-random-llama", "lora", max_eval_examples=8)
    assert small_split_warning(capped, {"train": 10, "validation": 8, "test": 8}) is None
    assert "test 3" in small_split_warning(capped, {"train": 10, "validation": 8, "test": 3})
